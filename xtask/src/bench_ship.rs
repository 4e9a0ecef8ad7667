//! `cargo xtask bench ship`: priming a substrate vs fetching a docked one from a peer, side by
//! side in one run on the same image, each timed the same way — from `Pool::start` of a host
//! with no substrate to the substrate docked and checked. The priming host then serves its
//! substrate on its peer listener (`berth_hostd::peer`, loopback here) and each fetching host
//! runs the real pool path (`want` → fetch → header and digest checks → dock); the bench only
//! plays the server's broker part (it answers the want with the peer's address and a grant it
//! gave the peer). Writes `target/bench/ship.json`: `prime_ms`, `substrate_fetch_ms` (p50),
//! their ratio (target under TCG: ≤ ⅓), the fetches' spread and the bytes received.

use crate::bench::{round, summary};
use anyhow::{Context, Result};
use berth_hostd::config::PeerConfig;
use berth_hostd::pool::{Pool, PoolEvent};
use berth_hostd::ship::Offer;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct ShipArgs {
    /// Fetches to time (each a fresh host with no substrate).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The game whose image to measure (`games/<name>` or `tests/games/<name>`).
    #[arg(long, default_value = "arena")]
    pub image: String,
}

pub async fn run(args: ShipArgs) -> Result<()> {
    crate::image::build()?;
    let report = measure_in_place(&args).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    let out = crate::image::root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join("ship.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// [`measure`] in a state folder of its own under `/dev/shm`, removed after.
pub(crate) async fn measure_in_place(args: &ShipArgs) -> Result<serde_json::Value> {
    let game = crate::image::game_manifest(&args.image)?;
    let image_dir = crate::image::image_dir_of(&game.name);
    let base = PathBuf::from(format!("/dev/shm/berth-bench-ship-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let result = measure(args, &game.name, &image_dir, &base).await;
    berth_hostd::util::kill_processes_naming(&base);
    let _ = std::fs::remove_dir_all(&base);
    result
}

async fn measure(
    args: &ShipArgs,
    name: &str,
    image_dir: &Path,
    base: &Path,
) -> Result<serde_json::Value> {
    let driver = berth_testkit::tcg_driver().await;
    let ic = berth_hostd::config::ImageConfig::new(name, image_dir.to_path_buf(), 0);
    let config = |dir: &str| berth_testkit::hostd_config(&base.join(dir), vec![ic.clone()]);
    let t0 = Instant::now();
    let source = Pool::start(config("source"), driver.clone()).await?;
    source
        .wait_ready(name, 0, Duration::from_secs(180))
        .await
        .context("priming")?;
    let prime_ms = t0.elapsed().as_secs_f64() * 1e3;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let from = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = berth_hostd::peer::serve(listener, source.clone(), async {
        let _ = stopped.await;
    });
    let mut fetch_ms = Vec::new();
    let mut pool_ms = Vec::new();
    let mut bytes = 0;
    for n in 0..args.runs {
        let grant = format!("bench-{n}-{:016x}", berth_hostd::util::random_u64());
        source
            .ship()
            .grant(name.into(), grant.clone(), Duration::from_secs(60));
        let mut cfg = config(&format!("fetch-{n}"));
        cfg.peer = Some(PeerConfig::at(([127, 0, 0, 1], 0).into(), None));
        let t0 = Instant::now();
        let target = Pool::start(cfg, Arc::clone(&driver)).await?;
        let mut events = target.subscribe();
        target.ship().wanted().await;
        anyhow::ensure!(
            !target.ship().take_unsent().is_empty(),
            "the host asked for nothing"
        );
        let offer = Offer::Fetch {
            from: from.clone(),
            grant,
        };
        target.ship().answer(name, offer);
        let shipped = loop {
            match tokio::time::timeout(Duration::from_secs(60), events.recv()).await?? {
                PoolEvent::Shipped {
                    fetch_ms, bytes, ..
                } => break (fetch_ms, bytes),
                PoolEvent::ShipRefused { code, message, .. } => {
                    anyhow::bail!("the shipped substrate was refused: {code}: {message}")
                }
                _ => {}
            }
        };
        target.wait_ready(name, 0, Duration::from_secs(10)).await?;
        fetch_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        pool_ms.push(shipped.0 as f64);
        bytes = shipped.1;
        target.shutdown().await;
    }
    let _ = stop.send(());
    let _ = serving.await;
    source.shutdown().await;
    let fetched = summary(fetch_ms);
    let p50 = fetched["p50"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "image": name,
        "accel": driver.accel(),
        "runs": args.runs,
        "prime_ms": round(prime_ms),
        "substrate_fetch_ms": p50,
        "fetch_to_prime": (p50 / prime_ms * 1000.0).round() / 1000.0,
        "target_met": p50 * 3.0 <= prime_ms,
        "substrate_fetch": fetched,
        "pool_fetch_ms": summary(pool_ms),
        "shipped_mib": round(bytes as f64 / (1 << 20) as f64),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    }))
}
