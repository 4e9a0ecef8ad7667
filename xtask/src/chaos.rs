//! `cargo xtask chaos`: the stack as separate processes — Redis with an fsync'd append-only
//! file, two `berth-server` replicas on it, two `berth-hostd`s with real VMs (each knowing both
//! replicas), two `berth-sim` swarms (each knowing both replicas) playing duels in a loop — and
//! a timeline of faults while they play: a game VM killed; a hostd killed and restarted; a hostd
//! stopped (SIGSTOP) for 10 s; a replica killed and restarted; Redis restarted with SIGTERM and
//! with SIGKILL; a drain, an admin end and an undrain through the admin API; a flooding client
//! and 500 silent sockets.
//!
//! Then it counts what the faults cost, from the store (every session, its end reason and
//! results) and from the swarms' reports, stops everything, and looks for leftovers. It
//! writes `target/bench/chaos.json` and fails unless nobody was stranded, no results were
//! lost, no match was killed (ended by anything but its game, an admin or a killed VM), no
//! session is stuck, nothing leaked and nothing panicked. `cargo xtask test` runs a short
//! version ([`short`]).

use crate::image;
use crate::stack::{nonzero, read_json, HostSpec, Place, Stack, StackSpec, Swarm, MUST_BE_ZERO};
use anyhow::{bail, Result};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Players, split over two swarms; each plays duels in a loop.
    #[arg(long, default_value_t = 40)]
    pub players: u32,
    /// How long players keep starting matches; the faults are spread over it.
    #[arg(long, default_value = "150s", value_parser = berth_sim::config::parse_duration)]
    pub duration: Duration,
}

/// The short run of `cargo xtask test`.
pub fn short() -> Result<()> {
    let args = ChaosArgs {
        players: 8,
        duration: Duration::from_secs(80),
    };
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

const HOSTS: [&str; 2] = ["chaos-h1", "chaos-h2"];
/// End reasons that do not kill a match: an admin's, and a killed VM's.
const ALLOWED: [&str; 2] = ["admin", "vm_failed"];
/// berth-sim failures of a player the server left without an answer.
const STRANDED: [&str; 3] = ["queue_timeout", "session_timeout", "drain_timeout"];

pub async fn run(args: ChaosArgs) -> Result<()> {
    crate::sys::ensure(&[crate::sys::QEMU, crate::sys::REDIS, crate::sys::E2FS])?;
    image::build()?;
    crate::build::build_workspace()?;
    let started = Instant::now();
    let mut stack = Stack::start(spec()).await?;
    let swarms = swarms(&stack, &args)?;
    let faults = stack.timeline(args.duration).await;
    let mut sims = Vec::new();
    for mut s in swarms {
        s.wait(args.duration + Duration::from_secs(200))?;
        sims.push(read_json(&s.report)?);
    }
    let stuck = stack.settle().await?;
    let sessions = stack.sessions().await?;
    let mut report = tally(&sessions, &sims, stuck);
    report["faults"] = json!(faults);
    report["elapsed_s"] = json!(started.elapsed().as_secs());
    let (leaks, rss) = stack.stop()?;
    merge(&mut report, leaks);
    report["rss_mib"] = rss;
    write_report(&report)?;
    verdict(&report)
}

/// Two replicas and two hosts on loopback, without regions.
fn spec() -> StackSpec {
    StackSpec {
        dir: image::root().join("target/chaos"),
        tag: "chaos",
        listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        replicas: 2,
        hosts: HOSTS
            .iter()
            .map(|h| HostSpec {
                name: h.to_string(),
                region: None,
                zone: None,
                place: Place::Loopback,
                warm: 2,
                max_vms: 12,
            })
            .collect(),
        mode: ("chaos", chaos_mode()),
    }
}

/// The two swarms, each knowing both replicas (in a different order), playing duels in a loop.
fn swarms(stack: &Stack, args: &ChaosArgs) -> Result<Vec<Swarm>> {
    let mut out = Vec::new();
    for (i, prefix) in ["a", "b"].into_iter().enumerate() {
        let players = (args.players / 2).max(2).to_string();
        let duration = format!("{}s", args.duration.as_secs());
        let seed = (i + 1).to_string();
        let a = [
            "--players",
            &players,
            "--ramp",
            "10s",
            "--duration",
            &duration,
            "--drain",
            "120s",
            "--mode",
            "chaos",
            "--region",
            "eu",
            "--matches",
            "loop",
            "--think",
            "1s..4s",
            "--prefix",
            prefix,
            "--seed",
            &seed,
            // The mode's max wait (60 s) plus the reconnect grace (30 s), and some.
            "--queue-timeout",
            "100s",
        ];
        out.push(stack.swarm(prefix, i, &a)?);
    }
    Ok(out)
}

/// Duels: first to 5 points or 12 seconds.
fn chaos_mode() -> berth_testkit::fixtures::TestMode {
    berth_testkit::fixtures::TestMode {
        players: 2,
        session_max_s: 120,
        fill_wait_ms: None,
        params: "score_limit = 5\ntime_limit_s = 12\nrejoin_grace_s = 20\nabandon_after_s = 20\n",
    }
}

// ---------------------------------------------------------------------------------------------
// Faults

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillVm,
    KillHostd,
    StopHostd,
    KillReplica,
    RedisTerm,
    RedisKill,
    AdminDrain,
    Flood,
}

