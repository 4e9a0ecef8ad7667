//! hostd as one running thing: [`Hostd`] starts the pool, the players' gateway, the control
//! API, (with a `[peer]` table) the peer listener and (with a `[server]` table) the link to
//! the server, and stops them in order. It
//! mirrors the server's `Server::start`/`shutdown`; [`run`] is `Hostd::start` plus a wait for
//! the shutdown signal, and tests and `cargo xtask demo` hold a `Hostd` in-process.

use crate::config::{DriverChoice, HostdConfig, ServerLink};
use crate::driver::qemu::QemuDriver;
use crate::driver::VmDriver;
use crate::gateway::{self, Gateway, GatewayError};
use crate::pool::Pool;
use crate::{accel, control, image, link};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Builds the configured driver: Xen (`driver = "xen"`), or QEMU with the accelerator this
/// host can run (see [`accel`]).
pub async fn driver_for(config: &HostdConfig) -> anyhow::Result<Arc<dyn VmDriver>> {
    if config.driver == DriverChoice::Xen {
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
    let driver = QemuDriver::new(config.qemu.clone(), accel).await?;
    tracing::info!(
        accel = accel.as_str(),
        qemu = driver.version(),
        "driver ready"
    );
    Ok(Arc::new(driver))
}

#[cfg(feature = "xen")]
async fn xen_driver() -> anyhow::Result<Arc<dyn VmDriver>> {
    let driver = crate::driver::xen::XenDriver::new().await?;
    tracing::info!(xen = driver.version(), "driver ready");
    Ok(Arc::new(driver))
}

#[cfg(not(feature = "xen"))]
async fn xen_driver() -> anyhow::Result<Arc<dyn VmDriver>> {
    anyhow::bail!(
        "config: driver: \"xen\" needs a berth-hostd built with the `xen` cargo feature \
         (cargo build -p berth-hostd --features xen)"
    )
}

/// Runs hostd until `shutdown` resolves (or the control API fails): [`Hostd::start`], then
/// [`Hostd::shutdown`].
pub async fn run(
    config: HostdConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Before anything boots: a bad `[server]` table, an unreadable token or CA, or unusable
    // gateway certificate files fail start-up.
    let server = config.server_link()?;
    config.gateway_tls()?;
    let driver = driver_for(&config).await?;
    let drain = config.drain_timeout();
    let mut hostd = Hostd::start_with(config, driver, server).await?;
    tokio::select! {
        () = hostd.control_ended() => {}
        () = shutdown => hostd.drain(drain, berth_net::shutdown_signal()).await,
    }
    hostd.shutdown().await
}

/// hostd running in this process: pool, gateway, control API and the link to the server.
pub struct Hostd {
    pool: Pool,
    gateway: Gateway,
    /// Where the control API listens (the real port when configured on port 0).
    pub control_addr: SocketAddr,
    /// Turns `true` to stop the control API and the link.
    stop: watch::Sender<bool>,
    control: Option<JoinHandle<std::io::Result<()>>>,
    /// The peer listener ([`crate::peer`]), with `[peer]`.
    peer: Option<JoinHandle<std::io::Result<()>>>,
    /// The control API's end, once it ended on its own.
    served: Option<std::io::Result<()>>,
    link: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Hostd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hostd")
            .field("pool", &self.pool)
            .field("gateway", &self.gateway.addr)
            .field("control", &self.control_addr)
            .finish()
    }
}

impl Hostd {
    /// Binds the control API and the gateway, starts the pool (adoption, priming), then the
    /// gateway, the control API and, with a `[server]` table, the link.
    pub async fn start(config: HostdConfig, driver: Arc<dyn VmDriver>) -> anyhow::Result<Hostd> {
        let server = config.server_link()?;
        Self::start_with(config, driver, server).await
    }

