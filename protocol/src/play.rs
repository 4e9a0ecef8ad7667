//! Player ↔ server messages on the `/v1/play` websocket: one JSON object per text frame.
//!
//! ```text
//! client: {"type":"hello","v":1,"token":"<jwt>"}       (token optional if sent as a bearer header)
//! server: {"type":"welcome","v":1,"player":"alice",...}
//!         then the player's current state, if any: queue_status | matched
//! client: {"type":"queue","mode":"duel","region":"local","skill":1200}
//!     or: {"type":"queue","mode":"duel","latencies":{"eu":38,"us":120}}
//! server: {"type":"queue_status",...}  (on queueing, then every few seconds while queued)
//! server: {"type":"matched","session":"…","endpoint":"ws://…","ticket":"<jwt>",...}
//! server: {"type":"session_ended","session":"…","reason":"game_over","results":{…}}
//! ```
//! The full page for client authors is `docs/protocol.md`.

use crate::codes::{DequeueReason, EndReason, ErrorCode, RegionRule};
use crate::ids::{PlayerId, SessionId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The pool region of tickets queued with `latencies` instead of a region: such players are
/// matched with each other, in the region best for the group (`queue_status.region`).
pub const BY_LATENCY: &str = "*";

/// At most this many regions in one `queue.latencies`.
pub const MAX_LATENCIES: usize = 32;

/// The highest latency a client may report, in milliseconds.
pub const MAX_LATENCY_MS: u32 = 60_000;

/// Bumped on any incompatible change of these messages; sent in `hello` and `welcome`.
pub const PLAY_PROTOCOL_VERSION: u32 = 1;

/// A party queues together: every member sends `queue` with the same party id and size; the
/// party is matched once all `size` members are queued, always into the same team.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartySpec {
    pub id: String,
    pub size: u32,
}

/// client → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Must be the first message. `token` is the player's JWT unless it came as an
    /// `Authorization: Bearer` header.
    Hello {
        v: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Ask for a match, in one named `region` or, with `latencies`, in the region best for the
    /// group (exactly one of the two).
    Queue {
        mode: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// Round-trip milliseconds the client measured to each region's gateways (`GET
        /// /v1/regions` lists their probes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latencies: Option<BTreeMap<String, u32>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        party: Option<PartySpec>,
        /// Matchmaking rating; players within the mode's (widening) skill window are matched.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        skill: Option<f64>,
    },
    /// Leave the queue (no effect once matched).
    Cancel {},
    Ping {
        #[serde(default)]
        nonce: u64,
    },
}

/// The state a player is in, repeated to a player who reconnects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        v: u32,
        player: PlayerId,
        /// The client should send `ping` at least this often; the server drops silent sockets.
        ping_interval_ms: u64,
        /// How long a disconnected player keeps its place in the queue.
        reconnect_grace_ms: u64,
    },
    QueueStatus {
        ticket: String,
        mode: String,
        /// The region queued for, or [`BY_LATENCY`] (`*`) when queued with latencies.
        region: String,
        waited_ms: u64,
        /// Players queued in this mode and region right now.
        queued: u64,
        /// The skill window the ticket is matched within now (it widens with waiting).
        skill_window: f64,
        /// Queued with latencies: the latency every player of a match must have to its region
        /// now (it widens with waiting).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency_allowed_ms: Option<u32>,
    },
    /// The player left the queue: `reason` is `cancelled`, `max_wait`, `away`, `mode_removed`
    /// or `ticket_lost`.
    Dequeued {
        ticket: String,
        reason: DequeueReason,
    },
    /// A game server VM is running for this player: connect to `endpoint` with `ticket`.
    Matched {
        session: SessionId,
        mode: String,
        /// The region the match is played in, and why it was chosen.
        #[serde(default)]
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region_reason: Option<RegionReason>,
        endpoint: String,
        /// A short-lived session ticket (JWT) bound to this session and this player.
        ticket: String,
        ticket_expires_ms: u64,
        /// The session ends at the latest at this time (ms since the epoch).
        deadline_ms: u64,
        /// Index of the player's team in `teams`.
        team: u32,
        teams: Vec<Vec<PlayerId>>,
    },
    SessionEnded {
        session: SessionId,
        /// Berth's own reasons (`admin`, `vm_failed`, `host_lost`, `deadline`,
        /// `placement_failed`, `vm_lost`, `game_over`) or the game's (`score_limit`, …).
        reason: EndReason,
        #[serde(default)]
        results: serde_json::Value,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Pong {
        nonce: u64,
        server_ms: u64,
    },
}

/// Why a match is played in its region (`matched.region_reason`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionReason {
    pub rule: RegionRule,
    /// `latency`: the highest latency of any player of the match to the region, as measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_ms: Option<u32>,
    /// `latency`: the latency allowed when the match formed (it widens with the oldest
    /// player's wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ms: Option<u32>,
}

impl RegionReason {
    pub fn named() -> Self {
        RegionReason {
            rule: RegionRule::Named,
            worst_ms: None,
            allowed_ms: None,
        }
    }
}

/// `GET /v1/regions`: the regions that have hosts now, each with a few gateway probe URLs to
/// time (`GET`, answered `204`) before queueing with `latencies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Regions {
    pub regions: Vec<RegionProbes>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionProbes {
    pub region: String,
    pub probes: Vec<String>,
}

impl ServerMessage {
    pub fn error(code: impl Into<ErrorCode>, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_documented_shape() {
        let m: ClientMessage =
            serde_json::from_str(r#"{"type":"queue","mode":"duel","region":"eu","skill":1200}"#)
                .expect("valid queue");
        assert_eq!(
            m,
            ClientMessage::Queue {
                mode: "duel".into(),
                region: Some("eu".into()),
                latencies: None,
                party: None,
                skill: Some(1200.0)
            }
        );
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"cancel","x":1}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"dance"}"#).is_err());
        let s = serde_json::to_value(ServerMessage::error("bad_json", "no")).expect("serialise");
        assert_eq!(s["type"], "error");
        assert_eq!(s["code"], "bad_json");
    }
}
