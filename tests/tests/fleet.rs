//! Hosts on their own network addresses (issue 15): real `berth-hostd`s, each in its own
//! network namespace on a bridge, the server in the root namespace at the bridge's address,
//! players reaching each host's gateway at that host's address. A host is cut off the network
//! mid-match and brought back, and the match goes on; hosts declare regions and sessions land
//! only in theirs. A new host fetches its substrate from a peer instead of priming it, and
//! refuses (then primes) one that does not match its digest. Nothing is left: no namespace,
//! no link, no VM, no file.

use anyhow::{Context, Result};
use berth_protocol::game::{GameAnswer, GameRequest};
use berth_protocol::play::ServerMessage;
use berth_protocol::SessionId;
use berth_server::app::Server;
use berth_server::model::{HostRecord, HostState, SessionState};
use berth_testkit::browser::{Browser, Device};
use berth_testkit::netns::{leftovers, Bed, NsHost};
use berth_testkit::player as client;
use berth_testkit::*;
use std::time::{Duration, Instant};

/// Polls the server's record of host `name` until `f` holds (60 s at most).
async fn host_until(server: &Server, name: &str, f: impl Fn(&HostRecord) -> bool) -> Result<()> {
    let id = berth_protocol::HostId::new(name)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if server.ctx.store.host(&id).await?.is_some_and(|h| f(&h)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = server.ctx.store.host(&id).await?;
    anyhow::bail!("host {name} never got there: {last:?}")
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

/// A server on the bed's bridge address: hosts are lost after 1.5 s of silence but keep their
/// sessions for 60 s; development tokens for the page and berth-sim.
async fn server_on(bed: &Bed) -> Result<Server> {
    let mut sc = client::config();
    sc.auth.dev_tokens = true;
    sc.listen = (bed.gateway_ip(), 0).into();
    sc.timeouts.host_heartbeat_ms = 500;
    sc.timeouts.host_lost_ms = 1500;
    sc.timeouts.host_grace_ms = 60_000;
    Server::start(sc).await
}

/// How an [`NsHostd`] starts.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// Its state folder starts with the shared primed substrate (else it has none).
    seed: bool,
    /// A `[peer]` table: it serves its substrates and fetches a peer's before priming.
    peer: bool,
    /// Warm arena clones.
    warm: u32,
    /// How long a SIGTERM drains before hostd stops (0: at once).
    drain_timeout_s: u64,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            seed: true,
            peer: false,
            warm: 1,
            drain_timeout_s: 0,
        }
    }
}

/// A real `berth-hostd` in a host's namespace, with its state and config folders; killed on
/// drop if the test ends early.
struct NsHostd {
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// `IP:PORT` of its gateway, on its own address.
    gateway: String,
    /// `IP:PORT` of its control API.
    control: std::net::SocketAddr,
    _guard: DirGuard,
    _conf: fixtures::TempDir,
}

impl Drop for NsHostd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl NsHostd {
    /// Starts hostd `name` in `host`'s namespace, linked to `server`, serving `region` (any
    /// when `None`), with one warm arena clone from the shared primed substrate; returns once
    /// the server knows it up and docked.
    async fn start(
        host: &NsHost,
        server: &Server,
        name: &str,
        region: Option<&str>,
    ) -> Result<NsHostd> {
        Self::start_with(host, server, name, region, Setup::default()).await
    }

