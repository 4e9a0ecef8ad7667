//! The store's behavioural suite: every check runs against both backends, as
//! `memory::<name>` and `redis::<name>`, so the two cannot drift apart.
//!
//! The Redis half needs a Redis at `BERTH_TEST_REDIS` (e.g. `redis://127.0.0.1:6399/`);
//! `cargo xtask test` starts one. Without it those tests fail, never skip. Each test works under
//! its own random key prefix, so tests share one Redis without seeing each other.

use anyhow::{bail, ensure, Context, Result};
use berth_protocol::host::{HostVm, ImageCapacity};
use berth_protocol::play::PartySpec;
use berth_protocol::{HostId, PlayerId, SessionId, VmId};
use berth_server::model::{
    Binding, Event, HostRecord, HostState, PoolKey, Session, SessionState, Ticket, Transition,
};
use berth_server::store::memory::MemoryStore;
use berth_server::store::redis::RedisStore;
use berth_server::store::{Store, StoreError};
use berth_server::util::now_ms;
use berth_testkit::redis::PrivateRedis;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, Barrier};

// ---- backends ----

fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

fn redis_url() -> Result<String> {
    std::env::var("BERTH_TEST_REDIS").map_err(|_| {
        anyhow::anyhow!(
            "BERTH_TEST_REDIS is not set: the redis store tests need a Redis server. Run the \
             tests with `cargo xtask test` (it starts one), or start redis-server yourself and \
             set BERTH_TEST_REDIS=redis://127.0.0.1:PORT/"
        )
    })
}

fn unique_prefix() -> String {
    format!("berth-test-{}:", uuid::Uuid::new_v4().simple())
}

async fn redis_on(prefix: &str) -> Result<RedisStore> {
    let url = redis_url()?;
    RedisStore::connect(&url, prefix)
        .await
        .with_context(|| format!("connecting to {url}"))
}

async fn redis_store() -> Result<Arc<dyn Store>> {
    Ok(Arc::new(redis_on(&unique_prefix()).await?))
}

/// Instantiates each suite function once per backend.
macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() -> anyhow::Result<()> {
                    super::$test(super::memory_store()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() -> anyhow::Result<()> {
                    super::$test(super::redis_store().await?).await
                }
            )*
        }
    };
}

suite!(
    enqueue_binds_player_and_refuses_a_second_ticket,
    dequeue_unbinds_player,
    set_away_marks_the_ticket,
    tickets_come_oldest_first_ties_by_id,
    pools_lists_pools_with_tickets,
    claim_binds_players_and_removes_tickets,
    claim_with_a_missing_ticket_changes_nothing,
    concurrent_claims_match_each_ticket_once,
    update_session_is_compare_and_set,
    ending_a_session_unbinds_its_players,
    sessions_filter_by_state,
    hosts_put_get_list_remove,
    draining_survives_put_host,
    mark_host_is_conditional,
    lease_is_exclusive_renewable_and_expires,
    publish_reaches_subscribers,
    enqueue_announces_the_ticket_and_a_refusal_does_not,
);

// ---- fixtures ----

fn player(n: usize) -> PlayerId {
    PlayerId::new(format!("p{n:02}")).expect("a valid player id")
}

fn pool() -> PoolKey {
    PoolKey {
        mode: "duel".into(),
        region: "eu".into(),
    }
}

/// Odd characters on purpose: pool names end up inside Redis keys.
fn other_pool() -> PoolKey {
    PoolKey {
        mode: "team/deathmatch: 5v5".into(),
        region: "us-east{1}".into(),
    }
}

fn ticket(id: &str, player: PlayerId, pool: PoolKey, enqueued_ms: u64) -> Ticket {
    Ticket {
        id: id.into(),
        player,
        pool,
        party: Some(PartySpec {
            id: format!("party-{id}"),
            size: 1,
        }),
        // Not representable in 14 digits: must survive the store exactly.
        skill: 1_517.123_456_789_012_3,
        enqueued_ms,
        away_since_ms: None,
        latencies: None,
    }
}

fn session(id: &str, pool: PoolKey, players: Vec<PlayerId>, created_ms: u64) -> Session {
    Session {
        id: SessionId::new(id).expect("a valid session id"),
        version: 0,
        pool,
        region: String::new(),
        region_reason: None,
        migration: None,
        image: "arena".into(),
        state: SessionState::Placing,
        teams: vec![players.clone(), vec![]],
        players,
        ticket_key: "00ff".repeat(16),
        params: serde_json::json!({"map": "dust", "empty": [], "nested": {"x": 0.1, "big": 9007199254740993u64}}),
        host: None,
        tried_hosts: vec![],
        vm: None,
        endpoint: None,
        created_ms,
        deadline_ms: created_ms + 10_000,
        ends_by_ms: created_ms + 600_000,
        history: vec![Transition {
            state: SessionState::Placing,
            at_ms: created_ms,
            note: String::new(),
        }],
        end_reason: None,
        results: serde_json::Value::Null,
        match_ms: 42,
    }
}

