//! The admin API (`/v1/admin/*`, admin-role JWT): hosts, pools, sessions, queues; end a
//! session, drain or undrain a host. Described in `docs/openapi.json`, which a test keeps in
//! step with [`routes`].

use crate::auth::{Claims, Role};
use crate::model::{HostRecord, HostState, SessionState, Transition};
use crate::sessions;
use crate::state::Ctx;
use crate::util::now_ms;
use crate::wire;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use berth_protocol::host::ImageCapacity;
use berth_protocol::{HostId, PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An error answer: `{"code": …, "message": …}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub &'static str, pub String);

pub use berth_protocol::api::ErrorBody;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody::new(self.1, self.2))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "admin: store");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            e.code(),
            "state store unavailable".into(),
        )
    }
}

/// An authenticated operator (admin-role bearer token).
#[derive(Debug)]
pub struct Admin(pub String);

impl FromRequestParts<Ctx> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, ApiError> {
        verify_admin(ctx, &parts.headers).map(|c| Admin(c.sub))
    }
}

/// Checks the request's admin-role bearer token: 401 without a valid token, 403 with another
/// role's. The claims tell how long the token is good for (the event feed ends there).
pub fn verify_admin(ctx: &Ctx, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let token = wire::bearer(headers).unwrap_or_default();
    ctx.auth.verify(&token, Role::Admin).map_err(|e| {
        ctx.metrics.refuse(e.code());
        let status = if e.code() == "wrong_role" {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        ApiError(status, e.code(), e.to_string())
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    pub id: HostId,
    /// `up`, `disconnected`, `lost`.
    pub state: HostState,
    pub draining: bool,
    pub accel: String,
    pub driver: String,
    pub gateway: String,
    pub max_vms: u32,
    pub running: u32,
    pub images: Vec<ImageCapacity>,
    pub replica: String,
    pub connected_ms: u64,
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolView {
    pub image: String,
    /// Hosts up and not draining that offer the image.
    pub hosts: u32,
    pub docked_hosts: u32,
    pub warm: u32,
    pub running: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SessionView {
    pub id: SessionId,
    pub state: SessionState,
    pub mode: String,
    pub region: String,
    pub image: String,
    pub host: Option<HostId>,
    pub vm: Option<VmId>,
    pub endpoint: Option<String>,
    pub players: Vec<PlayerId>,
    pub teams: Vec<Vec<PlayerId>>,
    pub created_ms: u64,
    pub age_ms: u64,
    pub deadline_ms: u64,
    pub ends_by_ms: u64,
    pub match_ms: u64,
    pub end_reason: Option<String>,
    pub results: serde_json::Value,
    pub history: Vec<Transition>,
}

impl SessionView {
    fn of(s: crate::model::Session, now: u64) -> Self {
        SessionView {
            age_ms: now.saturating_sub(s.created_ms),
            id: s.id,
            state: s.state,
            mode: s.pool.mode,
            region: s.pool.region,
            image: s.image,
            host: s.host,
            vm: s.vm,
            endpoint: s.endpoint,
            players: s.players,
            teams: s.teams,
            created_ms: s.created_ms,
            deadline_ms: s.deadline_ms,
            ends_by_ms: s.ends_by_ms,
            match_ms: s.match_ms,
            end_reason: s.end_reason,
            results: s.results,
            history: s.history,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueuedTicket {
    pub ticket: String,
    pub player: PlayerId,
    pub party: Option<String>,
    pub skill: f64,
    pub waited_ms: u64,
    pub away: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueueView {
    pub mode: String,
    pub region: String,
    pub depth: u64,
    pub oldest_wait_ms: u64,
    pub tickets: Vec<QueuedTicket>,
}

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
        (Method::GET, "/v1/admin/queues", get(queues)),
    ]
}

pub fn router() -> Router<Ctx> {
    routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, h)| r.route(path, h))
}

impl From<HostRecord> for HostView {
    fn from(h: HostRecord) -> Self {
        HostView {
            running: h.running(),
            id: h.id,
            state: h.state,
            draining: h.draining,
            accel: h.accel,
            driver: h.driver,
            gateway: h.gateway,
            max_vms: h.max_vms,
            images: h.images,
            replica: h.replica,
            connected_ms: h.connected_ms,
            last_seen_ms: h.last_seen_ms,
        }
    }
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

/// Capacity per image across `hosts`, by image name.
pub fn pool_views(hosts: &[HostRecord]) -> Vec<PoolView> {
    let mut by: BTreeMap<String, PoolView> = BTreeMap::new();
    for h in hosts {
        for i in &h.images {
            let p = by.entry(i.name.clone()).or_insert_with(|| PoolView {
                image: i.name.clone(),
                hosts: 0,
                docked_hosts: 0,
                warm: 0,
                running: 0,
            });
            p.running += i.running;
            if h.state == HostState::Up && !h.draining {
                p.hosts += 1;
                p.docked_hosts += i.docked as u32;
                p.warm += i.warm;
            }
        }
    }
    by.into_values().collect()
}

async fn list_sessions(
    _: Admin,
    State(ctx): State<Ctx>,
    query: Result<Query<SessionFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(f) =
        query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
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
