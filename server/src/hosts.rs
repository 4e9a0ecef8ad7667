//! The host websocket (`/v1/hosts`): hostd authenticates with a host-role JWT whose subject is
//! its host id, registers its images, capacity and live VMs (reconciled against the store),
//! heartbeats, and answers activations. A host may only speak about its own sessions. A host
//! lacking a substrate may ask for a peer's (`want_substrate`, answered by [`crate::shipping`]).

use crate::auth::Role;
use crate::model::{Event, HostRecord, HostState, SessionState};
use crate::sessions;
use crate::state::{lock, Conn, Ctx, HostConn, Outbound};
use crate::util::{now_ms, random_id};
use crate::wire::{self, close, decode, send_close, text, FrameError};
use axum::extract::ws::Message;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_net::Seat;
use berth_protocol::host::{HostMessage, ImageCapacity, ServerToHost, HOST_PROTOCOL_VERSION};
use berth_protocol::{HostId, SessionId};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest message a host may send (its register lists every VM it runs).
const MAX_HOST_MESSAGE: usize = 4 << 20;

pub async fn handler(up: wire::Upgrade, State(ctx): State<Ctx>) -> Response {
    if ctx.is_stopping() {
        let why = "this replica is stopping; connect to another".to_owned();
        return refuse(&ctx, StatusCode::SERVICE_UNAVAILABLE, "shutting_down", why);
    }
    let wire::Upgrade { ws, bearer, seat } = up;
    let token = bearer.unwrap_or_default();
    let host = match ctx.auth.verify(&token, Role::Host) {
        Ok(c) => match HostId::new(c.sub) {
            Ok(h) => h,
            Err(e) => return refuse(&ctx, StatusCode::UNAUTHORIZED, "bad_subject", e.to_string()),
        },
        Err(e) => return refuse(&ctx, StatusCode::UNAUTHORIZED, e.code(), e.to_string()),
    };
    ws.max_message_size(MAX_HOST_MESSAGE)
        .max_frame_size(MAX_HOST_MESSAGE)
        .on_upgrade(move |socket| serve(ctx, socket, host, seat))
}

fn refuse(ctx: &Ctx, status: StatusCode, code: &str, message: String) -> Response {
    ctx.metrics.refuse(code);
    (
        status,
        axum::Json(ServerToHost::Error {
            code: code.into(),
            message,
        }),
    )
        .into_response()
}

fn error(code: &str, message: impl Into<String>) -> ServerToHost {
    ServerToHost::Error {
        code: code.into(),
        message: message.into(),
    }
}

/// Runs one host connection to its end. `host` is the authenticated host id; its listener
/// `seat` (if any) is held until `register` is accepted.
pub async fn serve<S>(ctx: Ctx, mut ws: S, host: HostId, seat: Seat)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let heartbeat = ctx.config.timeouts.host_heartbeat_ms;
    let Some((mut record, outbox)) = register(&ctx, &mut ws, &host).await else {
        return;
    };
    seat.release();
    let conn_id = random_id();
    let (tx, mut rx) = mpsc::channel(1024);
    if let Some(old) = lock(&ctx.registry.hosts).insert(
        host.clone(),
        Conn {
            id: conn_id.clone(),
            tx,
        },
    ) {
        old.close(close::CONFLICT, "replaced");
    }
    ctx.metrics.host_connections.inc();
    tracing::info!(host_id = %host, vms = record.vms.len(), "host registered");
    let welcome = ServerToHost::Welcome {
        v: HOST_PROTOCOL_VERSION,
        heartbeat_ms: heartbeat,
    };
    let mut ok = ws.send(text(&welcome)).await.is_ok();
    if ok {
        for m in on_register(&ctx, &mut record, outbox).await {
            ok &= ws.send(text(&m)).await.is_ok();
        }
    }
    let silent = Duration::from_millis(ctx.config.timeouts.host_lost_ms);
    // Answers about sessions the store failed to take, tried again at each heartbeat.
    let mut retry = Vec::new();
    while ok {
        tokio::select! {
            frame = tokio::time::timeout(silent, ws.next()) => {
                let m = match frame {
                    Err(_) => {
                        tracing::warn!(host_id = %host, "host silent; closing");
                        send_close(&mut ws, close::TIMEOUT, "heartbeat_timeout").await;
                        break;
                    }
                    Ok(None | Some(Ok(Message::Close(_)))) => break,
                    Ok(Some(Err(e))) => {
                        if let Some(reason) = wire::close_after_read_error(&mut ws, &e).await {
                            ctx.metrics.refuse(reason);
                        }
                        break;
                    }
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                    Ok(Some(Ok(Message::Binary(_)))) => Err(FrameError::Binary),
                    Ok(Some(Ok(Message::Text(t)))) => decode::<HostMessage>(&t),
                };
                let replies = match m {
                    Ok(m) => handle(&ctx, &host, &mut record, &mut retry, m).await,
                    Err(e) => {
                        ctx.metrics.refuse(e.code());
                        vec![error(e.code(), e.to_string())]
                    }
                };
                for r in replies {
                    ok &= ws.send(text(&r)).await.is_ok();
                }
                if !ok {
                    break;
                }
                if record.state == HostState::Lost {
                    // Marked lost while connected: its sessions may have ended meanwhile, and
                    // only a new `register` says which VMs it runs. Ask for one.
                    tracing::warn!(host_id = %host, "host was marked lost; asking it to register again");
                    let _ = ws.send(text(&error("host_lost", "this host was marked lost; register again"))).await;
                    send_close(&mut ws, close::GOING_AWAY, "register_again").await;
                    break;
                }
            }
            out = rx.recv() => match out {
                Some(Outbound::Msg(m)) => ok = ws.send(text(&m)).await.is_ok(),
                Some(Outbound::Recheck) => {
                    for m in recheck(&ctx, &host).await {
                        ok &= ws.send(text(&m)).await.is_ok();
                    }
                }
                Some(Outbound::Close(code, reason)) => {
                    send_close(&mut ws, code, &reason).await;
                    break;
                }
                None => break,
            },
        }
    }
    disconnected(&ctx, &host, &conn_id).await;
}

