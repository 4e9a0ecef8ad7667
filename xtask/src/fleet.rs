//! `cargo xtask fleet`: a fleet on one machine. Each `berth-hostd` runs in its own network
//! namespace at its own address on a bridge (`testkit::netns`), declaring its region and zone;
//! Redis and the `berth-server` replicas run in the root namespace at the bridge's address.
//! A `berth-sim` swarm queues by latency (it times every region's gateway probes) and plays in
//! a loop while the first host is cut off the network for a while and brought back, and the
//! second is drained for 10 s (its live matches move to another host of their region, and the
//! bots follow them).
//!
//! Then it checks, from the store, that every session was played on a host of its region and
//! that no match lost its results; from the swarm, that nobody was stranded; and, after
//! stopping everything, that nothing is left (no QEMU, no file, no namespace, no link). It
//! writes `target/fleet/report.json`. `--keep` brings the fleet up, prints where everything
//! is, and keeps it until Ctrl-C. A crashed run's namespaces and links are swept first.

use crate::image;
use crate::stack::{nonzero, read_json, HostSpec, Place, Stack, StackSpec, MUST_BE_ZERO};
use anyhow::{bail, Context, Result};
use berth_testkit::netns::{leftovers, sweep, Bed, NsHost};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// One host per entry, `REGION` or `REGION:ZONE`.
    #[arg(long, default_value = "eu:a,eu:b,us:a")]
    pub hosts: String,
    /// Server replicas.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Players of the swarm (queueing by latency, playing in a loop).
    #[arg(long, default_value_t = 8)]
    pub players: u32,
    /// How long players keep starting matches.
    #[arg(long, default_value = "60s", value_parser = berth_sim::config::parse_duration)]
    pub duration: Duration,
    /// How long the first host is cut off the network, a third into the run (0s: never).
    #[arg(long, default_value = "8s", value_parser = berth_sim::config::parse_duration)]
    pub cut: Duration,
    /// Bring the fleet up, print where it is, and keep it until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

/// The bed's block: `10.77.20.0/24`, namespaces and links named `bb20…`.
const BLOCK: u8 = 20;

/// The short run of `cargo xtask test`.
pub fn short() -> Result<()> {
    let args = FleetArgs {
        hosts: "eu:a,eu:b,us:a".into(),
        replicas: 2,
        players: 4,
        duration: Duration::from_secs(40),
        cut: Duration::from_secs(6),
        keep: false,
    };
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

pub async fn run(args: FleetArgs) -> Result<()> {
    if let Some(report) = report(&args).await? {
        verdict(&report)?;
    }
    Ok(())
}

/// The run (or, with `--keep`, the fleet until Ctrl-C) and its report; fails if anything of
/// the bed is left.
pub async fn report(args: &FleetArgs) -> Result<Option<Value>> {
    use crate::sys::{ensure, E2FS, IPROUTE, QEMU, REDIS};
    ensure(&[QEMU, REDIS, E2FS, IPROUTE])?;
    let places = parse_hosts(&args.hosts)?;
    image::build()?;
    crate::build::build_workspace()?;
    sweep(BLOCK);
    let result = fleet(args, &places).await;
    sweep(BLOCK);
    let left = leftovers(BLOCK);
    let report = result?;
    if !left.is_empty() {
        bail!("fleet: left behind: {left:?}");
    }
    Ok(report)
}

/// `eu:a,eu:b,us` → `[(eu, Some(a)), (eu, Some(b)), (us, None)]`.
fn parse_hosts(spec: &str) -> Result<Vec<(String, Option<String>)>> {
    let name = |s: &str| berth_protocol::HostId::new(s).is_ok() && !s.contains('.');
    let mut out = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (region, zone) = match entry.split_once(':') {
            Some((r, z)) => (r, Some(z)),
            None => (entry, None),
        };
        if !name(region) || zone.is_some_and(|z| !name(z)) {
            bail!(
                "--hosts: `{entry}` is not REGION or REGION:ZONE (names: letters, digits, - and _)"
            );
        }
        out.push((region.to_owned(), zone.map(str::to_owned)));
    }
    if out.is_empty() || out.len() > 20 {
        bail!("--hosts: give 1 to 20 hosts, e.g. eu:a,eu:b,us:a");
    }
    Ok(out)
}

