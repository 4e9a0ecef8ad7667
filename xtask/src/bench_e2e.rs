//! `cargo xtask bench e2e`: the whole path from a phone to a game VM, under a swarm.
//!
//! Starts the demo's stack (server with the memory store, hostd with real VMs and its gateway),
//! lets `berth-sim` bring players in evenly over the run (each plays one match), and measures:
//! - time to match (queue → matched) and time to play (queue → first game state from the VM),
//!   from the swarm's HDR histograms;
//! - the gateway's overhead, two ways: a probe player in a real session pings the game through
//!   the gateway and directly (the VM's forwarded port, as the gateway itself reaches it),
//!   alternately, and the paired difference is the overhead; and the gateway's own forwarding
//!   time per message (`GET /v1/gateway` figures).
//!
//! Writes `target/bench/e2e.json`.

use crate::demo::{Stack, StackOptions};
use anyhow::{bail, Context, Result};
use berth_client::{GameClient, Heard};
use berth_protocol::game::{GameAnswer, GameRequest};
use berth_protocol::guest::encode_line;
use berth_protocol::play::ServerMessage;
use hdrhistogram::Histogram;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, Clone, clap::Args)]
pub struct E2eArgs {
    /// Simulated players, arriving evenly over `duration`, one match each.
    #[arg(long, default_value_t = 200)]
    pub players: u32,
    #[arg(long, default_value = "60s", value_parser = berth_sim::config::parse_duration)]
    pub duration: Duration,
    /// The mode (blitz: 8 s duels, so that 200 players over 60 s fit a 2-core TCG host).
    #[arg(long, default_value = "blitz")]
    pub mode: String,
    /// Warm clones kept per image.
    #[arg(long, default_value_t = 8)]
    pub warm: u32,
    /// Ping pairs (gateway, direct) the overhead probe sends.
    #[arg(long, default_value_t = 200)]
    pub pings: u32,
}