    /// As [`Hostd::start`], with the link's settings given (`None`: no link) instead of read
    /// from the `[server]` table: in-process stacks mint the host's token themselves.
    pub async fn start_with(
        config: HostdConfig,
        driver: Arc<dyn VmDriver>,
        server: Option<ServerLink>,
    ) -> anyhow::Result<Hostd> {
        // Both ports first, so that a taken port fails start-up before any VM boots.
        let control_listener = tokio::net::TcpListener::bind(config.control).await?;
        let control_addr = control_listener.local_addr()?;
        tracing::info!(control = %control_addr, "control API listening");
        let gateway_listener = tokio::net::TcpListener::bind(config.gateway.listen)
            .await
            .map_err(|source| GatewayError::Bind {
                addr: config.gateway.listen,
                source,
            })?;
        let peer_listener =
            match &config.peer {
                Some(peer) => Some(tokio::net::TcpListener::bind(peer.listen).await.map_err(
                    |e| anyhow::anyhow!("config: peer.listen: binding {}: {e}", peer.listen),
                )?),
                None => None,
            };
        let peer_config = config.peer.clone();
        let gateway_config = config.gateway.clone();
        let gateway_tls = config.gateway_tls()?;
        let pool = Pool::start(config, driver).await?;
        let gateway =
            match gateway::serve(pool.clone(), gateway_listener, &gateway_config, gateway_tls) {
                Ok(gateway) => gateway,
                Err(e) => {
                    pool.shutdown().await;
                    return Err(e.into());
                }
            };
        let (stop, _) = watch::channel(false);
        let peer = match (peer_listener, peer_config) {
            (Some(listener), Some(config)) => {
                let url = config.url(listener.local_addr()?);
                tracing::info!(peer = %url, "peer listener serving substrates");
                pool.ship().set_url(url);
                let stop = stopped(stop.subscribe());
                Some(crate::peer::serve(listener, pool.clone(), stop))
            }
            _ => None,
        };
        let router = control::router(pool.clone(), Some(gateway.meter()));
        let serve = axum::serve(control_listener, router)
            .with_graceful_shutdown(stopped(stop.subscribe()))
            .into_future();
        let mut hostd = Hostd {
            pool,
            gateway,
            control_addr,
            stop,
            control: Some(tokio::spawn(serve)),
            peer,
            served: None,
            link: None,
        };
        if let Some(server) = server {
            hostd.connect(server);
        }
        Ok(hostd)
    }

    /// Starts the link to the server, unless one runs already (then `server` is ignored):
    /// for in-process stacks whose link advertises the gateway's address, known only once
    /// the gateway is bound.
    pub fn connect(&mut self, server: ServerLink) {
        if self.link.is_some() {
            tracing::warn!(urls = ?server.urls, "hostd is linked already; ignoring another link");
            return;
        }
        let run = link::run(self.pool.clone(), server, stopped(self.stop.subscribe()));
        self.link = Some(tokio::spawn(run));
    }

    /// The pool (cheap to clone).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The players' gateway: its address (the real port when configured on port 0), stats.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Resolves if the control API stops on its own (it failed); never otherwise.
    async fn control_ended(&mut self) {
        let Some(control) = self.control.as_mut() else {
            return std::future::pending().await;
        };
        let served = control
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        self.control = None;
        self.served = Some(served);
    }

    /// Drains: no new sessions (the server is told at once), and waits until every live VM
    /// is gone (its game ended, its report sent) or `timeout` passed or `stop_now` resolved.
    pub async fn drain(&self, timeout: Duration, stop_now: impl std::future::Future<Output = ()>) {
        let live = self.pool.status().vms.len();
        if live == 0 || timeout.is_zero() {
            return;
        }
        tracing::info!(
            live,
            timeout_s = timeout.as_secs(),
            "draining before stopping (signal again to stop now)"
        );
        self.pool.drain();
        let mut events = self.pool.subscribe();
        let done = async {
            while !self.pool.status().vms.is_empty() {
                // Any pool event may be the last VM going; a lagged receiver just looks again.
                let _ = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
            }
        };
        tokio::select! {
            () = done => tracing::info!("drained: every live session ended"),
            () = tokio::time::sleep(timeout) => {
                let left = self.pool.status().vms.len();
                tracing::warn!(left, "drain timed out: stopping with sessions still live");
            }
            () = stop_now => tracing::warn!("signalled again: stopping now"),
        }
        // The last reports reach the server before the link closes (see `link`).
    }

