//! hostd's one websocket to the matchmaking server (`/v1/hosts`, messages in
//! [`berth_protocol::host`]).
//!
//! [`run`] is the single owner of the link: one task keeps at most one connection open, and
//! on every connect it sends `register` with the host's capacity and the VMs the pool really
//! has, waits for `welcome`, then serves the connection from one `select!` loop:
//!
//! - every `heartbeat_ms`: `heartbeat` with fresh per-image capacity (plus a websocket ping;
//!   a server silent for [`SILENT_HEARTBEATS`] heartbeats counts as gone);
//! - `activate`: [`Pool::activate`] in its own task (the read loop never waits for a VM); the
//!   answer, `activated` or `activate_failed`, comes back to the loop over a channel;
//! - `destroy`: [`Pool::destroy`] of that session's VM in its own task; the pool's `Destroyed`
//!   event becomes `destroyed`. A `destroy` for a session still activating is remembered and
//!   carried out when the activation finishes. A session with no VM here is logged at debug:
//!   the server learns it is gone from the next `register`;
//! - pool events: `Ended`, `Failed` and `Destroyed` are forwarded; `Docked`, `PrimeFailed`
//!   and `SubstrateDiscarded` send an early heartbeat so capacity changes reach the server at
//!   once;
//! - substrate shipping ([`crate::ship`]): the pool's wants go out as `want_substrate` (again
//!   on every new connection while unanswered); `fetch_substrate` and `no_substrate` answer
//!   them, `share_substrate` hands the pool a one-time grant for a peer;
//! - `error` from the server is logged; frames that are not host messages (not JSON, unknown
//!   type, binary) are logged and ignored, never a reason to drop the link.
//!
//! On any failure (refused handshake, close frame, socket error, silence, write timeout) the
//! task reconnects and registers again: to the next server URL when several replicas are
//! configured, so that a replica going down moves its hosts to another one within
//! [`BACKOFF_START`]; the delay ([`backoff`]: from 200 ms, doubling, ±20 % jitter, capped at
//! `reconnect_max_s`) grows only once every URL has failed in a row.
//!
//! **What a disconnect loses.** Nothing a player needs. `ended` and `failed` reports are kept in
//! the pool's [`Outbox`] on disk until the server answers `recorded`: they go out live, in the
//! `outbox` of every `register`, and again every [`RESEND_HEARTBEATS`] heartbeats. `destroyed`
//! events while no connection is open are dropped: the `vms` list of the next `register` is the
//! truth, and the server reconciles against it (a session whose VM is missing is gone). Answers
//! to activations still running when the link drops are not lost: they are sent after the next
//! `welcome`, so the server may see an `activated` for a VM the `register` already listed.

use crate::config::ImageConfig;
pub use crate::config::ServerLink;
use crate::outbox::Outbox;
use crate::pool::{ActivateRequest, Pool, PoolError, PoolEvent, Status, VmInfo};
use crate::ship::{Offer, Ship};
pub use crate::token::Token;
use crate::token::TokenError;
use berth_protocol::host::HOST_PROTOCOL_VERSION;
use berth_protocol::host::{HostMessage, HostVm, ImageCapacity, ServerToHost};
use berth_protocol::{SessionId, SubstrateState, VmId};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::Instrument;

/// The first reconnect delay; each failure doubles it up to the configured cap.
pub const BACKOFF_START: Duration = Duration::from_millis(200);
/// Largest message either side may send (a `register` of 64 VMs is a few KiB).
pub const MAX_MESSAGE: usize = 1 << 20;
/// The server counts as gone when no frame (not even a pong) came for this many heartbeats.
pub const SILENT_HEARTBEATS: u32 = 3;
/// Reports the server has not answered `recorded` are sent again every this many heartbeats.
pub const RESEND_HEARTBEATS: u32 = 3;
/// How long a clean stop waits for `recorded` of reports in flight.
const RECORDED_WAIT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the backoff to its start.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Bounds on the server's `heartbeat_ms`, so that a bad value can neither spin nor starve.
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
const HEARTBEAT_MAX: Duration = Duration::from_secs(60);

/// Why a connection ended (the link then reconnects).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the server refused the websocket: HTTP {status}")]
    Refused { status: u16 },
    #[error("the server refused this host: {code}: {message}")]
    Rejected { code: String, message: String },
    #[error("the server speaks host protocol v{0}, this hostd v{HOST_PROTOCOL_VERSION}")]
    Version(u32),
    #[error("websocket")]
    Socket(#[source] tungstenite::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("the server closed the link")]
    Closed,
    #[error("nothing heard from the server for {0:?}")]
    Silent(Duration),
    #[error("the link fell {0} pool events behind")]
    Lagged(u64),
}

impl LinkError {
    /// A short stable label for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            LinkError::Token(e) => e.code(),
            LinkError::Timeout(_) => "timeout",
            LinkError::Refused { .. } => "refused",
            LinkError::Rejected { .. } => "rejected",
            LinkError::Version(_) => "version",
            LinkError::Socket(_) => "socket",
            LinkError::Tls(_) => "tls",
            LinkError::Closed => "closed",
            LinkError::Silent(_) => "silent",
            LinkError::Lagged(_) => "lagged",
        }
    }

    fn socket(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Http(resp) => LinkError::Refused {
                status: resp.status().as_u16(),
            },
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                LinkError::Closed
            }
            e => match berth_client::tls::handshake_error(&e) {
                Some(reason) => LinkError::Tls(reason),
                None => LinkError::Socket(e),
            },
        }
    }
}

/// An error with its causes, for a log line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        // Some errors already print their cause; say it once.
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

/// The delay before reconnect attempt `attempt` (0 for the first after a good connection):
/// [`BACKOFF_START`] doubled per attempt, spread by `jitter` (0..1 maps to -20 %..+20 %) so a
/// fleet of hosts does not reconnect in lockstep after a server restart, never above `cap`.
pub fn backoff(attempt: u32, cap: Duration, jitter: f64) -> Duration {
    let base = BACKOFF_START
        .saturating_mul(1u32 << attempt.min(20))
        .min(cap);
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0)).min(cap)
}

