//! The player websocket (`/v1/play`): hello and auth, queue, cancel, ping; resume on
//! reconnect; one live connection per player; rate limit, size limit, idle timeout.
//!
//! The connection logic is written against any `Stream + Sink` of websocket messages, so the
//! same code runs on real sockets and in tests.

use crate::model::{Event, PoolKey, Ticket};
use crate::modes::Mode;
use crate::standing::{queue_status, standing, Told};
use crate::state::{lock, Conn, Ctx, Outbound, PlayerConn};
use crate::util::{now_ms, random_id};
use crate::wire::{
    self, close, decode, first_frame, send_close, text, First, Flood, FrameError, Verdict,
};
use axum::extract::ws::Message;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_net::Seat;
use berth_protocol::play::{
    ClientMessage, PartySpec, ServerMessage, BY_LATENCY, MAX_LATENCIES, MAX_LATENCY_MS,
    PLAY_PROTOCOL_VERSION,
};
use berth_protocol::{echo, PlayerId};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Queued players get a `queue_status` this often, and every player's standing is checked
/// against the store (see [`crate::standing`]).
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// Rate-limit strikes are forgotten after this long without one.
const STRIKES_FORGIVEN: Duration = Duration::from_secs(10);
/// Messages waiting to be written to one player before it counts as too slow.
const OUTBOX: usize = 32;

pub async fn handler(up: wire::Upgrade, State(ctx): State<Ctx>) -> Response {
    let limits = &ctx.config.limits;
    let refusal = if ctx.is_stopping() {
        Some((
            "shutting_down",
            "this replica is stopping; reconnect (to another)",
        ))
    } else if lock(&ctx.registry.players).len() >= limits.max_players {
        Some(("server_full", "too many players; retry later"))
    } else {
        None
    };
    if let Some((code, message)) = refusal {
        ctx.metrics.refuse(code);
        let body = axum::Json(ServerMessage::error(code, message));
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    let max = limits.max_frame_bytes;
    let wire::Upgrade { ws, bearer, seat } = up;
    ws.max_message_size(max)
        .max_frame_size(max)
        // Small buffers: most player sockets are idle most of the time.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(256 * 1024)
        .on_upgrade(move |socket| serve(ctx, socket, bearer, seat))
}

/// Runs one player connection to its end. Its listener `seat` (if any) is held until `hello`
/// is accepted: until then it counts against `limits.max_pending`.
pub async fn serve<S>(ctx: Ctx, mut ws: S, bearer: Option<String>, seat: Seat)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let Some(player) = hello(&ctx, &mut ws, bearer).await else {
        return;
    };
    seat.release();
    let (conn_id, rx) = register(&ctx, &player).await;
    let mut told = Told::default();
    if greet(&ctx, &mut ws, &player, &mut told).await {
        connection(&ctx, &mut ws, &player, rx, told).await;
    }
    let mine = {
        let mut players = lock(&ctx.registry.players);
        let mine = players.get(&player).is_some_and(|c| c.id == conn_id);
        if mine {
            players.remove(&player);
        }
        mine
    };
    ctx.metrics.player_connections.dec();
    // A queued player keeps its ticket for the reconnect grace (unless another connection of
    // theirs is live).
    if mine {
        let _ = ctx.store.set_away(&player, Some(now_ms())).await;
    }
}

/// Makes this connection the player's one live connection (closing an older one, on any
/// replica); returns its id and its inbox.
async fn register(
    ctx: &Ctx,
    player: &PlayerId,
) -> (String, mpsc::Receiver<Outbound<ServerMessage>>) {
    let conn_id = random_id();
    let (tx, rx) = mpsc::channel(OUTBOX);
    let conn: PlayerConn = Conn {
        id: conn_id.clone(),
        tx,
    };
    if let Some(old) = lock(&ctx.registry.players).insert(player.clone(), conn) {
        old.close(close::CONFLICT, "replaced");
    }
    ctx.metrics.player_connections.inc();
    if let Err(e) = ctx
        .store
        .publish(&Event::PlayerConnected {
            player: player.clone(),
            conn: conn_id.clone(),
        })
        .await
    {
        tracing::warn!(error = %e, "publishing connect");
    }
    let _ = ctx.store.set_away(player, None).await;
    (conn_id, rx)
}

