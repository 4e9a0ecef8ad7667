//! The admin dashboard: the page at `/admin` (`assets/dashboard/`, compiled into the binary like
//! `/play`) and its live feed, `GET /v1/admin/events` — server-sent events for an admin-role
//! bearer token (`docs/protocol.md`, "Admin event feed").
//!
//! One [`Hub`] per replica owns what the feed shows. Its task ([`run`]) keeps a mirror of the
//! sessions, fed by the store's session events (so changes made on any replica arrive, with
//! either store) and re-read from the store, coalesced every [`FLUSH_EVERY`]. From the sessions'
//! timelines it keeps bounded rings of recent activation-latency and time-to-match samples:
//! both are stored with every session, so the rings are rebuilt from the store when a replica
//! starts and every replica shows the same figures. While someone watches, it re-reads hosts
//! and queues every [`TICK_EVERY`] and sends them when they changed. Every message is
//! serialized once and fanned out through a broadcast channel; a new watcher starts with a
//! full snapshot, and one that falls behind gets a fresh snapshot instead of the missed
//! changes.

use crate::access::{verify_admin, ApiError};
use crate::feed::*;
use crate::model::{Event, Session, SessionState};
use crate::sessions::live_sessions;
use crate::state::{lock, Ctx};
use crate::store::StoreError;
use crate::util::now_ms;
use crate::views::pool_views;
use crate::views::SessionRow;
use crate::web::{asset, page};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use berth_net::Seat;
use berth_protocol::SessionId;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");
const UPLOT_JS: &str = include_str!("../../assets/dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/dashboard/vendor/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../../assets/dashboard/vendor/uPlot.LICENSE");

/// The page talks only to this origin (the feed and the admin API), loads nothing else and may
/// not be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// The hub's task: mirrors sessions from store events, samples the series, and while anyone
/// watches, re-reads hosts and queues. Stopped with the server.
pub async fn run(ctx: Ctx) {
    let hub = &ctx.dashboard;
    // Subscribed before the first read: nothing that changes meanwhile is missed.
    let mut events = ctx.store.subscribe();
    let mut backoff = Duration::from_millis(250);
    while let Err(e) = reset(&ctx).await {
        tracing::warn!(error = %e, "dashboard: reading sessions");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    hub.ready.send_replace(true);
    let mut dirty: HashSet<SessionId> = HashSet::new();
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut tick = tokio::time::interval(TICK_EVERY);
    let mut series = tokio::time::interval(SERIES_EVERY);
    let mut resync_at = tokio::time::interval(RESYNC_EVERY);
    for t in [&mut flush, &mut tick, &mut series, &mut resync_at] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let (mut lagged, mut stale) = (false, false);
    let (mut last_hosts, mut last_queues) = (None, None);
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(Event::Session { session, .. }) => {
                    dirty.insert(session);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "dashboard: event receiver lagged");
                    lagged = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = flush.tick() => {
                if hub.watchers() == 0 && !dirty.is_empty() {
                    // Nobody watches: no store reads on the sessions' hot path. The mirror is
                    // stale until the next feed opens and it is read again whole.
                    dirty.clear();
                    stale = true;
                    hub.ready.send_replace(false);
                } else if !dirty.is_empty() {
                    let ids: Vec<SessionId> = dirty.drain().collect();
                    if let Err(e) = refresh(&ctx, ids.clone()).await {
                        tracing::warn!(error = %e, "dashboard: reading sessions");
                        dirty.extend(ids);
                    }
                }
            }
            () = hub.wanted.notified() => {
                if stale {
                    match reset(&ctx).await {
                        Ok(()) => {
                            stale = false;
                            lagged = false;
                            hub.ready.send_replace(true);
                        }
                        Err(e) => tracing::warn!(error = %e, "dashboard: reading sessions"),
                    }
                }
            }
            _ = resync_at.tick() => {
                if !stale && (lagged || hub.watchers() > 0) {
                    match resync(&ctx).await {
                        Ok(()) => lagged = false,
                        Err(e) => tracing::warn!(error = %e, "dashboard: resync"),
                    }
                }
            }
            _ = series.tick() => {
                // A stale mirror counts nothing true: the series has a gap instead.
                if !stale {
                    let point = lock(&hub.mirror).count(now_ms());
                    hub.send(&FeedMessage::Series { point });
                }
            }
            _ = tick.tick() => {
                if hub.watchers() > 0 {
                    infra(&ctx, &mut last_hosts, &mut last_queues).await;
                }
            }
            () = hub.hosts_nudge.notified() => {
                if hub.watchers() > 0 {
                    infra(&ctx, &mut last_hosts, &mut last_queues).await;
                }
            }
        }
    }
}

