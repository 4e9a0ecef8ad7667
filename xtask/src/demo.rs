//! `cargo xtask demo`: the main job on the embedded defaults. Builds the guest image, starts
//! `berth-server` (memory store), a hostd (qemu driver) with its gateway, linked to the server
//! over `/v1/hosts`, primes the substrate, then runs a swarm of simulated phones (`berth-sim`):
//! each queues, is matched onto a game VM activated from the substrate, connects through the
//! gateway, plays the mode's game (`--mode`: the arena's modes, or `reflex`) to its end and
//! hears the results. It prints the swarm's
//! report, checks that every VM went back to the pool, and cleans everything up.

use anyhow::{bail, Result};
use berth_client::{PlayClient, PlayConfig};
use berth_hostd::Pool;
use berth_protocol::play::ServerMessage;
use berth_protocol::SessionId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Simulated players in the swarm, arriving evenly over `duration`, one match each.
    #[arg(long, default_value_t = 40)]
    pub players: u32,
    /// How long players keep starting matches (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = berth_sim::config::parse_duration)]
    pub duration: Duration,
    /// The game mode they queue for (assets/modes/*.toml).
    #[arg(long, default_value = "sprint")]
    pub mode: String,
    /// Warm clones kept per image.
    #[arg(long, default_value_t = 4)]
    pub warm: u32,
    /// Where the server listens (a free port is taken if this one is busy).
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub listen: SocketAddr,
    /// Where the host gateway listens (a free port is taken if this one is busy).
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub gateway: SocketAddr,
    /// After the report, keep everything running (play at /play) until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

pub(crate) use berth_testkit::{Stack, StackOptions};

/// Installs what the stack needs, builds the image if needed, and starts the test kit's
/// [`Stack`] on it.
pub(crate) async fn start_stack(mut o: StackOptions) -> Result<Stack> {
    crate::sys::ensure(&[
        crate::sys::QEMU,
        crate::sys::QEMU_UTILS,
        crate::sys::E2FS,
        crate::sys::FONTS,
    ])?;
    let manifest = crate::image::build()?;
    println!(
        "image {} ({})",
        &manifest.digest[..12],
        manifest.kernel_package
    );
    o.image_dir = crate::image::image_dir_of(&o.game);
    Stack::start(o).await
}

