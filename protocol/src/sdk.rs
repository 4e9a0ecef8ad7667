//! The game-server SDK: what a game server inside a Berth VM says to the agent, over HTTP/1.1
//! with JSON bodies on loopback ([`SDK_ADDR`], also in the game's environment as
//! [`SDK_ENV`]). `docs/sdk.md` is the contract; these are its types.
//!
//! ```text
//! game ─▶ POST /v1/initialised                 loaded; the VM may be docked as a substrate
//! game ─▶ GET  /v1/activation                  blocks (across docking) until activated ─▶ Activation
//! game ─▶ POST /v1/ready                       accepting players: the session becomes active
//! game ─▶ POST /v1/tickets/verify {ticket}     ─▶ {player, team} or a stable error code
//! game ─▶ POST /v1/players/joined {player}     (and /v1/players/left)
//! game ─▶ POST /v1/health                      at least every `health_timeout_ms`
//! game ─▶ POST /v1/ended {reason, results}     the match is over; results reach every player
//! game ─▶ GET  /v1/session                     where this VM is in its life (any time)
//! game ─▶ GET  /v1/prewarm                     optional: blocks until a warm-up is asked ─▶ Prewarm
//! game ─▶ POST /v1/prewarmed                   the warm-up is done
//! ```
//!
//! Every answer is JSON; a refusal is `{"code","message"}` ([`SdkError`]) with the HTTP status
//! [`status_of`] gives its code.

use crate::ids::{PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};

/// The SDK's version: the `v` of every answer, and the prefix of every path (`/v1/…`).
pub const SDK_VERSION: u32 = 1;

/// Where the agent serves the SDK inside the VM.
pub const SDK_ADDR: &str = "127.0.0.1:7001";

/// The environment variable that tells a game server the SDK's address (`host:port`).
pub const SDK_ENV: &str = "BERTH_SDK";

/// The largest request body the agent reads (a bigger one is refused `too_large`).
pub const MAX_BODY: usize = 64 * 1024;

/// The largest `results` of `ended`, as JSON text (a bigger one is refused
/// `results_too_large`).
pub const MAX_RESULTS: usize = 32 * 1024;

/// The longest `reason` of `ended`.
pub const MAX_REASON: usize = 64;

/// How long a game may go without `POST /v1/health` after `ready` when its image sets no limit.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 10_000;

/// The paths, without the version prefix's slash ambiguity: each is the whole path.
pub mod path {
    pub const INITIALISED: &str = "/v1/initialised";
    pub const ACTIVATION: &str = "/v1/activation";
    pub const READY: &str = "/v1/ready";
    pub const VERIFY: &str = "/v1/tickets/verify";
    pub const JOINED: &str = "/v1/players/joined";
    pub const LEFT: &str = "/v1/players/left";
    pub const HEALTH: &str = "/v1/health";
    pub const ENDED: &str = "/v1/ended";
    pub const SESSION: &str = "/v1/session";
    pub const PREWARM: &str = "/v1/prewarm";
    pub const PREWARMED: &str = "/v1/prewarmed";
}

/// Why the agent refused an SDK call (`code` is stable; `message` is for people).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdkError {
    pub code: String,
    pub message: String,
}

/// The SDK's error codes.
pub mod code {
    /// No such path (or a version this agent does not speak).
    pub const NOT_FOUND: &str = "not_found";
    /// The path exists, with another method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// The body is not the JSON the call takes.
    pub const BAD_BODY: &str = "bad_body";
    /// Not an HTTP/1.1 request this SDK reads (the connection is then closed).
    pub const BAD_REQUEST: &str = "bad_request";
    /// The body is larger than [`super::MAX_BODY`].
    pub const TOO_LARGE: &str = "too_large";
    /// `results` is larger than [`super::MAX_RESULTS`].
    pub const RESULTS_TOO_LARGE: &str = "results_too_large";
    /// The call needs a session and this VM has none yet (`ready`, `verify`, `ended`, ...).
    pub const NOT_ACTIVATED: &str = "not_activated";
    /// `initialised` after activation (or a second one is harmless: it answers 200).
    pub const ALREADY_ACTIVATED: &str = "already_activated";
    /// `ready` or a player call after `ended`; a second `ended`.
    pub const ALREADY_ENDED: &str = "already_ended";
    /// `joined`/`left` for someone who is not a player of the session.
    pub const NOT_A_PLAYER: &str = "not_a_player";
    /// The agent is stopping (the VM is being destroyed).
    pub const SHUTTING_DOWN: &str = "shutting_down";
    // `verify` refuses with the ticket codes of `game::code`: `bad_ticket`, `ticket_expired`,
    // `wrong_session`, `not_a_player`.
}

