//! `berth-server run | token`: a thin CLI over the library.

use anyhow::Context;
use berth_server::app::Server;
use berth_server::auth::{Auth, Role};
use berth_server::config::ServerConfig;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "berth-server",
    about = "Berth's matchmaker and session control plane"
)]
struct Cli {
    /// TOML config file (every key optional).
    #[arg(long, global = true, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve players, hosts and operators.
    Run {
        #[arg(long, env = "BERTH_LISTEN")]
        listen: Option<SocketAddr>,
        /// Shared state in Redis (`redis://host:port/`) instead of this process's memory.
        #[arg(long, env = "BERTH_REDIS")]
        redis: Option<String>,
        #[arg(long, env = "BERTH_MODES")]
        modes: Option<PathBuf>,
        /// Development mode: anyone may mint player tokens at POST /v1/dev/token.
        #[arg(long)]
        dev: bool,
        /// Serve TLS (wss://, https://) with this PEM certificate chain (overrides `[tls] cert`).
        #[arg(long, env = "BERTH_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        /// …and this PEM private key (overrides `[tls] key`).
        #[arg(long, env = "BERTH_TLS_KEY")]
        tls_key: Option<PathBuf>,
    },
    /// Print a signed token: a host's credential, an operator's, or (dev mode) a player's.
    Token {
        #[arg(long, conflicts_with_all = ["host", "admin"])]
        player: Option<String>,
        #[arg(long, conflicts_with = "admin")]
        host: Option<String>,
        #[arg(long)]
        admin: Option<String>,
        /// Validity in seconds.
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        ttl_s: u64,
        /// Allow player tokens without `auth.dev_tokens` in the config.
        #[arg(long)]
        dev: bool,
    },
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<ServerConfig> {
    let mut c = match path {
        Some(p) => ServerConfig::load(p)?,
        None => ServerConfig::default(),
    };
    if let Ok(secret) = std::env::var("BERTH_AUTH_SECRET") {
        c.auth.secret = secret;
    }
    Ok(c)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let mut config = load(cli.config.as_ref())?;
    match cli.cmd {
        Cmd::Run {
            listen,
            redis,
            modes,
            dev,
            tls_cert,
            tls_key,
        } => {
            config.apply_tls_flags(tls_cert, tls_key)?;
            if let Some(l) = listen {
                config.listen = l;
            }
            if let Some(r) = redis {
                config.store.redis = r;
            }
            if let Some(m) = modes {
                config.modes_dir = m;
            }
            config.auth.dev_tokens |= dev;
            if config.auth.dev_tokens {
                tracing::warn!("development mode: anyone can mint player tokens");
            }
            let server = Server::start(config).await?;
            println!("berth-server listening on {}", server.addr);
            berth_net::shutdown_signal().await;
            let delay = Duration::from_millis(server.ctx.config.timeouts.shutdown_delay_ms);
            tracing::info!(delay_ms = delay.as_millis() as u64, "shutting down");
            server.begin_shutdown();
            // Load balancers see `/readyz` fail and stop sending new connections; a second
            // signal cuts the wait short.
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = berth_net::shutdown_signal() => {}
            }
            server.shutdown().await;
        }
        Cmd::Token {
            player,
            host,
            admin,
            ttl_s,
            dev,
        } => {
            config.validate()?;
            let auth = Auth::new(&config.auth).context("auth config")?;
            let (sub, role) = match (player, host, admin) {
                (Some(p), _, _) => {
                    anyhow::ensure!(
                        dev || config.auth.dev_tokens,
                        "player tokens come from your game's auth service; use --dev to mint one for development"
                    );
                    (p, Role::Player)
                }
                (_, Some(h), _) => (h, Role::Host),
                (_, _, Some(a)) => (a, Role::Admin),
                _ => anyhow::bail!("say who: --player NAME, --host ID or --admin NAME"),
            };
            berth_protocol::PlayerId::new(sub.clone()).context("the name")?;
            println!("{}", auth.mint(&sub, role, ttl_s)?);
        }
    }
    Ok(())
}
