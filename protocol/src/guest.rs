//! hostd ↔ agent messages: one JSON object per line, at most [`MAX_LINE`] bytes.
//!
//! ```text
//! boot ──▶ agent: {"type":"initialised", ...}          (substrate can now be docked)
//! hostd ─▶ agent: {"type":"identity", ...}             (after restore + cont)
//! agent ─▶ hostd: {"type":"ready", ...}                (game server accepts players)
//! agent ─▶ hostd: {"type":"heartbeat", ...}            (every HEARTBEAT_INTERVAL)
//! agent ─▶ hostd: {"type":"ended", ...}                (game over, with results)
//! agent ─▶ hostd: {"type":"game_exited", ...}         (the game server's process died)
//! agent ─▶ hostd: {"type":"error", "code": ..., ...}   (a line hostd sent was refused)
//! hostd ─▶ agent: {"type":"prewarm","wall_clock_ms":…} → {"type":"prewarmed"}  (before docking; warm tier)
//! ```

use crate::ids::{PlayerId, SessionId, VmId};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::time::Duration;

/// Bumped on any incompatible change of these messages.
pub const AGENT_PROTOCOL_VERSION: u32 = 2;

/// Longest line either side accepts, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// How often an activated agent says it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// Name of the virtio-serial port the agent talks on (QEMU driver).
pub const AGENT_PORT_NAME: &str = "berth.agent";

/// TCP port the game server listens on inside the VM.
pub const GAME_PORT: u16 = 7000;

/// Everything a VM learns when it is activated: who it is and what it hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub session_id: SessionId,
    pub vm_id: VmId,
    pub hostname: String,
    #[serde(default)]
    pub players: Vec<PlayerId>,
    /// The players by team (team index = position). Empty: every player is its own team.
    #[serde(default)]
    pub teams: Vec<Vec<PlayerId>>,
    /// Key the game server checks session tickets with (hex-encoded bytes).
    #[serde(default)]
    pub ticket_key: String,
    /// Game parameters from the mode (free-form JSON object).
    #[serde(default)]
    pub params: serde_json::Value,
    /// Host wall-clock time in milliseconds since the Unix epoch when the line was written.
    pub wall_clock_ms: u64,
    /// Seed for the game's RNG; also mixed into the guest kernel's entropy pool.
    pub rng_seed: u64,
    /// When the session must be over (ms since the epoch); 0: no deadline.
    #[serde(default)]
    pub deadline_ms: u64,
}

/// Where the game spec sits in a guest image: what the agent runs as the game server.
pub const GAME_SPEC_PATH: &str = "/etc/berth/game.json";

/// The game server an image runs, as the agent reads it from [`GAME_SPEC_PATH`] (written by
/// the image builder from the game's manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameSpec {
    /// The game's name (the image's).
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Extra environment (the agent adds `BERTH_SDK`).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// The working directory.
    #[serde(default = "GameSpec::default_cwd")]
    pub cwd: String,
    /// The TCP port the game serves players on.
    #[serde(default = "GameSpec::default_port")]
    pub game_port: u16,
    /// Silence on the SDK's `health` past this, once ready, ends the session `game_unhealthy`.
    #[serde(default = "GameSpec::default_health")]
    pub health_timeout_ms: u64,
    /// Whether the game speaks the SDK. When it does not, the agent stands in for it:
    /// `initialised` and `ready` when the game port accepts a connection, `health` while it
    /// does, the session's end when the process exits.
    #[serde(default = "GameSpec::default_sdk")]
    pub sdk: bool,
}

impl GameSpec {
    fn default_cwd() -> String {
        "/".into()
    }
    fn default_port() -> u16 {
        GAME_PORT
    }
    fn default_health() -> u64 {
        crate::sdk::DEFAULT_HEALTH_TIMEOUT_MS
    }
    fn default_sdk() -> bool {
        true
    }
}

/// hostd → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostToGuest {
    Identity(Identity),
    /// Run the activation code paths once without activating: before docking (so the
    /// substrate holds every first-use allocation) and for each warm clone (under TCG a
    /// restored VM translates every code path on first use; the warm clone pays that before a
    /// player waits). The agent sets its wall clock to `wall_clock_ms`, so the substrate's
    /// clock is only as stale as its time parked, and answers [`GuestToHost::Prewarmed`].
    Prewarm {
        wall_clock_ms: u64,
    },
    /// The VM was moved to another host (a live migration): its wall clock lost the pause.
    /// The agent sets it to `wall_clock_ms` and answers nothing.
    Clock {
        wall_clock_ms: u64,
    },
}

