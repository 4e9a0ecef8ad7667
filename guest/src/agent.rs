//! The agent: hostd's link into the VM over the `berth.agent` virtio-serial port.
//!
//! The port stays open for the VM's whole life. While hostd is not connected a read returns
//! EOF at once; the agent then sleeps with backoff instead of spinning, so a parked or
//! orphaned VM costs next to nothing.

use crate::life::{Life, Report};
use crate::sdk::Sdk;
use crate::GuestError;
use berth_protocol::guest::{
    decode_line, encode_line, GuestToHost, HostToGuest, Identity, Line, LineBuffer,
    AGENT_PORT_NAME, AGENT_PROTOCOL_VERSION, HEARTBEAT_INTERVAL, MAX_LINE,
};
use berth_protocol::{SessionId, VmId};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
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

/// Sets the wall clock to `ms` since the epoch.
fn set_clock(ms: u64) -> Result<(), ApplyError> {
    let ts = nix::sys::time::TimeSpec::new((ms / 1000) as i64, ((ms % 1000) * 1_000_000) as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(ApplyError::Clock)
}

/// Applies an identity to this machine: wall clock (a restored guest's clock is as stale as the
/// time it spent parked), host name, and the kernel's entropy pool.
pub fn apply_identity(identity: &Identity) -> Result<(), ApplyError> {
    if !valid_hostname(&identity.hostname) {
        return Err(ApplyError::Hostname(identity.hostname.clone()));
    }
    set_clock(identity.wall_clock_ms)?;
    nix::unistd::sethostname(&identity.hostname).map_err(ApplyError::SetHostname)?;
    // Every clone of a substrate starts with the same entropy pool: mix the seed in.
    // (Uncredited; a write to /dev/urandom cannot fail in a way that matters here.)
    if let Ok(mut urandom) = OpenOptions::new().write(true).open("/dev/urandom") {
        let _ = urandom.write_all(&identity.rng_seed.to_le_bytes());
        let _ = urandom.write_all(identity.session_id.as_str().as_bytes());
    }
    Ok(())
}

/// Writes [`GuestToHost`] lines to hostd, from any thread (reports are written by the
/// thread that has them: no hop through another thread on the activation path).
#[derive(Clone)]
pub struct Reporter {
    writer: Arc<Mutex<File>>,
    game_port: u16,
}

impl Reporter {
    pub fn new(port: &File, game_port: u16) -> Result<Self, GuestError> {
        Ok(Reporter {
            writer: Arc::new(Mutex::new(port.try_clone().map_err(GuestError::Port)?)),
            game_port,
        })
    }

    pub fn report(&self, report: Report) {
        self.send(&message(report, self.game_port));
    }

    fn send(&self, msg: &GuestToHost) {
        let line = encode_line(msg);
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // A write while hostd is away is dropped by the device; hostd resynchronises.
        let _ = w.write_all(&line);
    }
}

/// The hostd link: reads hostd's lines (identity, prewarm), and heartbeats once activated.
pub struct Agent {
    port: File,
    reporter: Reporter,
    life: Arc<Life>,
    sdk: Arc<Sdk>,
}

impl Agent {
    pub fn new(port: File, life: Arc<Life>, sdk: Arc<Sdk>, reporter: Reporter) -> Self {
        Self {
            port,
            reporter,
            life,
            sdk,
        }
    }

    /// A heartbeat every [`HEARTBEAT_INTERVAL`] once activated, ending a ready game that
    /// stopped calling `health`. Started at boot, so that activating a clone starts no thread.
    fn start_heartbeats(&self) {
        let reporter = self.reporter.clone();
        let life = self.life.clone();
        let booted = Instant::now();
        std::thread::spawn(move || loop {
            std::thread::sleep(HEARTBEAT_INTERVAL);
            if life.session_id().is_none() {
                continue;
            }
            reporter.send(&GuestToHost::Heartbeat {
                uptime_ms: booted.elapsed().as_millis() as u64,
            });
            if let Some(ended) = life.health_overdue() {
                reporter.report(ended);
            }
        });
    }

    /// Serves hostd until the VM is destroyed.
    pub fn serve(mut self) -> Result<(), GuestError> {
        self.start_heartbeats();
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
        self.reporter.send(&GuestToHost::Error {
            code: code.into(),
            message,
        });
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
            Ok(HostToGuest::Clock { wall_clock_ms }) => {
                if let Err(e) = set_clock(wall_clock_ms) {
                    self.refuse(e.code(), e.to_string());
                }
            }
            Err(e) => self.refuse(e.code(), e.to_string()),
        }
    }

    /// Runs the activation paths once with values that change nothing but the clock (this
    /// VM's own host name, hostd's wall clock), so that the first real activation is fast:
    /// applying an identity, checking a ticket, and one SDK call over loopback.
    fn prewarm(&mut self, wall_clock_ms: u64) {
        if self.life.session_id().is_none() {
            // The VM's own name when it has a valid one (a fresh kernel's `(none)` is not), so
            // that the prewarm really sets it, as an activation does.
            let hostname = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| valid_hostname(h))
                .unwrap_or_else(|| "berth".into());
            let sample = Identity {
                teams: vec![],
                session_id: SessionId::new("prewarm").expect("literal id is valid"),
                vm_id: VmId::new("prewarm").expect("literal id is valid"),
                hostname,
                players: vec![],
                ticket_key: "00".repeat(32),
                params: serde_json::json!({}),
                wall_clock_ms,
                rng_seed: 0,
                deadline_ms: 0,
            };
            let line = encode_line(&HostToGuest::Identity(sample));
            if let Ok(HostToGuest::Identity(sample)) = decode_line::<HostToGuest>(&line) {
                let _ = apply_identity(&sample);
                let key = hex::decode(&sample.ticket_key).unwrap_or_default();
                let _ = berth_protocol::ticket::verify("x.y.z", &key, &sample.session_id, 0);
                sdk_round_trip();
                self.sdk.prewarm_game(
                    wall_clock_ms,
                    Duration::from_millis(berth_protocol::sdk::PREWARM_TIMEOUT_MS),
                );
                let _ = encode_line(&GuestToHost::Ready {
                    session_id: sample.session_id,
                    vm_id: sample.vm_id,
                    clock_ms: berth_protocol::now_ms(),
                    apply_us: 0,
                });
            }
        }
        self.reporter.send(&GuestToHost::Prewarmed);
    }

    fn activate(&mut self, identity: Identity) {
        let t0 = Instant::now();
        if let Some(current) = self.life.session_id() {
            let e = ApplyError::AlreadyActivated(current.to_string());
            return self.refuse(e.code(), e.to_string());
        }
        if let Err(e) = apply_identity(&identity) {
            return self.refuse(e.code(), e.to_string());
        }
        match self.life.activate(identity, t0) {
            Ok(()) => self.sdk.wake(),
            Err(e) => self.refuse(e.code, e.message),
        }
    }
}

