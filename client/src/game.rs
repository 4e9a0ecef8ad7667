//! The player's socket to the game, through a host's gateway (`/v1/game`): `join` with the
//! session ticket from `matched`, then the game's own messages both ways. To rejoin after a
//! drop, join again with the same ticket while it is valid (a fresh one comes with every
//! `matched` on `/v1/play`).

use crate::socket::{ConnectOptions, Incoming, Socket};
use crate::ClientError;
use berth_protocol::game::{GameAnswer, GameRequest};
use std::net::SocketAddr;
use std::time::Duration;

/// The gateway's path.
pub use berth_protocol::game::PATH;

/// What a player hears on a gateway socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    Answer(GameAnswer),
    /// A text frame that is not a game answer (another game's message, or garbage).
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: code and reason (1005 when it had none).
    Close(u16, String),
    /// The socket ended without a close frame.
    Dropped,
}

/// A player's socket to a gateway.
#[derive(Debug)]
pub struct GameClient {
    socket: Socket,
}

impl GameClient {
    /// Opens `ws://{gateway}/v1/game`.
    pub async fn connect(gateway: SocketAddr) -> Result<GameClient, ClientError> {
        Self::connect_url(&format!("ws://{gateway}{PATH}"), ConnectOptions::default()).await
    }

    /// Opens the gateway at `url` (`matched.endpoint`).
    pub async fn connect_url(
        url: &str,
        options: ConnectOptions,
    ) -> Result<GameClient, ClientError> {
        Ok(GameClient {
            socket: Socket::connect(url, options).await?,
        })
    }

    /// Connects and joins with `ticket`.
    pub async fn join(gateway: SocketAddr, ticket: &str) -> Result<GameClient, ClientError> {
        let mut ws = Self::connect(gateway).await?;
        ws.send(&GameRequest::Join {
            ticket: ticket.to_owned(),
        })
        .await?;
        Ok(ws)
    }

    /// Sends one game request.
    pub async fn send(&mut self, request: &GameRequest) -> Result<(), ClientError> {
        let text = serde_json::to_string(request).expect("protocol types always serialise");
        self.send_text(&text).await
    }

    /// Sends a text frame as it is (another game's messages, or bad input on purpose).
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        if self.socket.send_text(text.to_owned()).await {
            Ok(())
        } else {
            Err(ClientError::Gone)
        }
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        if self.socket.send_binary(bytes.to_vec()).await {
            Ok(())
        } else {
            Err(ClientError::Gone)
        }
    }

    /// The next thing heard within `within` (websocket pings are answered by the socket).
    pub async fn next(&mut self, within: Duration) -> Result<Heard, ClientError> {
        let item = tokio::time::timeout(within, self.socket.recv())
            .await
            .map_err(|_| ClientError::Timeout(within))?;
        Ok(heard(item))
    }

    /// The next raw item off the socket, with no timeout; cancel-safe, so a client can wait
    /// on it in a `select!` beside its own timers.
    pub async fn next_item(&mut self) -> Incoming {
        self.socket.recv().await
    }

    /// Skips what is heard until `want` matches it; fails on a close or after `within`.
    pub async fn until(
        &mut self,
        within: Duration,
        mut want: impl FnMut(&Heard) -> bool,
    ) -> Result<Heard, ClientError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let heard = self.next(left).await?;
            if want(&heard) {
                return Ok(heard);
            }
            if matches!(heard, Heard::Close(..) | Heard::Dropped) {
                return Err(ClientError::Unexpected(format!(
                    "closed before the expected frame: {heard:?}"
                )));
            }
        }
    }

    /// The next `error` (other frames skipped) and the close after it: (error code, close
    /// code, close reason).
    pub async fn refused(
        &mut self,
        within: Duration,
    ) -> Result<(String, u16, String), ClientError> {
        let error = self
            .until(within, |h| {
                matches!(h, Heard::Answer(GameAnswer::Error { .. }))
            })
            .await?;
        let Heard::Answer(GameAnswer::Error { code, .. }) = error else {
            unreachable!("matched above");
        };
        let close = self
            .until(within, |h| matches!(h, Heard::Close(..) | Heard::Dropped))
            .await?;
        match close {
            Heard::Close(c, reason) => Ok((code, c, reason)),
            other => Err(ClientError::Unexpected(format!(
                "{code}, then no close frame: {other:?}"
            ))),
        }
    }

    /// Closes from the client side and waits for the gateway's answer (5 s at most).
    pub async fn close(self) -> Result<(), ClientError> {
        self.socket.close(Duration::from_secs(5)).await
    }

    /// Drops the connection with no close handshake.
    pub fn kill(self) {
        self.socket.kill()
    }
}

fn heard(item: Incoming) -> Heard {
    match item {
        Incoming::Text(t) => match serde_json::from_str(&t) {
            Ok(a) => Heard::Answer(a),
            Err(_) => Heard::Text(t),
        },
        Incoming::Binary(b) => Heard::Binary(b),
        Incoming::Closed(c) if c.frame => Heard::Close(c.code.unwrap_or(1005), c.reason),
        Incoming::Closed(_) => Heard::Dropped,
    }
}
