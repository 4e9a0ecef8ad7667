//! `cargo xtask bench server`: the matchmaking server's own targets, on this machine, in one
//! run. Writes `target/bench/server.json`.
//!
//! 1. **Idle players**: the real `berth-server` binary (debug build, as the tests use it) as a
//!    child process holds `--conns` player websockets that said `hello` and got `welcome`;
//!    its resident memory (`VmRSS`) is read from `/proc` twice, a few seconds apart.
//! 2. **Matchmaking alone**, on Redis and on the memory store: a server runs in this process
//!    (`Server::start_with`, so its matchmaker, dispatcher and sweeper are the real ones) and
//!    tickets go into the store exactly as a player's `queue` puts them (`enqueue`, which also
//!    announces `QueueChanged`). A ticket's decision time runs from just before its `enqueue` to the
//!    moment the claimed session's `Placing` event arrives here; sessions are read back once,
//!    after the run, to learn whose tickets each session took, so measuring adds no store
//!    traffic while it runs. Placement is excluded: no host is connected, sessions end as
//!    `placement_failed` after `--placing-ms`. Two runs per backend: at the offered rate
//!    (`--rate`, the target) and as fast as the producers can enqueue (capacity). Then one
//!    cycle of the server's own `matchmaker::cycle` is timed step by step at a few queue
//!    lengths, with the store round trip and the CPU split (this process, redis-server, the
//!    rest of the machine), to show where a ticket's time goes.
//! 3. **Queue → matched with a warm host** needs real VMs and hostd: left `null` here, measured
//!    by the stack tests.

use anyhow::{bail, Context, Result};
use berth_client::{PlayClient, PlayConfig};
use berth_protocol::play::ServerMessage;
use berth_protocol::{PlayerId, SessionId};
use berth_server::app::Server;
use berth_server::auth::{Auth, Role};
use berth_server::config::{AuthConfig, ServerConfig};
use berth_server::model::{Event, PoolKey, SessionState, Ticket};
use berth_server::modes::Mode;
use berth_server::state::Ctx;
use berth_server::store::memory::MemoryStore;
use berth_server::store::redis::RedisStore;
use berth_server::store::Store;
use futures_util::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

use crate::bench::round;

/// HS256 secret shared by the bench and the servers it starts (≥ 16 bytes).
const SECRET: &str = "berth-bench-secret-0123456789";

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Idle player websockets to hold on one server process (0 skips that part).
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Websockets being opened at once while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Tickets per matchmaking run (0 skips matchmaking).
    #[arg(long, default_value_t = 20_000)]
    pub tickets: usize,
    /// Offered load of the target run, tickets per second.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Concurrent tasks enqueuing tickets.
    #[arg(long, default_value_t = 16)]
    pub producers: usize,
    /// The matchmaking server's `timeouts.placing_ms`: with no host, each session ends as
    /// `placement_failed` this soon, so unplaced sessions do not pile up in the sweeper.
    #[arg(long, default_value_t = 200)]
    pub placing_ms: u64,
    /// Duel matches played on real VMs (server + hostd, one warm clone) for queue → matched;
    /// 0 skips that part.
    #[arg(long, default_value_t = 20)]
    pub matches: usize,
}

/// Queue → matched for fillable duel matches with a warm host: the real server (memory
/// store), hostd with real VMs (one warm clone, refilled between matches), two real player
/// websockets per match. Also reports the server's share: queue → matched minus hostd's
/// activation time for that VM.
async fn warm_matches(matches: usize) -> Result<serde_json::Value> {
    eprintln!("bench: {matches} duel matches on real VMs with a warm host");
    let stack =
        crate::demo::start_stack(crate::demo::StackOptions::ephemeral(1, "bench-server")).await?;
    let result = warm_matches_on(&stack, matches).await;
    stack.shutdown().await;
    result
}

async fn warm_matches_on(stack: &crate::demo::Stack, matches: usize) -> Result<serde_json::Value> {
    let (mut total, mut activation, mut server_share) = (histogram(), histogram(), histogram());
    let mut paths = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..matches {
        stack.ready(1).await?;
        let mut a = crate::demo::player(stack, &format!("wa{i}")).await?;
        let mut b = crate::demo::player(stack, &format!("wb{i}")).await?;
        let (ra, rb) = tokio::join!(
            crate::demo::queue_until_matched(&mut a),
            crate::demo::queue_until_matched(&mut b)
        );
        let ((session, ticket, ms_a), (_, _, ms_b)) = (ra?, rb?);
        let vm = stack.vm_of(&session)?;
        *paths
            .entry(format!("{:?}", vm.path).to_lowercase())
            .or_default() += 1;
        let act_ms = vm.activate_us as f64 / 1000.0;
        for ms in [ms_a, ms_b] {
            total.record((ms * 1000.0) as u64)?;
            server_share.record(((ms - act_ms).max(0.001) * 1000.0) as u64)?;
        }
        activation.record(vm.activate_us)?;
        crate::demo::surrender(vm.game_addr, &ticket).await?;
        for ws in [&mut a, &mut b] {
            match crate::demo::next(ws).await? {
                ServerMessage::SessionEnded { .. } => {}
                other => bail!("expected session_ended, got {other:?}"),
            }
        }
    }
    let pct = |h: &Histogram<u64>| {
        json!({
            "p50": round(h.value_at_quantile(0.5) as f64 / 1000.0),
            "p99": round(h.value_at_quantile(0.99) as f64 / 1000.0),
            "max": round(h.max() as f64 / 1000.0),
        })
    };
    let report = json!({
        "matches": matches,
        "players": 2 * matches,
        "paths": paths,
        "accel": stack.pool.driver().accel().as_str(),
        "queue_to_matched_ms": pct(&total),
        "activation_ms": pct(&activation),
        "queue_to_matched_minus_activation_ms": pct(&server_share),
        "meets_target": h_ms(&server_share, 0.99) <= 100.0,
    });
    eprintln!("bench:   {report}");
    Ok(report)
}

