//! A whole Berth in this process: a server (memory store) and a hostd (pool, gateway, control
//! API, link) with real VMs on the QEMU driver, on loopback. `cargo xtask demo` and the
//! benchmarks run on it.

use anyhow::{bail, Result};
use berth_hostd::config::ImageConfig;
use berth_hostd::gateway::Gateway;
use berth_hostd::link::{ServerLink, Token};
use berth_hostd::{Hostd, HostdConfig, Pool};
use berth_protocol::{HostId, SessionId};
use berth_server::app::Server;
use berth_server::auth::Role;
use berth_server::config::ServerConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What a [`Stack`] is started with.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// The server's address (port 0, or a taken port: a free one is taken).
    pub listen: SocketAddr,
    /// The gateway's address (likewise).
    pub gateway: SocketAddr,
    /// The game: its image's name on this host (what modes name in `image`).
    pub game: String,
    /// The game's image folder (`cargo xtask image` writes the arena's to `target/image`,
    /// every other game's to `target/images/<name>`).
    pub image_dir: PathBuf,
    pub warm: u32,
    pub max_vms: u32,
    /// Names the state folder in /dev/shm.
    pub name: String,
}

impl StackOptions {
    /// Free ports, `warm` clones, the workspace's image: what the benchmarks use.
    pub fn ephemeral(warm: u32, name: &str) -> Self {
        Self {
            listen: ([127, 0, 0, 1], 0).into(),
            gateway: ([127, 0, 0, 1], 0).into(),
            game: "arena".into(),
            image_dir: crate::vm::image_dir(),
            warm,
            max_vms: 64,
            name: name.into(),
        }
    }
}

/// The host id a [`Stack`]'s hostd registers as.
pub const HOST: &str = "stack-host";

/// server + hostd (qemu driver, one game's image) + its gateway + the link, in this process.
pub struct Stack {
    /// The game's image name.
    pub game: String,
    /// hostd's state folder (substrates, per-VM files), removed at shutdown.
    pub state_dir: PathBuf,
    pub server: Server,
    pub hostd: Hostd,
    /// The hostd's pool (a handle: cheap to clone).
    pub pool: Pool,
}

impl Stack {
    /// Starts everything; returns once the substrate is docked with `warm` clones and the
    /// server knows it. Prints what it started.
    pub async fn start(o: StackOptions) -> Result<Stack> {
        let server = start_server(o.listen).await?;
        let mut hostd = match start_hostd(&o, o.gateway).await {
            Ok(h) => h,
            Err(_) => start_hostd(&o, ([127, 0, 0, 1], 0).into()).await?,
        };
        let gateway_url = format!("ws://{}/v1/game", hostd.gateway().addr);
        println!("gateway {gateway_url}");
        hostd.connect(ServerLink {
            urls: vec![format!("ws://{}/v1/hosts", server.addr)],
            host: HostId::new(HOST)?,
            token: Token::Inline(server.ctx.auth.mint(HOST, Role::Host, 24 * 3600)?),
            gateway: gateway_url,
            reconnect_max: Duration::from_secs(1),
            trust: Default::default(),
        });
        let pool = hostd.pool().clone();
        let stack = Stack {
            game: o.game.clone(),
            state_dir: state_dir(&o),
            server,
            hostd,
            pool,
        };
        let t = std::time::Instant::now();
        println!("priming the substrate (cold boot of the game VM, once)...");
        if let Err(e) = stack.ready(o.warm).await {
            stack.shutdown().await;
            return Err(e);
        }
        let img = &stack.pool.status().images[0];
        println!(
            "docked in {} ms: {:.1} MiB in /dev/shm, {} warm clones paused (ready after {:.1} s)",
            img.prime_ms.unwrap_or(0),
            img.substrate_bytes as f64 / 1048576.0,
            img.warm,
            t.elapsed().as_secs_f64()
        );
        Ok(stack)
    }

    /// The players' gateway.
    pub fn gateway(&self) -> &Gateway {
        self.hostd.gateway()
    }

    /// The VM serving `session`.
    pub fn vm_of(&self, session: &SessionId) -> Result<berth_hostd::pool::VmInfo> {
        crate::vm::vm_of(&self.pool, session)
    }

    /// Waits until `warm` clones wait and the server has heard so from hostd.
    pub async fn ready(&self, warm: u32) -> Result<()> {
        self.pool
            .wait_ready(&self.game, warm, Duration::from_secs(300))
            .await?;
        let host = HostId::new(HOST)?;
        for _ in 0..100 {
            let h = self.server.ctx.store.host(&host).await?;
            if h.is_some_and(|h| h.images.iter().any(|i| i.docked && i.warm >= warm)) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the server never heard of {warm} warm clones")
    }

    /// A player token signed by this stack's server.
    pub fn token(&self, player: &str) -> Result<String> {
        Ok(self.server.ctx.auth.mint(player, Role::Player, 3600)?)
    }

    /// Stops hostd (link, gateway, VMs, substrate), then the server.
    pub async fn shutdown(self) {
        if let Err(e) = self.hostd.shutdown().await {
            eprintln!("hostd stopped with an error: {e:#}");
        }
        self.server.shutdown().await;
        println!("server stopped, pool shut down: VMs destroyed, substrate removed");
    }
}

/// The server with dev tokens on and a fresh secret, at `listen` or on a free port.
async fn start_server(listen: SocketAddr) -> Result<Server> {
    let mut sc = ServerConfig {
        listen,
        modes_dir: crate::fixtures::modes_dir(),
        ..ServerConfig::default()
    };
    sc.auth.secret = berth_server::util::random_key();
    sc.auth.dev_tokens = true;
    let server = match Server::start(sc.clone()).await {
        Ok(s) => s,
        Err(_) => {
            sc.listen.set_port(0);
            Server::start(sc).await?
        }
    };
    println!(
        "server http://{} (memory store, dev tokens on)",
        server.addr
    );
    Ok(server)
}

fn state_dir(o: &StackOptions) -> PathBuf {
    format!("/dev/shm/berth-{}-{}", o.name, std::process::id()).into()
}

async fn start_hostd(o: &StackOptions, gateway: SocketAddr) -> Result<Hostd> {
    let mut config = HostdConfig {
        host_id: HOST.into(),
        state_dir: state_dir(o),
        max_vms: o.max_vms,
        ..HostdConfig::default()
    };
    config.control.set_port(0);
    config.gateway.listen = gateway;
    config
        .images
        .push(ImageConfig::new(&o.game, o.image_dir.clone(), o.warm));
    let driver = berth_hostd::driver_for(&config).await?;
    println!(
        "hostd {HOST}: driver qemu, accelerator {}, at most {} VMs",
        driver.accel(),
        o.max_vms
    );
    Hostd::start_with(config, driver, None).await
}
