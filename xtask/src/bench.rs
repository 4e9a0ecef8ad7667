//! `cargo xtask bench activation`: cold boot vs substrate vs copy-on-write vs warm activation,
//! side by side in one run on the same image, each timed until a TCP client gets the game's
//! answer from inside the VM. Also concurrent activations, per-VM PSS and idle CPU, substrate
//! size, time to prime, and many VMs at once. Writes `target/bench/activation-<image>.json`
//! (and `activation.json`, the latest run), with the image's name and its server's language.
//!
//! With `--driver xen` the same kinds are timed by hostd's Xen driver inside a nested Xen dom0
//! (see `xen.rs`), written to `target/bench/activation-xen.json`.

use anyhow::{Context, Result};
use berth_hostd::config::{AccelChoice, ImageConfig};
use berth_hostd::driver::qemu::{Accel, QemuDriver};
use berth_hostd::driver::{Vm, VmDriver, VmSpec};
use berth_hostd::image::Image;
use berth_hostd::manifest::GameManifest;
use berth_hostd::substrate::Substrate;
use berth_hostd::util::{disk_usage, pss_kib};
use berth_protocol::guest::Identity;
use berth_protocol::VmId;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct ActivationArgs {
    /// The VM driver: qemu on this host, or xen in a nested Xen (QEMU TCG) dom0, where --many
    /// and --accel do not apply.
    #[arg(long, value_enum, default_value = "qemu")]
    pub driver: DriverArg,
    /// Timed runs per activation kind [default: 10 with qemu, 5 with xen].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Cold boots to time (each takes seconds under TCG) [default: 3 with qemu, 2 with xen].
    #[arg(long)]
    pub cold_runs: Option<usize>,
    /// VMs to run at once in the capacity check (0 skips it).
    #[arg(long, default_value_t = 64)]
    pub many: usize,
    /// Accelerator: auto probes KVM with a real boot first.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// The game whose image to measure (`games/<name>` or `tests/games/<name>`).
    #[arg(long, default_value = "arena")]
    pub image: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverArg {
    Qemu,
    Xen,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AccelArg {
    Auto,
    Tcg,
    Kvm,
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    json!({
        "p50": round(percentile(&v, 50.0)),
        "p99": round(percentile(&v, 99.0)),
        "min": round(v.first().copied().unwrap_or(f64::NAN)),
        "max": round(v.last().copied().unwrap_or(f64::NAN)),
        "n": v.len(),
    })
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

struct Bench {
    driver: QemuDriver,
    answer: Answer,
    dir: PathBuf,
    n: u64,
}

fn identity(vm_id: &VmId, n: u64) -> Identity {
    berth_hostd::selftest::bench_identity(vm_id, n as usize)
}

/// How an activation is known to have reached the game.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// The arena's `hello` on connect, naming the session (the selftest's check, which
    /// retries the connect while the guest's network comes up).
    Hello,
    /// Any other game: its port accepts a connection (it has been `ready` already).
    Accepts,
}

impl Answer {
    fn of(game: &str) -> Answer {
        if game == "arena" {
            Answer::Hello
        } else {
            Answer::Accepts
        }
    }
}

async fn game_answer(addr: std::net::SocketAddr, answer: Answer) -> Result<()> {
    match answer {
        Answer::Hello => {
            berth_hostd::selftest::game_hello(addr, Duration::from_secs(20)).await?;
        }
        Answer::Accepts => {
            tokio::time::timeout(
                Duration::from_secs(20),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .with_context(|| format!("the game at {addr} accepted no connection"))??;
        }
    }
    Ok(())
}

impl Bench {
    fn next(&mut self) -> (VmId, PathBuf) {
        self.n += 1;
        let id = VmId::new(format!("b{}", self.n)).expect("valid id");
        let dir = self.dir.join("vms").join(id.as_str());
        (id, dir)
    }

    async fn restore(&mut self, spec: &VmSpec, sub: &Substrate) -> Result<Box<dyn Vm>> {
        let (id, dir) = self.next();
        Ok(self.driver.restore(spec, sub, id, &dir).await?)
    }

    /// Restore (unless `warm` is given) + activate + game answer, in ms.
    async fn activation(
        &mut self,
        spec: &VmSpec,
        sub: &Substrate,
        warm: Option<Box<dyn Vm>>,
    ) -> Result<(f64, Box<dyn Vm>)> {
        let t0 = Instant::now();
        let mut vm = match warm {
            Some(vm) => vm,
            None => self.restore(spec, sub).await?,
        };
        let id = identity(vm.id(), self.n);
        vm.activate(id, Duration::from_secs(30)).await?;
        game_answer(vm.game_addr(), self.answer).await?;
        Ok((t0.elapsed().as_secs_f64() * 1000.0, vm))
    }

    async fn cold(&mut self, spec: &VmSpec) -> Result<f64> {
        let t0 = Instant::now();
        let (id, dir) = self.next();
        let mut vm = self
            .driver
            .cold_boot(spec, id, &dir, Duration::from_secs(120))
            .await?;
        let ident = identity(vm.id(), self.n);
        vm.activate(ident, Duration::from_secs(30)).await?;
        game_answer(vm.game_addr(), self.answer).await?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        vm.destroy().await;
        Ok(ms)
    }

    /// `k` activations at once from the substrate; ms until every VM answered.
    async fn concurrent(
        &mut self,
        spec: &VmSpec,
        sub: &Substrate,
        k: usize,
    ) -> Result<(f64, Vec<Box<dyn Vm>>)> {
        let t0 = Instant::now();
        let mut jobs = Vec::new();
        for _ in 0..k {
            let (id, dir) = self.next();
            let n = self.n;
            let driver = self.driver.clone();
            let (spec, sub, answer) = (spec.clone(), sub.clone(), self.answer);
            jobs.push(tokio::spawn(async move {
                let mut vm = driver.restore(&spec, &sub, id, &dir).await?;
                let ident = identity(vm.id(), n);
                vm.activate(ident, Duration::from_secs(60)).await?;
                game_answer(vm.game_addr(), answer).await?;
                anyhow::Ok(vm)
            }));
        }
        let mut vms = Vec::new();
        let mut first_err = None;
        for j in jobs {
            match j.await? {
                Ok(vm) => vms.push(vm),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if let Some(e) = first_err {
            destroy_all(vms).await;
            return Err(e);
        }
        Ok((ms, vms))
    }
}

async fn destroy_all(vms: Vec<Box<dyn Vm>>) {
    for vm in vms {
        vm.destroy().await;
    }
}

/// CPU ticks (utime + stime) of a process.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

pub async fn activation(args: ActivationArgs) -> Result<()> {
    let game = crate::image::game_manifest(&args.image)?;
    crate::image::build()?;
    let root = crate::image::root();
    let image = Image::load(&crate::image::image_dir_of(&game.name))?;
    let manifest = image.manifest.clone();
    let dir = PathBuf::from(format!("/dev/shm/berth-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("vms"))?;
    let result = run(&args, image, &game, &dir).await;
    berth_hostd::util::kill_processes_naming(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = result?;
    report["image_digest"] = json!(manifest.digest);
    report["image"] = json!(game.name);
    report["language"] = json!(game.language);
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    // `activation.json` stays the arena's: the figures compared from run to run.
    let mut names = vec![format!("activation-{}.json", game.name)];
    if game.name == "arena" {
        names.push("activation.json".into());
    }
    for name in names {
        let path = out.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The two substrate kinds of the bench, primed: copy-on-write and full copy.
struct Primed {
    cow_spec: VmSpec,
    full_spec: VmSpec,
    cow_sub: Substrate,
    full_sub: Substrate,
    prime_ms: f64,
    substrate_mib: f64,
    full_substrate_mib: f64,
}

/// Time per activation kind, ms.
#[derive(Default)]
struct Sequential {
    cold: Vec<f64>,
    full: Vec<f64>,
    cow: Vec<f64>,
    warm: Vec<f64>,
}

/// Concurrent activations and what 16 idle clones cost.
struct Concurrency {
    c4_ms: f64,
    c16_ms: f64,
    pss_mean_mib: f64,
    idle_cpu_pct: f64,
}

/// How many VMs ran at once.
#[derive(Default)]
struct Many {
    ok: usize,
    failed: usize,
    ms: f64,
}

async fn run(
    args: &ActivationArgs,
    image: Image,
    game: &GameManifest,
    dir: &Path,
) -> Result<serde_json::Value> {
    let memory_mib = game.resources.memory_mib;
    let runs = args.runs.unwrap_or(10);
    let cold_runs = args.cold_runs.unwrap_or(3);
    let cfg = |name: &str, cow: bool| VmSpec {
        image: image.clone(),
        config: ImageConfig {
            name: name.into(),
            dir: image.dir.clone(),
            manifest: None,
            memory_mib,
            vcpus: 1,
            balloon_mib: None,
            warm: 0,
            cow,
            cmdline: None,
        },
    };
    let (cow_spec, full_spec) = (cfg("cow", true), cfg("full", false));
    let accel = choose_accel(args.accel, &image, &cow_spec, dir).await;
    let driver = QemuDriver::new("qemu-system-x86_64".into(), accel).await?;
    eprintln!("bench: accel {}, QEMU {}", accel.as_str(), driver.version());
    let mut b = Bench {
        driver,
        answer: Answer::of(&game.name),
        dir: dir.to_path_buf(),
        n: 0,
    };
    let primed = b.prime(cow_spec, full_spec).await?;
    let seq = b.sequential(&primed, runs, cold_runs).await?;
    let conc = b.concurrency(&primed).await?;
    let many = b.many(&primed, args.many).await;
    let report = report(args, &b, accel, &primed, &seq, &conc, &many);
    print_table(&report);
    Ok(report)
}

async fn choose_accel(arg: AccelArg, image: &Image, spec: &VmSpec, dir: &Path) -> Accel {
    let choice = match arg {
        AccelArg::Auto => AccelChoice::Auto,
        AccelArg::Tcg => AccelChoice::Tcg,
        AccelArg::Kvm => AccelChoice::Kvm,
    };
    eprintln!("bench: choosing the accelerator ({choice:?})");
    berth_hostd::accel::choose(
        choice,
        Path::new("qemu-system-x86_64"),
        Some((image, &spec.config)),
        dir,
        Duration::from_secs(15),
    )
    .await
}

fn report(
    args: &ActivationArgs,
    b: &Bench,
    accel: Accel,
    primed: &Primed,
    seq: &Sequential,
    conc: &Concurrency,
    many: &Many,
) -> serde_json::Value {
    let p50 = |v: &Vec<f64>| {
        let mut s = v.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        percentile(&s, 50.0)
    };
    json!({
        "accel": accel.as_str(),
        "qemu": b.driver.version(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "guest_memory_mib": 128,
        "runs": seq.full.len(),
        "cold_boot_ms": summary(seq.cold.clone()),
        "substrate_ms": summary(seq.full.clone()),
        "cow_ms": summary(seq.cow.clone()),
        "warm_ms": summary(seq.warm.clone()),
        "cold_over_substrate": round(p50(&seq.cold) / p50(&seq.full)),
        "cold_over_cow": round(p50(&seq.cold) / p50(&seq.cow)),
        "concurrent4_all_ready_ms": round(conc.c4_ms),
        "concurrent16_all_ready_ms": round(conc.c16_ms),
        "pss_mib_per_cow_vm": round(conc.pss_mean_mib),
        "idle_cpu_pct_per_vm": round(conc.idle_cpu_pct),
        "substrate_mib": round(primed.substrate_mib),
        "full_substrate_mib": round(primed.full_substrate_mib),
        "substrate_state_kib": round(primed.cow_sub.header.state_bytes as f64 / 1024.0),
        "prime_ms": round(primed.prime_ms),
        "many_vms": {"target": args.many, "answered": many.ok, "failed": many.failed, "ms": round(many.ms)},
    })
}

impl Bench {
    /// Priming (the template boot) for both substrate kinds.
    async fn prime(&mut self, cow_spec: VmSpec, full_spec: VmSpec) -> Result<Primed> {
        let cow_dir = self.dir.join("substrates/cow");
        let full_dir = self.dir.join("substrates/full");
        let t = Instant::now();
        let prime = self
            .driver
            .prime(&cow_spec, &cow_dir, Duration::from_secs(120))
            .await?;
        let prime_ms = t.elapsed().as_secs_f64() * 1000.0;
        self.driver
            .prime(&full_spec, &full_dir, Duration::from_secs(120))
            .await?;
        eprintln!(
            "bench: primed in {prime_ms:.0} ms (boot {} ms, dock {} ms)",
            prime.boot_ms, prime.dock_ms
        );
        Ok(Primed {
            cow_sub: Substrate::open(&cow_dir, &self.driver.fingerprint(&cow_spec))?,
            full_sub: Substrate::open(&full_dir, &self.driver.fingerprint(&full_spec))?,
            cow_spec,
            full_spec,
            prime_ms,
            substrate_mib: disk_usage(&cow_dir) as f64 / 1048576.0,
            full_substrate_mib: disk_usage(&full_dir) as f64 / 1048576.0,
        })
    }

    /// Cold boots, then `runs` rounds of full-copy, copy-on-write and warm activations.
    async fn sequential(
        &mut self,
        p: &Primed,
        runs: usize,
        cold_runs: usize,
    ) -> Result<Sequential> {
        let mut t = Sequential::default();
        for i in 0..cold_runs {
            t.cold.push(self.cold(&p.cow_spec).await?);
            eprintln!(
                "bench: cold boot {}/{}: {:.0} ms",
                i + 1,
                cold_runs,
                t.cold[i]
            );
        }
        for _ in 0..runs {
            let (ms, vm) = self.activation(&p.full_spec, &p.full_sub, None).await?;
            t.full.push(ms);
            vm.destroy().await;
            let (ms, vm) = self.activation(&p.cow_spec, &p.cow_sub, None).await?;
            t.cow.push(ms);
            vm.destroy().await;
            // The warm tier as the pool keeps it: restored, pre-warmed, paused.
            let mut paused = self.restore(&p.cow_spec, &p.cow_sub).await?;
            paused.prewarm(Duration::from_secs(30)).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (ms, vm) = self
                .activation(&p.cow_spec, &p.cow_sub, Some(paused))
                .await?;
            t.warm.push(ms);
            vm.destroy().await;
        }
        eprintln!("bench: sequential activations done");
        Ok(t)
    }

    /// 4 and 16 at once, then the idle cost of the 16: PSS and CPU over a few seconds.
    async fn concurrency(&mut self, p: &Primed) -> Result<Concurrency> {
        let (c4_ms, vms) = self.concurrent(&p.cow_spec, &p.cow_sub, 4).await?;
        destroy_all(vms).await;
        let (c16_ms, vms) = self.concurrent(&p.cow_spec, &p.cow_sub, 16).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pss: Vec<f64> = vms
            .iter()
            .filter_map(|v| pss_kib(v.pid()))
            .map(|k| k as f64 / 1024.0)
            .collect();
        let pss_mean_mib = pss.iter().sum::<f64>() / pss.len().max(1) as f64;
        let ticks0: u64 = vms.iter().map(|v| cpu_ticks(v.pid())).sum();
        let window = Duration::from_secs(5);
        tokio::time::sleep(window).await;
        let ticks1: u64 = vms.iter().map(|v| cpu_ticks(v.pid())).sum();
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let idle_cpu_pct =
            (ticks1 - ticks0) as f64 / hz / window.as_secs_f64() * 100.0 / vms.len() as f64;
        destroy_all(vms).await;
        eprintln!("bench: concurrency done");
        Ok(Concurrency {
            c4_ms,
            c16_ms,
            pss_mean_mib,
            idle_cpu_pct,
        })
    }

    /// Many at once: activate in waves of 8 until `many` run, then check each answers.
    async fn many(&mut self, p: &Primed, many: usize) -> Many {
        let mut m = Many::default();
        if many == 0 {
            return m;
        }
        let t = Instant::now();
        let mut all = Vec::new();
        while all.len() + m.failed < many {
            let k = 8.min(many - all.len() - m.failed);
            match self.concurrent(&p.cow_spec, &p.cow_sub, k).await {
                Ok((_, vms)) => all.extend(vms),
                Err(e) => {
                    eprintln!("bench: wave failed: {e:#}");
                    m.failed += k;
                }
            }
        }
        m.ms = t.elapsed().as_secs_f64() * 1000.0;
        for vm in &all {
            match game_answer(vm.game_addr(), self.answer).await {
                Ok(()) => m.ok += 1,
                Err(_) => m.failed += 1,
            }
        }
        destroy_all(all).await;
        eprintln!("bench: {} VMs ran at once, {} failed", m.ok, m.failed);
        m
    }
}

fn print_table(r: &serde_json::Value) {
    println!(
        "\nactivation benchmark — accel {}, QEMU {}, {} CPUs, 128 MiB guest",
        r["accel"], r["qemu"], r["cpus"]
    );
    println!(
        "{:<34} {:>10} {:>10}",
        "until the game answers", "p50 ms", "p99 ms"
    );
    for (k, label) in [
        ("cold_boot_ms", "cold boot (template baseline)"),
        ("substrate_ms", "substrate (RAM copied)"),
        ("cow_ms", "substrate, copy-on-write clone"),
        ("warm_ms", "warm clone (identity + cont)"),
    ] {
        println!("{:<34} {:>10} {:>10}", label, r[k]["p50"], r[k]["p99"]);
    }
    println!(
        "cold ÷ substrate: {}   cold ÷ CoW: {}",
        r["cold_over_substrate"], r["cold_over_cow"]
    );
    println!(
        "4 at once: {} ms   16 at once: {} ms",
        r["concurrent4_all_ready_ms"], r["concurrent16_all_ready_ms"]
    );
    println!(
        "PSS per idle CoW VM: {} MiB   idle CPU per VM: {} % of a core",
        r["pss_mib_per_cow_vm"], r["idle_cpu_pct_per_vm"]
    );
    println!(
        "substrate in /dev/shm: {} MiB (full-copy kind: {} MiB; state file {} KiB)   prime: {} ms",
        r["substrate_mib"], r["full_substrate_mib"], r["substrate_state_kib"], r["prime_ms"]
    );
    println!("many VMs at once: {}", r["many_vms"]);
}
