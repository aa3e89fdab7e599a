//! The request target a decision is made on: the path the backend will
//! serve and the method its handler will run, or a refusal for a request
//! whose meaning depends on who reads it.
//!
//! A proxy and the application behind it may read one raw path differently:
//! one sees `/.well-known/../api/orders`, the other serves `/api/orders`. The
//! rule here is that the policy decides on the path as an RFC 3986 backend
//! resolves it, and anything on which backends disagree is refused:
//!
//! * **normalised**: percent-encoded bytes other than those below are decoded
//!   (`%41` is `A`, `%2e` is `.`); empty segments are merged (`//`); dot
//!   segments are removed as in RFC 3986 §5.2.4 (`/a/./b/../c` is `/a/c`,
//!   and `..` cannot climb above `/`);
//! * **refused** (400, with the reason): a target that is not origin-form
//!   (`*`, `http://…`); a fragment; a raw or encoded `\`; an encoded `/`; an
//!   encoded `%` (double encoding); a `;` path parameter, raw or encoded; an
//!   encoded `?` or `#`; NUL and every other control byte, raw or encoded;
//!   a malformed escape (`%zz`, `%4`); raw bytes outside RFC 3986's path
//!   characters (space, `"`, `<`, `>`, `^`, `` ` ``, `{`, `|`, `}`, non-ASCII);
//!   decoded bytes that are not UTF-8; Unicode look-alikes of `.`, `/` and
//!   `\` (full-width and compatibility forms that some stacks fold to ASCII).
//!
//! Case is not folded (paths are case-sensitive), but a backend that matches
//! routes case-insensitively must not reach a rule another case avoids: the
//! route policy refuses a path whose rule changes with case (see
//! [`super::policy::RoutePolicy::route`]).
//!
//! Methods: the method must be an upper-case token (`get` is refused: a
//! backend that upper-cases it would run `GET` under a `get` decision);
//! `HEAD` is decided as `GET` because GET handlers serve it; method-override
//! headers and a `_method` query parameter are refused, since a backend that
//! honours them runs another method than the one decided on.

use std::{borrow::Cow, fmt};

/// Headers through which some frameworks let a client replace the method.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Why a request target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    NotOriginForm,
    Fragment,
    Backslash,
    EncodedSlash,
    EncodedPercent,
    PathParameter,
    EncodedDelimiter,
    ControlCharacter,
    BadPercentEncoding,
    InvalidCharacter,
    InvalidUtf8,
    LookAlike,
    AmbiguousCase,
    AmbiguousDotSegments,
    TrailingDotOrSpace,
    InvalidMethod,
    MethodOverride,
}

impl Malformed {
    /// The reason as a metric label and in the 400 body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotOriginForm => "path_not_origin_form",
            Self::Fragment => "path_fragment",
            Self::Backslash => "path_backslash",
            Self::EncodedSlash => "path_encoded_slash",
            Self::EncodedPercent => "path_encoded_percent",
            Self::PathParameter => "path_parameter",
            Self::EncodedDelimiter => "path_encoded_delimiter",
            Self::ControlCharacter => "path_control_character",
            Self::BadPercentEncoding => "path_bad_percent_encoding",
            Self::InvalidCharacter => "path_invalid_character",
            Self::InvalidUtf8 => "path_invalid_utf8",
            Self::LookAlike => "path_look_alike_character",
            Self::AmbiguousCase => "path_ambiguous_case",
            Self::AmbiguousDotSegments => "path_ambiguous_dot_segments",
            Self::TrailingDotOrSpace => "path_trailing_dot_or_space",
            Self::InvalidMethod => "method_invalid",
            Self::MethodOverride => "method_override",
        }
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The method a decision is made for: upper-case token, `HEAD` as `GET`.
pub fn canonical_method(method: &str) -> Result<&str, Malformed> {
    if method.is_empty()
        || !method
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Err(Malformed::InvalidMethod);
    }
    Ok(if method == "HEAD" { "GET" } else { method })
}

/// A query that asks for another method: a parameter whose name reads
/// `_method` as the frameworks that honour it read names — pairs split on
/// `&` or `;`, the name percent-decoded with `+` as a space, and `.`, space
/// and `[` taken for `_` (PHP), in any case.
pub fn query_overrides_method(query: &str) -> bool {
    query.split(['&', ';']).any(|pair| {
        let raw = pair.split('=').next().unwrap_or("");
        let bytes = raw.replace('+', " ");
        let bytes = bytes.as_bytes();
        let mut name = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |at: usize| bytes.get(at).and_then(|&h| (h as char).to_digit(16));
            match (bytes[i], hex(i + 1), hex(i + 2)) {
                (b'%', Some(hi), Some(lo)) => {
                    name.push((hi * 16 + lo) as u8);
                    i += 3;
                }
                (b, _, _) => {
                    name.push(b);
                    i += 1;
                }
            }
        }
        let name: Vec<u8> = name
            .into_iter()
            .map(|b| match b {
                b'.' | b' ' | b'[' => b'_',
                b => b.to_ascii_lowercase(),
            })
            .collect();
        name.trim_ascii() == b"_method"
    })
}