    /// [`NsHostd::start`] set up as `setup` says; returns once the server knows it up and
    /// docked with its warm clones.
    async fn start_with(
        host: &NsHost,
        server: &Server,
        name: &str,
        region: Option<&str>,
        setup: Setup,
    ) -> Result<NsHostd> {
        let dir = Sandbox::state_dir(name);
        let _ = std::fs::remove_dir_all(&dir);
        if setup.seed {
            seed_substrate(&dir, &image_config("arena", 1)).await?;
        }
        let guard = DirGuard(dir.clone());
        let conf = fixtures::TempDir::new(&format!("{name}-conf"))?;
        let config = conf.0.join("hostd.toml");
        let gateway = format!("{}:7071", host.ip);
        let region = region
            .map(|r| format!("region = \"{r}\"\n"))
            .unwrap_or_default();
        // The peer listener on the host's own address: peers reach it over the bridge.
        let peer = if setup.peer {
            format!("[peer]\nlisten = \"{}:7072\"\n", host.ip)
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                "host_id = \"{name}\"\n{region}state_dir = \"{}\"\ncontrol = \"{}:7070\"\n\
                 accel = \"tcg\"\ndrain_timeout_s = {}\n\
                 [[images]]\nname = \"arena\"\ndir = \"{}\"\nwarm = {}\n\
                 [gateway]\nlisten = \"{gateway}\"\n{peer}\
                 [server]\nurl = \"ws://{}/v1/hosts\"\ntoken = \"{}\"\n\
                 gateway = \"ws://{gateway}/v1/game\"\nreconnect_max_s = 1\n",
                dir.display(),
                host.ip,
                setup.drain_timeout_s,
                image_dir().display(),
                setup.warm,
                server.addr,
                fixtures::host_token(name),
            ),
        )?;
        let child = host
            .command(&hostd_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .spawn()
            .context("starting berth-hostd in its namespace")?;
        let hostd = NsHostd {
            child,
            dir,
            gateway,
            control: (host.ip, 7070).into(),
            _guard: guard,
            _conf: conf,
        };
        host_until(server, name, |h| {
            h.images.iter().any(|i| i.docked && i.warm >= setup.warm)
        })
        .await?;
        Ok(hostd)
    }

    /// Its Prometheus text, from its control API on its own address.
    async fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.control);
        Ok(reqwest::get(url).await?.error_for_status()?.text().await?)
    }

    /// Waits (at most `within`) for it to exit by itself: a clean exit, and nothing left.
    fn exited_within(mut self, within: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "hostd exited badly: {status}");
                return assert_nothing_left(&self.dir);
            }
            anyhow::ensure!(t0.elapsed() < within, "hostd still runs after {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM (no drain), a clean exit, and nothing left in its state folder.
    fn stop(mut self) -> Result<()> {
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM)?;
        anyhow::ensure!(self.child.wait()?.success(), "hostd exited badly");
        assert_nothing_left(&self.dir)
    }
}

/// Two players queue for a duel in `region` and are matched: both, the session, its endpoint
/// and the first player's ticket.
async fn duel(
    server: &Server,
    names: [&str; 2],
    region: &str,
) -> Result<(client::Client, client::Client, SessionId, String, String)> {
    let mut a = client::player(server, names[0]).await?;
    let mut b = client::player(server, names[1]).await?;
    a.send(&client::queue("duel", region)).await?;
    b.send(&client::queue("duel", region)).await?;
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
    Ok((a, b, session, endpoint, ticket))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_on_its_own_address_serves_a_match_and_outlives_being_cut_off() -> Result<()> {
    init_logs();
    const BLOCK: u8 = 7;
    let mut bed = Bed::new(BLOCK)?;
    let host = bed.add_host(1)?;
    let server = server_on(&bed).await?;
    let hostd = NsHostd::start(&host, &server, "ns-host", None).await?;

    // A duel: its endpoint is the host's own address, reached over the bridge.
    let (mut a, mut b, session, endpoint, ticket) = duel(&server, ["nia", "oto"], "eu").await?;
    assert_eq!(endpoint, format!("ws://{}/v1/game", hostd.gateway));
    drop(join(&endpoint, &ticket).await?);

    // Cut off: the server loses the host, but keeps the session through the grace.
    host.cut()?;
    host_until(&server, "ns-host", |h| h.state == HostState::Lost).await?;
    host.restore()?;
    host_until(&server, "ns-host", |h| h.state == HostState::Up).await?;
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.state, SessionState::Active, "{:?}", s.end_reason);

    // Back: the player rejoins and gives up; both hear the results.
    surrender(&endpoint, &ticket, [&mut a, &mut b]).await?;
    finish(vec![hostd], server, bed, BLOCK).await
}

