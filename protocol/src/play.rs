//! Player ↔ server messages on the `/v1/play` websocket: one JSON object per text frame.
//!
//! ```text
//! client: {"type":"hello","v":1,"token":"<jwt>"}       (token optional if sent as a bearer header)
//! server: {"type":"welcome","v":1,"player":"alice",...}
//!         then the player's current state, if any: queue_status | matched
//! client: {"type":"queue","mode":"duel","region":"local","skill":1200}
//! server: {"type":"queue_status",...}  (on queueing, then every few seconds while queued)
//! server: {"type":"matched","session":"…","endpoint":"ws://…","ticket":"<jwt>",...}
//! server: {"type":"session_ended","session":"…","reason":"game_over","results":{…}}
//! ```
//! The full page for client authors is `docs/protocol.md`.

use crate::codes::{DequeueReason, EndReason, ErrorCode};
use crate::ids::{PlayerId, SessionId};
use serde::{Deserialize, Serialize};

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
    /// Ask for a match.
    Queue {
        mode: String,
        region: String,
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
        region: String,
        waited_ms: u64,
        /// Players queued in this mode and region right now.
        queued: u64,
        /// The skill window the ticket is matched within now (it widens with waiting).
        skill_window: f64,
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
                region: "eu".into(),
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
