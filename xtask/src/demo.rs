//! `cargo xtask demo`: the main job on the embedded defaults. Builds the guest image, starts
//! `berth-server` (memory store) and a hostd (qemu driver) linked to it over `/v1/hosts`, primes
//! the substrate, then plays matches the way phones do: players open `/v1/play`, queue, are
//! matched onto game VMs activated from the substrate, the games end with results, and every VM
//! goes back to the pool. Everything is cleaned up at the end.

use anyhow::{bail, Context, Result};
use berth_hostd::config::ImageConfig;
use berth_hostd::link::{ServerLink, Token};
use berth_hostd::{HostdConfig, Pool};
use berth_protocol::play::{ClientMessage, ServerMessage};
use berth_protocol::{HostId, SessionId};
use berth_server::app::Server;
use berth_server::auth::Role;
use berth_server::config::ServerConfig;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Matches to play (two players each, all queueing at once).
    #[arg(long, default_value_t = 4)]
    pub matches: usize,
    /// Warm clones kept per image.
    #[arg(long, default_value_t = 2)]
    pub warm: u32,
    /// Where the server listens (a free port is taken if this one is busy).
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub listen: std::net::SocketAddr,
}

/// server (memory store) + hostd pool (qemu driver) + the link between them, in this process.
pub(crate) struct Stack {
    pub server: Server,
    pub pool: Pool,
    stop: tokio::sync::oneshot::Sender<()>,
    link: tokio::task::JoinHandle<()>,
}

