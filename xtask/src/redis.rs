//! A throwaway Redis for one test run: `redis-server` on a free loopback port, in its own
//! folder, persisting nothing (or, for `cargo xtask chaos`, an fsync'd append-only file that
//! survives [`RedisServer::restart`]), killed and removed when the [`RedisServer`] is dropped.
//!
//! The distribution's `redis-server` service (installed with the package) is never used: a
//! test run must not depend on, or leave keys in, a Redis it does not own.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `redis-server` may take to answer its first PING.
const READY_WITHIN: Duration = Duration::from_secs(10);

pub struct RedisServer {
    /// `redis://127.0.0.1:PORT/`
    pub url: String,
    child: Child,
    dir: PathBuf,
    port: u16,
    aof: bool,
}

impl RedisServer {
    /// Starts `redis-server` and waits until it answers PING. Another process can take the free
    /// port between our probe and Redis binding it, so a failed start is retried on a new port.
    pub fn start() -> Result<RedisServer> {
        Self::start_with(false)
    }

    /// As [`RedisServer::start`], with an append-only file synced on every write (as production
    /// runs it): a [`RedisServer::restart`], even after SIGKILL, keeps every key.
    pub fn start_persistent() -> Result<RedisServer> {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> Result<RedisServer> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(aof) {
                Ok(server) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    fn start_once(aof: bool) -> Result<RedisServer> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("berth-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let child = spawn(port, &dir, aof)?;
        // From here on, Drop stops the process and removes the folder.
        let mut server = RedisServer {
            url: format!("redis://127.0.0.1:{port}/"),
            child,
            dir,
            port,
            aof,
        };
        server.ready()?;
        Ok(server)
    }

    fn ready(&mut self) -> Result<()> {
        let port = self.port;
        let log = self.dir.join("redis.log");
        self.wait_ready(port).with_context(|| {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            format!("redis-server on port {port} is not ready; its log:\n{said}")
        })
    }

    /// Stops it with `signal` (SIGTERM: it syncs and exits; SIGKILL: it just dies), then
    /// starts it again on the same port and folder and waits for its PING.
    pub fn restart(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + READY_WITHIN;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = spawn(self.port, &self.dir, self.aof)?;
        self.ready()
    }

    fn wait_ready(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("redis-server exited: {status}");
            }
            if ping(port).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no answer to PING within {READY_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(port: u16, dir: &std::path::Path, aof: bool) -> Result<Child> {
    let persistence: &[&str] = if aof {
        &["--appendonly", "yes", "--appendfsync", "always"]
    } else {
        &["--appendonly", "no"]
    };
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--daemonize", "no"])
        .args(persistence)
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (is the redis-server package installed?)")
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// One PING in RESP, expecting `+PONG`.
fn ping(port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf)?;
    if &buf != b"+PONG\r\n" {
        bail!(
            "unexpected answer to PING: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    Ok(())
}
