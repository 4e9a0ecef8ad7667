//! Raw clients of a game VM for tests that check the game itself: its TCP port directly (as the
//! gateway reaches it), and [`GameWs`], a player's websocket to a hostd gateway that can also
//! send what a well-behaved client never would.

use anyhow::{bail, Context, Result};
use berth_protocol::game::GameAnswer;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Connects to a game port and reads the server's hello.
pub async fn game_hello(addr: SocketAddr) -> Result<GameAnswer> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .context("connect timed out")??;
    let mut lines = BufReader::new(stream).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("no hello within 10 s")??
        .context("connection closed before hello")?;
    Ok(serde_json::from_str(&line)?)
}

/// Sends one game request line and returns the answer.
pub async fn game_request(addr: SocketAddr, request: &str) -> Result<Vec<GameAnswer>> {
    use tokio::io::AsyncWriteExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let mut out = Vec::new();
    let first = lines.next_line().await?.context("no hello")?;
    out.push(serde_json::from_str(&first)?);
    wr.write_all(request.as_bytes()).await?;
    wr.write_all(b"\n").await?;
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("no answer")??
        .context("closed")?;
    out.push(serde_json::from_str(&line)?);
    Ok(out)
}

/// What a player hears on a gateway websocket.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    Answer(GameAnswer),
    /// A text frame that is not a game answer.
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: code and reason (1005 when it had none).
    Close(u16, String),
    /// The socket ended without a close frame.
    Dropped,
}

/// A player's websocket to a hostd gateway.
pub struct GameWs {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl GameWs {
    /// Opens `ws://{gateway}/v1/game`.
    pub async fn connect(gateway: SocketAddr) -> Result<Self> {
        let url = format!("ws://{gateway}{}", berth_hostd::gateway::PATH);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .context("websocket connect timed out")??;
        Ok(Self { ws })
    }

    /// Connects and sends the join frame with `ticket`.
    pub async fn join(gateway: SocketAddr, ticket: &str) -> Result<Self> {
        let mut ws = Self::connect(gateway).await?;
        let join = serde_json::json!({"type": "join", "ticket": ticket});
        ws.send_text(&join.to_string()).await?;
        Ok(ws)
    }

    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) -> Result<()> {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        self.ws.send(Message::binary(bytes.to_vec())).await?;
        Ok(())
    }

    /// The next thing heard within `within` (websocket pings and pongs are skipped; pings are
    /// answered by the client library).
    pub async fn next(&mut self, within: Duration) -> Result<Heard> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("nothing heard in time")?;
            return Ok(match msg {
                None | Some(Err(_)) => Heard::Dropped,
                Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
                    Ok(a) => Heard::Answer(a),
                    Err(_) => Heard::Text(t.as_str().to_owned()),
                },
                Some(Ok(Message::Binary(b))) => Heard::Binary(b.to_vec()),
                Some(Ok(Message::Close(f))) => {
                    // Polling on sends the client's answer to the close, as a browser does.
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.next()).await;
                    match f {
                        Some(f) => Heard::Close(u16::from(f.code), f.reason.as_str().to_owned()),
                        None => Heard::Close(1005, String::new()),
                    }
                }
                Some(Ok(_)) => continue,
            });
        }
    }

    /// Skips what is heard until `want` matches it; fails on a close or after `within`.
    pub async fn until(
        &mut self,
        within: Duration,
        mut want: impl FnMut(&Heard) -> bool,
    ) -> Result<Heard> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let heard = self.next(left).await?;
            if want(&heard) {
                return Ok(heard);
            }
            if matches!(heard, Heard::Close(..) | Heard::Dropped) {
                bail!("closed before the expected frame: {heard:?}");
            }
        }
    }

    /// The next `error` (other frames skipped) and the close after it: (error code, close
    /// code, close reason).
    pub async fn refused(&mut self, within: Duration) -> Result<(String, u16, String)> {
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
            other => bail!("{code}, then no close frame: {other:?}"),
        }
    }

    /// Closes from the client side and waits for the gateway's answer.
    pub async fn close(mut self) -> Result<()> {
        use futures_util::StreamExt;
        self.ws.close(None).await?;
        while tokio::time::timeout(Duration::from_secs(5), self.ws.next())
            .await
            .context("the gateway did not finish the close")?
            .is_some()
        {}
        Ok(())
    }
}

/// Joins the game at `addr` (directly, as the gateway would) with `ticket` and surrenders:
/// the other side wins. Returns the game's `ended` (reason, results).
pub async fn game_surrender(
    addr: SocketAddr,
    ticket: &str,
) -> Result<(String, berth_protocol::game::GameResults)> {
    use tokio::io::AsyncWriteExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let join =
        format!("{{\"type\":\"join\",\"ticket\":\"{ticket}\"}}\n{{\"type\":\"surrender\"}}\n");
    wr.write_all(join.as_bytes()).await?;
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            match serde_json::from_str::<GameAnswer>(&line)? {
                GameAnswer::Ended { reason, results } => return Ok((reason, results)),
                GameAnswer::Error { code, message } => bail!("the game refused: {code}: {message}"),
                _ => continue,
            }
        }
        bail!("the game closed without ended")
    })
    .await
    .context("no ended within 20 s")?
}
