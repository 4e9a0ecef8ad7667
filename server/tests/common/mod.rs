//! Helpers for the server's socket-level tests: a real server on port 0 and real websocket
//! clients (tokio-tungstenite).
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use berth_protocol::play::{ClientMessage, ServerMessage, PLAY_PROTOCOL_VERSION};
use berth_server::app::Server;
use berth_server::config::ServerConfig;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

#[allow(unused_imports)]
pub use berth_testkit::fixtures::{admin_token, auth, token, SECRET};

/// The kit's server config: loopback port 0, the shipped modes, tokens signed with [`SECRET`].
pub fn config() -> ServerConfig {
    berth_testkit::fixtures::server_config()
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    pub ws: Ws,
}

impl Client {
    /// Opens `/v1/play`, optionally with a bearer header.
    pub async fn open(server: &Server, bearer: Option<&str>) -> Result<Client> {
        let mut req = format!("ws://{}/v1/play", server.addr).into_client_request()?;
        if let Some(t) = bearer {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse()?);
        }
        let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true).await?;
        Ok(Client { ws })
    }

    /// Opens and says hello with `player`'s token; returns after `welcome`.
    pub async fn player(server: &Server, player: &str) -> Result<Client> {
        let mut c = Client::open(server, None).await?;
        c.send(&ClientMessage::Hello {
            v: PLAY_PROTOCOL_VERSION,
            token: Some(token(player)),
        })
        .await?;
        match c.recv().await? {
            ServerMessage::Welcome { player: p, .. } if p.as_str() == player => Ok(c),
            other => bail!("expected welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, m: &ClientMessage) -> Result<()> {
        self.raw(serde_json::to_string(m)?).await
    }

    pub async fn raw(&mut self, text: String) -> Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next server message (5 s at most).
    pub async fn recv(&mut self) -> Result<ServerMessage> {
        self.recv_within(Duration::from_secs(5)).await
    }

    pub async fn recv_within(&mut self, d: Duration) -> Result<ServerMessage> {
        loop {
            let m = tokio::time::timeout(d, self.ws.next())
                .await
                .context("no message in time")?
                .context("connection ended")??;
            match m {
                Message::Text(t) => {
                    return serde_json::from_str(&t).with_context(|| format!("decoding {t}"))
                }
                Message::Close(f) => bail!("closed: {f:?}"),
                _ => continue,
            }
        }
    }

    /// Skips messages until one matches `f` (`queue_status` updates come and go).
    pub async fn until(
        &mut self,
        d: Duration,
        f: impl Fn(&ServerMessage) -> bool,
    ) -> Result<ServerMessage> {
        let end = tokio::time::Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let m = self.recv_within(left).await?;
            if f(&m) {
                return Ok(m);
            }
        }
    }

    /// Expects an error with `code`.
    pub async fn expect_error(&mut self, code: &str) -> Result<()> {
        match self.recv().await? {
            ServerMessage::Error { code: c, .. } if c == code => Ok(()),
            other => bail!("expected error {code}, got {other:?}"),
        }
    }

    /// Reads until the server closes; returns the close frame.
    pub async fn closed(&mut self) -> Result<Option<CloseFrame>> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.ws.next()).await {
                Err(_) => bail!("not closed in time"),
                Ok(None) => return Ok(None),
                Ok(Some(Err(_))) => return Ok(None),
                Ok(Some(Ok(Message::Close(f)))) => return Ok(f),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    pub async fn ping(&mut self, nonce: u64) -> Result<()> {
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

pub fn queue(mode: &str, region: &str) -> ClientMessage {
    ClientMessage::Queue {
        mode: mode.into(),
        region: region.into(),
        party: None,
        skill: None,
    }
}

pub fn close_code(f: &Option<CloseFrame>) -> u16 {
    f.as_ref().map_or(0, |f| u16::from(f.code))
}
