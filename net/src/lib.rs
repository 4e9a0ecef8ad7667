//! The socket toolkit every Berth websocket server shares — the server's `/v1/play` and
//! `/v1/hosts`, hostd's gateway `/v1/game` — so that each endpoint keeps only its own protocol:
//!
//! - [`first_frame`]: the peer's first frame within a deadline (hello, register, join), pings
//!   skipped, with the ways it can fail told apart;
//! - [`close_frame`] and [`send_close`]: a close frame with a code and a reason, sent within a
//!   bound so a peer that stopped reading cannot hold a task; [`drain_until_closed`] then
//!   reads the peer's input away so that the close arrives rather than a reset;
//! - [`is_too_big`]: whether a read error means a frame over the socket's size limit;
//! - [`shutdown_signal`]: Ctrl-C or SIGTERM, for the binaries.
//!
//! The flood guard they share is [`berth_protocol::rate::Flood`], beside the rate limit it
//! builds on.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::time::Duration;

/// How long sending a close frame may take.
pub const CLOSE_BOUND: Duration = Duration::from_secs(2);

/// A close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}

/// Sends a close frame, within [`CLOSE_BOUND`].
pub async fn send_close<S>(ws: &mut S, code: u16, reason: &str)
where
    S: Sink<Message> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_BOUND, ws.send(close_frame(code, reason))).await;
}

/// After our close frame: reads on, discarding, until the peer's close frame or the end of the
/// stream, within [`CLOSE_BOUND`]. Closing a TCP socket with unread input makes the kernel send
/// a reset, and a reset can destroy our close frame in the peer's receive queue before it is
/// read (a flooding client then sees "connection reset" instead of its 4429): draining first
/// makes the close arrive.
pub async fn drain_until_closed<S, E>(ws: &mut S)
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
pub fn is_too_big(e: &impl std::fmt::Display) -> bool {
    let s = e.to_string().to_ascii_lowercase();
    s.contains("too long") || s.contains("space limit") || s.contains("too big")
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
            Some(Err(e)) if is_too_big(&e) => First::TooBig,
            Some(Err(_)) => First::Failed,
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
