//! One websocket of a bot. The socket is split into a reader task and a writer task, joined to
//! the bot by channels; a delay stage in each direction adds the slow-link fault's latency to
//! every message while keeping their order and the link's throughput.
//!
//! Lifecycle: dropping a [`Link`] closes it politely (close frame, then the reader is stopped
//! after a short grace); [`Link::kill`] drops the TCP connection with no handshake, as a phone
//! that lost its network does. Each writer task holds a clone of the run's `alive` sender, so the
//! run can wait until every socket it opened is gone.

use crate::config::DurationRange;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Messages buffered per direction; a bot that stops reading (background) fills these, then
/// the reader stops reading the socket and TCP pushes back on the peer.
const BUFFER: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a polite close may take before the socket is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why a websocket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("the server answered the upgrade with HTTP {0}")]
    Http(u16),
    #[error("connecting failed")]
    Connect(#[source] tokio_tungstenite::tungstenite::Error),
}

/// The slow-link fault of one bot: the delay range every message of its sockets gets now
/// (zero when the link is not slow). Shared by the bot and its links' delay stages.
#[derive(Debug, Default)]
pub(crate) struct SlowLink {
    min_us: AtomicU64,
    max_us: AtomicU64,
}

impl SlowLink {
    pub fn set(&self, r: Option<DurationRange>) {
        let r = r.unwrap_or(DurationRange::zero());
        self.min_us
            .store(r.min.as_micros() as u64, Ordering::Relaxed);
        self.max_us
            .store(r.max.as_micros() as u64, Ordering::Relaxed);
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

/// What the reader hands the bot.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Incoming {
    Text(String),
    /// The socket is gone: a close frame (`code`, `reason`), an error or EOF (`code` = None).
    /// Always the last item.
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

pub(crate) struct Link {
    tx: Option<mpsc::Sender<(Instant, String)>>,
    rx: mpsc::Receiver<(Instant, Incoming)>,
    reader: AbortHandle,
    writer: AbortHandle,
    ended: bool,
}

impl Link {
    /// Opens a websocket to `url` (TCP_NODELAY on).
    pub async fn connect(
        url: &str,
        slow: Arc<SlowLink>,
        seed: u64,
        alive: mpsc::Sender<()>,
    ) -> Result<Link, LinkError> {
        let connecting = tokio_tungstenite::connect_async_with_config(url, None, true);
        let (ws, _) = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => return Err(LinkError::Timeout(CONNECT_TIMEOUT)),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                return Err(LinkError::Http(resp.status().as_u16()))
            }
            Ok(Err(e)) => return Err(LinkError::Connect(e)),
            Ok(Ok(ok)) => ok,
        };
        let (mut sink, mut stream) = ws.split();

        let (in_tx, in_rx) = mpsc::channel::<(Instant, Incoming)>(BUFFER);
        let reader = tokio::spawn(async move {
            let last = loop {
                let item = match stream.next().await {
                    Some(Ok(Message::Text(t))) => Incoming::Text(t.as_str().to_owned()),
                    Some(Ok(Message::Close(f))) => Incoming::Closed {
                        code: f.as_ref().map(|f| u16::from(f.code)),
                        reason: f.map(|f| f.reason.as_str().to_owned()).unwrap_or_default(),
                    },
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Incoming::Closed {
                        code: None,
                        reason: e.to_string(),
                    },
                    None => Incoming::Closed {
                        code: None,
                        reason: "connection closed".into(),
                    },
                };
                if matches!(item, Incoming::Closed { .. }) {
                    break item;
                }
                if in_tx.send((Instant::now(), item)).await.is_err() {
                    return;
                }
            };
            let _ = in_tx.send((Instant::now(), last)).await;
        });
        let reader_abort = reader.abort_handle();
        let rx = delay_line(in_rx, slow.clone(), seed);

        let (tx, out_rx) = mpsc::channel::<(Instant, String)>(BUFFER);
        let mut out_rx = delay_line(out_rx, slow, seed ^ 0x9e37_79b9_7f4a_7c15);
        let writer = tokio::spawn(async move {
            let _alive = alive;
            while let Some((_, text)) = out_rx.recv().await {
                if sink.send(Message::Text(text.into())).await.is_err() {
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
            // The reader sees the peer's close frame and ends; if the peer never answers, stop
            // it so the socket goes away regardless.
            let reader_abort = reader.abort_handle();
            if tokio::time::timeout(CLOSE_GRACE, reader).await.is_err() {
                reader_abort.abort();
            }
        });
        Ok(Link {
            tx: Some(tx),
            rx,
            reader: reader_abort,
            writer: writer.abort_handle(),
            ended: false,
        })
    }

    /// Queues `text` to be sent; false when the socket is already gone.
    pub async fn send(&mut self, text: String) -> bool {
        match &self.tx {
            Some(tx) => tx.send((Instant::now(), text)).await.is_ok(),
            None => false,
        }
    }

    /// The next item from the socket; after [`Incoming::Closed`] it waits forever (so a
    /// `select!` branch on a finished link simply never fires).
    pub async fn recv(&mut self) -> Incoming {
        if self.ended {
            return std::future::pending().await;
        }
        match self.rx.recv().await {
            Some((_, item)) => {
                if matches!(item, Incoming::Closed { .. }) {
                    self.ended = true;
                }
                item
            }
            None => {
                self.ended = true;
                Incoming::Closed {
                    code: None,
                    reason: "connection closed".into(),
                }
            }
        }
    }

    /// Drops the connection with no close handshake (the phone lost its network).
    pub fn kill(mut self) {
        self.tx = None;
        self.writer.abort();
        self.reader.abort();
    }
}

/// Forwards items in order, each no earlier than its stamp plus a delay drawn from `slow`.
fn delay_line<T: Send + 'static>(
    mut rx: mpsc::Receiver<(Instant, T)>,
    slow: Arc<SlowLink>,
    seed: u64,
) -> mpsc::Receiver<(Instant, T)> {
    let (tx, out) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        while let Some((at, item)) = rx.recv().await {
            let d = slow.draw(&mut rng);
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
        let slow = Arc::new(SlowLink::default());
        slow.set(Some(DurationRange::new(
            Duration::from_millis(100),
            Duration::from_millis(100),
        )));
        let (tx, rx) = mpsc::channel(BUFFER);
        let mut out = delay_line(rx, slow.clone(), 1);
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
        slow.set(None);
        let t1 = Instant::now();
        tx.send((Instant::now(), 99)).await.expect("send");
        assert_eq!(out.recv().await.expect("item").1, 99);
        assert!(t1.elapsed() < Duration::from_millis(5));
    }
}
