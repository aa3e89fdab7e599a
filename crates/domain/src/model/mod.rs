//! The value types every context shares: an account ([`account`]) and a
//! linked streaming-platform account ([`platform`]). The lowest layer of
//! the kernel above [`crate::error`]: the domain events and every context
//! build on it, and it imports none of them.

pub mod account;
pub mod platform;
