//! `berth-sdk`: the game-server SDK for Rust — a thin, typed, blocking client of the HTTP SDK
//! the agent serves inside every Berth VM (`docs/sdk.md` is the contract; the wire types are
//! [`berth_protocol::sdk`]).
//!
//! A game server's whole life with Berth:
//!
//! ```no_run
//! use berth_sdk::Sdk;
//! # fn load_assets() {} fn serve(_: &berth_sdk::Activation) -> (String, serde_json::Value) { todo!() }
//! let sdk = Sdk::from_env();          // BERTH_SDK, else 127.0.0.1:7001
//! load_assets();                      // the slow start-up: paid once, before docking
//! sdk.initialised()?;                 // the VM may now be parked as a substrate
//! let session = sdk.activation()?;    // blocks, across docking, until a match needs this VM
//! // ... set up the match from session.players, session.params, session.rng_seed ...
//! sdk.ready()?;                       // accepting players: the session is now active
//! // for each connection: sdk.verify(ticket)? → player and team; sdk.joined(&player)?
//! // every few seconds: sdk.health()?
//! let (reason, results) = serve(&session);
//! sdk.ended(&reason, &results)?;      // reaches the server and every player
//! # Ok::<(), berth_sdk::SdkError>(())
//! ```

use berth_protocol::sdk::{path, Ended, Initialised, PlayerEvent, VerifyRequest};
pub use berth_protocol::sdk::{
    Activation, Phase, Prewarm, SessionState, Verified, DEFAULT_HEALTH_TIMEOUT_MS, SDK_ADDR,
    SDK_ENV,
};
use berth_protocol::PlayerId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// Why a call failed: the agent refused it (with its stable code), or it could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("{code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the SDK at {addr} could not be reached: {message}")]
    Transport { addr: String, message: String },
    #[error("the SDK answered {0}")]
    BadAnswer(String),
}

impl SdkError {
    /// The refusal's stable code (`not_activated`, `bad_ticket`, ...); `None` for a transport
    /// failure.
    pub fn code(&self) -> Option<&str> {
        match self {
            SdkError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A client of the agent's SDK. Cheap to clone; safe to share between threads.
#[derive(Debug, Clone)]
pub struct Sdk {
    base: String,
    agent: ureq::Agent,
    /// The same, without a read timeout: `activation` waits as long as the VM stays parked.
    patient: ureq::Agent,
}

impl Sdk {
    /// The SDK at `BERTH_SDK` (`host:port`), or at [`SDK_ADDR`].
    pub fn from_env() -> Self {
        Self::new(&std::env::var(SDK_ENV).unwrap_or_else(|_| SDK_ADDR.to_owned()))
    }

    /// The SDK at `addr` (`host:port`).
    pub fn new(addr: &str) -> Self {
        let builder = || {
            ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .max_idle_connections_per_host(4)
        };
        Sdk {
            base: format!("http://{addr}"),
            agent: builder().timeout(Duration::from_secs(30)).build(),
            patient: builder().build(),
        }
    }

    /// The game has loaded: the VM may now be docked as a substrate.
    pub fn initialised(&self) -> Result<(), SdkError> {
        self.post_empty(path::INITIALISED)
    }

    /// [`Sdk::initialised`], for a game that serves the warm-up hook ([`Sdk::prewarm`]): the
    /// agent then waits for its warm-ups.
    pub fn initialised_with_warm_ups(&self) -> Result<(), SdkError> {
        let body = Initialised { warm_up: true };
        self.call::<serde_json::Value>(&self.agent, "POST", path::INITIALISED, Some(&body))
            .map(drop)
    }

    /// Blocks until this VM is activated, then says for what. A call in flight when the VM
    /// is docked completes in each clone after its activation.
    pub fn activation(&self) -> Result<Activation, SdkError> {
        self.call(&self.patient, "GET", path::ACTIVATION, None::<&()>)
    }

    /// The game accepts players: the session becomes active and players are told `matched`.
    pub fn ready(&self) -> Result<(), SdkError> {
        self.post_empty(path::READY)
    }

    /// Checks a player's session ticket: whose it is, or a refusal with the ticket's code
    /// (`bad_ticket`, `ticket_expired`, `wrong_session`, `not_a_player`).
    pub fn verify(&self, ticket: &str) -> Result<Verified, SdkError> {
        let body = VerifyRequest {
            ticket: ticket.to_owned(),
        };
        self.call(&self.agent, "POST", path::VERIFY, Some(&body))
    }

    /// `player` is connected to the game.
    pub fn joined(&self, player: &PlayerId) -> Result<(), SdkError> {
        self.player_event(path::JOINED, player)
    }

    /// `player` left the game.
    pub fn left(&self, player: &PlayerId) -> Result<(), SdkError> {
        self.player_event(path::LEFT, player)
    }

    /// The game is alive; call at least every `health_timeout_ms` after `ready`.
    pub fn health(&self) -> Result<(), SdkError> {
        self.post_empty(path::HEALTH)
    }

    /// The match is over: `reason` (`[a-z0-9_]`, empty for `game_over`) and the game's
    /// `results` reach the server and every player.
    pub fn ended(&self, reason: &str, results: &serde_json::Value) -> Result<(), SdkError> {
        let body = Ended {
            reason: reason.to_owned(),
            results: results.clone(),
        };
        self.call::<serde_json::Value>(&self.agent, "POST", path::ENDED, Some(&body))
            .map(drop)
    }

    /// Optional warm-up hook: blocks until Berth asks this VM to run its first-use code paths
    /// (each warm clone once, before any match, and the VM once before docking). Run them —
    /// e.g. a throwaway match on loopback — then call [`Sdk::prewarmed`], and wait again.
    /// Under an emulating accelerator (TCG) a restored clone runs every code path slowly the
    /// first time; a warm-up moves that cost off the player's path.
    pub fn prewarm(&self) -> Result<Prewarm, SdkError> {
        self.call(&self.patient, "GET", path::PREWARM, None::<&()>)
    }

    /// The warm-up asked by [`Sdk::prewarm`] is done.
    pub fn prewarmed(&self) -> Result<(), SdkError> {
        self.post_empty(path::PREWARMED)
    }

    /// Where this VM is in its life.
    pub fn session(&self) -> Result<SessionState, SdkError> {
        self.call(&self.agent, "GET", path::SESSION, None::<&()>)
    }

    fn player_event(&self, path: &str, player: &PlayerId) -> Result<(), SdkError> {
        let body = PlayerEvent {
            player: player.clone(),
        };
        self.call::<serde_json::Value>(&self.agent, "POST", path, Some(&body))
            .map(drop)
    }

    fn post_empty(&self, path: &str) -> Result<(), SdkError> {
        self.call::<serde_json::Value>(&self.agent, "POST", path, Some(&serde_json::json!({})))
            .map(drop)
    }

    fn call<T: DeserializeOwned>(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, SdkError> {
        let request = agent.request(method, &format!("{}{path}", self.base));
        let answer = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match answer {
            Ok(r) => r
                .into_json::<T>()
                .map_err(|e| SdkError::BadAnswer(e.to_string())),
            Err(ureq::Error::Status(status, r)) => {
                let refusal: berth_protocol::sdk::SdkError = r
                    .into_json()
                    .map_err(|e| SdkError::BadAnswer(format!("status {status}: {e}")))?;
                Err(SdkError::Refused {
                    status,
                    code: refusal.code,
                    message: refusal.message,
                })
            }
            Err(e) => Err(SdkError::Transport {
                addr: self.base.clone(),
                message: e.to_string(),
            }),
        }
    }
}
