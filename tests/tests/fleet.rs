//! Hosts on their own network addresses (issue 15, first step): a real `berth-hostd` in its own
//! network namespace on a bridge, the server in the root namespace at the bridge's address,
//! players reaching the host's gateway at the host's address. The host is cut off the network
//! mid-match and brought back; the match goes on, and nothing is left: no namespace, no link,
//! no VM, no file.

use anyhow::{Context, Result};
use berth_protocol::game::{GameAnswer, GameRequest};
use berth_protocol::play::ServerMessage;
use berth_server::model::{HostState, SessionState};
use berth_testkit::netns::{leftovers, Bed};
use berth_testkit::player as client;
use berth_testkit::*;
use std::time::{Duration, Instant};

/// The bed's block: 10.77.7.0/24, namespaces and links named `bb7…`.
const BLOCK: u8 = 7;
const HOST: &str = "ns-host";

/// Polls the server's record of the host until `f` holds (60 s at most).
async fn host_until(
    server: &berth_server::app::Server,
    f: impl Fn(&berth_server::model::HostRecord) -> bool,
) -> Result<()> {
    let id = berth_protocol::HostId::new(HOST)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if server.ctx.store.host(&id).await?.is_some_and(|h| f(&h)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "host {HOST} never got there: {:?}",
        server.ctx.store.host(&id).await?
    )
}

/// Joins the game at `endpoint` with `ticket` and waits for its welcome.
async fn join(endpoint: &str, ticket: &str) -> Result<GameWs> {
    let mut game = GameWs::connect_url(endpoint, Default::default()).await?;
    let join = GameRequest::Join {
        ticket: ticket.to_owned(),
    };
    game.send(&join).await?;
    game.until(Duration::from_secs(10), |h| {
        matches!(h, Heard::Answer(GameAnswer::Welcome(_)))
    })
    .await?;
    Ok(game)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_on_its_own_address_serves_a_match_and_outlives_being_cut_off() -> Result<()> {
    init_logs();
    let mut bed = Bed::new(BLOCK)?;
    let host = bed.add_host(1)?;
    let mut sc = client::config();
    sc.listen = (bed.gateway_ip(), 0).into();
    sc.timeouts.host_heartbeat_ms = 500;
    sc.timeouts.host_lost_ms = 1500;
    sc.timeouts.host_grace_ms = 60_000;
    let server = berth_server::app::Server::start(sc).await?;

    let dir = Sandbox::state_dir(HOST);
    let _ = std::fs::remove_dir_all(&dir);
    seed_substrate(&dir, &image_config("arena", 1)).await?;
    let _guard = DirGuard(dir.clone());
    let conf = fixtures::TempDir::new("ns-host-conf")?;
    let config = conf.0.join("hostd.toml");
    let gateway = format!("{}:7071", host.ip);
    std::fs::write(
        &config,
        format!(
            "host_id = \"{HOST}\"\nstate_dir = \"{}\"\ncontrol = \"{}:7070\"\naccel = \"tcg\"\n\
             [[images]]\nname = \"arena\"\ndir = \"{}\"\nwarm = 1\n\
             [gateway]\nlisten = \"{gateway}\"\n\
             [server]\nurl = \"ws://{}/v1/hosts\"\ntoken = \"{}\"\n\
             gateway = \"ws://{gateway}/v1/game\"\nreconnect_max_s = 1\n",
            dir.display(),
            host.ip,
            image_dir().display(),
            server.addr,
            fixtures::host_token(HOST),
        ),
    )?;
    let mut hostd = host
        .command(&hostd_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .spawn()
        .context("starting berth-hostd in its namespace")?;
    host_until(&server, |h| {
        h.images.iter().any(|i| i.docked && i.warm >= 1)
    })
    .await?;

    // A duel: its endpoint is the host's own address, reached over the bridge.
    let mut a = client::player(&server, "nia").await?;
    let mut b = client::player(&server, "oto").await?;
    a.send(&client::queue("duel", "eu")).await?;
    b.send(&client::queue("duel", "eu")).await?;
    let news = |m: &ServerMessage| !matches!(m, ServerMessage::QueueStatus { .. });
    let ServerMessage::Matched {
        session,
        endpoint,
        ticket,
        ..
    } = a.until(Duration::from_secs(30), news).await?
    else {
        anyhow::bail!("expected matched");
    };
    b.until(Duration::from_secs(30), news).await?;
    assert_eq!(endpoint, format!("ws://{gateway}/v1/game"));
    drop(join(&endpoint, &ticket).await?);

    // Cut off: the server loses the host, but keeps the session through the grace.
    host.cut()?;
    host_until(&server, |h| h.state == HostState::Lost).await?;
    host.restore()?;
    host_until(&server, |h| h.state == HostState::Up).await?;
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.state, SessionState::Active, "{:?}", s.end_reason);

    // Back: the player rejoins and gives up; both hear the results.
    let mut game = join(&endpoint, &ticket).await?;
    game.send(&GameRequest::Surrender).await?;
    for c in [&mut a, &mut b] {
        let (reason, results) = client::ended(c).await?;
        assert_eq!(reason, "surrender");
        assert!(!results["winner"].is_null(), "{results}");
    }
    signal(hostd.id(), nix::sys::signal::Signal::SIGTERM)?;
    assert!(hostd.wait()?.success());
    server.shutdown().await;
    drop(bed);
    assert_eq!(leftovers(BLOCK), Vec::<String>::new());
    drop(conf);
    assert_nothing_left(&dir)?;
    Ok(())
}
