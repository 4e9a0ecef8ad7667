//! What the game server inside a VM speaks on [`crate::guest::GAME_PORT`]: JSON lines.
//!
//! On connect the server sends a [`GameAnswer::Hello`] (this is the "game answers" moment every
//! activation benchmark measures). The client may then send [`GameRequest`]s.

use crate::ids::{PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GameAnswer {
    Hello {
        session_id: SessionId,
        vm_id: VmId,
        hostname: String,
        players: Vec<PlayerId>,
        /// Guest wall clock, ms since the epoch.
        clock_ms: u64,
        /// A number drawn from the game RNG seeded by the identity.
        rng_draw: u64,
        /// Number of map tiles the game loaded from its disk at start-up.
        map_tiles: u64,
    },
    Pong {
        clock_ms: u64,
    },
    Ended,
    Error {
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GameRequest {
    Ping,
    /// End the game now with these results (the full game arrives with a later issue).
    End {
        #[serde(default)]
        results: serde_json::Value,
    },
}
