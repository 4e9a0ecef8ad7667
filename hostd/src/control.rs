//! The operator's HTTP surface (loopback by default) and the client the CLI uses.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/status` | | [`Status`] |
//! | POST | `/v1/activate` | [`ActivateRequest`] | [`VmInfo`] (same session id → same VM) |
//! | DELETE | `/v1/vms/{id}` | | 204; `id` is a VM id or a session id |
//! | GET | `/v1/vms/{id}/output?bytes=N` | | the VM's console, its last N bytes (text) |
//! | GET | `/v1/gateway` | | [`GatewayStats`] (404 `no_gateway` when none runs) |
//!
//! Errors are `{"code": "...", "message": "..."}` with a stable code and a 4xx/5xx status.

use crate::gateway::{GatewayStats, Meter};
use crate::metrics::Metrics;
use crate::pool::{ActivateRequest, Pool, PoolError, Status, VmInfo};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

/// An error answer: the one body of Berth's HTTP APIs.
pub use berth_protocol::api::ErrorBody as ApiError;

struct Failure(StatusCode, ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        let status = match e {
            PoolError::UnknownImage { .. } | PoolError::Unknown { .. } => StatusCode::NOT_FOUND,
            PoolError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            PoolError::AtCapacity { .. }
            | PoolError::NotDocked { .. }
            | PoolError::ShuttingDown
            | PoolError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            PoolError::Driver { .. } => StatusCode::BAD_GATEWAY,
        };
        Failure(
            status,
            ApiError {
                code: e.code(),
                message: e.to_string(),
            },
        )
    }
}

/// The router without a gateway, separate from any socket so tests can drive it directly.
pub fn app(pool: Pool) -> Router {
    router(pool, None)
}

/// The router; `gateway` serves `/v1/gateway`.
pub fn router(pool: Pool, gateway: Option<Meter>) -> Router {
    let metrics = Metrics::new(pool.clone(), gateway.clone());
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/activate", post(activate))
        .route("/v1/vms/{id}", delete(destroy))
        .route("/v1/vms/{id}/output", get(output))
        .route("/v1/gateway", get(gateway_stats))
        .with_state(Ctx {
            pool,
            gateway,
            metrics,
        })
}

#[derive(Clone)]
struct Ctx {
    pool: Pool,
    gateway: Option<Meter>,
    metrics: Metrics,
}

async fn metrics_text(State(ctx): State<Ctx>) -> Response {
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], ctx.metrics.render()).into_response()
}

/// Ready to take sessions: not draining, and at least one image's substrate docked.
async fn readyz(State(Ctx { pool, .. }): State<Ctx>) -> Response {
    let status = pool.status();
    let docked = status
        .images
        .iter()
        .any(|i| i.substrate == berth_protocol::SubstrateState::Docked);
    match (status.draining, docked) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response(),
        (false, false) => {
            (StatusCode::SERVICE_UNAVAILABLE, "no substrate docked yet").into_response()
        }
        (false, true) => (StatusCode::OK, "ready").into_response(),
    }
}

async fn status(State(Ctx { pool, .. }): State<Ctx>) -> Json<Status> {
    Json(pool.status())
}

async fn gateway_stats(State(ctx): State<Ctx>) -> Result<Json<GatewayStats>, Failure> {
    let gateway = ctx.gateway.ok_or_else(|| {
        Failure(
            StatusCode::NOT_FOUND,
            ApiError {
                code: "no_gateway".into(),
                message: "no gateway runs in this process".into(),
            },
        )
    })?;
    Ok(Json(gateway.stats()))
}

async fn activate(
    State(Ctx { pool, .. }): State<Ctx>,
    body: Result<Json<ActivateRequest>, JsonRejection>,
) -> Result<Json<VmInfo>, Failure> {
    let Json(req) = body.map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            ApiError {
                code: "bad_request".into(),
                message: e.body_text(),
            },
        )
    })?;
    Ok(Json(pool.activate(req).await?))
}

async fn destroy(
    State(Ctx { pool, .. }): State<Ctx>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    pool.destroy(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The most of a VM's console `GET /v1/vms/{id}/output` returns at once.
pub const MAX_OUTPUT_BYTES: u64 = 1 << 20;

#[derive(Debug, serde::Deserialize)]
struct OutputQuery {
    bytes: Option<u64>,
}

/// `GET /v1/vms/{id}/output?bytes=N`: the last N bytes (64 KiB by default, at most
/// [`MAX_OUTPUT_BYTES`]) of the VM's console: the guest kernel's, the agent's and the game
/// server's output.
async fn output(
    State(Ctx { pool, .. }): State<Ctx>,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Failure> {
    let bytes = match query {
        Ok(q) => q.bytes.unwrap_or(64 << 10),
        Err(e) => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                ApiError {
                    code: "bad_request".into(),
                    message: e.body_text(),
                },
            ))
        }
    };
    let text = pool.output(&id, bytes.min(MAX_OUTPUT_BYTES))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The CLI's client for a running hostd.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach hostd at {base}: {source}")]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{}: {}", .0.code, .0.message)]
    Api(ApiError),
    #[error("hostd answered something unexpected: {0}")]
    Unexpected(String),
}

impl Client {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// `http://ADDR` of the control API.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn answer<T: serde::de::DeserializeOwned>(
        &self,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Option<T>, ClientError> {
        let bytes = self.body(resp).await?;
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClientError::Unexpected(e.to_string()))
    }

    /// The answer's body; a refusal as [`ClientError::Api`].
    async fn body(
        &self,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Vec<u8>, ClientError> {
        let resp = resp.map_err(|source| ClientError::Unreachable {
            base: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => ClientError::Api(e),
                Err(_) => ClientError::Unexpected(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes)
                )),
            });
        }
        Ok(bytes.to_vec())
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        let r = self
            .http
            .get(format!("{}/v1/status", self.base))
            .send()
            .await;
        self.answer(r)
            .await?
            .ok_or_else(|| ClientError::Unexpected("empty status".into()))
    }

    pub async fn activate(&self, req: &ActivateRequest) -> Result<VmInfo, ClientError> {
        let r = self
            .http
            .post(format!("{}/v1/activate", self.base))
            .json(req)
            .send()
            .await;
        self.answer(r)
            .await?
            .ok_or_else(|| ClientError::Unexpected("empty answer".into()))
    }

    pub async fn gateway(&self) -> Result<GatewayStats, ClientError> {
        let r = self
            .http
            .get(format!("{}/v1/gateway", self.base))
            .send()
            .await;
        self.answer(r)
            .await?
            .ok_or_else(|| ClientError::Unexpected("empty gateway stats".into()))
    }

    /// The last `bytes` of a VM's console.
    pub async fn output(&self, id: &str, bytes: u64) -> Result<String, ClientError> {
        let url = format!("{}/v1/vms/{id}/output?bytes={bytes}", self.base);
        let body = self.body(self.http.get(url).send().await).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn destroy(&self, id: &str) -> Result<(), ClientError> {
        let r = self
            .http
            .delete(format!("{}/v1/vms/{id}", self.base))
            .send()
            .await;
        self.answer::<serde_json::Value>(r).await.map(|_| ())
    }
}
