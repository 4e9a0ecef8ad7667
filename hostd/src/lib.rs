//! `berth-hostd`: everything one host does for Berth.
//!
//! - [`config`]: the TOML config, validated into runtime types at start-up.
//! - [`image`]: guest images (`manifest.json` written by `cargo xtask image`).
//! - [`substrate`]: the versioned header of a docked substrate and its checks.
//! - [`driver`]: the [`driver::VmDriver`] trait and its backends — [`driver::qemu`] (real, the
//!   default) and `driver::xen` (behind the `xen` feature).
//! - [`accel`]: which accelerator QEMU may use here (KVM only when a guest really boots on it).
//! - [`pool`]: per host, per image: the docked substrate, warm clones, running VMs; activation
//!   by session id (idempotent), destroy, health, refill, adoption after a restart.
//! - [`control`]: the operator's HTTP surface and its client (`berth-hostd status` etc.).
//! - [`token`]: this host's credential towards the server, read again on every connect.
//! - [`link`]: the one websocket to the matchmaking server: register, heartbeats, activate and
//!   destroy on the server's behalf, pool events upstream, reconnect and reconcile.
//! - [`selftest`]: `berth-hostd selftest`, prime → activate → destroy on this host with its
//!   configured driver, checking every game answers as its own session and nothing is left.
//! - [`gateway`]: the players' websocket: ticket check with the session's own key, then frames
//!   proxied to and from the game server in the session's VM.

pub mod accel;
pub mod config;
pub mod control;
pub mod driver;
pub mod gateway;
pub mod image;
pub mod link;
pub mod pool;
pub mod selftest;
pub mod substrate;
pub mod token;
pub mod util;

pub use config::HostdConfig;
pub use pool::Pool;

use std::future::IntoFuture;
use std::sync::Arc;

/// Builds the configured driver: Xen (`driver = "xen"`), or QEMU with the accelerator this
/// host can run (see [`accel`]).
pub async fn driver_for(config: &HostdConfig) -> anyhow::Result<Arc<dyn driver::VmDriver>> {
    if config.driver == config::DriverChoice::Xen {
        return xen_driver().await;
    }
    let first = config
        .images
        .first()
        .map(|ic| image::Image::load(&ic.dir).map(|img| (img, ic.clone())))
        .transpose()?;
    let accel = accel::choose(
        config.accel,
        &config.qemu,
        first.as_ref().map(|(i, c)| (i, c)),
        &config.state_dir,
        std::time::Duration::from_secs(20),
    )
    .await;
    let driver = driver::qemu::QemuDriver::new(config.qemu.clone(), accel).await?;
    tracing::info!(
        accel = accel.as_str(),
        qemu = driver.version(),
        "driver ready"
    );
    Ok(Arc::new(driver))
}

#[cfg(feature = "xen")]
async fn xen_driver() -> anyhow::Result<Arc<dyn driver::VmDriver>> {
    let driver = driver::xen::XenDriver::new().await?;
    tracing::info!(xen = driver.version(), "driver ready");
    Ok(Arc::new(driver))
}

#[cfg(not(feature = "xen"))]
async fn xen_driver() -> anyhow::Result<Arc<dyn driver::VmDriver>> {
    anyhow::bail!(
        "config: driver: \"xen\" needs a berth-hostd built with the `xen` cargo feature \
         (cargo build -p berth-hostd --features xen)"
    )
}

/// Runs hostd until `shutdown` resolves: pool, gateway, control API and, with a `[server]`
/// table, the link to the server; then closes the link and the players' connections and
/// destroys what it owns.
pub async fn run(
    config: HostdConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Before anything boots: a bad `[server]` table or an unreadable token fails start-up.
    let server = config.server_link()?;
    let driver = driver_for(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.control).await?;
    tracing::info!(control = %listener.local_addr()?, "control API listening");
    let gateway_listener = tokio::net::TcpListener::bind(config.gateway.listen)
        .await
        .map_err(|source| gateway::GatewayError::Bind {
            addr: config.gateway.listen,
            source,
        })?;
    let pool = Pool::start(config, driver).await?;
    let gateway = match gateway::serve(pool.clone(), gateway_listener) {
        Ok(gateway) => gateway,
        Err(e) => {
            pool.shutdown().await;
            return Err(e.into());
        }
    };
    let (stop, _) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let link = server
        .map(|server| tokio::spawn(link::run(pool.clone(), server, stopped(stop.subscribe()))));
    let control = control::router(pool.clone(), Some(gateway.meter()));
    let serve = axum::serve(listener, control)
        .with_graceful_shutdown(stopped(stop.subscribe()))
        .into_future();
    tokio::pin!(serve);
    let served = tokio::select! {
        served = &mut serve => served,
        () = shutdown => {
            stop.send_replace(true);
            serve.await
        }
    };
    stop.send_replace(true);
    if let Some(link) = link {
        if let Err(e) = link.await {
            tracing::error!(error = %e, "the server link task failed");
        }
    }
    tracing::info!("shutting down: closing players' connections, destroying VMs");
    gateway.shutdown().await;
    pool.shutdown().await;
    Ok(served?)
}
