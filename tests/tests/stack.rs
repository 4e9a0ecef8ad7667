//! The control plane with real hosts: berth-server (memory store, and two replicas on a real
//! Redis) + hostd's link + a pool of real QEMU VMs running the real guest. Players queue over
//! real websockets, are matched onto a real VM, and hear how the session ended.

use berth_testkit::player as client;

use anyhow::{bail, ensure, Context, Result};
use berth_protocol::game::GameAnswer;
use berth_protocol::play::ServerMessage;
use berth_protocol::ticket::{TicketClaims, TICKET_AUDIENCE};
use berth_protocol::{HostId, SessionId};
use berth_server::app::Server;
use berth_server::auth::Role;
use berth_server::config::ServerConfig;
use berth_server::model::{HostState, SessionState};
use berth_server::store::redis::RedisStore;
use berth_server::store::Store;
use berth_testkit::fixtures::TempDir;
use berth_testkit::{game_hello, game_surrender, Sandbox};
use client::{admin_token, auth, config, ended, queue, Client};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A hostd link to `server` for `sandbox`'s pool, stopped by dropping the returned sender.
fn link(sandbox: &Sandbox, server: &Server) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    link_as(sandbox, &[server], "test-host")
}

/// A link as `host` knowing the replicas `servers`.
fn link_as(
    sandbox: &Sandbox,
    servers: &[&Server],
    host: &str,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let token = auth().mint(host, Role::Host, 3600).expect("mint");
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    berth_testkit::start_link(
        &sandbox.pool,
        &addrs,
        host,
        token,
        "ws://127.0.0.1:7071/v1/game",
    )
}

/// A connection to the test Redis under the key prefix of this run's `name`.
async fn redis_store(name: &str) -> Result<Arc<dyn Store>> {
    let url = berth_testkit::fixtures::redis_url()?;
    let prefix = format!("berth-{name}-{}", std::process::id());
    Ok(Arc::new(RedisStore::connect(&url, &prefix).await?))
}

/// Two replicas on one Redis store (`name`'s), each with its own connection; read each one's
/// store as `r.ctx.store`.
async fn replicas(name: &str, config: ServerConfig) -> Result<(Server, Server)> {
    let r1 = Server::start_with(config.clone(), redis_store(name).await?).await?;
    let r2 = Server::start_with(config, redis_store(name).await?).await?;
    Ok((r1, r2))
}

fn stack_config() -> ServerConfig {
    let mut c = config();
    c.timeouts.host_heartbeat_ms = 500;
    c.timeouts.host_lost_ms = 2000;
    c.timeouts.host_grace_ms = 3000;
    c
}

/// [`link`], then waits until the server knows the host up with its substrate docked.
async fn linked(
    sandbox: &Sandbox,
    server: &Server,
) -> Result<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)> {
    let stopper = link(sandbox, server);
    host_until(&server.ctx.store, |h| {
        h.state == HostState::Up && h.images.iter().any(|i| i.docked)
    })
    .await?;
    Ok(stopper)
}

/// Two players (`a` on `ra`, `b` on `rb`) queue for `mode` in `eu` and are matched together:
/// both, and the session, endpoint and ticket `a` heard.
async fn pair(
    (ra, a): (&Server, &str),
    (rb, b): (&Server, &str),
    mode: &str,
) -> Result<(Client, Client, (SessionId, String, String))> {
    let mut a = client::player(ra, a).await?;
    let mut b = client::player(rb, b).await?;
    a.send(&queue(mode, "eu")).await?;
    b.send(&queue(mode, "eu")).await?;
    let heard = matched(&mut a).await?;
    let (sb, _, _) = matched(&mut b).await?;
    ensure!(heard.0 == sb, "one session for both: {} and {sb}", heard.0);
    Ok((a, b, heard))
}

/// Waits until `f` holds for the server's view of the host.
async fn host_until(
    store: &Arc<dyn Store>,
    f: impl Fn(&berth_server::model::HostRecord) -> bool,
) -> Result<()> {
    host_named_until(store, "test-host", f).await
}