/// A player of `stack` connected to `/v1/play` (hello answered).
pub(crate) async fn player(stack: &Stack, name: &str) -> Result<PlayClient> {
    let url = format!("ws://{}/v1/play", stack.server.addr);
    Ok(PlayClient::connect(PlayConfig::new(url, stack.token(name)?)).await?)
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let game = image_of(&args.mode)?;
    let stack = start_stack(StackOptions {
        listen: args.listen,
        gateway: args.gateway,
        image_dir: crate::image::image_dir_of(&game),
        game,
        warm: args.warm,
        max_vms: 64,
        name: "demo".into(),
    })
    .await?;
    let result = demo(&stack, &args).await;
    if result.is_ok() && args.keep {
        println!(
            "\nstill running: play at http://{}/play — Ctrl-C stops everything",
            stack.server.addr
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    stack.shutdown().await;
    result
}

/// The game image `mode` is played on (its mode file's `image`).
fn image_of(mode: &str) -> Result<String> {
    let modes = berth_server::modes::Modes::load(&crate::image::root().join("assets/modes"))?;
    match modes.get(mode) {
        Some(m) => Ok(m.image.clone()),
        None => bail!("no mode {mode:?} in assets/modes"),
    }
}

/// Sends `queue` for `duel` and waits for `matched`: the session, the player's ticket and the
/// milliseconds it took.
pub(crate) async fn queue_until_matched(ws: &mut PlayClient) -> Result<(SessionId, String, f64)> {
    queue_until_matched_in(ws, "duel").await
}

/// [`queue_until_matched`] for `mode`.
pub(crate) async fn queue_until_matched_in(
    ws: &mut PlayClient,
    mode: &str,
) -> Result<(SessionId, String, f64)> {
    let t = Instant::now();
    ws.queue(mode, "local", None, None).await?;
    loop {
        match next(ws).await? {
            ServerMessage::Matched {
                session, ticket, ..
            } => return Ok((session, ticket, t.elapsed().as_secs_f64() * 1000.0)),
            ServerMessage::QueueStatus { .. } => continue,
            other => bail!("expected matched, got {other:?}"),
        }
    }
}

async fn demo(stack: &Stack, args: &DemoArgs) -> Result<()> {
    let base = format!("http://{}", stack.server.addr);
    println!("\n  play in a browser:  {base}/play   (phone or desktop; sign in with any name)");
    println!("  admin dashboard:    {base}/admin   (dev mode: sign in with any name)");
    println!("  metrics:            {base}/metrics");
    println!(
        "  hostd gateway:      ws://{}/v1/game\n",
        stack.gateway().addr
    );
    let config = one_match_each(&base, args.players, args.duration, &args.mode, "demo");
    println!(
        "swarm: {} players arriving over {:?}, mode {}, one match each",
        args.players, args.duration, args.mode
    );
    let progress = berth_sim::Progress::new();
    let ticker = tokio::spawn(show_progress(progress.clone(), stack.pool.clone()));
    let report = berth_sim::run(config, Some(progress)).await;
    ticker.abort();
    let report = report?;
    println!("\n{}", report.table());
    let dir = crate::image::root().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let json: PathBuf = dir.join("report.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    let png = dir.join("latency.png");
    match berth_sim::write_png(&report, &png) {
        Ok(()) => println!("report: {} and {}", json.display(), png.display()),
        Err(e) => println!("report: {} (no chart: {e})", json.display()),
    }
    pool_back(stack, args.warm).await?;
    if report.failed > 0 {
        bail!("{} matches failed: {:?}", report.failed, report.failures);
    }
    Ok(())
}

/// A swarm in which `players` phones come in evenly over `ramp` and play one match of `mode`
/// each: on a 2-core TCG host a game VM with two players costs ~10 % of a core, so the demo's
/// pace keeps the host busy but not saturated (`--players` and `--duration` change it).
pub(crate) fn one_match_each(
    server: &str,
    players: u32,
    ramp: Duration,
    mode: &str,
    prefix: &str,
) -> berth_sim::SwarmConfig {
    berth_sim::SwarmConfig {
        server: server.to_owned(),
        arrivals: berth_sim::Arrivals::Fixed { players, ramp },
        duration: ramp + Duration::from_secs(5),
        modes: vec![berth_sim::Weighted::new(mode.to_owned(), 1.0)],
        matches: berth_sim::Matches::Count(1),
        name_prefix: prefix.into(),
        ..berth_sim::SwarmConfig::default()
    }
}

/// A status line every few seconds while the swarm runs.
async fn show_progress(progress: berth_sim::Progress, pool: Pool) {
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let p = progress.snapshot();
        let st = pool.status();
        let warm: u32 = st.images.iter().map(|i| i.warm).sum();
        println!(
            "{:>5.0} s  players {:>3}  queued {:>3}  playing {:>3}  finished {:>4}  failed {:>2}   VMs running {:>2}, warm {:>2}",
            t.elapsed().as_secs_f64(),
            p.arrived,
            p.queued,
            p.playing,
            p.finished,
            p.failed,
            st.vms.len(),
            warm
        );
    }
}

/// Waits until every session's VM is gone and the warm tier is full again, then says so.
pub(crate) async fn pool_back(stack: &Stack, warm: u32) -> Result<()> {
    let t = Instant::now();
    loop {
        let st = stack.pool.status();
        let img = &st.images[0];
        if st.vms.is_empty() && img.warm >= warm {
            println!(
                "pool: every VM went back: 0 running, {} warm clones waiting, substrate docked",
                img.warm
            );
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!(
                "the pool did not settle: {} VMs still running, {} warm",
                st.vms.len(),
                img.warm
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The next server message (30 s at most).
pub(crate) async fn next(ws: &mut PlayClient) -> Result<ServerMessage> {
    Ok(ws.recv_within(Duration::from_secs(30)).await?)
}

/// Joins the game at `addr` directly (as the gateway would) with `ticket` and surrenders, so
/// the game ends now with results. Returns the game's end reason.
pub(crate) async fn surrender(addr: SocketAddr, ticket: &str) -> Result<String> {
    Ok(berth_testkit::game_surrender(addr, ticket).await?.0)
}
