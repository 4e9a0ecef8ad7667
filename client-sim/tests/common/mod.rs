//! The real matchmaking server in this process, on port 0. Swarms that play whole matches need
//! real hosts (VMs, gateway, game): they are in `tests/tests/swarm.rs`.
#![allow(dead_code)]

use anyhow::{Context, Result};
use berth_server::app::Server;
use berth_server::config::ServerConfig;
use std::path::PathBuf;
use std::time::Duration;

/// A server with dev tokens on, on port 0; sessions that find no host fail after
/// `placing_ms`.
pub async fn server(dev_tokens: bool, placing_ms: u64) -> Result<Server> {
    server_with(dev_tokens, placing_ms, |_| {}).await
}

/// [`server`], with its config changed by `tweak` first.
pub async fn server_with(
    dev_tokens: bool,
    placing_ms: u64,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Result<Server> {
    // `RUST_LOG=berth_sim=debug cargo test -p berth-sim -- --nocapture` shows every bot's story.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut c = ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        modes_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/modes"),
        ..ServerConfig::default()
    };
    c.auth.secret = "client-sim-test-secret-0123456789".into();
    c.auth.dev_tokens = dev_tokens;
    c.timeouts.placing_ms = placing_ms;
    tweak(&mut c);
    Server::start(c).await
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits until `f` holds, polling (for counters the server updates asynchronously).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..100 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(anyhow::anyhow!("{what}: not within 5 s")).context("eventually")
}