fn host(id: &str, last_seen_ms: u64) -> HostRecord {
    HostRecord {
        id: HostId::new(id).expect("a valid host id"),
        state: HostState::Up,
        draining: false,
        accel: "kvm".into(),
        driver: "qemu".into(),
        gateway: "10.0.0.1:7000".into(),
        max_vms: 8,
        images: vec![ImageCapacity {
            name: "arena".into(),
            docked: true,
            warm: 2,
            running: 1,
            memory_mib: 256,
            vcpus: 1,
            substrate: None,
        }],
        vms: vec![HostVm {
            vm: VmId::new("vm-1").expect("a valid vm id"),
            session: SessionId::new("s-old").expect("a valid session id"),
            image: "arena".into(),
        }],
        region: None,
        zone: None,
        peer: None,
        replica: "replica-a".into(),
        connected_ms: last_seen_ms.saturating_sub(1000),
        last_seen_ms,
    }
}

fn queued(t: &Ticket) -> Binding {
    Binding::Queued {
        ticket: t.id.clone(),
        pool: t.pool.clone(),
    }
}

fn in_session(id: &SessionId) -> Binding {
    Binding::Session {
        session: id.clone(),
    }
}

fn ids(tickets: &[Ticket]) -> Vec<&str> {
    tickets.iter().map(|t| t.id.as_str()).collect()
}

async fn recv(rx: &mut broadcast::Receiver<Event>) -> Result<Event> {
    Ok(tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .context("no event within 5 s")??)
}

// ---- tickets and bindings ----

async fn enqueue_binds_player_and_refuses_a_second_ticket(store: Arc<dyn Store>) -> Result<()> {
    let t1 = ticket("t1", player(1), pool(), 100);
    store.enqueue(&t1).await?;
    assert_eq!(store.binding(&player(1)).await?, Some(queued(&t1)));
    assert_eq!(store.tickets(&pool()).await?, vec![t1.clone()]);

    let t2 = ticket("t2", player(1), other_pool(), 200);
    match store.enqueue(&t2).await {
        Err(StoreError::PlayerBusy(b)) => assert_eq!(b, queued(&t1)),
        other => bail!("second ticket for the same player: {other:?}"),
    }
    assert_eq!(store.binding(&player(1)).await?, Some(queued(&t1)));
    assert_eq!(store.tickets(&pool()).await?, vec![t1]);
    assert_eq!(store.tickets(&other_pool()).await?, vec![]);
    assert_eq!(store.pools().await?, vec![pool()]);
    assert_eq!(store.binding(&player(2)).await?, None);
    Ok(())
}

async fn dequeue_unbinds_player(store: Arc<dyn Store>) -> Result<()> {
    let t1 = ticket("t1", player(1), pool(), 100);
    let t2 = ticket("t2", player(2), pool(), 101);
    store.enqueue(&t1).await?;
    store.enqueue(&t2).await?;
    assert_eq!(store.dequeue(&player(1)).await?, Some(t1.clone()));
    assert_eq!(store.binding(&player(1)).await?, None);
    assert_eq!(store.tickets(&pool()).await?, vec![t2.clone()]);
    assert_eq!(store.dequeue(&player(1)).await?, None);
    assert_eq!(store.dequeue(&player(9)).await?, None);

    assert_eq!(store.dequeue(&player(2)).await?, Some(t2));
    assert_eq!(store.tickets(&pool()).await?, vec![]);
    assert_eq!(store.pools().await?, vec![]);
    // Unbound, the player may queue again.
    store.enqueue(&t1).await?;
    assert_eq!(store.tickets(&pool()).await?, vec![t1]);
    Ok(())
}