pub async fn run(args: E2eArgs) -> Result<()> {
    let stack = crate::demo::start_stack(StackOptions::ephemeral(args.warm, "bench-e2e")).await?;
    let result = measure(&stack, &args).await;
    stack.shutdown().await;
    let report = result?;
    let dir = crate::image::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("e2e.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("bench: wrote {}", path.display());
    Ok(())
}

async fn measure(stack: &Stack, args: &E2eArgs) -> Result<serde_json::Value> {
    let base = format!("http://{}", stack.server.addr);
    let config = crate::demo::one_match_each(&base, args.players, args.duration, &args.mode, "e2e");
    println!(
        "bench e2e: {} players over {:?} (mode {}), one match each; warm tier {}",
        args.players, args.duration, args.mode, args.warm
    );
    let cpu0 = cpu_seconds();
    let progress = berth_sim::Progress::new();
    let swarm = tokio::spawn(berth_sim::run(config, Some(progress.clone())));
    // The probe plays while the swarm is in full swing.
    tokio::time::sleep(args.duration / 3).await;
    let probe = probe(stack, &args.mode, args.pings).await;
    let report = swarm.await??;
    let probe = probe.context("the gateway overhead probe")?;
    let gw = stack.gateway().stats();
    crate::demo::pool_back(stack, args.warm).await?;
    let cpu1 = cpu_seconds();
    let modes = berth_server::modes::Modes::load(&crate::image::root().join("assets/modes"))?;
    let params = modes
        .0
        .get(&args.mode)
        .map(|m| m.params_json())
        .unwrap_or_default();
    let l = &report.latency;
    let pct = |p: &berth_sim::Percentiles| json!({"p50": p.p50, "p90": p.p90, "p99": p.p99, "max": p.max, "count": p.count});
    let overhead_p50 = ms(probe.diff.value_at_quantile(0.5));
    let meets = l.time_to_play_ms.p50 <= 300.0
        && l.time_to_play_ms.p99 <= 800.0
        && report.failed == 0
        && overhead_p50 <= 1.0;
    Ok(json!({
        "mode": {"name": args.mode, "params": params},
        "players": report.players,
        "sessions": report.sessions,
        "failed": report.failed,
        "failures": report.failures,
        "matches": report.matches,
        "end_reasons": report.end_reasons,
        "time_to_play_ms": pct(&l.time_to_play_ms),
        "time_to_match_ms": pct(&l.time_to_match_ms),
        "time_to_first_state_ms": pct(&l.time_to_first_state_ms),
        "session_ms": pct(&l.session_ms),
        "game_rtt_ms": pct(&l.game_rtt_ms),
        "gateway_overhead_ms": {
            "method": "a probe player in a live session pings the game through the gateway and directly (the VM's forwarded port), alternately; overhead = gateway RTT - direct RTT of each pair",
            "p50": overhead_p50,
            "p99": ms(probe.diff.value_at_quantile(0.99)),
            "pairs": probe.diff.len(),
            "rtt_via_gateway_ms": {"p50": ms(probe.via_gateway.value_at_quantile(0.5)), "p99": ms(probe.via_gateway.value_at_quantile(0.99))},
            "rtt_direct_ms": {"p50": ms(probe.direct.value_at_quantile(0.5)), "p99": ms(probe.direct.value_at_quantile(0.99))},
        },
        "gateway_forwarding_us": gw.overhead_us,
        "gateway_connections": gw.connections,
        "cpu_seconds": {
            "what": "CPU time over the run: this process (server, hostd, gateway, the swarm's bots) and the VMs (QEMU processes, counted once reaped)",
            "this_process": round2(cpu1.0 - cpu0.0),
            "vms": round2(cpu1.1 - cpu0.1),
        },
        "accel": stack.pool.driver().accel().as_str(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "targets": {"time_to_play_p50_ms": 300, "time_to_play_p99_ms": 800, "failed": 0, "gateway_overhead_p50_ms": 1.0},
        "meets_targets": meets,
    }))
}

/// (this process, reaped children) CPU seconds, user + system.
fn cpu_seconds() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    let secs = |who| {
        getrusage(who)
            .map(|u| {
                let t =
                    |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
                t(u.user_time()) + t(u.system_time())
            })
            .unwrap_or(0.0)
    };
    (secs(UsageWho::RUSAGE_SELF), secs(UsageWho::RUSAGE_CHILDREN))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

struct Probe {
    via_gateway: Histogram<u64>,
    direct: Histogram<u64>,
    diff: Histogram<u64>,
}

/// One player in a real session: pings through the gateway and directly, alternately.
async fn probe(stack: &Stack, mode: &str, pings: u32) -> Result<Probe> {
    let mut play = crate::demo::player(stack, "e2e-probe").await?;
    let (session, ticket, _) = crate::demo::queue_until_matched_in(&mut play, mode).await?;
    let vm = stack.vm_of(&session)?;
    let mut gw = GameClient::join(stack.gateway().addr, &ticket).await?;
    let mut direct = Direct::connect(vm.game_addr).await?;
    let mut p = Probe {
        via_gateway: Histogram::new(3)?,
        direct: Histogram::new(3)?,
        diff: Histogram::new(3)?,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    for nonce in 1..=u64::from(pings) {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        if !gateway_pong(&mut gw, nonce).await? {
            break;
        }
        let via_gateway = t.elapsed();
        let t = Instant::now();
        direct.pong(nonce).await?;
        let direct = t.elapsed();
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        p.via_gateway.record(us(via_gateway))?;
        p.direct.record(us(direct))?;
        p.diff.record(us(via_gateway.saturating_sub(direct)))?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if p.diff.is_empty() {
        bail!("the probe's game ended before a single ping pair");
    }
    // Leave the game and the queue side clean: surrender so the opponent gets results.
    let _ = gw.send(&GameRequest::Surrender).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(h) = gw.next(Duration::from_secs(10)).await {
            if matches!(h, Heard::Close(..) | Heard::Dropped) {
                break;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match crate::demo::next(&mut play).await {
                Ok(ServerMessage::SessionEnded { .. }) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    Ok(p)
}

/// A ping through the gateway and its pong; false when the game ended first.
async fn gateway_pong(gw: &mut GameClient, nonce: u64) -> Result<bool> {
    gw.send(&GameRequest::Ping { nonce }).await?;
    loop {
        match gw.next(Duration::from_secs(5)).await? {
            Heard::Answer(GameAnswer::Pong { nonce: n, .. }) if n == nonce => return Ok(true),
            Heard::Answer(GameAnswer::Ended { .. }) | Heard::Close(..) | Heard::Dropped => {
                return Ok(false)
            }
            _ => continue,
        }
    }
}

/// The game's TCP port, straight (as the gateway reaches it): the baseline of the probe.
struct Direct {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Direct {
    async fn connect(addr: std::net::SocketAddr) -> Result<Direct> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut lines = BufReader::new(rd).lines();
        lines.next_line().await?.context("no hello from the game")?;
        Ok(Direct { lines, wr })
    }

    async fn pong(&mut self, nonce: u64) -> Result<()> {
        self.wr
            .write_all(&encode_line(&GameRequest::Ping { nonce }))
            .await?;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
                .await
                .context("no direct pong in 5 s")??
                .context("the game closed the direct connection")?;
            if matches!(serde_json::from_str(&line)?, GameAnswer::Pong { nonce: n, .. } if n == nonce)
            {
                return Ok(());
            }
        }
    }
}
