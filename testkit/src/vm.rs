//! Real hostd pools with real QEMU VMs, on private state folders in `/dev/shm`, sharing one
//! primed substrate per image digest so that each test does not pay a cold boot.
//!
//! A [`Sandbox`] owns its state folder; [`Sandbox::finish`] shuts the pool down and checks that
//! nothing is left (no folder, no QEMU process naming it). If a test panics first, `Drop`
//! kills any QEMU naming the folder and removes it, so a failing test does not leak either.

use anyhow::{bail, Context, Result};
use berth_hostd::config::{AccelChoice, GatewayConfig, ImageConfig};
use berth_hostd::driver::qemu::{Accel, QemuDriver};
use berth_hostd::driver::{VmDriver, VmSpec};
use berth_hostd::image::Image;
use berth_hostd::substrate::Substrate;
use berth_hostd::{HostdConfig, Pool};
use berth_protocol::SessionId;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The real `berth-hostd` binary next to the test binaries (`cargo xtask test` builds it).
pub fn hostd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("berth-hostd");
    assert!(
        bin.exists(),
        "{} missing: cargo xtask test builds the binaries first",
        bin.display()
    );
    bin
}

/// The guest image `cargo xtask image` builds.
pub fn image_dir() -> PathBuf {
    crate::fixtures::workspace().join("target/image")
}

pub fn image() -> Image {
    Image::load(&image_dir()).unwrap_or_else(|e| {
        panic!("no guest image ({e}); build it with `cargo xtask image` (cargo xtask test does)")
    })
}

/// Where tests keep the one primed substrate they all copy.
pub fn cache_dir() -> PathBuf {
    PathBuf::from("/dev/shm/berth-test-cache")
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// An image called `name` on the arena's image.
pub fn image_config(name: &str, warm: u32) -> ImageConfig {
    ImageConfig::new(name, image_dir(), warm)
}

/// The image of a test game (`tests/games/<game>`, built by `cargo xtask image` into
/// `target/images/<game>`).
pub fn test_game_config(game: &str, warm: u32) -> ImageConfig {
    let dir = crate::fixtures::workspace()
        .join("target/images")
        .join(game);
    ImageConfig::new(game, dir, warm)
}

/// A hostd config for tests: TCG, loopback ports 0, the given images.
pub fn hostd_config(state_dir: &Path, images: Vec<ImageConfig>) -> HostdConfig {
    HostdConfig {
        host_id: "test-host".into(),
        region: None,
        zone: None,
        state_dir: state_dir.to_path_buf(),
        control: SocketAddr::from(([127, 0, 0, 1], 0)),
        driver: Default::default(),
        accel: AccelChoice::Tcg,
        qemu: "qemu-system-x86_64".into(),
        max_vms: 64,
        boot_timeout_s: 90,
        ready_timeout_s: 20,
        agent_silence_s: 15,
        keep_substrates: false,
        peer: None,
        drain_timeout_s: 0,
        images,
        gateway: GatewayConfig::at(SocketAddr::from(([127, 0, 0, 1], 0))),
        server: None,
    }
}

pub async fn tcg_driver() -> Arc<dyn VmDriver> {
    Arc::new(
        QemuDriver::new("qemu-system-x86_64".into(), Accel::Tcg)
            .await
            .expect("qemu-system-x86_64 is installed (cargo xtask test installs it)"),
    )
}

/// Copies the shared primed substrate for `ic` into `state_dir/substrates/<name>`, priming it
/// first (under a file lock, once for all test processes) if the cache has none.
pub async fn seed_substrate(state_dir: &Path, ic: &ImageConfig) -> Result<()> {
    let driver = tcg_driver().await;
    let spec = VmSpec {
        image: Image::load(&ic.dir)?,
        config: ic.clone(),
    };
    let fp = driver.fingerprint(&spec);
    let m = &fp.machine;
    // The header's format in the name: worktrees on another format keep their own copy.
    let cache = cache_dir().join(format!(
        "f{}-{}-{}-{}-{}-{}",
        berth_hostd::substrate::FORMAT,
        &fp.image_digest[..12],
        m.memory_mib,
        m.vcpus,
        m.balloon_mib.unwrap_or(0),
        m.cow
    ));
    std::fs::create_dir_all(cache_dir())?;
    let lock_file = std::fs::File::create(cache_dir().join(".lock"))?;
    let _lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking the substrate cache: {e}"))
    })
    .await??;
    if Substrate::open(&cache, &fp).is_err() {
        driver
            .prime(&spec, &cache, Duration::from_secs(120))
            .await
            .context("priming the shared test substrate")?;
    }
    let dest = state_dir.join("substrates").join(&ic.name);
    std::fs::create_dir_all(&dest)?;
    for entry in std::fs::read_dir(&cache)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dest.join(entry.file_name()))?;
    }
    Ok(())
}

/// A pool on a private state folder.
pub struct Sandbox {
    pub dir: PathBuf,
    pub pool: Pool,
}

impl Sandbox {
    /// A state folder name unique to this test process and `name`.
    pub fn state_dir(name: &str) -> PathBuf {
        PathBuf::from(format!("/dev/shm/berth-test-{name}-{}", std::process::id()))
    }

    /// Starts a pool with one image `arena`, seeded with the shared substrate.
    pub async fn start(name: &str, warm: u32) -> Result<Self> {
        Self::start_with(name, vec![image_config("arena", warm)], true).await
    }

