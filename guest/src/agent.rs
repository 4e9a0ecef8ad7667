//! The agent: hostd's link into the VM over the `berth.agent` virtio-serial port.
//!
//! The port stays open for the VM's whole life. While hostd is not connected a read returns
//! EOF at once; the agent then sleeps with backoff instead of spinning, so a parked or
//! orphaned VM costs next to nothing.

use crate::game::{self, Command, GameOver, World};
use crate::GuestError;
use berth_protocol::guest::{
    decode_line, encode_line, GuestToHost, HostToGuest, Identity, Line, LineBuffer,
    AGENT_PORT_NAME, AGENT_PROTOCOL_VERSION, GAME_PORT, HEARTBEAT_INTERVAL, MAX_LINE,
};
use berth_protocol::{SessionId, VmId};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Finds and opens the agent's virtio-serial port (`/dev/vportNpM` whose sysfs name matches).
pub fn open_port(sysfs_ports: &Path) -> Result<File, GuestError> {
    let entries = std::fs::read_dir(sysfs_ports).map_err(GuestError::Port)?;
    for entry in entries.filter_map(Result::ok) {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == AGENT_PORT_NAME {
            let dev = Path::new("/dev").join(entry.file_name());
            return OpenOptions::new()
                .read(true)
                .write(true)
                .open(dev)
                .map_err(GuestError::Port);
        }
    }
    Err(GuestError::NoPort(AGENT_PORT_NAME))
}

/// Why an identity was refused; `code()` goes back to hostd.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("hostname {0:?} is not a valid host name")]
    Hostname(String),
    #[error("setting the wall clock")]
    Clock(#[source] nix::Error),
    #[error("setting the host name")]
    SetHostname(#[source] nix::Error),
    #[error("this VM is already activated for session {0}")]
    AlreadyActivated(String),
}

impl ApplyError {
    pub fn code(&self) -> &'static str {
        match self {
            ApplyError::Hostname(_) => "bad_identity",
            ApplyError::Clock(_) | ApplyError::SetHostname(_) => "apply_failed",
            ApplyError::AlreadyActivated(_) => "already_activated",
        }
    }
}