async fn set_away_marks_the_ticket(store: Arc<dyn Store>) -> Result<()> {
    let mut t1 = ticket("t1", player(1), pool(), 100);
    store.enqueue(&t1).await?;
    store.set_away(&player(1), Some(5_000)).await?;
    t1.away_since_ms = Some(5_000);
    assert_eq!(store.tickets(&pool()).await?, vec![t1.clone()]);

    store.set_away(&player(1), None).await?;
    t1.away_since_ms = None;
    assert_eq!(store.tickets(&pool()).await?, vec![t1.clone()]);

    // Unknown players are fine and change nothing.
    store.set_away(&player(7), Some(1)).await?;
    assert_eq!(store.binding(&player(7)).await?, None);

    // A ticket enqueued as away keeps the mark, and dequeue returns it.
    let mut t2 = ticket("t2", player(2), pool(), 101);
    t2.away_since_ms = Some(77);
    store.enqueue(&t2).await?;
    assert_eq!(store.tickets(&pool()).await?, vec![t1, t2.clone()]);
    store.set_away(&player(2), Some(88)).await?;
    t2.away_since_ms = Some(88);
    assert_eq!(store.dequeue(&player(2)).await?, Some(t2));
    Ok(())
}

async fn tickets_come_oldest_first_ties_by_id(store: Arc<dyn Store>) -> Result<()> {
    let now = now_ms();
    let order = [
        ("d", now + 300),
        ("b", now + 100),
        ("c", now + 100),
        ("a", now + 200),
        ("e", now),
    ];
    for (n, (id, ms)) in order.iter().enumerate() {
        store.enqueue(&ticket(id, player(n), pool(), *ms)).await?;
    }
    // Same names in another pool, with a name that only differs by where `/` falls.
    let tricky = PoolKey {
        mode: "duel/eu".into(),
        region: String::new(),
    };
    store
        .enqueue(&ticket("x", player(10), tricky.clone(), 1))
        .await?;
    assert_eq!(
        ids(&store.tickets(&pool()).await?),
        ["e", "b", "c", "a", "d"]
    );
    assert_eq!(ids(&store.tickets(&tricky).await?), ["x"]);
    Ok(())
}

async fn pools_lists_pools_with_tickets(store: Arc<dyn Store>) -> Result<()> {
    assert_eq!(store.pools().await?, vec![]);
    store.enqueue(&ticket("t1", player(1), pool(), 1)).await?;
    store
        .enqueue(&ticket("t2", player(2), other_pool(), 2))
        .await?;
    store
        .enqueue(&ticket("t3", player(3), other_pool(), 3))
        .await?;
    let mut both = vec![pool(), other_pool()];
    both.sort();
    assert_eq!(store.pools().await?, both);
    assert_eq!(ids(&store.tickets(&other_pool()).await?), ["t2", "t3"]);

    store.dequeue(&player(1)).await?;
    assert_eq!(store.pools().await?, vec![other_pool()]);
    store.dequeue(&player(2)).await?;
    assert_eq!(store.pools().await?, vec![other_pool()]);
    store.dequeue(&player(3)).await?;
    assert_eq!(store.pools().await?, vec![]);
    Ok(())
}

async fn claim_binds_players_and_removes_tickets(store: Arc<dyn Store>) -> Result<()> {
    let t1 = ticket("t1", player(1), pool(), 1);
    let t2 = ticket("t2", player(2), pool(), 2);
    let t3 = ticket("t3", player(3), pool(), 3);
    for t in [&t1, &t2, &t3] {
        store.enqueue(t).await?;
    }
    let s = session("s1", pool(), vec![player(1), player(2)], now_ms());
    assert!(store.claim(&["t1".into(), "t2".into()], &s).await?);

    assert_eq!(store.tickets(&pool()).await?, vec![t3.clone()]);
    assert_eq!(store.binding(&player(1)).await?, Some(in_session(&s.id)));
    assert_eq!(store.binding(&player(2)).await?, Some(in_session(&s.id)));
    assert_eq!(store.binding(&player(3)).await?, Some(queued(&t3)));
    let mut stored = s.clone();
    stored.version = 1;
    assert_eq!(store.session(&s.id).await?, Some(stored.clone()));
    assert_eq!(
        store.sessions(Some(SessionState::Placing)).await?,
        vec![stored]
    );

    // A player in a session can neither queue nor be dequeued.
    match store.enqueue(&ticket("t9", player(1), pool(), 9)).await {
        Err(StoreError::PlayerBusy(b)) => assert_eq!(b, in_session(&s.id)),
        other => bail!("enqueue while in a session: {other:?}"),
    }
    assert_eq!(store.dequeue(&player(1)).await?, None);
    assert_eq!(store.binding(&player(1)).await?, Some(in_session(&s.id)));
    store.set_away(&player(1), Some(5)).await?;
    assert_eq!(store.binding(&player(1)).await?, Some(in_session(&s.id)));

    // The last ticket claimed empties the pool.
    let s2 = session("s2", pool(), vec![player(3)], now_ms());
    assert!(store.claim(&["t3".into()], &s2).await?);
    assert_eq!(store.pools().await?, vec![]);
    Ok(())
}