/// Brings the fleet up, runs it (or keeps it), and stops it; the report of a run.
async fn fleet(args: &FleetArgs, places: &[(String, Option<String>)]) -> Result<Option<Value>> {
    let mut bed = Bed::new(BLOCK)?;
    let mut hosts = Vec::new();
    let mut specs = Vec::new();
    for (i, (region, zone)) in places.iter().enumerate() {
        let host = bed.add_host(i as u8 + 1)?;
        specs.push(HostSpec {
            name: format!("fleet-{}", i + 1),
            region: Some(region.clone()),
            zone: zone.clone(),
            place: Place::Namespace {
                ns: host.ns.clone(),
                ip: host.ip,
            },
            warm: 1,
            max_vms: 6,
        });
        hosts.push(host);
    }
    let mut stack = Stack::start(StackSpec {
        dir: image::root().join("target/fleet"),
        tag: "fleet",
        listen_ip: bed.gateway_ip().into(),
        replicas: args.replicas,
        hosts: specs,
        mode: ("fleet", fleet_mode()),
    })
    .await?;
    let report = if args.keep {
        keep(&stack).await?;
        None
    } else {
        Some(play(&mut stack, &hosts, args).await?)
    };
    let (leaks, rss) = stack.stop()?;
    drop(bed);
    Ok(report.map(|mut r| {
        if let (Some(r), Value::Object(l)) = (r.as_object_mut(), leaks) {
            r.extend(l);
        }
        r["rss_mib"] = rss;
        r
    }))
}

/// Sprints: first to 5 points or 12 seconds; a player may be away 20 s and rejoin.
fn fleet_mode() -> berth_testkit::fixtures::TestMode {
    berth_testkit::fixtures::TestMode {
        players: 2,
        session_max_s: 120,
        fill_wait_ms: None,
        params: "score_limit = 5\ntime_limit_s = 12\nrejoin_grace_s = 20\nabandon_after_s = 20\n",
    }
}