/// ≥ 5000 tickets/s when saturated and p99 ≤ 50 ms at the offered target rate.
fn verdict(backend: &serde_json::Value) -> bool {
    let tps = backend["saturated"]["tickets_per_s"]
        .as_f64()
        .unwrap_or(0.0);
    let p99 = backend["target"]["p99_ms"].as_f64().unwrap_or(f64::MAX);
    tps >= 5000.0 && p99 <= 50.0
}

fn h_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub async fn run(args: ServerArgs) -> Result<()> {
    let root = crate::image::root();
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let idle = if args.conns > 0 {
        idle_players(&root, &out, &args).await?
    } else {
        json!(null)
    };

    let mut mm = json!(null);
    let mut memory = json!(null);
    if args.tickets > 0 {
        let redis = crate::redis::RedisServer::start()?;
        eprintln!("bench: redis-server at {}", redis.url);
        let mut runs = Vec::new();
        for backend in ["redis", "memory"] {
            runs.push(matchmaking_backend(&root, &args, backend, &redis.url).await?);
        }
        drop(redis);
        memory = runs.pop().context("memory run")?;
        mm = runs.pop().context("redis run")?;
    }

    let warm = if args.matches > 0 {
        warm_matches(args.matches).await?
    } else {
        json!(null)
    };

    let report = json!({
        // Of this process, where the matchmaking runs; the idle players' server is always the
        // debug binary the tests use.
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "cores": cores,
        "accel": "n/a",
        "idle_conns": idle["established"],
        "rss_mib": idle["rss_mib"],
        "idle": idle,
        "backend": "redis",
        // Throughput: what the matchmaker sustains when tickets come as fast as the producers
        // can send them (`redis.saturated`). Decision latency: at the target's offered rate
        // (`redis.target`), where the queue does not back up; at saturation it does, and its
        // p99 is in `redis.saturated`.
        "tickets_per_s": mm["saturated"]["tickets_per_s"],
        "match_p50_ms": mm["target"]["p50_ms"],
        "match_p99_ms": mm["target"]["p99_ms"],
        "tickets_per_s_at_target_rate": mm["target"]["tickets_per_s"],
        "meets_targets": {
            "idle_rss": idle["meets_target"],
            // ≥ 5000 tickets/s sustained, p99 ≤ 50 ms at 5000 offered.
            "matchmaking_redis": verdict(&mm),
            "matchmaking_memory": verdict(&memory),
        },
        "redis": mm,
        "memory": memory,
        "queue_to_matched_ms": warm["queue_to_matched_ms"],
        "warm_host": warm,
        "args": {
            "conns": args.conns,
            "tickets": args.tickets,
            "rate": args.rate,
            "producers": args.producers,
            "placing_ms": args.placing_ms,
        },
    });
    print_table(&report);
    let path = out.join("server.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Idle players on one server process.

/// Raises this process's open-file limit to at least `want` (children inherit it).
fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    // Raising the hard limit needs root (CAP_SYS_RESOURCE); without it, take what is allowed.
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    let soft = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
    Ok(soft)
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The `berth-server` child: killed (SIGTERM, then SIGKILL) and reaped by [`Child::stop`], or
/// killed on drop if the bench fails first.
struct Child {
    inner: tokio::process::Child,
    pid: u32,
}

impl Child {
    /// Asks for a graceful shutdown, waits a few seconds, then kills; returns how it ended.
    async fn stop(mut self) -> String {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        match tokio::time::timeout(Duration::from_secs(10), self.inner.wait()).await {
            Ok(Ok(status)) => format!("exited after SIGTERM: {status}"),
            _ => {
                let _ = self.inner.kill().await;
                "killed (no exit within 10 s of SIGTERM)".into()
            }
        }
    }
}

/// A player connected to `url` and past `welcome`, with small socket buffers (the bench holds
/// thousands of these).
async fn idle_player(url: &str, token: String) -> Result<PlayClient> {
    let mut config = PlayConfig::new(url, token);
    config.socket.small_buffers = true;
    config.socket.timeout = Duration::from_secs(30);
    Ok(PlayClient::connect(config).await?)
}

async fn idle_players(root: &Path, out: &Path, args: &ServerArgs) -> Result<serde_json::Value> {
    // Each player costs a socket here and one in the server, plus headroom.
    let nofile = raise_nofile(args.conns as u64 + 4096)?;
    anyhow::ensure!(
        nofile > args.conns as u64 + 100,
        "RLIMIT_NOFILE is {nofile}: too low for {} sockets",
        args.conns
    );
    eprintln!("bench: building berth-server (debug)");
    crate::sys::run(
        std::process::Command::new(env!("CARGO"))
            .current_dir(root)
            .args([
                "build",
                "--quiet",
                "-p",
                "berth-server",
                "--bin",
                "berth-server",
            ]),
    )?;
    let config_path = out.join("server-bench.toml");
    // Idle sockets must outlive the measurement: the default idle timeout is 60 s.
    std::fs::write(
        &config_path,
        format!(
            "modes_dir = {:?}\n[timeouts]\nidle_ms = 600000\nhello_ms = 60000\n",
            root.join("assets/modes")
        ),
    )?;
    let log_path = out.join("server-bench.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = tokio::process::Command::new(root.join("target/debug/berth-server"));
    cmd.arg("--config")
        .arg(&config_path)
        .args(["run", "--listen", "127.0.0.1:0"])
        .env("BERTH_AUTH_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .env_remove("BERTH_REDIS")
        .env_remove("BERTH_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    let mut inner = cmd.spawn().context("starting target/debug/berth-server")?;
    let pid = inner.id().context("server pid")?;
    let stdout = inner.stdout.take().context("server stdout")?;
    let child = Child { inner, pid };
    let result = hold_idle(pid, stdout, args, nofile).await;
    let ended = child.stop().await;
    eprintln!("bench: server {ended}");
    let mut report = result?;
    report["server_exit"] = json!(ended);
    report["server_log"] = json!(log_path.display().to_string());
    Ok(report)
}

async fn hold_idle(
    pid: u32,
    stdout: tokio::process::ChildStdout,
    args: &ServerArgs,
    nofile: u64,
) -> Result<serde_json::Value> {
    let addr = listening_addr(stdout).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_kib = status_kib(pid, "VmRSS").unwrap_or(0);
    eprintln!(
        "bench: berth-server pid {pid} on {addr}, RSS {:.1} MiB before players",
        base_kib as f64 / 1024.0
    );
    let Connected {
        mut held,
        failed,
        first_error,
        connect_s,
    } = connect_idle(&addr, args).await?;
    eprintln!(
        "bench: {} players connected in {connect_s:.1} s ({failed} failed)",
        held.len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sample = IdleSample::take(pid).await;
    let (rss1, rss2) = (sample.rss1, sample.rss2);
    let n = held.len();
    let rss = rss1.max(rss2);
    let per_conn_kib = (rss.saturating_sub(base_kib)) as f64 / n.max(1) as f64;
    // Still open after the measurement? A closed socket would have an end or a close ready.
    let alive = held
        .iter_mut()
        .map(|ws| ws.next_item().now_or_never().is_none())
        .filter(|&open| open)
        .count();
    drop(held);
    Ok(json!({
        "target": args.conns,
        "established": n,
        "failed": failed,
        "first_error": first_error,
        "alive_at_end": alive,
        "server_fds": sample.fds,
        "connect_s": round(connect_s),
        "connects_per_s": round(n as f64 / connect_s.max(1e-9)),
        "rss_mib": round(rss as f64 / 1024.0),
        "rss_mib_samples": [round(rss1 as f64 / 1024.0), round(rss2 as f64 / 1024.0)],
        "rss_peak_mib": round(sample.hwm as f64 / 1024.0),
        "rss_before_players_mib": round(base_kib as f64 / 1024.0),
        "kib_per_conn": round(per_conn_kib),
        "idle_cpu_pct_of_a_core": round(sample.idle_cpu_pct),
        "nofile_limit": nofile,
        "target_rss_mib": 256,
        "server_binary": "target/debug/berth-server",
        "meets_target": n == args.conns && rss as f64 / 1024.0 <= 256.0,
    }))
}

/// The address the server prints once it listens (within 30 s); its stdout stays drained
/// after that.
async fn listening_addr(stdout: tokio::process::ChildStdout) -> Result<String> {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(a) = line.strip_prefix("berth-server listening on ") {
                return Ok(a.trim().to_owned());
            }
        }
        bail!("berth-server exited before listening (see target/bench/server-bench.log)")
    })
    .await
    .context("berth-server did not say where it listens within 30 s")??;
    // Nothing else is printed on stdout, but keep the pipe drained anyway.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(addr)
}

/// The idle players that got in, and how the rest did.
struct Connected {
    held: Vec<PlayClient>,
    failed: usize,
    first_error: Option<String>,
    connect_s: f64,
}

/// Connects `args.conns` players to the server at `addr`, `args.connect_concurrency` at a
/// time.
async fn connect_idle(addr: &str, args: &ServerArgs) -> Result<Connected> {
    let auth = Auth::new(&AuthConfig {
        secret: SECRET.into(),
        ..AuthConfig::default()
    })?;
    let url = format!("ws://{addr}/v1/play");
    let tokens = (0..args.conns)
        .map(|i| auth.mint(&format!("idle-{i}"), Role::Player, 3600))
        .collect::<Result<Vec<_>, _>>()?;
    let t = Instant::now();
    let results: Vec<Result<PlayClient>> = futures_util::stream::iter(tokens)
        .map(|token| idle_player(&url, token))
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect()
        .await;
    let connect_s = t.elapsed().as_secs_f64();
    let mut held = Vec::with_capacity(results.len());
    let mut failed = 0usize;
    let mut first_error = None;
    for r in results {
        match r {
            Ok(ws) => held.push(ws),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Ok(Connected {
        held,
        failed,
        first_error,
        connect_s,
    })
}

/// The server's memory (KiB), open files and CPU while its players sit idle: one sample,
/// a 5 s window, another sample.
struct IdleSample {
    rss1: u64,
    rss2: u64,
    hwm: u64,
    fds: usize,
    idle_cpu_pct: f64,
}

impl IdleSample {
    async fn take(pid: u32) -> Self {
        let rss1 = status_kib(pid, "VmRSS").unwrap_or(0);
        let fds = open_fds(pid);
        let ticks0 = crate::bench::cpu_ticks(pid);
        let window = Duration::from_secs(5);
        tokio::time::sleep(window).await;
        let ticks1 = crate::bench::cpu_ticks(pid);
        let rss2 = status_kib(pid, "VmRSS").unwrap_or(0);
        let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
        let hz = clk_tck();
        let idle_cpu_pct = ticks1.saturating_sub(ticks0) as f64 / hz / window.as_secs_f64() * 100.0;
        IdleSample {
            rss1,
            rss2,
            hwm,
            fds,
            idle_cpu_pct,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Matchmaking alone.

/// The redis-server process serving `url` (its title names its port), to account its CPU.
fn redis_pid(url: &str) -> Option<u32> {
    let port = url.trim_end_matches('/').rsplit(':').next()?.to_owned();
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
        (cmd.starts_with("redis-server") && cmd.contains(&format!(":{port}"))).then_some(pid)
    })
}

/// Runs `redis-cli` against `url`; its output, or `None` if it could not.
fn redis_cli(url: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", url])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Redis's own account of the run (since `CONFIG RESETSTAT`): calls and time per command,
/// and the share of the run Redis spent executing commands.
fn commandstats(url: &str) -> serde_json::Value {
    let Some(text) = redis_cli(url, &["INFO", "commandstats"]) else {
        return json!(null);
    };
    let mut out = serde_json::Map::new();
    for line in text.lines() {
        let Some((name, fields)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(cmd) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let field = |k: &str| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
        };
        out.insert(
            cmd.to_owned(),
            json!({
                "calls": field("calls"),
                "usec_per_call": field("usec_per_call"),
                "usec": field("usec"),
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// Busy and total jiffies of the whole machine (all CPUs), from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Where the CPU went during a run: this process (server + producers), redis-server, and
/// everything else on the machine, each in % of one core.
struct CpuWindow {
    start: Instant,
    own: u64,
    redis: Option<(u32, u64)>,
    machine: (u64, u64),
}

impl CpuWindow {
    fn start(redis: Option<u32>) -> Self {
        CpuWindow {
            start: Instant::now(),
            own: crate::bench::cpu_ticks(std::process::id()),
            redis: redis.map(|p| (p, crate::bench::cpu_ticks(p))),
            machine: machine_ticks(),
        }
    }

    fn finish(&self) -> serde_json::Value {
        let hz = clk_tck();
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let pct = |ticks: u64| round(ticks as f64 / hz / secs * 100.0);
        let own = crate::bench::cpu_ticks(std::process::id()).saturating_sub(self.own);
        let redis = self.redis.map_or(0, |(pid, t0)| {
            crate::bench::cpu_ticks(pid).saturating_sub(t0)
        });
        let (busy, _) = machine_ticks();
        // /proc/stat counts in USER_HZ too.
        let machine = busy.saturating_sub(self.machine.0);
        json!({
            "bench_process_pct": pct(own),
            "redis_pct": self.redis.map(|_| pct(redis)),
            "machine_busy_pct": pct(machine),
            "others_pct": pct(machine.saturating_sub(own + redis)),
        })
    }
}

async fn matchmaking_backend(
    root: &Path,
    args: &ServerArgs,
    backend: &str,
    redis_url: &str,
) -> Result<serde_json::Value> {
    let mut runs = serde_json::Map::new();
    runs.insert("backend".into(), json!(backend));
    let url = (backend == "redis").then_some(redis_url);
    let store = |prefix: String| async move {
        anyhow::Ok(match backend {
            "redis" => Arc::new(RedisStore::connect(redis_url, &prefix).await?) as Arc<dyn Store>,
            _ => Arc::new(MemoryStore::new()),
        })
    };
    for (name, rate) in [("target", Some(args.rate)), ("saturated", None)] {
        let store = store(format!("bench{}-{name}", std::process::id())).await?;
        eprintln!(
            "bench: matchmaking on {backend}, {} tickets, {}",
            args.tickets,
            rate.map_or("as fast as possible".into(), |r| format!("offered {r}/s"))
        );
        let r = matchmaking(root, args, store, rate, url).await?;
        eprintln!(
            "bench:   {} matched, {} tickets/s, p50 {} ms, p99 {} ms",
            r["matched"], r["tickets_per_s"], r["p50_ms"], r["p99_ms"]
        );
        runs.insert(name.into(), r);
    }
    eprintln!("bench: one matchmaking cycle on {backend}, step by step");
    let probe = store(format!("bench{}-steps", std::process::id())).await?;
    runs.insert("steps".into(), cycle_steps(root, args, probe).await?);
    Ok(serde_json::Value::Object(runs))
}

/// Where a matchmaking cycle's time goes, for a few queue lengths: the pool is leased to the
/// bench (so the server's matchmaker leaves it alone, whatever `QueueChanged` says), filled
/// with `b` tickets, then the server's own `matchmaker::cycle` runs once on it. Reading the queue
/// and `decide` are also timed alone; the rest of the cycle is the per-match work (claim,
/// publish, bookkeeping), reported per match.
async fn cycle_steps(
    root: &Path,
    args: &ServerArgs,
    store: Arc<dyn Store>,
) -> Result<serde_json::Value> {
    let server = Server::start_with(mm_config(root, args), store.clone()).await?;
    let ctx = server.ctx.clone();
    let pool = duel_pool("us");
    anyhow::ensure!(
        store
            .lease(&format!("match:{pool}"), "bench-probe", 600_000)
            .await?,
        "could not lease the probe pool"
    );
    let ping_us = ping_us(&store).await?;
    let mode = ctx.modes.get("duel").context("mode duel")?.clone();
    let mut probe = Probe {
        ctx,
        store,
        mode,
        pool,
        next: 0,
    };
    let claim_publish_us = probe.claim_publish_alone().await?;
    eprintln!("bench:   claim + publish alone: {claim_publish_us:.0} µs per match");
    tokio::time::sleep(Duration::from_millis(args.placing_ms + 1500)).await;

    let mut sizes = Vec::new();
    for b in [100usize, 1000, 4000] {
        sizes.push(probe.cycle_at(b).await?);
        // Let the spawned placement attempts and the sweeper settle before the next size.
        tokio::time::sleep(Duration::from_millis(args.placing_ms + 1500)).await;
    }
    server.shutdown().await;
    Ok(json!({
        "store_ping_us": round(ping_us),
        "claim_publish_alone_us_per_match": round(claim_publish_us),
        "cycles": sizes,
    }))
}

/// Round trip floor: the mean time of a store call that does nothing, in µs.
async fn ping_us(store: &Arc<dyn Store>) -> Result<f64> {
    let t = Instant::now();
    for _ in 0..200 {
        store.ping().await?;
    }
    Ok(us_per(t, 200))
}

/// Milliseconds since `t`.
fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Microseconds since `t`, shared by `n` operations (counted as at least one, so a step that
/// did nothing does not divide by zero).
fn us_per(t: Instant, n: usize) -> f64 {
    t.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64
}

/// The bench's hold on the leased probe pool of a server: its context and store, the mode
/// duel, and the number of the next probe ticket (counted on from fill to fill, so no player
/// queues twice).
struct Probe {
    ctx: Ctx,
    store: Arc<dyn Store>,
    mode: Mode,
    pool: PoolKey,
    next: usize,
}

/// One `matchmaker::cycle` at a queue length, and its parts timed alone.
struct CycleStep {
    queued: usize,
    matches_decided: usize,
    matches_claimed: usize,
    read_ms: f64,
    decide_ms: f64,
    cycle_ms: f64,
    per_match_us: f64,
    placing_read_ms: f64,
    placing_sessions: usize,
    try_place_us: f64,
}

impl Probe {
    /// Enqueues `b` more probe tickets, all made (and stamped) before the first goes in.
    async fn fill(&mut self, b: usize) -> Result<()> {
        let tickets: Vec<Ticket> = (self.next..self.next + b)
            .map(|i| bench_ticket(format!("p-{i}"), format!("probe-{i}"), i, &self.pool))
            .collect::<Result<_>>()?;
        self.next += b;
        for t in tickets {
            self.store.enqueue(&t).await?;
        }
        Ok(())
    }

    /// The per-match store work of a cycle alone: claim, then publish, one match at a time,
    /// with no placement attempts running beside it; µs per match.
    async fn claim_publish_alone(&mut self) -> Result<f64> {
        self.fill(200).await?;
        let (ctx, store, mode, pool) = (&self.ctx, &self.store, &self.mode, &self.pool);
        let queued = store.tickets(pool).await?;
        let now = berth_protocol::now_ms();
        let outcome = berth_server::matching::decide(mode, &queued, now, 30_000);
        let t = Instant::now();
        for formed in &outcome.matches {
            let session = berth_server::sessions::new_session(ctx, mode, pool, formed, now);
            anyhow::ensure!(
                store.claim(&formed.tickets, &session).await?,
                "probe claim lost"
            );
            store
                .publish(&Event::Session {
                    session: session.id.clone(),
                    state: session.state,
                })
                .await?;
        }
        Ok(us_per(t, outcome.matches.len()))
    }

    /// Fills the pool with `b` tickets and times one cycle on it, printing and returning the
    /// times.
    async fn cycle_at(&mut self, b: usize) -> Result<serde_json::Value> {
        self.fill(b).await?;
        let (ctx, store, pool) = (&self.ctx, &self.store, &self.pool);
        let t = Instant::now();
        let tickets = store.tickets(pool).await?;
        let read_ms = ms_since(t);
        let t = Instant::now();
        let outcome = berth_server::matching::decide(
            &self.mode,
            &tickets,
            berth_protocol::now_ms(),
            ctx.config.timeouts.reconnect_grace_ms,
        );
        let decide_ms = ms_since(t);
        let t = Instant::now();
        let claimed = berth_server::matchmaker::cycle(&ctx.core, pool).await?;
        let cycle_ms = ms_since(t);
        let per_match_us =
            (cycle_ms - read_ms - decide_ms).max(0.0) * 1000.0 / claimed.max(1) as f64;
        // What the matchmaker spawns per claimed match (no host: it finds none and returns).
        let t = Instant::now();
        let placing = store.sessions(Some(SessionState::Placing)).await?;
        let placing_read_ms = ms_since(t);
        let tries = placing.len().min(50);
        let t = Instant::now();
        for s in &placing[..tries] {
            berth_server::sessions::try_place(ctx, &s.id).await?;
        }
        let step = CycleStep {
            queued: b,
            matches_decided: outcome.matches.len(),
            matches_claimed: claimed,
            read_ms,
            decide_ms,
            cycle_ms,
            per_match_us,
            placing_read_ms,
            placing_sessions: placing.len(),
            try_place_us: us_per(t, tries),
        };
        step.print();
        Ok(step.json())
    }
}

impl CycleStep {
    fn print(&self) {
        eprintln!(
            "bench:   {} queued: read {:.1} ms, decide {:.1} ms, cycle {:.1} ms for {} matches ({:.0} µs each); try_place {:.0} µs",
            self.queued,
            self.read_ms,
            self.decide_ms,
            self.cycle_ms,
            self.matches_claimed,
            self.per_match_us,
            self.try_place_us
        );
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "queued": self.queued,
            "matches_decided": self.matches_decided,
            "matches_claimed": self.matches_claimed,
            "read_queue_ms": round(self.read_ms),
            "decide_ms": round(self.decide_ms),
            "cycle_ms": round(self.cycle_ms),
            "per_match_us": round(self.per_match_us),
            "placing_sessions_read_ms": round(self.placing_read_ms),
            "placing_sessions": self.placing_sessions,
            "try_place_us": round(self.try_place_us),
        })
    }
}

/// The in-process matchmaking server's config: loopback, the project's modes, the bench's
/// secret, short placement deadline.
fn mm_config(root: &Path, args: &ServerArgs) -> ServerConfig {
    let mut config = ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        modes_dir: root.join("assets/modes"),
        ..ServerConfig::default()
    };
    config.auth.secret = SECRET.into();
    config.timeouts.placing_ms = args.placing_ms;
    config
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn hist_json(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |us: u64| round(us as f64 / 1000.0);
    json!({
        "n": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
        "mean_ms": round(h.mean() / 1000.0),
    })
}

/// A solo ticket for `pool`, enqueued now, as a player's `queue` makes it.
fn bench_ticket(id: String, player: String, i: usize, pool: &PoolKey) -> Result<Ticket> {
    Ok(Ticket {
        id,
        player: PlayerId::new(player)?,
        pool: pool.clone(),
        party: None,
        // Within duel's 100-point starting window of each other: every pair matches.
        skill: 1000.0 + (i % 97) as f64,
        enqueued_ms: berth_protocol::now_ms(),
        away_since_ms: None,
        latencies: None,
    })
}

/// The duel pool of `region`, where every bench ticket goes.
fn duel_pool(region: &str) -> PoolKey {
    PoolKey {
        mode: "duel".into(),
        region: region.into(),
    }
}

/// Clock ticks per second of `/proc` CPU times (USER_HZ), 100 if unknown.
fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

fn player_index(p: &PlayerId) -> Option<usize> {
    p.as_str().strip_prefix("mm-")?.parse().ok()
}

/// What a run's producers and observer saw.
struct Drive {
    t0: Instant,
    /// Per ticket index, when its `enqueue` started.
    enqueued_at: Vec<OnceLock<Instant>>,
    /// Per claimed session, when its `Placing` event arrived.
    observed: Vec<(SessionId, Instant)>,
    lagged: u64,
    enqueue_lat: Histogram<u64>,
    enqueue_s: f64,
    max_backlog: usize,
    timed_out: bool,
    cpu: serde_json::Value,
}

/// Enqueues `args.tickets` tickets from `args.producers` tasks on `side` (at `rate` per second,
/// or as fast as they go) and waits until every one is matched or time is up.
async fn drive(
    side: &tokio::runtime::Runtime,
    args: &ServerArgs,
    store: &Arc<dyn Store>,
    rate: Option<u64>,
    redis: Option<u32>,
) -> Result<Drive> {
    let n = args.tickets;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let sessions_seen = Arc::new(AtomicUsize::new(0));
    // Subscribed before the first ticket, so no `Placing` event can be missed.
    let events = store.subscribe();
    let observer = side.spawn(observe(events, n, sessions_seen.clone(), stop.clone()));

    let enqueued_at: Arc<Vec<OnceLock<Instant>>> =
        Arc::new((0..n).map(|_| OnceLock::new()).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let pool = duel_pool("eu");
    let cpu = CpuWindow::start(redis);
    let t0 = Instant::now();
    let mut producers = Vec::new();
    for _ in 0..args.producers.max(1) {
        let producer = Producer {
            store: store.clone(),
            next: next.clone(),
            done: done.clone(),
            at: enqueued_at.clone(),
            pool: pool.clone(),
            t0,
            n,
            rate,
        };
        producers.push(side.spawn(producer.run()));
    }

    // Wait for every match (or give up), sampling the backlog: enqueued but not yet matched.
    let sampler = side.spawn(sample_backlog(
        done.clone(),
        sessions_seen.clone(),
        stop.clone(),
        n,
        t0,
    ));
    let mut enqueue_lat = histogram();
    let mut enqueue_end = t0;
    let mut failed = None;
    for p in producers {
        match p.await? {
            Ok((lat, end)) => {
                enqueue_lat.add(lat).expect("same bounds");
                enqueue_end = enqueue_end.max(end);
            }
            Err(e) => {
                failed = Some(e);
                // Stop the others and the waiting too.
                next.store(n, Ordering::Relaxed);
                let _ = stop_tx.send(true);
            }
        }
    }
    let (max_backlog, timed_out) = sampler.await?;
    let cpu = cpu.finish();
    // Let a last event in flight arrive, then stop the observer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop_tx.send(true);
    let (observed, lagged) = observer.await?;
    if let Some(e) = failed {
        return Err(e.context("enqueuing"));
    }
    let enqueued_at = Arc::try_unwrap(enqueued_at)
        .map_err(|_| anyhow::anyhow!("a producer still holds the enqueue times"))?;
    Ok(Drive {
        t0,
        enqueued_at,
        observed,
        lagged,
        enqueue_lat,
        enqueue_s: enqueue_end.duration_since(t0).as_secs_f64(),
        max_backlog,
        timed_out,
        cpu,
    })
}

/// The measuring device: notes when each claimed session's `Placing` event arrives (and
/// counts them in `seen`) until `stop`; returns those and how many events it missed.
async fn observe(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    n: usize,
    seen: Arc<AtomicUsize>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<(SessionId, Instant)>, u64) {
    let mut observed = Vec::with_capacity(n / 2);
    let mut lagged = 0u64;
    loop {
        let e = tokio::select! {
            e = events.recv() => e,
            _ = stop.changed() => break,
        };
        match e {
            Ok(Event::Session {
                session,
                state: SessionState::Placing,
            }) => {
                observed.push((session, Instant::now()));
                seen.store(observed.len(), Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => lagged += k,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    (observed, lagged)
}

/// One producer task, playing players: takes the next ticket number from `next` until `n`,
/// at its due time under `rate` (from `t0`), and enqueues it.
struct Producer {
    store: Arc<dyn Store>,
    next: Arc<AtomicUsize>,
    /// Enqueued tickets, counted for the backlog.
    done: Arc<AtomicUsize>,
    /// Per ticket index, when its `enqueue` started.
    at: Arc<Vec<OnceLock<Instant>>>,
    pool: PoolKey,
    t0: Instant,
    n: usize,
    rate: Option<u64>,
}

impl Producer {
    /// Its `enqueue` latencies and when it ran out of tickets.
    async fn run(self) -> Result<(Histogram<u64>, Instant)> {
        let mut lat = histogram();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return anyhow::Ok((lat, Instant::now()));
            }
            if let Some(r) = self.rate {
                let due = self.t0 + Duration::from_secs_f64(i as f64 / r as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            let ticket = bench_ticket(format!("t-{i}"), format!("mm-{i}"), i, &self.pool)?;
            let start = Instant::now();
            let _ = self.at[i].set(start);
            // Announces the ticket (QueueChanged) in the same step, as for a player.
            self.store.enqueue(&ticket).await?;
            let _ = lat.record(start.elapsed().as_micros().max(1) as u64);
            self.done.fetch_add(1, Ordering::Relaxed);
            // The memory store never makes a task wait: without this, one producer would
            // run to the end before the observer got a turn, and the event buffer overflow.
            tokio::task::yield_now().await;
        }
    }
}

/// Waits until the observer has seen every match, or the run is out of time or stalled,
/// sampling the backlog (enqueued but not yet matched) every 10 ms; returns the largest
/// backlog and whether it gave up.
async fn sample_backlog(
    done: Arc<AtomicUsize>,
    seen: Arc<AtomicUsize>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    n: usize,
    t0: Instant,
) -> (usize, bool) {
    let limit = Duration::from_secs(60) + Duration::from_millis(n as u64 * 2);
    let mut max_backlog = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let (mut last_seen, mut progress) = (0, Instant::now());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return (max_backlog, false),
        }
        let matched = seen.load(Ordering::Relaxed) * 2;
        let enqueued = done.load(Ordering::Relaxed);
        max_backlog = max_backlog.max(enqueued.saturating_sub(matched));
        if matched >= n - n % 2 {
            return (max_backlog, false);
        }
        if matched != last_seen {
            (last_seen, progress) = (matched, Instant::now());
        }
        // Out of time, or everything enqueued and no match seen for a while (missed
        // events show up as `events_lagged`).
        let stalled = enqueued >= n && progress.elapsed() > Duration::from_secs(10);
        if t0.elapsed() > limit || stalled {
            return (max_backlog, true);
        }
    }
}

/// One matchmaking run: `args.tickets` tickets into mode `duel`, region `eu`, at `rate` per
/// second (`None`: as fast as the producers go), on a fresh server over `store`.
async fn matchmaking(
    root: &Path,
    args: &ServerArgs,
    store: Arc<dyn Store>,
    rate: Option<u64>,
    redis_url: Option<&str>,
) -> Result<serde_json::Value> {
    let redis = redis_url.and_then(redis_pid);
    if let Some(url) = redis_url {
        redis_cli(url, &["CONFIG", "RESETSTAT"]);
    }
    let n = args.tickets;
    let server = Server::start_with(mm_config(root, args), store.clone()).await?;

    let side = side_runtime()?;
    let result = drive(&side, args, &store, rate, redis).await;
    side.shutdown_background();
    let run = match result {
        Ok(run) => run,
        Err(e) => {
            server.shutdown().await;
            return Err(e);
        }
    };
    let commands = redis_url.map(commandstats);

    // Whose tickets each session took: one read of every session, after the run. That read
    // is also what the sweeper does every 500 ms, so its time is worth reporting.
    let t = Instant::now();
    let sessions = store.sessions(None).await?;
    let scan_ms = ms_since(t);
    let n_sessions = sessions.len();
    let players: HashMap<SessionId, Vec<PlayerId>> =
        sessions.into_iter().map(|s| (s.id, s.players)).collect();
    let Decisions {
        decision,
        wall_s,
        unknown,
    } = decisions(&run, &players);
    let matched = decision.len() as usize;
    server.shutdown().await;
    let d = hist_json(&decision);
    Ok(json!({
        "offered_per_s": rate,
        "tickets": n,
        "matched": matched,
        "timed_out": run.timed_out,
        "tickets_per_s": round(matched as f64 / wall_s.max(1e-9)),
        "wall_s": round(wall_s),
        "enqueued_per_s": round(n as f64 / run.enqueue_s.max(1e-9)),
        "p50_ms": d["p50_ms"],
        "p99_ms": d["p99_ms"],
        "decision": d,
        "enqueue_publish": hist_json(&run.enqueue_lat),
        "max_backlog_tickets": run.max_backlog,
        "events_lagged": run.lagged,
        "sessions_unaccounted": unknown,
        "sessions_stored": n_sessions,
        "sessions_scan_ms": round(scan_ms),
        "cpu": run.cpu,
        "redis_commands": commands,
        "meets_target": matched as f64 / wall_s.max(1e-9) >= 5000.0
            && decision.value_at_quantile(0.99) <= 50_000,
    }))
}

/// The producers (players, in production on other machines) and the observer (the measuring
/// device) run on a runtime of their own, so they neither wait behind the server's tasks on
/// its workers nor take turns from them there; they share the machine's cores with it as any
/// other process would.
fn side_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-side")
        .enable_all()
        .build()?)
}

/// What the run decided: each matched ticket's decision time, the wall time from the first
/// enqueue to the last match, and the observed sessions the store did not know.
struct Decisions {
    decision: Histogram<u64>,
    wall_s: f64,
    unknown: usize,
}

/// Joins the run's observed `Placing` times with whose tickets each session took (`players`)
/// and when those tickets were enqueued.
fn decisions(run: &Drive, players: &HashMap<SessionId, Vec<PlayerId>>) -> Decisions {
    let (t0, enqueued_at) = (run.t0, &run.enqueued_at);
    let mut decision = histogram();
    let mut last = t0;
    let mut unknown = 0usize;
    for (id, at) in &run.observed {
        let Some(ps) = players.get(id) else {
            unknown += 1;
            continue;
        };
        last = last.max(*at);
        for p in ps {
            if let Some(start) = player_index(p).and_then(|i| enqueued_at.get(i)?.get()) {
                let _ =
                    decision.record(at.saturating_duration_since(*start).as_micros().max(1) as u64);
            }
        }
    }
    let first = enqueued_at
        .iter()
        .filter_map(|c| c.get())
        .min()
        .copied()
        .unwrap_or(t0);
    let wall_s = last.saturating_duration_since(first).as_secs_f64();
    Decisions {
        decision,
        wall_s,
        unknown,
    }
}

// ---------------------------------------------------------------------------------------------

fn print_table(r: &serde_json::Value) {
    let v = |x: &serde_json::Value| x.to_string();
    println!(
        "\nserver benchmark — {} build, {} cores (bench, server and redis-server share them)",
        r["profile"].as_str().unwrap_or("?"),
        r["cores"]
    );
    let i = &r["idle"];
    if !i.is_null() {
        println!(
            "idle players: {} of {} held on one berth-server, RSS {} MiB (target ≤ 256; {} MiB \
             before players, {} KiB each), idle CPU {} % of a core",
            i["established"],
            i["target"],
            i["rss_mib"],
            i["rss_before_players_mib"],
            i["kib_per_conn"],
            i["idle_cpu_pct_of_a_core"]
        );
    }
    if r["redis"].is_null() {
        print_warm_and_targets(r);
        return;
    }
    println!(
        "\n{:<20} {:>9} {:>10} {:>8} {:>8} {:>8} {:>7}  CPU % of a core: bench / redis / rest of machine",
        "matchmaking",
        "offered/s",
        "tickets/s",
        "p50 ms",
        "p99 ms",
        "backlog",
        "scan ms",
    );
    for backend in ["redis", "memory"] {
        for run in ["target", "saturated"] {
            let m = &r[backend][run];
            if m.is_null() {
                continue;
            }
            let offered = m["offered_per_s"]
                .as_u64()
                .map_or("max".to_owned(), |x| x.to_string());
            println!(
                "{:<20} {:>9} {:>10} {:>8} {:>8} {:>8} {:>7}  {} / {} / {}",
                format!("{backend}, {run}"),
                offered,
                v(&m["tickets_per_s"]),
                v(&m["p50_ms"]),
                v(&m["p99_ms"]),
                v(&m["max_backlog_tickets"]),
                v(&m["sessions_scan_ms"]),
                m["cpu"]["bench_process_pct"],
                m["cpu"]["redis_pct"],
                m["cpu"]["others_pct"],
            );
        }
    }
    println!(
        "\none cycle, step by step (queued → read queue ms, decide ms, µs per match; try_place µs)"
    );
    for backend in ["redis", "memory"] {
        let st = &r[backend]["steps"];
        let cycles: Vec<String> = st["cycles"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        format!(
                            "{} → {}, {}, {}; {}",
                            c["queued"],
                            c["read_queue_ms"],
                            c["decide_ms"],
                            c["per_match_us"],
                            c["try_place_us"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{backend:<7} ping {} µs, claim+publish alone {} µs/match | {}",
            st["store_ping_us"],
            st["claim_publish_alone_us_per_match"],
            cycles.join(" | ")
        );
    }
    print_warm_and_targets(r);
}

fn print_warm_and_targets(r: &serde_json::Value) {
    let w = &r["warm_host"];
    if !w.is_null() {
        println!(
            "queue → matched, warm host ({} matches, {} players, accel {}, paths {}): p50 {} ms, \
             p99 {} ms; activation p50 {} ms, p99 {} ms; the rest (server + link) p50 {} ms, \
             p99 {} ms",
            w["matches"],
            w["players"],
            w["accel"],
            w["paths"],
            w["queue_to_matched_ms"]["p50"],
            w["queue_to_matched_ms"]["p99"],
            w["activation_ms"]["p50"],
            w["activation_ms"]["p99"],
            w["queue_to_matched_minus_activation_ms"]["p50"],
            w["queue_to_matched_minus_activation_ms"]["p99"]
        );
    }
    println!(
        "targets: redis sustains ≥ 5000 tickets/s with p99 ≤ 50 ms at 5000/s offered (met: {}); \
         queue → matched ≤ 100 ms + activation with a warm host (met: {})",
        r["meets_targets"]["matchmaking_redis"], w["meets_target"]
    );
}