async fn claim_with_a_missing_ticket_changes_nothing(store: Arc<dyn Store>) -> Result<()> {
    let t1 = ticket("t1", player(1), pool(), 1);
    let t2 = ticket("t2", player(2), pool(), 2);
    let t3 = ticket("t3", player(3), other_pool(), 3);
    for t in [&t1, &t2, &t3] {
        store.enqueue(t).await?;
    }
    let s = session("s1", pool(), vec![player(1), player(2)], now_ms());
    assert!(!store.claim(&["t1".into(), "gone".into()], &s).await?);
    // A ticket of another pool is not in this one.
    assert!(!store.claim(&["t1".into(), "t3".into()], &s).await?);
    // A dequeued ticket is gone too.
    store.dequeue(&player(2)).await?;
    assert!(!store.claim(&["t1".into(), "t2".into()], &s).await?);

    assert_eq!(store.tickets(&pool()).await?, vec![t1.clone()]);
    assert_eq!(store.tickets(&other_pool()).await?, vec![t3.clone()]);
    assert_eq!(store.binding(&player(1)).await?, Some(queued(&t1)));
    assert_eq!(store.binding(&player(3)).await?, Some(queued(&t3)));
    assert_eq!(store.session(&s.id).await?, None);
    assert_eq!(store.sessions(None).await?, vec![]);
    Ok(())
}

async fn concurrent_claims_match_each_ticket_once(store: Arc<dyn Store>) -> Result<()> {
    const TICKETS: usize = 20;
    const TASKS: usize = 50;
    let mut all = BTreeSet::new();
    let mut owner = HashMap::new();
    for n in 0..TICKETS {
        let t = ticket(&format!("t{n:02}"), player(n), pool(), 1_000 + n as u64);
        store.enqueue(&t).await?;
        all.insert(t.id.clone());
        owner.insert(t.id.clone(), t.player.clone());
    }

    // Each task claims 2 to 4 tickets picked by a small LCG: many sets overlap.
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let mut seed = (i as u64).wrapping_mul(6_364_136_223_846_793_005) ^ 0x9E37_79B9;
        let mut pick = BTreeSet::new();
        while pick.len() < 2 + i % 3 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            pick.insert(format!("t{:02}", (seed >> 33) as usize % TICKETS));
        }
        let pick: Vec<String> = pick.into_iter().collect();
        let players = pick.iter().map(|id| owner[id].clone()).collect();
        let s = session(&format!("s{i:02}"), pool(), players, 5_000 + i as u64);
        let store = store.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let won = store.claim(&pick, &s).await?;
            anyhow::Ok((s.id, pick, won))
        }));
    }

    let mut claimed: HashMap<String, SessionId> = HashMap::new();
    let mut winners = 0;
    for task in tasks {
        let (sid, pick, won) = task.await??;
        let stored = store.session(&sid).await?;
        ensure!(
            won == stored.is_some(),
            "{sid}: won={won} but stored={stored:?}"
        );
        if !won {
            continue;
        }
        winners += 1;
        for id in pick {
            if let Some(first) = claimed.insert(id.clone(), sid.clone()) {
                bail!("ticket {id} matched twice: {first} and {sid}");
            }
        }
    }
    ensure!(winners > 0, "no claim succeeded");

    let left: BTreeSet<String> = store
        .tickets(&pool())
        .await?
        .into_iter()
        .map(|t| t.id)
        .collect();
    for id in &left {
        ensure!(
            !claimed.contains_key(id),
            "ticket {id} both queued and matched"
        );
    }
    let matched: BTreeSet<String> = claimed.keys().cloned().collect();
    let seen: BTreeSet<String> = left.union(&matched).cloned().collect();
    assert_eq!(seen, all, "tickets lost");

    for (id, sid) in &claimed {
        assert_eq!(store.binding(&owner[id]).await?, Some(in_session(sid)));
    }
    for id in &left {
        let b = store.binding(&owner[id]).await?;
        ensure!(
            matches!(&b, Some(Binding::Queued { ticket, .. }) if ticket == id),
            "{id}: {b:?}"
        );
    }
    assert_eq!(
        store.sessions(Some(SessionState::Placing)).await?.len(),
        winners
    );
    Ok(())
}

// ---- sessions ----

