//! `berth-client`: the Rust client of Berth's two player-facing sockets, typed with the
//! `berth-protocol` messages — what a game's own tools, bots and tests use instead of
//! hand-writing websocket code.
//!
//! - [`PlayClient`]: the matchmaker, `/v1/play` (hello, queue, cancel, ping, the server's
//!   messages; reconnect with [`Backoff`], which also renews a session ticket).
//! - [`GameClient`]: the game, through a host's gateway `/v1/game` (join with the ticket, the
//!   game's requests and answers, rejoin by joining again).
//! - [`socket`]: the one websocket under both, with optional faults (a delay per message,
//!   a kill with no handshake) for simulated phones.
//! - [`tls`]: which servers a client trusts over `wss://` (Mozilla's roots, plus a private CA).
//! - [`probe`]: hostile clients for tests and chaos runs (a flood that does not read, a frame
//!   that is not UTF-8, a connection that says nothing) and how the server ended them.
//!
//! The wire itself is described in `docs/protocol.md`.
//!
//! ```no_run
//! use berth_client::{GameClient, PlayClient, PlayConfig};
//! use berth_protocol::game::GameRequest;
//! use berth_protocol::play::ServerMessage;
//! use std::time::Duration;
//!
//! # async fn play(token: String) -> Result<(), berth_client::ClientError> {
//! let mut play = PlayClient::connect(PlayConfig::new("ws://127.0.0.1:7080/v1/play", token)).await?;
//! play.queue("duel", "local", None, None).await?;
//! let matched = play
//!     .until(Duration::from_secs(60), |m| matches!(m, ServerMessage::Matched { .. }))
//!     .await?;
//! let ServerMessage::Matched { endpoint, ticket, .. } = matched else { unreachable!() };
//! let mut game = GameClient::connect_url(&endpoint, Default::default()).await?;
//! game.send(&GameRequest::Join { ticket }).await?;
//! let welcome = game.next(Duration::from_secs(5)).await?; // the game's `welcome`
//! println!("{welcome:?}");
//! game.close().await?;
//! play.close().await?;
//! # Ok(()) }
//! ```

pub mod backoff;
mod error;
pub mod game;
pub mod play;
pub mod probe;
pub mod socket;
pub mod tls;

pub use backoff::Backoff;
pub use error::ClientError;
pub use game::{GameClient, Heard};
pub use play::{PlayClient, PlayConfig, Welcome};
pub use socket::{Closed, ConnectOptions, Faults, Incoming, Socket};
pub use tls::{Trust, TrustError};
