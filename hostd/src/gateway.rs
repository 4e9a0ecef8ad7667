//! The host gateway: the one public websocket through which players reach the game servers in
//! this host's VMs (`GET /v1/game` on `[gateway] listen`).
//!
//! It owns the players' connections and nothing else: their admission (`berth_net::serve`:
//! the upgrade request within `[gateway] header_read_timeout_ms`, at most `max_connections`
//! open, a 503 `too_many_connections` beyond, `wss://` when `[gateway.tls]` names a certificate
//! and key), the join handshake (the session ticket is
//! checked with that session's own key, which [`Pool::gate`] hands out for active VMs only), the
//! rules that one ticket has at most one live connection and one player one connection, the
//! proxying (one text frame ⇄ one JSON line on the game's TCP port), the frame rules (text,
//! one line, at most [`MAX_FRAME`] bytes, [`RATE_PER_S`] per second), keepalive, and its own
//! [`GatewayStats`] (served by the control API at `GET /v1/gateway`). What a session is and
//! when it ends is the pool's: a connection ends with `game_over` when its VM starts to go.
//!
//! ```text
//! client ──ws──▶ gateway: {"type":"join","ticket":…} within 5 s
//!                  session_of(ticket) ─▶ pool.gate(session) ─▶ verify(ticket, key) ─▶ player?
//!                  ─▶ one live connection per ticket; a newer ticket replaces the player's older one
//!                ──TCP (TCP_NODELAY)──▶ game server in the VM: the join line, then
//!   text frame ─▶ one line                                   one line ─▶ text frame
//! ```
//!
//! Every refusal is a `{"type":"error","code","message"}` frame followed by a close whose reason
//! is the code; [`close_code`] maps codes to close codes (documented in `docs/protocol.md`).

use crate::config::GatewayConfig;
use crate::frames::{self, GameRead, GameReader};
use crate::pool::{Gate, Pool};
use crate::util::now_ms;
use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use berth_net::tls::Acceptor;
use berth_protocol::game::{code, GameAnswer, GameRequest};
use berth_protocol::ticket::{self, TicketClaims};
use berth_protocol::{PlayerId, SessionId};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

/// The gateway's websocket route.
pub use berth_protocol::game::PATH;
/// The first frame must arrive within this.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest client frame (bytes) by default (an image's `[limits] max_frame_bytes`); a
/// larger one closes the connection with 1009.
pub const MAX_FRAME: usize = crate::manifest::DEFAULT_MAX_FRAME as usize;
/// The largest client frame any image may allow: the websocket's own limit.
pub const MAX_WS_FRAME: usize = crate::manifest::MAX_FRAME_LIMIT as usize;
/// Sustained client frames per second by default (an image's `[limits] frames_per_s`; the
/// arena's inputs come at 20 Hz, plus pings).
pub const RATE_PER_S: u32 = crate::manifest::DEFAULT_FRAMES_PER_S;
/// Frames a client may send at once above the sustained rate, by default (twice the rate).
pub const RATE_BURST: u32 = RATE_PER_S * 2;
/// More `rate_limited` refusals than this (each within [`STRIKES_FORGIVEN`] of the last) close
/// the connection with 4429.
pub const RATE_STRIKES: u32 = 20;
/// Rate-limit strikes are forgotten after this long without one.
pub const STRIKES_FORGIVEN: Duration = Duration::from_secs(10);
/// The gateway pings every connection this often...
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// ...and drops it (close 4408 `ping_timeout`) when no pong came for this long.
pub const PONG_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the game's TCP port to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a closed game socket waits for its VM to be seen going (see `game_closed`).
const VM_GONE_WAIT: Duration = Duration::from_millis(500);
/// A peer that does not take a frame or line within this is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Gateway::shutdown`] waits for connections to close.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);
/// The code of the error sent when hostd stops.
pub const SHUTTING_DOWN: &str = code::SHUTTING_DOWN;

use berth_net::{
    first_frame, read_error_close, send_close, First, Seat, CLOSE_BOUND, INVALID_UTF8,
    MESSAGE_TOO_BIG,
};
/// Close codes (shared with the matchmaking server).
pub use berth_protocol::close;
use berth_protocol::rate::{Flood, Verdict};

/// The close code that follows an `error` with this code; `None`: the connection stays open.
pub fn close_code(error_code: &str) -> Option<u16> {
    Some(match error_code {
        code::JOIN_FIRST => close::PROTOCOL,
        code::JOIN_TIMEOUT => close::TIMEOUT,
        code::BAD_TICKET | code::TICKET_EXPIRED | code::WRONG_SESSION | code::NOT_A_PLAYER => {
            close::AUTH
        }
        code::UNKNOWN_SESSION => close::NOT_FOUND,
        code::TICKET_IN_USE | code::REPLACED => close::CONFLICT,
        code::GAME_UNREACHABLE => close::UNREACHABLE,
        code::GAME_OVER | code::SESSION_MOVED | SHUTTING_DOWN => close::GOING_AWAY,
        code::RATE_LIMITED => close::RATE_LIMITED,
        _ => return None,
    })
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("binding the gateway to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway. [`Gateway::shutdown`] closes every connection (1001) and waits for them;
/// dropping it only signals them to close.
pub struct Gateway {
    /// Where it listens (the real port when started on port 0).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("addr", &self.addr).finish()
    }
}

/// Binds `listen` and serves the gateway for `pool`'s sessions with the default limits
/// (in-process stacks; hostd itself serves with its `[gateway]` table, see [`serve`]).
pub async fn start(pool: Pool, listen: SocketAddr) -> Result<Gateway, GatewayError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: listen,
            source,
        })?;
    serve(pool, listener, &GatewayConfig::at(listen), None)
}

/// Serves the gateway on a listener bound earlier (so that start-up fails before VMs boot),
/// within `config`'s limits (its `listen` is the listener's business), over TLS with `tls`
/// (loaded from `config.tls` at start-up, see [`HostdConfig::gateway_tls`]).
///
/// [`HostdConfig::gateway_tls`]: crate::config::HostdConfig::gateway_tls
pub fn serve(
    pool: Pool,
    listener: TcpListener,
    config: &GatewayConfig,
    tls: Option<Acceptor>,
) -> Result<Gateway, GatewayError> {
    let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared {
        pool,
        listen: addr,
        registry: Mutex::new(Registry::default()),
        meters: Meters::default(),
        stop: stopped.clone(),
    });
    let app = Router::new()
        .route(PATH, get(upgrade))
        .route(PROBE_PATH, get(probe))
        .with_state(shared.clone());
    let tls_on = tls.is_some();
    let limits = listen_limits(config, &shared, tls);
    let server = tokio::spawn(berth_net::serve(
        listener,
        app,
        limits,
        stop_signal(stopped),
    ));
    tracing::info!(gateway = %addr, tls = tls_on, "gateway listening");
    Ok(Gateway {
        addr,
        shared,
        stop,
        server,
    })
}