/// What hostd hears of a report.
fn message(report: Report, game_port: u16) -> GuestToHost {
    match report {
        Report::Initialised { init_ms } => GuestToHost::Initialised {
            version: AGENT_PROTOCOL_VERSION,
            init_ms,
            game_port,
        },
        Report::Ready {
            session_id,
            vm_id,
            apply_us,
        } => GuestToHost::Ready {
            session_id,
            vm_id,
            clock_ms: berth_protocol::now_ms(),
            apply_us,
        },
        Report::Ended {
            session_id,
            reason,
            results,
        } => GuestToHost::Ended {
            session_id,
            reason,
            results,
        },
        Report::GameExited { status, stderr } => GuestToHost::GameExited { status, stderr },
    }
}

/// One `GET /v1/session` to this VM's own SDK, answered and read (prewarm): the codec a
/// game's calls go through, on both sides.
fn sdk_round_trip() {
    use berth_protocol::http1;
    let Ok(mut s) = std::net::TcpStream::connect(berth_protocol::sdk::SDK_ADDR) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let path = berth_protocol::sdk::path::SESSION;
    if http1::write_request(&mut s, "GET", path, None).is_ok() {
        let mut reader = std::io::BufReader::new(s);
        if let Ok(head) = http1::read_head(&mut reader, false) {
            let _ = http1::read_body(&mut reader, &head, 1 << 16);
        }
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
}