impl Stack {
    /// Builds the image if needed and starts everything; returns once the substrate is docked
    /// with `warm` clones and the server knows it.
    pub async fn start(listen: std::net::SocketAddr, warm: u32, name: &str) -> Result<Stack> {
        crate::sys::ensure(&[crate::sys::QEMU, crate::sys::QEMU_UTILS, crate::sys::E2FS])?;
        let manifest = crate::image::build()?;
        println!(
            "image {} ({})",
            &manifest.digest[..12],
            manifest.kernel_package
        );
        let mut sc = ServerConfig {
            listen,
            modes_dir: crate::image::root().join("assets/modes"),
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
        let mut config = HostdConfig {
            host_id: "demo-host".into(),
            state_dir: format!("/dev/shm/berth-{name}-{}", std::process::id()).into(),
            ..HostdConfig::default()
        };
        config
            .images
            .push(ImageConfig::new("arena", crate::image::image_dir(), warm));
        let driver = berth_hostd::driver_for(&config).await?;
        println!(
            "hostd demo-host: driver qemu, accelerator {}",
            driver.accel()
        );
        let pool = Pool::start(config, driver).await?;
        let link = ServerLink {
            url: format!("ws://{}/v1/hosts", server.addr),
            host: HostId::new("demo-host")?,
            token: Token::Inline(server.ctx.auth.mint("demo-host", Role::Host, 3600)?),
            gateway: "ws://127.0.0.1:7071".into(),
            reconnect_max: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let link = tokio::spawn(berth_hostd::link::run(pool.clone(), link, async move {
            let _ = stopped.await;
        }));
        let stack = Stack {
            server,
            pool,
            stop,
            link,
        };
        let t = Instant::now();
        println!("priming the substrate (cold boot of the game VM, once)...");
        if let Err(e) = stack.ready(warm).await {
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

    /// Waits until `warm` clones wait and the server has heard so from hostd.
    pub async fn ready(&self, warm: u32) -> Result<()> {
        self.pool
            .wait_ready("arena", warm, Duration::from_secs(300))
            .await?;
        let host = HostId::new("demo-host")?;
        for _ in 0..100 {
            let h = self.server.ctx.store.host(&host).await?;
            if h.is_some_and(|h| h.images.iter().any(|i| i.docked && i.warm >= warm)) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the server never heard of {warm} warm clones")
    }

    /// A player connected to `/v1/play` (hello answered).
    pub async fn player(&self, name: &str) -> Result<crate::bench_server::Ws> {
        let url = format!("ws://{}/v1/play", self.server.addr);
        let token = self.server.ctx.auth.mint(name, Role::Player, 3600)?;
        crate::bench_server::idle_player(&url, token).await
    }

    pub async fn shutdown(self) {
        drop(self.stop);
        let _ = self.link.await;
        self.server.shutdown().await;
        self.pool.shutdown().await;
        println!("server stopped, pool shut down: VMs destroyed, substrate removed");
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let stack = Stack::start(args.listen, args.warm, "demo").await?;
    let result = demo(&stack, &args).await;
    stack.shutdown().await;
    result
}

/// Sends `queue` for `duel` and waits for `matched`: the session and the milliseconds it took.
pub(crate) async fn queue_until_matched(
    ws: &mut crate::bench_server::Ws,
) -> Result<(SessionId, f64)> {
    let t = Instant::now();
    let queue = ClientMessage::Queue {
        mode: "duel".into(),
        region: "local".into(),
        party: None,
        skill: None,
    };
    ws.send(Message::Text(serde_json::to_string(&queue)?.into()))
        .await?;
    loop {
        match next(ws).await? {
            ServerMessage::Matched { session, .. } => {
                return Ok((session, t.elapsed().as_secs_f64() * 1000.0))
            }
            ServerMessage::QueueStatus { .. } => continue,
            other => bail!("expected matched, got {other:?}"),
        }
    }
}

async fn demo(stack: &Stack, args: &DemoArgs) -> Result<()> {
    let (server, pool) = (&stack.server, &stack.pool);
    let mut players = Vec::new();
    for i in 0..2 * args.matches {
        let name = format!("player-{}", i + 1);
        players.push((name.clone(), stack.player(&name).await?));
    }
    println!(
        "\n{} players connected to /v1/play; all queue for `duel` at once",
        players.len()
    );
    let mut plays = Vec::new();
    for (name, mut ws) in players {
        plays.push(tokio::spawn(async move {
            let (session, ms) = queue_until_matched(&mut ws)
                .await
                .with_context(|| name.clone())?;
            anyhow::Ok((name, ws, session, ms))
        }));
    }
    let mut by_session: BTreeMap<SessionId, Vec<(String, f64)>> = BTreeMap::new();
    let mut sockets = Vec::new();
    for p in plays {
        let (name, ws, session, ms) = p.await??;
        by_session
            .entry(session)
            .or_default()
            .push((name.clone(), ms));
        sockets.push((name, ws));
    }
    println!(
        "\n{:<26} {:<22} {:<10} {:>16}  game answer from the VM",
        "session", "players", "path", "queue→matched ms"
    );
    let vms = pool.status().vms;
    for (session, ps) in &by_session {
        let vm = vms
            .iter()
            .find(|v| &v.session_id == session)
            .context("a VM for every session")?;
        let names: Vec<&str> = ps.iter().map(|(n, _)| n.as_str()).collect();
        let slowest = ps.iter().map(|(_, ms)| *ms).fold(0.0, f64::max);
        let hello = game_line(vm.game_addr, None).await?;
        println!(
            "{:<26} {:<22} {:<10} {:>16.1}  {}…",
            session.as_str(),
            names.join(","),
            format!("{:?}", vm.path).to_lowercase(),
            slowest,
            hello.chars().take(60).collect::<String>()
        );
        // The game ends inside the VM; the first player wins.
        let end = format!(r#"{{"type":"end","results":{{"winner":"{}"}}}}"#, names[0]);
        game_line(vm.game_addr, Some(&end)).await?;
    }
    println!();
    for (name, mut ws) in sockets {
        match next(&mut ws).await? {
            ServerMessage::SessionEnded {
                session,
                reason,
                results,
            } => println!("{name:<10} told: session {session} ended ({reason}), results {results}"),
            other => bail!("{name}: expected session_ended, got {other:?}"),
        }
    }
    for _ in 0..100 {
        if pool.status().vms.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = pool.status();
    println!(
        "\nafter the matches: {} VMs running, {} warm clones waiting; {} sessions recorded",
        st.vms.len(),
        st.images[0].warm,
        server.ctx.store.sessions(None).await?.len()
    );
    Ok(())
}

pub(crate) async fn next(ws: &mut crate::bench_server::Ws) -> Result<ServerMessage> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("the server said nothing for 30 s")?
            .context("the server closed the connection")??;
        if let Message::Text(t) = m {
            return Ok(serde_json::from_str(&t)?);
        }
    }
}

/// Reads the game's hello line and, with `request`, sends it and reads the answer.
pub(crate) async fn game_line(addr: std::net::SocketAddr, request: Option<&str>) -> Result<String> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(rd).lines();
    let hello = lines.next_line().await?.context("the game closed")?;
    let Some(req) = request else {
        return Ok(hello);
    };
    wr.write_all(format!("{req}\n").as_bytes()).await?;
    lines.next_line().await?.context("the game closed")
}