impl Gateway {
    /// What the gateway has done so far.
    pub fn stats(&self) -> GatewayStats {
        self.shared.stats()
    }

    /// A cheap handle on the stats (for the control API).
    pub fn meter(&self) -> Meter {
        Meter(self.shared.clone())
    }

    /// Stops accepting, closes every connection (`shutting_down`, 1001) and waits (a few
    /// seconds at most) until they are gone.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        let _ = (&mut self.server).await;
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while self.shared.meters.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!("gateway stopped");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A handle on a gateway's stats.
#[derive(Clone)]
pub struct Meter(Arc<Shared>);

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Meter").field(&self.0.listen).finish()
    }
}

impl Meter {
    pub fn stats(&self) -> GatewayStats {
        self.0.stats()
    }

    /// The forwarding-time histogram of each direction in cumulative buckets with the given
    /// upper bounds (µs), for Prometheus (see [`crate::metrics`]).
    pub fn forwarding(&self, bounds_us: &[u64]) -> [(&'static str, Cumulative); 2] {
        let m = &self.0.meters;
        [
            ("to_game", m.to_game.cumulative(bounds_us)),
            ("to_client", m.to_client.cumulative(bounds_us)),
        ]
    }
}

/// A histogram as Prometheus wants it: the sum and count of all samples (µs), and how many
/// were at most each upper bound (µs; within the buckets' 6.25 %).
#[derive(Debug, Clone, PartialEq)]
pub struct Cumulative {
    pub sum_us: u64,
    pub count: u64,
    pub buckets: Vec<(u64, u64)>,
}

/// What a gateway has done (`GET /v1/gateway` on the control API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStats {
    pub listen: SocketAddr,
    pub connections: Connections,
    /// Error frames sent, by code: refused joins, refused frames (`bad_frame`,
    /// `rate_limited`), connections refused over the cap (`too_many_connections`), and failed
    /// TLS handshakes (`tls_handshake_timeout`, `tls_handshake_failed`).
    pub refused: BTreeMap<String, u64>,
    /// How admitted connections ended, by close reason (`game_closed`, `client_closed`,
    /// `replaced`, `game_over`, `shutting_down`, `rate_limited`, `message_too_big`,
    /// `invalid_utf8`, `ping_timeout`, `client_error`, `game_error`).
    pub closed: BTreeMap<String, u64>,
    /// Messages forwarded.
    pub forwarded: Directions<u64>,
    /// The gateway's own time per forwarded message: frame read to line written (`to_game`),
    /// line read to frame sent (`to_client`).
    pub overhead_us: Directions<Overhead>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    /// Websockets open now (joining or playing).
    pub open: u64,
    /// Admitted and proxied now.
    pub playing: u64,
    /// Websockets accepted since start.
    pub total: u64,
    /// Joins admitted since start.
    pub admitted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Directions<T> {
    pub to_game: T,
    pub to_client: T,
}

/// Microseconds; percentiles are bucket upper bounds (within 6.25 %), `max` is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overhead {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// What every connection shares.
struct Shared {
    pool: Pool,
    listen: SocketAddr,
    registry: Mutex<Registry<oneshot::Sender<()>>>,
    meters: Meters,
    /// `true` once the gateway stops.
    stop: watch::Receiver<bool>,
}

impl Shared {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry<oneshot::Sender<()>>> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> GatewayStats {
        let m = &self.meters;
        let map = |c: &Mutex<BTreeMap<&'static str, u64>>| {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect()
        };
        GatewayStats {
            listen: self.listen,
            connections: Connections {
                open: m.open.load(Ordering::Relaxed),
                playing: m.playing.load(Ordering::Relaxed),
                total: m.total.load(Ordering::Relaxed),
                admitted: m.admitted.load(Ordering::Relaxed),
            },
            refused: map(&m.refused),
            closed: map(&m.closed),
            forwarded: Directions {
                to_game: m.to_game.count(),
                to_client: m.to_client.count(),
            },
            overhead_us: Directions {
                to_game: m.to_game.overhead(),
                to_client: m.to_client.overhead(),
            },
        }
    }
}

#[derive(Default)]
struct Meters {
    open: AtomicU64,
    playing: AtomicU64,
    total: AtomicU64,
    admitted: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    closed: Mutex<BTreeMap<&'static str, u64>>,
    to_game: Histogram,
    to_client: Histogram,
}

impl Meters {
    fn count(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
        *map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }
}

/// Counts one up while alive.
struct Up<'a>(&'a AtomicU64);