impl Fault {
    fn kind(self) -> &'static str {
        match self {
            Fault::KillVm => "kill_vm",
            Fault::KillHostd => "kill_hostd",
            Fault::StopHostd => "stop_hostd_10s",
            Fault::KillReplica => "kill_replica",
            Fault::RedisTerm => "restart_redis_sigterm",
            Fault::RedisKill => "restart_redis_sigkill",
            Fault::AdminDrain => "drain_end_undrain",
            Fault::Flood => "flood_and_500_silent_sockets",
        }
    }
}

/// When each fault comes, as a share of the run.
const TIMELINE: [(f64, Fault); 8] = [
    (0.10, Fault::KillVm),
    (0.18, Fault::KillHostd),
    (0.28, Fault::StopHostd),
    (0.40, Fault::KillReplica),
    (0.50, Fault::RedisTerm),
    (0.58, Fault::RedisKill),
    (0.66, Fault::AdminDrain),
    (0.76, Fault::Flood),
];

impl Stack {
    /// Injects every fault at its time. Each entry says when (`at_s`, since the swarms
    /// started), how long the fault itself lasted (`outage_ms`: a stopped hostd's 10 s, a
    /// killed process's time until it is started again), and how long after that both replicas
    /// were ready and both hosts up again (`recovered_ms`; null if not within 90 s, with
    /// `error`).
    async fn timeline(&mut self, duration: Duration) -> Vec<Value> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        for (share, fault) in TIMELINE {
            let at = duration.mul_f64(share);
            tokio::time::sleep(at.saturating_sub(t0.elapsed())).await;
            let at_s = t0.elapsed().as_secs_f64();
            eprintln!("chaos: {at_s:.0}s: {}", fault.kind());
            let t = Instant::now();
            let injected = self.inject(fault).await;
            let outage_ms = t.elapsed().as_millis() as u64;
            let recovered = self.healthy(Duration::from_secs(90)).await;
            for p in self.replicas.iter_mut().chain(self.hostds.iter_mut()) {
                p.sample();
            }
            let at_s = (at_s * 10.0).round() / 10.0;
            let mut entry = json!({"kind": fault.kind(), "at_s": at_s, "outage_ms": outage_ms});
            match (injected, recovered) {
                (Ok(()), Ok(d)) => entry["recovered_ms"] = json!(d.as_millis() as u64),
                (Err(e), _) | (_, Err(e)) => {
                    entry["recovered_ms"] = Value::Null;
                    entry["error"] = json!(format!("{e:#}"));
                }
            }
            out.push(entry);
        }
        out
    }

    async fn inject(&mut self, fault: Fault) -> Result<()> {
        match fault {
            Fault::KillVm => self.kill_vm().await,
            Fault::KillHostd => {
                self.hostds[0].kill9();
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.hostds[0].spawn()
            }
            Fault::StopHostd => {
                self.hostds[1].signal(Signal::SIGSTOP)?;
                tokio::time::sleep(Duration::from_secs(10)).await;
                self.hostds[1].signal(Signal::SIGCONT)
            }
            Fault::KillReplica => {
                self.replicas[0].kill9();
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.replicas[0].spawn()
            }
            Fault::RedisTerm => self.redis.restart(Signal::SIGTERM),
            Fault::RedisKill => self.redis.restart(Signal::SIGKILL),
            Fault::AdminDrain => self.drain_end_undrain().await,
            Fault::Flood => self.flood().await,
        }
    }

    /// SIGKILL to the QEMU of one live game (the first host that runs one).
    async fn kill_vm(&self) -> Result<()> {
        for control in &self.controls {
            let Ok(r) = self.get(&format!("{control}/v1/status")).await else {
                continue;
            };
            let status: Value = r.json().await?;
            if let Some(pid) = status["vms"]
                .as_array()
                .and_then(|v| v.first())
                .and_then(|v| v["pid"].as_i64())
            {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                return Ok(nix::sys::signal::kill(pid, Signal::SIGKILL)?);
            }
        }
        bail!("no live game VM to kill")
    }

    /// Drains the second host, ends one live session through the admin API, undrains.
    async fn drain_end_undrain(&self) -> Result<()> {
        let host = HOSTS[1];
        self.admin_post(&format!("hosts/{host}/drain")).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let active = self.admin_get("sessions?state=active&limit=1").await?;
        if let Some(id) = active[0]["id"].as_str() {
            self.admin_post(&format!("sessions/{id}/end")).await?;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.admin_post(&format!("hosts/{host}/undrain")).await
    }

    /// 500 silent TCP connections to the second replica for 15 s, while a player on the first
    /// floods its socket until it is closed `rate_limited` (4429).
    async fn flood(&self) -> Result<()> {
        let mut silent = Vec::new();
        for _ in 0..500 {
            if let Ok(s) = tokio::net::TcpStream::connect(&self.addrs[1]).await {
                silent.push(s);
            }
        }
        let token = self
            .auth
            .mint("flooder", berth_server::auth::Role::Player, 3600)?;
        let url = format!("ws://{}/v1/play", self.addrs[0]);
        let mut flooder =
            berth_client::PlayClient::connect(berth_client::PlayConfig::new(url, token)).await?;
        let mut sent = 0;
        while sent < 5000
            && flooder
                .raw(r#"{"type":"ping","nonce":1}"#.into())
                .await
                .is_ok()
        {
            sent += 1;
        }
        let closed = tokio::time::timeout(Duration::from_secs(10), flooder.closed()).await;
        let code = closed
            .ok()
            .and_then(|c| c.ok())
            .flatten()
            .and_then(|c| c.code);
        tokio::time::sleep(Duration::from_secs(15)).await;
        let held = silent.len();
        drop(silent);
        anyhow::ensure!(
            code == Some(4429),
            "the flooder was closed with {code:?}, not 4429 ({sent} sent, {held} silent sockets)"
        );
        Ok(())
    }
}

/// The run's figures from the store's sessions and the swarms' reports.
fn tally(sessions: &[Value], sims: &[Value], stuck: u64) -> Value {
    let mut failed_by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let (mut finished, mut killed, mut results_lost) = (0u64, 0u64, 0u64);
    for s in sessions {
        let reason = s["end_reason"].as_str().unwrap_or("");
        if reason.is_empty() {
            continue;
        }
        if !berth_protocol::EndReason::from(reason).is_the_games() {
            *failed_by_reason.entry(reason.into()).or_default() += 1;
            killed += u64::from(!ALLOWED.contains(&reason));
        } else {
            finished += 1;
            results_lost += u64::from(s["results"].is_null());
        }
    }
    let mut sim_failures: BTreeMap<String, u64> = BTreeMap::new();
    for r in sims {
        for (code, n) in r["failures"].as_object().into_iter().flatten() {
            *sim_failures.entry(code.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    let count = |codes: &[&str]| -> u64 {
        sim_failures
            .iter()
            .filter(|(c, _)| codes.contains(&c.as_str()))
            .map(|(_, n)| n)
            .sum()
    };
    let players: u64 = sims
        .iter()
        .map(|r| r["players"].as_u64().unwrap_or(0))
        .sum();
    json!({
        "players": players,
        "matches": sessions.len(),
        "finished": finished,
        "failed_by_reason": failed_by_reason,
        "stranded": count(&STRANDED),
        "results_lost": results_lost + count(&["no_results"]),
        "matches_killed": killed,
        "stuck_sessions": stuck,
        "sim_failures": sim_failures,
        "sim_finished": sims.iter().map(|r| r["matches"]["finished"].as_u64().unwrap_or(0)).sum::<u64>(),
    })
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

fn write_report(report: &Value) -> Result<()> {
    let dir = image::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("chaos.json");
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    println!("{}", serde_json::to_string_pretty(report)?);
    println!("chaos: wrote {}", path.display());
    Ok(())
}

/// Fails unless the faults cost nothing they must not.
fn verdict(r: &Value) -> Result<()> {
    let bad = nonzero(r, &MUST_BE_ZERO);
    let unrecovered: Vec<&str> = r["faults"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["recovered_ms"].is_null())
        .filter_map(|f| f["kind"].as_str())
        .collect();
    if r["finished"].as_u64() == Some(0) {
        bail!("chaos: no match finished at all (see target/chaos/*.log)");
    }
    if !bad.is_empty() || !unrecovered.is_empty() {
        bail!(
            "chaos: {} ; not recovered: {unrecovered:?} (logs in target/chaos/)",
            bad.join(", ")
        );
    }
    println!("chaos: every fault survived: nobody stranded, no results lost, no match killed");
    Ok(())
}