/// `welcome`, then where the player stands (noted in `told`); false if the socket failed.
async fn greet<S>(ctx: &Ctx, ws: &mut S, player: &PlayerId, told: &mut Told) -> bool
where
    S: Sink<Message> + Unpin,
{
    let t = &ctx.config.timeouts;
    let welcome = ServerMessage::Welcome {
        v: PLAY_PROTOCOL_VERSION,
        player: player.clone(),
        ping_interval_ms: t.idle_ms / 3,
        reconnect_grace_ms: t.reconnect_grace_ms,
    };
    let mut ok = ws.send(text(&welcome)).await.is_ok();
    if ok {
        for m in standing(ctx, player, told, true).await {
            told.observe(&m);
            ok &= ws.send(text(&m)).await.is_ok();
        }
    }
    ok
}

/// Serves a greeted player until the connection ends: their messages (rate-limited), what
/// other tasks send them, queue status updates, the idle timeout.
async fn connection<S>(
    ctx: &Ctx,
    ws: &mut S,
    player: &PlayerId,
    mut rx: mpsc::Receiver<Outbound<ServerMessage>>,
    mut told: Told,
) where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let limits = &ctx.config.limits;
    let mut flood = Flood::new(
        limits.messages_per_s,
        limits.burst,
        limits.rate_strikes,
        STRIKES_FORGIVEN,
        Instant::now(),
    );
    let idle = Duration::from_millis(ctx.config.timeouts.idle_ms);
    let mut last_heard = Instant::now();
    let mut status =
        tokio::time::interval_at(tokio::time::Instant::now() + STATUS_EVERY, STATUS_EVERY);
    loop {
        let idle_left = idle.saturating_sub(last_heard.elapsed());
        let out = tokio::select! {
            frame = ws.next() => {
                last_heard = Instant::now();
                let Some(replies) = on_frame(ctx, ws, player, &mut flood, frame).await else {
                    break;
                };
                replies
            }
            out = rx.recv() => match out {
                Some(Outbound::Msg(m)) => vec![m],
                // The event stream had a gap: what did the player miss?
                Some(Outbound::Recheck) => standing(ctx, player, &told, false).await,
                Some(Outbound::Close(code, reason)) => {
                    let _ = ws.send(text(&ServerMessage::error(&reason, close_message(&reason)))).await;
                    send_close(ws, code, &reason).await;
                    break;
                }
                None => break,
            },
            _ = status.tick() => standing(ctx, player, &told, false).await,
            _ = tokio::time::sleep(idle_left) => {
                ctx.metrics.refuse("idle_timeout");
                send_close(ws, close::TIMEOUT, "idle_timeout").await;
                break;
            }
        };
        for m in out {
            told.observe(&m);
            if ws.send(text(&m)).await.is_err() {
                return;
            }
        }
    }
}

/// One frame from the player: the replies to send, or `None` when the connection ends (the
/// peer closed, a frame too big, a sustained flood).
async fn on_frame<S>(
    ctx: &Ctx,
    ws: &mut S,
    player: &PlayerId,
    flood: &mut Flood,
    frame: Option<Result<Message, axum::Error>>,
) -> Option<Vec<ServerMessage>>
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let m = match frame {
        None | Some(Ok(Message::Close(_))) => return None,
        Some(Err(e)) => {
            // Oversize (1009) and not UTF-8 (1007) are told; a broken connection is not.
            if let Some(reason) = wire::close_after_read_error(ws, &e).await {
                ctx.metrics.refuse(reason);
            }
            return None;
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Some(Vec::new()),
        Some(Ok(m)) => m,
    };
    // Strikes are forgiven after a quiet spell: only a sustained flood closes.
    match flood.check(Instant::now()) {
        Verdict::Allowed => Some(handle(ctx, player, m).await),
        Verdict::Refused => {
            ctx.metrics.refuse("rate_limited");
            Some(vec![ServerMessage::error(
                "rate_limited",
                format!(
                    "at most {} messages per second",
                    ctx.config.limits.messages_per_s
                ),
            )])
        }
        Verdict::Close => {
            ctx.metrics.refuse("rate_limited");
            let _ = ws
                .send(text(&ServerMessage::error(
                    "rate_limited",
                    "too many messages; closing",
                )))
                .await;
            // (Reading the flooder's unread frames away first, so the close is not a reset.)
            send_close(ws, close::RATE_LIMITED, "rate_limited").await;
            None
        }
    }
}

fn close_message(reason: &str) -> String {
    match reason {
        "replaced" => "another connection for this player took over".into(),
        "slow_consumer" => "messages were not read fast enough".into(),
        "shutting_down" => "server is shutting down; reconnect".into(),
        other => other.to_owned(),
    }
}

