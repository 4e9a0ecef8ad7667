//! The game: what a player and the game server in the VM say to each other.
//!
//! Inside the VM the game server speaks JSON lines on TCP [`crate::guest::GAME_PORT`]. Players
//! never reach that port: they open a websocket to their host's gateway (the `endpoint` of
//! `matched`) and every text frame is one of these messages; the gateway checks the ticket in
//! the first frame and then forwards each frame as one line and each line as one frame.
//!
//! ```text
//! client ─▶ {"type":"join","ticket":"<session ticket>"}        first frame, within 5 s
//! game   ─▶ {"type":"hello", ...}                              the game server answers
//! game   ─▶ {"type":"welcome", ...}                            map, teams, limits
//! game   ─▶ {"type":"state", ...}                              every tick (tick_hz)
//! client ─▶ {"type":"input","seq":1,"dx":1,"dy":0,"fire":true,"aim":0.5}
//! client ─▶ {"type":"ping","nonce":7}  ◀─ {"type":"pong","nonce":7,...}
//! game   ─▶ {"type":"ended","reason":"score_limit","results":{...}}   then the socket closes
//! ```
//!
//! The game runs at a fixed tick; a player moves at [`PLAYER_SPEED`] tiles per second in the
//! direction of its last input, and `fire` shoots toward `aim` (radians, 0 = +x, y grows
//! downwards) every [`FIRE_COOLDOWN_MS`] at most. A shot that hits an opponent costs it
//! [`SHOT_DAMAGE`] of its [`MAX_HP`]; at zero the opponent's death counts one point for the
//! shooter's team and it respawns after [`RESPAWN_MS`].

use crate::ids::{PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};

/// The gateway's websocket path (hosts advertise `ws://ADDR:PORT/v1/game`).
pub const PATH: &str = "/v1/game";

/// Where a client times its round trip to a gateway before it queues with latencies: `GET`
/// answers `204 No Content` on the gateway's port.
pub const PROBE_PATH: &str = "/v1/probe";

/// The probe URL of the gateway advertised as `gateway` (`ws://h:p/v1/game` gives
/// `http://h:p/v1/probe`, `wss://` gives `https://`); `None` if it is not a websocket URL.
pub fn probe_url(gateway: &str) -> Option<String> {
    let (scheme, rest) = gateway.split_once("://")?;
    let scheme = match scheme {
        "ws" => "http",
        "wss" => "https",
        _ => return None,
    };
    let authority = rest
        .split(['/', '?', '#'])
        .next()
        .filter(|a| !a.is_empty())?;
    Some(format!("{scheme}://{authority}{PROBE_PATH}"))
}

/// Tiles per second.
pub const PLAYER_SPEED: f32 = 6.0;
/// Tiles per second.
pub const SHOT_SPEED: f32 = 18.0;
/// How long a shot flies at most.
pub const SHOT_LIFE_MS: u64 = 1_000;
pub const FIRE_COOLDOWN_MS: u64 = 250;
pub const MAX_HP: u8 = 100;
pub const SHOT_DAMAGE: u8 = 25;
pub const RESPAWN_MS: u64 = 2_000;
/// A player's radius in tiles (collisions with walls, shots and other players).
pub const PLAYER_RADIUS: f32 = 0.35;

/// The game's settings, from the mode's `[params]` (every field optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GameParams {
    /// The first team to reach this many points wins.
    pub score_limit: u32,
    /// The game ends after this long; the team with the most points wins (a draw is possible).
    pub time_limit_s: u64,
    /// Simulation and snapshot rate.
    pub tick_hz: u32,
    /// Map file name without `.map`; empty: drawn from the session's seed.
    pub map: String,
    /// How long a dropped player keeps its place (and may rejoin with a fresh ticket).
    pub rejoin_grace_s: u64,
    /// The game ends as `abandoned` when no player has been connected for this long
    /// (counted from the start, so players who never come also end it).
    pub abandon_after_s: u64,
}

