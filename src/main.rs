//! `auth-service` command line: serve (default), rotate the signing key, or
//! grant roles from the operator's shell (how the first admin is made).

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context as _;
use auth_service::{
    accounts::model::{LoginName, Role, normalise_roles},
    config::Config,
    events::{OutboxEvent, RequestContext, worker::WorkerCommand},
    startup::{Application, reload_keys_on_sighup, run_events_worker, shutdown_signal},
    storage::open_database,
    telemetry, tokens,
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "auth-service", version, about = "ImmersiVerse Auth Service")]
struct Cli {
    /// TOML configuration file (values in AUTH_* variables override it).
    #[arg(long, env = "AUTH_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC and the HTTP admin port (the default).
    Serve,
    /// Run only the event side: the outbox relay and the lifecycle
    /// consumer (`serve` starts this as a supervised child by default).
    Events {
        /// Started by `serve`: stop when standard input closes.
        #[arg(long, hide = true)]
        supervised: bool,
    },
    /// Apply pending database schema migrations and exit (the Kubernetes
    /// migrations Job; servers with `database_migrations = "wait"` never
    /// migrate themselves).
    Migrate,
    /// Add a new signing key and delete keys retired longer than an
    /// access-token lifetime ago. Running servers pick the key up on their
    /// next key-directory poll (or SIGHUP); it is published in the JWKS at
    /// once and signs from its activation time on.
    RotateKey {
        /// Seconds until the new key signs. Use more than the time a changed
        /// Secret takes to reach every replica (Kubernetes: 2-3 minutes), so
        /// every replica can verify the key before any signs with it.
        #[arg(long, default_value_t = 0)]
        activate_in: u64,
    },
    /// Add a new platform-token vault key (old keys still open). Running
    /// servers load it by themselves. Then run `reseal-platform-tokens`.
    RotatePlatformKey {
        /// Seconds until the new key seals (see `rotate-key`).
        #[arg(long, default_value_t = 0)]
        activate_in: u64,
    },
    /// Re-encrypt every stored platform token under the current vault key
    /// (safe while servers run).
    ResealPlatformTokens,
    /// Replace the roles of a user, e.g. `set-roles alice admin user`.
    SetRoles {
        /// Email or username.
        login: String,
        roles: Vec<String>,
    },
    /// Write the protobuf descriptor set (for Envoy's gRPC-JSON transcoder).
    DescriptorSet { out: PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    let telemetry = telemetry::init(&config)?;
    let result = run(cli.command.unwrap_or(Command::Serve), cli.config, config).await;
    telemetry.shutdown();
    result
}

async fn run(command: Command, config_file: Option<PathBuf>, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let worker = WorkerCommand::current_exe(config_file.as_deref())
                .context("locating this executable for the event worker")?;
            let app = Application::build(config)
                .await?
                .with_worker_command(worker);
            reload_keys_on_sighup(app.tokens());
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Events { supervised } => {
            run_events_worker(config, supervised, shutdown_signal()).await
        }
        Command::Migrate => {
            let applied = auth_service::storage::migrate(&config.database()).await?;
            println!("schema migrations applied: {applied:?} (none pending now)");
            Ok(())
        }
        Command::RotateKey { activate_in } => {
            let retire_after = time::Duration::seconds(
                i64::try_from(config.tokens.access_ttl_secs + config.tokens.leeway_secs)
                    .unwrap_or(i64::MAX / 4),
            );
            let activate_in = time::Duration::seconds(i64::try_from(activate_in)?);
            let (kid, removed) = tokens::keys::rotate(
                &config.keys_dir(),
                time::OffsetDateTime::now_utc(),
                activate_in,
                retire_after,
            )?;
            println!(
                "new signing key {kid} (signs from its time on); removed {removed:?}; running servers load it within tokens.reload_interval_secs (or on SIGHUP)"
            );
            Ok(())
        }
        Command::RotatePlatformKey { activate_in } => {
            let activation = time::OffsetDateTime::now_utc()
                + time::Duration::seconds(i64::try_from(activate_in)?);
            let id = auth_service::platforms::vault::generate_key(
                &config.platform_keys_dir(),
                activation,
            )?;
            println!(
                "new platform-token key {id}; running servers load it within platforms.reload_interval_secs and seal with it from its time on; then run reseal-platform-tokens"
            );
            Ok(())
        }
        Command::ResealPlatformTokens => {
            let database = open_database(&config.database()).await?;
            let vault = auth_service::platforms::vault::Vault::load(
                &config.platform_keys_dir(),
                config.platforms.current_key_id.as_deref(),
                false,
            )?;
            let key = vault.current_key_id().to_owned();
            // Re-sealing calls no platform.
            let platforms = auth_service::platforms::service::PlatformService::new(
                database.platforms.clone(),
                std::sync::Arc::new(vault),
                &config.platforms,
                [],
            );
            let moved = platforms.reseal_all().await?;
            println!("{moved} platform accounts re-sealed under key {key}");
            Ok(())
        }
        Command::SetRoles { login, roles } => {
            let login = LoginName::parse("login", &login)
                .map_err(|v| anyhow::anyhow!("{}: {}", v.field, v.description))?;
            let roles = roles
                .iter()
                .map(|r| {
                    Role::parse("roles", r)
                        .map_err(|v| anyhow::anyhow!("role {r:?} {}", v.description))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let roles = normalise_roles(roles);
            let database = open_database(&config.database()).await?;
            let user = database
                .users
                .find_credentials(&login)
                .await?
                .context("no such user")?
                .user;
            // The operator acts outside any account: `by` is the nil UUID.
            let event = OutboxEvent::roles_changed(
                user.id,
                uuid::Uuid::nil(),
                &roles,
                &RequestContext::default(),
            );
            database.users.set_roles(user.id, &roles, &event).await?;
            println!(
                "{} now has roles {:?} (existing sessions ended)",
                user.id,
                roles.iter().map(Role::as_str).collect::<Vec<_>>()
            );
            Ok(())
        }
        Command::DescriptorSet { out } => {
            std::fs::write(&out, auth_service::grpc::pb::FILE_DESCRIPTOR_SET)
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(())
        }
    }
}