impl<'a> Up<'a> {
    fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Up(c)
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The listener's limits (`berth_net::serve`): the header-read timeout, one seat per open
/// connection (held for its whole life), TLS if configured; refusals (and failed TLS
/// handshakes) counted in the stats.
fn listen_limits(
    config: &GatewayConfig,
    shared: &Arc<Shared>,
    tls: Option<Acceptor>,
) -> berth_net::Limits {
    let counted = shared.clone();
    berth_net::Limits {
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
        max_seats: config.max_connections,
        refusal_code: code::TOO_MANY_CONNECTIONS,
        refusal_message: "too many connections to this host's gateway; retry later",
        on_refusal: Arc::new(move |code| Meters::count(&counted.meters.refused, code)),
        tls,
    }
}

async fn stop_signal(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Where a client times its round trip to this host before it queues with latencies: the
/// cheapest answer the gateway can give.
pub use berth_protocol::game::PROBE_PATH;

/// `204 No Content`, never cached, readable and timeable from any page (`Access-Control-Allow-
/// Origin`, `Timing-Allow-Origin`).
async fn probe() -> Response {
    use axum::http::{header, HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert("timing-allow-origin", HeaderValue::from_static("*"));
    r
}

/// The upgrade. The connection's listener `seat` is held until it closes: the gateway's cap
/// is on every open connection.
async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    seat: Seat,
    ws: WebSocketUpgrade,
) -> Response {
    ws.max_message_size(MAX_WS_FRAME)
        .max_frame_size(MAX_WS_FRAME)
        // Small buffers (most frames are tiny) and no write batching: latency is the point.
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .on_upgrade(move |socket| {
            let id = shared.meters.total.fetch_add(1, Ordering::Relaxed) + 1;
            let span = tracing::info_span!(
                "gateway",
                conn = id,
                %peer,
                session_id = tracing::field::Empty,
                player = tracing::field::Empty
            );
            async move {
                connection(shared, socket).await;
                drop(seat);
            }
            .instrument(span)
        })
}

/// How a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// An `error` frame, then a close with [`close_code`] and the code as reason.
    Refuse(Refusal),
    /// A close without an error frame.
    Close(u16, &'static str),
    /// The peer is gone or broken: nothing more to say.
    Gone(&'static str),
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            End::Refuse(r) => r.code,
            End::Close(_, reason) | End::Gone(reason) => reason,
        }
    }
}

/// A refusal: the stable code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

fn error_frame(code: &str, message: &str) -> Message {
    let e = GameAnswer::Error {
        code: code.to_owned(),
        message: message.to_owned(),
    };
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(&e).expect("protocol types always serialise"),
    ))
}

/// Runs one player connection to its end.
async fn connection<S>(shared: Arc<Shared>, mut ws: S)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let _open = Up::new(&shared.meters.open);
    tracing::debug!("connection open");
    let stop = shared.stop.clone();
    let ticket = match await_join(&mut ws, stop_signal(stop.clone())).await {
        Ok(ticket) => ticket,
        Err(end) => return finish(&shared, &mut ws, end, false).await,
    };
    let (mut gate, claims) = match check_ticket(&ticket, now_ms() / 1000, |s| shared.pool.gate(s)) {
        Ok(admitted) => admitted,
        Err(refusal) => return finish(&shared, &mut ws, End::Refuse(refusal), false).await,
    };
    let span = tracing::Span::current();
    span.record("session_id", tracing::field::display(&claims.sid));
    span.record("player", tracing::field::display(&claims.sub));
    let (kick, mut replaced) = oneshot::channel();
    let admitted = shared.registry().admit(
        claims.sid.clone(),
        claims.sub.clone(),
        claims.jti.clone(),
        kick,
    );
    let (id, older) = match admitted {
        Ok(admitted) => admitted,
        Err(InUse) => {
            let refusal = Refusal::new(
                code::TICKET_IN_USE,
                "another live connection uses this ticket",
            );
            return finish(&shared, &mut ws, End::Refuse(refusal), false).await;
        }
    };
    let held = Held {
        shared: &shared,
        id,
    };
    if let Some(older) = older {
        let _ = older.send(());
    }
    let game = match connect_game(&gate, &ticket).await {
        Ok(game) => game,
        Err(e) => {
            tracing::warn!(game = %gate.game_addr, error = %e, "game server unreachable");
            drop(held);
            let refusal = Refusal::new(code::GAME_UNREACHABLE, "the game server cannot be reached");
            return finish(&shared, &mut ws, End::Refuse(refusal), false).await;
        }
    };
    shared.meters.admitted.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(vm_id = %gate.vm_id, "joined");
    let end = {
        let _playing = Up::new(&shared.meters.playing);
        proxy(
            &shared,
            &mut ws,
            game,
            &mut gate,
            &mut replaced,
            stop_signal(stop),
        )
        .await
    };
    // Forget the ticket before the close handshake completes: a client that saw its close may
    // reconnect with the same ticket at once.
    drop(held);
    finish(&shared, &mut ws, end, true).await;
}

/// Removes a connection from the registry when dropped.
struct Held<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.shared.registry().leave(self.id);
    }
}

/// Sends what `end` says, closes the websocket (bounded in time) and counts it.
async fn finish<S, E>(shared: &Shared, ws: &mut S, end: End, admitted: bool)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
{
    if admitted {
        Meters::count(&shared.meters.closed, end.reason());
    }
    match &end {
        End::Refuse(r) => {
            if !admitted {
                Meters::count(&shared.meters.refused, r.code);
                tracing::info!(code = r.code, message = %r.message, "refused");
            }
            let close = close_code(r.code).unwrap_or(close::NORMAL);
            let _ =
                tokio::time::timeout(CLOSE_BOUND, ws.send(error_frame(r.code, &r.message))).await;
            send_close(ws, close, r.code).await;
        }
        End::Close(code, reason) => {
            // Before the join only a frame the gateway cannot read ends it with a bare close.
            if !admitted {
                Meters::count(&shared.meters.refused, reason);
                tracing::info!(code = *reason, "refused");
            }
            send_close(ws, *code, reason).await;
        }
        End::Gone(_) => {}
    }
    // Completes the close handshake (or answers the client's close).
    let _ = tokio::time::timeout(CLOSE_BOUND, ws.close()).await;
    tracing::debug!(reason = end.reason(), "connection closed");
}

/// Waits for the first frame and takes the ticket out of it.
async fn await_join<S, E>(ws: &mut S, stopped: impl Future<Output = ()>) -> Result<String, End>
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let first = tokio::select! {
        first = first_frame(ws, JOIN_TIMEOUT) => first,
        () = stopped => return Err(shutting_down()),
    };
    let text = match first {
        // The join is held to the default frame limit: no image's own limit applies yet.
        First::Text(text) if text.len() > MAX_FRAME => {
            return Err(End::Close(close::TOO_BIG, MESSAGE_TOO_BIG))
        }
        First::Text(text) => text,
        First::Timeout => {
            return Err(End::Refuse(Refusal::new(
                code::JOIN_TIMEOUT,
                format!(
                    "send {{\"type\":\"join\",\"ticket\":…}} within {} s",
                    JOIN_TIMEOUT.as_secs()
                ),
            )))
        }
        First::Closed => return Err(End::Gone("client_closed")),
        First::TooBig => return Err(End::Close(close::TOO_BIG, MESSAGE_TOO_BIG)),
        First::NotUtf8 => return Err(End::Close(close::INVALID_DATA, INVALID_UTF8)),
        First::Failed => return Err(End::Gone("client_error")),
        First::Binary => {
            return Err(End::Refuse(Refusal::new(
                code::JOIN_FIRST,
                "the first frame must be a join text frame",
            )))
        }
    };
    parse_join(text.as_str()).ok_or_else(|| {
        End::Refuse(Refusal::new(
            code::JOIN_FIRST,
            "the first frame must be {\"type\":\"join\",\"ticket\":…}",
        ))
    })
}