/// What a fresh registration gets: its outbox recorded, then its VMs reconciled. Reports of
/// VMs that are gone go first, or reconciling `vms` would call those sessions lost.
async fn on_register(
    ctx: &Ctx,
    record: &mut HostRecord,
    outbox: Vec<HostMessage>,
) -> Vec<ServerToHost> {
    let host = record.id.clone();
    let mut replies = Vec::new();
    for m in outbox {
        replies.extend(handle_report(ctx, &host, record, m).await);
    }
    replies.extend(reconcile(ctx, record).await);
    replies
}

/// The connection `conn_id` of `host` ended: unless a newer one took over, the host is
/// `disconnected`.
async fn disconnected(ctx: &Ctx, host: &HostId, conn_id: &str) {
    let mine = {
        let mut hosts = lock(&ctx.registry.hosts);
        let mine = hosts.get(host).is_some_and(|c: &HostConn| c.id == conn_id);
        if mine {
            hosts.remove(host);
        }
        mine
    };
    ctx.metrics.host_connections.dec();
    if mine {
        tracing::warn!(host_id = %host, "host disconnected");
        if let Ok(Some(mut r)) = ctx.store.host(host).await {
            // A lost host stays lost: only a new `register` brings it back.
            if r.replica == ctx.replica && r.state == HostState::Up {
                r.state = HostState::Disconnected;
                let _ = ctx.store.put_host(&r).await;
            }
        }
    }
}

/// Why a host's connection is refused: the `error` code and message, and the close code.
struct Refusal {
    code: &'static str,
    message: String,
    close: u16,
}

fn refusal(code: &'static str, message: impl Into<String>, close: u16) -> Refusal {
    Refusal {
        code,
        message: message.into(),
        close,
    }
}

/// Waits for `register`; checks version and that it names the authenticated host. Returns the
/// host's record and the reports it still holds (its outbox).
async fn register<S>(ctx: &Ctx, ws: &mut S, host: &HostId) -> Option<(HostRecord, Vec<HostMessage>)>
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let wait = Duration::from_millis(ctx.config.timeouts.hello_ms);
    let refused = match wire::first_frame(ws, wait).await {
        wire::First::Timeout => refusal("register_timeout", "no register in time", close::TIMEOUT),
        wire::First::Closed | wire::First::Failed | wire::First::TooBig => return None,
        wire::First::NotUtf8 => {
            send_close(ws, close::INVALID_DATA, wire::INVALID_UTF8).await;
            return None;
        }
        wire::First::Binary => {
            let e = FrameError::Binary;
            refusal(e.code(), e.to_string(), close::PROTOCOL)
        }
        wire::First::Text(t) => match registered(ctx, host, &t) {
            Ok((record, outbox)) => match ctx.store.put_host(&record).await {
                Ok(()) => return Some((record, outbox)),
                Err(e) => refusal(
                    e.code(),
                    "state store unavailable; retry",
                    close::GOING_AWAY,
                ),
            },
            Err(refused) => refused,
        },
    };
    ctx.metrics.refuse(refused.code);
    let _ = ws.send(text(&error(refused.code, refused.message))).await;
    send_close(ws, refused.close, refused.code).await;
    None
}

