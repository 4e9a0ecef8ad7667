//! The admin API (`/v1/admin/*`, admin-role JWT): hosts, pools, sessions, queues; end a
//! session, drain or undrain a host. Described in `docs/openapi.json`, which a test keeps in
//! step with [`routes`].

pub use crate::access::{verify_admin, Admin, ApiError, ErrorBody};
use crate::model::SessionState;
use crate::sessions;
use crate::state::Ctx;
use crate::util::now_ms;
pub use crate::views::{pool_views, HostView, PoolView, QueueView, QueuedTicket, SessionView};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use berth_protocol::{clip, HostId, SessionId, DETAIL_MAX_CHARS};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct SessionFilter {
    pub state: Option<String>,
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

/// Sessions listed per request at most (`?limit=`), and by default.
pub const MAX_LIST: usize = 10_000;
pub const DEFAULT_LIST: usize = 1_000;

/// Every admin route: (method, path as in `docs/openapi.json`, handler).
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<Ctx>)> {
    vec![
        (Method::GET, "/v1/admin/hosts", get(hosts)),
        (Method::POST, "/v1/admin/hosts/{id}/drain", post(drain)),
        (Method::POST, "/v1/admin/hosts/{id}/undrain", post(undrain)),
        (Method::GET, "/v1/admin/pools", get(pools)),
        (Method::GET, "/v1/admin/sessions", get(list_sessions)),
        (Method::GET, "/v1/admin/sessions/{id}", get(session)),
        (
            Method::POST,
            "/v1/admin/sessions/{id}/end",
            post(end_session),
        ),
        (
            Method::POST,
            "/v1/admin/sessions/{id}/migrate",
            post(migrate_session),
        ),
        (Method::GET, "/v1/admin/queues", get(queues)),
    ]
}

pub fn router() -> Router<Ctx> {
    routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, h)| r.route(path, h))
}

async fn hosts(_: Admin, State(ctx): State<Ctx>) -> Result<Json<Vec<HostView>>, ApiError> {
    let hosts = ctx.store.hosts().await?;
    Ok(Json(hosts.into_iter().map(HostView::from).collect()))
}

fn host_id(id: String) -> Result<HostId, ApiError> {
    HostId::new(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_id", e.to_string()))
}

async fn set_drain(
    ctx: &Ctx,
    who: &str,
    id: String,
    draining: bool,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = host_id(id)?;
    if !ctx.store.set_draining(&id, draining).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "unknown_host",
            format!("no host {id}"),
        ));
    }
    tracing::info!(host_id = %id, admin = who, draining, "host drain changed");
    if draining && ctx.config.placement.move_on_drain {
        tokio::spawn(crate::migration::drain(ctx.core.clone(), id.clone()));
    }
    ctx.dashboard.hosts_changed();
    Ok(Json(
        serde_json::json!({ "host": id, "draining": draining }),
    ))
}

async fn drain(
    a: Admin,
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_drain(&ctx, &a.0, id, true).await
}

async fn undrain(
    a: Admin,
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_drain(&ctx, &a.0, id, false).await
}

async fn pools(_: Admin, State(ctx): State<Ctx>) -> Result<Json<Vec<PoolView>>, ApiError> {
    Ok(Json(pool_views(&ctx.store.hosts().await?)))
}

async fn list_sessions(
    _: Admin,
    State(ctx): State<Ctx>,
    query: Result<Query<SessionFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(f) = query.map_err(|e| {
        let detail = clip(&e.body_text(), DETAIL_MAX_CHARS).into_owned();
        ApiError(StatusCode::BAD_REQUEST, "bad_query", detail)
    })?;
    let state = f
        .state
        .map(|s| s.parse::<SessionState>())
        .transpose()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_state", e))?;
    let limit = f.limit.unwrap_or(DEFAULT_LIST);
    if limit == 0 || limit > MAX_LIST {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            format!("limit must be 1 to {MAX_LIST}"),
        ));
    }
    let now = now_ms();
    let list = ctx.store.sessions(state).await?;
    let total = list.len();
    let page: Vec<SessionView> = list
        .into_iter()
        .skip(f.offset.unwrap_or(0))
        .take(limit)
        .map(|s| SessionView::of(s, now))
        .collect();
    Ok(([("x-total-count", total.to_string())], Json(page)).into_response())
}