fn shutting_down() -> End {
    End::Refuse(Refusal::new(
        SHUTTING_DOWN,
        "this host is shutting down; reconnect through the matchmaker",
    ))
}

/// The ticket of a `join` frame; `None` for anything else.
fn parse_join(text: &str) -> Option<String> {
    match serde_json::from_str::<GameRequest>(text) {
        Ok(GameRequest::Join { ticket }) => Some(ticket),
        _ => None,
    }
}

/// Checks a ticket against the session it names: the session must be active here (`gate`
/// looks it up), the ticket signed with its key, unexpired at `now_s`, for it, and its player
/// one of the session's.
fn check_ticket(
    ticket: &str,
    now_s: u64,
    gate: impl FnOnce(&SessionId) -> Option<Gate>,
) -> Result<(Gate, TicketClaims), Refusal> {
    let refuse = |e: ticket::TicketError| Refusal::new(e.code(), e.to_string());
    let session = ticket::session_of(ticket).map_err(refuse)?;
    let gate = gate(&session).ok_or_else(|| {
        Refusal::new(
            code::UNKNOWN_SESSION,
            format!("no live session {session} on this host"),
        )
    })?;
    if gate.key.is_empty() {
        // An empty HMAC key would accept tickets anyone can mint.
        return Err(Refusal::new(
            code::UNKNOWN_SESSION,
            format!("session {session} cannot be joined here"),
        ));
    }
    let claims = ticket::verify(ticket, &gate.key, &session, now_s).map_err(refuse)?;
    if !gate.players.contains(&claims.sub) {
        return Err(Refusal::new(
            code::NOT_A_PLAYER,
            format!("{} is not a player of session {session}", claims.sub),
        ));
    }
    Ok((gate, claims))
}

/// "Another live connection holds this ticket."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InUse;

/// Who is connected: one live connection per ticket (`jti`), one per player and session.
/// `K` is how to tell a connection it was replaced.
struct Registry<K> {
    next: u64,
    tickets: HashMap<(SessionId, String), u64>,
    players: HashMap<(SessionId, PlayerId), u64>,
    conns: HashMap<u64, Entry<K>>,
}

struct Entry<K> {
    session: SessionId,
    player: PlayerId,
    jti: String,
    kick: K,
}

impl<K> Default for Registry<K> {
    fn default() -> Self {
        Registry {
            next: 0,
            tickets: HashMap::new(),
            players: HashMap::new(),
            conns: HashMap::new(),
        }
    }
}

impl<K> Registry<K> {
    /// Registers a connection; returns its id and the player's older connection's `kick`, if
    /// any (now forgotten here). A ticket already held by a live connection is refused.
    fn admit(
        &mut self,
        session: SessionId,
        player: PlayerId,
        jti: String,
        kick: K,
    ) -> Result<(u64, Option<K>), InUse> {
        let ticket = (session.clone(), jti);
        if self.tickets.contains_key(&ticket) {
            return Err(InUse);
        }
        self.next += 1;
        let id = self.next;
        let older = self
            .players
            .insert((session.clone(), player.clone()), id)
            .and_then(|old| self.forget(old));
        self.tickets.insert(ticket.clone(), id);
        self.conns.insert(
            id,
            Entry {
                session,
                player,
                jti: ticket.1,
                kick,
            },
        );
        Ok((id, older))
    }

    /// Forgets a connection (if it is still registered).
    fn leave(&mut self, id: u64) {
        let _ = self.forget(id);
    }

    fn forget(&mut self, id: u64) -> Option<K> {
        let e = self.conns.remove(&id)?;
        let ticket = (e.session.clone(), e.jti);
        if self.tickets.get(&ticket) == Some(&id) {
            self.tickets.remove(&ticket);
        }
        let player = (e.session, e.player);
        if self.players.get(&player) == Some(&id) {
            self.players.remove(&player);
        }
        Some(e.kick)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.len()
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connecting timed out")]
    Timeout,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Connects to the session's game server and writes the join in the image's framing.
async fn connect_game(gate: &Gate, ticket: &str) -> Result<TcpStream, ConnectError> {
    let mut game = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(gate.game_addr))
        .await
        .map_err(|_| ConnectError::Timeout)??;
    game.set_nodelay(true)?;
    let join = serde_json::to_vec(&GameRequest::Join {
        ticket: ticket.to_owned(),
    })
    .expect("protocol types always serialise");
    let first = frames::join(gate.game.framing, &join);
    if !first.is_empty() {
        tokio::time::timeout(CONNECT_TIMEOUT, game.write_all(&first))
            .await
            .map_err(|_| ConnectError::Timeout)??;
    }
    Ok(game)
}

/// What a client frame is to the gateway.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// Text or binary: for the game, in the image's framing.
    Data,
    Pong,
    /// A ping (answered by the websocket layer).
    Ignore,
    Close,
}

fn classify(msg: &Message) -> Frame {
    match msg {
        Message::Text(_) | Message::Binary(_) => Frame::Data,
        Message::Pong(_) => Frame::Pong,
        Message::Ping(_) => Frame::Ignore,
        Message::Close(_) => Frame::Close,
    }
}

/// The gateway's flood guard: `per_s` frames per second (the image's `frames_per_s`, by
/// default [`RATE_PER_S`]), bursts of twice that, and a close after [`RATE_STRIKES`] refusals
/// within [`STRIKES_FORGIVEN`] of each other.
fn flood(now: Instant, per_s: u32) -> Flood {
    Flood::new(per_s, per_s * 2, RATE_STRIKES, STRIKES_FORGIVEN, now)
}