async fn update_session_is_compare_and_set(store: Arc<dyn Store>) -> Result<()> {
    store.enqueue(&ticket("t1", player(1), pool(), 1)).await?;
    let s = session("s1", pool(), vec![player(1)], now_ms());
    assert!(store.claim(&["t1".into()], &s).await?);

    let mut v1 = store.session(&s.id).await?.context("claimed session")?;
    assert_eq!(v1.version, 1);
    v1.transition(
        SessionState::Activating,
        now_ms(),
        now_ms() + 5_000,
        "placed",
    );
    v1.host = Some(HostId::new("h1")?);
    let v2 = store
        .update_session(&v1)
        .await?
        .context("first update refused")?;
    assert_eq!(v2.version, 2);
    let mut expected = v1.clone();
    expected.version = 2;
    assert_eq!(v2, expected);
    assert_eq!(store.session(&s.id).await?, Some(v2.clone()));

    // Someone else wrote version 2: the writer still holding version 1 loses.
    let mut stale = v1.clone();
    stale.end_reason = Some("stale".into());
    assert_eq!(store.update_session(&stale).await?, None);
    assert_eq!(store.session(&s.id).await?, Some(v2.clone()));

    let mut v2b = v2.clone();
    v2b.transition(SessionState::Active, now_ms(), now_ms() + 60_000, "");
    let v3 = store.update_session(&v2b).await?.context("second update")?;
    assert_eq!(v3.version, 3);
    assert_eq!(
        store.sessions(Some(SessionState::Activating)).await?,
        vec![]
    );
    assert_eq!(store.sessions(Some(SessionState::Active)).await?, vec![v3]);

    let ghost = session("nobody", pool(), vec![], now_ms());
    assert_eq!(store.update_session(&ghost).await?, None);
    assert_eq!(store.session(&ghost.id).await?, None);
    Ok(())
}

async fn ending_a_session_unbinds_its_players(store: Arc<dyn Store>) -> Result<()> {
    let t1 = ticket("t1", player(1), pool(), 1);
    let t2 = ticket("t2", player(2), pool(), 2);
    let t3 = ticket("t3", player(3), pool(), 3);
    for t in [&t1, &t2, &t3] {
        store.enqueue(t).await?;
    }
    // Player 3 is listed in the session but bound to its own ticket: ending must not touch it.
    let s = session(
        "s1",
        pool(),
        vec![player(1), player(2), player(3)],
        now_ms(),
    );
    assert!(store.claim(&["t1".into(), "t2".into()], &s).await?);

    let mut cur = store.session(&s.id).await?.context("claimed session")?;
    cur.transition(SessionState::Ended, now_ms(), now_ms(), "game over");
    cur.end_reason = Some("finished".into());
    cur.results = serde_json::json!({"winner": [player(1)], "scores": []});
    let ended = store.update_session(&cur).await?.context("end refused")?;
    assert_eq!(ended.state, SessionState::Ended);

    assert_eq!(store.binding(&player(1)).await?, None);
    assert_eq!(store.binding(&player(2)).await?, None);
    assert_eq!(store.binding(&player(3)).await?, Some(queued(&t3)));
    // Its players remember it (for a reconnect); player 3 was never bound to it.
    assert_eq!(store.last_session(&player(1)).await?, Some(s.id.clone()));
    assert_eq!(store.last_session(&player(2)).await?, Some(s.id.clone()));
    assert_eq!(store.last_session(&player(3)).await?, None);
    // Ended sessions stay readable (with their results) for a while.
    assert_eq!(store.session(&s.id).await?, Some(ended.clone()));
    assert_eq!(
        store.sessions(Some(SessionState::Ended)).await?,
        vec![ended.clone()]
    );
    assert_eq!(store.sessions(Some(SessionState::Placing)).await?, vec![]);

    // Free again: the player can queue, and then the last session is old news.
    let again = ticket("t4", player(1), pool(), 4);
    store.enqueue(&again).await?;
    assert_eq!(store.binding(&player(1)).await?, Some(queued(&again)));
    assert_eq!(store.last_session(&player(1)).await?, None);

    // Ending is final for the bindings even if the ended record is written again.
    let mut more = ended.clone();
    more.results = serde_json::json!({"late": true});
    let v = store.update_session(&more).await?.context("update ended")?;
    assert_eq!(store.binding(&player(1)).await?, Some(queued(&again)));
    assert_eq!(store.sessions(Some(SessionState::Ended)).await?, vec![v]);
    Ok(())
}