/// The holder of `ticket` joins at `endpoint` and gives up; both players hear the results.
async fn surrender(endpoint: &str, ticket: &str, players: [&mut client::Client; 2]) -> Result<()> {
    let mut game = join(endpoint, ticket).await?;
    game.send(&GameRequest::Surrender).await?;
    for c in players {
        let (reason, results) = client::ended(c).await?;
        assert_eq!(reason, "surrender");
        assert!(!results["winner"].is_null(), "{results}");
    }
    Ok(())
}

/// Stops every hostd (nothing left in its state folder), the server and the bed, and checks
/// that no namespace or link of `block` is left.
async fn finish(hostds: Vec<NsHostd>, server: Server, bed: Bed, block: u8) -> Result<()> {
    for h in hostds {
        h.stop()?;
    }
    server.shutdown().await;
    drop(bed);
    assert_eq!(leftovers(block), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_in_two_regions_take_only_their_regions_sessions() -> Result<()> {
    init_logs();
    const BLOCK: u8 = 8;
    let mut bed = Bed::new(BLOCK)?;
    let server = server_on(&bed).await?;
    let mut hostds = Vec::new();
    for (i, (name, region)) in [("fl-eu1", "eu"), ("fl-eu2", "eu"), ("fl-us1", "us")]
        .into_iter()
        .enumerate()
    {
        let host = bed.add_host(i as u8 + 1)?;
        hostds.push((
            region,
            NsHostd::start(&host, &server, name, Some(region)).await?,
        ));
    }
    let mut players = Vec::new();
    for (names, region) in [
        (["ra", "rb"], "eu"),
        (["rc", "rd"], "us"),
        (["re", "rf"], "eu"),
    ] {
        let (a, b, session, endpoint, _) = duel(&server, names, region).await?;
        let s = server
            .ctx
            .store
            .session(&session)
            .await?
            .context("stored")?;
        let host = s.host.context("placed")?;
        let served = hostds
            .iter()
            .find(|(_, h)| endpoint == format!("ws://{}/v1/game", h.gateway))
            .map(|(r, _)| *r);
        assert_eq!(served, Some(region), "{session} on {host} via {endpoint}");
        players.push((a, b));
    }
    finish(
        hostds.into_iter().map(|(_, h)| h).collect(),
        server,
        bed,
        BLOCK,
    )
    .await
}

/// The value of the sample `name{labels}` in a Prometheus text (0 when absent).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The arena substrate identity host `name` reports to the server.
async fn substrate_of(server: &Server, name: &str) -> Result<Option<String>> {
    let id = berth_protocol::HostId::new(name)?;
    let host = server.ctx.store.host(&id).await?.context("registered")?;
    Ok(host.images.iter().find_map(|i| i.substrate.clone()))
}

/// Queues a duel in `region`, checks it is served by `hostd` through a clone of its substrate
/// (not a cold boot), and plays it to its results.
async fn duel_on(server: &Server, hostd: &NsHostd, names: [&str; 2], region: &str) -> Result<()> {
    let (mut a, mut b, session, endpoint, ticket) = duel(server, names, region).await?;
    assert_eq!(endpoint, format!("ws://{}/v1/game", hostd.gateway));
    let status = berth_hostd::control::Client::new(hostd.control)
        .status()
        .await?;
    let vm = status
        .vms
        .iter()
        .find(|v| v.session_id == session)
        .context("the session's VM")?;
    assert_ne!(vm.path, berth_protocol::ActivationPath::Cold, "{vm:?}");
    surrender(&endpoint, &ticket, [&mut a, &mut b]).await
}

const SHIPPED: &str = "berth_hostd_substrates_shipped_total{image=\"arena\"}";
const PRIMED: &str = "berth_hostd_primes_total{image=\"arena\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_host_serves_its_first_session_from_a_shipped_substrate_without_priming() -> Result<()>
{
    init_logs();
    const BLOCK: u8 = 9;
    let mut bed = Bed::new(BLOCK)?;
    let server = server_on(&bed).await?;
    let peer = Setup {
        peer: true,
        ..Setup::default()
    };
    // The source, in another region: it never gets an eu session, only ships its substrate.
    let source =
        NsHostd::start_with(&bed.add_host(1)?, &server, "sh-src", Some("us"), peer).await?;
    let fresh = Setup {
        seed: false,
        ..peer
    };
    let started = Instant::now();
    let new = NsHostd::start_with(&bed.add_host(2)?, &server, "sh-new", Some("eu"), fresh).await?;
    let docked_in = started.elapsed();

    let metrics = new.metrics().await?;
    assert_eq!(sample(&metrics, SHIPPED), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, PRIMED), 0.0, "nothing primed: {metrics}");
    let timed = "berth_hostd_substrate_fetch_seconds_count";
    assert_eq!(sample(&metrics, timed), 1.0, "{metrics}");
    assert_eq!(
        sample(&source.metrics().await?, SHIPPED),
        0.0,
        "the source had its own"
    );
    let want = substrate_of(&server, "sh-src").await?;
    assert!(want.is_some());
    assert_eq!(substrate_of(&server, "sh-new").await?, want);
    eprintln!("the new host docked a shipped substrate in {docked_in:?}");

    duel_on(&server, &new, ["sa", "sb"], "eu").await?;
    finish(vec![new, source], server, bed, BLOCK).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipped_substrate_that_fails_its_digest_is_refused_and_primed_instead() -> Result<()> {
    init_logs();
    const BLOCK: u8 = 10;
    let mut bed = Bed::new(BLOCK)?;
    let server = server_on(&bed).await?;
    // No warm clone on the source: nothing maps the RAM file damaged below.
    let peer = Setup {
        peer: true,
        warm: 0,
        ..Setup::default()
    };
    let source =
        NsHostd::start_with(&bed.add_host(1)?, &server, "sc-src", Some("us"), peer).await?;
    // The source's RAM file changes after docking: 4 KiB in the middle flipped.
    let ram = source.dir.join("substrates/arena/ram");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ram)?;
        let at = file.metadata()?.len() / 2;
        let mut page = vec![0u8; 4096];
        file.read_exact_at(&mut page, at)?;
        page.iter_mut().for_each(|b| *b ^= 0xa5);
        file.write_all_at(&page, at)?;
    }
    let fresh = Setup {
        seed: false,
        warm: 1,
        ..peer
    };
    let new = NsHostd::start_with(&bed.add_host(2)?, &server, "sc-new", Some("eu"), fresh).await?;

    let metrics = new.metrics().await?;
    let refused = "berth_hostd_ship_refusals_total{image=\"arena\",code=\"substrate_damaged\"}";
    assert_eq!(sample(&metrics, refused), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, SHIPPED), 0.0, "{metrics}");
    assert_eq!(sample(&metrics, PRIMED), 1.0, "primed instead: {metrics}");
    assert!(
        !new.dir.join("substrates/.incoming-arena").exists(),
        "the refused one's temp folder is gone"
    );

    duel_on(&server, &new, ["sc", "sd"], "eu").await?;
    finish(vec![new, source], server, bed, BLOCK).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_queued_by_latency_play_in_the_region_best_for_them() -> Result<()> {
    init_logs();
    const BLOCK: u8 = 11;
    let mut bed = Bed::new(BLOCK)?;
    let server = server_on(&bed).await?;
    let mut hostds = Vec::new();
    for (i, (name, region)) in [("lt-eu1", "eu"), ("lt-us1", "us")].into_iter().enumerate() {
        let host = bed.add_host(i as u8 + 1)?;
        hostds.push(NsHostd::start(&host, &server, name, Some(region)).await?);
    }
    let http = reqwest::Client::new();
    let regions_url = format!("http://{}/v1/regions", server.addr);

    // berth-sim's measurement over the bridge: both regions, through their own gateways.
    let measured = berth_sim::latency::measure(&http, &regions_url, &fixtures::token("lt-m")).await;
    let measured = measured.map_err(|code| anyhow::anyhow!("measuring: {code}"))?;
    assert_eq!(
        measured.keys().collect::<Vec<_>>(),
        ["eu", "us"],
        "{measured:?}"
    );

    // The page queues by latency (`?region=*`): it times both regions (about the same here);
    // its opponent is far from us, so eu is best for the two of them.
    let b = Browser::start(
        "fleet-latency",
        Device::Desktop {
            width: 1280,
            height: 800,
        },
    )
    .await?;
    let page = format!("http://{}/play?region=*", server.addr);
    b.goto(&page).await?;
    let ctx = "'screen=' + document.body.dataset.screen + ' status=' + \
               document.querySelector('[data-testid=queue-status]').textContent + ' error=' + \
               document.querySelector('[data-testid=error-text]').textContent";
    let within = Duration::from_secs(20);
    b.until(
        "sign-in",
        within,
        "document.body.dataset.screen === 'signin'",
        ctx,
    )
    .await?;
    let name = b.el("name").await?;
    name.clear().await?;
    name.send_keys("lt-page").await?;
    b.click("signin").await?;
    b.until(
        "modes",
        within,
        "document.body.dataset.screen === 'modes'",
        ctx,
    )
    .await?;
    b.click("mode-sprint").await?;
    let queued = "document.querySelector('[data-testid=queue-status]').textContent.includes('regions within ')";
    b.until("queued by latency", within, queued, ctx).await?;
    let mut far = client::player(&server, "lt-far").await?;
    let latencies = [("eu".to_owned(), 5), ("us".to_owned(), 400)].into();
    far.send(&berth_client::play::queue_by_latency(
        "sprint", latencies, None, None,
    ))
    .await?;
    let ServerMessage::Matched {
        region,
        region_reason,
        endpoint,
        ticket,
        ..
    } = far
        .until(Duration::from_secs(30), |m| {
            matches!(m, ServerMessage::Matched { .. })
        })
        .await?
    else {
        unreachable!()
    };
    assert_eq!(region, "eu");
    assert_eq!(endpoint, format!("ws://{}/v1/game", hostds[0].gateway));
    let reason = region_reason.context("a reason")?;
    assert_eq!(reason.rule, berth_protocol::RegionRule::Latency);
    // us is beyond any allowance for the far player (400 > 250 ms); eu's worst is theirs or
    // the page's, whichever is slower.
    assert!(reason.worst_ms >= Some(5), "{reason:?}");
    b.until(
        "the page's region",
        within,
        "document.querySelector('[data-testid=match-region]').textContent.startsWith('Playing in eu')",
        ctx,
    )
    .await?;
    // The far player gives up; both hear the end.
    let mut game = join(&endpoint, &ticket).await?;
    game.send(&GameRequest::Surrender).await?;
    let (reason, _) = client::ended(&mut far).await?;
    assert_eq!(reason, "surrender");
    b.until(
        "the results",
        within,
        "document.body.dataset.screen === 'results'",
        ctx,
    )
    .await?;
    b.finish().await?;

    // Two bots of berth-sim queue by latency (`--region '*'`) and play a sprint.
    let swarm = berth_sim::SwarmConfig {
        server: format!("http://{}", server.addr),
        region: berth_protocol::play::BY_LATENCY.into(),
        modes: vec![berth_sim::Weighted::new("sprint".into(), 1.0)],
        matches: berth_sim::Matches::Count(1),
        duration: Duration::from_secs(20),
        drain: Duration::from_secs(40),
        name_prefix: "lt-sim".into(),
        ..berth_sim::SwarmConfig::default()
    };
    let report = berth_sim::run(swarm, None).await?;
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(report.matches.finished, 2);
    assert_eq!(
        report.regions.values().sum::<u64>(),
        2,
        "{:?}",
        report.regions
    );
    assert!(report.regions.keys().all(|r| r == "eu" || r == "us"));

    for h in hostds {
        h.stop()?;
    }
    server.shutdown().await;
    drop(bed);
    assert_eq!(leftovers(BLOCK), Vec::<String>::new());
    Ok(())
}