/// Checks an RFC 1123 host name label.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Applies an identity to this machine: wall clock (a restored guest's clock is as stale as the
/// time it spent parked), host name, and the kernel's entropy pool.
pub fn apply_identity(identity: &Identity) -> Result<(), ApplyError> {
    if !valid_hostname(&identity.hostname) {
        return Err(ApplyError::Hostname(identity.hostname.clone()));
    }
    let ms = identity.wall_clock_ms;
    let ts = nix::sys::time::TimeSpec::new((ms / 1000) as i64, ((ms % 1000) * 1_000_000) as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(ApplyError::Clock)?;
    nix::unistd::sethostname(&identity.hostname).map_err(ApplyError::SetHostname)?;
    // Every clone of a substrate starts with the same entropy pool: mix the seed in.
    // (Uncredited; a write to /dev/urandom cannot fail in a way that matters here.)
    if let Ok(mut urandom) = OpenOptions::new().write(true).open("/dev/urandom") {
        let _ = urandom.write_all(&identity.rng_seed.to_le_bytes());
        let _ = urandom.write_all(identity.session_id.as_str().as_bytes());
    }
    Ok(())
}

/// The agent's state: booted and waiting, or activated.
pub struct Agent {
    port: File,
    writer: Arc<Mutex<File>>,
    world: Arc<World>,
    listener: Option<TcpListener>,
    started: Instant,
    session: Arc<OnceLock<Arc<game::Session>>>,
    activated: Option<mpsc::Sender<SessionId>>,
    /// The game loop's inbox (activation starts it).
    game: Option<mpsc::Sender<Command>>,
}

impl Agent {
    pub fn new(port: File, world: World, listener: TcpListener, started: Instant) -> Self {
        let writer = port.try_clone().expect("dup of an open port fd");
        Self {
            port,
            writer: Arc::new(Mutex::new(writer)),
            world: Arc::new(world),
            listener: Some(listener),
            started,
            session: Arc::new(OnceLock::new()),
            activated: None,
            game: None,
        }
    }

    fn send(writer: &Mutex<File>, msg: &GuestToHost) {
        let line = encode_line(msg);
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        // A write while hostd is away is dropped by the device; hostd resynchronises.
        let _ = w.write_all(&line);
    }

    /// Starts the game server and the reporter threads. Both exist before the VM is docked,
    /// so that activating a clone starts no thread.
    fn start_threads(&mut self) {
        let (over_tx, over_rx) = mpsc::channel::<GameOver>();
        let (game_tx, game_rx) = mpsc::channel::<Command>();
        let inputs = game::Inputs::default();
        if let Some(listener) = self.listener.take() {
            let session = self.session.clone();
            let tiles = self.world.tiles;
            let commands = game_tx.clone();
            let inputs = inputs.clone();
            std::thread::spawn(move || game::serve(listener, session, tiles, commands, inputs));
        }
        let world = self.world.clone();
        std::thread::spawn(move || game::run_loop(world, game_rx, inputs, over_tx));
        self.game = Some(game_tx);
        let (activated_tx, activated_rx) = mpsc::channel::<SessionId>();
        self.activated = Some(activated_tx);
        let writer = self.writer.clone();
        let booted = self.started;
        std::thread::spawn(move || {
            // Blocked (no timer, no polling) until activation.
            let Ok(session_id) = activated_rx.recv() else {
                return;
            };
            loop {
                match over_rx.recv_timeout(HEARTBEAT_INTERVAL) {
                    Ok(over) => Self::send(
                        &writer,
                        &GuestToHost::Ended {
                            session_id: session_id.clone(),
                            reason: over.reason,
                            results: over.results,
                        },
                    ),
                    Err(mpsc::RecvTimeoutError::Timeout) => Self::send(
                        &writer,
                        &GuestToHost::Heartbeat {
                            uptime_ms: booted.elapsed().as_millis() as u64,
                        },
                    ),
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
    }

    /// Serves hostd until the VM is destroyed.
    pub fn serve(mut self) -> Result<(), GuestError> {
        self.start_threads();
        Self::send(
            &self.writer,
            &GuestToHost::Initialised {
                version: AGENT_PROTOCOL_VERSION,
                init_ms: self.started.elapsed().as_millis() as u64,
                game_port: GAME_PORT,
            },
        );
        let mut lines = LineBuffer::default();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut backoff = Duration::from_millis(20);
        loop {
            let n = match self.port.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(GuestError::Port(e)),
            };
            if n == 0 {
                // hostd is not connected: wait for it without spinning.
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            backoff = Duration::from_millis(20);
            let mut out = Vec::new();
            lines.push(&chunk[..n], &mut out);
            for line in out {
                self.handle(line);
            }
        }
    }

    fn refuse(&self, code: &str, message: String) {
        Self::send(
            &self.writer,
            &GuestToHost::Error {
                code: code.into(),
                message,
            },
        );
    }

    fn handle(&mut self, line: Line) {
        let line = match line {
            Line::Complete(l) if l.iter().all(u8::is_ascii_whitespace) => return,
            Line::Complete(l) => l,
            Line::TooLong => {
                return self.refuse(
                    "line_too_long",
                    format!("lines are limited to {MAX_LINE} bytes"),
                )
            }
        };
        match decode_line::<HostToGuest>(&line) {
            Ok(HostToGuest::Identity(identity)) => self.activate(identity),
            Ok(HostToGuest::Prewarm { wall_clock_ms }) => self.prewarm(wall_clock_ms),
            Err(e) => self.refuse(e.code(), e.to_string()),
        }
    }

    /// Runs the activation paths once with values that change nothing but the clock (this
    /// VM's own host name, hostd's wall clock), so that the first real activation is fast.
    fn prewarm(&mut self, wall_clock_ms: u64) {
        if self.session.get().is_none() {
            let hostname = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "berth".into());
            let sample = Identity {
                teams: vec![],
                session_id: SessionId::new("prewarm").expect("literal id is valid"),
                vm_id: VmId::new("prewarm").expect("literal id is valid"),
                hostname,
                players: vec![],
                ticket_key: String::new(),
                params: serde_json::json!({}),
                wall_clock_ms,
                rng_seed: 0,
            };
            let line = encode_line(&HostToGuest::Identity(sample));
            if let Ok(HostToGuest::Identity(sample)) = decode_line::<HostToGuest>(&line) {
                let _ = apply_identity(&sample);
                let _ = game::Session::new(sample.clone()).check("x.y.z");
                game::warm_up(&self.world);
                let _ = encode_line(&GuestToHost::Ready {
                    session_id: sample.session_id,
                    vm_id: sample.vm_id,
                    clock_ms: game::now_ms(),
                    apply_us: 0,
                });
            }
        }
        Self::send(&self.writer, &GuestToHost::Prewarmed);
    }

    fn activate(&mut self, identity: Identity) {
        let t0 = Instant::now();
        if let Some(current) = self.session.get() {
            let e = ApplyError::AlreadyActivated(current.identity.session_id.to_string());
            return self.refuse(e.code(), e.to_string());
        }
        if let Err(e) = apply_identity(&identity) {
            return self.refuse(e.code(), e.to_string());
        }
        let session_id = identity.session_id.clone();
        let vm_id = identity.vm_id.clone();
        let session = Arc::new(game::Session::new(identity));
        let _ = self.session.set(session.clone());
        if let Some(game) = &self.game {
            let _ = game.send(Command::Start(session));
        }
        if let Some(tx) = &self.activated {
            let _ = tx.send(session_id.clone());
        }
        Self::send(
            &self.writer,
            &GuestToHost::Ready {
                session_id,
                vm_id,
                clock_ms: game::now_ms(),
                apply_us: t0.elapsed().as_micros() as u64,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_checked() {
        assert!(valid_hostname("berth-vm-1"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname("-a"));
        assert!(!valid_hostname(&"a".repeat(64)));
    }

    #[test]
    fn rng_depends_on_seed() {
        let a = crate::arena::Rng::new(1).next_u64();
        let b = crate::arena::Rng::new(2).next_u64();
        assert_ne!(a, b);
        assert_eq!(a, crate::arena::Rng::new(1).next_u64());
    }
}
