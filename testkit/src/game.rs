//! Raw clients of a game VM's TCP port, for tests that check the game itself (as the gateway
//! reaches it, without the gateway).

use anyhow::{bail, Context, Result};
use berth_protocol::game::{GameAnswer, GameRequest};
use berth_protocol::guest::encode_line;
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
    let join = GameRequest::Join {
        ticket: ticket.to_owned(),
    };
    let lines_out: Vec<u8> = [join, GameRequest::Surrender]
        .iter()
        .flat_map(encode_line)
        .collect();
    wr.write_all(&lines_out).await?;
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
