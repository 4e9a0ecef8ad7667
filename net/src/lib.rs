//! The socket toolkit every Berth websocket server shares — the server's `/v1/play` and
//! `/v1/hosts`, hostd's gateway `/v1/game` — so that each endpoint keeps only its own protocol:
//!
//! - [`serve`]: a router on a public port, with a header-read timeout, a cap on
//!   connections ([`Seat`]s) and TLS termination ([`tls`]), the one accept loop of the server
//!   and the gateway;
//! - [`first_frame`]: the peer's first frame within a deadline (hello, register, join), pings
//!   skipped, with the ways it can fail told apart;
//! - [`close_frame`] and [`send_close`]: a close frame with a code and a reason, sent within a
//!   bound so a peer that stopped reading cannot hold a task, after which the peer's input is
//!   read away (until its close, within a bound) so that the close arrives rather than a reset;
//! - [`read_error_close`]: the close a read error calls for (1009 for a frame over the size
//!   limit, 1007 for a text frame that is not UTF-8), sent by [`close_after_read_error`];
//! - [`shutdown_signal`]: Ctrl-C or SIGTERM, for the binaries.
//!
//! The flood guard they share is [`berth_protocol::rate::Flood`], beside the rate limit it
//! builds on.

mod serve;
pub mod tls;

pub use serve::{serve, Limits, Seat, TLS_HANDSHAKE_FAILED, TLS_HANDSHAKE_TIMEOUT};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use berth_protocol::close;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::time::Duration;

/// How long sending a close frame may take, and then how long the peer's close may take.
pub const CLOSE_BOUND: Duration = Duration::from_secs(2);
/// The reason of the close (1007) that answers a text frame that is not UTF-8.
pub const INVALID_UTF8: &str = "invalid_utf8";
/// The reason of the close (1009) that answers a frame over the size limit.
pub const MESSAGE_TOO_BIG: &str = "message_too_big";

/// A close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}

/// Closes our side of a websocket: a close frame with `code` and `reason` (sent within
/// [`CLOSE_BOUND`]), then the peer's input read away until its close frame or the end of the
/// stream (within [`CLOSE_BOUND`] again). Closing a TCP socket with unread input makes the
/// kernel send a reset, and a reset can destroy our close frame in the peer's receive queue
/// before it is read (a flooding client then sees "connection reset", 1006, instead of its
/// 4429): draining first makes the close arrive.
pub async fn send_close<S, E>(ws: &mut S, code: u16, reason: &str)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_BOUND, ws.send(close_frame(code, reason))).await;
    drain_until_closed(ws).await;
}

/// Reads on, discarding, until the peer's close frame or the end of the stream, within
/// [`CLOSE_BOUND`].
async fn drain_until_closed<S, E>(ws: &mut S)
where
    S: Stream<Item = Result<Message, E>> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_BOUND, async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Whether a websocket read error means the peer sent a frame over the size limit.
fn is_too_big(e: &impl std::fmt::Display) -> bool {
    let s = e.to_string().to_ascii_lowercase();
    s.contains("too long") || s.contains("space limit") || s.contains("too big")
}

/// Whether a websocket read error means the peer sent a text frame that is not UTF-8.
fn is_not_utf8(e: &impl std::fmt::Display) -> bool {
    e.to_string().contains("UTF-8")
}

/// The close (code and reason) a websocket read error calls for: 1009 `message_too_big` for a
/// frame over the size limit, 1007 `invalid_utf8` for a text frame that is not UTF-8 (RFC 6455
/// §7.4.1); `None` when the connection itself broke (nothing can be said on it).
pub fn read_error_close(e: &impl std::fmt::Display) -> Option<(u16, &'static str)> {
    if is_too_big(e) {
        Some((close::TOO_BIG, MESSAGE_TOO_BIG))
    } else if is_not_utf8(e) {
        Some((close::INVALID_DATA, INVALID_UTF8))
    } else {
        None
    }
}