/// The host's record and outbox from its first message, `register` of this protocol version
/// naming the authenticated `host`.
fn registered(
    ctx: &Ctx,
    host: &HostId,
    first: &str,
) -> Result<(HostRecord, Vec<HostMessage>), Refusal> {
    let message = decode::<HostMessage>(first)
        .map_err(|e| refusal(e.code(), e.to_string(), close::PROTOCOL))?;
    let HostMessage::Register {
        v,
        host: named,
        accel,
        driver,
        gateway,
        max_vms,
        images,
        vms,
        region,
        zone,
        peer,
        outbox,
    } = message
    else {
        return Err(refusal(
            "register_required",
            "the first message must be register",
            close::PROTOCOL,
        ));
    };
    if v != HOST_PROTOCOL_VERSION {
        let why = format!("this server speaks host protocol {HOST_PROTOCOL_VERSION}, not {v}");
        return Err(refusal("unsupported_version", why, close::PROTOCOL));
    }
    if &named != host {
        let why = format!("credential is for host {host}, register names {named}");
        return Err(refusal("wrong_host", why, close::AUTH));
    }
    for (what, name) in [("region", &region), ("zone", &zone)] {
        if name.as_deref().is_some_and(|n| SessionId::new(n).is_err()) {
            let why = format!("{what} must be {}", berth_protocol::ids::ID_RULE);
            return Err(refusal("bad_region", why, close::PROTOCOL));
        }
    }
    let now = now_ms();
    let record = HostRecord {
        id: host.clone(),
        state: HostState::Up,
        draining: false,
        accel,
        driver,
        gateway,
        max_vms,
        images,
        vms,
        region,
        zone,
        peer,
        replica: ctx.replica.clone(),
        connected_ms: now,
        last_seen_ms: now,
    };
    Ok((record, outbox))
}

/// Compares what the host really runs with the store: VMs of sessions that are over (or
/// unknown) are destroyed; sessions that lost their VM end as `vm_lost`; an activation whose
/// answer was lost is completed or asked again.
async fn reconcile(ctx: &Ctx, record: &HostRecord) -> Vec<ServerToHost> {
    let mut out = Vec::new();
    let host = &record.id;
    for vm in &record.vms {
        match ctx.store.session(&vm.session).await {
            Ok(Some(s)) if s.host.as_ref() == Some(host) => match s.state {
                SessionState::Active => {}
                SessionState::Activating => {
                    let _ = sessions::activated(ctx, host, &s.id, &vm.vm, "reconciled").await;
                }
                _ => out.push(ServerToHost::Destroy {
                    session: vm.session.clone(),
                }),
            },
            Ok(Some(s)) if s.host.is_some() && s.state.is_live() => {
                ctx.metrics.refuse("foreign_session");
                out.push(error(
                    "foreign_session",
                    format!("session {} belongs to another host; ignored", s.id),
                ));
            }
            Ok(_) => out.push(ServerToHost::Destroy {
                session: vm.session.clone(),
            }),
            Err(e) => tracing::warn!(error = %e, "reconcile: reading session"),
        }
    }
    let Ok(live) = sessions::live_sessions(ctx).await else {
        return out;
    };
    for s in live.into_iter().filter(|s| s.host.as_ref() == Some(host)) {
        if record.vms.iter().any(|v| v.session == s.id) {
            continue;
        }
        match s.state {
            // Activation is idempotent by session id: ask again.
            SessionState::Activating => out.push(s.activate_message()),
            // A VM moving to another host is not lost: the migration settles it.
            SessionState::Active if s.migration.is_some() => {}
            SessionState::Active | SessionState::Ending => {
                let _ = sessions::abandon(ctx, &s.id, "vm_lost").await;
            }
            _ => {}
        }
    }
    out
}

/// After a gap in the event stream (`activate` and `destroy` travel as events): asks again
/// for what the host's live sessions still need. Both are idempotent by session id.
async fn recheck(ctx: &Ctx, host: &HostId) -> Vec<ServerToHost> {
    let Ok(live) = sessions::live_sessions(ctx).await else {
        return Vec::new();
    };
    live.into_iter()
        .filter(|s| s.host.as_ref() == Some(host))
        .filter_map(|s| match s.state {
            SessionState::Activating => Some(s.activate_message()),
            SessionState::Ending => Some(ServerToHost::Destroy { session: s.id }),
            _ => None,
        })
        .collect()
}

