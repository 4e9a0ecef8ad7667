//! `berth-hostd selftest`: a host checks itself end to end, with whatever driver its config
//! names (the nested-Xen test tier runs it in dom0; an operator can run it on a new host).
//!
//! Through the real [`Pool`]: prime the first image's substrate (and its warm clones), activate
//! `sessions` sessions, each with its own identity, reach each one's game port from this host and
//! read the game's `hello` — which must name that session and that VM, so the identity really
//! reached the guest — then destroy them, shut the pool down and look for anything left behind
//! (VMs the driver still sees, files in the state folder).
//!
//! With `runs > 0` it also times activations at driver level on the pool's docked substrate,
//! each until the game answers: restore + activate ("substrate"), activate of a restored paused
//! clone ("warm"), and `cold_runs` cold boots of the image (the template baseline).
//!
//! The report is one JSON object (see [`Report`]); the exit status says whether every check
//! passed.

use crate::config::{HostdConfig, ImageConfig};
use crate::driver::{Vm, VmDriver, VmSpec};
use crate::image::Image;
use crate::pool::{ActivateRequest, Pool, PoolEvent, VmInfo};
use crate::substrate::Substrate;
use crate::util::random_u64;
use anyhow::{anyhow, bail, Context, Result};
use berth_protocol::game::GameAnswer;
use berth_protocol::guest::Identity;
use berth_protocol::{PlayerId, SessionId, VmId};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

/// How long a game port may take to answer after `ready` (under Xen the guest's vif connects
/// only once the domain runs again).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Prime attempts the selftest waits for before it gives up.
const MAX_PRIMES: u32 = 3;

/// Waits (bounded) until the pool starts priming `image` again after a failure.
async fn wait_for_prime_retry(pool: &Pool, image: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let state = pool.status().images.into_iter().find(|i| i.name == image);
        if state.is_some_and(|i| i.substrate != "failed") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sessions activated through the pool.
    pub sessions: usize,
    /// Timed driver-level activations per path (0: none).
    pub runs: usize,
    /// Timed cold boots (only with `runs > 0`).
    pub cold_runs: usize,
}

/// The selftest's findings.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Every check passed.
    pub ok: bool,
    pub driver: String,
    pub accel: String,
    /// The hypervisor as the substrate fingerprint names it.
    pub hypervisor: String,
    pub image: String,
    pub prime: Option<Prime>,
    pub sessions: Vec<SessionCheck>,
    /// VMs the driver still sees and files still in the state folder after shutdown.
    pub leftovers: Vec<String>,
    /// VM failures the pool recorded during the run (a VM that died after activation).
    pub failures: Vec<crate::pool::Failure>,
    /// Primes and sessions that failed and were tried again, and why. The run still passes
    /// when enough of them succeeded: this is what the pool and the server do with a failed
    /// VM, and the nested-Xen tier needs it (see `docs/operations.md`, "Xen").
    pub retried: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bench: Option<Timings>,
    pub total_ms: f64,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prime {
    pub boot_ms: u64,
    pub dock_ms: u64,
    pub state_bytes: u64,
}

/// One session activated through the pool.
#[derive(Debug, Clone, Serialize)]
pub struct SessionCheck {
    pub session_id: SessionId,
    pub vm_id: VmId,
    /// The hypervisor's handle: QEMU's pid or the Xen domid (new on every restore).
    pub domid: u32,
    pub path: crate::pool::ActivationPath,
    pub game_addr: SocketAddr,
    /// The pool's own activation time.
    pub activate_ms: f64,
    /// From the activation request until the game's `hello` arrived.
    pub answer_ms: f64,
    pub answered: bool,
    pub hello: Option<Hello>,
    pub error: Option<String>,
}

/// What the game said it is.
#[derive(Debug, Clone, Serialize)]
pub struct Hello {
    pub session_id: SessionId,
    pub vm_id: VmId,
    pub hostname: String,
}

/// Driver-level timings, ms until the game answered.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Timings {
    pub cold_boot_ms: Vec<f64>,
    pub substrate_ms: Vec<f64>,
    pub warm_ms: Vec<f64>,
}

