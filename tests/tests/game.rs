//! The arena game in real VMs: players join with session tickets, play, and the game's end
//! reaches hostd with results. Players here talk to the game port directly (as the gateway
//! does), so these tests check the game's own ticket checks; `gateway.rs` checks the gateway's.

use anyhow::{bail, Context, Result};
use berth_hostd::pool::{ActivateRequest, PoolEvent};
use berth_protocol::game::{GameAnswer, GameRequest, GameResults, Snapshot, Welcome};
use berth_protocol::ticket::{TicketClaims, TICKET_AUDIENCE};
use berth_protocol::{PlayerId, SessionId};
use berth_server::auth::Auth;
use berth_server::config::AuthConfig;
use berth_testkit::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const KEY: &str = "00112233445566778899aabbccddeeff";

fn pid(s: &str) -> PlayerId {
    PlayerId::new(s).expect("valid")
}

fn duel(session: &str, params: serde_json::Value) -> ActivateRequest {
    ActivateRequest {
        session_id: SessionId::new(session).expect("valid"),
        image: "arena".into(),
        players: vec![pid("alice"), pid("bob")],
        teams: vec![vec![pid("alice")], vec![pid("bob")]],
        params,
        ticket_key: KEY.into(),
        deadline_ms: 0,
    }
}

fn auth() -> Auth {
    Auth::new(&AuthConfig {
        secret: "test-secret-0123456789".into(),
        ..AuthConfig::default()
    })
    .expect("valid auth config")
}

/// A ticket as the server mints it.
fn ticket(key: &str, session: &str, player: &str) -> String {
    auth()
        .ticket(
            key,
            &SessionId::new(session).expect("id"),
            &pid(player),
            60_000,
        )
        .expect("mint")
        .0
}

/// A ticket with claims of the test's choosing (signed with `key`).
fn custom_ticket(key: &str, kid: &str, claims: &TicketClaims) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.into());
    let key = hex_key(key);
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(&key),
    )
    .expect("encode")
}

fn hex_key(key: &str) -> Vec<u8> {
    (0..key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&key[i..i + 2], 16).expect("hex"))
        .collect()
}

fn claims(session: &str, player: &str, exp: u64) -> TicketClaims {
    TicketClaims {
        sub: pid(player),
        sid: SessionId::new(session).expect("id"),
        aud: TICKET_AUDIENCE.into(),
        iss: "berth".into(),
        exp,
        iat: now_ms() / 1000,
        jti: format!("custom-{player}-{exp}"),
    }
}

/// A player's TCP connection to the game port.
struct Player {
    lines: Lines<BufReader<OwnedReadHalf>>,
    wr: OwnedWriteHalf,
}

impl Player {
    async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut p = Self {
            lines: BufReader::new(rd).lines(),
            wr,
        };
        match p.next().await? {
            Some(GameAnswer::Hello { .. }) => Ok(p),
            other => bail!("expected hello, got {other:?}"),
        }
    }

    async fn request(&mut self, r: &GameRequest) -> Result<()> {
        self.send(&serde_json::to_string(r)?).await
    }

    async fn send(&mut self, line: &str) -> Result<()> {
        self.wr.write_all(line.as_bytes()).await?;
        self.wr.write_all(b"\n").await?;
        Ok(())
    }

    /// The next answer; `None` once the game closed the connection.
    async fn next(&mut self) -> Result<Option<GameAnswer>> {
        let line = tokio::time::timeout(Duration::from_secs(15), self.lines.next_line())
            .await
            .context("no answer within 15 s")?;
        match line {
            Ok(Some(l)) => Ok(Some(serde_json::from_str(&l)?)),
            Ok(None) | Err(_) => Ok(None),
        }
    }

    async fn join(addr: SocketAddr, ticket: &str) -> Result<(Self, Welcome)> {
        let mut p = Self::connect(addr).await?;
        p.request(&GameRequest::Join {
            ticket: ticket.to_string(),
        })
        .await?;
        match p.next().await? {
            Some(GameAnswer::Welcome(w)) => Ok((p, w)),
            other => bail!("expected welcome, got {other:?}"),
        }
    }

    /// Skips states until one matching `f`.
    async fn state_until(&mut self, mut f: impl FnMut(&Snapshot) -> bool) -> Result<Snapshot> {
        loop {
            match self.next().await? {
                Some(GameAnswer::State(s)) if f(&s) => return Ok(s),
                Some(GameAnswer::State(_)) | Some(GameAnswer::Pong { .. }) => continue,
                other => bail!("expected a state, got {other:?}"),
            }
        }
    }

    /// Reads until `ended` (skipping states), then expects the connection to close.
    async fn ended(&mut self) -> Result<(String, GameResults)> {
        loop {
            match self.next().await? {
                Some(GameAnswer::State(_)) | Some(GameAnswer::Pong { .. }) => continue,
                Some(GameAnswer::Ended { reason, results }) => {
                    if let Some(more) = self.next().await? {
                        bail!("the game said more after ended: {more:?}");
                    }
                    return Ok((reason, results));
                }
                other => bail!("expected ended, got {other:?}"),
            }
        }
    }

    /// Expects an error with `code` and then the connection closed.
    async fn refused(mut self, code: &str) -> Result<()> {
        match self.next().await? {
            Some(GameAnswer::Error { code: c, .. }) if c == code => {}
            other => bail!("expected error {code}, got {other:?}"),
        }
        if let Some(more) = self.next().await? {
            bail!("the connection stayed open after {code}: {more:?}");
        }
        Ok(())
    }
}