fn session_id(id: String) -> Result<SessionId, ApiError> {
    SessionId::new(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_id", e.to_string()))
}

async fn session(
    _: Admin,
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let id = session_id(id)?;
    match ctx.store.session(&id).await? {
        Some(s) => Ok(Json(SessionView::of(s, now_ms()))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "unknown_session",
            format!("no session {id}"),
        )),
    }
}

async fn end_session(
    a: Admin,
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let id = session_id(id)?;
    let Some(s) = ctx.store.session(&id).await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "unknown_session",
            format!("no session {id}"),
        ));
    };
    tracing::info!(session_id = %id, admin = a.0, "admin ends session");
    match sessions::end(&ctx, &id, "admin", serde_json::Value::Null).await? {
        Some(s) => Ok(Json(SessionView::of(s, now_ms()))),
        None => Err(ApiError(
            StatusCode::CONFLICT,
            "not_live",
            format!("session {id} is already {}", s.state.as_str()),
        )),
    }
}

/// `{"host": "h2"}`: where to move the session (optional: the best host otherwise).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    #[serde(default)]
    host: Option<String>,
}

/// Moves a live session to another host and waits (up to the migration timeout) for the
/// outcome: 200 with the session where it now runs, 409 if it cannot start, 502 if it failed
/// (the session plays on where it was).
async fn migrate_session(
    a: Admin,
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<SessionView>, ApiError> {
    let id = session_id(id)?;
    let body: MigrateBody = if body.is_empty() {
        MigrateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            let detail = clip(&e.to_string(), DETAIL_MAX_CHARS).into_owned();
            ApiError(StatusCode::BAD_REQUEST, "bad_request", detail)
        })?
    };
    let to = body.host.map(host_id).transpose()?;
    tracing::info!(session_id = %id, admin = a.0, to = ?to, "admin moves session");
    let (from, target) = crate::migration::start(&ctx, &id, to.as_ref())
        .await
        .map_err(|e| {
            let status = match e {
                crate::migration::MigrateError::Unknown(_) => StatusCode::NOT_FOUND,
                crate::migration::MigrateError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::CONFLICT,
            };
            ApiError(status, e.code(), e.to_string())
        })?;
    let Some(s) = crate::migration::settled(&ctx, &id).await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "unknown_session",
            format!("session {id} is gone"),
        ));
    };
    if s.host.as_ref() == Some(&target) {
        return Ok(Json(SessionView::of(s, now_ms())));
    }
    let why = s.history.last().map(|t| t.note.clone()).unwrap_or_default();
    Err(ApiError(
        StatusCode::BAD_GATEWAY,
        "migration_failed",
        format!("session {id} stays on {from}: {why}"),
    ))
}

async fn queues(_: Admin, State(ctx): State<Ctx>) -> Result<Json<Vec<QueueView>>, ApiError> {
    let now = now_ms();
    let mut out = Vec::new();
    for pool in ctx.store.pools().await? {
        let tickets = ctx.store.tickets(&pool).await?;
        out.push(QueueView {
            depth: tickets.len() as u64,
            oldest_wait_ms: tickets
                .first()
                .map_or(0, |t| now.saturating_sub(t.enqueued_ms)),
            tickets: tickets
                .into_iter()
                .map(|t| QueuedTicket {
                    ticket: t.id,
                    player: t.player,
                    party: t.party.map(|p| p.id),
                    skill: t.skill,
                    waited_ms: now.saturating_sub(t.enqueued_ms),
                    away: t.away_since_ms.is_some(),
                })
                .collect(),
            mode: pool.mode,
            region: pool.region,
        });
    }
    Ok(Json(out))
}
