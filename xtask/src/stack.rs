//! The stack as separate processes, for `cargo xtask chaos` and `cargo xtask fleet`: Redis with
//! an fsync'd append-only file, `berth-server` replicas on it, `berth-hostd`s with real VMs (on
//! loopback, or each in its own network namespace at its own address), `berth-sim` swarms; an
//! admin client to read and steer it; and, at the end, a count of what was left behind (QEMU
//! processes, files in the hosts' state folders, panics in the logs).

use crate::image;
use crate::redis::{free_port, RedisServer};
use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Processes

/// One child process of the run, restartable, its output appended to a log file; killed on
/// drop. Tracks its peak RSS across restarts.
pub(crate) struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<std::process::Child>,
    pub peak_kib: u64,
}

impl Proc {
    pub(crate) fn start(
        name: &str,
        program: PathBuf,
        args: Vec<String>,
        dir: &Path,
    ) -> Result<Proc> {
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

    pub(crate) fn spawn(&mut self) -> Result<()> {
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

    pub(crate) fn pid(&self) -> Option<nix::unistd::Pid> {
        self.child
            .as_ref()
            .map(|c| nix::unistd::Pid::from_raw(c.id() as i32))
    }

    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("not running")?;
        nix::sys::signal::kill(pid, signal).with_context(|| format!("{signal} to {}", self.name))
    }

    pub(crate) fn sample(&mut self) {
        if let Some(kib) = self
            .child
            .as_ref()
            .and_then(|c| crate::bench_server::status_kib(c.id(), "VmHWM"))
        {
            self.peak_kib = self.peak_kib.max(kib);
        }
    }

    /// SIGKILL, reaped.
    pub(crate) fn kill9(&mut self) {
        self.sample();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for it to exit by itself within `within`, else kills it; its exit status.
    pub(crate) fn wait(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
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
    pub(crate) fn stop(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
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

pub(crate) fn bin(name: &str) -> PathBuf {
    image::root().join("target/debug").join(name)
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

// ---------------------------------------------------------------------------------------------
// The stack

/// Where a hostd runs: on loopback with free ports, or in a network namespace of the fleet's
/// bed at its own address (control on port 7070, gateway on 7071).
#[derive(Debug, Clone)]
pub(crate) enum Place {
    Loopback,
    Namespace { ns: String, ip: std::net::Ipv4Addr },
}

/// One hostd of the stack.
#[derive(Debug, Clone)]
pub(crate) struct HostSpec {
    pub name: String,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub place: Place,
    /// Warm clones it keeps, and the most VMs it runs.
    pub warm: u32,
    pub max_vms: u32,
}

/// What [`Stack::start`] brings up.
pub(crate) struct StackSpec {
    /// Its folder under `target/` (configs, logs, reports), emptied first.
    pub dir: PathBuf,
    /// How its log lines start (`chaos`, `fleet`).
    pub tag: &'static str,
    /// The replicas listen here (loopback, or the bed's bridge address).
    pub listen_ip: std::net::IpAddr,
    pub replicas: usize,
    pub hosts: Vec<HostSpec>,
    /// The one game mode, by name.
    pub mode: (&'static str, berth_testkit::fixtures::TestMode),
}

/// Redis with an fsync'd append-only file, `berth-server` replicas on it and `berth-hostd`s
/// with real VMs (each knowing every replica), as separate processes; an admin client.
pub(crate) struct Stack {
    pub dir: PathBuf,
    pub tag: &'static str,
    pub redis: RedisServer,
    pub replicas: Vec<Proc>,
    /// `IP:PORT` of each replica.
    pub addrs: Vec<String>,
    pub hosts: Vec<HostSpec>,
    pub hostds: Vec<Proc>,
    pub controls: Vec<String>,
    pub state_dirs: Vec<PathBuf>,
    pub http: reqwest::Client,
    pub admin: String,
    pub auth: berth_server::auth::Auth,
    listen_ip: std::net::IpAddr,
}

/// A swarm process and where it writes its report.
pub(crate) struct Swarm {
    pub proc: Proc,
    pub report: PathBuf,
}

impl Swarm {
    pub fn wait(&mut self, within: Duration) -> Result<()> {
        let status = self.proc.wait(within)?;
        // berth-sim exits non-zero when matches failed; the report says which.
        eprintln!("{} exited: {status}", self.proc.name);
        Ok(())
    }
}

const SECRET: &str = "stack-secret-0123456789abcdef";

impl Stack {
    pub async fn start(spec: StackSpec) -> Result<Stack> {
        let dir = spec.dir;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("modes"))?;
        let (mode, test_mode) = spec.mode;
        std::fs::write(dir.join(format!("modes/{mode}.toml")), test_mode.toml())?;
        std::fs::write(
            dir.join("server.toml"),
            format!(
                "[auth]\nsecret = \"{SECRET}\"\ndev_tokens = true\n\n[timeouts]\n\
                 host_heartbeat_ms = 1000\nhost_lost_ms = 3000\nhost_grace_ms = 30000\n\
                 shutdown_delay_ms = 300\n"
            ),
        )?;
        let redis = RedisServer::start_persistent()?;
        eprintln!("{}: redis (AOF) at {}", spec.tag, redis.url);
        let mut config = berth_server::config::ServerConfig::default();
        config.auth.secret = SECRET.into();
        let auth = berth_server::auth::Auth::new(&config.auth)?;
        let admin = auth.mint("stack", berth_server::auth::Role::Admin, 24 * 3600)?;
        let mut stack = Stack {
            dir,
            tag: spec.tag,
            redis,
            replicas: Vec::new(),
            addrs: Vec::new(),
            hosts: spec.hosts,
            hostds: Vec::new(),
            controls: Vec::new(),
            state_dirs: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            admin,
            auth,
            listen_ip: spec.listen_ip,
        };
        for i in 0..spec.replicas {
            stack.start_replica(&format!("r{}", i + 1))?;
        }
        for i in 0..stack.hosts.len() {
            stack.start_hostd(i)?;
        }
        stack
            .healthy(Duration::from_secs(300))
            .await
            .context("the stack never came up")?;
        eprintln!(
            "{}: {} replicas, {} hosts up with docked substrates",
            stack.tag,
            stack.addrs.len(),
            stack.hosts.len()
        );
        Ok(stack)
    }

    fn start_replica(&mut self, name: &str) -> Result<()> {
        let addr = std::net::SocketAddr::new(self.listen_ip, free_port()?).to_string();
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
        let spec = self.hosts[i].clone();
        let host = spec.name.as_str();
        let state = PathBuf::from(format!("/dev/shm/berth-{host}"));
        let _ = std::fs::remove_dir_all(&state);
        let (ip, control, gateway) = match &spec.place {
            Place::Loopback => ("127.0.0.1".to_owned(), free_port()?, free_port()?),
            Place::Namespace { ip, .. } => (ip.to_string(), 7070, 7071),
        };
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
        let names = |key: &str, v: &Option<String>| {
            v.as_ref()
                .map(|v| format!("{key} = \"{v}\"\n"))
                .unwrap_or_default()
        };
        // Hosts on their own addresses serve each other substrates and take moved sessions.
        let peer = match &spec.place {
            Place::Loopback => String::new(),
            Place::Namespace { ip, .. } => format!("[peer]\nlisten = \"{ip}:7072\"\n\n"),
        };
        let config = format!(
            "host_id = \"{host}\"\n{}{}state_dir = \"{}\"\ncontrol = \"{ip}:{control}\"\n\
             accel = \"tcg\"\nmax_vms = {}\ndrain_timeout_s = 60\n\n\
             [[images]]\nname = \"arena\"\ndir = \"{}\"\nwarm = {}\n\n\
             [gateway]\nlisten = \"{ip}:{gateway}\"\n\n{peer}\
             [server]\nurl = [{}]\ntoken = \"{token}\"\n\
             gateway = \"ws://{ip}:{gateway}/v1/game\"\nreconnect_max_s = 2\n",
            names("region", &spec.region),
            names("zone", &spec.zone),
            state.display(),
            spec.max_vms,
            image::image_dir().display(),
            spec.warm,
            urls.join(", "),
        );
        let path = self.dir.join(format!("{host}.toml"));
        std::fs::write(&path, config)?;
        let mut args = vec!["run".into(), "--config".into(), path.display().to_string()];
        let program = match &spec.place {
            Place::Loopback => bin("berth-hostd"),
            Place::Namespace { ns, .. } => {
                let hostd = bin("berth-hostd").display().to_string();
                args.splice(0..0, ["netns".into(), "exec".into(), ns.clone(), hostd]);
                PathBuf::from("ip")
            }
        };
        self.hostds
            .push(Proc::start(host, program, args, &self.dir)?);
        self.controls.push(format!("http://{ip}:{control}"));
        self.state_dirs.push(state);
        Ok(())
    }

    /// A berth-sim swarm knowing every replica (rotated by `i`), with `args`; its report
    /// goes to `<dir>/swarm-<name>.json`.
    pub fn swarm(&self, name: &str, i: usize, args: &[&str]) -> Result<Swarm> {
        let mut servers: Vec<String> = self.addrs.iter().map(|a| format!("http://{a}")).collect();
        let n = servers.len().max(1);
        servers.rotate_left(i % n);
        let report = self.dir.join(format!("swarm-{name}.json"));
        let mut a: Vec<String> = vec!["--server".into(), servers.join(",")];
        a.extend(args.iter().map(|s| s.to_string()));
        a.extend([
            "--quiet".into(),
            "--json".into(),
            report.display().to_string(),
        ]);
        let proc = Proc::start(&format!("swarm-{name}"), bin("berth-sim"), a, &self.dir)?;
        Ok(Swarm { proc, report })
    }
    pub async fn get(&self, url: &str) -> Result<reqwest::Response> {
        Ok(self.http.get(url).bearer_auth(&self.admin).send().await?)
    }

    /// `GET /v1/admin/PATH` from the first replica that answers.
    pub async fn admin_get(&self, path: &str) -> Result<Value> {
        for a in &self.addrs {
            if let Ok(r) = self.get(&format!("http://{a}/v1/admin/{path}")).await {
                if r.status().is_success() {
                    return Ok(r.json().await?);
                }
            }
        }
        bail!("no replica answered /v1/admin/{path}")
    }

    pub async fn admin_post(&self, path: &str) -> Result<()> {
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

    /// Every replica ready, every host up with a docked substrate, within `within`.
    pub async fn healthy(&self, within: Duration) -> Result<Duration> {
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
        hosts.iter().filter(|h| up(h)).count() == self.hosts.len()
    }
}

// ---------------------------------------------------------------------------------------------
// The end

impl Stack {
    /// Waits (up to 90 s) until no session is live; returns those still live then.
    pub async fn settle(&self) -> Result<u64> {
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
    pub async fn sessions(&self) -> Result<Vec<Value>> {
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
    pub fn stop(&mut self) -> Result<(Value, Value)> {
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

/// What a run must never cost or leave, whatever it does: counted by [`Stack::stop`] and by
/// the runs' own tallies.
pub(crate) const MUST_BE_ZERO: [&str; 7] = [
    "stranded",
    "results_lost",
    "matches_killed",
    "stuck_sessions",
    "leaked_vms",
    "leaked_files",
    "panics",
];

/// `key = value` for each of `keys` whose figure in `report` is not 0.
pub(crate) fn nonzero(report: &Value, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .filter(|k| report[**k].as_u64() != Some(0))
        .map(|k| format!("{k} = {}", report[*k]))
        .collect()
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
