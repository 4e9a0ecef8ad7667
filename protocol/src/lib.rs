//! Every wire type Berth speaks, in one crate so that no side can drift.
//!
//! - [`ids`]: newtype identifiers (`SessionId`, `VmId`, `HostId`, `PlayerId`).
//! - [`guest`]: the line-delimited JSON spoken between hostd and the agent inside a game VM,
//!   over a virtio-serial port (QEMU) or XenStore keys (Xen).
//! - [`game`]: what the game server in the VM answers on its TCP port.
//! - [`framing`]: how players' websocket frames cross the gateway to a game's TCP port.
//! - [`play`]: player ↔ server messages on the `/v1/play` websocket.
//! - [`host`]: hostd ↔ server messages on the `/v1/hosts` websocket.
//! - [`ticket`]: the claims of a session ticket, and its HS256 check.
//! - [`close`]: websocket close codes, shared by every socket.
//! - [`rate`]: the token bucket every socket limits its peer with.
//! - [`http1`]: the small HTTP/1.1 the SDK speaks on loopback, for both of its sides.
//! - [`sdk`]: the game-server SDK a game in a VM speaks to the agent (HTTP/JSON on loopback).
//! - [`codes`]: the typed vocabularies messages carry as strings (error codes, end reasons,
//!   activation paths, substrate states).
//! - [`api`]: the error body of the HTTP APIs (admin, hostd control).
//! - [`xenstore`]: the XenStore key layout hostd's Xen driver and a Xen guest's agent share.
//!
//! Every message carries no version field of its own; the agent announces
//! [`guest::AGENT_PROTOCOL_VERSION`] in its `initialised` message and hostd refuses a guest that
//! speaks another.

pub mod api;
pub mod close;
pub mod codes;
pub mod framing;
pub mod game;
pub mod guest;
pub mod host;
pub mod http1;
pub mod ids;
pub mod play;
pub mod rate;
pub mod sdk;
pub mod ticket;
pub mod xenstore;

pub use codes::{ActivationPath, DequeueReason, EndReason, ErrorCode, RegionRule, SubstrateState};
pub use ids::{HostId, IdError, PlayerId, SessionId, VmId};

/// The most characters of a peer's input an error message quotes back.
pub const ECHO_MAX_CHARS: usize = 64;
/// The most characters of a parser's error text (which may quote a peer's input whole) sent
/// back.
pub const DETAIL_MAX_CHARS: usize = 200;

/// `text` cut to at most `max_chars` characters, `…` marking the cut: so that an error message
/// quoting a peer's input (a 10,000-character region, a serde error naming an unknown field)
/// is never as large as that input.
pub fn clip(text: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => text.into(),
        Some((cut, _)) => format!("{}…", &text[..cut]).into(),
    }
}

/// A peer's input as an error message quotes it: escaped, in quotes, cut to
/// [`ECHO_MAX_CHARS`].
pub fn echo(input: &str) -> String {
    format!("{:?}", clip(input, ECHO_MAX_CHARS))
}

/// Milliseconds since the Unix epoch: the time base of every timestamp on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_input_is_cut_escaped_and_quoted() {
        assert_eq!(echo("mars"), r#""mars""#);
        assert_eq!(echo("a\nb"), r#""a\nb""#);
        let long = "é".repeat(10_000);
        let e = echo(&long);
        assert_eq!(e.chars().count(), ECHO_MAX_CHARS + 3, "{e}");
        assert!(e.ends_with("…\""), "{e}");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc…");
    }
}