/// After a read error: sends the close it calls for ([`read_error_close`], then as
/// [`send_close`]) and returns its reason; `None` (nothing sent) when the connection broke.
pub async fn close_after_read_error<S, E>(ws: &mut S, e: &E) -> Option<&'static str>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
    E: std::fmt::Display,
{
    let (code, reason) = read_error_close(e)?;
    send_close(ws, code, reason).await;
    Some(reason)
}

/// What came first on a socket.
#[derive(Debug, Clone, PartialEq)]
pub enum First {
    Text(Utf8Bytes),
    Binary,
    /// Nothing but pings before the deadline.
    Timeout,
    /// A frame over the socket's size limit.
    TooBig,
    /// A text frame that is not UTF-8.
    NotUtf8,
    /// The peer closed (a close frame or EOF).
    Closed,
    /// The connection failed.
    Failed,
}

/// The first text or binary frame within `within` (websocket pings and pongs are skipped).
pub async fn first_frame<S, E>(ws: &mut S, within: Duration) -> First
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return First::Timeout,
            Ok(frame) => frame,
        };
        return match frame {
            None | Some(Ok(Message::Close(_))) => First::Closed,
            Some(Err(e)) => match read_error_close(&e) {
                Some((close::TOO_BIG, _)) => First::TooBig,
                Some(_) => First::NotUtf8,
                None => First::Failed,
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(t))) => First::Text(t),
            Some(Ok(Message::Binary(_))) => First::Binary,
        };
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts of tungstenite's errors that [`read_error_close`] tells apart.
    #[test]
    fn read_errors_call_for_their_close() {
        let too_big = "Space limit exceeded: Message too long: 70000 > 65536";
        assert_eq!(read_error_close(&too_big), Some((1009, "message_too_big")));
        let utf8 = "UTF-8 encoding error: invalid utf-8 sequence of 1 bytes from index 1";
        assert_eq!(read_error_close(&utf8), Some((1007, "invalid_utf8")));
        let reset = "IO error: Connection reset by peer (os error 104)";
        assert_eq!(read_error_close(&reset), None);
    }

    type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Message, String>>>;

    fn frames(v: Vec<Result<Message, String>>) -> Frames {
        futures_util::stream::iter(v)
    }

    #[tokio::test]
    async fn the_first_frame_skips_pings_and_tells_failures_apart() {
        let wait = Duration::from_secs(1);
        let text = Message::Text(Utf8Bytes::from("hi"));
        let mut s = frames(vec![Ok(Message::Ping(vec![1].into())), Ok(text)]);
        assert_eq!(first_frame(&mut s, wait).await, First::Text("hi".into()));
        let mut s = frames(vec![Ok(Message::Binary(vec![1].into()))]);
        assert_eq!(first_frame(&mut s, wait).await, First::Binary);
        let mut s = frames(vec![Err("Space limit exceeded: Message too long".into())]);
        assert_eq!(first_frame(&mut s, wait).await, First::TooBig);
        let mut s = frames(vec![Err(
            "UTF-8 encoding error: invalid utf-8 sequence".into()
        )]);
        assert_eq!(first_frame(&mut s, wait).await, First::NotUtf8);
        let mut s = frames(vec![Err("reset".into())]);
        assert_eq!(first_frame(&mut s, wait).await, First::Failed);
        let mut s = frames(vec![Ok(close_frame(1000, "bye"))]);
        assert_eq!(first_frame(&mut s, wait).await, First::Closed);
        let mut s = frames(vec![]);
        assert_eq!(first_frame(&mut s, wait).await, First::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_but_pings_times_out() {
        let mut s =
            futures_util::stream::repeat_with(|| Ok::<_, String>(Message::Ping(vec![].into())))
                .then(|m| async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    m
                })
                .boxed();
        assert_eq!(
            first_frame(&mut s, Duration::from_secs(1)).await,
            First::Timeout
        );
    }
}