/// Forwards between an admitted client and its game server until one side ends.
async fn proxy<S>(
    shared: &Shared,
    ws: &mut S,
    game: TcpStream,
    gate: &mut Gate,
    replaced: &mut oneshot::Receiver<()>,
    stopped: impl Future<Output = ()>,
) -> End
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let (mut rd, wr) = game.into_split();
    let mut reader = GameReader::new(gate.game.framing);
    let mut up = Upstream {
        wr,
        flood: flood(Instant::now(), gate.game.frames_per_s),
        out: Vec::with_capacity(MAX_FRAME + 16),
        last_pong: Instant::now(),
    };
    let meters = &shared.meters;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            frame = ws.next() => {
                if let Some(end) = up.take(frame, ws, gate, meters).await {
                    return end;
                }
            }
            read = reader.next(&mut rd) => match read {
                GameRead::Message(msg) => {
                    let read_at = Instant::now();
                    if !send(ws, msg).await {
                        return End::Gone("client_error");
                    }
                    meters.to_client.record(read_at.elapsed());
                }
                GameRead::TooLong | GameRead::Bad(_) => {
                    tracing::warn!(vm_id = %gate.vm_id, ?read, "the game broke its framing");
                    return End::Close(close::UNREACHABLE, "game_error");
                }
                // Everything the game sent has been forwarded.
                GameRead::Closed => return game_closed(gate).await,
            },
            () = gate.ended() => return vm_went(gate),
            _ = &mut *replaced => {
                return End::Refuse(Refusal::new(code::REPLACED, "a newer connection of this player took over"));
            }
            () = &mut stopped => return shutting_down(),
            _ = ping.tick() => {
                if up.last_pong.elapsed() > PONG_TIMEOUT {
                    return End::Close(close::TIMEOUT, "ping_timeout");
                }
                if !send(ws, Message::Ping(Bytes::from_static(b"berth"))).await {
                    return End::Gone("client_error");
                }
            }
        }
    }
}

/// The session's VM went: the game is over, or it moved to another host.
fn vm_went(gate: &Gate) -> End {
    if gate.moved() {
        let why = "the session moved to another host: connect to the endpoint of your next matched";
        return End::Refuse(Refusal::new(code::SESSION_MOVED, why));
    }
    End::Refuse(Refusal::new(code::GAME_OVER, "the game is over"))
}

/// The game closed its socket. A killed or crashed VM closes it a moment before the pool sees
/// the VM go: wait that moment ([`VM_GONE_WAIT`]), so that its players hear `game_over` (1001),
/// the session's end, rather than a plain `game_closed`.
async fn game_closed(gate: &mut Gate) -> End {
    match tokio::time::timeout(VM_GONE_WAIT, gate.ended()).await {
        Ok(()) => vm_went(gate),
        Err(_) => End::Close(close::NORMAL, "game_closed"),
    }
}

/// The client-to-game half of [`proxy`]: the game's write side, the flood guard and the
/// last pong.
struct Upstream {
    wr: tokio::net::tcp::OwnedWriteHalf,
    flood: Flood,
    out: Vec<u8>,
    last_pong: Instant,
}

impl Upstream {
    /// Takes one client frame: forwards it, or refuses it; `Some` ends the connection.
    async fn take<S>(
        &mut self,
        frame: Option<Result<Message, axum::Error>>,
        ws: &mut S,
        gate: &Gate,
        meters: &Meters,
    ) -> Option<End>
    where
        S: Sink<Message> + Unpin,
    {
        let read_at = Instant::now();
        let msg = match frame {
            None => return Some(End::Gone("client_closed")),
            // Oversize (1009) and not UTF-8 (1007) are told; a broken connection is not.
            Some(Err(e)) => {
                let told = read_error_close(&e).map(|(code, reason)| End::Close(code, reason));
                return Some(told.unwrap_or(End::Gone("client_error")));
            }
            Some(Ok(msg)) => msg,
        };
        match classify(&msg) {
            Frame::Close => return Some(End::Gone("client_closed")),
            Frame::Pong => {
                self.last_pong = read_at;
                return None;
            }
            Frame::Ignore => return None,
            Frame::Data => {}
        }
        if frames::payload_len(&msg) > gate.game.max_frame_bytes as usize {
            return Some(End::Close(close::TOO_BIG, MESSAGE_TOO_BIG));
        }
        let refusal = match self.flood.check(read_at) {
            Verdict::Allowed => None,
            Verdict::Close => {
                Meters::count(&meters.refused, code::RATE_LIMITED);
                let refusal = Refusal::new(code::RATE_LIMITED, "too many frames; closing");
                return Some(End::Refuse(refusal));
            }
            Verdict::Refused => {
                Meters::count(&meters.refused, code::RATE_LIMITED);
                let per_s = gate.game.frames_per_s;
                let msg = format!("at most {per_s} frames per second; this one was dropped");
                Some((code::RATE_LIMITED, msg))
            }
        };
        let refusal = refusal.or_else(|| {
            frames::to_game(gate.game.framing, &msg, &mut self.out)
                .err()
                .map(|why| {
                    Meters::count(&meters.refused, code::BAD_FRAME);
                    (code::BAD_FRAME, why.to_owned())
                })
        });
        if let Some((code, why)) = refusal {
            return (!send(ws, error_frame(code, &why)).await).then_some(End::Gone("client_error"));
        }
        match tokio::time::timeout(SEND_TIMEOUT, self.wr.write_all(&self.out)).await {
            Ok(Ok(())) => {
                meters.to_game.record(read_at.elapsed());
                None
            }
            _ if gate.is_ending() => Some(vm_went(gate)),
            _ => Some(End::Close(close::UNREACHABLE, "game_error")),
        }
    }
}

/// Sends one message, bounded in time; false when the client is gone or too slow.
async fn send<S: Sink<Message> + Unpin>(ws: &mut S, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, ws.send(msg)).await,
        Ok(Ok(()))
    )
}

/// A fixed-bucket latency histogram in µs that any task records into without a lock: exact
/// below 32 µs, then 16 buckets per power of two (within 6.25 %), up to ~19 hours.
struct Histogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
    sum: AtomicU64,
}