/// Is `session` this host's? (Placed on it, whatever its state.)
async fn owns(ctx: &Ctx, host: &HostId, session: &SessionId) -> Result<bool, ServerToHost> {
    match ctx.store.session(session).await {
        Ok(Some(s)) => Ok(s.host.as_ref() == Some(host)),
        Ok(None) => Ok(false),
        Err(e) => Err(error(e.code(), "state store unavailable")),
    }
}

async fn handle(
    ctx: &Ctx,
    host: &HostId,
    record: &mut HostRecord,
    retry: &mut Vec<HostMessage>,
    m: HostMessage,
) -> Vec<ServerToHost> {
    match m {
        HostMessage::Register { .. } => vec![error(
            "already_registered",
            "register is sent once per connection",
        )],
        HostMessage::Heartbeat { images, draining } => {
            heartbeat(ctx, record, images).await;
            if draining && !record.draining {
                drained(ctx, record).await;
            }
            for m in std::mem::take(retry) {
                // Errors were told the first time; a retry only records.
                let _ = update(ctx, host, record, retry, m).await;
            }
            Vec::new()
        }
        HostMessage::Ended { .. } | HostMessage::Failed { .. } => {
            handle_report(ctx, host, record, m).await
        }
        HostMessage::WantSubstrate { image, fingerprint } => {
            vec![crate::shipping::want(ctx, record, image, fingerprint).await]
        }
        HostMessage::Receiving { .. }
        | HostMessage::Received { .. }
        | HostMessage::Sent { .. }
        | HostMessage::MigrationFailed { .. } => migration_message(ctx, host, m).await,
        HostMessage::Activated { .. }
        | HostMessage::ActivateFailed { .. }
        | HostMessage::Destroyed { .. } => update(ctx, host, record, retry, m).await,
    }
}