async fn host_named_until(
    store: &Arc<dyn Store>,
    name: &str,
    f: impl Fn(&berth_server::model::HostRecord) -> bool,
) -> Result<()> {
    let host = HostId::new(name)?;
    for _ in 0..200 {
        if store.host(&host).await?.is_some_and(|h| f(&h)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "host never reached the expected state: {:?}",
        store.host(&host).await?
    )
}

async fn session_until(store: &Arc<dyn Store>, id: &SessionId, state: SessionState) -> Result<()> {
    for _ in 0..200 {
        if store.session(id).await?.is_some_and(|s| s.state == state) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "session {id} never reached {state:?}: {:?}",
        store.session(id).await?
    )
}

async fn matched(c: &mut Client) -> Result<(SessionId, String, String)> {
    match c
        .until(Duration::from_secs(30), |m| {
            !matches!(m, ServerMessage::QueueStatus { .. })
        })
        .await?
    {
        ServerMessage::Matched {
            session,
            endpoint,
            ticket,
            teams,
            ..
        } => {
            assert_eq!(teams.len(), 2);
            Ok((session, endpoint, ticket))
        }
        other => bail!("expected matched, got {other:?}"),
    }
}

async fn no_vms_left(sandbox: &Sandbox) -> Result<()> {
    for _ in 0..100 {
        if sandbox.pool.status().vms.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("VMs still running: {:?}", sandbox.pool.status().vms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_are_matched_onto_a_real_vm_and_hear_the_results() -> Result<()> {
    let sandbox = Sandbox::start("stack-play", 1).await?;
    let server = Server::start(stack_config()).await?;
    let store = server.ctx.store.clone();
    let (stop, task) = link(&sandbox, &server);
    host_until(&store, |h| {
        h.state == HostState::Up && h.images.iter().any(|i| i.docked && i.warm >= 1)
    })
    .await?;

    let (mut a, b, (sa, endpoint, ticket)) =
        pair((&server, "alice"), (&server, "bob"), "duel").await?;
    assert_eq!(endpoint, "ws://127.0.0.1:7071/v1/game");

    // The ticket is bound to this session and this player, signed with the session's key.
    let s = store.session(&sa).await?.context("session stored")?;
    assert_eq!(s.state, SessionState::Active);
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&[TICKET_AUDIENCE]);
    let claims = jsonwebtoken::decode::<TicketClaims>(
        &ticket,
        &jsonwebtoken::DecodingKey::from_secret(&hex_decode(&s.ticket_key)),
        &v,
    )?
    .claims;
    assert_eq!(
        (claims.sid.as_str(), claims.sub.as_str()),
        (sa.as_str(), "alice")
    );
    let header = jsonwebtoken::decode_header(&ticket)?;
    assert_eq!(
        header.kid.as_deref(),
        Some(sa.as_str()),
        "kid names the session"
    );

    // The VM is really there, with this session's identity and players.
    let vm = sandbox.vm_of(&sa)?;
    match game_hello(vm.game_addr).await? {
        GameAnswer::Hello {
            session_id,
            players,
            ..
        } => {
            assert_eq!(session_id, sa);
            assert_eq!(players.len(), 2);
        }
        other => bail!("unexpected {other:?}"),
    }

    // A reconnecting player is handed its session again, with a fresh ticket.
    drop(b);
    let mut b = client::player(&server, "bob").await?;
    let (again, _, ticket2) = matched(&mut b).await?;
    assert_eq!(again, sa);
    assert_ne!(ticket2, ticket);

    // Game over inside the VM: alice gives up (with her first ticket, still valid); both
    // players hear it with the game's results; the VM is gone.
    let bob_team = s
        .teams
        .iter()
        .position(|t| t.iter().any(|p| p.as_str() == "bob"))
        .context("bob has a team")? as u32;
    let (reason, results) = game_surrender(vm.game_addr, &ticket).await?;
    assert_eq!(
        (reason.as_str(), results.winner),
        ("surrender", Some(bob_team))
    );
    for c in [&mut a, &mut b] {
        let (reason, results) = ended(c).await?;
        assert_eq!(reason, "surrender");
        assert_eq!(results["winner"], bob_team);
    }
    session_until(&store, &sa, SessionState::Ended).await?;
    no_vms_left(&sandbox).await?;
    let s = store.session(&sa).await?.context("kept with results")?;
    assert_eq!(s.results["winner"], bob_team);
    assert_eq!(s.results["players"].as_array().map(Vec::len), Some(2));
    let states: Vec<SessionState> = s.history.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            SessionState::Placing,
            SessionState::Activating,
            SessionState::Active,
            SessionState::Ending,
            SessionState::Ended
        ]
    );

    // Activation and time to match are measured.
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await?
        .text()
        .await?;
    for want in [
        r#"berth_activation_seconds_count{path="warm"} 1"#,
        r#"berth_time_to_match_seconds_count{mode="duel"} 1"#,
        r#"berth_queue_wait_seconds_count{mode="duel"} 2"#,
        r#"berth_sessions_ended_total{reason="surrender"} 1"#,
    ] {
        assert!(metrics.contains(want), "metrics lack {want:?}:\n{metrics}");
    }

    // Both can play again.
    a.send(&queue("duel", "eu")).await?;
    b.send(&queue("duel", "eu")).await?;
    let (s2, _, _) = matched(&mut a).await?;
    assert_ne!(s2, sa);
    matched(&mut b).await?;

    drop(stop);
    task.await?;
    server.shutdown().await;
    sandbox.finish().await
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_end_drain_and_a_lost_host() -> Result<()> {
    let sandbox = Sandbox::start("stack-admin", 0).await?;
    let mut cfg = stack_config();
    cfg.timeouts.placing_ms = 1500;
    let server = Server::start(cfg).await?;
    let store = server.ctx.store.clone();
    let (stop, task) = linked(&sandbox, &server).await?;
    let http = reqwest::Client::new();
    let admin = |path: &str| {
        http.post(format!("http://{}{path}", server.addr))
            .bearer_auth(admin_token())
    };

    // An operator ends a running session: players hear `admin`, the VM is destroyed.
    let (mut a, mut b, (s1, _, _)) = pair((&server, "carl"), (&server, "dina"), "duel").await?;
    let r = admin(&format!("/v1/admin/sessions/{s1}/end"))
        .send()
        .await?;
    assert_eq!(r.status(), 200, "{}", r.text().await?);
    assert_eq!(ended(&mut a).await?.0, "admin");
    assert_eq!(ended(&mut b).await?.0, "admin");
    session_until(&store, &s1, SessionState::Ended).await?;
    no_vms_left(&sandbox).await?;
    let r = admin(&format!("/v1/admin/sessions/{s1}/end"))
        .send()
        .await?;
    assert_eq!(r.status(), 409, "ending twice");

    // A drained host gets no new sessions; undrained it does.
    let r = admin("/v1/admin/hosts/test-host/drain").send().await?;
    assert_eq!(r.status(), 200);
    a.send(&queue("duel", "eu")).await?;
    b.send(&queue("duel", "eu")).await?;
    assert_eq!(ended(&mut a).await?.0, "placement_failed");
    assert_eq!(ended(&mut b).await?.0, "placement_failed");
    assert!(sandbox.pool.status().vms.is_empty());
    admin("/v1/admin/hosts/test-host/undrain").send().await?;
    a.send(&queue("duel", "eu")).await?;
    b.send(&queue("duel", "eu")).await?;
    let (s2, _, _) = matched(&mut a).await?;
    matched(&mut b).await?;

    // The host goes silent past the grace: its session ends as `host_lost` within seconds.
    drop(stop);
    task.await?;
    let t0 = std::time::Instant::now();
    assert_eq!(ended(&mut a).await?.0, "host_lost");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    session_until(&store, &s2, SessionState::Ended).await?;
    // The VM still runs on the host; when it reconnects, reconciliation destroys it.
    assert_eq!(sandbox.pool.status().vms.len(), 1);
    let (stop, task) = link(&sandbox, &server);
    no_vms_left(&sandbox).await?;
    host_until(&store, |h| h.state == HostState::Up).await?;

    drop(stop);
    task.await?;
    server.shutdown().await;
    sandbox.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_serve_players_on_either() -> Result<()> {
    let sandbox = Sandbox::start("stack-redis", 1).await?;
    let (r1, r2) = replicas("stack", stack_config()).await?;
    let one = r1.ctx.store.clone();
    let (stop, task) = link(&sandbox, &r1);
    host_until(&one, |h| {
        h.state == HostState::Up && h.images.iter().any(|i| i.docked)
    })
    .await?;

    // Player on replica 1, player on replica 2: one match, one VM (host held by replica 1).
    let (mut a, mut b, (sa, _, _)) = pair((&r1, "erik"), (&r2, "fay"), "duel").await?;
    // A second connection for fay on the other replica takes over.
    let mut b2 = client::player(&r1, "fay").await?;
    let (sb2, _, fay_ticket) = matched(&mut b2).await?;
    assert_eq!(sb2, sa);
    b.until(
        Duration::from_secs(5),
        |m| matches!(m, ServerMessage::Error { code, .. } if code == "replaced"),
    )
    .await?;

    let vm = sandbox.vm_of(&sa)?;
    // fay gives up: erik's side wins, and both hear it across the replicas.
    let (_, results) = game_surrender(vm.game_addr, &fay_ticket).await?;
    let (reason, erik_results) = ended(&mut a).await?;
    assert_eq!(reason, "surrender");
    assert_eq!(ended(&mut b2).await?.1, erik_results);
    assert_eq!(erik_results["winner"], serde_json::json!(results.winner));
    no_vms_left(&sandbox).await?;

    drop(stop);
    task.await?;
    r1.shutdown().await;
    r2.shutdown().await;
    sandbox.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_going_down_moves_its_host_to_another_and_ends_no_match() -> Result<()> {
    let sandbox = Sandbox::start("stack-failover", 1).await?;
    let (r1, r2) = replicas("failover", stack_config()).await?;
    let two = r2.ctx.store.clone();
    let (first, second) = (r1.ctx.replica.clone(), r2.ctx.replica.clone());
    let (stop, task) = link_as(&sandbox, &[&r1, &r2], "test-host");
    host_until(&two, |h| {
        h.replica == first && h.images.iter().any(|i| i.docked)
    })
    .await?;
    let (mut a, _b, (live, _, ticket)) = pair((&r2, "gil"), (&r2, "hal"), "duel").await?;

    // The replica holding the host's link goes away and stays away, longer than the grace.
    r1.shutdown().await;
    host_until(&two, |h| h.replica == second && h.state == HostState::Up).await?;
    tokio::time::sleep(Duration::from_millis(stack_config().timeouts.host_grace_ms)).await;
    // A match formed during the outage is placed on the host, through the other replica.
    let (mut c, _d, (placed, _, new_ticket)) = pair((&r2, "ida"), (&r2, "jon"), "duel").await?;
    session_until(&two, &placed, SessionState::Active).await?;
    // Both matches play to their end, and their players hear the results.
    for (session, ticket, player) in [(&live, &ticket, &mut a), (&placed, &new_ticket, &mut c)] {
        let vm = sandbox.vm_of(session)?;
        game_surrender(vm.game_addr, ticket).await?;
        assert_eq!(ended(player).await?.0, "surrender");
    }
    no_vms_left(&sandbox).await?;

    drop(stop);
    task.await?;
    r2.shutdown().await;
    sandbox.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_a_game_that_ends_while_the_link_is_down_reach_the_players_after() -> Result<()>
{
    let sandbox = Sandbox::start("stack-outbox", 1).await?;
    let mut cfg = stack_config();
    cfg.timeouts.host_grace_ms = 60_000;
    let (r1, r2) = replicas("outbox", cfg.clone()).await?;
    let two = r2.ctx.store.clone();
    // The host knows replica 1 only; the players are on replica 2.
    let (stop, task) = link_as(&sandbox, &[&r1], "test-host");
    host_until(&two, |h| {
        h.state == HostState::Up && h.images.iter().any(|i| i.docked)
    })
    .await?;
    let (mut a, mut b, (session, _, ticket)) = pair((&r2, "kai"), (&r2, "lea"), "duel").await?;
    session_until(&two, &session, SessionState::Active).await?;

    // The link goes down, and the game ends meanwhile: its report waits in hostd's outbox.
    let addr = r1.addr;
    r1.shutdown().await;
    let vm = sandbox.vm_of(&session)?;
    game_surrender(vm.game_addr, &ticket).await?;
    let outbox = sandbox.pool.outbox();
    for _ in 0..100 {
        if !outbox.pending().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(outbox.pending().len() == 1, "{:?}", outbox.pending());
    let s = two.session(&session).await?.context("kept")?;
    ensure!(s.state == SessionState::Active, "{:?}", s.end_reason);

    // The replica comes back: the report rides in `register`, and both players hear the end.
    cfg.listen = addr;
    let r1 = Server::start_with(cfg, redis_store("outbox").await?).await?;
    for player in [&mut a, &mut b] {
        let (reason, results) = ended(player).await?;
        assert_eq!(reason, "surrender");
        assert!(!results["winner"].is_null(), "{results}");
    }
    for _ in 0..50 {
        if outbox.pending().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        outbox.pending().is_empty(),
        "recorded reports are forgotten"
    );
    no_vms_left(&sandbox).await?;

    drop(stop);
    task.await?;
    r1.shutdown().await;
    r2.shutdown().await;
    sandbox.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_retries_another_host_when_activation_fails() -> Result<()> {
    let images = || vec![berth_testkit::image_config("arena", 0)];
    let seed = ["arena".to_owned()];
    let bad = Sandbox::start_custom("stack-bad", images(), &seed, |c| {
        c.host_id = "host-a".into()
    })
    .await?;
    let good = Sandbox::start_custom("stack-good", images(), &seed, |c| {
        c.host_id = "host-b".into()
    })
    .await?;
    let server = Server::start(stack_config()).await?;
    let store = server.ctx.store.clone();
    let (stop_a, task_a) = link_as(&bad, &[&server], "host-a");
    let (stop_b, task_b) = link_as(&good, &[&server], "host-b");
    for h in ["host-a", "host-b"] {
        host_named_until(&store, h, |h| {
            h.state == HostState::Up && h.images.iter().any(|i| i.docked)
        })
        .await?;
    }
    // host-a's docked substrate is damaged behind its back: its activations fail.
    std::fs::write(
        bad.dir.join("substrates/arena/state"),
        b"not a migration stream",
    )?;

    // Spread placement tries the idle host-a first at least once in two matches.
    let mut sessions = Vec::new();
    for round in 0..2 {
        let (ra, rb) = (format!("ra{round}"), format!("rb{round}"));
        let (_a, _b, (id, _, _)) = pair((&server, &ra), (&server, &rb), "duel").await?;
        sessions.push(store.session(&id).await?.context("stored")?);
    }
    for s in &sessions {
        assert_eq!(s.host.as_ref().map(|h| h.as_str()), Some("host-b"), "{s:?}");
    }
    let retried = sessions
        .iter()
        .filter(|s| s.tried_hosts.iter().any(|h| h.as_str() == "host-a"))
        .count();
    assert!(retried >= 1, "no session was retried: {sessions:?}");
    assert!(
        bad.pool.status().vms.is_empty(),
        "nothing left running on the failing host"
    );

    drop((stop_a, stop_b));
    task_a.await?;
    task_b.await?;
    server.shutdown().await;
    bad.finish().await?;
    good.finish().await
}

/// A raw client of `/v1/hosts` with `host`'s credential: an intruding host in this test.
/// A raw host socket, to speak as a host that should not be heard.
type HostWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn intruder(server: &Server, host: &str) -> Result<HostWs> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let token = auth().mint(host, Role::Host, 60)?;
    let mut req = format!("ws://{}/v1/hosts", server.addr).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

async fn host_says(ws: &mut HostWs, m: &berth_protocol::host::HostMessage) -> Result<()> {
    use futures_util::SinkExt;
    let text = serde_json::to_string(m)?;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
        .await?;
    Ok(())
}

async fn host_hears(ws: &mut HostWs) -> Result<berth_protocol::host::ServerToHost> {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .context("silence")?
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                return Ok(serde_json::from_str(&t)?)
            }
            Some(Ok(_)) => continue,
            other => bail!("host socket ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_failure_deadline_and_an_intruding_host() -> Result<()> {
    use berth_protocol::host::{HostMessage, HostVm, ServerToHost};
    // A mode whose matches last at most 3 s.
    let modes = TempDir::new("stack-modes")?;
    std::fs::write(
        modes.0.join("blitz.toml"),
        "image = \"arena\"\nteams = 2\nsession_max_s = 3\n[players]\nmin = 2\nmax = 2\n[vm]\nmemory_mib = 128\n",
    )?;
    let sandbox = Sandbox::start("stack-fail", 1).await?;
    let mut cfg = stack_config();
    cfg.modes_dir = modes.0.clone();
    let server = Server::start(cfg).await?;
    let store = server.ctx.store.clone();
    let (stop, task) = linked(&sandbox, &server).await?;

    let (mut a, mut b, (s1, _, _)) = pair((&server, "gus"), (&server, "hal"), "blitz").await?;

    // Another host claims this session's VM, and reports it over: refused, nothing changes.
    let mut other = intruder(&server, "intruder").await?;
    let vm = sandbox.vm_of(&s1)?;
    host_says(
        &mut other,
        &HostMessage::Register {
            v: 1,
            host: HostId::new("intruder")?,
            accel: "tcg".into(),
            driver: "qemu".into(),
            gateway: "ws://127.0.0.1:9".into(),
            max_vms: 1,
            images: vec![],
            vms: vec![HostVm {
                vm: vm.vm_id.clone(),
                session: s1.clone(),
                image: "arena".into(),
            }],
            region: None,
            zone: None,
            peer: None,
            outbox: vec![],
        },
    )
    .await?;
    assert!(matches!(
        host_hears(&mut other).await?,
        ServerToHost::Welcome { .. }
    ));
    assert!(
        matches!(host_hears(&mut other).await?, ServerToHost::Error { code, .. } if code == "foreign_session")
    );
    host_says(
        &mut other,
        &HostMessage::Ended {
            session: s1.clone(),
            vm: vm.vm_id.clone(),
            reason: "game_over".into(),
            results: serde_json::Value::Null,
        },
    )
    .await?;
    assert!(
        matches!(host_hears(&mut other).await?, ServerToHost::Error { code, .. } if code == "foreign_session")
    );
    assert_eq!(
        store.session(&s1).await?.context("kept")?.state,
        SessionState::Active
    );
    drop(other);

    // The VM dies: players hear `vm_failed`.
    berth_testkit::signal(vm.pid, nix::sys::signal::Signal::SIGKILL)?;
    assert_eq!(ended(&mut a).await?.0, "vm_failed");
    assert_eq!(ended(&mut b).await?.0, "vm_failed");
    session_until(&store, &s1, SessionState::Ended).await?;

    // A match that reaches the mode's session_max_s ends as `deadline`, its VM destroyed.
    a.send(&queue("blitz", "eu")).await?;
    b.send(&queue("blitz", "eu")).await?;
    let (s2, _, _) = matched(&mut a).await?;
    matched(&mut b).await?;
    let t0 = std::time::Instant::now();
    assert_eq!(ended(&mut a).await?.0, "deadline");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    session_until(&store, &s2, SessionState::Ended).await?;
    no_vms_left(&sandbox).await?;

    drop(stop);
    task.await?;
    server.shutdown().await;
    sandbox.finish().await
}