fn jitter() -> f64 {
    (crate::util::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Per-image capacity as the server sees it: the pool's status plus the image sizes.
pub fn capacity(status: &Status, images: &[ImageConfig]) -> Vec<ImageCapacity> {
    status
        .images
        .iter()
        .map(|i| {
            let config = images.iter().find(|c| c.name == i.name);
            ImageCapacity {
                name: i.name.clone(),
                docked: i.substrate == SubstrateState::Docked,
                warm: i.warm,
                running: i.active,
                memory_mib: config.map_or(0, |c| c.memory_mib),
                vcpus: config.map_or(0, |c| c.vcpus),
                substrate: i.fingerprint.clone(),
            }
        })
        .collect()
}

/// The `register` message: who this host is, what it can run, what it really runs, and the
/// reports of gone VMs the server has not acknowledged (`outbox`).
pub fn register(
    link: &ServerLink,
    status: &Status,
    images: &[ImageConfig],
    outbox: Vec<HostMessage>,
) -> HostMessage {
    HostMessage::Register {
        v: HOST_PROTOCOL_VERSION,
        host: link.host.clone(),
        accel: status.accel.clone(),
        driver: status.driver.clone(),
        gateway: link.gateway.clone(),
        max_vms: status.max_vms,
        region: status.region.clone(),
        zone: status.zone.clone(),
        peer: status.peer.clone(),
        images: capacity(status, images),
        vms: status
            .vms
            .iter()
            .map(|v| HostVm {
                vm: v.vm_id.clone(),
                session: v.session_id.clone(),
                image: v.image.clone(),
            })
            .collect(),
        outbox,
    }
}

/// The answer to an `activate`.
pub fn activate_answer(session: SessionId, result: &Result<VmInfo, PoolError>) -> HostMessage {
    match result {
        Ok(vm) => HostMessage::Activated {
            session,
            vm: vm.vm_id.clone(),
            path: vm.path,
            activate_us: vm.activate_us,
        },
        Err(e) => HostMessage::ActivateFailed {
            session,
            code: e.code(),
            message: e.to_string(),
        },
    }
}

/// What the link does with a pool event.
#[derive(Debug, Clone, PartialEq)]
pub enum Forward {
    Send(Box<HostMessage>),
    /// Capacity changed: send a heartbeat now.
    Capacity,
    Nothing,
}

pub fn forward(event: PoolEvent) -> Forward {
    if let Some(report) = event.report() {
        return Forward::Send(Box::new(report));
    }
    match event {
        // Only VMs with a session emit these (warm clones are destroyed silently).
        PoolEvent::Destroyed { vm_id, session_id } => {
            Forward::Send(Box::new(HostMessage::Destroyed {
                session: session_id,
                vm: vm_id,
            }))
        }
        // A heartbeat carries capacity and the drain.
        PoolEvent::Docked { .. }
        | PoolEvent::PrimeFailed { .. }
        | PoolEvent::SubstrateDiscarded { .. }
        | PoolEvent::Shipped { .. }
        | PoolEvent::Draining => Forward::Capacity,
        PoolEvent::MigratedOut {
            vm_id,
            session_id,
            migrated,
        } => Forward::Send(Box::new(HostMessage::Sent {
            session: session_id,
            vm: vm_id,
            downtime_ms: migrated.downtime_ms,
            total_ms: migrated.total_ms,
            sent_bytes: migrated.sent_bytes,
        })),
        PoolEvent::MigratedIn { vm } => Forward::Send(Box::new(HostMessage::Received {
            session: vm.session_id,
            vm: vm.vm_id,
        })),
        // Answered as `activated` to the `activate` that caused it; reports are sent above.
        PoolEvent::Activated { .. } | PoolEvent::Ended { .. } | PoolEvent::Failed { .. } => {
            Forward::Nothing
        }
        // The prime that follows says the rest.
        PoolEvent::ShipRefused { .. } => Forward::Nothing,
    }
}

/// What the link needs of the pool: [`Pool`] in production, a test double in the tests.
pub(crate) trait LinkPool: Clone + Send + Sync + 'static {
    fn status(&self) -> Status;
    fn images(&self) -> &[ImageConfig];
    fn subscribe(&self) -> broadcast::Receiver<PoolEvent>;
    fn activate(
        &self,
        req: ActivateRequest,
    ) -> impl Future<Output = Result<VmInfo, PoolError>> + Send;
    fn destroy(&self, vm: VmId) -> impl Future<Output = Result<(), PoolError>> + Send;
    fn outbox(&self) -> &Outbox;
    fn ship(&self) -> &Ship;
    /// Live migration, target side: a receiving VM and the address peers send it to.
    fn receive(
        &self,
        _req: ActivateRequest,
    ) -> impl Future<Output = Result<(crate::pool::Incoming, String), PoolError>> + Send {
        async { Err(PoolError::ShuttingDown) }
    }
    /// Live migration, source side: send `session`'s VM to `to`.
    fn send_vm(
        &self,
        _session: SessionId,
        _to: std::net::SocketAddr,
    ) -> impl Future<Output = Result<crate::driver::Migrated, PoolError>> + Send {
        async { Err(PoolError::ShuttingDown) }
    }
}

impl LinkPool for Pool {
    fn status(&self) -> Status {
        Pool::status(self)
    }
    async fn receive(
        &self,
        req: ActivateRequest,
    ) -> Result<(crate::pool::Incoming, String), PoolError> {
        Pool::receive_on_peer(self, req).await
    }
    async fn send_vm(
        &self,
        session: SessionId,
        to: std::net::SocketAddr,
    ) -> Result<crate::driver::Migrated, PoolError> {
        Pool::send(self, &session, to).await
    }
    fn images(&self) -> &[ImageConfig] {
        &self.config().images
    }
    fn subscribe(&self) -> broadcast::Receiver<PoolEvent> {
        Pool::subscribe(self)
    }
    async fn activate(&self, req: ActivateRequest) -> Result<VmInfo, PoolError> {
        Pool::activate(self, req).await
    }
    async fn destroy(&self, vm: VmId) -> Result<(), PoolError> {
        Pool::destroy(self, vm.as_str()).await
    }
    fn outbox(&self) -> &Outbox {
        Pool::outbox(self)
    }
    fn ship(&self) -> &Ship {
        Pool::ship(self)
    }
}

/// Keeps this host registered with the server until `shutdown` resolves (see the module doc).
pub async fn run(pool: Pool, link: ServerLink, shutdown: impl Future<Output = ()> + Send) {
    run_with(pool, link, shutdown).await
}

async fn run_with<P: LinkPool>(pool: P, link: ServerLink, shutdown: impl Future<Output = ()>) {
    let span = tracing::info_span!("link", host_id = %link.host);
    pool.outbox().enable();
    let mut owner = Link::new(pool, link);
    async move {
        tokio::pin!(shutdown);
        let mut attempt = 0u32;
        loop {
            let mut welcomed = None;
            match owner.connection(shutdown.as_mut(), &mut welcomed).await {
                Ok(()) => {
                    tracing::info!("link closed: shutting down");
                    return;
                }
                Err(e) => tracing::warn!(code = e.code(), error = %chain(&e), "link down"),
            }
            if welcomed.is_some_and(|at: Instant| at.elapsed() >= STABLE_AFTER) {
                attempt = 0;
            }
            // Each URL once per round; the delay grows per round.
            let round = attempt / owner.link.urls.len().max(1) as u32;
            let delay = backoff(round, owner.link.reconnect_max, jitter());
            attempt = attempt.saturating_add(1);
            owner.at = (owner.at + 1) % owner.link.urls.len().max(1);
            let server = owner.url();
            let delay_ms = delay.as_millis() as u64;
            tracing::info!(delay_ms, attempt, server, "reconnecting");
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
    .instrument(span)
    .await
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An activation that finished (maybe while no connection was open).
struct Done {
    session: SessionId,
    result: Result<VmInfo, PoolError>,
}

/// Activations this link started and has not answered yet.
#[derive(Default)]
struct Inflight {
    tasks: u32,
    /// The server asked to destroy the session before its VM existed.
    destroy: bool,
}

/// The state the link task owns across connections.
struct Link<P> {
    pool: P,
    link: ServerLink,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// What background tasks (migrations) have to say to the server.
    said_tx: mpsc::UnboundedSender<HostMessage>,
    said_rx: mpsc::UnboundedReceiver<HostMessage>,
    inflight: HashMap<SessionId, Inflight>,
    /// Which of `link.urls` the next connection dials.
    at: usize,
}

enum Flow {
    Continue,
    /// The server sent a close frame.
    Closed,
}

impl<P: LinkPool> Link<P> {
    fn new(pool: P, link: ServerLink) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (said_tx, said_rx) = mpsc::unbounded_channel();
        Link {
            pool,
            link,
            done_tx,
            done_rx,
            said_tx,
            said_rx,
            inflight: HashMap::new(),
            at: 0,
        }
    }

    /// The server URL the next connection dials.
    fn url(&self) -> &str {
        self.link.urls.get(self.at).map_or("", String::as_str)
    }

    fn request(&self) -> Result<tungstenite::handshake::client::Request, LinkError> {
        let mut request = self
            .url()
            .into_client_request()
            .map_err(LinkError::Socket)?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", self.link.token.read()?))
            .map_err(|_| LinkError::Token(TokenError::Bad))?;
        request.headers_mut().insert("authorization", bearer);
        Ok(request)
    }

    /// One connection, from connect to its end; `Ok` only when `shutdown` resolved.
    async fn connection<S: Future<Output = ()>>(
        &mut self,
        mut shutdown: Pin<&mut S>,
        welcomed: &mut Option<Instant>,
    ) -> Result<(), LinkError> {
        let request = self.request()?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let connector = Some(self.link.trust.connector());
        let connect = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_tls_with_config(
                request,
                Some(config),
                true,
                connector,
            ),
        );
        let mut ws = tokio::select! {
            () = &mut shutdown => return Ok(()),
            r = connect => r.map_err(|_| LinkError::Timeout("connecting"))?.map_err(LinkError::socket)?.0,
        };
        // Subscribe before the snapshot, so no event falls between `register` and the loop.
        let events = self.pool.subscribe();
        let status = self.pool.status();
        let outbox = self.pool.outbox().pending();
        let hello = register(&self.link, &status, self.pool.images(), outbox);
        send(&mut ws, &hello).await?;
        let heartbeat = tokio::select! {
            () = &mut shutdown => {
                close(&mut ws).await;
                return Ok(());
            }
            r = tokio::time::timeout(WELCOME_TIMEOUT, welcome(&mut ws)) => {
                r.map_err(|_| LinkError::Timeout("waiting for welcome"))??
            }
        };
        *welcomed = Some(Instant::now());
        tracing::info!(
            heartbeat_ms = heartbeat.as_millis() as u64,
            vms = status.vms.len(),
            server = self.url(),
            "registered with the server"
        );
        self.serve(&mut ws, events, heartbeat, shutdown).await
    }

    async fn serve<S: Future<Output = ()>>(
        &mut self,
        ws: &mut Socket,
        mut events: broadcast::Receiver<PoolEvent>,
        heartbeat: Duration,
        mut shutdown: Pin<&mut S>,
    ) -> Result<(), LinkError> {
        let silence = heartbeat * SILENT_HEARTBEATS;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        let mut ticks = 0u32;
        // Wants a previous connection may have lost go out on this one.
        let ship = self.pool.ship().clone();
        ship.resend();
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    self.await_recorded(ws).await;
                    close(ws).await;
                    return Ok(());
                }
                frame = ws.next() => {
                    let frame = frame.ok_or(LinkError::Closed)?.map_err(LinkError::socket)?;
                    heard = Instant::now();
                    if let Flow::Closed = self.on_frame(ws, frame).await? {
                        return Err(LinkError::Closed);
                    }
                }
                _ = tick.tick() => {
                    if heard.elapsed() > silence {
                        return Err(LinkError::Silent(silence));
                    }
                    self.heartbeat(ws).await?;
                    timed(ws.send(Message::Ping(Default::default()))).await?;
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(RESEND_HEARTBEATS) {
                        // Reports the server did not answer `recorded` (its store was down, say).
                        for report in self.pool.outbox().pending() {
                            send(ws, &report).await?;
                        }
                    }
                }
                () = ship.wanted() => {
                    for want in ship.take_unsent() {
                        send(ws, &want).await?;
                    }
                }
                Some(done) = self.done_rx.recv() => {
                    let message = self.settle(done);
                    send(ws, &message).await?;
                }
                Some(said) = self.said_rx.recv() => send(ws, &said).await?,
                event = events.recv() => match event {
                    Ok(event) => match forward(event) {
                        Forward::Send(message) => send(ws, &message).await?,
                        Forward::Capacity => self.heartbeat(ws).await?,
                        Forward::Nothing => {}
                    },
                    // Some events are lost: reconnect, so that `register` says what is real.
                    Err(broadcast::error::RecvError::Lagged(n)) => return Err(LinkError::Lagged(n)),
                    // The pool outlives the link (it holds a clone); nothing more will come.
                    Err(broadcast::error::RecvError::Closed) => events = self.pool.subscribe(),
                },
            }
        }
    }

    /// At a clean stop: waits up to [`RECORDED_WAIT`] for the server to record the reports in
    /// flight (those it does not stay on disk for the next start).
    async fn await_recorded(&mut self, ws: &mut Socket) {
        let until = tokio::time::Instant::now() + RECORDED_WAIT;
        while !self.pool.outbox().pending().is_empty() {
            match tokio::time::timeout_at(until, ws.next()).await {
                Ok(Some(Ok(frame))) => {
                    if self.on_frame(ws, frame).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    async fn heartbeat(&self, ws: &mut Socket) -> Result<(), LinkError> {
        let status = self.pool.status();
        let images = capacity(&status, self.pool.images());
        let draining = status.draining;
        send(ws, &HostMessage::Heartbeat { images, draining }).await
    }

    async fn on_frame(&mut self, ws: &mut Socket, frame: Message) -> Result<Flow, LinkError> {
        match incoming(frame) {
            Incoming::Message(message) => self.on_message(message),
            Incoming::Closed => {
                // Sends tungstenite's queued answer to the close; the server ends the TCP.
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.flush()).await;
                return Ok(Flow::Closed);
            }
            Incoming::Nothing => {}
        }
        // Flush what tungstenite queued (pong answers) even when nothing else is sent.
        timed(ws.flush()).await?;
        Ok(Flow::Continue)
    }

    fn on_message(&mut self, message: ServerToHost) {
        match message {
            ServerToHost::Activate {
                session,
                image,
                players,
                teams,
                ticket_key,
                params,
                deadline_ms,
            } => {
                let req = ActivateRequest {
                    session_id: session.clone(),
                    image,
                    players,
                    teams,
                    params,
                    ticket_key,
                    deadline_ms,
                };
                self.inflight.entry(session.clone()).or_default().tasks += 1;
                let pool = self.pool.clone();
                let done = self.done_tx.clone();
                let span = tracing::info_span!("activate", session_id = %session, deadline_ms);
                tokio::spawn(
                    async move {
                        let result = pool.activate(req).await;
                        if let Err(e) = &result {
                            tracing::warn!(code = %e.code(), error = %e, "activation failed");
                        }
                        let _ = done.send(Done { session, result });
                    }
                    .instrument(span),
                );
            }
            ServerToHost::Destroy { session } => self.destroy(session),
            ServerToHost::Receive {
                session,
                image,
                players,
                teams,
                ticket_key,
                params,
                deadline_ms,
            } => {
                let req = ActivateRequest {
                    session_id: session,
                    image,
                    players,
                    teams,
                    params,
                    ticket_key,
                    deadline_ms,
                };
                tokio::spawn(receive_task(self.pool.clone(), req, self.said_tx.clone()));
            }
            ServerToHost::Send { session, to } => {
                tokio::spawn(send_task(
                    self.pool.clone(),
                    session,
                    to,
                    self.said_tx.clone(),
                ));
            }
            ServerToHost::Error { code, message } => {
                tracing::warn!(%code, detail = %message, "the server reported an error")
            }
            ServerToHost::Welcome { .. } => tracing::debug!("ignoring a repeated welcome"),
            ServerToHost::Recorded { session } => {
                tracing::debug!(session_id = %session, "the server recorded the report");
                self.pool.outbox().remove(&session);
            }
            ServerToHost::FetchSubstrate { image, from, grant } => self
                .pool
                .ship()
                .answer(&image, Offer::Fetch { from, grant }),
            ServerToHost::NoSubstrate { image, reason } => {
                self.pool.ship().answer(&image, Offer::Prime { reason })
            }
            ServerToHost::ShareSubstrate {
                image,
                grant,
                ttl_ms,
            } => {
                tracing::info!(image, ttl_ms, "a peer may fetch a substrate");
                self.pool
                    .ship()
                    .grant(image, grant, Duration::from_millis(ttl_ms))
            }
        }
    }

    fn destroy(&mut self, session: SessionId) {
        let vm = self
            .pool
            .status()
            .vms
            .into_iter()
            .find(|v| v.session_id == session);
        match vm {
            Some(vm) => self.spawn_destroy(session, vm.vm_id),
            None => match self.inflight.get_mut(&session) {
                Some(pending) => {
                    tracing::debug!(session_id = %session, "destroy while activating: after it");
                    pending.destroy = true;
                }
                None => {
                    tracing::debug!(session_id = %session, "destroy for a session with no VM here")
                }
            },
        }
    }

    fn spawn_destroy(&self, session: SessionId, vm: VmId) {
        let pool = self.pool.clone();
        let span = tracing::info_span!("destroy", session_id = %session, vm_id = %vm);
        tokio::spawn(
            async move {
                // `destroyed` goes out when the pool's `Destroyed` event comes.
                if let Err(e) = pool.destroy(vm).await {
                    tracing::debug!(error = %e, "VM already gone");
                }
            }
            .instrument(span),
        );
    }

    /// Books a finished activation and returns its answer; destroys the VM if the server
    /// asked for that meanwhile.
    fn settle(&mut self, done: Done) -> HostMessage {
        let mut destroy = false;
        if let Some(pending) = self.inflight.get_mut(&done.session) {
            pending.tasks = pending.tasks.saturating_sub(1);
            // Concurrent activations of one session share one VM: destroy it once.
            destroy = pending.destroy && done.result.is_ok();
            pending.destroy &= !destroy;
            if pending.tasks == 0 {
                self.inflight.remove(&done.session);
            }
        }
        if let (true, Ok(vm)) = (destroy, &done.result) {
            self.spawn_destroy(done.session.clone(), vm.vm_id.clone());
        }
        activate_answer(done.session, &done.result)
    }
}

/// Reads until `welcome`; anything else before it is logged and skipped.
async fn welcome(ws: &mut Socket) -> Result<Duration, LinkError> {
    loop {
        let frame = ws
            .next()
            .await
            .ok_or(LinkError::Closed)?
            .map_err(LinkError::socket)?;
        match incoming(frame) {
            Incoming::Message(ServerToHost::Welcome { v, heartbeat_ms }) => {
                if v != HOST_PROTOCOL_VERSION {
                    return Err(LinkError::Version(v));
                }
                return Ok(Duration::from_millis(heartbeat_ms).clamp(HEARTBEAT_MIN, HEARTBEAT_MAX));
            }
            Incoming::Message(ServerToHost::Error { code, message }) => {
                return Err(LinkError::Rejected {
                    code: code.to_string(),
                    message,
                })
            }
            Incoming::Message(other) => {
                tracing::warn!(?other, "ignoring a server message before welcome")
            }
            Incoming::Closed => return Err(LinkError::Closed),
            Incoming::Nothing => {}
        }
    }
}

/// A frame from the server, as the link sees it.
enum Incoming {
    Message(ServerToHost),
    /// The server closed the link (logged).
    Closed,
    /// Nothing to act on: a control frame, or a frame that is no host message (logged and
    /// ignored, never a reason to drop the link).
    Nothing,
}

fn incoming(frame: Message) -> Incoming {
    match frame {
        Message::Text(text) => match serde_json::from_str::<ServerToHost>(&text) {
            Ok(message) => return Incoming::Message(message),
            Err(e) => tracing::warn!(
                error = %e,
                frame = snippet(&text),
                "ignoring a server frame that is not a host message"
            ),
        },
        Message::Binary(bytes) => {
            tracing::warn!(len = bytes.len(), "ignoring a binary frame from the server")
        }
        Message::Close(frame) => {
            log_close(frame.as_ref());
            return Incoming::Closed;
        }
        // tungstenite answers pings itself; pongs only prove the server is there.
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
    }
    Incoming::Nothing
}

fn log_close(frame: Option<&CloseFrame>) {
    match frame {
        Some(f) => {
            tracing::warn!(code = u16::from(f.code), reason = %f.reason, "the server closed the link")
        }
        None => tracing::warn!("the server closed the link without a reason"),
    }
}

/// The start of a frame, for a log line.
fn snippet(text: &str) -> &str {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

async fn timed<T>(
    write: impl Future<Output = Result<T, tungstenite::Error>>,
) -> Result<T, LinkError> {
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| LinkError::Timeout("writing to the server"))?
        .map_err(LinkError::socket)
}

async fn send(ws: &mut Socket, message: &HostMessage) -> Result<(), LinkError> {
    let text = serde_json::to_string(message).expect("host messages always serialize");
    timed(ws.send(Message::text(text))).await
}

/// Tells the server this host is going away, without waiting long for it to agree.
async fn close(ws: &mut Socket) {
    let frame = CloseFrame {
        code: CloseCode::Away,
        reason: "hostd shutting down".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
}

// ---------------------------------------------------------------------------------------------
// Live migration: the server's `receive` and `send` run as tasks, each saying how it went
// (`receiving`, or `migration_failed`); one that worked is told by the pool's events (`sent`
// from the source, `received` from the target).

/// How long a receiving VM waits for the source's stream.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);

fn migration_failed(session: SessionId, side: &str, e: &PoolError) -> HostMessage {
    HostMessage::MigrationFailed {
        session,
        side: side.into(),
        code: e.code().to_string(),
        message: e.to_string(),
    }
}

/// Target: a clone listens; its address goes to the server; then the VM is waited for.
async fn receive_task<P: LinkPool>(
    pool: P,
    req: ActivateRequest,
    said: mpsc::UnboundedSender<HostMessage>,
) {
    let session = req.session_id.clone();
    let (incoming, addr) = match pool.receive(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(session_id = %session, error = %e, "cannot receive a migrated session");
            let _ = said.send(migration_failed(session, "receive", &e));
            return;
        }
    };
    let _ = said.send(HostMessage::Receiving {
        session: session.clone(),
        addr,
    });
    if let Err(e) = incoming.finish(RECEIVE_TIMEOUT).await {
        tracing::warn!(session_id = %session, error = %e, "the migrated session never came");
        let _ = said.send(migration_failed(session, "receive", &e));
    }
}

/// Source: the VM goes to `to` (`HOST:PORT`).
async fn send_task<P: LinkPool>(
    pool: P,
    session: SessionId,
    to: String,
    said: mpsc::UnboundedSender<HostMessage>,
) {
    let addr = match tokio::net::lookup_host(&to).await.map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => {
            let message = format!(
                "cannot resolve the migration address {}",
                berth_protocol::echo(&to)
            );
            let e = PoolError::BadRequest { message };
            let _ = said.send(migration_failed(session, "send", &e));
            return;
        }
    };
    if let Err(e) = pool.send_vm(session.clone(), addr).await {
        tracing::warn!(session_id = %session, error = %e, "sending the session's VM failed");
        let _ = said.send(migration_failed(session, "send", &e));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pool::ImageStatus;
    use berth_protocol::PlayerId;
    use berth_protocol::{ActivationPath, HostId};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{oneshot, watch};
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::WebSocketStream;

    const WAIT: Duration = Duration::from_secs(5);

    /// Shows the link's log lines for a failing test (or with `--nocapture`).
    fn logs() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("berth_hostd=debug")
            .with_test_writer()
            .try_init();
    }

    fn session(s: &str) -> SessionId {
        s.parse().expect("valid session id")
    }
    fn vm_id(s: &str) -> VmId {
        VmId::new(s).expect("valid vm id")
    }

    fn image_config(name: &str, memory_mib: u32, vcpus: u32) -> ImageConfig {
        ImageConfig {
            name: name.into(),
            dir: "img".into(),
            manifest: None,
            memory_mib,
            vcpus,
            balloon_mib: None,
            warm: 2,
            cow: true,
            cmdline: None,
        }
    }

    fn vm_info(vm: &str, session_id: &str, image: &str) -> VmInfo {
        VmInfo {
            vm_id: vm_id(vm),
            image: image.into(),
            session_id: session(session_id),
            game_addr: "127.0.0.1:40000".parse().expect("addr"),
            pid: 1,
            path: ActivationPath::Substrate,
            activated_ms: 0,
            activate_us: 1234,
            clock_skew_ms: 0,
        }
    }

    fn image_status(name: &str, substrate: &str, warm: u32, active: u32) -> ImageStatus {
        ImageStatus {
            name: name.into(),
            substrate: substrate.parse().expect("a substrate state"),
            substrate_error: None,
            warm,
            warm_target: 2,
            active,
            prime_ms: None,
            substrate_bytes: 0,
            reprimes: Default::default(),
            fingerprint: None,
        }
    }

    fn sample_status() -> Status {
        Status {
            host_id: "h1".into(),
            region: None,
            zone: None,
            driver: "qemu".into(),
            accel: "tcg".into(),
            max_vms: 8,
            images: vec![
                image_status("arena", "docked", 2, 1),
                image_status("duel", "priming", 0, 0),
            ],
            vms: vec![vm_info("vm-old", "s-old", "arena")],
            failures: vec![],
            activations: 0,
            draining: false,
            peer: None,
        }
    }

    /// Test double of the pool: a canned status, activations that only book a VM, destroys
    /// that emit `Destroyed` like the real pool. No VM is ever started.
    #[derive(Clone)]
    struct PoolDouble(Arc<DoubleState>);

    struct DoubleState {
        status: Mutex<Status>,
        images: Vec<ImageConfig>,
        events: broadcast::Sender<PoolEvent>,
        destroyed: Mutex<Vec<VmId>>,
        /// Activations wait until this is true.
        gate: watch::Sender<bool>,
        /// A folder of its own under the temp dir, removed on drop.
        outbox: Outbox,
        dir: PathBuf,
        ship: Ship,
    }

    impl Drop for DoubleState {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl PoolDouble {
        fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("berth-link-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            PoolDouble(Arc::new(DoubleState {
                outbox: Outbox::new(&dir),
                ship: Ship::default(),
                dir,
                status: Mutex::new(sample_status()),
                images: vec![image_config("arena", 128, 1), image_config("duel", 256, 2)],
                events: broadcast::channel(64).0,
                destroyed: Mutex::new(Vec::new()),
                gate: watch::channel(true).0,
            }))
        }
        fn emit(&self, e: PoolEvent) {
            self.0.events.send(e).expect("the link is subscribed");
        }
        fn set_vms(&self, vms: Vec<VmInfo>) {
            self.0.status.lock().expect("lock").vms = vms;
        }
        fn destroyed(&self) -> Vec<VmId> {
            self.0.destroyed.lock().expect("lock").clone()
        }
    }

    impl LinkPool for PoolDouble {
        fn status(&self) -> Status {
            self.0.status.lock().expect("lock").clone()
        }
        fn images(&self) -> &[ImageConfig] {
            &self.0.images
        }
        fn subscribe(&self) -> broadcast::Receiver<PoolEvent> {
            self.0.events.subscribe()
        }
        fn outbox(&self) -> &Outbox {
            &self.0.outbox
        }
        fn ship(&self) -> &Ship {
            &self.0.ship
        }
        async fn activate(&self, req: ActivateRequest) -> Result<VmInfo, PoolError> {
            let _ = self.0.gate.subscribe().wait_for(|open| *open).await;
            if !self.0.images.iter().any(|i| i.name == req.image) {
                return Err(PoolError::UnknownImage { image: req.image });
            }
            let vm = format!("vm-{}", req.session_id);
            let info = vm_info(&vm, req.session_id.as_str(), &req.image);
            self.0.status.lock().expect("lock").vms.push(info.clone());
            Ok(info)
        }
        async fn destroy(&self, vm: VmId) -> Result<(), PoolError> {
            let info = {
                let mut st = self.0.status.lock().expect("lock");
                let at = st.vms.iter().position(|v| v.vm_id == vm);
                at.map(|i| st.vms.remove(i))
            };
            let info = info.ok_or_else(|| PoolError::Unknown { id: vm.to_string() })?;
            self.0.destroyed.lock().expect("lock").push(vm);
            let _ = self.0.events.send(PoolEvent::Destroyed {
                vm_id: info.vm_id,
                session_id: info.session_id,
            });
            Ok(())
        }
    }

    /// Test double of the server's `/v1/hosts` endpoint: accepts websockets on 127.0.0.1:0,
    /// records the `Authorization` header, refuses the first `refuse` handshakes with 401.
    pub(crate) struct ServerDouble {
        pub url: String,
        conns: mpsc::UnboundedReceiver<Conn>,
    }

    pub(crate) struct Conn {
        pub auth: Option<String>,
        pub ws: WebSocketStream<TcpStream>,
    }

    impl ServerDouble {
        pub async fn start(refuse: usize) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!(
                "ws://{}/v1/hosts",
                listener.local_addr().expect("local addr")
            );
            let (tx, conns) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut refused = 0;
                while let Ok((tcp, _)) = listener.accept().await {
                    let auth = Arc::new(Mutex::new(None));
                    let seen = auth.clone();
                    let refuse_this = refused < refuse;
                    refused += 1;
                    // tungstenite's callback signature, not ours to shrink.
                    #[allow(clippy::result_large_err)]
                    let callback = move |req: &Request, resp: Response| {
                        *seen.lock().expect("lock") = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        if refuse_this {
                            let mut e = ErrorResponse::new(Some("bad token".into()));
                            *e.status_mut() = tungstenite::http::StatusCode::UNAUTHORIZED;
                            return Err(e);
                        }
                        Ok(resp)
                    };
                    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                        continue;
                    };
                    let auth = auth.lock().expect("lock").clone();
                    if tx.send(Conn { auth, ws }).is_err() {
                        return;
                    }
                }
            });
            ServerDouble { url, conns }
        }

        pub async fn next(&mut self) -> Conn {
            tokio::time::timeout(WAIT, self.conns.recv())
                .await
                .expect("hostd connects in time")
                .expect("acceptor alive")
        }

        async fn none_within(&mut self, d: Duration) {
            let more = tokio::time::timeout(d, self.conns.recv()).await;
            assert!(more.is_err(), "hostd opened a second connection");
        }
    }

    impl Conn {
        /// The next host message, skipping heartbeats unless `heartbeats`.
        async fn recv_any(&mut self, heartbeats: bool) -> HostMessage {
            loop {
                let frame = tokio::time::timeout(WAIT, self.ws.next())
                    .await
                    .expect("a message in time")
                    .expect("connection open")
                    .expect("a frame");
                if let Message::Text(text) = frame {
                    let m: HostMessage = serde_json::from_str(&text).expect("a host message");
                    if heartbeats || !matches!(m, HostMessage::Heartbeat { .. }) {
                        return m;
                    }
                }
            }
        }
        async fn recv(&mut self) -> HostMessage {
            self.recv_any(false).await
        }
        async fn send(&mut self, m: &ServerToHost) {
            let text = serde_json::to_string(m).expect("serialize");
            self.ws.send(Message::text(text)).await.expect("send");
        }
        /// Reads `register`, answers `welcome`, returns the `register`.
        pub async fn welcome(&mut self, heartbeat_ms: u64) -> HostMessage {
            let register = self.recv().await;
            self.send(&ServerToHost::Welcome {
                v: HOST_PROTOCOL_VERSION,
                heartbeat_ms,
            })
            .await;
            register
        }
    }

    fn server_link(url: &str) -> ServerLink {
        ServerLink {
            urls: vec![url.into()],
            host: HostId::new("h1").expect("host id"),
            token: Token::Inline("tok.en.1".into()),
            gateway: "ws://gw.example:7071".into(),
            reconnect_max: Duration::from_millis(50),
            trust: Default::default(),
        }
    }

    /// Runs the link against the server double; dropping or firing the sender stops it.
    fn start(pool: &PoolDouble, url: &str) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        start_with(pool, server_link(url))
    }

    fn start_with(
        pool: &PoolDouble,
        link: ServerLink,
    ) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(pool.clone(), link, async {
            let _ = stopped.await;
        }));
        (stop, task)
    }

    #[tokio::test]
    async fn a_link_fails_over_to_the_next_server_and_comes_round_again() {
        logs();
        let pool = PoolDouble::new();
        let mut a = ServerDouble::start(0).await;
        let mut b = ServerDouble::start(0).await;
        let mut link = server_link(&a.url);
        link.urls.push(b.url.clone());
        link.reconnect_max = Duration::from_secs(30);
        let (_stop, _task) = start_with(&pool, link);
        let mut conn = a.next().await;
        conn.welcome(60_000).await;
        drop(conn);
        // The first retry goes to the other replica, not to the one that just went away.
        let mut conn = b.next().await;
        assert!(matches!(
            conn.welcome(60_000).await,
            HostMessage::Register { .. }
        ));
        a.none_within(Duration::from_millis(300)).await;
        drop(conn);
        let mut conn = a.next().await;
        assert!(matches!(
            conn.welcome(60_000).await,
            HostMessage::Register { .. }
        ));
    }

    /// A link registered with the server double: its first connection welcomed.
    struct Linked {
        server: ServerDouble,
        conn: Conn,
        registered: HostMessage,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn linked(pool: &PoolDouble, heartbeat_ms: u64) -> Linked {
        logs();
        let mut server = ServerDouble::start(0).await;
        let (stop, task) = start(pool, &server.url);
        let mut conn = server.next().await;
        let registered = conn.welcome(heartbeat_ms).await;
        Linked {
            server,
            conn,
            registered,
            stop,
            task,
        }
    }

    fn activate(s: &str, image: &str) -> ServerToHost {
        ServerToHost::Activate {
            teams: vec![],
            session: session(s),
            image: image.into(),
            players: vec![PlayerId::new("alice").expect("player")],
            ticket_key: "00ff".into(),
            params: serde_json::json!({"score_limit": 3}),
            deadline_ms: 0,
        }
    }

    #[test]
    fn backoff_doubles_from_200ms_to_the_cap() {
        let cap = Duration::from_secs(10);
        let mid = |attempt| backoff(attempt, cap, 0.5);
        assert_eq!(mid(0), Duration::from_millis(200));
        assert_eq!(mid(1), Duration::from_millis(400));
        assert_eq!(mid(3), Duration::from_millis(1600));
        assert_eq!(mid(6), Duration::from_millis(10_000));
        assert_eq!(mid(u32::MAX), cap, "no overflow on long outages");
        // Jitter spreads ±20 %, never past the cap.
        assert_eq!(backoff(0, cap, 0.0), Duration::from_millis(160));
        assert_eq!(backoff(0, cap, 1.0), Duration::from_millis(240));
        assert_eq!(backoff(10, cap, 1.0), cap);
        assert_eq!(backoff(10, cap, 0.0), Duration::from_secs(8));
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn capacity_and_register_come_from_the_status() {
        let pool = PoolDouble::new();
        let images = capacity(&sample_status(), pool.images());
        assert_eq!(
            images,
            vec![
                ImageCapacity {
                    name: "arena".into(),
                    docked: true,
                    warm: 2,
                    running: 1,
                    memory_mib: 128,
                    vcpus: 1,
                    substrate: None,
                },
                ImageCapacity {
                    name: "duel".into(),
                    docked: false,
                    warm: 0,
                    running: 0,
                    memory_mib: 256,
                    vcpus: 2,
                    substrate: None,
                },
            ]
        );
        let r = register(
            &server_link("ws://s/v1/hosts"),
            &sample_status(),
            pool.images(),
            vec![],
        );
        assert_eq!(
            r,
            HostMessage::Register {
                v: HOST_PROTOCOL_VERSION,
                host: HostId::new("h1").expect("host id"),
                accel: "tcg".into(),
                driver: "qemu".into(),
                gateway: "ws://gw.example:7071".into(),
                max_vms: 8,
                images,
                vms: vec![HostVm {
                    vm: vm_id("vm-old"),
                    session: session("s-old"),
                    image: "arena".into(),
                }],
                region: None,
                zone: None,
                peer: None,
                outbox: vec![],
            }
        );
    }

    #[test]
    fn pool_events_map_to_host_messages() {
        let (vm, s) = (vm_id("vm-1"), session("s1"));
        assert_eq!(
            forward(PoolEvent::Ended {
                vm_id: vm.clone(),
                session_id: s.clone(),
                reason: "game_over".into(),
                results: serde_json::json!({"winner": "alice"}),
            }),
            Forward::Send(Box::new(HostMessage::Ended {
                session: s.clone(),
                vm: vm.clone(),
                reason: "game_over".into(),
                results: serde_json::json!({"winner": "alice"}),
            }))
        );
        assert_eq!(
            forward(PoolEvent::Failed {
                vm_id: vm.clone(),
                session_id: s.clone(),
                code: "vm_exited".into(),
                reason: "gone".into(),
            }),
            Forward::Send(Box::new(HostMessage::Failed {
                session: s.clone(),
                vm: vm.clone(),
                code: "vm_exited".into(),
                reason: "gone".into(),
            }))
        );
        assert_eq!(
            forward(PoolEvent::Destroyed {
                vm_id: vm.clone(),
                session_id: s.clone(),
            }),
            Forward::Send(Box::new(HostMessage::Destroyed { session: s, vm }))
        );
        let prime_failed = PoolEvent::PrimeFailed {
            image: "arena".into(),
            code: "boot_timeout".into(),
            message: "slow".into(),
        };
        assert_eq!(forward(prime_failed), Forward::Capacity);
        let activated = PoolEvent::Activated {
            vm: vm_info("vm-2", "s2", "arena"),
        };
        assert_eq!(forward(activated), Forward::Nothing);
    }

    #[test]
    fn activation_answers_carry_path_or_code() {
        let ok = activate_answer(session("s1"), &Ok(vm_info("vm-1", "s1", "arena")));
        assert_eq!(
            ok,
            HostMessage::Activated {
                session: session("s1"),
                vm: vm_id("vm-1"),
                path: berth_protocol::ActivationPath::Substrate,
                activate_us: 1234,
            }
        );
        let failed = activate_answer(session("s1"), &Err(PoolError::AtCapacity { max: 8 }));
        assert!(matches!(
            failed,
            HostMessage::ActivateFailed { ref code, .. } if code == "at_capacity"
        ));
    }

    #[tokio::test]
    async fn wants_go_up_as_want_substrate_and_the_servers_answers_and_grants_come_back() {
        let pool = PoolDouble::new();
        let mut link = linked(&pool, 60_000).await;
        let ship = pool.ship().clone();
        let asking = tokio::spawn(async move {
            ship.ask("arena", "sha256:a".into(), Duration::from_secs(5))
                .await
        });
        assert_eq!(
            link.conn.recv().await,
            HostMessage::WantSubstrate {
                image: "arena".into(),
                fingerprint: "sha256:a".into()
            }
        );
        link.conn
            .send(&ServerToHost::FetchSubstrate {
                image: "arena".into(),
                from: "http://10.0.0.7:7072".into(),
                grant: "g1".into(),
            })
            .await;
        let offer = tokio::time::timeout(WAIT, asking)
            .await
            .expect("answered in time")
            .expect("no panic");
        let expected = Offer::Fetch {
            from: "http://10.0.0.7:7072".into(),
            grant: "g1".into(),
        };
        assert_eq!(offer, expected);
        // As a peer: a grant from the server lets one fetch in.
        link.conn
            .send(&ServerToHost::ShareSubstrate {
                image: "arena".into(),
                grant: "g2".into(),
                ttl_ms: 30_000,
            })
            .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while pool.ship().redeem("g2", "arena") == Err(crate::ship::PeerError::UnknownGrant) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the grant never came"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            pool.ship().redeem("g2", "arena"),
            Err(crate::ship::PeerError::GrantUsed)
        );
    }

    #[tokio::test]
    async fn registers_with_the_bearer_token_and_closes_on_shutdown() {
        let pool = PoolDouble::new();
        let Linked {
            server,
            mut conn,
            registered,
            stop,
            task,
        } = linked(&pool, 60_000).await;
        assert_eq!(conn.auth.as_deref(), Some("Bearer tok.en.1"));
        assert_eq!(
            registered,
            register(
                &server_link(&server.url),
                &sample_status(),
                pool.images(),
                vec![]
            )
        );
        stop.send(()).expect("link running");
        let close = loop {
            match tokio::time::timeout(WAIT, conn.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => break frame,
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        let close = close.expect("a close frame with a reason");
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason.as_str(), "hostd shutting down");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the link stops")
            .expect("no panic");
    }

    #[tokio::test]
    async fn activates_destroys_and_forwards_pool_events() {
        let pool = PoolDouble::new();
        let mut link = linked(&pool, 60_000).await;
        let Linked { server, conn, .. } = &mut link;

        conn.send(&activate("s1", "arena")).await;
        let answer = conn.recv().await;
        assert_eq!(
            answer,
            HostMessage::Activated {
                session: session("s1"),
                vm: vm_id("vm-s1"),
                path: berth_protocol::ActivationPath::Substrate,
                activate_us: 1234,
            }
        );
        conn.send(&activate("s2", "nope")).await;
        assert!(matches!(
            conn.recv().await,
            HostMessage::ActivateFailed { session: s, code, .. }
                if s == session("s2") && code == "unknown_image"
        ));

        // An unknown session is only logged: the next answer is the next activation's.
        conn.send(&ServerToHost::Destroy {
            session: session("s-never"),
        })
        .await;
        conn.send(&ServerToHost::Destroy {
            session: session("s1"),
        })
        .await;
        assert_eq!(
            conn.recv().await,
            HostMessage::Destroyed {
                session: session("s1"),
                vm: vm_id("vm-s1"),
            }
        );
        assert_eq!(pool.destroyed(), vec![vm_id("vm-s1")]);

        pool.emit(PoolEvent::Ended {
            vm_id: vm_id("vm-old"),
            session_id: session("s-old"),
            reason: "game_over".into(),
            results: serde_json::json!({"winner": "alice"}),
        });
        assert!(matches!(
            conn.recv().await,
            HostMessage::Ended { session: s, reason, .. } if s == session("s-old") && reason == "game_over"
        ));
        conn.send(&ServerToHost::Error {
            code: "bad_message".into(),
            message: "what".into(),
        })
        .await;
        pool.emit(PoolEvent::Failed {
            vm_id: vm_id("vm-old"),
            session_id: session("s-old"),
            code: "agent_silent".into(),
            reason: "quiet".into(),
        });
        assert!(matches!(
            conn.recv().await,
            HostMessage::Failed { code, .. } if code == "agent_silent"
        ));
        server.none_within(Duration::from_millis(200)).await;
    }

    #[tokio::test]
    async fn a_destroy_during_activation_destroys_the_vm_once_it_exists() {
        let pool = PoolDouble::new();
        pool.0.gate.send_replace(false);
        let mut link = linked(&pool, 60_000).await;
        let Linked { conn, .. } = &mut link;
        conn.send(&activate("s3", "arena")).await;
        conn.send(&ServerToHost::Destroy {
            session: session("s3"),
        })
        .await;
        // A repeated activate shares the activation (the session id is the key).
        conn.send(&activate("s3", "arena")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.0.gate.send_replace(true);
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(conn.recv().await);
        }
        assert!(
            matches!(&got[0], HostMessage::Activated { session: s, .. } if *s == session("s3"))
        );
        let destroyed = HostMessage::Destroyed {
            session: session("s3"),
            vm: vm_id("vm-s3"),
        };
        assert!(got.contains(&destroyed), "{got:?}");
        assert_eq!(pool.destroyed().first(), Some(&vm_id("vm-s3")));
    }

    #[tokio::test]
    async fn bad_frames_are_ignored_without_dropping_the_link() {
        let pool = PoolDouble::new();
        let mut link = linked(&pool, 60_000).await;
        let Linked { server, conn, .. } = &mut link;
        for bad in [
            Message::text("not json"),
            Message::text(r#"{"type":"surprise"}"#),
            Message::text(r#"{"type":"activate"}"#),
            Message::text("é".repeat(300)),
            Message::binary(vec![0u8, 1, 2]),
        ] {
            conn.ws.send(bad).await.expect("send");
        }
        conn.send(&activate("s4", "arena")).await;
        assert!(matches!(
            conn.recv().await,
            HostMessage::Activated { session: s, .. } if s == session("s4")
        ));
        server.none_within(Duration::from_millis(300)).await;
    }

    #[tokio::test]
    async fn reconnects_and_registers_what_is_real_now() {
        logs();
        let mut server = ServerDouble::start(0).await;
        let pool = PoolDouble::new();
        let (_stop, _task) = start(&pool, &server.url);
        let mut first = server.next().await;
        first.welcome(60_000).await;
        // The server drops the connection; meanwhile a VM ends and one is activated.
        drop(first);
        pool.set_vms(vec![vm_info("vm-new", "s-new", "arena")]);
        let mut second = server.next().await;
        assert_eq!(second.auth.as_deref(), Some("Bearer tok.en.1"));
        match second.welcome(60_000).await {
            HostMessage::Register { vms, .. } => assert_eq!(
                vms,
                vec![HostVm {
                    vm: vm_id("vm-new"),
                    session: session("s-new"),
                    image: "arena".into(),
                }]
            ),
            other => panic!("expected register, got {other:?}"),
        }
        // A close frame with a reason: logged, then the same again.
        second
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: "replaced by a newer connection".into(),
            }))
            .await
            .expect("close");
        let mut third = server.next().await;
        assert!(matches!(
            third.welcome(60_000).await,
            HostMessage::Register { .. }
        ));
    }

    #[tokio::test]
    async fn refused_rejected_and_wrong_version_handshakes_are_retried() {
        logs();
        let mut server = ServerDouble::start(1).await;
        let pool = PoolDouble::new();
        let (_stop, _task) = start(&pool, &server.url);
        // The first handshake got a 401; the retry is accepted.
        let mut conn = server.next().await;
        assert!(matches!(conn.recv().await, HostMessage::Register { .. }));
        conn.send(&ServerToHost::Error {
            code: "unknown_host".into(),
            message: "who are you".into(),
        })
        .await;
        let mut conn = server.next().await;
        assert!(matches!(conn.recv().await, HostMessage::Register { .. }));
        conn.send(&ServerToHost::Welcome {
            v: HOST_PROTOCOL_VERSION + 1,
            heartbeat_ms: 1000,
        })
        .await;
        let mut conn = server.next().await;
        conn.welcome(60_000).await;
        conn.send(&activate("s5", "arena")).await;
        assert!(matches!(conn.recv().await, HostMessage::Activated { .. }));
    }

    #[tokio::test]
    async fn heartbeats_carry_capacity_and_a_silent_server_is_dropped() {
        let pool = PoolDouble::new();
        let mut link = linked(&pool, 100).await;
        let Linked { server, conn, .. } = &mut link;
        let heartbeat = conn.recv_any(true).await;
        assert_eq!(
            heartbeat,
            HostMessage::Heartbeat {
                images: capacity(&sample_status(), pool.images()),
                draining: false,
            }
        );
        // A pool capacity change sends one at once.
        pool.emit(PoolEvent::PrimeFailed {
            image: "duel".into(),
            code: "boot_timeout".into(),
            message: "slow".into(),
        });
        assert!(matches!(
            conn.recv_any(true).await,
            HostMessage::Heartbeat { .. }
        ));
        // Stop reading: no pongs, no frames; after three heartbeats hostd gives up on it.
        let _mute = conn;
        let mut next = server.next().await;
        assert!(matches!(next.recv().await, HostMessage::Register { .. }));
    }

    #[tokio::test]
    async fn reports_are_sent_again_until_recorded_and_ride_in_the_next_register() {
        let pool = PoolDouble::new();
        let mut link = linked(&pool, 100).await;
        let Linked { server, conn, .. } = &mut link;
        let report = HostMessage::Ended {
            session: session("s-r"),
            vm: vm_id("vm-r"),
            reason: "score".into(),
            results: serde_json::json!({"winner": "a"}),
        };
        // The pool keeps the report on disk before it announces the end.
        pool.outbox().put(&report);
        pool.emit(PoolEvent::Ended {
            vm_id: vm_id("vm-r"),
            session_id: session("s-r"),
            reason: "score".into(),
            results: serde_json::json!({"winner": "a"}),
        });
        assert_eq!(conn.recv().await, report);
        // No `recorded` (the server's store was down, say): sent again a few heartbeats on.
        assert_eq!(conn.recv().await, report);
        // The link drops (this server stops reading); the next register carries it.
        let mut next = server.next().await;
        match next.recv().await {
            HostMessage::Register { outbox, .. } => assert_eq!(outbox, vec![report.clone()]),
            other => panic!("expected register, got {other:?}"),
        }
        next.send(&ServerToHost::Welcome {
            v: HOST_PROTOCOL_VERSION,
            heartbeat_ms: 60_000,
        })
        .await;
        next.send(&ServerToHost::Recorded {
            session: session("s-r"),
        })
        .await;
        let deadline = Instant::now() + WAIT;
        while !pool.outbox().pending().is_empty() {
            assert!(
                Instant::now() < deadline,
                "recorded never removed the report"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
