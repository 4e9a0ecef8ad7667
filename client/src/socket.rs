//! One websocket, as every Berth client holds it: split into a reader task and a writer task,
//! joined to its owner by channels. Optional faults sit here, under every typed client: a
//! [`Faults`] handle adds a delay to every message in each direction (keeping their order and
//! the link's throughput), as a slow mobile network does; [`Socket::kill`] drops the TCP
//! connection with no handshake, as a phone that lost its network does.
//!
//! Lifecycle: [`Socket::close`] closes politely (close frame, then waits for the peer's);
//! dropping a socket does the same in the background; [`Socket::kill`] does neither. When
//! [`ConnectOptions::alive`] is given, the writer task holds a clone of that sender until the
//! socket is gone, so a caller can wait until every socket it opened has closed.

use crate::tls::{handshake_error, Trust};
use crate::ClientError;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Messages buffered per direction; an owner that stops reading fills these, then the reader
/// stops reading the socket and TCP pushes back on the peer.
const BUFFER: usize = 64;
/// How long a polite close may take before the socket is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How a socket is opened.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Sent as `Authorization: Bearer …` on the upgrade request.
    pub bearer: Option<String>,
    /// Give up connecting after this long.
    pub timeout: Duration,
    /// A slow-link fault shared with the caller (none: messages go at once).
    pub faults: Option<Arc<Faults>>,
    /// Seeds the faults' delays.
    pub seed: u64,
    /// Held by the writer task until the socket is gone.
    pub alive: Option<mpsc::Sender<()>>,
    /// Small read and write buffers, for a process that holds thousands of idle sockets.
    pub small_buffers: bool,
    /// The roots a `wss://` server's certificate is checked against (Mozilla's by default).
    pub trust: Trust,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            bearer: None,
            timeout: Duration::from_secs(10),
            faults: None,
            seed: 0,
            alive: None,
            small_buffers: false,
            trust: Trust::roots(),
        }
    }
}

impl ConnectOptions {
    /// The defaults, with `bearer` (if any) as the upgrade's bearer token.
    pub fn with_bearer(bearer: Option<&str>) -> Self {
        ConnectOptions {
            bearer: bearer.map(str::to_owned),
            ..ConnectOptions::default()
        }
    }
}

/// The slow-link fault of a client: the delay range every message of its sockets gets now
/// (zero when the link is not slow). Shared by the caller and its sockets' delay stages, so
/// it can change while they are open.
#[derive(Debug, Default)]
pub struct Faults {
    min_us: AtomicU64,
    max_us: AtomicU64,
}

impl Faults {
    /// Sets the delay range (`None`: no delay).
    pub fn set_delay(&self, range: Option<(Duration, Duration)>) {
        let (min, max) = range.unwrap_or_default();
        self.min_us.store(min.as_micros() as u64, Ordering::Relaxed);
        self.max_us.store(max.as_micros() as u64, Ordering::Relaxed);
    }

    fn draw(&self, rng: &mut fastrand::Rng) -> Duration {
        let (lo, hi) = (
            self.min_us.load(Ordering::Relaxed),
            self.max_us.load(Ordering::Relaxed),
        );
        if hi == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(rng.u64(lo.min(hi)..=hi))
    }
}

/// How a socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The close frame's code; `None` when there was no frame or it had no code.
    pub code: Option<u16>,
    /// The close frame's reason, or what broke the connection.
    pub reason: String,
    /// A close frame arrived (false: an error or EOF ended the connection).
    pub frame: bool,
}

/// What the reader hands the owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
    /// The socket is gone. Always the last item.
    Closed(Closed),
}

enum Outgoing {
    Text(String),
    Binary(Vec<u8>),
}

/// One open websocket.
pub struct Socket {
    tx: Option<mpsc::Sender<(Instant, Outgoing)>>,
    rx: mpsc::Receiver<(Instant, Incoming)>,
    reader: AbortHandle,
    writer: AbortHandle,
    ended: bool,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("ended", &self.ended)
            .finish()
    }
}

