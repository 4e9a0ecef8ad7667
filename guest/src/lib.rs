//! The inside of a game VM.
//!
//! One process, no forks after boot: [`run`] initialises the game (loads the maps from the VM's
//! disk and does the start-up work a real game server does), binds the game port, tells hostd
//! `initialised` and then waits — this is the moment the VM is docked as a substrate. After
//! activation it reads one identity line, applies it ([`agent::apply_identity`]: wall clock,
//! hostname, RNG), starts serving players and answers `ready`.
//!
//! - [`agent`]: the hostd link (virtio-serial port) and identity handling.
//! - [`game`]: the game server: start-up work, connections, tickets, the game loop.
//! - [`arena`]: the game's rules and state (pure, unit-tested).

pub mod agent;
pub mod arena;
pub mod game;
#[cfg(feature = "xen")]
pub mod xen;

use std::path::PathBuf;
use std::time::Duration;

/// Runtime settings, from the environment `/init` passes (kernel command line `berth.*`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the game's data disk is mounted.
    pub data_dir: PathBuf,
    /// How long the simulated start-up work takes at least.
    pub init_work: Duration,
    /// Directory holding `virtio-ports` in sysfs (overridable for tests).
    pub sysfs_ports: PathBuf,
}

impl Config {
    pub fn from_env() -> Self {
        let init_ms = std::env::var("BERTH_INIT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        Self {
            data_dir: std::env::var_os("BERTH_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/data".into()),
            init_work: Duration::from_millis(init_ms),
            sysfs_ports: "/sys/class/virtio-ports".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("loading game data from {path}")]
    Data {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no virtio-serial port named {0}")]
    NoPort(&'static str),
    #[error("agent port i/o")]
    Port(#[source] std::io::Error),
    #[error("binding the game port")]
    Bind(#[source] std::io::Error),
}

/// Binds the game port on every address, IPv6 and IPv4 (one dual-stack socket; hostd's xen
/// driver reaches the guest by IPv6 link-local), or IPv4 only when the kernel has no IPv6.
pub fn bind_game_port() -> Result<std::net::TcpListener, GuestError> {
    let port = berth_protocol::guest::GAME_PORT;
    std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)))
        .map_err(GuestError::Bind)
}

/// Boots the game and serves hostd until the VM is destroyed.
pub fn run(config: Config) -> Result<(), GuestError> {
    let started = std::time::Instant::now();
    let world = game::World::load(&config.data_dir, config.init_work)?;
    let listener = bind_game_port()?;
    let port = agent::open_port(&config.sysfs_ports)?;
    agent::Agent::new(port, world, listener, started).serve()
}