    /// Stops in order: the control API and the link (no new sessions), then the players'
    /// connections, then every VM (substrates too, unless `keep_substrates`). Fails with the
    /// control API's error if it had failed.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        if let Some(link) = self.link.take() {
            if let Err(e) = link.await {
                tracing::error!(error = %e, "the server link task failed");
            }
        }
        if let Some(peer) = self.peer.take() {
            match peer.await {
                Ok(Err(e)) => tracing::error!(error = %e, "the peer listener failed"),
                Err(e) => tracing::error!(error = %e, "the peer listener task failed"),
                Ok(Ok(())) => {}
            }
        }
        if let Some(control) = self.control.take() {
            self.served = Some(
                control
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            );
        }
        tracing::info!("shutting down: closing players' connections, destroying VMs");
        self.gateway.shutdown().await;
        self.pool.shutdown().await;
        Ok(self.served.take().unwrap_or(Ok(()))?)
    }
}

/// Resolves once `stop` turns `true` (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::tests::ServerDouble;
    use crate::pool::tests::{test_config, TestDriver};
    use crate::token::Token;
    use berth_protocol::host::HostMessage;
    use berth_protocol::HostId;
    use futures_util::StreamExt;
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::Message;

    #[tokio::test]
    async fn a_link_connected_later_advertises_the_bound_gateway_and_closes_first() {
        let mut server = ServerDouble::start(0).await;
        let (mut config, _dir) = test_config(0, 4);
        config.control = SocketAddr::from(([127, 0, 0, 1], 0));
        config.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let driver = TestDriver::default();
        let mut hostd = Hostd::start(config, Arc::new(driver.clone()))
            .await
            .expect("starts");
        let gateway = format!("ws://{}/v1/game", hostd.gateway().addr);
        let link = ServerLink {
            urls: vec![server.url.clone()],
            host: HostId::new("h1").expect("valid"),
            token: Token::Inline("tok.en.1".into()),
            gateway: gateway.clone(),
            reconnect_max: Duration::from_secs(1),
            trust: Default::default(),
        };
        hostd.connect(link.clone());
        hostd.connect(link);
        let mut conn = server.next().await;
        assert_eq!(conn.auth.as_deref(), Some("Bearer tok.en.1"));
        match conn.welcome(60_000).await {
            HostMessage::Register { gateway: g, .. } => assert_eq!(g, gateway),
            other => panic!("expected register, got {other:?}"),
        }
        let stopping = tokio::spawn(hostd.shutdown());
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(5), conn.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => break frame,
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(
            close.expect("a reason").reason.as_str(),
            "hostd shutting down"
        );
        stopping.await.expect("no panic").expect("a clean stop");
        assert!(driver.script().live.is_empty());
    }

    #[tokio::test]
    async fn starts_on_port_0_serves_control_and_stops_in_order() {
        let (mut config, _dir) = test_config(1, 4);
        config.control = SocketAddr::from(([127, 0, 0, 1], 0));
        config.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let state_dir = config.state_dir.clone();
        let driver = TestDriver::default();
        let hostd = Hostd::start(config, Arc::new(driver.clone()))
            .await
            .expect("starts");
        assert_ne!(hostd.control_addr.port(), 0);
        assert_ne!(hostd.gateway().addr.port(), 0);
        hostd
            .pool()
            .wait_ready("arena", 1, Duration::from_secs(10))
            .await
            .expect("a warm clone");
        let client = control::Client::new(hostd.control_addr);
        let status = client.status().await.expect("status over the control API");
        assert_eq!(status.images[0].warm, 1);
        let gateway = client.gateway().await.expect("the gateway's stats");
        assert_eq!(gateway.listen, hostd.gateway().addr);
        tokio::net::TcpStream::connect(hostd.gateway().addr)
            .await
            .expect("the gateway accepts");
        let control = hostd.control_addr;
        hostd.shutdown().await.expect("a clean stop");
        assert!(driver.script().live.is_empty(), "every VM destroyed");
        assert!(!state_dir.exists(), "nothing left in the state folder");
        assert!(tokio::net::TcpStream::connect(control).await.is_err());
    }
}
