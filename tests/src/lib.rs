//! The test sandbox: real hostd pools with real QEMU VMs, on private state folders in
//! `/dev/shm`, sharing one primed substrate per image digest so that each test does not pay a
//! cold boot.
//!
//! A [`Sandbox`] owns its state folder; [`Sandbox::finish`] shuts the pool down and checks that
//! nothing is left (no folder, no QEMU process naming it). If a test panics first, `Drop`
//! kills any QEMU naming the folder and removes it, so a failing test does not leak either.
//!
//! [`GameWs`] is a player's websocket to a hostd gateway (a real client, tokio-tungstenite).
//! [`browser::Browser`] is real headless Chromium for the page tests.

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
        driver: Default::default(),
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

/// Real headless Chromium for page tests (`/admin`; `tests/web.rs` has its own copy for
/// `/play`), through a chromedriver the test owns, with a phone's viewport or a desktop window.
pub mod browser {
    use anyhow::{bail, Context, Result};
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    use fantoccini::elements::Element;
    use fantoccini::key::Key;
    use fantoccini::Locator;
    use serde_json::{json, Value};
    use std::path::{Path, PathBuf};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
    pub const CHROMIUM: &str = "/usr/bin/chromium";

    /// Where screenshots go: `target/screenshots/`.
    pub fn screenshots_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots")
    }

    /// A free loopback port (bound and released: chromedriver takes it a moment later).
    fn free_port() -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    /// What the page runs on: a phone (touch, emulated by Chromium) or a desktop window.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub enum Device {
        Phone { width: u32, height: u32 },
        Desktop { width: u32, height: u32 },
    }

    /// Headless Chromium through a chromedriver this test owns, on a fresh profile folder.
    /// [`Browser::finish`] checks that no process naming the profile is left; `Drop` kills
    /// whatever is (a failing test leaks nothing either).
    pub struct Browser {
        client: Option<fantoccini::Client>,
        driver: tokio::process::Child,
        profile: PathBuf,
    }

    impl Browser {
        pub async fn start(name: &str, device: Device) -> Result<Browser> {
            for bin in [CHROMEDRIVER, CHROMIUM] {
                if !Path::new(bin).exists() {
                    bail!("{bin} is missing: apt-get install chromium chromium-driver (cargo xtask test does)");
                }
            }
            let profile =
                std::env::temp_dir().join(format!("berth-chromium-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&profile);
            std::fs::create_dir_all(&profile)?;
            let port = free_port()?;
            let driver = tokio::process::Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting chromedriver")?;
            let mut browser = Browser {
                client: None,
                driver,
                profile,
            };
            let url = format!("http://127.0.0.1:{port}");
            let t0 = Instant::now();
            loop {
                let ready = reqwest::get(format!("{url}/status"))
                    .await
                    .ok()
                    .filter(|r| r.status().is_success());
                if let Some(r) = ready {
                    if r.json::<Value>().await?["value"]["ready"] == true {
                        break;
                    }
                }
                if t0.elapsed() > Duration::from_secs(20) {
                    bail!("chromedriver did not come up on port {port}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut args = vec![
                "--headless".to_owned(),
                "--no-sandbox".into(),
                "--disable-gpu".into(),
                "--disable-quic".into(),
                "--no-first-run".into(),
                "--disable-background-networking".into(),
                "--disable-component-update".into(),
                "--disable-sync".into(),
                "--disable-dev-shm-usage".into(),
                "--disable-crash-reporter".into(),
                "--disable-breakpad".into(),
                format!("--user-data-dir={}", browser.profile.display()),
            ];
            let mut options = json!({ "binary": CHROMIUM });
            match device {
                Device::Phone { width, height } => {
                    options["mobileEmulation"] = json!({
                        "deviceMetrics": { "width": width, "height": height, "pixelRatio": 2.0, "touch": true, "mobile": true },
                        "userAgent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Mobile Safari/537.36",
                    });
                }
                Device::Desktop { width, height } => {
                    args.push(format!("--window-size={width},{height}"))
                }
            }
            options["args"] = json!(args);
            let caps = json!({ "browserName": "chrome", "goog:chromeOptions": options });
            let caps = caps.as_object().cloned().context("capabilities")?;
            let client = fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            )
            .capabilities(caps)
            .connect(&url)
            .await
            .context("opening a Chromium session")?;
            browser.client = Some(client);
            Ok(browser)
        }

        pub fn c(&self) -> &fantoccini::Client {
            self.client.as_ref().expect("open until finish")
        }

        pub async fn goto(&self, url: &str) -> Result<()> {
            Ok(self.c().goto(url).await?)
        }

        /// The element with `data-testid="{testid}"`.
        pub async fn el(&self, testid: &str) -> Result<Element> {
            self.c()
                .find(Locator::Css(&format!("[data-testid=\"{testid}\"]")))
                .await
                .with_context(|| format!("no element {testid}"))
        }

        pub async fn click(&self, testid: &str) -> Result<()> {
            Ok(self.el(testid).await?.click().await?)
        }

        pub async fn text(&self, testid: &str) -> Result<String> {
            Ok(self.el(testid).await?.text().await?)
        }

        pub async fn js(&self, script: &str) -> Result<Value> {
            Ok(self.c().execute(script, vec![]).await?)
        }

        /// Presses and releases `key` on whatever has the focus.
        pub async fn press(&self, key: Key) -> Result<()> {
            let k: char = key.into();
            let keys = KeyActions::new("keyboard".into())
                .then(KeyAction::Down { value: k })
                .then(KeyAction::Up { value: k });
            self.c().perform_actions(keys).await?;
            self.c().release_actions().await?;
            Ok(())
        }

        /// Waits until the JavaScript expression `cond` is true; `context` (a JavaScript
        /// expression) says what the page shows when it is not.
        pub async fn until(
            &self,
            what: &str,
            within: Duration,
            cond: &str,
            context: &str,
        ) -> Result<()> {
            let t0 = Instant::now();
            loop {
                if self.js(&format!("return !!({cond})")).await? == Value::Bool(true) {
                    return Ok(());
                }
                if t0.elapsed() > within {
                    let seen = self
                        .js(&format!("return String({context})"))
                        .await
                        .map(|v| v.as_str().unwrap_or_default().to_owned())
                        .unwrap_or_else(|e| format!("(page unreadable: {e})"));
                    bail!("{what}: not within {within:?} ({seen})");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// Nothing wider than the viewport (no sideways scrolling on a phone).
        pub async fn fits(&self) -> Result<()> {
            let v = self
                .js("return [document.documentElement.scrollWidth, window.innerWidth]")
                .await?;
            let (content, viewport) = (v[0].as_u64(), v[1].as_u64());
            if content > viewport {
                bail!("the page is wider than the viewport: {content:?} > {viewport:?}");
            }
            Ok(())
        }

        /// Saves a screenshot as `target/screenshots/{name}.png`.
        pub async fn shot(&self, name: &str) -> Result<PathBuf> {
            let png = self.c().screenshot().await?;
            std::fs::create_dir_all(screenshots_dir())?;
            let path = screenshots_dir().join(format!("{name}.png"));
            std::fs::write(&path, png)?;
            Ok(path)
        }

        /// Ends the browser session and chromedriver; fails if any process naming the profile
        /// folder is left, then removes it.
        pub async fn finish(mut self) -> Result<()> {
            let spawned = self.driver.id().map(descendants).unwrap_or_default();
            if let Some(c) = self.client.take() {
                c.close().await.context("closing the browser session")?;
            }
            self.driver.kill().await?;
            let t0 = Instant::now();
            loop {
                let mut left = berth_hostd::util::processes_naming(&self.profile);
                left.extend(spawned.iter().filter(|p| berth_hostd::util::pid_alive(**p)));
                if left.is_empty() {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("browser processes left: {left:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::fs::remove_dir_all(&self.profile)?;
            Ok(())
        }
    }

    /// Every process below `pid` (chromedriver → Chromium → its zygotes, renderers, helpers).
    fn descendants(pid: u32) -> Vec<u32> {
        let parent_of = |p: u32| -> Option<u32> {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let all: Vec<u32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut out = vec![pid];
        let mut i = 0;
        while i < out.len() {
            let parent = out[i];
            out.extend(all.iter().filter(|p| parent_of(**p) == Some(parent)));
            i += 1;
        }
        out
    }

    impl Drop for Browser {
        fn drop(&mut self) {
            let _ = self.driver.start_kill();
            berth_hostd::util::kill_processes_naming(&self.profile);
            let _ = std::fs::remove_dir_all(&self.profile);
        }
    }
}