/// Prints where everything is and waits for Ctrl-C.
async fn keep(stack: &Stack) -> Result<()> {
    let first = &stack.addrs[0];
    println!("fleet: replicas at {}", stack.addrs.join(", "));
    println!(
        "fleet: dashboard http://{first}/admin (token below), players http://{first}/play?region=*"
    );
    println!("fleet: admin token {}", stack.admin);
    for (h, control) in stack.hosts.iter().zip(&stack.controls) {
        println!(
            "fleet: host {} region {:?} zone {:?} control {control}",
            h.name, h.region, h.zone
        );
    }
    println!("fleet: Ctrl-C stops and removes everything");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// The swarm plays while the first host is cut off and restored; then the counts.
async fn play(stack: &mut Stack, hosts: &[NsHost], args: &FleetArgs) -> Result<Value> {
    let started = Instant::now();
    let players = args.players.max(2).to_string();
    let duration = format!("{}s", args.duration.as_secs());
    let swarm_args = [
        "--players",
        &players,
        "--ramp",
        "5s",
        "--duration",
        &duration,
        "--drain",
        "90s",
        "--mode",
        "fleet",
        "--region",
        "*",
        "--matches",
        "loop",
        "--think",
        "1s..3s",
        "--prefix",
        "fl",
        "--queue-timeout",
        "100s",
    ];
    let mut swarm = stack.swarm("fleet", 0, &swarm_args)?;
    let mut cut = Value::Null;
    if !args.cut.is_zero() {
        tokio::time::sleep(args.duration / 3).await;
        eprintln!("fleet: {} cut off for {:?}", stack.hosts[0].name, args.cut);
        hosts[0].cut()?;
        tokio::time::sleep(args.cut).await;
        hosts[0].restore()?;
        let back = stack.healthy(Duration::from_secs(90)).await;
        cut = json!({
            "host": stack.hosts[0].name,
            "outage_ms": args.cut.as_millis() as u64,
            "recovered_ms": back.ok().map(|d| d.as_millis() as u64),
        });
    }
    let drain = drain_second(stack, started, args.duration).await;
    swarm.wait(args.duration + Duration::from_secs(200))?;
    let sim = read_json(&swarm.report)?;
    let stuck = stack.settle().await?;
    let sessions = stack.sessions().await?;
    let mut report = count(stack, &sessions, &sim, stuck);
    report["cut"] = cut;
    report["drain"] = drain;
    report["sim_moved"] = sim["reconnects"]["moved"].clone();
    report["elapsed_s"] = json!(started.elapsed().as_secs());
    Ok(report)
}

/// Two thirds into the run, drains the second host for 10 s (its live matches move to
/// another host of their region) and undrains it; what it did.
async fn drain_second(stack: &Stack, started: Instant, duration: Duration) -> Value {
    let Some(host) = stack.hosts.get(1).map(|h| h.name.clone()) else {
        return Value::Null;
    };
    tokio::time::sleep((duration * 2 / 3).saturating_sub(started.elapsed())).await;
    eprintln!("fleet: draining {host} (its matches move)");
    let drained = stack.admin_post(&format!("hosts/{host}/drain")).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let undrained = stack.admin_post(&format!("hosts/{host}/undrain")).await;
    let error = drained.and(undrained).err().map(|e| format!("{e:#}"));
    json!({"host": host, "for_s": 10, "error": error})
}

/// Sessions by region and host, misplaced ones (on a host of another region), results lost,
/// players stranded.
fn count(stack: &Stack, sessions: &[Value], sim: &Value, stuck: u64) -> Value {
    let region_of: BTreeMap<&str, &str> = stack
        .hosts
        .iter()
        .filter_map(|h| Some((h.name.as_str(), h.region.as_deref()?)))
        .collect();
    let (mut by_region, mut by_host) = (
        BTreeMap::<String, u64>::new(),
        BTreeMap::<String, u64>::new(),
    );
    let (mut misplaced, mut results_lost, mut killed, mut moved) = (0u64, 0u64, 0u64, 0u64);
    for s in sessions {
        let region = s["region"].as_str().unwrap_or_default();
        *by_region.entry(region.into()).or_default() += 1;
        if let Some(host) = s["host"].as_str() {
            *by_host.entry(host.into()).or_default() += 1;
            misplaced += u64::from(region_of.get(host) != Some(&region));
        }
        moved += u64::from(s["history"].as_array().is_some_and(|h| {
            h.iter().any(|t| {
                t["note"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("moved from"))
            })
        }));
        let reason = s["end_reason"].as_str().unwrap_or_default();
        if reason.is_empty() {
            continue;
        }
        if berth_protocol::EndReason::from(reason).is_the_games() {
            results_lost += u64::from(s["results"].is_null());
        } else {
            killed += 1;
        }
    }
    let failures = sim["failures"].as_object().cloned().unwrap_or_default();
    let stranded: u64 = ["queue_timeout", "session_timeout", "drain_timeout"]
        .iter()
        .filter_map(|c| failures.get(*c)?.as_u64())
        .sum();
    let regions: BTreeSet<&str> = region_of.values().copied().collect();
    json!({
        "hosts": stack.hosts.len(),
        "regions": regions.len(),
        "players": sim["players"],
        "matches": sessions.len(),
        "sim_finished": sim["matches"]["finished"],
        "sim_regions": sim["regions"],
        "sessions_by_region": by_region,
        "sessions_by_host": by_host,
        "misplaced": misplaced,
        "moved": moved,
        "results_lost": results_lost + failures.get("no_results").and_then(Value::as_u64).unwrap_or(0),
        "matches_killed": killed,
        "stranded": stranded,
        "stuck_sessions": stuck,
        "sim_failures": failures,
    })
}

/// Writes the report and fails unless every figure that must be zero is.
fn verdict(r: &Value) -> Result<()> {
    let dir = image::root().join("target/fleet");
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{}", serde_json::to_string_pretty(r)?);
    println!("fleet: wrote {}", path.display());
    let mut bad = nonzero(r, &["misplaced"]);
    bad.extend(nonzero(r, &MUST_BE_ZERO));
    if r["matches"].as_u64() == Some(0) {
        bail!("fleet: no match was played (logs in target/fleet/)");
    }
    if !bad.is_empty() {
        bail!("fleet: {} (logs in target/fleet/)", bad.join(", "));
    }
    if !r["cut"].is_null() && r["cut"]["recovered_ms"].is_null() {
        bail!("fleet: the cut-off host never came back (logs in target/fleet/)");
    }
    println!("fleet: every session on a host of its region; nothing lost, nothing left");
    Ok(())
}
