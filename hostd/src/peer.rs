//! The peer listener (`[peer] listen`): what this host serves to other hosts, not to players
//! or operators. Today one route, the substrate stream of [`crate::ship`]:
//!
//! | method | path | auth | answer |
//! |---|---|---|---|
//! | GET | `/v1/substrates/{image}` | `Bearer <grant>` (from `share_substrate`) | the stream |
//!
//! Refusals are `{"code","message"}`: 401 `grant_required` / `unknown_grant`, 403
//! `grant_used` / `grant_expired` / `grant_mismatch`, 404 `no_substrate`, 500 `substrate_io`.
//! Host-to-host work that comes later (live migration) gets its routes here, behind the same
//! kind of one-time grant.

use crate::pool::Pool;
use crate::ship::{self, PeerError};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use berth_protocol::api::ErrorBody;

/// Stream chunks queued between the file reader and the socket (each at most 1 MiB).
const QUEUE: usize = 4;

/// Serves the peer router on `listener` until `stop` resolves (requests in flight finish).
pub fn serve(
    listener: tokio::net::TcpListener,
    pool: Pool,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    use std::future::IntoFuture;
    let serve = axum::serve(listener, router(pool))
        .with_graceful_shutdown(stop)
        .into_future();
    tokio::spawn(serve)
}

/// The peer router, separate from any socket so tests can drive it directly.
pub fn router(pool: Pool) -> Router {
    Router::new()
        .route("/v1/substrates/{image}", get(substrate))
        .with_state(pool)
}

impl IntoResponse for PeerError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::FORBIDDEN);
        (status, Json(ErrorBody::new(self.code(), self.to_string()))).into_response()
    }
}

