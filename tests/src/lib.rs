//! The test sandbox: real hostd pools with real QEMU VMs, on private state folders in
//! `/dev/shm`, sharing one primed substrate per image digest so that each test does not pay a
//! cold boot.
//!
//! A [`Sandbox`] owns its state folder; [`Sandbox::finish`] shuts the pool down and checks that
//! nothing is left (no folder, no QEMU process naming it). If a test panics first, `Drop`
//! kills any QEMU naming the folder and removes it, so a failing test does not leak either.
//!
//! [`GameWs`] is a player's websocket to a hostd gateway (a real client, tokio-tungstenite).

use anyhow::{bail, Context, Result};
use berth_hostd::config::{AccelChoice, GatewayConfig, ImageConfig};
use berth_hostd::driver::qemu::{Accel, QemuDriver};
use berth_hostd::driver::{VmDriver, VmSpec};
use berth_hostd::image::Image;
use berth_hostd::substrate::Substrate;
use berth_hostd::{HostdConfig, Pool};
use berth_protocol::game::GameAnswer;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The guest image `cargo xtask image` builds.
pub fn image_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image")
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

pub fn image_config(name: &str, warm: u32) -> ImageConfig {
    ImageConfig::new(name, image_dir(), warm)
}

pub fn config(state_dir: &Path, images: Vec<ImageConfig>) -> HostdConfig {
    HostdConfig {
        host_id: "test-host".into(),
        state_dir: state_dir.to_path_buf(),
        control: SocketAddr::from(([127, 0, 0, 1], 0)),
        accel: AccelChoice::Tcg,
        qemu: "qemu-system-x86_64".into(),
        max_vms: 64,
        boot_timeout_s: 90,
        ready_timeout_s: 20,
        agent_silence_s: 15,
        keep_substrates: false,
        images,
        gateway: GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        },
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
        image: image(),
        config: ic.clone(),
    };
    let fp = driver.fingerprint(&spec);
    let m = &fp.machine;
    let cache = cache_dir().join(format!(
        "{}-{}-{}-{}-{}",
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
        let mut cfg = config(&dir, images);
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

/// Connects to a game port and reads the server's hello.
pub async fn game_hello(addr: SocketAddr) -> Result<GameAnswer> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .context("connect timed out")??;
    let mut lines = BufReader::new(stream).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("no hello within 10 s")??
        .context("connection closed before hello")?;
    Ok(serde_json::from_str(&line)?)
}

/// Sends one game request line and returns the answer.
pub async fn game_request(addr: SocketAddr, request: &str) -> Result<Vec<GameAnswer>> {
    use tokio::io::AsyncWriteExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let mut out = Vec::new();
    let first = lines.next_line().await?.context("no hello")?;
    out.push(serde_json::from_str(&first)?);
    wr.write_all(request.as_bytes()).await?;
    wr.write_all(b"\n").await?;
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("no answer")??
        .context("closed")?;
    out.push(serde_json::from_str(&line)?);
    Ok(out)
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

/// What a player hears on a gateway websocket.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    Answer(GameAnswer),
    /// A text frame that is not a game answer.
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: code and reason (1005 when it had none).
    Close(u16, String),
    /// The socket ended without a close frame.
    Dropped,
}

/// A player's websocket to a hostd gateway.
pub struct GameWs {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl GameWs {
    /// Opens `ws://{gateway}/v1/game`.
    pub async fn connect(gateway: SocketAddr) -> Result<Self> {
        let url = format!("ws://{gateway}{}", berth_hostd::gateway::PATH);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .context("websocket connect timed out")??;
        Ok(Self { ws })
    }

    /// Connects and sends the join frame with `ticket`.
    pub async fn join(gateway: SocketAddr, ticket: &str) -> Result<Self> {
        let mut ws = Self::connect(gateway).await?;
        let join = serde_json::json!({"type": "join", "ticket": ticket});
        ws.send_text(&join.to_string()).await?;
        Ok(ws)
    }

    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) -> Result<()> {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        self.ws.send(Message::binary(bytes.to_vec())).await?;
        Ok(())
    }

    /// The next thing heard within `within` (websocket pings and pongs are skipped; pings are
    /// answered by the client library).
    pub async fn next(&mut self, within: Duration) -> Result<Heard> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("nothing heard in time")?;
            return Ok(match msg {
                None | Some(Err(_)) => Heard::Dropped,
                Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
                    Ok(a) => Heard::Answer(a),
                    Err(_) => Heard::Text(t.as_str().to_owned()),
                },
                Some(Ok(Message::Binary(b))) => Heard::Binary(b.to_vec()),
                Some(Ok(Message::Close(f))) => {
                    // Polling on sends the client's answer to the close, as a browser does.
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.next()).await;
                    match f {
                        Some(f) => Heard::Close(u16::from(f.code), f.reason.as_str().to_owned()),
                        None => Heard::Close(1005, String::new()),
                    }
                }
                Some(Ok(_)) => continue,
            });
        }
    }

    /// Skips what is heard until `want` matches it; fails on a close or after `within`.
    pub async fn until(
        &mut self,
        within: Duration,
        mut want: impl FnMut(&Heard) -> bool,
    ) -> Result<Heard> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let heard = self.next(left).await?;
            if want(&heard) {
                return Ok(heard);
            }
            if matches!(heard, Heard::Close(..) | Heard::Dropped) {
                bail!("closed before the expected frame: {heard:?}");
            }
        }
    }

    /// The next `error` (other frames skipped) and the close after it: (error code, close
    /// code, close reason).
    pub async fn refused(&mut self, within: Duration) -> Result<(String, u16, String)> {
        let error = self
            .until(within, |h| {
                matches!(h, Heard::Answer(GameAnswer::Error { .. }))
            })
            .await?;
        let Heard::Answer(GameAnswer::Error { code, .. }) = error else {
            unreachable!("matched above");
        };
        let close = self
            .until(within, |h| matches!(h, Heard::Close(..) | Heard::Dropped))
            .await?;
        match close {
            Heard::Close(c, reason) => Ok((code, c, reason)),
            other => bail!("{code}, then no close frame: {other:?}"),
        }
    }

    /// Closes from the client side and waits for the gateway's answer.
    pub async fn close(mut self) -> Result<()> {
        use futures_util::StreamExt;
        self.ws.close(None).await?;
        while tokio::time::timeout(Duration::from_secs(5), self.ws.next())
            .await
            .context("the gateway did not finish the close")?
            .is_some()
        {}
        Ok(())
    }
}