impl Socket {
    /// Opens a websocket to `url` (TCP_NODELAY on).
    pub async fn connect(url: &str, options: ConnectOptions) -> Result<Socket, ClientError> {
        let ws = open(url, &options).await?;
        let (sink, stream) = ws.split();
        let (in_tx, mut rx) = mpsc::channel(BUFFER);
        let reader = tokio::spawn(read(stream, in_tx));
        let reader_abort = reader.abort_handle();
        let (tx, mut out_rx) = mpsc::channel(BUFFER);
        // The delay stages only where faults may be injected: two tasks fewer per socket.
        if let Some(faults) = options.faults {
            rx = delay_line(rx, faults.clone(), options.seed);
            out_rx = delay_line(out_rx, faults, options.seed ^ 0x9e37_79b9_7f4a_7c15);
        }
        let writer = tokio::spawn(write(sink, out_rx, reader, options.alive));
        Ok(Socket {
            tx: Some(tx),
            rx,
            reader: reader_abort,
            writer: writer.abort_handle(),
            ended: false,
        })
    }

    /// Queues a text frame; false when the socket is already gone.
    pub async fn send_text(&mut self, text: String) -> bool {
        self.send(Outgoing::Text(text)).await
    }

    /// Queues a binary frame; false when the socket is already gone.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> bool {
        self.send(Outgoing::Binary(bytes)).await
    }

    async fn send(&mut self, frame: Outgoing) -> bool {
        match &self.tx {
            Some(tx) => tx.send((Instant::now(), frame)).await.is_ok(),
            None => false,
        }
    }

    /// The next item from the socket; after [`Incoming::Closed`] it waits forever (so a
    /// `select!` branch on a finished socket simply never fires).
    pub async fn recv(&mut self) -> Incoming {
        if self.ended {
            return std::future::pending().await;
        }
        match self.rx.recv().await {
            Some((_, item)) => {
                self.ended = matches!(item, Incoming::Closed(_));
                item
            }
            None => {
                self.ended = true;
                Incoming::Closed(Closed {
                    code: None,
                    reason: "connection closed".into(),
                    frame: false,
                })
            }
        }
    }

    /// True once [`Socket::recv`] has handed out the end.
    pub fn is_closed(&self) -> bool {
        self.ended
    }

    /// Closes politely: sends a close frame and waits up to `within` for the peer to finish
    /// the close. Err when the peer did not.
    pub async fn close(mut self, within: Duration) -> Result<(), ClientError> {
        self.tx = None;
        if self.ended {
            return Ok(());
        }
        tokio::time::timeout(within, async {
            while !matches!(self.recv().await, Incoming::Closed(_)) {}
        })
        .await
        .map_err(|_| ClientError::Timeout(within))
    }

    /// Drops the connection with no close handshake (the phone lost its network).
    pub fn kill(mut self) {
        self.tx = None;
        self.writer.abort();
        self.reader.abort();
    }
}