/// Sub-buckets per power of two: 2^SUB_BITS.
const SUB_BITS: u32 = 4;
const LINEAR: u64 = 2 << SUB_BITS;
const TOP_EXP: u32 = 35;
const BUCKETS: usize = LINEAR as usize + (((TOP_EXP - SUB_BITS) as usize) << SUB_BITS);

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        let us = us.min((1 << (TOP_EXP + 1)) - 1);
        if us < LINEAR {
            return us as usize;
        }
        let exp = 63 - us.leading_zeros();
        let sub = (us >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        LINEAR as usize + (((exp - SUB_BITS - 1) as usize) << SUB_BITS) + sub as usize
    }

    /// The smallest value of bucket `i`.
    fn lower(i: usize) -> u64 {
        if i < LINEAR as usize {
            return i as u64;
        }
        let i = i - LINEAR as usize;
        let exp = (i >> SUB_BITS) as u32 + SUB_BITS + 1;
        let sub = (i & ((1 << SUB_BITS) - 1)) as u64;
        ((1 << SUB_BITS) + sub) << (exp - SUB_BITS)
    }

    fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(us)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
        self.sum.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts at each of `bounds_us`: a bucket counts under a bound when its
    /// largest value is at most the bound.
    fn cumulative(&self, bounds_us: &[u64]) -> Cumulative {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let upper = |i: usize| Self::lower(i + 1).saturating_sub(1).max(Self::lower(i));
        let buckets = bounds_us
            .iter()
            .map(|&bound| {
                let n = counts
                    .iter()
                    .enumerate()
                    .take_while(|(i, _)| upper(*i) <= bound)
                    .map(|(_, c)| c)
                    .sum();
                (bound, n)
            })
            .collect();
        Cumulative {
            sum_us: self.sum.load(Ordering::Relaxed),
            count: counts.iter().sum(),
            buckets,
        }
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The value below which a fraction `q` of the samples lie (a bucket's upper bound).
    fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let upper = Self::lower(i + 1).saturating_sub(1).max(Self::lower(i));
                return upper.min(self.max.load(Ordering::Relaxed));
            }
        }
        self.max.load(Ordering::Relaxed)
    }

    fn overhead(&self) -> Overhead {
        Overhead {
            p50: self.quantile(0.5),
            p99: self.quantile(0.99),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use berth_client::probe::{stall, Probe};

    #[test]
    fn frames_are_classified() {
        let text = |s: &str| Message::Text(Utf8Bytes::from(s));
        assert_eq!(classify(&text(r#"{"type":"ping"}"#)), Frame::Data);
        assert_eq!(
            classify(&Message::Binary(Bytes::from_static(b"{}"))),
            Frame::Data
        );
        assert_eq!(classify(&Message::Pong(Bytes::new())), Frame::Pong);
        assert_eq!(classify(&Message::Ping(Bytes::new())), Frame::Ignore);
        assert_eq!(classify(&Message::Close(None)), Frame::Close);
    }

    #[test]
    fn join_is_parsed_and_every_code_has_its_close() {
        assert_eq!(
            parse_join(r#"{"type":"join","ticket":"a.b.c"}"#).as_deref(),
            Some("a.b.c")
        );
        assert_eq!(parse_join(r#"{"type":"ping","nonce":1}"#), None);
        assert_eq!(parse_join(r#"{"type":"join"}"#), None);
        assert_eq!(parse_join("join a.b.c"), None);
        let cases = [
            (code::JOIN_FIRST, Some(4400)),
            (code::JOIN_TIMEOUT, Some(4408)),
            (code::BAD_TICKET, Some(4401)),
            (code::TICKET_EXPIRED, Some(4401)),
            (code::WRONG_SESSION, Some(4401)),
            (code::NOT_A_PLAYER, Some(4401)),
            (code::UNKNOWN_SESSION, Some(4404)),
            (code::TICKET_IN_USE, Some(4409)),
            (code::REPLACED, Some(4409)),
            (code::GAME_UNREACHABLE, Some(1011)),
            (code::GAME_OVER, Some(1001)),
            (SHUTTING_DOWN, Some(1001)),
            (code::RATE_LIMITED, Some(4429)),
            (code::BAD_FRAME, None),
        ];
        for (c, close) in cases {
            assert_eq!(close_code(c), close, "{c}");
        }
    }

    /// A test double of a client websocket: the frames it will send, then silence.
    fn client(frames: Vec<Message>) -> impl Stream<Item = Result<Message, String>> + Unpin {
        futures_util::stream::iter(frames.into_iter().map(Ok))
            .chain(futures_util::stream::pending())
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_frame_must_be_a_join_within_five_seconds() {
        let never = std::future::pending::<()>;
        let t0 = tokio::time::Instant::now();
        let end = await_join(&mut client(vec![]), never())
            .await
            .expect_err("times out");
        assert!(matches!(end, End::Refuse(r) if r.code == code::JOIN_TIMEOUT));
        assert_eq!(t0.elapsed(), JOIN_TIMEOUT);

        let join = Message::Text(Utf8Bytes::from(r#"{"type":"join","ticket":"t.i.k"}"#));
        let mut ws = client(vec![Message::Ping(Bytes::new()), join]);
        assert_eq!(await_join(&mut ws, never()).await, Ok("t.i.k".into()));

        let ping = Message::Text(Utf8Bytes::from(r#"{"type":"ping"}"#));
        let end = await_join(&mut client(vec![ping]), never()).await;
        assert!(matches!(end, Err(End::Refuse(r)) if r.code == code::JOIN_FIRST));
        let binary = Message::Binary(Bytes::from_static(b"join"));
        let end = await_join(&mut client(vec![binary]), never()).await;
        assert!(matches!(end, Err(End::Refuse(r)) if r.code == code::JOIN_FIRST));

        let mut too_big = futures_util::stream::iter(vec![Err::<Message, _>(
            "Space limit exceeded: Message too long: 5000 > 4096".to_owned(),
        )]);
        assert_eq!(
            await_join(&mut too_big, never()).await,
            Err(End::Close(close::TOO_BIG, "message_too_big"))
        );
        let end = await_join(&mut client(vec![]), std::future::ready(())).await;
        assert!(matches!(end, Err(End::Refuse(r)) if r.code == SHUTTING_DOWN));
    }

    #[test]
    fn the_rate_limit_refuses_then_closes_a_sustained_flood() {
        let t0 = Instant::now();
        // 20 Hz inputs plus pings never trip it.
        let mut f = flood(t0, RATE_PER_S);
        for i in 0..2000u64 {
            assert_eq!(
                f.check(t0 + Duration::from_millis(i * 40)),
                Verdict::Allowed
            );
        }
        // A burst of 80 passes; beyond it frames are refused, and after 20 refusals it closes.
        let mut f = flood(t0, RATE_PER_S);
        for _ in 0..RATE_BURST {
            assert_eq!(f.check(t0), Verdict::Allowed);
        }
        for _ in 0..RATE_STRIKES {
            assert_eq!(f.check(t0), Verdict::Refused);
        }
        assert_eq!(f.check(t0), Verdict::Close);
        // Strikes are forgiven after a quiet spell.
        let mut f = flood(t0, RATE_PER_S);
        for _ in 0..RATE_BURST + 5 {
            let _ = f.check(t0);
        }
        let later = t0 + STRIKES_FORGIVEN + Duration::from_secs(1);
        assert_eq!(f.check(later), Verdict::Allowed);
    }

    fn s(id: &str) -> SessionId {
        SessionId::new(id).expect("valid")
    }
    fn p(id: &str) -> PlayerId {
        PlayerId::new(id).expect("valid")
    }

    #[test]
    fn one_live_connection_per_ticket_and_per_player() {
        let mut r: Registry<&'static str> = Registry::default();
        let (a1, older) = r
            .admit(s("s1"), p("alice"), "t1".into(), "alice-1")
            .expect("first");
        assert_eq!(older, None);
        // The same ticket while its connection lives: refused, the live one untouched.
        assert_eq!(
            r.admit(s("s1"), p("alice"), "t1".into(), "alice-1b"),
            Err(InUse)
        );
        assert_eq!(r.len(), 1);
        // A newer ticket of the same player replaces the older connection.
        let (a2, older) = r
            .admit(s("s1"), p("alice"), "t2".into(), "alice-2")
            .expect("newer ticket");
        assert_eq!(older, Some("alice-1"));
        // The replaced connection leaving later does not drop the newer one.
        r.leave(a1);
        assert_eq!(r.len(), 1);
        // Its ticket is free again (a phone reconnecting with it replaces the newer one).
        let (a3, older) = r
            .admit(s("s1"), p("alice"), "t1".into(), "alice-3")
            .expect("t1 is free");
        assert_eq!(older, Some("alice-2"));
        r.leave(a2);
        // Other players and other sessions are independent.
        let (b, older) = r.admit(s("s1"), p("bob"), "t3".into(), "bob").expect("bob");
        assert_eq!(older, None);
        let (other, older) = r
            .admit(s("s2"), p("alice"), "t1".into(), "alice-s2")
            .expect("same jti, other session");
        assert_eq!(older, None);
        assert_eq!(r.len(), 3);
        // After a close the same ticket may come back.
        r.leave(a3);
        assert!(r.admit(s("s1"), p("alice"), "t1".into(), "again").is_ok());
        r.leave(b);
        r.leave(other);
        assert_eq!(r.len(), 1);
    }

    /// A test double of the server's minting (HS256 with the session id as `kid`).
    fn mint(kid: &str, sid: &str, sub: &str, exp: u64, key: &[u8]) -> String {
        use hmac::{Mac, SimpleHmac};
        let enc = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let head = enc(serde_json::json!({"alg":"HS256","typ":"JWT","kid":kid}));
        let body = enc(
            serde_json::json!({"sub":sub,"sid":sid,"aud":ticket::TICKET_AUDIENCE,
            "iss":"berth","exp":exp,"iat":1,"jti":"j1"}),
        );
        let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(key).expect("key");
        mac.update(format!("{head}.{body}").as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{head}.{body}.{sig}")
    }

    #[test]
    fn tickets_are_checked_with_the_sessions_own_key() {
        let key = b"0123456789abcdef".to_vec();
        let (_ending_tx, ending) = watch::channel(false);
        let gate = |key: Vec<u8>| Gate {
            vm_id: berth_protocol::VmId::new("vm-1").expect("valid"),
            game_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            key,
            players: vec![p("alice")],
            game: Default::default(),
            ending: ending.clone(),
            moved: Default::default(),
        };
        let lookup = |want: &'static str, key: Vec<u8>| {
            let g = gate(key);
            move |sid: &SessionId| (sid.as_str() == want).then_some(g)
        };
        let code_of = |t: &str, key: Vec<u8>| {
            check_ticket(t, 100, lookup("s1", key))
                .map(|(_, c)| c.sub.to_string())
                .map_err(|r| r.code)
        };
        let good = mint("s1", "s1", "alice", 200, &key);
        assert_eq!(code_of(&good, key.clone()), Ok("alice".into()));
        let cases = [
            ("garbage".to_owned(), code::BAD_TICKET),
            (mint("s9", "s9", "alice", 200, &key), code::UNKNOWN_SESSION),
            (mint("s1", "s1", "alice", 200, b"other"), code::BAD_TICKET),
            (mint("s1", "s1", "alice", 100, &key), code::TICKET_EXPIRED),
            (mint("s1", "s2", "alice", 200, &key), code::WRONG_SESSION),
            (mint("s1", "s1", "mallory", 200, &key), code::NOT_A_PLAYER),
        ];
        for (t, want) in cases {
            assert_eq!(code_of(&t, key.clone()), Err(want), "{t}");
        }
        // A session without a key (adopted from an old record) admits nobody, not everybody.
        let keyless = mint("s1", "s1", "alice", 200, b"");
        assert_eq!(code_of(&keyless, vec![]), Err(code::UNKNOWN_SESSION));
    }

    /// A gateway on port 0 before one active session, `s1` with player `alice`, on the pool's
    /// test double, whose game server is a TCP listener that reads and discards; and a ticket
    /// for alice.
    struct Live {
        gateway: Gateway,
        pool: Pool,
        url: String,
        join: String,
        _dir: tempfile::TempDir,
    }

    async fn live(config: GatewayConfig) -> Live {
        use crate::pool::tests::{pool_with, Script};
        let game = TcpListener::bind("127.0.0.1:0").await.expect("game port");
        let game_addr = game.local_addr().expect("game address");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = game.accept().await {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut tcp, &mut tokio::io::sink()).await;
                });
            }
        });
        let script = Script {
            game_addr: Some(game_addr),
            ..Script::default()
        };
        let (pool, _driver, dir) = pool_with(0, 4, script).await;
        let wait = Duration::from_secs(30);
        pool.wait_ready("arena", 0, wait).await.expect("docked");
        let key = b"0123456789abcdef";
        let request = crate::pool::ActivateRequest {
            session_id: s("s1"),
            image: "arena".into(),
            players: vec![p("alice")],
            teams: vec![],
            params: serde_json::Value::Null,
            ticket_key: hex::encode(key),
            deadline_ms: 0,
        };
        pool.activate(request).await.expect("active");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("gateway port");
        let gateway = serve(pool.clone(), listener, &config, None).expect("gateway");
        let ticket = mint("s1", "s1", "alice", now_ms() / 1000 + 600, key);
        Live {
            url: format!("ws://{}{PATH}", gateway.addr),
            join: format!(r#"{{"type":"join","ticket":"{ticket}"}}"#),
            gateway,
            pool,
            _dir: dir,
        }
    }

    impl Live {
        async fn stop(self) {
            self.gateway.shutdown().await;
            self.pool.shutdown().await;
        }
    }

    #[tokio::test]
    async fn a_flood_that_does_not_read_gets_its_4429_not_a_reset() {
        let live = live(GatewayConfig::default()).await;
        let mut flooder = Probe::connect(&live.url, None).await.expect("connects");
        assert!(flooder.send_text(&live.join).await);
        // Far past the burst, all written before anything is read: the gateway closes with
        // most of it unread in its receive buffer.
        assert_eq!(flooder.flood(r#"{"type":"input"}"#, 5000).await, 5000);
        let end = flooder
            .until_closed(Duration::from_secs(10))
            .await
            .expect("ends");
        let limited = end
            .texts
            .iter()
            .filter(|t| t.contains("rate_limited"))
            .count();
        assert!(
            limited > RATE_STRIKES as usize,
            "{limited} rate_limited errors"
        );
        assert!(end.closed.frame, "no close frame: {:?}", end.closed);
        assert_eq!(
            end.closed.code,
            Some(close::RATE_LIMITED),
            "{:?}",
            end.closed
        );
        assert_eq!(live.gateway.stats().closed.get("rate_limited"), Some(&1));
        live.stop().await;
    }

    #[tokio::test]
    async fn a_text_frame_that_is_not_utf8_closes_with_1007() {
        let live = live(GatewayConfig::default()).await;
        for joined in [false, true] {
            let mut probe = Probe::connect(&live.url, None).await.expect("connects");
            if joined {
                assert!(probe.send_text(&live.join).await);
            }
            assert!(probe.send_invalid_utf8().await);
            let end = probe
                .until_closed(Duration::from_secs(5))
                .await
                .expect("ends");
            let closed = (
                end.closed.frame,
                end.closed.code,
                end.closed.reason.as_str(),
            );
            let want = (true, Some(close::INVALID_DATA), INVALID_UTF8);
            assert_eq!(closed, want, "joined: {joined}");
        }
        let stats = live.gateway.stats();
        assert_eq!(stats.refused.get(INVALID_UTF8), Some(&1), "{stats:?}");
        assert_eq!(stats.closed.get(INVALID_UTF8), Some(&1), "{stats:?}");
        live.stop().await;
    }

    #[tokio::test]
    async fn a_connection_that_never_finishes_its_upgrade_is_closed() {
        let config = GatewayConfig {
            header_read_timeout_ms: 300,
            ..GatewayConfig::default()
        };
        let live = live(config).await;
        let half = b"GET /v1/game HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n";
        for sent in [&b""[..], &half[..]] {
            let stalled = stall(live.gateway.addr, sent, Duration::from_secs(5))
                .await
                .expect("connects");
            let after = stalled.closed_after.expect("closed");
            assert!(
                after < Duration::from_millis(1500),
                "closed after {after:?}"
            );
        }
        live.stop().await;
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_with_a_code() {
        let config = GatewayConfig {
            max_connections: 1,
            ..GatewayConfig::default()
        };
        let live = live(config).await;
        // A player in the game holds the one seat…
        let mut player = Probe::connect(&live.url, None).await.expect("connects");
        assert!(player.send_text(&live.join).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(live.gateway.stats().connections.playing, 1);
        // …so another connection is answered 503 before its upgrade.
        match Probe::connect(&live.url, None).await {
            Err(berth_client::ClientError::Http { status, body }) => {
                assert_eq!(status, 503);
                assert!(body.contains(code::TOO_MANY_CONNECTIONS), "{body}");
            }
            other => panic!("expected a 503, got {other:?}"),
        }
        let refused = live.gateway.stats().refused;
        assert_eq!(refused.get(code::TOO_MANY_CONNECTIONS), Some(&1));
        // Once the player has gone, its seat is free.
        drop(player);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = Probe::connect(&live.url, None).await;
        assert!(again.is_ok(), "{again:?}");
        live.stop().await;
    }

    #[test]
    fn the_histogram_is_exact_when_small_and_close_when_large() {
        for us in [
            0,
            1,
            31,
            32,
            33,
            63,
            64,
            100,
            1000,
            123_456,
            1 << 30,
            u64::MAX,
        ] {
            let i = Histogram::index(us);
            assert!(i < BUCKETS, "{us}");
            let (lo, hi) = (Histogram::lower(i), Histogram::lower(i + 1));
            if us < (1 << (TOP_EXP + 1)) {
                assert!(lo <= us && us < hi, "{us} in [{lo}, {hi})");
                assert!((hi - lo) as f64 <= (lo as f64 / 16.0).max(1.0), "{us}");
            }
        }
        let h = Histogram::default();
        assert_eq!(
            h.overhead(),
            Overhead {
                p50: 0,
                p99: 0,
                max: 0
            }
        );
        for us in 1..=100 {
            h.record(Duration::from_micros(us));
        }
        h.record(Duration::from_micros(5_000));
        assert_eq!(h.count(), 101);
        let o = h.overhead();
        assert_eq!(o.max, 5_000);
        assert!((50..=53).contains(&o.p50), "{o:?}");
        assert!((100..=103).contains(&o.p99), "{o:?}");
        // For Prometheus: cumulative counts under each bound, and the exact sum.
        let c = h.cumulative(&[10, 31, 100, 4_000, 10_000]);
        assert_eq!((c.count, c.sum_us), (101, 5050 + 5_000));
        let at = |b: u64| c.buckets.iter().find(|(x, _)| *x == b).map(|(_, n)| *n);
        assert_eq!(at(10), Some(10), "exact below 32 µs");
        assert_eq!(at(31), Some(31));
        assert!((95..=100).contains(&at(100).unwrap_or(0)), "{c:?}");
        assert_eq!(at(4_000), Some(100));
        assert_eq!(at(10_000), Some(101));
    }
}