impl Default for GameParams {
    fn default() -> Self {
        Self {
            score_limit: 10,
            time_limit_s: 180,
            tick_hz: 20,
            map: String::new(),
            rejoin_grace_s: 30,
            abandon_after_s: 30,
        }
    }
}

/// Client → game server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GameRequest {
    /// Must be the first message of every connection: the session ticket from `matched`.
    Join { ticket: String },
    /// The player's controls; the latest input holds until the next one.
    Input {
        /// Increasing per connection; echoed as `ack` in each state.
        seq: u32,
        /// Movement direction, each component in [-1, 1] (clamped; normalised if longer than 1).
        #[serde(default)]
        dx: f32,
        #[serde(default)]
        dy: f32,
        /// Keep shooting toward `aim`.
        #[serde(default)]
        fire: bool,
        /// Radians; 0 points along +x, π/2 along +y (down).
        #[serde(default)]
        aim: f32,
    },
    /// Answered by `pong` with the same nonce (allowed before `join`).
    Ping {
        #[serde(default)]
        nonce: u64,
    },
    /// Give up: when every connected player of a team has surrendered, the other side wins.
    Surrender,
    /// Leave for good (no rejoin); the connection is closed.
    Leave,
}

/// Game server → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GameAnswer {
    /// Sent on connect, before anything is read: the moment activation benchmarks measure.
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
    /// The answer to a valid `join`.
    Welcome(Welcome),
    /// The world, every tick.
    State(Snapshot),
    Pong {
        #[serde(default)]
        nonce: u64,
        clock_ms: u64,
    },
    /// The game is over; the connection closes after this.
    Ended {
        reason: String,
        results: GameResults,
    },
    Error {
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub session_id: SessionId,
    pub player: PlayerId,
    pub team: u32,
    pub teams: Vec<Vec<PlayerId>>,
    pub tick_hz: u32,
    pub score_limit: u32,
    /// Guest wall clock when the time limit ends the game.
    pub ends_at_ms: u64,
    /// True when this player had joined before (its score and place were kept).
    pub rejoined: bool,
    pub map: MapView,
}