/// Joins the game at `addr` (directly, as the gateway would) with `ticket` and surrenders:
/// the other side wins. Returns the game's `ended` (reason, results).
pub async fn game_surrender(
    addr: SocketAddr,
    ticket: &str,
) -> Result<(String, berth_protocol::game::GameResults)> {
    use tokio::io::AsyncWriteExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let join =
        format!("{{\"type\":\"join\",\"ticket\":\"{ticket}\"}}\n{{\"type\":\"surrender\"}}\n");
    wr.write_all(join.as_bytes()).await?;
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            match serde_json::from_str::<GameAnswer>(&line)? {
                GameAnswer::Ended { reason, results } => return Ok((reason, results)),
                GameAnswer::Error { code, message } => bail!("the game refused: {code}: {message}"),
                _ => continue,
            }
        }
        bail!("the game closed without ended")
    })
    .await
    .context("no ended within 20 s")?
}

/// A hostd link from `pool` to the server at `server` (its `/v1/hosts`), as `host` with a
/// host-role `token`, advertising `gateway` to players. Stopped by dropping the sender.
pub fn start_link(
    pool: &Pool,
    server: SocketAddr,
    host: &str,
    token: String,
    gateway: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let link = berth_hostd::link::ServerLink {
        url: format!("ws://{server}/v1/hosts"),
        host: berth_protocol::HostId::new(host).expect("a valid host id"),
        token: berth_hostd::link::Token::Inline(token),
        gateway: gateway.into(),
        reconnect_max: Duration::from_millis(500),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(berth_hostd::link::run(pool.clone(), link, async move {
        let _ = stopped.await;
    }));
    (stop, task)
}
