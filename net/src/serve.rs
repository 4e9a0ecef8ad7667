//! Serving a router on a public TCP port with the limits such a port needs — the server's
//! player/admin listener and hostd's gateway both go through [`serve`]:
//!
//! - **a header-read timeout**: a connection must finish its request head (for a websocket,
//!   the upgrade request) within [`Limits::header_read_timeout`], and an idle keep-alive
//!   connection waits no longer than that for its next request; else it is closed. A silent
//!   or half-sent request (slowloris) is not held for minutes;
//! - **a cap on counted connections** ([`Limits::max_seats`]): every accepted connection takes
//!   a [`Seat`] until it closes or a handler [releases](Seat::release) it (the server does
//!   once a player is past `hello`; the gateway never does, so there it caps every
//!   connection). A connection beyond the cap is answered `503` with
//!   `{"type":"error","code":…,"message":…}` (`Retry-After: 1`) and closed, before its
//!   request is read;
//! - **TLS termination** when [`Limits::tls`] is set (see [`crate::tls`]): every connection
//!   must finish its TLS handshake within the header-read timeout too (one that opens TCP and
//!   never sends a ClientHello is closed like a silent plain one), and then send its request
//!   head within the timeout again. A failed handshake is counted with
//!   [`Limits::on_refusal`] as [`TLS_HANDSHAKE_TIMEOUT`] or [`TLS_HANDSHAKE_FAILED`];
//! - `TCP_NODELAY` (small messages both ways: no Nagle delay, which costs ~40 ms with delayed
//!   ACKs), the peer's address as axum's `ConnectInfo<SocketAddr>`, websocket upgrades, and a
//!   graceful stop.
//!
//! ```text
//! accept ─▶ seat? ──no──▶ (TLS handshake, ≤ 1 s) 503 too_many_connections, FIN, input read
//!             │yes                                away (≤ 1 s)
//!             ▼
//!   TLS: handshake within header_read_timeout ──no──▶ closed, counted
//!             │
//!             ▼
//!   request head within header_read_timeout ──no──▶ closed
//!             │
//!             ▼
//!   router (the Seat in the request's extensions) ─▶ response, or upgrade (the handler may
//!   keep the Seat for the websocket's life, or release it)
//! ```

use crate::tls::Acceptor;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// How long a refused connection's input is read away after the refusal (so that the refusal
/// arrives rather than a reset).
const REFUSAL_DRAIN: Duration = Duration::from_secs(1);
/// After a failed accept (out of file descriptors, say), wait this long before the next.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long a stop waits for HTTP connections to finish (one in the middle of a request head
/// may take up to the header-read timeout; it is not waited for).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The refusal code counted when a TLS handshake did not finish within the header-read timeout
/// (a client that sent no ClientHello, or stalled in the handshake).
pub const TLS_HANDSHAKE_TIMEOUT: &str = "tls_handshake_timeout";
/// The refusal code counted when a TLS handshake failed (the client does not trust our
/// certificate, speaks plain HTTP to a TLS port, or no protocol version in common).
pub const TLS_HANDSHAKE_FAILED: &str = "tls_handshake_failed";

