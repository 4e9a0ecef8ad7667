//! Players for tests of the server's sockets, on [`berth_client`]: the kit's fixtures plus the
//! few conveniences those tests share (open a socket on a [`Server`], a signed-in player,
//! "expect this error").

use anyhow::{bail, Result};
use berth_client::{Closed, PlayClient, PlayConfig};
use berth_protocol::play::{ClientMessage, ServerMessage};
use berth_server::app::Server;
use std::time::Duration;

pub use crate::fixtures::{admin_token, auth, host_token, token, SECRET};

/// A player's `/v1/play` socket.
pub type Client = PlayClient;

/// The kit's server config (see [`crate::fixtures::server_config`]).
pub fn config() -> berth_server::config::ServerConfig {
    crate::fixtures::server_config()
}

/// `ws://…/v1/play` of `server`.
pub fn play_url(server: &Server) -> String {
    format!("ws://{}/v1/play", server.addr)
}

/// Opens `/v1/play` on `server` without saying hello, optionally with a bearer header.
pub async fn open(server: &Server, bearer: Option<&str>) -> Result<Client> {
    Ok(PlayClient::open(&play_url(server), bearer).await?)
}

/// `player` signed in on `server` (hello answered with `welcome`).
pub async fn player(server: &Server, player: &str) -> Result<Client> {
    let c = PlayClient::connect(PlayConfig::new(play_url(server), token(player))).await?;
    match &c.welcome {
        Some(w) if w.player.as_str() == player => Ok(c),
        other => bail!("expected welcome for {player}, got {other:?}"),
    }
}

/// What server-socket tests ask of a player's socket beyond the client's own calls.
#[allow(async_fn_in_trait)]
pub trait ClientExt {
    /// Expects the next message to be an error with `code`.
    async fn expect_error(&mut self, code: &str) -> Result<()>;
    /// Sends `ping` with `nonce` and waits for its `pong`.
    async fn ping_pong(&mut self, nonce: u64) -> Result<()>;
}

impl ClientExt for PlayClient {
    async fn expect_error(&mut self, code: &str) -> Result<()> {
        match self.recv().await? {
            ServerMessage::Error { code: c, .. } if c == code => Ok(()),
            other => bail!("expected error {code}, got {other:?}"),
        }
    }

    async fn ping_pong(&mut self, nonce: u64) -> Result<()> {
        self.send(&ClientMessage::Ping { nonce }).await?;
        match self
            .until(Duration::from_secs(5), |m| {
                matches!(m, ServerMessage::Pong { .. })
            })
            .await?
        {
            ServerMessage::Pong { nonce: n, .. } if n == nonce => Ok(()),
            other => bail!("expected pong {nonce}, got {other:?}"),
        }
    }
}

/// A `queue` for `mode` in `region`.
pub fn queue(mode: &str, region: &str) -> ClientMessage {
    berth_client::play::queue(mode, region, None, None)
}

/// The close code of a close frame (0: none came).
pub fn close_code(c: &Option<Closed>) -> u16 {
    c.as_ref().and_then(|c| c.code).unwrap_or(0)
}

/// Waits until `check` holds, polling every 50 ms for at most 10 s (for what the server counts
/// or records a moment after the client saw it happen).
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let within = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + within;
    while !check().await? {
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `berth_refused_total{code}` on `server`'s `/metrics` (0 when none was counted).
pub fn refused_total(server: &Server, code: &str) -> u64 {
    let prefix = format!("berth_refused_total{{code=\"{code}\"}} ");
    server
        .ctx
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The player's next `session_ended` within 30 s: its reason and results.
pub async fn ended(c: &mut Client) -> Result<(String, serde_json::Value)> {
    match c
        .until(Duration::from_secs(30), |m| {
            matches!(m, ServerMessage::SessionEnded { .. })
        })
        .await?
    {
        ServerMessage::SessionEnded {
            reason, results, ..
        } => Ok((reason.to_string(), results)),
        other => bail!("expected session_ended, got {other:?}"),
    }
}