/// A host's part of a migration (see [`crate::migration`]); a message about a session that is
/// not moving to or from it changes nothing.
async fn migration_message(ctx: &Ctx, host: &HostId, m: HostMessage) -> Vec<ServerToHost> {
    use crate::migration as mig;
    let r = match m {
        HostMessage::Receiving { session, addr } => mig::receiving(ctx, host, &session, addr).await,
        HostMessage::Received { session, vm } => {
            match mig::received(ctx, host, &session, &vm).await {
                Ok(true) => {
                    let event = Event::Session {
                        session,
                        state: SessionState::Active,
                    };
                    ctx.store.publish(&event).await
                }
                // Not moving here (any more): the VM is not this session's.
                Ok(false) => {
                    if let Some(c) = ctx.registry.host_conn(host) {
                        c.send(ServerToHost::Destroy { session });
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        HostMessage::Sent {
            session,
            downtime_ms,
            total_ms,
            sent_bytes,
            ..
        } => {
            let mib = sent_bytes as f64 / (1 << 20) as f64;
            let note = format!(
                "sent by {host}: paused {downtime_ms} ms, {total_ms} ms in all, {mib:.1} MiB"
            );
            mig::sent(ctx, host, &session, note).await
        }
        HostMessage::MigrationFailed {
            session,
            side,
            code,
            message,
        } => {
            tracing::warn!(session_id = %session, host_id = %host, side, code, message, "migration failed");
            mig::failed(ctx, host, &session, format!("{side}: {code}: {message}")).await
        }
        _ => Ok(()),
    };
    match r {
        Ok(()) => Vec::new(),
        Err(e) => vec![error(e.code(), "state store unavailable")],
    }
}

/// Answers that are sent once (`activated`, `activate_failed`, `destroyed`): one the store
/// failed to take is kept in `retry` and taken again at the next heartbeat, so that an
/// activation answered during a store outage is not lost to its timeout.
async fn update(
    ctx: &Ctx,
    host: &HostId,
    record: &mut HostRecord,
    retry: &mut Vec<HostMessage>,
    m: HostMessage,
) -> Vec<ServerToHost> {
    match handle_session(ctx, host, record, m.clone()).await {
        Outcome::Done => Vec::new(),
        Outcome::Foreign(e) => vec![e],
        Outcome::StoreFailed(e) => {
            if retry.len() < MAX_RETRY {
                retry.push(m);
            }
            vec![e]
        }
    }
}

/// Books a heartbeat. A host the sweeper marked lost meanwhile is left `Lost` in `record`, so
/// that the connection asks it to register again.
async fn heartbeat(ctx: &Ctx, record: &mut HostRecord, images: Vec<ImageCapacity>) {
    let host = record.id.clone();
    match ctx.store.host(&host).await {
        Ok(Some(stored)) if stored.state == HostState::Lost => {
            record.state = HostState::Lost;
            return;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(host_id = %host, error = %e, "reading the host for its heartbeat");
            return;
        }
    }
    record.images = images;
    record.last_seen_ms = now_ms();
    record.state = HostState::Up;
    if let Err(e) = ctx.store.put_host(record).await {
        tracing::warn!(host_id = %host, error = %e, "storing heartbeat");
    }
}

/// The host says it is draining (hostd is stopping): nothing more is placed on it.
async fn drained(ctx: &Ctx, record: &mut HostRecord) {
    match ctx.store.set_draining(&record.id, true).await {
        Ok(_) => {
            tracing::info!(host_id = %record.id, "host draining");
            record.draining = true;
            if ctx.config.placement.move_on_drain {
                tokio::spawn(crate::migration::drain(ctx.core.clone(), record.id.clone()));
            }
        }
        Err(e) => tracing::warn!(host_id = %record.id, error = %e, "marking the host draining"),
    }
}

/// An `ended` or `failed` report (live, or from the outbox of `register`): recorded once, then
/// acknowledged with `recorded` — also when it never can be (the session is not this host's),
/// so that hostd stops sending it. A store error is not acknowledged: hostd sends it again.
async fn handle_report(
    ctx: &Ctx,
    host: &HostId,
    record: &mut HostRecord,
    m: HostMessage,
) -> Vec<ServerToHost> {
    let session = match &m {
        HostMessage::Ended { session, .. } | HostMessage::Failed { session, .. } => session.clone(),
        _ => {
            ctx.metrics.refuse("bad_outbox");
            return vec![error(
                "bad_outbox",
                "an outbox holds only ended and failed reports",
            )];
        }
    };
    let recorded = ServerToHost::Recorded {
        session: session.clone(),
    };
    match handle_session(ctx, host, record, m).await {
        Outcome::Done => vec![recorded],
        Outcome::Foreign(e) => vec![e, recorded],
        Outcome::StoreFailed(e) => vec![e],
    }
}

/// What became of a message about a session.
enum Outcome {
    Done,
    /// Not this host's session: answered, and never worth sending again.
    Foreign(ServerToHost),
    /// The store failed: worth another try.
    StoreFailed(ServerToHost),
}

/// Answers about sessions kept for another try, per connection, at most.
const MAX_RETRY: usize = 1024;

/// A message about one of this host's sessions.
async fn handle_session(
    ctx: &Ctx,
    host: &HostId,
    record: &mut HostRecord,
    m: HostMessage,
) -> Outcome {
    let session = match &m {
        HostMessage::Activated { session, .. }
        | HostMessage::ActivateFailed { session, .. }
        | HostMessage::Ended { session, .. }
        | HostMessage::Failed { session, .. }
        | HostMessage::Destroyed { session, .. } => session.clone(),
        _ => return Outcome::Done,
    };
    match owns(ctx, host, &session).await {
        Ok(true) => {}
        Ok(false) => {
            ctx.metrics.refuse("foreign_session");
            return Outcome::Foreign(error(
                "foreign_session",
                format!("session {session} is not placed on host {host}; ignored"),
            ));
        }
        Err(e) => return Outcome::StoreFailed(e),
    }
    record.last_seen_ms = now_ms();
    let r = match m {
        HostMessage::Activated { vm, path, .. } => {
            sessions::activated(ctx, host, &session, &vm, path.as_str())
                .await
                .map(|_| ())
        }
        HostMessage::ActivateFailed { code, message, .. } => {
            sessions::activation_failed(ctx, host, &session, &format!("{code}: {message}")).await
        }
        HostMessage::Ended {
            reason, results, ..
        } => {
            let reason = if reason.is_empty() {
                "game_over".to_owned()
            } else {
                reason
            };
            sessions::end(ctx, &session, &reason, results)
                .await
                .map(|_| ())
        }
        HostMessage::Failed { code, reason, .. } => {
            tracing::warn!(session_id = %session, code, reason, "vm failed");
            sessions::end(
                ctx,
                &session,
                "vm_failed",
                serde_json::json!({"code": code, "reason": reason}),
            )
            .await
            .map(|_| ())
        }
        HostMessage::Destroyed { .. } => sessions::destroyed(ctx, host, &session).await,
        _ => Ok(()),
    };
    match r {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::StoreFailed(error(e.code(), "state store unavailable")),
    }
}