/// A bed of `block` with a server and two hosts of region `eu` serving their substrates to
/// each other (`[peer]`), named `names`.
async fn two_peers(block: u8, names: [&str; 2]) -> Result<(Bed, Server, NsHostd, NsHostd)> {
    let peer = Setup {
        peer: true,
        ..Setup::default()
    };
    two_peers_with(block, names, peer).await
}

/// [`two_peers`], both set up as `peer` says.
async fn two_peers_with(
    block: u8,
    names: [&str; 2],
    peer: Setup,
) -> Result<(Bed, Server, NsHostd, NsHostd)> {
    init_logs();
    let mut bed = Bed::new(block)?;
    let server = server_on(&bed).await?;
    let one = NsHostd::start_with(&bed.add_host(1)?, &server, names[0], Some("eu"), peer).await?;
    let two = NsHostd::start_with(&bed.add_host(2)?, &server, names[1], Some("eu"), peer).await?;
    Ok((bed, server, one, two))
}

/// Of two hosts, the one whose gateway `endpoint` names, then the other.
fn serving<'a>(endpoint: &str, one: &'a NsHostd, two: &'a NsHostd) -> (&'a NsHostd, &'a NsHostd) {
    if endpoint.contains(&one.gateway) {
        (one, two)
    } else {
        (two, one)
    }
}