/// Connects to a game port (retrying while the guest's network comes up) and reads its
/// `hello`.
pub async fn game_hello(addr: SocketAddr, within: Duration) -> Result<Hello> {
    let deadline = Instant::now() + within;
    let stream = loop {
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(stream)) => break stream,
            Ok(Err(e)) if Instant::now() >= deadline => {
                return Err(anyhow!(e).context(format!("connecting to the game at {addr}")))
            }
            Err(_) if Instant::now() >= deadline => {
                bail!("connecting to the game at {addr} timed out")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
        .await
        .with_context(|| format!("no answer from the game at {addr}"))??
        .with_context(|| format!("the game at {addr} closed without a word"))?;
    match serde_json::from_str::<GameAnswer>(&line) {
        Ok(GameAnswer::Hello {
            session_id,
            vm_id,
            hostname,
            ..
        }) => Ok(Hello {
            session_id,
            vm_id,
            hostname,
        }),
        _ => bail!("the game at {addr} said {line:?}, not hello"),
    }
}

fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 10_000.0).round() / 10.0
}

/// Runs the selftest on `config`'s first image with `driver`.
pub async fn run(config: HostdConfig, driver: Arc<dyn VmDriver>, opts: &Options) -> Report {
    let t0 = Instant::now();
    let mut report = Report {
        driver: driver.kind().into(),
        accel: driver.accel(),
        ..Report::default()
    };
    let state_dir = config.state_dir.clone();
    if let Err(e) = cycle(config, driver.clone(), opts, &mut report).await {
        report.errors.push(format!("{e:#}"));
    }
    report.leftovers = driver.leftovers(&state_dir).await;
    report.leftovers.extend(files_under(&state_dir));
    report.ok = report.errors.is_empty()
        && report.leftovers.is_empty()
        && report.prime.is_some()
        && report.sessions.len() == opts.sessions
        && report.sessions.iter().all(|s| s.error.is_none());
    report.total_ms = ms(t0);
    report
}

fn files_under(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(format!("file {}", p.display()));
        }
    }
    out
}

async fn cycle(
    config: HostdConfig,
    driver: Arc<dyn VmDriver>,
    opts: &Options,
    report: &mut Report,
) -> Result<()> {
    let ic = config
        .images
        .first()
        .cloned()
        .context("the config has no [[images]]")?;
    report.image = ic.name.clone();
    let spec = VmSpec {
        image: Image::load(&ic.dir)?,
        config: ic.clone(),
    };
    report.hypervisor = driver.fingerprint(&spec).hypervisor_version;
    let boot_timeout = config.boot_timeout();
    let state_dir = config.state_dir.clone();
    let pool = Pool::start(config, driver.clone()).await?;
    let result = async {
        let mut events = pool.subscribe();
        tracing::info!(image = %ic.name, "selftest: priming");
        wait_primed(&pool, &ic, boot_timeout, report).await?;
        report.prime = docked(&mut events, &pool, &ic.name);
        tracing::info!(prime = ?report.prime, "selftest: docked");
        check_sessions(&pool, &ic.name, opts, boot_timeout, report).await;
        if opts.runs > 0 {
            let sub = Substrate::open(
                &state_dir.join("substrates").join(&ic.name),
                &driver.fingerprint(&spec),
            )?;
            let dir = state_dir.join("selftest");
            let timings = bench(
                &*driver,
                &spec,
                &sub,
                &dir,
                opts,
                boot_timeout,
                &mut report.retried,
            )
            .await?;
            report.bench = Some(timings);
        }
        anyhow::Ok(())
    }
    .await;
    report.failures = pool.status().failures;
    pool.shutdown().await;
    result
}