    /// The VM serving `session`.
    pub fn vm_of(&self, session: &SessionId) -> Result<berth_hostd::pool::VmInfo> {
        vm_of(&self.pool, session)
    }

    /// Waits (at most 20 s) until the pool has no VM with this VM or session id any more.
    pub async fn gone(&self, id: &str) -> Result<()> {
        let present = || {
            self.pool
                .status()
                .vms
                .iter()
                .any(|v| v.vm_id.as_str() == id || v.session_id.as_str() == id)
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            while present() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .with_context(|| format!("the VM of {id} is still there"))
    }

    /// [`Sandbox::start`] with no warm clones, once the pool has the substrate docked.
    pub async fn docked(name: &str) -> Result<Self> {
        let sandbox = Self::start(name, 0).await?;
        sandbox
            .pool
            .wait_ready("arena", 0, Duration::from_secs(60))
            .await?;
        Ok(sandbox)
    }

    pub async fn start_with(name: &str, images: Vec<ImageConfig>, seed: bool) -> Result<Self> {
        let seeded: Vec<String> = if seed {
            images.iter().map(|i| i.name.clone()).collect()
        } else {
            vec![]
        };
        Self::start_custom(name, images, &seeded, |_| {}).await
    }

    /// A pool whose images named in `seed` start docked (from the shared substrate) and whose
    /// config `tweak` may change.
    pub async fn start_custom(
        name: &str,
        images: Vec<ImageConfig>,
        seed: &[String],
        tweak: impl FnOnce(&mut HostdConfig),
    ) -> Result<Self> {
        init_logs();
        let dir = Self::state_dir(name);
        let _ = std::fs::remove_dir_all(&dir);
        let guard = DirGuard(dir.clone());
        for ic in images.iter().filter(|i| seed.contains(&i.name)) {
            seed_substrate(&dir, ic).await?;
        }
        let mut cfg = hostd_config(&dir, images);
        tweak(&mut cfg);
        let pool = Pool::start(cfg, tcg_driver().await).await?;
        std::mem::forget(guard);
        Ok(Self { dir, pool })
    }

    /// Shuts the pool down and checks that nothing it owned is left.
    pub async fn finish(self) -> Result<()> {
        self.pool.shutdown().await;
        assert_nothing_left(&self.dir)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        drop(DirGuard(self.dir.clone()));
    }
}

/// The VM of `pool` serving `session`.
pub fn vm_of(pool: &Pool, session: &SessionId) -> Result<berth_hostd::pool::VmInfo> {
    pool.status()
        .vms
        .into_iter()
        .find(|v| &v.session_id == session)
        .with_context(|| format!("no VM for session {session}"))
}

/// Kills any QEMU naming the folder and removes it when dropped: what a panicking test leaves.
#[derive(Debug)]
pub struct DirGuard(pub PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        kill_qemu_naming(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// QEMU processes whose command line names `dir`.
pub fn qemu_naming(dir: &Path) -> Vec<u32> {
    berth_hostd::util::processes_naming(dir)
        .into_iter()
        .filter(|pid| {
            berth_hostd::util::pid_cmdline(*pid)
                .first()
                .is_some_and(|a| a.contains("qemu-system"))
        })
        .collect()
}

pub fn kill_qemu_naming(dir: &Path) {
    for pid in qemu_naming(dir) {
        let _ = signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Fails if `dir` or any QEMU naming it still exists.
pub fn assert_nothing_left(dir: &Path) -> Result<()> {
    let left = qemu_naming(dir);
    if !left.is_empty() {
        bail!("QEMU processes left for {}: {left:?}", dir.display());
    }
    if dir.exists() {
        let mut files = Vec::new();
        walk(dir, &mut files);
        bail!("{} still holds {files:?}", dir.display());
    }
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            out.push(e.path());
            if e.path().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
}

pub fn now_ms() -> u64 {
    berth_hostd::util::now_ms()
}

/// Sends `signal` to a process (a VM's QEMU, a hostd).
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
    Ok(())
}

/// The next `Failed` event: (vm id, code, reason).
pub async fn next_failure(
    events: &mut tokio::sync::broadcast::Receiver<berth_hostd::pool::PoolEvent>,
    within: Duration,
) -> Result<(berth_protocol::VmId, String, String)> {
    tokio::time::timeout(within, async {
        loop {
            match events.recv().await {
                Ok(berth_hostd::pool::PoolEvent::Failed {
                    vm_id,
                    code,
                    reason,
                    ..
                }) => return Ok((vm_id, code, reason)),
                Ok(_) => continue,
                Err(e) => bail!("event stream ended: {e}"),
            }
        }
    })
    .await
    .context("no failure reported in time")?
}

/// A hostd link from `pool` to the server replicas at `servers` (their `/v1/hosts`, tried in
/// turn), as `host` with a host-role `token`, advertising `gateway` to players. Stopped by
/// dropping the sender.
pub fn start_link(
    pool: &Pool,
    servers: &[SocketAddr],
    host: &str,
    token: String,
    gateway: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let link = berth_hostd::link::ServerLink {
        urls: servers
            .iter()
            .map(|s| format!("ws://{s}/v1/hosts"))
            .collect(),
        host: berth_protocol::HostId::new(host).expect("a valid host id"),
        token: berth_hostd::link::Token::Inline(token),
        gateway: gateway.into(),
        reconnect_max: Duration::from_millis(500),
        trust: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(berth_hostd::link::run(pool.clone(), link, async move {
        let _ = stopped.await;
    }));
    (stop, task)
}
