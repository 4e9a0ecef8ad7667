//! Real headless Chromium for page tests (`/admin`, `/play`), through a chromedriver the test
//! owns, with a phone's viewport or a desktop window.

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
    crate::fixtures::workspace().join("target/screenshots")
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
        Self::launch(name, device, &[]).await
    }

    /// As [`Browser::start`], accepting the certificate whose public key hashes (SHA-256 of the
    /// SubjectPublicKeyInfo, base64) to `spki`: a test CA's leaf, and nothing else.
    pub async fn start_trusting(name: &str, device: Device, spki: &str) -> Result<Browser> {
        let flag = format!("--ignore-certificate-errors-spki-list={spki}");
        Self::launch(name, device, &[flag]).await
    }

    async fn launch(name: &str, device: Device, extra: &[String]) -> Result<Browser> {
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
        args.extend(extra.iter().cloned());
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