/// What a listener allows.
#[derive(Clone)]
pub struct Limits {
    /// A request head must arrive within this (and an idle keep-alive connection's next one).
    pub header_read_timeout: Duration,
    /// Most connections holding a [`Seat`] at once.
    pub max_seats: usize,
    /// The `code` of the refusal when no seat is free.
    pub refusal_code: &'static str,
    /// Its `message`.
    pub refusal_message: &'static str,
    /// Called with the code of each refusal (to count it): `refusal_code`,
    /// [`TLS_HANDSHAKE_TIMEOUT`] or [`TLS_HANDSHAKE_FAILED`].
    pub on_refusal: Arc<dyn Fn(&'static str) + Send + Sync>,
    /// Terminate TLS with this (`None`: plain HTTP).
    pub tls: Option<Acceptor>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_seats", &self.max_seats)
            .field("refusal_code", &self.refusal_code)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A connection's place among the listener's counted connections: an extractor for handlers.
/// The place is freed when the last clone is dropped, or at [`Seat::release`]. A request that
/// did not come through [`serve`] (a router driven without a socket) has an empty seat.
#[derive(Debug, Clone)]
pub struct Seat(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl Seat {
    fn new(permit: Option<OwnedSemaphorePermit>) -> Self {
        Seat(Arc::new(Mutex::new(permit)))
    }

    /// Frees the place now (the connection is past the stage the cap is for).
    pub fn release(&self) {
        drop(self.0.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Seat {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Seat>()
            .cloned()
            .unwrap_or_else(|| Seat::new(None)))
    }
}

/// Serves `router` on `listener` within `limits` until `stop` resolves; then stops accepting,
/// asks every HTTP connection to finish, and returns once they have, or after [`STOP_WAIT`]
/// (upgraded websockets are their handlers' to close).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let seats = Arc::new(Semaphore::new(limits.max_seats));
    let (stopping, stopped) = watch::channel(false);
    // Every connection task holds a clone of `open`; `open_tx.closed()` waits for them all.
    let (open_tx, open) = watch::channel(());
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let Ok(permit) = seats.clone().try_acquire_owned() else {
            tracing::debug!(%peer, code = limits.refusal_code, "connection refused");
            (limits.on_refusal)(limits.refusal_code);
            tokio::spawn(refuse(tcp, limits.clone()));
            continue;
        };
        let conn = Connection {
            peer,
            seat: Seat::new(Some(permit)),
            router: router.clone(),
            limits: limits.clone(),
        };
        tokio::spawn(conn.start(tcp, stopped.clone(), open.clone()));
    }
    drop(listener);
    stopping.send_replace(true);
    drop(open);
    let _ = tokio::time::timeout(STOP_WAIT, open_tx.closed()).await;
}

/// One accepted connection, from its TLS handshake or request head to its end (or its
/// upgrade).
struct Connection {
    peer: SocketAddr,
    seat: Seat,
    router: Router,
    limits: Limits,
}

impl Connection {
    /// The TLS handshake (if the listener has TLS), then [`Connection::run`].
    async fn start(
        self,
        tcp: TcpStream,
        stopped: watch::Receiver<bool>,
        open: watch::Receiver<()>,
    ) {
        let Some(acceptor) = self.limits.tls.clone() else {
            return self.run(tcp, stopped, open).await;
        };
        match handshake(&acceptor, tcp, self.limits.header_read_timeout).await {
            Ok(tls) => self.run(tls, stopped, open).await,
            Err(code) => {
                tracing::debug!(peer = %self.peer, code, "TLS handshake failed");
                (self.limits.on_refusal)(code);
            }
        }
    }

    async fn run<S>(self, io: S, mut stopped: watch::Receiver<bool>, _open: watch::Receiver<()>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            peer,
            seat,
            router,
            limits,
        } = self;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(seat.clone());
            let mut router = router.clone();
            async move { tower_service::Service::call(&mut router, req).await }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        let mut stopping = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    return;
                }
                _ = stopped.wait_for(|s| *s), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// The server side of a TLS handshake on `tcp`, within `within`; else the refusal code.
async fn handshake(
    acceptor: &Acceptor,
    tcp: TcpStream,
    within: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, &'static str> {
    match tokio::time::timeout(within, acceptor.0.accept(tcp)).await {
        Err(_) => Err(TLS_HANDSHAKE_TIMEOUT),
        Ok(Err(_)) => Err(TLS_HANDSHAKE_FAILED),
        Ok(Ok(tls)) => Ok(tls),
    }
}

/// Answers a connection no seat was free for: `503` with the refusal (over TLS when the
/// listener has it, after a handshake within [`REFUSAL_DRAIN`]), then closes it.
async fn refuse(tcp: TcpStream, limits: Limits) {
    let (code, message) = (limits.refusal_code, limits.refusal_message);
    match limits.tls {
        None => answer_503(tcp, code, message).await,
        Some(acceptor) => {
            if let Ok(tls) = handshake(&acceptor, tcp, REFUSAL_DRAIN).await {
                answer_503(tls, code, message).await;
            }
        }
    }
}

/// Writes the `503` refusal and closes, reading the input away for a moment first (closing
/// with unread input would send a reset, which can destroy the answer before the client reads
/// it).
async fn answer_503<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, code: &str, message: &str) {
    let body = serde_json::json!({"type": "error", "code": code, "message": message}).to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_DRAIN, async {
        io.write_all(answer.as_bytes()).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 4096];
        while io.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use berth_client::probe::{stall, Stalled};

    const SHORT: Duration = Duration::from_millis(300);

    /// A listener on port 0 serving `/` ("hi") and `/release` (frees its seat, then waits
    /// for `/` of another connection to answer), with one seat and a short header timeout.
    async fn listening(max_seats: usize) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let router = Router::new().route("/", get(|| async { "hi" })).route(
            "/release",
            get(|seat: Seat| async move {
                seat.release();
                tokio::time::sleep(Duration::from_secs(5)).await;
                "released"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = Limits {
            header_read_timeout: SHORT,
            max_seats,
            refusal_code: "too_many_connections",
            refusal_message: "busy",
            on_refusal: Arc::new(|_| {}),
            tls: None,
        };
        tokio::spawn(serve(listener, router, limits, async move {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// `GET /` on a fresh connection: what came back.
    async fn get_root(addr: SocketAddr) -> Stalled {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        stall(addr, request, Duration::from_secs(5))
            .await
            .expect("connects")
    }

    fn closed_soon(s: &Stalled) -> bool {
        s.closed_after.is_some_and(|d| d >= SHORT && d < SHORT * 4)
    }

    #[tokio::test]
    async fn silent_and_half_sent_requests_are_closed_after_the_header_timeout() {
        let (addr, _stop) = listening(8).await;
        let wait = Duration::from_secs(5);
        let silent = stall(addr, b"", wait).await.expect("connects");
        assert!(closed_soon(&silent), "{silent:?}");
        let half = b"GET /v1/play HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n";
        let half = stall(addr, half, wait).await.expect("connects");
        assert!(closed_soon(&half), "{half:?}");
        // A whole request is answered (and the idle keep-alive connection closed after it).
        let whole = get_root(addr).await;
        let answer = String::from_utf8_lossy(&whole.answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"),
            "{answer}"
        );
        assert!(whole.closed_after.is_some(), "{whole:?}");
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_answered_503_and_closed() {
        let (addr, _stop) = listening(1).await;
        // One silent connection holds the one seat…
        let holder = tokio::spawn(stall(addr, b"", Duration::from_secs(5)));
        tokio::time::sleep(SHORT / 3).await;
        // …so the next is refused at once, before its request is read.
        let refused = get_root(addr).await;
        let answer = String::from_utf8_lossy(&refused.answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains(r#""code":"too_many_connections""#),
            "{answer}"
        );
        assert!(
            refused.closed_after.is_some_and(|d| d < SHORT),
            "{refused:?}"
        );
        // Once the silent one is timed out, its seat is free again.
        let held = holder.await.expect("joins").expect("connects");
        assert!(closed_soon(&held), "{held:?}");
        let served = get_root(addr).await;
        assert!(served.answer.starts_with(b"HTTP/1.1 200"), "{served:?}");
    }

    #[tokio::test]
    async fn a_released_seat_no_longer_counts() {
        let (addr, _stop) = listening(1).await;
        let request = b"GET /release HTTP/1.1\r\nHost: x\r\n\r\n";
        let releaser = tokio::spawn(stall(addr, request, Duration::from_secs(1)));
        tokio::time::sleep(SHORT / 3).await;
        let served = get_root(addr).await;
        assert!(served.answer.starts_with(b"HTTP/1.1 200"), "{served:?}");
        releaser.abort();
    }
}