/// Waits until both players were told their match moved to `endpoint`; the last ticket.
async fn both_moved_to(endpoint: &str, players: [&mut client::Client; 2]) -> Result<String> {
    let mut ticket = String::new();
    for c in players {
        let m = c
            .until(
                Duration::from_secs(30),
                |m| matches!(m, ServerMessage::Matched { endpoint: e, .. } if e == endpoint),
            )
            .await?;
        if let ServerMessage::Matched { ticket: t, .. } = m {
            ticket = t;
        }
    }
    Ok(ticket)
}

/// `POST /v1/admin/PATH` on `server` with an admin token: the status and the JSON body.
async fn admin_post(server: &Server, path: &str, body: &str) -> Result<(u16, serde_json::Value)> {
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/{path}", server.addr))
        .bearer_auth(fixtures::admin_token())
        .body(body.to_owned())
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

/// `POST /v1/admin/sessions/{id}/migrate` with `body`.
async fn migrate(
    server: &Server,
    session: &SessionId,
    body: &str,
) -> Result<(u16, serde_json::Value)> {
    admin_post(server, &format!("sessions/{session}/migrate"), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_match_moves_to_another_host_and_finishes_there() -> Result<()> {
    const BLOCK: u8 = 12;
    let (bed, server, one, two) = two_peers(BLOCK, ["mv-1", "mv-2"]).await?;
    let (mut a, mut b, session, endpoint, ticket) = duel(&server, ["ma", "mb"], "eu").await?;
    let (from, to) = serving(&endpoint, &one, &two);
    let mut game = join(&endpoint, &ticket).await?;

    // Bad requests first: an unknown host, a body that is not the documented one.
    let (status, body) = migrate(&server, &session, r#"{"host":"nobody"}"#).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("no_target")),
        "{body}"
    );
    let (status, body) = migrate(&server, &session, r#"{"hots":"mv-2"}"#).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );

    // The move: the server answers once the session runs on the other host.
    let target = if std::ptr::eq(to, &two) {
        "mv-2"
    } else {
        "mv-1"
    };
    let (status, body) = migrate(&server, &session, &format!(r#"{{"host":"{target}"}}"#)).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["host"], target, "{body}");
    // The player's gateway connection is closed `session_moved`; a fresh `matched` names the
    // new endpoint, where the game goes on.
    let closed = game
        .until(Duration::from_secs(10), |h| {
            matches!(h, Heard::Close(..) | Heard::Dropped)
        })
        .await?;
    assert_eq!(closed, Heard::Close(1001, "session_moved".into()));
    let ServerMessage::Matched {
        endpoint: moved_to,
        ticket,
        ..
    } = a
        .until(Duration::from_secs(10), |m| {
            matches!(m, ServerMessage::Matched { endpoint, .. } if *endpoint != endpoint_of(&from.gateway))
        })
        .await?
    else {
        unreachable!()
    };
    assert_eq!(moved_to, endpoint_of(&to.gateway));
    let mut game = GameWs::connect_url(&moved_to, Default::default()).await?;
    game.send(&GameRequest::Join { ticket }).await?;
    let welcome = game
        .until(Duration::from_secs(10), |h| {
            matches!(h, Heard::Answer(GameAnswer::Welcome(_)))
        })
        .await?;
    let Heard::Answer(GameAnswer::Welcome(w)) = welcome else {
        unreachable!()
    };
    assert!(w.rejoined, "the game knew the player from before the move");
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.host.as_ref().map(|h| h.as_str()), Some(target));
    assert!(
        s.history.iter().any(|t| t.note.starts_with("moved from")),
        "{:?}",
        s.history
    );
    assert!(
        s.history.iter().any(|t| t.note.starts_with("sent by")),
        "{:?}",
        s.history
    );
    game.send(&GameRequest::Surrender).await?;
    for c in [&mut a, &mut b] {
        let (reason, results) = client::ended(c).await?;
        assert_eq!(reason, "surrender");
        assert!(!results["winner"].is_null(), "{results}");
    }
    finish(vec![one, two], server, bed, BLOCK).await
}

fn endpoint_of(gateway: &str) -> String {
    format!("ws://{gateway}/v1/game")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_host_moves_its_live_match_away_and_ends_none() -> Result<()> {
    const BLOCK: u8 = 14;
    let (bed, server, one, two) = two_peers(BLOCK, ["dr-1", "dr-2"]).await?;
    let (mut a, mut b, session, endpoint, _) = duel(&server, ["da", "db"], "eu").await?;
    let (from, to) = if endpoint.contains(&one.gateway) {
        ("dr-1", &two)
    } else {
        ("dr-2", &one)
    };
    // An operator drains the match's host: the match moves, it does not end.
    let (status, body) = admin_post(&server, &format!("hosts/{from}/drain"), "").await?;
    assert_eq!(status, 200, "{body}");
    let elsewhere = endpoint_of(&to.gateway);
    let ticket = both_moved_to(&elsewhere, [&mut a, &mut b]).await?;
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.state, SessionState::Active, "{:?}", s.end_reason);
    // It is finished on the other host, and both players hear its results.
    surrender(&elsewhere, &ticket, [&mut a, &mut b]).await?;
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.end_reason.as_deref(), Some("surrender"));
    finish(vec![one, two], server, bed, BLOCK).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_sim_players_follow_their_match_when_its_host_drains() -> Result<()> {
    const BLOCK: u8 = 15;
    let (bed, server, one, two) = two_peers(BLOCK, ["fs-1", "fs-2"]).await?;
    // Two bots play one sprint (first to 5 or 20 s).
    let swarm = berth_sim::SwarmConfig {
        server: format!("http://{}", server.addr),
        region: "eu".into(),
        modes: vec![berth_sim::Weighted::new("sprint".into(), 1.0)],
        matches: berth_sim::Matches::Count(1),
        duration: Duration::from_secs(10),
        drain: Duration::from_secs(60),
        name_prefix: "fs".into(),
        ..berth_sim::SwarmConfig::default()
    };
    let run = tokio::spawn(berth_sim::run(swarm, None));
    // Once the match plays, its host drains: the match moves to the other host.
    let store = server.ctx.store.clone();
    let t0 = Instant::now();
    let session = loop {
        let active = store.sessions(Some(SessionState::Active)).await?;
        if let Some(s) = active.first() {
            break s.clone();
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "no match started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = session.host.clone().context("placed")?;
    let (status, body) = admin_post(&server, &format!("hosts/{from}/drain"), "").await?;
    assert_eq!(status, 200, "{body}");
    let report = run.await??;
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(report.matches.finished, 2);
    assert_eq!(report.reconnects.moved, 2, "both players followed the move");
    let s = store.session(&session.id).await?.context("kept")?;
    assert_ne!(s.host, Some(from), "it finished on the other host");
    assert!(
        s.end_reason
            .as_deref()
            .is_some_and(|r| r == "score_limit" || r == "time_limit"),
        "{:?}",
        s.end_reason
    );
    finish(vec![one, two], server, bed, BLOCK).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_host_moves_its_live_match_away_before_it_exits() -> Result<()> {
    const BLOCK: u8 = 16;
    let setup = Setup {
        peer: true,
        drain_timeout_s: 60,
        ..Setup::default()
    };
    let (bed, server, one, two) = two_peers_with(BLOCK, ["st-1", "st-2"], setup).await?;
    let (mut a, mut b, session, endpoint, _) = duel(&server, ["sa1", "sb1"], "eu").await?;
    let (stopping, staying) = if endpoint.contains(&one.gateway) {
        (one, two)
    } else {
        (two, one)
    };
    // hostd is told to stop: it drains, the server moves its match, and it exits once empty.
    signal(stopping.child.id(), nix::sys::signal::Signal::SIGTERM)?;
    let elsewhere = endpoint_of(&staying.gateway);
    let ticket = both_moved_to(&elsewhere, [&mut a, &mut b]).await?;
    stopping.exited_within(Duration::from_secs(30))?;
    surrender(&elsewhere, &ticket, [&mut a, &mut b]).await?;
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.end_reason.as_deref(), Some("surrender"));
    finish(vec![staying], server, bed, BLOCK).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_target_dies_leaves_the_match_playing_on_the_source() -> Result<()> {
    const BLOCK: u8 = 17;
    let (bed, server, one, two) = two_peers(BLOCK, ["td-1", "td-2"]).await?;
    let (mut a, mut b, session, endpoint, ticket) = duel(&server, ["ta", "tb"], "eu").await?;
    let (source, target) = serving(&endpoint, &one, &two);
    let mut game = join(&endpoint, &ticket).await?;
    // The move starts; the target's receiving VM is killed as soon as it appears.
    let before: Vec<u32> = qemu_naming(&target.dir);
    let moving = {
        let (addr, id) = (server.addr, session.clone());
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("http://{addr}/v1/admin/sessions/{id}/migrate"))
                .bearer_auth(fixtures::admin_token())
                .send()
                .await?;
            anyhow::Ok((r.status().as_u16(), r.json::<serde_json::Value>().await?))
        })
    };
    let t0 = Instant::now();
    let victim = loop {
        let fresh: Vec<u32> = qemu_naming(&target.dir)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        if let Some(pid) = fresh.first() {
            break *pid;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "no receiving VM appeared"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    signal(victim, nix::sys::signal::Signal::SIGKILL)?;
    let (status, body) = moving.await??;
    assert_eq!(
        (status, body["code"].as_str()),
        (502, Some("migration_failed")),
        "{body}"
    );
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.state, SessionState::Active);
    assert!(s.migration.is_none());
    assert_eq!(
        s.endpoint.as_deref(),
        Some(endpoint.as_str()),
        "still on {}",
        source.gateway
    );
    // The same game connection goes on, and the match ends there with its results.
    game.until(Duration::from_secs(10), |h| {
        matches!(h, Heard::Answer(GameAnswer::State(_)))
    })
    .await?;
    game.send(&GameRequest::Surrender).await?;
    for c in [&mut a, &mut b] {
        let (reason, results) = client::ended(c).await?;
        assert_eq!(reason, "surrender");
        assert!(!results["winner"].is_null(), "{results}");
    }
    finish(vec![one, two], server, bed, BLOCK).await
}