fn retention_ms(ctx: &Ctx) -> u64 {
    ctx.config.store.ended_retention_s.saturating_mul(1000)
}

/// Every session the store has (live, and ended within retention).
async fn all_sessions(ctx: &Ctx) -> Result<Vec<Session>, StoreError> {
    let mut all = live_sessions(ctx).await?;
    all.extend(ctx.store.sessions(Some(SessionState::Ended)).await?);
    Ok(all)
}

async fn reset(ctx: &Ctx) -> Result<(), StoreError> {
    let all = all_sessions(ctx).await?;
    lock(&ctx.dashboard.mirror).reset(&all, now_ms(), retention_ms(ctx));
    Ok(())
}

/// Re-reads `ids` and sends what changed.
async fn refresh(ctx: &Ctx, ids: Vec<SessionId>) -> Result<(), StoreError> {
    let read: Vec<(SessionId, Result<Option<Session>, StoreError>)> =
        futures_util::stream::iter(ids)
            .map(|id| async move {
                let s = ctx.store.session(&id).await;
                (id, s)
            })
            .buffer_unordered(READS)
            .collect()
            .await;
    let mut found = Vec::with_capacity(read.len());
    for (id, s) in read {
        found.push((id, s?));
    }
    absorb(ctx, &found);
    Ok(())
}

fn absorb(ctx: &Ctx, found: &[(SessionId, Option<Session>)]) {
    let now = now_ms();
    let mut changes = Changes::default();
    {
        let mut m = lock(&ctx.dashboard.mirror);
        for (id, s) in found {
            m.apply(id, s.as_ref(), now, &mut changes);
        }
        m.prune(now, retention_ms(ctx), &mut changes);
    }
    for msg in changes.messages() {
        ctx.dashboard.send(&msg);
    }
}

/// Checks the mirror's live sessions against the store's (events may have been missed).
async fn resync(ctx: &Ctx) -> Result<(), StoreError> {
    let live = live_sessions(ctx).await?;
    let known: HashSet<SessionId> = live.iter().map(|s| s.id.clone()).collect();
    let gone: Vec<SessionId> = lock(&ctx.dashboard.mirror)
        .live()
        .into_iter()
        .filter(|id| !known.contains(id))
        .collect();
    let mut found: Vec<(SessionId, Option<Session>)> =
        live.into_iter().map(|s| (s.id.clone(), Some(s))).collect();
    // Listed as live but not live any more: ended (or forgotten) meanwhile.
    for id in gone {
        let s = ctx.store.session(&id).await?;
        found.push((id, s));
    }
    absorb(ctx, &found);
    Ok(())
}

async fn host_rows(ctx: &Ctx) -> Result<(Vec<HostRow>, Vec<PoolRow>), StoreError> {
    let hosts = ctx.store.hosts().await?;
    let per_min = lock(&ctx.dashboard.mirror).activations_per_min(now_ms());
    let pools = pool_views(&hosts)
        .into_iter()
        .map(|view| PoolRow {
            activations_per_min: per_min.get(&view.image).copied().unwrap_or(0),
            view,
        })
        .collect();
    Ok((hosts.into_iter().map(HostRow::from).collect(), pools))
}

async fn queue_rows(ctx: &Ctx) -> Result<Vec<QueueRow>, StoreError> {
    let mut out = Vec::new();
    for pool in ctx.store.pools().await? {
        let tickets = ctx.store.tickets(&pool).await?;
        out.push(QueueRow {
            depth: tickets.len() as u64,
            oldest_enqueued_ms: tickets.iter().map(|t| t.enqueued_ms).min(),
            away: tickets.iter().filter(|t| t.away_since_ms.is_some()).count() as u64,
            mode: pool.mode,
            region: pool.region,
        });
    }
    Ok(out)
}

