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
use crate::redis::{free_port, RedisServer};
use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

const SECRET: &str = "chaos-secret-0123456789abcdef";
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
    let mut stack = Stack::start().await?;
    let swarms = stack.swarms(&args)?;
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

// ---------------------------------------------------------------------------------------------
// Processes

/// One child process of the run, restartable, its output appended to a log file; killed on
/// drop. Tracks its peak RSS across restarts.
struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<std::process::Child>,
    peak_kib: u64,
}

impl Proc {
    fn start(name: &str, program: PathBuf, args: Vec<String>, dir: &Path) -> Result<Proc> {
        let mut p = Proc {
            name: name.into(),
            program,
            args,
            log: dir.join(format!("{name}.log")),
            child: None,
            peak_kib: 0,
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = std::process::Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<nix::unistd::Pid> {
        self.child
            .as_ref()
            .map(|c| nix::unistd::Pid::from_raw(c.id() as i32))
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("not running")?;
        nix::sys::signal::kill(pid, signal).with_context(|| format!("{signal} to {}", self.name))
    }

    fn sample(&mut self) {
        if let Some(kib) = self
            .child
            .as_ref()
            .and_then(|c| crate::bench_server::status_kib(c.id(), "VmHWM"))
        {
            self.peak_kib = self.peak_kib.max(kib);
        }
    }

    /// SIGKILL, reaped.
    fn kill9(&mut self) {
        self.sample();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for it to exit by itself within `within`, else kills it; its exit status.
    fn wait(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().context("not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill9();
                bail!("{} did not exit within {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then [`Proc::wait`].
    fn stop(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        self.sample();
        self.signal(Signal::SIGTERM)?;
        self.wait(within)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn bin(name: &str) -> PathBuf {
    image::root().join("target/debug").join(name)
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

// ---------------------------------------------------------------------------------------------
// The stack

struct Stack {
    dir: PathBuf,
    redis: RedisServer,
    replicas: Vec<Proc>,
    /// `127.0.0.1:PORT` of each replica.
    addrs: Vec<String>,
    hostds: Vec<Proc>,
    controls: Vec<String>,
    state_dirs: Vec<PathBuf>,
    http: reqwest::Client,
    admin: String,
    auth: berth_server::auth::Auth,
}

/// A swarm process and where it writes its report.
struct Swarm {
    proc: Proc,
    report: PathBuf,
}

impl Swarm {
    fn wait(&mut self, within: Duration) -> Result<()> {
        let status = self.proc.wait(within)?;
        // berth-sim exits non-zero when matches failed; the report says which.
        eprintln!("chaos: {} exited: {status}", self.proc.name);
        Ok(())
    }
}

impl Stack {
    async fn start() -> Result<Stack> {
        let dir = image::root().join("target/chaos");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("modes"))?;
        std::fs::write(dir.join("modes/chaos.toml"), chaos_mode().toml())?;
        std::fs::write(
            dir.join("server.toml"),
            format!(
                "[auth]\nsecret = \"{SECRET}\"\ndev_tokens = true\n\n[timeouts]\n\
                 host_heartbeat_ms = 1000\nhost_lost_ms = 3000\nhost_grace_ms = 30000\n\
                 shutdown_delay_ms = 300\n"
            ),
        )?;
        let redis = RedisServer::start_persistent()?;
        eprintln!("chaos: redis (AOF) at {}", redis.url);
        let mut config = berth_server::config::ServerConfig::default();
        config.auth.secret = SECRET.into();
        let auth = berth_server::auth::Auth::new(&config.auth)?;
        let admin = auth.mint("chaos", berth_server::auth::Role::Admin, 24 * 3600)?;
        let mut stack = Stack {
            dir,
            redis,
            replicas: Vec::new(),
            addrs: Vec::new(),
            hostds: Vec::new(),
            controls: Vec::new(),
            state_dirs: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            admin,
            auth,
        };
        for name in ["r1", "r2"] {
            stack.start_replica(name)?;
        }
        for i in 0..HOSTS.len() {
            stack.start_hostd(i)?;
        }
        stack
            .healthy(Duration::from_secs(300))
            .await
            .context("the stack never came up")?;
        eprintln!("chaos: 2 replicas, 2 hosts up with docked substrates");
        Ok(stack)
    }

    fn start_replica(&mut self, name: &str) -> Result<()> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let args = vec![
            "--config".into(),
            self.dir.join("server.toml").display().to_string(),
            "run".into(),
            "--listen".into(),
            addr.clone(),
            "--redis".into(),
            self.redis.url.clone(),
            "--modes".into(),
            self.dir.join("modes").display().to_string(),
        ];
        self.replicas
            .push(Proc::start(name, bin("berth-server"), args, &self.dir)?);
        self.addrs.push(addr);
        Ok(())
    }

    fn start_hostd(&mut self, i: usize) -> Result<()> {
        let host = HOSTS[i];
        let state = PathBuf::from(format!("/dev/shm/berth-{host}"));
        let _ = std::fs::remove_dir_all(&state);
        let (control, gateway) = (free_port()?, free_port()?);
        // Each host starts on a different replica.
        let mut urls: Vec<String> = self
            .addrs
            .iter()
            .map(|a| format!("\"ws://{a}/v1/hosts\""))
            .collect();
        let n = urls.len();
        urls.rotate_left(i % n);
        let token = self
            .auth
            .mint(host, berth_server::auth::Role::Host, 24 * 3600)?;
        let config = format!(
            "host_id = \"{host}\"\nstate_dir = \"{}\"\ncontrol = \"127.0.0.1:{control}\"\n\
             accel = \"tcg\"\nmax_vms = 12\ndrain_timeout_s = 60\n\n\
             [[images]]\nname = \"arena\"\ndir = \"{}\"\nwarm = 2\n\n\
             [gateway]\nlisten = \"127.0.0.1:{gateway}\"\n\n\
             [server]\nurl = [{}]\ntoken = \"{token}\"\n\
             gateway = \"ws://127.0.0.1:{gateway}/v1/game\"\nreconnect_max_s = 2\n",
            state.display(),
            image::image_dir().display(),
            urls.join(", "),
        );
        let path = self.dir.join(format!("{host}.toml"));
        std::fs::write(&path, config)?;
        let args = vec!["run".into(), "--config".into(), path.display().to_string()];
        self.hostds
            .push(Proc::start(host, bin("berth-hostd"), args, &self.dir)?);
        self.controls.push(format!("http://127.0.0.1:{control}"));
        self.state_dirs.push(state);
        Ok(())
    }

    /// The two swarms, each knowing both replicas (in a different order).
    fn swarms(&self, args: &ChaosArgs) -> Result<Vec<Swarm>> {
        let mut out = Vec::new();
        for (i, prefix) in ["a", "b"].into_iter().enumerate() {
            let mut servers: Vec<String> =
                self.addrs.iter().map(|a| format!("http://{a}")).collect();
            servers.rotate_left(i);
            let report = self.dir.join(format!("swarm-{prefix}.json"));
            let players = (args.players / 2).max(2);
            let a = [
                "--server",
                &servers.join(","),
                "--players",
                &players.to_string(),
                "--ramp",
                "10s",
                "--duration",
                &format!("{}s", args.duration.as_secs()),
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
                &(i + 1).to_string(),
                // The mode's max wait (60 s) plus the reconnect grace (30 s), and some.
                "--queue-timeout",
                "100s",
                "--quiet",
                "--json",
            ];
            let mut a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            a.push(report.display().to_string());
            let proc = Proc::start(&format!("swarm-{prefix}"), bin("berth-sim"), a, &self.dir)?;
            out.push(Swarm { proc, report });
        }
        Ok(out)
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response> {
        Ok(self.http.get(url).bearer_auth(&self.admin).send().await?)
    }

    /// `GET /v1/admin/PATH` from the first replica that answers.
    async fn admin_get(&self, path: &str) -> Result<Value> {
        for a in &self.addrs {
            if let Ok(r) = self.get(&format!("http://{a}/v1/admin/{path}")).await {
                if r.status().is_success() {
                    return Ok(r.json().await?);
                }
            }
        }
        bail!("no replica answered /v1/admin/{path}")
    }

    async fn admin_post(&self, path: &str) -> Result<()> {
        for a in &self.addrs {
            let url = format!("http://{a}/v1/admin/{path}");
            if let Ok(r) = self.http.post(&url).bearer_auth(&self.admin).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
        }
        bail!("no replica took POST /v1/admin/{path}")
    }

    /// Both replicas ready, both hosts up with a docked substrate, within `within`.
    async fn healthy(&self, within: Duration) -> Result<Duration> {
        let t = Instant::now();
        loop {
            if self.is_healthy().await {
                return Ok(t.elapsed());
            }
            if t.elapsed() > within {
                bail!("not healthy within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn is_healthy(&self) -> bool {
        for a in &self.addrs {
            match self.http.get(format!("http://{a}/readyz")).send().await {
                Ok(r) if r.status().is_success() => {}
                _ => return false,
            }
        }
        let Ok(Value::Array(hosts)) = self.admin_get("hosts").await else {
            return false;
        };
        let up = |h: &Value| {
            h["state"] == "up"
                && h["images"]
                    .as_array()
                    .is_some_and(|i| i.iter().any(|i| i["docked"] == true))
        };
        hosts.iter().filter(|h| up(h)).count() == HOSTS.len()
    }
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

// ---------------------------------------------------------------------------------------------
// Counting

impl Stack {
    /// Waits (up to 90 s) until no session is live; returns those still live then.
    async fn settle(&self) -> Result<u64> {
        let t = Instant::now();
        loop {
            let live = ["placing", "activating", "active", "ending"];
            let mut n = 0;
            for state in live {
                let page = self
                    .admin_get(&format!("sessions?state={state}&limit=1000"))
                    .await?;
                n += page.as_array().map_or(0, |a| a.len()) as u64;
            }
            if n == 0 || t.elapsed() > Duration::from_secs(90) {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Every session the store holds, with its end reason and results.
    async fn sessions(&self) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        loop {
            let page = self
                .admin_get(&format!("sessions?limit=1000&offset={}", out.len()))
                .await?;
            let rows = page.as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                return Ok(out);
            }
            out.extend(rows);
        }
    }

    /// Stops the hosts (SIGTERM: nothing is live, so no drain wait), then the replicas, and
    /// looks for what is left: QEMU processes and files of the hosts' state folders. Whatever
    /// is found is counted, then removed.
    fn stop(&mut self) -> Result<(Value, Value)> {
        let mut exits = Vec::new();
        for p in self.hostds.iter_mut().chain(self.replicas.iter_mut()) {
            let status = p.stop(Duration::from_secs(90));
            exits.push(json!({"process": p.name, "exit": format!("{status:?}")}));
        }
        let leaked_vms = qemu_of(&self.state_dirs);
        let leaked_files: usize = self.state_dirs.iter().map(|d| files_under(d)).sum();
        for pid in &leaked_vms {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
        }
        for d in &self.state_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let panics = self.panics();
        let peak = |ps: &[Proc]| ps.iter().map(|p| p.peak_kib).max().unwrap_or(0) / 1024;
        let rss = json!({"server": peak(&self.replicas), "hostd": peak(&self.hostds)});
        let leaks = json!({
            "leaked_vms": leaked_vms.len(),
            "leaked_files": leaked_files,
            "panics": panics,
            "exits": exits,
        });
        Ok((leaks, rss))
    }

    /// Lines saying `panicked at` in every process's log.
    fn panics(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .map(|e| {
                        std::fs::read_to_string(e.path())
                            .unwrap_or_default()
                            .matches("panicked at")
                            .count()
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// QEMU processes whose command line names one of `dirs`.
fn qemu_of(dirs: &[PathBuf]) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("qemu-system") && dirs.iter().any(|d| cmd.contains(&*d.to_string_lossy()))
        })
        .collect()
}

/// Files (not folders) under `dir`, recursively.
fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => files_under(&e.path()),
                    _ => 1,
                })
                .sum()
        })
        .unwrap_or(0)
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
    let must_be_zero = [
        "stranded",
        "results_lost",
        "matches_killed",
        "stuck_sessions",
        "leaked_vms",
        "leaked_files",
        "panics",
    ];
    let bad: Vec<String> = must_be_zero
        .iter()
        .filter(|k| r[**k].as_u64() != Some(0))
        .map(|k| format!("{k} = {}", r[*k]))
        .collect();
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