async fn sessions_filter_by_state(store: Arc<dyn Store>) -> Result<()> {
    let base = now_ms();
    let mut made = Vec::new();
    for n in 0..3 {
        let t = ticket(&format!("t{n}"), player(n), pool(), n as u64);
        store.enqueue(&t).await?;
        // Created newest first, to see that listing orders by creation.
        let s = session(
            &format!("s{n}"),
            pool(),
            vec![player(n)],
            base + 10 - n as u64,
        );
        assert!(store.claim(std::slice::from_ref(&t.id), &s).await?);
        made.push(store.session(&s.id).await?.context("claimed session")?);
    }
    let mut active = made[1].clone();
    active.transition(SessionState::Active, base, base + 60_000, "");
    let active = store.update_session(&active).await?.context("to active")?;
    let mut ended = made[2].clone();
    ended.transition(SessionState::Ended, base, base, "");
    let ended = store.update_session(&ended).await?.context("to ended")?;

    assert_eq!(
        store.sessions(Some(SessionState::Placing)).await?,
        vec![made[0].clone()]
    );
    assert_eq!(
        store.sessions(Some(SessionState::Active)).await?,
        vec![active.clone()]
    );
    assert_eq!(
        store.sessions(Some(SessionState::Ended)).await?,
        vec![ended.clone()]
    );
    assert_eq!(store.sessions(Some(SessionState::Ending)).await?, vec![]);
    assert_eq!(
        store.sessions(None).await?,
        vec![ended, active, made[0].clone()]
    );
    Ok(())
}

// ---- hosts ----

async fn hosts_put_get_list_remove(store: Arc<dyn Store>) -> Result<()> {
    let h2 = host("h2", 200);
    let h1 = host("h1", 100);
    store.put_host(&h2).await?;
    store.put_host(&h1).await?;
    assert_eq!(store.host(&h1.id).await?, Some(h1.clone()));
    assert_eq!(store.hosts().await?, vec![h1.clone(), h2.clone()]);

    let mut h1b = h1.clone();
    h1b.max_vms = 3;
    h1b.last_seen_ms = 150;
    h1b.state = HostState::Disconnected;
    store.put_host(&h1b).await?;
    assert_eq!(store.host(&h1.id).await?, Some(h1b));

    store.remove_host(&h1.id).await?;
    assert_eq!(store.host(&h1.id).await?, None);
    assert_eq!(store.hosts().await?, vec![h2]);
    store.remove_host(&h1.id).await?;
    assert_eq!(store.host(&HostId::new("nope")?).await?, None);
    Ok(())
}

async fn draining_survives_put_host(store: Arc<dyn Store>) -> Result<()> {
    let h1 = host("h1", 100);
    assert!(!store.set_draining(&h1.id, true).await?);
    assert_eq!(store.host(&h1.id).await?, None);

    store.put_host(&h1).await?;
    assert!(store.set_draining(&h1.id, true).await?);
    let mut expected = h1.clone();
    expected.draining = true;
    assert_eq!(store.host(&h1.id).await?, Some(expected.clone()));

    // The host's replica writes its record (draining: false) as it always does.
    let mut beat = h1.clone();
    beat.last_seen_ms = 300;
    beat.max_vms = 1;
    store.put_host(&beat).await?;
    let mut expected = beat.clone();
    expected.draining = true;
    assert_eq!(store.host(&h1.id).await?, Some(expected.clone()));
    assert_eq!(store.hosts().await?, vec![expected]);

    assert!(store.set_draining(&h1.id, false).await?);
    assert_eq!(store.host(&h1.id).await?, Some(beat.clone()));

    // A removed host comes back undrained.
    assert!(store.set_draining(&h1.id, true).await?);
    store.remove_host(&h1.id).await?;
    store.put_host(&h1).await?;
    assert_eq!(store.host(&h1.id).await?, Some(h1));
    Ok(())
}

async fn mark_host_is_conditional(store: Arc<dyn Store>) -> Result<()> {
    let h1 = host("h1", 100);
    assert!(!store.mark_host(&h1.id, 100, HostState::Lost).await?);
    store.put_host(&h1).await?;
    assert!(!store.mark_host(&h1.id, 99, HostState::Lost).await?);
    assert_eq!(store.host(&h1.id).await?, Some(h1.clone()));

    assert!(
        store
            .mark_host(&h1.id, 100, HostState::Disconnected)
            .await?
    );
    let mut expected = h1.clone();
    expected.state = HostState::Disconnected;
    assert_eq!(store.host(&h1.id).await?, Some(expected));

    // The host came back (a newer last_seen_ms): the stale sweeper must not mark it lost.
    let mut back = h1.clone();
    back.last_seen_ms = 200;
    store.put_host(&back).await?;
    assert!(!store.mark_host(&h1.id, 100, HostState::Lost).await?);
    assert_eq!(store.host(&h1.id).await?, Some(back.clone()));

    // Marking keeps the draining flag.
    assert!(store.set_draining(&h1.id, true).await?);
    assert!(store.mark_host(&h1.id, 200, HostState::Lost).await?);
    let mut expected = back;
    expected.state = HostState::Lost;
    expected.draining = true;
    assert_eq!(store.hosts().await?, vec![expected]);
    Ok(())
}

