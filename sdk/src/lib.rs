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

use berth_protocol::http1::{self, HttpError};
use berth_protocol::sdk::{path, Ended, Initialised, PlayerEvent, VerifyRequest};
pub use berth_protocol::sdk::{
    Activation, Phase, Prewarm, SessionState, Verified, DEFAULT_HEALTH_TIMEOUT_MS, SDK_ADDR,
    SDK_ENV,
};
use berth_protocol::PlayerId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::BufReader;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
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

/// A client of the agent's SDK. Cheap to clone; safe to share between threads: each call
/// takes a kept-alive connection, or opens one.
#[derive(Debug, Clone)]
pub struct Sdk {
    addr: String,
    idle: Arc<Mutex<Vec<Conn>>>,
}

#[derive(Debug)]
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// How long a call (but `activation` and `prewarm`, which wait) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections kept open for the next calls.
const MAX_IDLE: usize = 4;

impl Sdk {
    /// The SDK at `BERTH_SDK` (`host:port`), or at [`SDK_ADDR`].
    pub fn from_env() -> Self {
        Self::new(&std::env::var(SDK_ENV).unwrap_or_else(|_| SDK_ADDR.to_owned()))
    }

    /// The SDK at `addr` (`host:port`).
    pub fn new(addr: &str) -> Self {
        Sdk {
            addr: addr.to_owned(),
            idle: Arc::new(Mutex::new(Vec::new())),
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
        self.call::<serde_json::Value>("POST", path::INITIALISED, Some(&body), Some(CALL_TIMEOUT))
            .map(drop)
    }

    /// Blocks until this VM is activated, then says for what. A call in flight when the VM
    /// is docked completes in each clone after its activation.
    pub fn activation(&self) -> Result<Activation, SdkError> {
        self.call("GET", path::ACTIVATION, None::<&()>, None)
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
        self.call("POST", path::VERIFY, Some(&body), Some(CALL_TIMEOUT))
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
        self.call::<serde_json::Value>("POST", path::ENDED, Some(&body), Some(CALL_TIMEOUT))
            .map(drop)
    }

    /// Optional warm-up hook: blocks until Berth asks this VM to run its first-use code paths
    /// (each warm clone once, before any match, and the VM once before docking). Run them —
    /// e.g. a throwaway match on loopback — then call [`Sdk::prewarmed`], and wait again.
    /// Under an emulating accelerator (TCG) a restored clone runs every code path slowly the
    /// first time; a warm-up moves that cost off the player's path.
    pub fn prewarm(&self) -> Result<Prewarm, SdkError> {
        self.call("GET", path::PREWARM, None::<&()>, None)
    }

    /// The warm-up asked by [`Sdk::prewarm`] is done.
    pub fn prewarmed(&self) -> Result<(), SdkError> {
        self.post_empty(path::PREWARMED)
    }

    /// Where this VM is in its life.
    pub fn session(&self) -> Result<SessionState, SdkError> {
        self.call("GET", path::SESSION, None::<&()>, Some(CALL_TIMEOUT))
    }

    fn player_event(&self, path: &str, player: &PlayerId) -> Result<(), SdkError> {
        let body = PlayerEvent {
            player: player.clone(),
        };
        self.call::<serde_json::Value>("POST", path, Some(&body), Some(CALL_TIMEOUT))
            .map(drop)
    }

    fn post_empty(&self, path: &str) -> Result<(), SdkError> {
        self.call::<serde_json::Value>(
            "POST",
            path,
            Some(&serde_json::json!({})),
            Some(CALL_TIMEOUT),
        )
        .map(drop)
    }

    /// One call: on a kept-alive connection when there is one (tried again once on a fresh
    /// connection if that one turns out closed), else on a new one.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Option<Duration>,
    ) -> Result<T, SdkError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| SdkError::BadAnswer(e.to_string()))?;
        // A long poll (no timeout: the activation, a warm-up) waits on a connection of its
        // own, so that the kept-alive ones stay for the calls that follow it: `ready`, right
        // after the activation, then goes out on a connection opened before the VM was docked
        // instead of opening one (and making the agent start a thread) on the match's path.
        let kept = match timeout {
            None => None,
            Some(_) => self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop(),
        };
        let (status, answer) = match kept {
            Some(conn) => match exchange(conn, method, path, body.as_deref(), timeout) {
                Ok(done) => self.keep(done),
                // The agent closed the idle connection: nothing was done; once more, afresh.
                Err(Failure::Stale) => self.fresh(method, path, body.as_deref(), timeout)?,
                Err(Failure::Broken(e)) => return Err(self.transport(e)),
            },
            None => self.fresh(method, path, body.as_deref(), timeout)?,
        };
        if (200..300).contains(&status) {
            return serde_json::from_slice(&answer).map_err(|e| SdkError::BadAnswer(e.to_string()));
        }
        let refusal: berth_protocol::sdk::SdkError = serde_json::from_slice(&answer)
            .map_err(|e| SdkError::BadAnswer(format!("status {status}: {e}")))?;
        Err(SdkError::Refused {
            status,
            code: refusal.code,
            message: refusal.message,
        })
    }

    fn fresh(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<(u16, Vec<u8>), SdkError> {
        let writer = TcpStream::connect(&self.addr).map_err(|e| self.transport(e.to_string()))?;
        let _ = writer.set_nodelay(true);
        let reader = BufReader::new(
            writer
                .try_clone()
                .map_err(|e| self.transport(e.to_string()))?,
        );
        match exchange(Conn { reader, writer }, method, path, body, timeout) {
            Ok(done) => Ok(self.keep(done)),
            Err(Failure::Stale) => Err(self.transport("the SDK closed the connection".into())),
            Err(Failure::Broken(e)) => Err(self.transport(e)),
        }
    }

    /// Keeps the connection for the next call unless it closes.
    fn keep(&self, (status, answer, conn): (u16, Vec<u8>, Option<Conn>)) -> (u16, Vec<u8>) {
        if let Some(conn) = conn {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        (status, answer)
    }

    fn transport(&self, message: String) -> SdkError {
        SdkError::Transport {
            addr: self.addr.clone(),
            message,
        }
    }
}

/// Why an exchange failed: the connection was closed before anything was answered (safe to
/// try again), or it broke.
enum Failure {
    Stale,
    Broken(String),
}

/// Writes a request and reads its answer: status, body, and the connection if it stays open.
fn exchange(
    mut conn: Conn,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Option<Duration>,
) -> Result<(u16, Vec<u8>, Option<Conn>), Failure> {
    conn.writer
        .set_read_timeout(timeout)
        .map_err(|e| Failure::Broken(e.to_string()))?;
    if http1::write_request(&mut conn.writer, method, path, body).is_err() {
        return Err(Failure::Stale);
    }
    let head = match http1::read_head(&mut conn.reader, false) {
        Ok(head) => head,
        Err(HttpError::Closed) => return Err(Failure::Stale),
        Err(e) => return Err(Failure::Broken(e.to_string())),
    };
    let answer = http1::read_body(&mut conn.reader, &head, MAX_ANSWER)
        .map_err(|e| Failure::Broken(e.to_string()))?;
    Ok((head.status(), answer, (!head.close).then_some(conn)))
}

/// The largest answer read (an activation carries the mode's parameters).
const MAX_ANSWER: usize = 1 << 20;