/// The map: `rows[y]` is a string of `#` (wall) and `.` (floor); one character per tile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapView {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub rows: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub tick: u64,
    /// Guest wall clock at this tick.
    pub clock_ms: u64,
    pub time_left_ms: u64,
    /// Points per team (index = team).
    pub scores: Vec<u32>,
    pub players: Vec<PlayerView>,
    pub shots: Vec<ShotView>,
    /// The last input `seq` the game applied from this connection.
    pub ack: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlayerView {
    pub id: PlayerId,
    pub team: u32,
    /// Position in tiles (centre of the player).
    pub x: f32,
    pub y: f32,
    pub hp: u8,
    pub alive: bool,
    /// Has a live connection now.
    pub connected: bool,
    pub kills: u32,
    pub deaths: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShotView {
    pub x: f32,
    pub y: f32,
    pub dx: f32,
    pub dy: f32,
    pub team: u32,
}

/// What the game reports at its end: to the players in `ended`, and through the agent and
/// hostd to the server, which hands it to every player in `session_ended`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GameResults {
    /// The winning team; `None` for a draw or an abandoned game.
    pub winner: Option<u32>,
    /// Points per team.
    pub scores: Vec<u32>,
    pub players: Vec<PlayerResult>,
    pub map: String,
    pub duration_ms: u64,
    pub ticks: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlayerResult {
    pub id: PlayerId,
    pub team: u32,
    pub kills: u32,
    pub deaths: u32,
    /// Ever joined the game.
    pub joined: bool,
    /// Left for good, surrendered, or was away past the rejoin grace.
    pub left: bool,
}

/// Why a game ended (`ended.reason`, and the session's end reason on the server).
pub mod reason {
    pub const SCORE_LIMIT: &str = "score_limit";
    pub const TIME_LIMIT: &str = "time_limit";
    /// Every (connected) player of a team surrendered; the other side wins.
    pub const SURRENDER: &str = "surrender";
    /// Every player of a team left for good (or stayed away past the rejoin grace).
    pub const FORFEIT: &str = "forfeit";
    /// No player connected for `abandon_after_s`, or every player left.
    pub const ABANDONED: &str = "abandoned";
}

/// Error codes of the game server and the gateway (`error.code`); the gateway also closes the
/// websocket with the close code given in `docs/protocol.md`.
pub mod code {
    /// The first message was not `join`.
    pub const JOIN_FIRST: &str = "join_first";
    /// No `join` within the time allowed.
    pub const JOIN_TIMEOUT: &str = "join_timeout";
    /// The ticket is not a valid JWT signed with this session's key.
    pub const BAD_TICKET: &str = "bad_ticket";
    pub const TICKET_EXPIRED: &str = "ticket_expired";
    /// The ticket is for another session.
    pub const WRONG_SESSION: &str = "wrong_session";
    /// The ticket's player is not in this session.
    pub const NOT_A_PLAYER: &str = "not_a_player";
    /// Another live connection already uses this very ticket.
    pub const TICKET_IN_USE: &str = "ticket_in_use";
    /// A newer connection of the same player took over.
    pub const REPLACED: &str = "replaced";
    /// The player left (or surrendered and was away past the grace) and cannot come back.
    pub const LEFT: &str = "left";
    /// No live session with that id on this host (gateway).
    pub const UNKNOWN_SESSION: &str = "unknown_session";
    /// The game server could not be reached (gateway).
    pub const GAME_UNREACHABLE: &str = "game_unreachable";
    /// The VM has no session yet.
    pub const NOT_ACTIVATED: &str = "not_activated";
    /// The game is over.
    pub const GAME_OVER: &str = "game_over";
    /// The session moved to another host (a live migration, e.g. off a draining host): the
    /// game goes on there. Connect to the `endpoint` of the `matched` that `/v1/play` sends
    /// for the same session, with its ticket (gateway).
    pub const SESSION_MOVED: &str = "session_moved";
    /// A frame that is not one text message on one line (binary, or a raw newline inside).
    pub const BAD_FRAME: &str = "bad_frame";
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The host is stopping (gateway).
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// The gateway holds `[gateway] max_connections` already (HTTP 503 before the upgrade).
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_with_defaults() {
        let input: GameRequest =
            serde_json::from_str(r#"{"type":"input","seq":3,"dx":1}"#).expect("input");
        assert_eq!(
            input,
            GameRequest::Input {
                seq: 3,
                dx: 1.0,
                dy: 0.0,
                fire: false,
                aim: 0.0
            }
        );
        let ping: GameRequest = serde_json::from_str(r#"{"type":"ping"}"#).expect("ping");
        assert_eq!(ping, GameRequest::Ping { nonce: 0 });
        let params: GameParams =
            serde_json::from_str(r#"{"score_limit":3}"#).expect("params default the rest");
        assert_eq!(params.score_limit, 3);
        assert_eq!(params.tick_hz, 20);
    }

    #[test]
    fn probe_urls_follow_the_gateways_scheme_and_authority() {
        assert_eq!(
            probe_url("ws://10.77.8.10:7071/v1/game").as_deref(),
            Some("http://10.77.8.10:7071/v1/probe")
        );
        assert_eq!(
            probe_url("wss://g.example:443/v1/game?x=1").as_deref(),
            Some("https://g.example:443/v1/probe")
        );
        assert_eq!(
            probe_url("wss://[::1]:7071").as_deref(),
            Some("https://[::1]:7071/v1/probe")
        );
        assert_eq!(probe_url("http://a/v1/game"), None);
        assert_eq!(probe_url("ws:///v1/game"), None);
        assert_eq!(probe_url("nonsense"), None);
    }
}