/// The HTTP status of an SDK error code.
pub fn status_of(code: &str) -> u16 {
    match code {
        code::NOT_FOUND => 404,
        code::METHOD_NOT_ALLOWED => 405,
        code::TOO_LARGE | code::RESULTS_TOO_LARGE => 413,
        code::NOT_ACTIVATED | code::ALREADY_ACTIVATED | code::ALREADY_ENDED => 409,
        code::SHUTTING_DOWN => 503,
        "bad_ticket" | "ticket_expired" | "wrong_session" => 403,
        code::NOT_A_PLAYER => 403,
        _ => 400,
    }
}

/// `GET /v1/activation`: who this VM now is and what it hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    pub v: u32,
    pub session_id: SessionId,
    pub vm_id: VmId,
    pub hostname: String,
    pub players: Vec<PlayerId>,
    /// The players by team (team index = position). Empty: every player is its own team.
    pub teams: Vec<Vec<PlayerId>>,
    /// The mode's game parameters (a JSON object, free-form).
    pub params: serde_json::Value,
    /// Seed the game's random numbers from this (each session has its own).
    pub rng_seed: u64,
    /// When the session must be over (ms since the epoch); 0 when it has no deadline.
    pub deadline_ms: u64,
    /// The wall clock the agent set at activation (ms since the epoch).
    pub wall_clock_ms: u64,
}

/// `POST /v1/initialised` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Initialised {
    /// The game serves the warm-up hook (`GET /v1/prewarm`): the agent waits for it.
    #[serde(default)]
    pub warm_up: bool,
}

/// `GET /v1/prewarm`: run your first-use paths now (a warm clone before any match, or the VM
/// before docking); then `POST /v1/prewarmed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prewarm {
    pub v: u32,
    /// The wall clock the agent set (ms since the epoch).
    pub wall_clock_ms: u64,
}

/// How long the agent waits for a game's `prewarmed` before it tells hostd it is done anyway.
pub const PREWARM_TIMEOUT_MS: u64 = 5_000;

/// `POST /v1/tickets/verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub ticket: String,
}

/// A valid ticket: whose it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verified {
    pub player: PlayerId,
    /// The player's team (its index in `teams`); with no teams, the player's own index.
    pub team: u32,
    /// When the ticket expires (seconds since the epoch).
    pub expires_s: u64,
    /// The ticket's own id: the same ticket presented twice has the same id (a replay, or a
    /// reconnect), a renewed ticket another.
    pub ticket_id: String,
}

/// `POST /v1/players/joined` and `/v1/players/left`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlayerEvent {
    pub player: PlayerId,
}

/// `POST /v1/ended`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ended {
    /// The game's own reason (`score_limit`, `surrender`, ...; at most [`MAX_REASON`] bytes of
    /// `[a-z0-9_]`); empty means `game_over`.
    #[serde(default)]
    pub reason: String,
    /// The match's results, as the game defines them: they reach the server and every player.
    #[serde(default)]
    pub results: serde_json::Value,
}

/// Where a VM is in its life, as `GET /v1/session` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Booting: the game has not said `initialised`.
    Starting,
    /// Initialised, waiting to be activated (docked as a substrate, or a warm clone).
    Waiting,
    /// Activated; the game has not said `ready`.
    Activated,
    Ready,
    Ended,
}

/// `GET /v1/session`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    pub v: u32,
    pub phase: Phase,
    pub session_id: Option<SessionId>,
    /// Players who joined and have not left.
    pub connected: Vec<PlayerId>,
}

/// The answer of a call that returns nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub v: u32,
    pub ok: bool,
}

impl Default for Done {
    fn default() -> Self {
        Done {
            v: SDK_VERSION,
            ok: true,
        }
    }
}

/// Is `reason` a reason a game may end with (empty, or `[a-z0-9_]`, at most [`MAX_REASON`])?
pub fn valid_reason(reason: &str) -> bool {
    reason.len() <= MAX_REASON
        && reason
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_statuses_and_reasons_are_checked() {
        assert_eq!(status_of(code::NOT_ACTIVATED), 409);
        assert_eq!(status_of(code::RESULTS_TOO_LARGE), 413);
        assert_eq!(status_of("bad_ticket"), 403);
        assert_eq!(status_of(code::BAD_BODY), 400);
        assert!(valid_reason("score_limit"));
        assert!(valid_reason(""));
        assert!(!valid_reason("Score Limit"));
        assert!(!valid_reason(&"a".repeat(65)));
    }

    #[test]
    fn bodies_refuse_unknown_fields_and_default_what_is_optional() {
        let e: Ended = serde_json::from_str("{}").expect("empty ended");
        assert_eq!(e.reason, "");
        assert!(serde_json::from_str::<Ended>(r#"{"reason":"x","extra":1}"#).is_err());
        assert!(serde_json::from_str::<VerifyRequest>(r#"{}"#).is_err());
    }
}