async fn next_ended(
    events: &mut tokio::sync::broadcast::Receiver<PoolEvent>,
) -> Result<(SessionId, String, serde_json::Value)> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(PoolEvent::Ended {
                    session_id,
                    reason,
                    results,
                    ..
                }) => return Ok((session_id, reason, results)),
                Ok(_) => continue,
                Err(e) => bail!("event stream ended: {e}"),
            }
        }
    })
    .await
    .context("no ended event within 30 s")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duel_is_played_to_its_end_in_a_real_vm() -> Result<()> {
    let sb = Sandbox::docked("game-duel").await?;
    let mut events = sb.pool.subscribe();
    let vm = sb
        .pool
        .activate(duel("duel-1", serde_json::json!({"score_limit": 3})))
        .await?;
    let (mut alice, welcome) = Player::join(vm.game_addr, &ticket(KEY, "duel-1", "alice")).await?;
    assert_eq!(welcome.player.as_str(), "alice");
    assert_eq!(
        (welcome.team, welcome.tick_hz, welcome.score_limit),
        (0, 20, 3)
    );
    assert!(!welcome.rejoined);
    assert_eq!(welcome.map.rows.len() as u32, welcome.map.height);
    assert!(welcome
        .map
        .rows
        .iter()
        .all(|r| r.len() as u32 == welcome.map.width));
    let first = alice.state_until(|_| true).await?;
    let me = first.players.iter().find(|p| p.id.as_str() == "alice");
    let me = me.context("alice in the first state")?;
    let (start_x, start_y) = (me.x, me.y);

    let (mut bob, welcome) = Player::join(vm.game_addr, &ticket(KEY, "duel-1", "bob")).await?;
    assert_eq!(welcome.team, 1);
    // Alice moves: the game applies her input (acked) and her position changes. Spawn points
    // are random per session: a wall may block one way, so each direction gets its turn.
    let toward_centre = if start_x < welcome.map.width as f32 / 2.0 {
        1.0
    } else {
        -1.0
    };
    let tries = [
        (toward_centre, 0.0),
        (-toward_centre, 0.0),
        (0.0, 1.0),
        (0.0, -1.0),
    ];
    let mut moved = None;
    for (seq, (dx, dy)) in (7u32..).zip(tries) {
        alice
            .send(&format!(
                r#"{{"type":"input","seq":{seq},"dx":{dx},"dy":{dy}}}"#
            ))
            .await?;
        let mut seen = 0;
        let state = alice
            .state_until(|s| {
                seen += 1;
                seen > 40
                    || (s.ack == seq
                        && s.players.iter().any(|p| {
                            p.id.as_str() == "alice"
                                && ((p.x - start_x).abs() > 0.2 || (p.y - start_y).abs() > 0.2)
                        }))
            })
            .await?;
        if state.ack == seq && seen <= 40 {
            moved = Some(state);
            break;
        }
    }
    let moved = moved.context("alice's input never moved her, in any direction")?;
    assert_eq!(moved.players.len(), 2, "both players are in the world");
    assert!(moved.tick > first.tick);
    bob.send(r#"{"type":"ping","nonce":42}"#).await?;
    loop {
        match bob.next().await? {
            Some(GameAnswer::Pong { nonce: 42, .. }) => break,
            Some(GameAnswer::State(_)) => continue,
            other => bail!("expected pong, got {other:?}"),
        }
    }
    // Bob gives up: both hear the end, with alice's team the winner.
    bob.send(r#"{"type":"surrender"}"#).await?;
    let (reason, results) = alice.ended().await?;
    assert_eq!((reason.as_str(), results.winner), ("surrender", Some(0)));
    assert_eq!(bob.ended().await?.1, results);
    assert_eq!(results.players.len(), 2);
    assert!(results.players.iter().all(|p| p.joined));
    // ...and hostd hears it from the agent, with the same results.
    let (session, reason, reported) = next_ended(&mut events).await?;
    assert_eq!((session.as_str(), reason.as_str()), ("duel-1", "surrender"));
    assert_eq!(serde_json::from_value::<GameResults>(reported)?, results);
    sb.gone(vm.vm_id.as_str()).await?;
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_game_admits_only_valid_tickets() -> Result<()> {
    let sb = Sandbox::docked("game-tickets").await?;
    let vm = sb
        .pool
        .activate(duel("gate-1", serde_json::json!({})))
        .await?;
    let addr = vm.game_addr;
    let later = now_ms() / 1000 + 60;
    let refusals = [
        // Forged: signed with another key.
        (
            ticket("ffeeddccbbaa99887766554433221100", "gate-1", "alice"),
            "bad_ticket",
        ),
        // Expired.
        (
            custom_ticket(
                KEY,
                "gate-1",
                &claims("gate-1", "alice", now_ms() / 1000 - 5),
            ),
            "ticket_expired",
        ),
        // For another session (signed with this key, so only the binding is wrong).
        (ticket(KEY, "gate-2", "alice"), "wrong_session"),
        (
            custom_ticket(KEY, "gate-1", &claims("gate-2", "alice", later)),
            "wrong_session",
        ),
        // A player who is not in this session.
        (ticket(KEY, "gate-1", "carol"), "not_a_player"),
        ("not a ticket".to_owned(), "bad_ticket"),
    ];
    for (t, code) in &refusals {
        let mut p = Player::connect(addr).await?;
        p.request(&GameRequest::Join {
            ticket: t.to_string(),
        })
        .await?;
        p.refused(code)
            .await
            .with_context(|| format!("case {code}"))?;
    }
    // Anything but join (or ping) first is refused.
    let mut p = Player::connect(addr).await?;
    p.send(r#"{"type":"ping","nonce":1}"#).await?;
    assert!(matches!(
        p.next().await?,
        Some(GameAnswer::Pong { nonce: 1, .. })
    ));
    p.send(r#"{"type":"input","seq":1,"dx":1}"#).await?;
    p.refused("join_first").await?;

    // A ticket replayed while its connection is live is refused; a newer ticket of the same
    // player takes over (the phone reconnected), and the older connection is told why.
    let alice_ticket = ticket(KEY, "gate-1", "alice");
    let (mut first, _) = Player::join(addr, &alice_ticket).await?;
    let mut replay = Player::connect(addr).await?;
    replay
        .request(&GameRequest::Join {
            ticket: alice_ticket.to_string(),
        })
        .await?;
    replay.refused("ticket_in_use").await?;
    let (mut second, welcome) = Player::join(addr, &ticket(KEY, "gate-1", "alice")).await?;
    assert!(welcome.rejoined, "alice keeps her place");
    loop {
        match first.next().await? {
            Some(GameAnswer::State(_)) => continue,
            Some(GameAnswer::Error { code, .. }) if code == "replaced" => break,
            other => bail!("expected replaced, got {other:?}"),
        }
    }
    assert!(
        first.next().await?.is_none(),
        "the replaced connection is closed"
    );
    // Garbage from a joined player gets a stable error, and the game goes on.
    second.send("{not json").await?;
    loop {
        match second.next().await? {
            Some(GameAnswer::State(_)) => continue,
            Some(GameAnswer::Error { code, .. }) if code == "bad_json" => break,
            other => bail!("expected bad_json, got {other:?}"),
        }
    }
    second.state_until(|_| true).await?;
    // Once the connection is gone, the same ticket may join again (a phone's reconnect).
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut again, welcome) = Player::join(addr, &alice_ticket).await?;
    assert!(welcome.rejoined);
    // Leaving for good: bob never came and alice leaves, so nobody is left.
    again.send(r#"{"type":"leave"}"#).await?;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = again.next().await {}
    })
    .await?;
    sb.gone(vm.vm_id.as_str()).await?;
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_nobody_joins_ends_as_abandoned() -> Result<()> {
    let sb = Sandbox::docked("game-abandoned").await?;
    let mut events = sb.pool.subscribe();
    let vm = sb
        .pool
        .activate(duel(
            "empty-1",
            serde_json::json!({"abandon_after_s": 2, "rejoin_grace_s": 60}),
        ))
        .await?;
    let (session, reason, results) = next_ended(&mut events).await?;
    assert_eq!(
        (session.as_str(), reason.as_str()),
        ("empty-1", "abandoned")
    );
    let results: GameResults = serde_json::from_value(results)?;
    assert_eq!(results.winner, None);
    assert!(results.players.iter().all(|p| !p.joined));
    sb.gone(vm.vm_id.as_str()).await?;
    sb.finish().await
}

/// A free loopback address for a receiving VM to listen on.
fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_game_moves_to_another_host_with_its_state() -> Result<()> {
    let src = Sandbox::docked("game-mig-src").await?;
    let dst = Sandbox::docked("game-mig-dst").await?;
    let mut events = dst.pool.subscribe();
    let req = duel("mig-1", serde_json::json!({"score_limit": 3}));
    let vm = src.pool.activate(req.clone()).await?;
    let (mut alice, _) = Player::join(vm.game_addr, &ticket(KEY, "mig-1", "alice")).await?;
    let before = alice.state_until(|s| s.tick > 10).await?;

    // The target listens; the source sends the running VM there.
    let listen = free_addr()?;
    let incoming = dst.pool.receive(req, listen).await?;
    let moved = src.pool.send(&req_session("mig-1"), listen).await?;
    let info = incoming.finish(Duration::from_secs(30)).await?;
    println!("migrated: {moved:?}");
    assert!(moved.sent_bytes > 0 && moved.total_ms > 0, "{moved:?}");
    assert_eq!(info.path, berth_hostd::pool::ActivationPath::Migrated);
    src.gone(vm.vm_id.as_str()).await?;
    assert!(
        src.pool.status().vms.is_empty(),
        "nothing left on the source"
    );

    // Alice's connection went with the source; she rejoins on the target and the world goes on
    // from where it was: the same session, later ticks, the clock and scores kept.
    drop(alice);
    let (mut alice, welcome) = Player::join(info.game_addr, &ticket(KEY, "mig-1", "alice")).await?;
    assert!(welcome.rejoined, "the game knew alice already: {welcome:?}");
    assert_eq!(welcome.session_id.as_str(), "mig-1");
    let after = alice.state_until(|_| true).await?;
    assert!(
        after.tick > before.tick,
        "{} then {}",
        before.tick,
        after.tick
    );
    assert_eq!(after.scores, before.scores);
    assert!(after.time_left_ms < before.time_left_ms);
    let skew = after.clock_ms as i64 - now_ms() as i64;
    assert!(
        skew.abs() < 2_000,
        "the guest clock is {skew} ms off after the move"
    );
    // The game ends on the target, and its results come from there.
    let (mut bob, _) = Player::join(info.game_addr, &ticket(KEY, "mig-1", "bob")).await?;
    bob.send(r#"{"type":"surrender"}"#).await?;
    let (reason, results) = alice.ended().await?;
    assert_eq!((reason.as_str(), results.winner), ("surrender", Some(0)));
    let (session, reason, _) = next_ended(&mut events).await?;
    assert_eq!((session.as_str(), reason.as_str()), ("mig-1", "surrender"));
    dst.gone(info.vm_id.as_str()).await?;
    src.finish().await?;
    dst.finish().await
}

fn req_session(id: &str) -> SessionId {
    SessionId::new(id).expect("id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_whose_target_dies_leaves_the_game_playing_on_the_source() -> Result<()> {
    let src = Sandbox::docked("game-mig-keep").await?;
    let dst = Sandbox::docked("game-mig-dies").await?;
    let req = duel("mig-2", serde_json::json!({}));
    let vm = src.pool.activate(req.clone()).await?;
    let (mut alice, _) = Player::join(vm.game_addr, &ticket(KEY, "mig-2", "alice")).await?;
    let before = alice.state_until(|_| true).await?;
    let listen = free_addr()?;
    let incoming = dst.pool.receive(req, listen).await?;
    // The target's QEMU dies as the stream starts.
    let send = {
        let pool = src.pool.clone();
        tokio::spawn(async move { pool.send(&req_session("mig-2"), listen).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    kill_qemu_naming(&dst.dir);
    let sent = send.await?;
    assert!(sent.is_err(), "the migration cannot have worked: {sent:?}");
    assert!(incoming.finish(Duration::from_secs(5)).await.is_err());
    // The game plays on at the source, on the same connection.
    let later = alice.state_until(|s| s.tick > before.tick + 5).await?;
    assert_eq!(later.scores, before.scores);
    assert_eq!(src.vm_of(&req_session("mig-2"))?.vm_id, vm.vm_id);
    drop(alice);
    src.pool.destroy("mig-2").await?;
    src.finish().await?;
    dst.finish().await
}
