//! The inside of a game VM: the agent, PID 1 after the image's `/init`.
//!
//! It supervises the image's game server (any program, from the image's [`GameSpec`]), serves
//! it the game-server SDK on loopback, and links the VM to hostd. The game loads, calls
//! `initialised` — the moment the VM is docked as a substrate — and waits in `GET
//! /v1/activation`; after restore, hostd's identity line is applied ([`agent::apply_identity`]:
//! wall clock, hostname, RNG), the waiting call answers, and the game's `ready` goes to hostd.
//!
//! - [`agent`]: the hostd link (virtio-serial port) and identity handling.
//! - [`life`]: what each SDK call may do in each phase of the VM's life, and what hostd hears.
//! - [`sdk`]: the SDK's HTTP server (`docs/sdk.md`).
//! - [`supervisor`]: the game's process, its output and its exit.
//! - [`standin`]: the SDK's calls made for a game server that does not speak it (`sdk = false`).

pub mod agent;
pub mod life;
pub mod sdk;
pub mod standin;
pub mod supervisor;
#[cfg(feature = "xen")]
pub mod xen;

use berth_protocol::guest::{GameSpec, GAME_SPEC_PATH};
use berth_protocol::sdk::SDK_ADDR;
use life::{Life, Report, Sink};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runtime settings, from the environment `/init` passes (kernel command line `berth.*`).
#[derive(Debug, Clone)]
pub struct Config {
    /// The game spec (`BERTH_GAME_SPEC`, else [`GAME_SPEC_PATH`]).
    pub game_spec: PathBuf,
    /// Directory holding `virtio-ports` in sysfs (overridable for tests).
    pub sysfs_ports: PathBuf,
}

impl Config {
    pub fn from_env() -> Self {
        Self {
            game_spec: std::env::var_os("BERTH_GAME_SPEC")
                .map(PathBuf::from)
                .unwrap_or_else(|| GAME_SPEC_PATH.into()),
            sysfs_ports: "/sys/class/virtio-ports".into(),
        }
    }

    /// The image's game spec.
    pub fn load_spec(&self) -> Result<GameSpec, GuestError> {
        let path = &self.game_spec;
        let text = std::fs::read(path)
            .map_err(|e| GuestError::Game(format!("reading {}: {e}", path.display())))?;
        serde_json::from_slice(&text)
            .map_err(|e| GuestError::Game(format!("{}: {e}", path.display())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("no virtio-serial port named {0}")]
    NoPort(&'static str),
    #[error("agent port i/o")]
    Port(#[source] std::io::Error),
    #[error("the SDK server: {0}")]
    Sdk(String),
    #[error("the game server: {0}")]
    Game(String),
}

/// Boots the game and serves hostd until the VM is destroyed.
pub fn run(config: Config) -> Result<(), GuestError> {
    let port = agent::open_port(&config.sysfs_ports)?;
    serve(&config, port)
}

/// Starts the SDK and the game, then serves hostd on `port`. A game that cannot be started is
/// reported to hostd (priming fails with the reason), not fatal: the VM stays up to say so.
pub fn serve(config: &Config, port: File) -> Result<(), GuestError> {
    let booted = Instant::now();
    let spec = config.load_spec();
    let health = spec
        .as_ref()
        .map(|s| s.health_timeout_ms)
        .unwrap_or(berth_protocol::sdk::DEFAULT_HEALTH_TIMEOUT_MS);
    let life = Arc::new(Life::new(booted, Duration::from_millis(health)));
    let game_port = spec
        .as_ref()
        .map(|s| s.game_port)
        .unwrap_or(berth_protocol::guest::GAME_PORT);
    let reporter = agent::Reporter::new(&port, game_port)?;
    let reports: Sink = {
        let reporter = reporter.clone();
        Arc::new(move |r| reporter.report(r))
    };
    let sdk = sdk::Sdk::bind(SDK_ADDR, life.clone(), reports.clone())?;
    sdk.spawn()?;
    let started = spec.and_then(|spec| {
        let (life, reports) = (life.clone(), reports.clone());
        let sdk = spec.sdk;
        supervisor::start(&spec, SDK_ADDR, move |exit| {
            eprintln!("berth-guest: the game exited: {}", exit.status);
            let game_over = !sdk && exit.success;
            for r in life.game_exited(exit.status, exit.stderr, game_over) {
                reports(r);
            }
        })?;
        if !spec.sdk {
            standin::start(spec.game_port)?;
        }
        Ok(())
    });
    if let Err(e) = started {
        eprintln!("berth-guest: {e}");
        reports(Report::GameExited {
            status: e.to_string(),
            stderr: vec![],
        });
    }
    agent::Agent::new(port, life, sdk, reporter).serve()
}