async fn substrate(
    State(pool): State<Pool>,
    Path(image): Path<String>,
    headers: HeaderMap,
) -> Result<Response, PeerError> {
    let grant = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(PeerError::GrantRequired)?;
    let refused = |e: PeerError| {
        tracing::warn!(image, code = e.code(), "refused a substrate fetch");
        e
    };
    pool.ship().redeem(grant, &image).map_err(refused)?;
    let substrate = pool
        .docked(&image)
        .ok_or_else(|| refused(PeerError::NoSubstrate(image.clone())))?;
    let files = ship::shipped_files(&substrate).map_err(|e| {
        tracing::error!(image, error = %e, "opening the substrate to ship it");
        PeerError::Io
    })?;
    tracing::info!(image, "shipping the substrate to a peer");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(QUEUE);
    tokio::task::spawn_blocking(move || ship::encode(files, &tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeerConfig;
    use crate::pool::tests::{test_config, TestDriver};
    use crate::pool::PoolEvent;
    use crate::ship::Offer;
    use std::sync::Arc;
    use std::time::Duration;

    /// A docked pool on the test driver serving its substrates on a loopback port.
    struct Source {
        pool: Pool,
        url: String,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        _dir: tempfile::TempDir,
    }

    impl Source {
        async fn start() -> Source {
            let (config, dir) = test_config(0, 4);
            let pool = Pool::start(config, Arc::new(TestDriver::default()))
                .await
                .expect("pool");
            pool.wait_ready("arena", 0, Duration::from_secs(5))
                .await
                .expect("docked");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            serve(listener, pool.clone(), async {
                let _ = stopped.await;
            });
            Source {
                pool,
                url,
                stop: Some(stop),
                _dir: dir,
            }
        }

        async fn get(&self, image: &str, grant: Option<&str>) -> (u16, String) {
            let mut req = reqwest::Client::new().get(format!("{}/v1/substrates/{image}", self.url));
            if let Some(grant) = grant {
                req = req.bearer_auth(grant);
            }
            let resp = req.send().await.expect("answers");
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            (status, body["code"].as_str().unwrap_or_default().to_owned())
        }

        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            self.pool.shutdown().await;
        }
    }

    #[tokio::test]
    async fn a_fetch_needs_a_live_grant_for_that_image_and_uses_it_up() {
        let source = Source::start().await;
        assert_eq!(
            source.get("arena", None).await,
            (401, "grant_required".into())
        );
        assert_eq!(
            source.get("arena", Some("guessed")).await,
            (401, "unknown_grant".into())
        );
        let ship = source.pool.ship();
        ship.grant("nope".into(), "g-nope".into(), Duration::from_secs(30));
        assert_eq!(
            source.get("nope", Some("g-nope")).await,
            (404, "no_substrate".into())
        );
        ship.grant("other".into(), "g-other".into(), Duration::from_secs(30));
        assert_eq!(
            source.get("arena", Some("g-other")).await,
            (403, "grant_mismatch".into())
        );

        ship.grant("arena".into(), "g1".into(), Duration::from_secs(30));
        let expected = source
            .pool
            .docked("arena")
            .expect("docked")
            .header
            .fingerprint;
        let into = tempfile::tempdir().expect("tmp");
        let timeout = Duration::from_secs(10);
        let bytes = ship::fetch(&source.url, "g1", "arena", &expected, into.path(), timeout)
            .await
            .expect("fetched");
        assert!(bytes > 4096, "{bytes}");
        crate::substrate::Substrate::open(into.path(), &expected).expect("opens");
        // The same grant again: refused, at the boundary and in the client.
        assert_eq!(
            source.get("arena", Some("g1")).await,
            (403, "grant_used".into())
        );
        let again = ship::fetch(&source.url, "g1", "arena", &expected, into.path(), timeout)
            .await
            .expect_err("used up");
        assert_eq!(again.code(), "ship_refused");
        assert!(again.to_string().contains("grant_used"), "{again}");
        source.stop().await;
    }

    /// A pool with `[peer]` and no substrate, whose want is answered with `source`'s address
    /// and a fresh grant; returns it, its driver, and the first ship event it announced.
    async fn fetching(source: &Source) -> (Pool, TestDriver, PoolEvent, tempfile::TempDir) {
        let (mut config, dir) = test_config(0, 4);
        config.peer = Some(PeerConfig::at(([127, 0, 0, 1], 0).into(), None));
        let driver = TestDriver::default();
        let pool = Pool::start(config, Arc::new(driver.clone()))
            .await
            .expect("pool");
        let mut events = pool.subscribe();
        pool.ship().wanted().await;
        assert_eq!(pool.ship().take_unsent().len(), 1, "it asked");
        let grant = format!("g-{}", crate::util::random_u64());
        source
            .pool
            .ship()
            .grant("arena".into(), grant.clone(), Duration::from_secs(30));
        let offer = Offer::Fetch {
            from: source.url.clone(),
            grant,
        };
        pool.ship().answer("arena", offer);
        let event = loop {
            match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
                Ok(Ok(e @ (PoolEvent::Shipped { .. } | PoolEvent::ShipRefused { .. }))) => break e,
                Ok(Ok(_)) => {}
                other => panic!("no ship event: {other:?}"),
            }
        };
        pool.wait_ready("arena", 0, Duration::from_secs(10))
            .await
            .expect("docked");
        (pool, driver, event, dir)
    }

    #[tokio::test]
    async fn a_pool_docks_a_shipped_substrate_without_priming_and_primes_a_damaged_one() {
        let source = Source::start().await;
        let (pool, driver, event, _dir) = fetching(&source).await;
        assert!(matches!(event, PoolEvent::Shipped { .. }), "{event:?}");
        assert_eq!(driver.script().primes, 0, "nothing primed");
        let status = pool.status();
        assert_eq!(
            status.images[0].fingerprint,
            source.pool.status().images[0].fingerprint
        );
        let substrates = pool.config().state_dir.join("substrates");
        assert!(!substrates.join(".incoming-arena").exists());
        pool.shutdown().await;

        // The source's RAM file changes after docking: the asker refuses it and primes.
        let ram = source.pool.docked("arena").expect("docked").ram();
        std::fs::write(&ram, [8u8; 4096]).expect("damage");
        let (pool, driver, event, _dir) = fetching(&source).await;
        match event {
            PoolEvent::ShipRefused { code, .. } => assert_eq!(code, "substrate_damaged"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(driver.script().primes, 1, "primed instead");
        let substrates = pool.config().state_dir.join("substrates");
        assert!(
            !substrates.join(".incoming-arena").exists(),
            "temp folder gone"
        );
        pool.shutdown().await;
        source.stop().await;
    }
}