/// Waits until the pool docked `ic`'s substrate. A prime that fails is retried by the pool
/// itself (30 s later): wait for that too, a bounded number of times, and report every failure.
async fn wait_primed(
    pool: &Pool,
    ic: &ImageConfig,
    boot_timeout: Duration,
    report: &mut Report,
) -> Result<()> {
    let mut primes = 0;
    loop {
        primes += 1;
        match pool
            .wait_ready(
                &ic.name,
                ic.warm,
                boot_timeout * 2 + Duration::from_secs(60),
            )
            .await
        {
            Ok(()) => break,
            Err(e) if primes < MAX_PRIMES => {
                tracing::warn!(error = %e, "selftest: priming failed; the pool primes again");
                report.retried.push(format!("prime {primes}: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                wait_for_prime_retry(pool, &ic.name).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Keeps `sessions` live at once, each answering as itself, then destroys them. A session
/// whose activation or answer fails, or whose VM dies before the end, is reported in
/// `retried` and replaced, up to `sessions` extra attempts.
async fn check_sessions(
    pool: &Pool,
    image: &str,
    opts: &Options,
    boot_timeout: Duration,
    report: &mut Report,
) {
    let mut attempts = 0;
    let mut live: Vec<SessionCheck> = Vec::new();
    while live.len() < opts.sessions && attempts < opts.sessions * 2 {
        attempts += 1;
        let check = activate(pool, image, attempts).await;
        tracing::info!(?check, "selftest: session");
        match &check.error {
            None => live.push(check),
            Some(e) => {
                report.retried.push(format!("{}: {e}", check.session_id));
                if check.domid != 0 {
                    let _ = pool.destroy(check.vm_id.as_str()).await;
                }
                // A failed restore makes the pool prime the substrate again: wait for it.
                if let Err(e) = pool.wait_ready(image, 0, boot_timeout * 2).await {
                    report
                        .retried
                        .push(format!("waiting for the substrate: {e}"));
                }
            }
        }
        if live.len() == opts.sessions {
            let running: Vec<VmId> = pool.status().vms.into_iter().map(|v| v.vm_id).collect();
            live.retain(|c| {
                let alive = running.contains(&c.vm_id);
                if !alive {
                    report.retried.push(format!(
                        "{}: its VM {} was gone before the end",
                        c.session_id, c.vm_id
                    ));
                }
                alive
            });
        }
    }
    for check in live {
        match pool.destroy(check.vm_id.as_str()).await {
            Ok(()) => report.sessions.push(check),
            Err(e) => report.retried.push(format!(
                "{}: destroying {}: {e}: it was gone before the end",
                check.session_id, check.vm_id
            )),
        }
    }
}

/// The prime figures: from the pool's `docked` event, else its status.
fn docked(
    events: &mut tokio::sync::broadcast::Receiver<PoolEvent>,
    pool: &Pool,
    image: &str,
) -> Option<Prime> {
    while let Ok(event) = events.try_recv() {
        if let PoolEvent::Docked { image: i, prime } = event {
            if i == image {
                return Some(Prime {
                    boot_ms: prime.boot_ms,
                    dock_ms: prime.dock_ms,
                    state_bytes: prime.state_bytes,
                });
            }
        }
    }
    let status = pool.status().images.into_iter().find(|i| i.name == image)?;
    Some(Prime {
        boot_ms: status.prime_ms?,
        dock_ms: 0,
        state_bytes: status.substrate_bytes,
    })
}

async fn activate(pool: &Pool, image: &str, n: usize) -> SessionCheck {
    let session_id = SessionId::new(format!("selftest-{n}")).expect("valid id");
    let players: Vec<PlayerId> = [format!("p{n}a"), format!("p{n}b")]
        .into_iter()
        .map(|p| PlayerId::new(p).expect("valid id"))
        .collect();
    let req = ActivateRequest {
        session_id: session_id.clone(),
        image: image.into(),
        teams: players.iter().map(|p| vec![p.clone()]).collect(),
        players,
        params: serde_json::Value::Null,
        ticket_key: String::new(),
        deadline_ms: 0,
    };
    let t = Instant::now();
    let info: VmInfo = match pool.activate(req).await {
        Ok(info) => info,
        Err(e) => {
            return SessionCheck {
                session_id,
                vm_id: VmId::new("none").expect("valid id"),
                domid: 0,
                path: crate::pool::ActivationPath::Substrate,
                game_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                activate_ms: ms(t),
                answer_ms: 0.0,
                answered: false,
                hello: None,
                error: Some(format!("activation: {} ({})", e, e.code())),
            }
        }
    };
    let hello = game_hello(info.game_addr, ANSWER_WITHIN).await;
    let answer_ms = ms(t);
    let error = match &hello {
        Err(e) => Some(format!("{e:#}")),
        Ok(h) if h.session_id != info.session_id || h.vm_id != info.vm_id => Some(format!(
            "the game says it is session {} in VM {}, not session {} in VM {}",
            h.session_id, h.vm_id, info.session_id, info.vm_id
        )),
        Ok(_) => None,
    };
    SessionCheck {
        session_id,
        vm_id: info.vm_id,
        domid: info.pid,
        path: info.path,
        game_addr: info.game_addr,
        activate_ms: info.activate_us as f64 / 1000.0,
        answer_ms,
        answered: hello.is_ok(),
        hello: hello.ok(),
        error,
    }
}

/// A throw-away identity for timed activations: session `bench-<n>`, no players.
pub fn bench_identity(vm_id: &VmId, n: usize) -> Identity {
    Identity {
        teams: vec![],
        session_id: SessionId::new(format!("bench-{n}")).expect("valid id"),
        vm_id: vm_id.clone(),
        hostname: format!("bench-{n}"),
        players: vec![],
        ticket_key: String::new(),
        params: serde_json::Value::Null,
        wall_clock_ms: 0,
        rng_seed: random_u64(),
        deadline_ms: 0,
    }
}

/// Activates `vm` with a fresh identity and waits for its game's hello.
async fn activate_and_answer(vm: &mut Box<dyn Vm>, n: usize, timeout: Duration) -> Result<()> {
    let identity = bench_identity(vm.id(), n);
    vm.activate(identity, timeout).await?;
    let hello = game_hello(vm.game_addr(), ANSWER_WITHIN).await?;
    anyhow::ensure!(
        hello.vm_id == *vm.id(),
        "the game answered as VM {}, not {}",
        hello.vm_id,
        vm.id()
    );
    Ok(())
}

/// Driver-level timings on the docked substrate `sub`; VMs live under `dir`.
async fn bench(
    driver: &dyn VmDriver,
    spec: &VmSpec,
    sub: &Substrate,
    dir: &Path,
    opts: &Options,
    boot_timeout: Duration,
    retried: &mut Vec<String>,
) -> Result<Timings> {
    let ready = Duration::from_secs(60);
    let mut t = Timings::default();
    let mut n = 0;
    // Each timed activation may fail (and is then reported and tried again) at most as many
    // times as there are runs in all.
    let mut budget = opts.runs * 2 + opts.cold_runs;
    while t.substrate_ms.len() < opts.runs || t.warm_ms.len() < opts.runs {
        let warm = t.warm_ms.len() < t.substrate_ms.len();
        n += 1;
        let id = VmId::new(format!("bench-{n}")).expect("valid id");
        let vm_dir: PathBuf = dir.join(id.as_str());
        let timed = async {
            if warm {
                let mut vm = driver.restore(spec, sub, id, &vm_dir).await?;
                vm.prewarm(ready).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let start = Instant::now();
                let done = activate_and_answer(&mut vm, n, ready).await;
                let took = ms(start);
                vm.destroy().await;
                done.map(|()| took)
            } else {
                let start = Instant::now();
                let mut vm = driver.restore(spec, sub, id, &vm_dir).await?;
                let done = activate_and_answer(&mut vm, n, ready).await;
                let took = ms(start);
                vm.destroy().await;
                done.map(|()| took)
            }
        }
        .await;
        let kind = if warm { "warm" } else { "substrate" };
        match timed {
            Ok(took) if warm => t.warm_ms.push(took),
            Ok(took) => t.substrate_ms.push(took),
            Err(e) if budget > 0 => {
                budget -= 1;
                retried.push(format!("timed {kind} activation bench-{n}: {e:#}"));
            }
            Err(e) => return Err(e.context(format!("timed {kind} activation bench-{n}"))),
        }
        tracing::info!(kind, n, "selftest: timed");
    }
    while t.cold_boot_ms.len() < opts.cold_runs {
        n += 1;
        let id = VmId::new(format!("bench-{n}")).expect("valid id");
        let vm_dir: PathBuf = dir.join(id.as_str());
        let start = Instant::now();
        let timed = async {
            let mut vm = driver.cold_boot(spec, id, &vm_dir, boot_timeout).await?;
            let done = activate_and_answer(&mut vm, n, ready).await;
            let took = ms(start);
            vm.destroy().await;
            done.map(|()| took)
        }
        .await;
        match timed {
            Ok(took) => t.cold_boot_ms.push(took),
            Err(e) if budget > 0 => {
                budget -= 1;
                retried.push(format!("cold boot bench-{n}: {e:#}"));
            }
            Err(e) => return Err(e.context(format!("cold boot bench-{n}"))),
        }
        tracing::info!(n, "selftest: cold");
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(t)
}
