//! Wiring: the router (`app`), and a running server (`Server::start`) with its background
//! tasks — the event dispatcher, the matchmaker, the sweeper and the dashboard's hub — stopped
//! on shutdown.

use crate::auth::{Auth, Role};
use crate::config::ServerConfig;
use crate::domain::Core;
use crate::model::{HostState, SessionState};
use crate::modes::Modes;
use crate::state::{lock, Ctx, Shared};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::Store;
use crate::wire::close;
use crate::{admin, dashboard, dispatch, hosts, matchmaker, play, regions, sessions, web};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_net::tls::Acceptor;
use berth_protocol::play::ServerMessage;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// The OpenAPI description of the HTTP API, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// How often the sweeper enforces deadlines.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// How long a stopping replica waits for its sockets' close frames.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

pub fn app(ctx: Ctx) -> Router {
    Router::new()
        .route("/v1/play", get(play::handler))
        .route("/v1/hosts", get(hosts::handler))
        .route("/v1/regions", get(regions::handler))
        .route("/v1/dev/token", post(dev_token))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(admin::router())
        .merge(dashboard::router())
        .merge(web::router())
        .with_state(ctx)
}

/// Opens the configured store.
pub async fn open_store(config: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    let retention_ms = config.store.ended_retention_s.saturating_mul(1000);
    if config.store.redis.is_empty() {
        let store = MemoryStore::new().with_ended_retention(retention_ms);
        return Ok(Arc::new(store));
    }
    let prefix = config
        .store
        .prefix
        .clone()
        .unwrap_or_else(|| "berth".into());
    let store = RedisStore::connect(&config.store.redis, &prefix)
        .await
        .map_err(|e| anyhow::anyhow!("store.redis {}: {e}", config.store.redis))?;
    Ok(Arc::new(store.with_ended_retention(retention_ms)))
}

