//! Hostile clients, for tests and chaos runs: what a broken or malicious phone does to a Berth
//! socket (floods without reading, sends a text frame that is not UTF-8, opens a connection and
//! says nothing), and how the socket ended for it. A well-behaved server answers each with a
//! close frame or an HTTP answer, never a reset and never by holding the connection open.

use crate::socket::{item_of, open, Closed, ConnectOptions, Incoming, WsStream};
use crate::ClientError;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// One websocket driven by hand: nothing is read unless [`Probe::until_closed`] reads it.
pub struct Probe {
    ws: WsStream,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe").finish_non_exhaustive()
    }
}

/// How a probed socket ended, and what came before the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The text frames that came first.
    pub texts: Vec<String>,
    /// The end: a close frame (`frame`, with its code) or what broke the connection.
    pub closed: Closed,
}

impl Probe {
    /// Opens a websocket to `url`, with `bearer` as the upgrade's bearer token.
    pub async fn connect(url: &str, bearer: Option<&str>) -> Result<Probe, ClientError> {
        Ok(Probe {
            ws: open(url, &ConnectOptions::with_bearer(bearer)).await?,
        })
    }

    /// Sends one text frame; false when the socket failed.
    pub async fn send_text(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text)).await.is_ok()
    }

    /// Writes `n` copies of `text` back to back without reading anything; how many were
    /// written before the socket failed.
    pub async fn flood(&mut self, text: &str, n: usize) -> usize {
        for sent in 0..n {
            if self.ws.feed(Message::text(text)).await.is_err() {
                return sent;
            }
        }
        match self.ws.flush().await {
            Ok(()) => n,
            Err(_) => 0,
        }
    }

    /// Sends a text frame whose payload is not UTF-8 (a broken client's, or an attacker's).
    pub async fn send_invalid_utf8(&mut self) -> bool {
        let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
        self.ws.send(Message::Frame(frame)).await.is_ok()
    }

    /// Reads (answering a close frame, as any client does) until the socket ends, for at most
    /// `within`.
    pub async fn until_closed(mut self, within: Duration) -> Result<Ending, ClientError> {
        let mut texts = Vec::new();
        tokio::time::timeout(within, async {
            loop {
                match item_of(self.ws.next().await) {
                    Some(Incoming::Text(t)) => texts.push(t),
                    Some(Incoming::Closed(closed)) => {
                        // Reading on sends the answer to the close.
                        let _ = self.ws.next().await;
                        return Ok(Ending { texts, closed });
                    }
                    Some(Incoming::Binary(_)) | None => {}
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout(within))?
    }
}

/// What a server did with a TCP connection that [`stall`] opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    /// How long after connecting the server closed it; `None`: still open when we gave up.
    pub closed_after: Option<Duration>,
    /// Everything the server wrote (an HTTP answer, if it gave one).
    pub answer: Vec<u8>,
}

/// Opens a TCP connection to `addr`, writes `sent` (nothing, or part of an HTTP request, as a
/// slowloris does) and then nothing more, and waits up to `within` for the server to close it.
pub async fn stall(addr: SocketAddr, sent: &[u8], within: Duration) -> std::io::Result<Stalled> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let start = Instant::now();
    tcp.write_all(sent).await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    Ok(Stalled {
        closed_after: read.ok().map(|()| start.elapsed()),
        answer,
    })
}