// ---- coordination ----

async fn lease_is_exclusive_renewable_and_expires(store: Arc<dyn Store>) -> Result<()> {
    let ttl = 200;
    assert!(store.lease("matcher/duel", "a", ttl).await?);
    assert!(!store.lease("matcher/duel", "b", ttl).await?);
    assert!(store.lease("matcher/duel", "a", ttl).await?);
    // Leases are per name.
    assert!(store.lease("sweeper", "b", ttl).await?);

    // Renewed at 120 ms, a's lease outlives the first 200 ms.
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(store.lease("matcher/duel", "a", ttl).await?);
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(!store.lease("matcher/duel", "b", ttl).await?);

    // Not renewed, it expires and b takes it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.lease("matcher/duel", "b", ttl).await?);
    assert!(!store.lease("matcher/duel", "a", ttl).await?);
    Ok(())
}

async fn enqueue_announces_the_ticket_and_a_refusal_does_not(store: Arc<dyn Store>) -> Result<()> {
    let mut rx = store.subscribe();
    store
        .enqueue(&ticket("t1", player(1), other_pool(), 1))
        .await?;
    assert_eq!(
        recv(&mut rx).await?,
        Event::QueueChanged { pool: other_pool() }
    );
    assert!(store
        .enqueue(&ticket("t2", player(1), pool(), 2))
        .await
        .is_err());
    // Nothing for the refused one: the next event is the marker published after it.
    let marker = Event::PlayerConnected {
        player: player(9),
        conn: "marker".into(),
    };
    store.publish(&marker).await?;
    assert_eq!(recv(&mut rx).await?, marker);
    Ok(())
}

async fn publish_reaches_subscribers(store: Arc<dyn Store>) -> Result<()> {
    let mut rx1 = store.subscribe();
    let mut rx2 = store.subscribe();
    let events = [
        Event::QueueChanged { pool: other_pool() },
        Event::Dequeued {
            player: player(1),
            ticket: "t1".into(),
            reason: "away too long".into(),
        },
        Event::Session {
            session: SessionId::new("s1")?,
            state: SessionState::Active,
        },
        Event::PlayerConnected {
            player: player(2),
            conn: "c-1".into(),
        },
    ];
    for e in &events {
        store.publish(e).await?;
    }
    for e in &events {
        assert_eq!(&recv(&mut rx1).await?, e);
        assert_eq!(&recv(&mut rx2).await?, e);
    }
    Ok(())
}

// ---- redis only ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_replicas_share_state_and_events() -> Result<()> {
    let prefix = unique_prefix();
    let a = redis_on(&prefix).await?;
    let b = redis_on(&prefix).await?;
    let mut rx_a = a.subscribe();
    let mut rx_b = b.subscribe();

    let t1 = ticket("t1", player(1), pool(), 1);
    a.enqueue(&t1).await?;
    // The enqueue itself announced the ticket to both replicas.
    let announced = Event::QueueChanged { pool: pool() };
    assert_eq!(recv(&mut rx_a).await?, announced);
    assert_eq!(recv(&mut rx_b).await?, announced);
    assert_eq!(b.tickets(&pool()).await?, vec![t1.clone()]);
    assert!(matches!(
        b.enqueue(&ticket("t2", player(1), pool(), 2)).await,
        Err(StoreError::PlayerBusy(_))
    ));
    assert!(a.lease("matcher", "replica-a", 5_000).await?);
    assert!(!b.lease("matcher", "replica-b", 5_000).await?);

    let from_a = Event::QueueChanged { pool: pool() };
    let from_b = Event::Place {
        host: HostId::new("h1")?,
        session: SessionId::new("s1")?,
    };
    a.publish(&from_a).await?;
    assert_eq!(recv(&mut rx_a).await?, from_a);
    assert_eq!(recv(&mut rx_b).await?, from_a);
    b.publish(&from_b).await?;
    assert_eq!(recv(&mut rx_a).await?, from_b);
    assert_eq!(recv(&mut rx_b).await?, from_b);

    // Another prefix is another deployment: it sees none of it.
    let other = redis_on(&unique_prefix()).await?;
    let mut rx_other = other.subscribe();
    assert_eq!(other.tickets(&pool()).await?, vec![]);
    a.publish(&from_a).await?;
    assert_eq!(recv(&mut rx_b).await?, from_a);
    let leaked = tokio::time::timeout(Duration::from_millis(300), rx_other.recv()).await;
    ensure!(leaked.is_err(), "another prefix got {leaked:?}");
    Ok(())
}

