//! `berth-hostd`: run the host daemon, or talk to a running one.
use anyhow::Context;
use berth_hostd::control::Client;
use berth_hostd::pool::ActivateRequest;
use berth_hostd::HostdConfig;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "berth-hostd",
    about = "Berth host daemon: game VMs activated from in-memory substrates"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run {
        #[arg(long, env = "BERTH_HOSTD_CONFIG")]
        config: PathBuf,
        /// The matchmaking server's host websocket (overrides `[server] url`).
        #[arg(long, env = "BERTH_SERVER_URL")]
        server_url: Option<String>,
        /// This host's credential, a JWT (overrides `[server] token` and `token_file`).
        #[arg(long, env = "BERTH_SERVER_TOKEN", hide_env_values = true)]
        server_token: Option<String>,
        /// Where the players' gateway listens (overrides `[gateway] listen`).
        #[arg(long, env = "BERTH_GATEWAY_LISTEN")]
        gateway_listen: Option<SocketAddr>,
        /// Log as JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
    /// Show a running hostd's pools and VMs.
    Status {
        #[arg(long, env = "BERTH_HOSTD_CONTROL", default_value = "127.0.0.1:7070")]
        control: SocketAddr,
    },
    /// Show a running hostd's gateway: connections, refusals, forwarded messages, overhead.
    Gateway {
        #[arg(long, env = "BERTH_HOSTD_CONTROL", default_value = "127.0.0.1:7070")]
        control: SocketAddr,
    },
    /// Activate a VM (for debugging; the server does this in production).
    Activate {
        #[arg(long, env = "BERTH_HOSTD_CONTROL", default_value = "127.0.0.1:7070")]
        control: SocketAddr,
        #[arg(long)]
        image: String,
        #[arg(long)]
        session: String,
        #[arg(long = "player")]
        players: Vec<String>,
    },
    /// Check this host end to end with its configured driver: prime the first image, activate
    /// sessions through the pool, read each game's hello, destroy, look for leftovers. Prints
    /// (or writes) a JSON report; exits 1 when a check failed.
    Selftest {
        #[arg(long, env = "BERTH_HOSTD_CONFIG")]
        config: PathBuf,
        /// Sessions to activate through the pool.
        #[arg(long, default_value_t = 3)]
        sessions: usize,
        /// Also time this many driver-level activations per path (substrate, warm).
        #[arg(long, default_value_t = 0)]
        runs: usize,
        /// And this many cold boots (with --runs).
        #[arg(long, default_value_t = 0)]
        cold_runs: usize,
        /// Write the report here instead of stdout.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Build game images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Destroy a VM by VM id or session id.
    Destroy {
        #[arg(long, env = "BERTH_HOSTD_CONTROL", default_value = "127.0.0.1:7070")]
        control: SocketAddr,
        id: String,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build (or reuse, when nothing changed) the image a game's `game.toml` describes:
    /// prints its folder and digest. Name the folder in hostd's `[[images]] dir`.
    Build {
        /// The game's manifest.
        manifest: PathBuf,
        /// The image folder to write (default: `images/<name>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The agent, a static `berth-guest` (default: `berth-guest` next to this program).
        #[arg(long, env = "BERTH_GUEST_AGENT")]
        agent: Option<PathBuf>,
        /// The game server's binary when the manifest names a workspace binary
        /// (`build.cargo`); installed at `server.command[0]`.
        #[arg(long)]
        bin: Option<PathBuf>,
        /// Where downloaded Debian packages are kept.
        #[arg(long, default_value = "images/.debs")]
        debs: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            config,
            server_url,
            server_token,
            gateway_listen,
            json_logs,
        } => {
            init_logs(json_logs);
            let mut config = HostdConfig::load(&config)?;
            if config.images.iter().any(|i| i.manifest.is_some()) {
                let agent = agent_path(None)?;
                let config = config.clone();
                tokio::task::spawn_blocking(move || {
                    berth_hostd::build::configured_images(&config, &agent)
                })
                .await??;
            }
            config.apply_server_flags(server_url, server_token)?;
            if let Some(listen) = gateway_listen {
                config.gateway.listen = listen;
                config.validate()?;
            }
            berth_hostd::run(config, berth_net::shutdown_signal()).await
        }
        Cmd::Selftest {
            config,
            sessions,
            runs,
            cold_runs,
            json,
        } => {
            let opts = berth_hostd::selftest::Options {
                sessions,
                runs,
                cold_runs,
            };
            selftest(&config, &opts, json.as_deref()).await
        }
        Cmd::Status { control } => {
            let s = Client::new(control).status().await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Cmd::Gateway { control } => {
            let s = Client::new(control).gateway().await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Cmd::Activate {
            control,
            image,
            session,
            players,
        } => {
            let req = ActivateRequest {
                teams: vec![],
                session_id: session.parse().context("--session")?,
                image,
                players: players
                    .iter()
                    .map(|p| p.parse())
                    .collect::<Result<_, _>>()
                    .context("--player")?,
                params: serde_json::Value::Null,
                ticket_key: String::new(),
                deadline_ms: 0,
            };
            let vm = Client::new(control).activate(&req).await?;
            println!("{}", serde_json::to_string_pretty(&vm)?);
            Ok(())
        }
        Cmd::Image {
            cmd:
                ImageCmd::Build {
                    manifest,
                    out,
                    agent,
                    bin,
                    debs,
                },
        } => image_build(&manifest, out, agent, bin, &debs),
        Cmd::Destroy { control, id } => {
            Client::new(control).destroy(&id).await?;
            println!("destroyed {id}");
            Ok(())
        }
    }
}

/// The agent images are built with: `agent`, else `BERTH_GUEST_AGENT`, else `berth-guest`
/// next to this program.
fn agent_path(agent: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match agent.or_else(|| std::env::var_os("BERTH_GUEST_AGENT").map(PathBuf::from)) {
        Some(a) => Ok(a),
        None => Ok(std::env::current_exe()?.with_file_name("berth-guest")),
    }
}

/// `berth-hostd image build`.
fn image_build(
    manifest: &Path,
    out: Option<PathBuf>,
    agent: Option<PathBuf>,
    bin: Option<PathBuf>,
    debs: &Path,
) -> anyhow::Result<()> {
    let manifest = berth_hostd::manifest::GameManifest::load(manifest)?;
    let agent = agent_path(agent)?;
    berth_hostd::build::check_static(&agent)?;
    let game = match (&manifest.build.cargo, bin) {
        (Some(_), Some(bin)) => Some(bin),
        (Some(name), None) => anyhow::bail!(
            "build.cargo names the workspace binary {name:?}: pass its static build with --bin"
        ),
        (None, Some(_)) => anyhow::bail!("--bin is for a manifest with build.cargo"),
        (None, None) => None,
    };
    let dir = out.unwrap_or_else(|| Path::new("images").join(&manifest.name));
    let guest = berth_hostd::build::GuestBins {
        agent,
        manifest,
        game,
    };
    let base = berth_hostd::build::Base::download(debs)?;
    let built = berth_hostd::build::build_image(&base, &guest, &dir)?;
    println!("{} {}", dir.display(), built.digest);
    Ok(())
}

/// Logs to stdout, as text or JSON lines, filtered by `RUST_LOG` (default `info`).
fn init_logs(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

/// `berth-hostd selftest`: logs go to stderr so that stdout carries only the report.
async fn selftest(
    config: &Path,
    opts: &berth_hostd::selftest::Options,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = HostdConfig::load(config)?;
    let driver = berth_hostd::driver_for(&config).await?;
    let report = berth_hostd::selftest::run(config, driver, opts).await;
    let text = serde_json::to_string_pretty(&report)?;
    match json {
        Some(path) => std::fs::write(path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    if !report.ok {
        let failed: Vec<String> = report
            .errors
            .iter()
            .cloned()
            .chain(
                report
                    .sessions
                    .iter()
                    .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.session_id))),
            )
            .chain(report.leftovers.iter().map(|l| format!("left behind: {l}")))
            .collect();
        anyhow::bail!("selftest failed: {}", failed.join("; "));
    }
    Ok(())
}
