//! The host websocket (`/v1/hosts`): hostd authenticates with a host-role JWT whose subject is
//! its host id, registers its images, capacity and live VMs (reconciled against the store),
//! heartbeats, and answers activations. A host may only speak about its own sessions.

use crate::auth::Role;
use crate::model::{HostRecord, HostState, SessionState};
use crate::sessions;
use crate::state::{lock, Conn, Ctx, HostConn, Outbound};
use crate::util::{now_ms, random_id};
use crate::wire::{self, close, decode, send_close, text, FrameError};
use axum::extract::ws::Message;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_net::Seat;
use berth_protocol::host::{HostMessage, ServerToHost, HOST_PROTOCOL_VERSION};
use berth_protocol::{HostId, SessionId};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest message a host may send (its register lists every VM it runs).
const MAX_HOST_MESSAGE: usize = 4 << 20;

pub async fn handler(up: wire::Upgrade, State(ctx): State<Ctx>) -> Response {
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
    let Some(mut record) = register(&ctx, &mut ws, &host).await else {
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
        for m in reconcile(&ctx, &record).await {
            ok &= ws.send(text(&m)).await.is_ok();
        }
    }
    let silent = Duration::from_millis(ctx.config.timeouts.host_lost_ms);
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
                let reply = match m {
                    Ok(m) => handle(&ctx, &host, &mut record, m).await,
                    Err(e) => {
                        ctx.metrics.refuse(e.code());
                        Some(error(e.code(), e.to_string()))
                    }
                };
                if let Some(r) = reply {
                    ok = ws.send(text(&r)).await.is_ok();
                }
            }
            out = rx.recv() => match out {
                Some(Outbound::Msg(m)) => ok = ws.send(text(&m)).await.is_ok(),
                Some(Outbound::Close(code, reason)) => {
                    send_close(&mut ws, code, &reason).await;
                    break;
                }
                None => break,
            },
        }
    }
    let mine = {
        let mut hosts = lock(&ctx.registry.hosts);
        let mine = hosts.get(&host).is_some_and(|c: &HostConn| c.id == conn_id);
        if mine {
            hosts.remove(&host);
        }
        mine
    };
    ctx.metrics.host_connections.dec();
    if mine {
        tracing::warn!(host_id = %host, "host disconnected");
        if let Ok(Some(mut r)) = ctx.store.host(&host).await {
            if r.replica == ctx.replica {
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

/// Waits for `register`; checks version and that it names the authenticated host.
async fn register<S>(ctx: &Ctx, ws: &mut S, host: &HostId) -> Option<HostRecord>
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
            Ok(record) => match ctx.store.put_host(&record).await {
                Ok(()) => return Some(record),
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

/// The host's record from its first message, `register` of this protocol version naming the
/// authenticated `host`.
fn registered(ctx: &Ctx, host: &HostId, first: &str) -> Result<HostRecord, Refusal> {
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
    let now = now_ms();
    Ok(HostRecord {
        id: host.clone(),
        state: HostState::Up,
        draining: false,
        accel,
        driver,
        gateway,
        max_vms,
        images,
        vms,
        replica: ctx.replica.clone(),
        connected_ms: now,
        last_seen_ms: now,
    })
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
            SessionState::Active | SessionState::Ending => {
                let _ = sessions::abandon(ctx, &s.id, "vm_lost").await;
            }
            _ => {}
        }
    }
    out
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
    m: HostMessage,
) -> Option<ServerToHost> {
    let session = match &m {
        HostMessage::Register { .. } => {
            return Some(error(
                "already_registered",
                "register is sent once per connection",
            ))
        }
        HostMessage::Heartbeat { images } => {
            record.images = images.clone();
            record.last_seen_ms = now_ms();
            record.state = HostState::Up;
            if let Err(e) = ctx.store.put_host(record).await {
                tracing::warn!(host_id = %host, error = %e, "storing heartbeat");
            }
            return None;
        }
        HostMessage::Activated { session, .. }
        | HostMessage::ActivateFailed { session, .. }
        | HostMessage::Ended { session, .. }
        | HostMessage::Failed { session, .. }
        | HostMessage::Destroyed { session, .. } => session.clone(),
    };
    match owns(ctx, host, &session).await {
        Ok(true) => {}
        Ok(false) => {
            ctx.metrics.refuse("foreign_session");
            return Some(error(
                "foreign_session",
                format!("session {session} is not placed on host {host}; ignored"),
            ));
        }
        Err(e) => return Some(e),
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
        HostMessage::Register { .. } | HostMessage::Heartbeat { .. } => Ok(()),
    };
    r.err().map(|e| error(e.code(), "state store unavailable"))
}