/// Waits for `hello`, checks the version and the token; `None` if the connection was closed.
async fn hello<S>(ctx: &Ctx, ws: &mut S, bearer: Option<String>) -> Option<PlayerId>
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let wait = Duration::from_millis(ctx.config.timeouts.hello_ms);
    let refuse = |code: &'static str, message: String, close_code: u16| async move {
        (code, message, close_code)
    };
    let (code, message, close_code) = 'refused: {
        let text = match first_frame(ws, wait).await {
            First::Timeout => {
                break 'refused refuse("hello_timeout", "no hello in time".into(), close::TIMEOUT)
                    .await
            }
            // Before hello an oversized message just drops the socket (nothing said yet).
            First::Closed | First::Failed | First::TooBig => return None,
            First::NotUtf8 => {
                ctx.metrics.refuse(wire::INVALID_UTF8);
                send_close(ws, close::INVALID_DATA, wire::INVALID_UTF8).await;
                return None;
            }
            First::Text(t) => t,
            First::Binary => {
                let e = FrameError::Binary;
                break 'refused refuse(e.code(), e.to_string(), close::PROTOCOL).await;
            }
        };
        match decode::<ClientMessage>(&text) {
            Ok(ClientMessage::Hello { v, token }) => {
                if v != PLAY_PROTOCOL_VERSION {
                    break 'refused refuse(
                        "unsupported_version",
                        format!(
                            "this server speaks protocol version {PLAY_PROTOCOL_VERSION}, not {v}"
                        ),
                        close::PROTOCOL,
                    )
                    .await;
                }
                // An empty token in hello means "see the header".
                let token = token
                    .filter(|t| !t.trim().is_empty())
                    .or(bearer.clone())
                    .unwrap_or_default();
                match ctx.auth.verify_player(&token) {
                    Ok(p) => return Some(p),
                    Err(e) => break 'refused refuse(e.code(), e.to_string(), close::AUTH).await,
                }
            }
            Ok(_) => {
                break 'refused refuse(
                    "hello_required",
                    "the first message must be hello".into(),
                    close::PROTOCOL,
                )
                .await
            }
            Err(e) => break 'refused refuse(e.code(), e.to_string(), close::PROTOCOL).await,
        }
    };
    ctx.metrics.refuse(code);
    let _ = ws.send(text(&ServerMessage::error(code, message))).await;
    send_close(ws, close_code, code).await;
    None
}

/// Answers one frame from an authenticated player.
async fn handle(ctx: &Ctx, player: &PlayerId, m: Message) -> Vec<ServerMessage> {
    let text = match m {
        Message::Text(t) => t,
        _ => {
            let e = FrameError::Binary;
            ctx.metrics.refuse(e.code());
            return vec![ServerMessage::error(e.code(), e.to_string())];
        }
    };
    let msg = match decode::<ClientMessage>(&text) {
        Ok(m) => m,
        Err(e) => {
            ctx.metrics.refuse(e.code());
            return vec![ServerMessage::error(e.code(), e.to_string())];
        }
    };
    let result = match msg {
        ClientMessage::Hello { .. } => Err(("already_hello", "hello was already accepted".into())),
        ClientMessage::Ping { nonce } => Ok(vec![ServerMessage::Pong {
            nonce,
            server_ms: now_ms(),
        }]),
        ClientMessage::Queue {
            mode,
            region,
            latencies,
            party,
            skill,
        } => queue(ctx, player, mode, (region, latencies), party, skill).await,
        ClientMessage::Cancel {} => match ctx.store.dequeue(player).await {
            Ok(Some(t)) => Ok(vec![ServerMessage::Dequeued {
                ticket: t.id,
                reason: "cancelled".into(),
            }]),
            Ok(None) => Err(("not_queued", "there is no ticket to cancel".into())),
            Err(e) => Err((e.code(), "state store unavailable; retry".into())),
        },
    };
    result.unwrap_or_else(|(code, message)| {
        ctx.metrics.refuse(code);
        vec![ServerMessage::error(code, message)]
    })
}