pub(crate) type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the websocket itself (`ws://`, or `wss://` checked against `options.trust`): the
/// bearer header, the buffers, the connect timeout, and an upgrade refused with an HTTP status
/// or a failed TLS handshake told apart.
pub(crate) async fn open(url: &str, options: &ConnectOptions) -> Result<WsStream, ClientError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ClientError::BadUrl(e.to_string()))?;
    if let Some(token) = &options.bearer {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::BadUrl("the token is not a valid header".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let config = options.small_buffers.then(|| {
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
    });
    let connector = Some(options.trust.connector());
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, config, true, connector);
    match tokio::time::timeout(options.timeout, connecting).await {
        Err(_) => Err(ClientError::Timeout(options.timeout)),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err(ClientError::Http { status, body })
        }
        Ok(Err(e)) => Err(match handshake_error(&e) {
            Some(reason) => ClientError::Tls(reason),
            None => ClientError::Connect(e),
        }),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

/// What one read off a websocket is to its owner: a message, nothing (pings, pongs), or the
/// end ([`Incoming::Closed`]).
pub(crate) fn item_of(
    read: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Option<Incoming> {
    let ended = |code, reason, frame| {
        Some(Incoming::Closed(Closed {
            code,
            reason,
            frame,
        }))
    };
    match read {
        Some(Ok(Message::Text(t))) => Some(Incoming::Text(t.as_str().to_owned())),
        Some(Ok(Message::Binary(b))) => Some(Incoming::Binary(b.to_vec())),
        Some(Ok(Message::Close(f))) => ended(
            f.as_ref().map(|f| u16::from(f.code)),
            f.map(|f| f.reason.as_str().to_owned()).unwrap_or_default(),
            true,
        ),
        Some(Ok(_)) => None,
        Some(Err(e)) => ended(None, e.to_string(), false),
        None => ended(None, "connection closed".into(), false),
    }
}

/// The reader task: frames to items, until the socket ends.
async fn read(
    mut stream: futures_util::stream::SplitStream<WsStream>,
    to_owner: mpsc::Sender<(Instant, Incoming)>,
) {
    let last = loop {
        let Some(item) = item_of(stream.next().await) else {
            continue;
        };
        if let Incoming::Closed(c) = item {
            if c.frame {
                // Reading on sends our answer to the close, as a browser does.
                let _ = tokio::time::timeout(CLOSE_GRACE, stream.next()).await;
            }
            break Incoming::Closed(c);
        }
        if to_owner.send((Instant::now(), item)).await.is_err() {
            return;
        }
    };
    let _ = to_owner.send((Instant::now(), last)).await;
}

/// The writer task: queued frames out, then a polite close when the owner lets go.
async fn write(
    mut sink: futures_util::stream::SplitSink<WsStream, Message>,
    mut from_owner: mpsc::Receiver<(Instant, Outgoing)>,
    reader: tokio::task::JoinHandle<()>,
    alive: Option<mpsc::Sender<()>>,
) {
    let _alive = alive;
    while let Some((_, frame)) = from_owner.recv().await {
        let msg = match frame {
            Outgoing::Text(t) => Message::Text(t.into()),
            Outgoing::Binary(b) => Message::Binary(b.into()),
        };
        if sink.send(msg).await.is_err() {
            break;
        }
    }
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = sink.send(Message::Close(Some(bye))).await;
        let _ = sink.close().await;
    })
    .await;
    // The reader sees the peer's close frame and ends; if the peer never answers, stop it so
    // the socket goes away regardless.
    let reader_abort = reader.abort_handle();
    if tokio::time::timeout(CLOSE_GRACE, reader).await.is_err() {
        reader_abort.abort();
    }
}

/// Forwards items in order, each no earlier than its stamp plus a delay drawn from `faults`.
fn delay_line<T: Send + 'static>(
    mut rx: mpsc::Receiver<(Instant, T)>,
    faults: Arc<Faults>,
    seed: u64,
) -> mpsc::Receiver<(Instant, T)> {
    let (tx, out) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        while let Some((at, item)) = rx.recv().await {
            let d = faults.draw(&mut rng);
            if !d.is_zero() {
                tokio::time::sleep_until(at + d).await;
            }
            if tx.send((at, item)).await.is_err() {
                return;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_delay_line_delays_each_item_and_keeps_order_and_throughput() {
        let faults = Arc::new(Faults::default());
        let d = Duration::from_millis(100);
        faults.set_delay(Some((d, d)));
        let (tx, rx) = mpsc::channel(BUFFER);
        let mut out = delay_line(rx, faults.clone(), 1);
        let t0 = Instant::now();
        for i in 0..10 {
            tx.send((Instant::now(), i)).await.expect("send");
        }
        for i in 0..10 {
            let (_, v) = out.recv().await.expect("item");
            assert_eq!(v, i);
        }
        // Ten items sent at once arrive together after one delay, not ten.
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_millis(150),
            "{took:?}"
        );
        faults.set_delay(None);
        let t1 = Instant::now();
        tx.send((Instant::now(), 99)).await.expect("send");
        assert_eq!(out.recv().await.expect("item").1, 99);
        assert!(t1.elapsed() < Duration::from_millis(5));
    }
}
