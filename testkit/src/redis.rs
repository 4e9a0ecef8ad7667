//! A private `redis-server` for tests that stop, restart or cut Redis off: the shared one at
//! `BERTH_TEST_REDIS` ([`crate::fixtures::redis_url`]) must stay up for every other test.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `redis-server` on a unix socket in its own folder; killed on drop.
pub struct PrivateRedis {
    child: Option<Child>,
    socket: PathBuf,
    dir: crate::fixtures::TempDir,
    /// An append-only file, synced on every write: a restart keeps every key.
    aof: bool,
}

impl PrivateRedis {
    /// Starts one without persistence (a restart loses every key) and waits until it answers
    /// `PING`.
    pub async fn start() -> Result<Self> {
        Self::start_with(false).await
    }

    /// Starts one with an append-only file synced on every write, as production runs it: a
    /// restart, even after SIGKILL, keeps every key.
    pub async fn start_persistent() -> Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(aof: bool) -> Result<Self> {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let dir = crate::fixtures::TempDir::new(&format!("redis-{n}"))?;
        let socket = dir.0.join("redis.sock");
        let mut redis = PrivateRedis {
            child: None,
            socket,
            dir,
            aof,
        };
        redis.restart().await?;
        Ok(redis)
    }

    fn spawn(dir: &Path, socket: &Path, aof: bool) -> Result<Child> {
        let persistence: &[&str] = if aof {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        Command::new("redis-server")
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(socket)
            .args(["--save", ""])
            .args(persistence)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .context(
                "starting redis-server (run the tests with `cargo xtask test`, which installs it)",
            )
    }

    /// Its URL, for `RedisStore::connect` or a server's `store.redis`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// Sends one command in RESP and returns the first reply line (`+PONG`, `:1`, …).
    pub async fn command(&self, args: &[&str]) -> Result<String> {
        let mut conn = tokio::net::UnixStream::connect(&self.socket).await?;
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        conn.write_all(request.as_bytes()).await?;
        let mut reply = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut reply))
            .await
            .context("redis-server did not answer")??;
        let text = String::from_utf8_lossy(&reply[..n]).into_owned();
        Ok(text.lines().next().unwrap_or_default().to_owned())
    }

    /// (Re)starts it, killing the running one first (SIGKILL): every connection drops, and
    /// without persistence every key is gone.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.child = Some(Self::spawn(&self.dir.0, &self.socket, self.aof)?);
        for _ in 0..100 {
            if self.command(&["PING"]).await.is_ok_and(|r| r == "+PONG") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("private redis-server did not answer PING")
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