type Refusal = (&'static str, String);

fn valid_name(s: &str) -> bool {
    berth_protocol::SessionId::new(s).is_ok()
}

/// Where a `queue` asks to play: the pool's region, and the latencies if it gave them.
type Wanted = (Option<String>, Option<BTreeMap<String, u32>>);

/// Checks a `queue`'s region or latencies against `mode`: the pool region (a named region, or
/// [`BY_LATENCY`]) and the latencies to keep (those of regions the mode offers).
fn where_to_play(
    mode: &Mode,
    wanted: Wanted,
) -> Result<(String, Option<BTreeMap<String, u32>>), Refusal> {
    let unknown = |region: &str| {
        let name = &mode.name;
        Err((
            "unknown_region",
            format!("mode {name} is not offered in region {}", echo(region)),
        ))
    };
    match wanted {
        (Some(region), None) => {
            if !valid_name(&region) || !mode.offers_region(&region) {
                return unknown(&region);
            }
            Ok((region, None))
        }
        (None, Some(latencies)) => {
            let bad = |m: String| Err(("bad_latencies", m));
            if latencies.is_empty() || latencies.len() > MAX_LATENCIES {
                return bad(format!("latencies must name 1 to {MAX_LATENCIES} regions"));
            }
            if let Some((r, ms)) = latencies
                .iter()
                .find(|(r, ms)| !valid_name(r) || **ms > MAX_LATENCY_MS)
            {
                return bad(format!(
                    "latency {ms} ms to region {}: regions are names, latencies at most {MAX_LATENCY_MS} ms",
                    echo(r)
                ));
            }
            let offered: BTreeMap<String, u32> = latencies
                .into_iter()
                .filter(|(r, _)| mode.offers_region(r))
                .collect();
            if offered.is_empty() {
                return unknown("(none of the measured)");
            }
            Ok((BY_LATENCY.to_owned(), Some(offered)))
        }
        _ => Err((
            "region_or_latencies",
            "queue names a region or gives latencies, exactly one of the two".into(),
        )),
    }
}

async fn queue(
    ctx: &Ctx,
    player: &PlayerId,
    mode_name: String,
    wanted: Wanted,
    party: Option<PartySpec>,
    skill: Option<f64>,
) -> Result<Vec<ServerMessage>, Refusal> {
    let Some(mode) = ctx.modes.get(&mode_name) else {
        let known: Vec<&str> = ctx.modes.0.keys().map(String::as_str).collect();
        return Err((
            "unknown_mode",
            format!("no mode {}; modes: {}", echo(&mode_name), known.join(", ")),
        ));
    };
    let (region, latencies) = where_to_play(mode, wanted)?;
    let skill = skill.unwrap_or(mode.skill.default);
    if !skill.is_finite() || skill.abs() > 1e9 {
        return Err(("bad_skill", "skill must be a finite number".into()));
    }
    let pool = PoolKey {
        mode: mode_name,
        region,
    };
    let party = match party {
        Some(p) if p.size <= 1 => None,
        Some(p) => {
            if !valid_name(&p.id) {
                return Err((
                    "bad_party",
                    format!("party id must be {}", berth_protocol::ids::ID_RULE),
                ));
            }
            if p.size > mode.team_size() {
                return Err((
                    "party_too_big",
                    format!(
                        "parties in {} have at most {} players",
                        mode.name,
                        mode.team_size()
                    ),
                ));
            }
            let tickets = ctx
                .store
                .tickets(&pool)
                .await
                .map_err(|e| (e.code(), "state store unavailable; retry".to_owned()))?;
            let members = tickets
                .iter()
                .filter(|t| t.party.as_ref().is_some_and(|q| q.id == p.id))
                .count();
            if members as u32 >= p.size {
                return Err((
                    "party_full",
                    format!("party {} already has {} players queued", p.id, p.size),
                ));
            }
            Some(p)
        }
        None => None,
    };
    let ticket = Ticket {
        id: format!("t-{}", &random_id()[..20]),
        player: player.clone(),
        pool: pool.clone(),
        party,
        skill,
        enqueued_ms: now_ms(),
        away_since_ms: None,
        latencies,
    };
    match ctx.store.enqueue(&ticket).await {
        Ok(()) => {}
        Err(e @ crate::store::StoreError::PlayerBusy(_)) => {
            return Err((
                e.code(),
                match e.code() {
                    "in_session" => {
                        "you are in a session; it must end before you queue again".into()
                    }
                    _ => "you are already queued; cancel first to change mode".into(),
                },
            ));
        }
        Err(e) => return Err((e.code(), "state store unavailable; retry".into())),
    }
    Ok(queue_status(ctx, player).await.into_iter().collect())
}
