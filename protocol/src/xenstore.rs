//! The XenStore layout hostd's Xen driver and the agent in a Xen guest meet in: the keys, which
//! side writes each, the size limit of a value and how a message is encoded in it. Both sides
//! use this module, so the layout is written once.
//!
//! ```text
//! /local/domain/<domid>/            the guest names these relative to its own domain
//!   data/berth/identity      hostd → agent  one identity JSON line (written before unpause)
//!   data/berth/initialised   agent → hostd  at boot: the substrate may be docked
//!   data/berth/ready         agent → hostd  `ready`, or the `error` refusing the identity
//!   data/berth/event         agent → hostd  heartbeats, then `ended` (never overwritten)
//! ```
//! A value is the message's JSON line ([`crate::guest::encode_line`]) without its newline. One
//! XenStore request carries the path, a NUL and the value in at most [`PAYLOAD_MAX`] bytes, so
//! the longest value depends on the path as the writer spells it ([`max_value_len`]): the guest
//! writes relative paths, hostd absolute ones.

use crate::guest::{encode_line, GuestToHost};
use serde::Serialize;

/// The agent's directory, relative to its domain's `/local/domain/<domid>/`.
pub const DIR: &str = "data/berth";
/// hostd → agent: the identity line.
pub const IDENTITY_KEY: &str = "data/berth/identity";
/// agent → hostd: `initialised`.
pub const INITIALISED_KEY: &str = "data/berth/initialised";
/// agent → hostd: `ready`, or the `error` refusing an identity.
pub const READY_KEY: &str = "data/berth/ready";
/// agent → hostd: heartbeats and `ended`.
pub const EVENT_KEY: &str = "data/berth/event";

/// The largest XenStore request payload (Xen's `XENSTORE_PAYLOAD_MAX`): path, NUL and value.
pub const PAYLOAD_MAX: usize = 4096;

/// The most bytes a value written at `path` (as the writer spells it) may have.
pub fn max_value_len(path: &str) -> usize {
    PAYLOAD_MAX.saturating_sub(path.len() + 1)
}

/// The absolute path of one of the keys above in domain `domid`'s directory (hostd's view).
pub fn domain_path(domid: u32, key: &str) -> String {
    format!("/local/domain/{domid}/{key}")
}

/// The key an agent message goes to.
pub fn key_for(msg: &GuestToHost) -> &'static str {
    match msg {
        GuestToHost::Initialised { .. } => INITIALISED_KEY,
        // `prewarmed` answers a request as `ready` does; hostd's Xen driver never sends
        // `prewarm` (a TCG concern), so it only lands here if a future hostd does.
        GuestToHost::Ready { .. } | GuestToHost::Error { .. } | GuestToHost::Prewarmed => READY_KEY,
        GuestToHost::Heartbeat { .. }
        | GuestToHost::Ended { .. }
        | GuestToHost::GameExited { .. } => EVENT_KEY,
    }
}

/// A message as a XenStore value: its JSON line without the newline.
pub fn value_of<T: Serialize>(msg: &T) -> String {
    let mut line = encode_line(msg);
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// A value that does not fit at its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the value is {bytes} bytes; a XenStore value at {path} holds at most {max}")]
pub struct ValueTooLarge {
    pub path: String,
    pub bytes: usize,
    pub max: usize,
}

/// `msg` as the value at `path`, or why it does not fit.
pub fn checked_value<T: Serialize>(msg: &T, path: &str) -> Result<String, ValueTooLarge> {
    let value = value_of(msg);
    let max = max_value_len(path);
    if value.len() > max {
        return Err(ValueTooLarge {
            path: path.to_owned(),
            bytes: value.len(),
            max,
        });
    }
    Ok(value)
}

/// The value at an absolute or relative path as a line for a line reader; `None` while it
/// holds nothing.
pub fn value_line(value: &str) -> Option<Vec<u8>> {
    let value = value.trim_end_matches(['\n', '\r']);
    if value.trim().is_empty() {
        return None;
    }
    let mut line = value.as_bytes().to_vec();
    line.push(b'\n');
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_limits() {
        assert_eq!(
            domain_path(7, IDENTITY_KEY),
            "/local/domain/7/data/berth/identity"
        );
        for key in [IDENTITY_KEY, INITIALISED_KEY, READY_KEY, EVENT_KEY] {
            assert!(key.starts_with(DIR), "{key}");
            assert_eq!(max_value_len(key), PAYLOAD_MAX - key.len() - 1);
        }
        let hb = GuestToHost::Heartbeat { uptime_ms: 1 };
        assert_eq!(key_for(&hb), EVENT_KEY);
        assert!(!value_of(&hb).ends_with('\n'));
        assert_eq!(value_line("x\n"), Some(b"x\n".to_vec()));
        assert_eq!(value_line("  "), None);
        let big = GuestToHost::Error {
            code: "x".into(),
            message: "y".repeat(PAYLOAD_MAX),
        };
        let e = checked_value(&big, READY_KEY).expect_err("too big");
        assert_eq!(e.max, max_value_len(READY_KEY));
    }
}