/// agent → hostd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestToHost {
    /// The game finished its start-up; the VM may now be docked as a substrate.
    Initialised {
        version: u32,
        /// Milliseconds the game's start-up work took inside the guest.
        init_ms: u64,
        game_port: u16,
    },
    /// Identity applied and the game server accepts players.
    Ready {
        session_id: SessionId,
        vm_id: VmId,
        /// Guest wall clock after applying the identity, ms since the epoch.
        clock_ms: u64,
        /// Microseconds from reading the identity line to this message.
        apply_us: u64,
    },
    Heartbeat {
        uptime_ms: u64,
    },
    /// Answer to [`HostToGuest::Prewarm`].
    Prewarmed,
    /// The game is over.
    Ended {
        session_id: SessionId,
        reason: String,
        #[serde(default)]
        results: serde_json::Value,
    },
    /// The game server's process exited while the VM still needed it: before `initialised`
    /// (priming fails), while parked, or after activation (the agent sends `ended` with
    /// `game_crashed` first). `stderr` is its last lines.
    GameExited {
        status: String,
        #[serde(default)]
        stderr: Vec<String>,
    },
    /// The agent refused a line from hostd.
    Error {
        code: String,
        message: String,
    },
}

/// Why a line could not be decoded; `code()` is stable and safe to log or send.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("line is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("line is not a known message: {0}")]
    Json(#[source] serde_json::Error),
}

impl LineError {
    /// A short stable discriminant, used as an error code and a metric label.
    pub fn code(&self) -> &'static str {
        match self {
            LineError::TooLong { .. } => "line_too_long",
            LineError::NotUtf8 => "not_utf8",
            LineError::Json(e) if e.is_syntax() || e.is_eof() => "bad_json",
            LineError::Json(_) => "bad_message",
        }
    }
}

/// Decodes one line (with or without its trailing newline).
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, LineError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong { max: MAX_LINE });
    }
    let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    serde_json::from_str(text).map_err(LineError::Json)
}

/// Encodes one message as a line, newline included.
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(msg).expect("protocol types always serialise");
    out.push(b'\n');
    out
}

/// Splits a byte stream into bounded lines.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Set while skipping the rest of an oversize line.
    discarding: bool,
}

/// One item out of a [`LineBuffer`].
#[derive(Debug, PartialEq)]
pub enum Line {
    Complete(Vec<u8>),
    TooLong,
}

impl LineBuffer {
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Line>) {
        for &b in data {
            if b == b'\n' {
                if self.discarding {
                    self.discarding = false;
                } else {
                    out.push(Line::Complete(std::mem::take(&mut self.buf)));
                }
                continue;
            }
            if self.discarding {
                continue;
            }
            self.buf.push(b);
            if self.buf.len() > MAX_LINE {
                self.buf = Vec::new();
                self.discarding = true;
                out.push(Line::TooLong);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_bounded() {
        let mut lb = LineBuffer::default();
        let mut out = Vec::new();
        lb.push(b"ab\ncd", &mut out);
        lb.push(b"e\n", &mut out);
        assert_eq!(
            out,
            vec![
                Line::Complete(b"ab".to_vec()),
                Line::Complete(b"cde".to_vec())
            ]
        );
        out.clear();
        lb.push(&vec![b'x'; MAX_LINE + 10], &mut out);
        lb.push(b"tail\nok\n", &mut out);
        assert_eq!(out, vec![Line::TooLong, Line::Complete(b"ok".to_vec())]);
    }

    fn identity() -> Identity {
        Identity {
            teams: vec![],
            session_id: SessionId::new("s1").expect("valid"),
            vm_id: VmId::new("vm1").expect("valid"),
            hostname: "berth-vm1".into(),
            players: vec![PlayerId::new("alice").expect("valid")],
            ticket_key: "00ff".into(),
            params: serde_json::json!({"score_limit": 10}),
            wall_clock_ms: 1_700_000_000_000,
            rng_seed: 42,
            deadline_ms: 0,
        }
    }

    #[test]
    fn identity_round_trips_as_one_line() {
        let line = encode_line(&HostToGuest::Identity(identity()));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: HostToGuest = decode_line(&line).expect("decodes");
        assert_eq!(back, HostToGuest::Identity(identity()));
    }

    #[test]
    fn bad_lines_get_stable_codes() {
        let e = decode_line::<HostToGuest>(b"{not json").expect_err("syntax");
        assert_eq!(e.code(), "bad_json");
        let e = decode_line::<HostToGuest>(br#"{"type":"reboot"}"#).expect_err("unknown");
        assert_eq!(e.code(), "bad_message");
        let e = decode_line::<HostToGuest>(&[0xff, 0xfe]).expect_err("utf8");
        assert_eq!(e.code(), "not_utf8");
        let long = vec![b'a'; MAX_LINE + 1];
        let e = decode_line::<HostToGuest>(&long).expect_err("long");
        assert_eq!(e.code(), "line_too_long");
        let e = decode_line::<GuestToHost>(
            br#"{"type":"ready","session_id":"../x","vm_id":"v","clock_ms":1,"apply_us":1}"#,
        )
        .expect_err("bad id");
        assert_eq!(e.code(), "bad_message");
    }

    #[test]
    fn unknown_identity_fields_are_refused() {
        let mut v = serde_json::to_value(HostToGuest::Identity(identity())).expect("value");
        v["surprise"] = serde_json::json!(1);
        let line = serde_json::to_vec(&v).expect("bytes");
        assert!(decode_line::<HostToGuest>(&line).is_err());
    }
}