/// Re-reads hosts and queues; sends each if it changed since last sent.
async fn infra(ctx: &Ctx, last_hosts: &mut Option<String>, last_queues: &mut Option<String>) {
    let hub = &ctx.dashboard;
    let now = now_ms();
    match host_rows(ctx).await {
        Ok((hosts, pools)) => {
            let key = serde_json::to_string(&(&hosts, &pools)).ok();
            if key != *last_hosts {
                *last_hosts = key;
                hub.send(&FeedMessage::Hosts {
                    now_ms: now,
                    hosts,
                    pools,
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "dashboard: reading hosts"),
    }
    match queue_rows(ctx).await {
        Ok(queues) => {
            let key = serde_json::to_string(&queues).ok();
            if key != *last_queues {
                *last_queues = key;
                hub.send(&FeedMessage::Queues {
                    now_ms: now,
                    queues,
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "dashboard: reading queues"),
    }
}

async fn snapshot(ctx: &Ctx) -> Result<Frame, StoreError> {
    let (hosts, pools) = host_rows(ctx).await?;
    let queues = queue_rows(ctx).await?;
    let m = lock(&ctx.dashboard.mirror);
    let mut sessions: Vec<SessionRow> = m.sessions.values().cloned().collect();
    sessions.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
    Ok(FeedMessage::Snapshot {
        replica: ctx.replica.clone(),
        store: ctx.store.kind().to_owned(),
        now_ms: now_ms(),
        window_ms: WINDOW_MS,
        ended_kept: ENDED_KEPT,
        sessions,
        hosts,
        pools,
        queues,
        activation: m.activation.iter().cloned().collect(),
        time_to_match: m.time_to_match.iter().cloned().collect(),
        series: m.series.iter().copied().collect(),
    }
    .frame())
}

// ---------------------------------------------------------------------------------- routes

/// The page (`/admin`, `/admin/…`) and the feed (`/v1/admin/events`).
pub fn router() -> Router<Ctx> {
    let asset = |content_type: &'static str, body: &'static str| {
        get(move || async move { asset(content_type, body) })
    };
    Router::new()
        .route("/admin", get(index))
        .route("/admin/", get(index))
        .route(
            "/admin/app.js",
            asset("text/javascript; charset=utf-8", APP_JS),
        )
        .route(
            "/admin/style.css",
            asset("text/css; charset=utf-8", STYLE_CSS),
        )
        .route(
            "/admin/vendor/uPlot.iife.min.js",
            asset("text/javascript; charset=utf-8", UPLOT_JS),
        )
        .route(
            "/admin/vendor/uPlot.min.css",
            asset("text/css; charset=utf-8", UPLOT_CSS),
        )
        .route(
            "/admin/vendor/uPlot.LICENSE",
            asset("text/plain; charset=utf-8", UPLOT_LICENSE),
        )
        .route(EVENTS_PATH, get(events))
}

async fn index() -> Response {
    page(INDEX_HTML, CSP)
}

/// One watcher's feed: what it still has to hear.
struct Watch {
    ctx: Ctx,
    rx: broadcast::Receiver<Frame>,
    /// When its token expires.
    expires: tokio::time::Instant,
    first: Option<Frame>,
    done: bool,
}

fn sse(frame: &Frame) -> SseEvent {
    SseEvent::default().event(frame.event).data(&*frame.data)
}

/// `GET /v1/admin/events`: the feed, for an admin-role bearer token.
async fn events(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    seat: Seat,
) -> Result<Response, ApiError> {
    let claims = verify_admin(&ctx, &headers)?;
    // A signed-in operator's feed is a long stream, not a connection waiting to sign in.
    seat.release();
    let hub = &ctx.dashboard;
    if *hub.closed.borrow() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "this replica is stopping; reconnect".into(),
        ));
    }
    if hub.watchers() >= MAX_WATCHERS {
        ctx.metrics.refuse("too_many_watchers");
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_watchers",
            format!("at most {MAX_WATCHERS} feeds per replica; retry later"),
        ));
    }
    // Wait (briefly) for the mirror to hold the store's sessions: a replica just started, or
    // nobody watched for a while and the mirror is read again.
    hub.wanted.notify_one();
    let mut ready = hub.ready.subscribe();
    let ready = tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r))
        .await
        .is_ok_and(|r| r.is_ok());
    if !ready {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the dashboard is still reading the store; retry".into(),
        ));
    }
    // Subscribed before the snapshot is read: changes meanwhile come after it (and are whole
    // rows, so applying one twice is harmless).
    let rx = hub.frames.subscribe();
    let first = snapshot(&ctx).await?;
    let left = Duration::from_secs(claims.exp.saturating_sub(now_ms() / 1000));
    tracing::info!(admin = claims.sub, "dashboard feed opened");
    let watch = Watch {
        ctx: ctx.clone(),
        rx,
        expires: tokio::time::Instant::now() + left,
        first: Some(first),
        done: false,
    };
    let stream = futures_util::stream::unfold(watch, |mut w| async move {
        if w.done {
            return None;
        }
        if let Some(f) = w.first.take() {
            return Some((Ok::<_, Infallible>(sse(&f)), w));
        }
        tokio::select! {
            r = w.rx.recv() => match r {
                Ok(f) => {
                    w.done = f.event == "bye";
                    Some((Ok(sse(&f)), w))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow for the changes: start it over.
                    w.rx = w.rx.resubscribe();
                    match snapshot(&w.ctx).await {
                        Ok(f) => Some((Ok(sse(&f)), w)),
                        Err(e) => {
                            tracing::warn!(error = %e, "dashboard: snapshot");
                            None
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            () = tokio::time::sleep_until(w.expires) => {
                w.done = true;
                let bye = FeedMessage::Bye { reason: "expired_token".into() }.frame();
                Some((Ok(sse(&bye)), w))
            }
        }
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Reverse proxies must pass each message on as it comes.
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PoolKey, Transition};
    use berth_protocol::{HostId, PlayerId};

    fn session(id: &str, created: u64, states: &[(SessionState, u64, &str)]) -> Session {
        let state = states.last().map_or(SessionState::Placing, |s| s.0);
        Session {
            id: SessionId::new(id).expect("id"),
            version: 1,
            pool: PoolKey {
                mode: "duel".into(),
                region: "eu".into(),
            },
            region: String::new(),
            region_reason: None,
            migration: None,
            image: "arena".into(),
            state,
            players: vec![PlayerId::new("ana").expect("id")],
            teams: vec![],
            ticket_key: String::new(),
            params: serde_json::Value::Null,
            host: Some(HostId::new("h1").expect("id")),
            tried_hosts: vec![],
            vm: None,
            endpoint: None,
            created_ms: created,
            deadline_ms: 0,
            ends_by_ms: 0,
            history: states
                .iter()
                .map(|(state, at_ms, note)| Transition {
                    state: *state,
                    at_ms: *at_ms,
                    note: (*note).into(),
                })
                .collect(),
            end_reason: None,
            results: serde_json::Value::Null,
            match_ms: 400,
        }
    }

    use SessionState::*;

    #[test]
    fn samples_come_from_the_timeline() {
        let s = session(
            "s1",
            1_000,
            &[
                (Placing, 1_000, ""),
                (Activating, 1_010, "h1"),
                (Active, 1_250, "warm"),
                (Ending, 5_000, "admin"),
            ],
        );
        let (a, m) = samples_of(&s).expect("became active");
        assert_eq!(
            a,
            ActivationSample(1_250, 240, "arena".into(), "warm".into())
        );
        // The oldest ticket queued 400 ms before the match was formed.
        assert_eq!(m, MatchSample(1_250, 650, "duel".into()));
        // A retry on another host: latency from the last placement.
        let s = session(
            "s2",
            0,
            &[
                (Placing, 0, ""),
                (Activating, 10, "h1"),
                (Placing, 500, "activation_timeout"),
                (Activating, 600, "h2"),
                (Active, 700, "cold"),
            ],
        );
        assert_eq!(samples_of(&s).expect("active").0 .1, 100);
        assert!(samples_of(&session("s3", 0, &[(Placing, 0, ""), (Ended, 9, "")])).is_none());
    }

    #[test]
    fn the_mirror_sends_changes_once_and_samples_once() {
        let mut m = Mirror::default();
        let now = 10_000;
        let placing = session("s1", 9_000, &[(Placing, 9_000, "")]);
        let mut out = Changes::default();
        m.apply(&placing.id, Some(&placing), now, &mut out);
        assert_eq!(out.upsert.len(), 1);
        assert!(out.activation.is_empty());
        // The same again: nothing to send.
        let mut out = Changes::default();
        m.apply(&placing.id, Some(&placing), now, &mut out);
        assert!(out.upsert.is_empty());
        let active = session(
            "s1",
            9_000,
            &[
                (Placing, 9_000, ""),
                (Activating, 9_001, "h1"),
                (Active, 9_100, "warm"),
            ],
        );
        let mut out = Changes::default();
        m.apply(&active.id, Some(&active), now, &mut out);
        assert_eq!((out.upsert.len(), out.activation.len()), (1, 1));
        assert_eq!(out.upsert[0].since_ms, 9_100);
        let mut ended = active.clone();
        ended.transition(Ended, 9_500, 9_500, "admin");
        let mut out = Changes::default();
        m.apply(&ended.id, Some(&ended), now, &mut out);
        assert_eq!(
            (out.upsert.len(), out.activation.len()),
            (1, 0),
            "sampled once"
        );
        assert_eq!(m.activations_per_min(now).get("arena"), Some(&1));
        let mut out = Changes::default();
        m.apply(&ended.id, None, now, &mut out);
        assert_eq!(out.remove, vec![ended.id.clone()]);
        assert!(m.is_empty());
    }

    #[test]
    fn pruning_keeps_the_newest_ended_and_the_window() {
        let mut m = Mirror::default();
        let now = WINDOW_MS * 2;
        let mut all = Vec::new();
        for i in 0..(ENDED_KEPT as u64 + 10) {
            let t = now - 100_000 + i;
            all.push(session(
                &format!("e{i}"),
                t,
                &[(Placing, t, ""), (Ended, t, "placement_failed")],
            ));
        }
        let old = now - WINDOW_MS - 1;
        all.push(session(
            "live-old",
            old,
            &[
                (Placing, old, ""),
                (Activating, old, "h1"),
                (Active, old, "warm"),
            ],
        ));
        m.reset(&all, now, 3_600_000);
        assert_eq!(m.len(), ENDED_KEPT + 1);
        assert!(m
            .sessions
            .contains_key(&SessionId::new("live-old").expect("id")));
        assert!(
            !m.sessions.contains_key(&SessionId::new("e0").expect("id")),
            "oldest ended dropped"
        );
        assert!(m.activation.is_empty(), "outside the window");
        // Retention: ended longer ago than the store keeps them are dropped too.
        let mut out = Changes::default();
        m.prune(now + 200_000, 50_000, &mut out);
        assert_eq!(out.remove.len(), ENDED_KEPT);
        let p = m.count(now);
        assert_eq!(p, SeriesPoint(now, 0, 0, 1, 0));
    }

    #[test]
    fn rings_are_bounded() {
        let mut m = Mirror::default();
        let now = 1_000_000;
        for i in 0..(MAX_SAMPLES as u64 + 5) {
            let s = session(
                &format!("s{i}"),
                now - 1000,
                &[
                    (Placing, now - 1000, ""),
                    (Activating, now - 900, "h1"),
                    (Active, now - 800, "warm"),
                ],
            );
            m.apply(&s.id, Some(&s), now, &mut Changes::default());
        }
        assert_eq!(m.activation.len(), MAX_SAMPLES);
        assert_eq!(m.time_to_match.len(), MAX_SAMPLES);
        for _ in 0..(SERIES_POINTS + 3) {
            m.count(now);
        }
        assert_eq!(m.series.len(), SERIES_POINTS);
    }

    #[test]
    fn messages_carry_their_type() {
        let f = FeedMessage::Bye {
            reason: "shutting_down".into(),
        }
        .frame();
        assert_eq!(f.event, "bye");
        assert_eq!(&*f.data, r#"{"type":"bye","reason":"shutting_down"}"#);
        let v: serde_json::Value = serde_json::from_str(
            &FeedMessage::Series {
                point: SeriesPoint(5, 1, 2, 3, 4),
            }
            .frame()
            .data,
        )
        .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type": "series", "point": [5, 1, 2, 3, 4]})
        );
    }
}