/// A server running in this process: its address, context and tasks.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    pub ctx: Ctx,
    tasks: Vec<JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Validates `config`, opens the store, binds, and starts every task.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        let store = open_store(&config).await?;
        Self::start_with(config, store).await
    }

    /// As [`Server::start`], on a store the caller opened (replicas in one test share one).
    pub async fn start_with(
        mut config: ServerConfig,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Server> {
        config.validate()?;
        let tls = config.tls_acceptor()?;
        if config.replica.is_empty() {
            config.replica = format!("r-{}", &crate::util::random_id()[..12]);
        }
        let modes = Modes::load(&config.modes_dir)?;
        let auth = Auth::new(&config.auth)?;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let (matcher_tx, matcher_rx) = tokio::sync::mpsc::unbounded_channel();
        let core = Arc::new(Core::new(config, store, modes));
        let ctx: Ctx = Arc::new(Shared {
            core: core.clone(),
            auth,
            registry: Default::default(),
            matcher: matcher_tx,
            dashboard: Default::default(),
            stopping: Default::default(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = app(ctx.clone());
        let limits = listen_limits(&ctx.core, tls);
        let tasks = vec![
            tokio::spawn(dispatch::run(ctx.clone())),
            tokio::spawn(matchmaker::run(core.clone(), matcher_rx)),
            tokio::spawn(sessions::run_sweeper(core, SWEEP_EVERY)),
            tokio::spawn(dashboard::run(ctx.clone())),
            tokio::spawn(berth_net::serve(listener, router, limits, async move {
                let _ = stopped.await;
            })),
        ];
        tracing::info!(%addr, tls = ctx.config.tls.is_some(), replica = ctx.replica, store = ctx.store.kind(), modes = ctx.modes.0.len(), "server listening");
        Ok(Server {
            addr,
            ctx,
            tasks,
            stop: Some(stop),
        })
    }

    /// The first step of stopping: `/readyz` answers 503 `shutting_down` and new player and
    /// host sockets are refused (503 `shutting_down`); live ones are served on until
    /// [`Server::shutdown`].
    pub fn begin_shutdown(&self) {
        if !self
            .ctx
            .stopping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::info!("stopping: not ready, refusing new sockets");
        }
    }

    /// Closes every socket (players are told to reconnect, hosts fail over to another
    /// replica), waits up to [`CLOSE_WAIT`] for their close frames, stops the tasks. State
    /// stays in the store: with Redis, another replica carries on.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        // Dashboard feeds end with `bye` (the page reconnects by itself).
        self.ctx.dashboard.close("shutting_down");
        let players: Vec<_> = lock(&self.ctx.registry.players).values().cloned().collect();
        for p in players {
            p.close(close::GOING_AWAY, "shutting_down");
        }
        let hosts: Vec<_> = lock(&self.ctx.registry.hosts).values().cloned().collect();
        for h in hosts {
            h.close(close::GOING_AWAY, "shutting_down");
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The connection tasks send their close frames and leave the registry.
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        while tokio::time::Instant::now() < deadline {
            let open =
                lock(&self.ctx.registry.players).len() + lock(&self.ctx.registry.hosts).len();
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// The listener's limits: the header-read timeout, seats for connections not yet past
/// `hello` or `register` (released there; see `berth_net::serve`), TLS if configured;
/// refusals (and failed TLS handshakes) are counted by code.
fn listen_limits(core: &Arc<Core>, tls: Option<Acceptor>) -> berth_net::Limits {
    let counted = core.clone();
    berth_net::Limits {
        header_read_timeout: Duration::from_millis(core.config.timeouts.header_read_ms),
        max_seats: core.config.limits.max_pending,
        refusal_code: "too_many_connections",
        refusal_message: "too many connections waiting to sign in; retry later",
        on_refusal: Arc::new(move |code| counted.metrics.refuse(code)),
        tls,
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn readyz(State(ctx): State<Ctx>) -> Response {
    if ctx.is_stopping() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting_down").into_response();
    }
    match ctx.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store: {}", e.code()),
        )
            .into_response(),
    }
}

#[derive(Debug, serde::Deserialize)]
struct TokenRequest {
    player: String,
    /// `player` (the default) or `admin` (for the dashboard's sign-in).
    #[serde(default)]
    role: Option<String>,
}

/// Development only (`auth.dev_tokens`): a player token for any name, or an admin token.
async fn dev_token(
    State(ctx): State<Ctx>,
    body: Result<Json<TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let refuse = |status: StatusCode, code: &str, message: String| {
        (status, Json(ServerMessage::error(code, message))).into_response()
    };
    if !ctx.auth.dev_tokens {
        return refuse(
            StatusCode::NOT_FOUND,
            "dev_tokens_disabled",
            "this server does not mint tokens".into(),
        );
    }
    let Ok(Json(req)) = body else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "send {\"player\": \"name\"}".into(),
        );
    };
    if let Err(e) = berth_protocol::PlayerId::new(req.player.clone()) {
        return refuse(StatusCode::BAD_REQUEST, "bad_player", e.to_string());
    }
    let role = match req.role.as_deref() {
        None | Some("player") => Role::Player,
        Some("admin") => Role::Admin,
        Some(other) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_role",
                format!(
                    "role {}: dev tokens are for `player` or `admin`",
                    berth_protocol::echo(other)
                ),
            )
        }
    };
    if role == Role::Admin {
        tracing::warn!(
            admin = req.player,
            "development mode: minted an admin token"
        );
    }
    match ctx.auth.mint(&req.player, role, 24 * 3600) {
        Ok(token) => Json(serde_json::json!({
            "player": req.player,
            "token": token,
            "role": role.as_str(),
        }))
        .into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.code(), e.to_string()),
    }
}

/// Prometheus text; gauges that describe shared state are read from the store here.
async fn metrics(State(ctx): State<Ctx>) -> Response {
    let m = &ctx.metrics;
    // Live states only (ended sessions are counted by `sessions_ended_total`).
    if let Ok(live) = sessions::live_sessions(&ctx).await {
        for st in SessionState::ALL.into_iter().filter(|s| s.is_live()) {
            let n = live.iter().filter(|s| s.state == st).count();
            m.sessions
                .get_or_create(&vec![("state", st.as_str().to_owned())])
                .set(n as i64);
        }
    }
    if let Ok(hosts) = ctx.store.hosts().await {
        for st in [HostState::Up, HostState::Disconnected, HostState::Lost] {
            let n = hosts.iter().filter(|h| h.state == st).count();
            let label = serde_json::to_value(st)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            m.hosts.get_or_create(&vec![("state", label)]).set(n as i64);
        }
        for h in &hosts {
            for i in &h.images {
                for (kind, v) in [("warm", i.warm), ("running", i.running), ("max", h.max_vms)] {
                    m.host_capacity
                        .get_or_create(&vec![
                            ("host", h.id.to_string()),
                            ("image", i.name.clone()),
                            ("kind", kind.to_owned()),
                        ])
                        .set(v as i64);
                }
            }
        }
    }
    if let Ok(pools) = ctx.store.pools().await {
        for p in pools {
            if let Ok(t) = ctx.store.tickets(&p).await {
                m.queue_depth
                    .get_or_create(&vec![
                        ("mode", p.mode.clone()),
                        ("region", p.region.clone()),
                    ])
                    .set(t.len() as i64);
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}