/// Splits a `:path` into its path and query (without the `?`).
pub fn split_query(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// The path as an RFC 3986 backend resolves it, or why it is refused.
/// `path` excludes the query.
pub fn canonical_path(path: &str) -> Result<Cow<'_, str>, Malformed> {
    if !path.starts_with('/') {
        return Err(Malformed::NotOriginForm);
    }
    if is_canonical(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let raw = path.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let hex = |at: usize| raw.get(at).and_then(|&h| (h as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(Malformed::BadPercentEncoding);
                };
                let byte = (hi * 16 + lo) as u8;
                match byte {
                    b'/' => return Err(Malformed::EncodedSlash),
                    b'\\' => return Err(Malformed::Backslash),
                    b'%' => return Err(Malformed::EncodedPercent),
                    b';' => return Err(Malformed::PathParameter),
                    b'?' | b'#' => return Err(Malformed::EncodedDelimiter),
                    0..=0x1f | 0x7f => return Err(Malformed::ControlCharacter),
                    _ => decoded.push(byte),
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(Malformed::Backslash),
            b';' => return Err(Malformed::PathParameter),
            b'#' => return Err(Malformed::Fragment),
            0..=0x1f | 0x7f => return Err(Malformed::ControlCharacter),
            b'/' => decoded.push(b),
            b if is_plain(b) => decoded.push(b),
            _ => return Err(Malformed::InvalidCharacter),
        }
        i += 1;
    }
    let decoded = String::from_utf8(decoded).map_err(|_| Malformed::InvalidUtf8)?;
    if !decoded.is_ascii() && decoded.chars().any(is_look_alike) {
        return Err(Malformed::LookAlike);
    }
    // Backends disagree on `..` after an empty segment (RFC 3986 keeps
    // the empty segment and pops it; Go's path.Clean merges first): what
    // no honest client sends is refused, not guessed.
    let parts: Vec<&str> = decoded.split('/').skip(1).collect();
    let mut empty_before = false;
    for part in &parts {
        match *part {
            "" => empty_before = true,
            ".." if empty_before => return Err(Malformed::AmbiguousDotSegments),
            _ => {}
        }
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in parts {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            // Windows and .NET path mapping trim trailing dots and spaces
            // (`admin.` is `admin`, `.. ` is `..`).
            s if s.ends_with('.') || s.ends_with(' ') => {
                return Err(Malformed::TrailingDotOrSpace);
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// The punctuation of RFC 3986's `pchar` without `%` and `;`: unreserved,
/// sub-delims but `;`, `:` and `@`. With the ASCII letters and digits,
/// the bytes that mean themselves in a path segment (edge mode matches the
/// same set in Envoy).
pub const PLAIN_PUNCTUATION: &str = "-._~!$&'()*+,=:@";

/// A byte that means itself in a path segment.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || PLAIN_PUNCTUATION.as_bytes().contains(&b)
}

/// The common case, in one pass without allocating: only plain path
/// characters, no escape, no empty, `.` or `..` segment, no trailing `/`
/// (the root alone excepted). Such a path is its own canonical form.
fn is_canonical(raw: &[u8]) -> bool {
    if raw == b"/" {
        return true;
    }
    let mut segment_start = 0;
    for (i, &b) in raw.iter().enumerate() {
        match b {
            b'/' => {
                let segment = &raw[segment_start..i];
                if i > 0 && (segment.is_empty() || segment.ends_with(b".")) {
                    return false;
                }
                segment_start = i + 1;
            }
            b if is_plain(b) => {}
            _ => return false,
        }
    }
    let last = &raw[segment_start..];
    !(last.is_empty() || last.ends_with(b"."))
}

/// Characters that Unicode compatibility folding (NFKC), "best fit"
/// code-page mapping or confusable handling turn into `.`, `/` or `\`,
/// full-width ASCII (U+FF01–U+FF5E, which NFKC and best-fit mapping turn
/// into ASCII), and letters whose upper or lower case is ASCII (`ı` is `I`
/// upper-cased, `ſ` is `S`, the Kelvin sign is `k`): a case-insensitive
/// backend (Java's `equalsIgnoreCase`) reads `adm\u{131}n` as `admin`.
fn is_look_alike(c: char) -> bool {
    !c.is_ascii()
        && (('\u{FF01}'..='\u{FF5E}').contains(&c)
            || c.to_lowercase().any(|l| l.is_ascii())
            || c.to_uppercase().any(|u| u.is_ascii())
            || is_separator_look_alike(c))
}

fn is_separator_look_alike(c: char) -> bool {
    matches!(
        c,
        '\u{2024}' // one dot leader
            | '\u{2025}' // two dot leader
            | '\u{FE52}' // small full stop
            | '\u{FF0E}' // full-width full stop
            | '\u{3002}' // ideographic full stop
            | '\u{FF61}' // half-width ideographic full stop
            | '\u{2215}' // division slash
            | '\u{2044}' // fraction slash
            | '\u{29F8}' // big solidus
            | '\u{FF0F}' // full-width solidus
            | '\u{FE68}' // small reverse solidus
            | '\u{FF3C}' // full-width reverse solidus
            | '\u{29F5}' // reverse solidus operator
            | '\u{29F9}' // big reverse solidus
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_removed_and_slashes_merged() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b"),
            ("//a///b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../a", "/a"),
            ("/.well-known/../api/orders", "/api/orders"),
            ("/.well-known/%2e%2e/api/orders", "/api/orders"),
            ("/.well-known/%2E./api", "/api"),
            ("/a/%41", "/a/A"),
            ("/a/..", "/"),
            ("/caf%C3%A9", "/café"),
        ] {
            assert_eq!(canonical_path(raw).as_deref(), Ok(want), "{raw}");
            // A canonical ASCII path is its own canonical form (decoded
            // non-ASCII is compared decoded, never sent raw).
            if want.is_ascii() {
                assert_eq!(canonical_path(want).as_deref(), Ok(want), "{want}");
            }
        }
    }

    #[test]
    fn ambiguous_forms_are_refused_with_their_reason() {
        use Malformed::*;
        for (raw, why) in [
            ("*", NotOriginForm),
            ("http://x/a", NotOriginForm),
            ("", NotOriginForm),
            ("/a#b", Fragment),
            ("/a\\..\\b", Backslash),
            ("/a%5c..%5Cb", Backslash),
            ("/v1%2fadmin", EncodedSlash),
            ("/v1%2Fadmin", EncodedSlash),
            ("/a/%252e%252e/b", EncodedPercent),
            ("/v1/admin;x/users", PathParameter),
            ("/v1/admin%3bx", PathParameter),
            ("/a%3Fb", EncodedDelimiter),
            ("/a%23b", EncodedDelimiter),
            ("/a%00", ControlCharacter),
            ("/a\0", ControlCharacter),
            ("/a%0d%0a", ControlCharacter),
            ("/a%7f", ControlCharacter),
            ("/a%zz", BadPercentEncoding),
            ("/a%4", BadPercentEncoding),
            ("/a%", BadPercentEncoding),
            ("/a b", InvalidCharacter),
            ("/a<b>", InvalidCharacter),
            ("/é", InvalidCharacter),
            ("/a%ff", InvalidUtf8),
            ("/a%c0%ae%c0%ae", InvalidUtf8),
            ("/%EF%BC%8E%EF%BC%8E/admin", LookAlike),
            ("/a%E2%88%95b", LookAlike),
            ("/v1/adm%C4%B1n/users", LookAlike),
            ("/v1/adm%C4%B0n/users", LookAlike),
            ("/v1/u%C5%BFers", LookAlike),
            ("/%E2%84%AA", LookAlike),
            ("/v1/%EF%BD%81dmin", LookAlike),
            (
                "/v1/admin/users/42/roles/////../../../../../v1/auth/login",
                AmbiguousDotSegments,
            ),
            ("/v1/admin/files//%2e%2e/x", AmbiguousDotSegments),
            ("/.well-known/..%20/v1/admin/users", TrailingDotOrSpace),
            ("/v1/admin./users", TrailingDotOrSpace),
            ("/v1/admin%20/users", TrailingDotOrSpace),
            ("/a/...", TrailingDotOrSpace),
        ] {
            assert_eq!(canonical_path(raw), Err(why), "{raw:?}");
        }
    }

    #[test]
    fn methods_are_upper_case_tokens_and_head_is_get() {
        assert_eq!(canonical_method("GET"), Ok("GET"));
        assert_eq!(canonical_method("HEAD"), Ok("GET"));
        assert_eq!(canonical_method("POST"), Ok("POST"));
        for bad in ["get", "Get", "", "GE T", "GET\r\n"] {
            assert_eq!(
                canonical_method(bad),
                Err(Malformed::InvalidMethod),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_method_parameter_in_the_query_is_seen() {
        assert!(query_overrides_method("_method=DELETE"));
        assert!(query_overrides_method("a=1&_METHOD=put"));
        assert!(query_overrides_method("%5Fmethod=put"));
        for sneaky in [
            "_%6Dethod=DELETE",
            "%5F%6D%65%74%68%6F%64=DELETE",
            ".method=DELETE",
            "+method=DELETE",
            "[method=DELETE",
            "a=1;_method=DELETE",
        ] {
            assert!(query_overrides_method(sneaky), "{sneaky}");
        }
        assert!(!query_overrides_method("a=_method"));
        assert!(!query_overrides_method("my_method=x"));
    }
}