/// Subscribers of this prefix's event channel, as Redis counts them.
async fn subscribers(con: &mut ::redis::aio::MultiplexedConnection, prefix: &str) -> Result<i64> {
    let (_, n): (String, i64) = ::redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("{{{prefix}}}events"))
        .query_async(con)
        .await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_event_task_stops_with_the_last_clone() -> Result<()> {
    let client = ::redis::Client::open(redis_url()?)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let prefix = unique_prefix();
    let store = redis_on(&prefix).await?;
    let clone = store.clone();
    assert_eq!(subscribers(&mut con, &prefix).await?, 1);
    drop(store);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(subscribers(&mut con, &prefix).await?, 1, "a clone is alive");
    drop(clone);
    for _ in 0..50 {
        if subscribers(&mut con, &prefix).await? == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the event subscription outlived the store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_bad_stored_data_is_an_error_not_a_panic() -> Result<()> {
    let prefix = unique_prefix();
    let store = redis_on(&prefix).await?;
    let client = ::redis::Client::open(redis_url()?)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let () = ::redis::cmd("SET")
        .arg(format!("{{{prefix}}}player:p01"))
        .arg("{not json")
        .query_async(&mut con)
        .await?;
    for result in [
        store.binding(&player(1)).await.map(|_| ()),
        store.dequeue(&player(1)).await.map(|_| ()),
        store.set_away(&player(1), Some(1)).await,
        store.enqueue(&ticket("t1", player(1), pool(), 1)).await,
    ] {
        assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connect_refuses_bad_prefix_and_dead_server() -> Result<()> {
    let url = redis_url()?;
    for prefix in ["", "a{b", "x}"] {
        assert!(
            RedisStore::connect(&url, prefix).await.is_err(),
            "{prefix:?}"
        );
    }
    // Port 1 on loopback: nothing listens there.
    let dead = tokio::time::timeout(
        Duration::from_secs(20),
        RedisStore::connect("redis://127.0.0.1:1/", "berth-test:"),
    )
    .await
    .context("connecting to a dead server hangs")?;
    assert!(matches!(dead, Err(StoreError::Redis(_))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_recovers_after_redis_restarts() -> Result<()> {
    let mut server = PrivateRedis::start().await?;
    let store = RedisStore::connect(&server.url(), "berth-test:").await?;
    let mut rx = store.subscribe();
    let before = Event::QueueChanged { pool: pool() };
    store.publish(&before).await?;
    assert_eq!(recv(&mut rx).await?, before);

    // Redis goes away and comes back empty (no scripts loaded, no subscriptions).
    server.restart().await?;

    let after = Event::QueueChanged { pool: other_pool() };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut resynced = false;
    loop {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no event through the restarted redis within 20 s"
        );
        // Until the event task has resubscribed, what is published is lost: publish again.
        let _ = store.publish(&after).await;
        match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            Ok(Ok(e)) if e == after => break,
            // The gap is announced, so that sockets re-read what they may have missed.
            Ok(Ok(Event::Resync)) => resynced = true,
            Ok(Err(broadcast::error::RecvError::Closed)) => bail!("event channel closed"),
            _ => {}
        }
    }
    ensure!(resynced, "no resync event after the subscription came back");
    let t1 = ticket("t1", player(1), pool(), 1);
    store.enqueue(&t1).await?;
    assert_eq!(store.tickets(&pool()).await?, vec![t1]);
    Ok(())
}

/// Ends a fresh session in `store`, then checks it is readable, and gone after the retention.
async fn ended_sessions_go_after_the_retention(store: Arc<dyn Store>) -> Result<()> {
    store.enqueue(&ticket("t1", player(1), pool(), 1)).await?;
    let s = session("s1", pool(), vec![player(1)], now_ms());
    assert!(store.claim(&["t1".into()], &s).await?);
    let mut cur = store.session(&s.id).await?.context("claimed")?;
    cur.transition(SessionState::Ended, now_ms(), now_ms(), "over");
    store.update_session(&cur).await?.context("ended")?;
    assert_eq!(store.sessions(Some(SessionState::Ended)).await?.len(), 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(store.sessions(Some(SessionState::Ended)).await?.is_empty());
    assert_eq!(store.session(&s.id).await?, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_ended_sessions_go_after_the_retention() -> Result<()> {
    ended_sessions_go_after_the_retention(Arc::new(MemoryStore::new().with_ended_retention(300)))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ended_sessions_go_after_the_retention() -> Result<()> {
    let store = redis_on(&unique_prefix()).await?.with_ended_retention(300);
    ended_sessions_go_after_the_retention(Arc::new(store)).await
}
