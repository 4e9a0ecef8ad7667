//! The matchmaker task: one per replica. It looks at a pool as soon as tickets arrive there
//! (an [`Event::QueueChanged`] from any replica), and at every pool a few times a second for
//! what time changes (widening skill windows, fill waits, max waits, players away too long).
//!
//! Replicas share the work by pool: a pool is matched by the replica holding its lease. The
//! store's atomic claim is what makes a ticket match once even if two replicas ever overlap.

use crate::domain::Core;
use crate::matching::decide;
use crate::model::{Event, PoolKey};
use crate::sessions::{new_session, try_place};
use crate::store::StoreError;
use crate::util::now_ms;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often every pool is looked at even without new tickets.
pub const TICK: Duration = Duration::from_millis(250);
/// A pool lease lasts this long and is renewed when a third is left.
const LEASE_MS: u64 = 3000;

pub async fn run(core: Arc<Core>, mut trigger: mpsc::UnboundedReceiver<PoolKey>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leases: HashMap<PoolKey, Instant> = HashMap::new();
    let mut dirty: BTreeSet<PoolKey> = BTreeSet::new();
    loop {
        tokio::select! {
            pool = trigger.recv() => {
                let Some(pool) = pool else { return };
                dirty.insert(pool);
                while let Ok(p) = trigger.try_recv() {
                    dirty.insert(p);
                }
            }
            _ = tick.tick() => match core.store.pools().await {
                Ok(pools) => dirty.extend(pools),
                Err(e) => tracing::warn!(error = %e, "listing pools"),
            },
        }
        for pool in std::mem::take(&mut dirty) {
            let now = Instant::now();
            let held = leases.get(&pool).is_some_and(|until| {
                until.saturating_duration_since(now) > Duration::from_millis(LEASE_MS / 3)
            });
            if !held {
                match core
                    .store
                    .lease(&format!("match:{pool}"), &core.replica, LEASE_MS)
                    .await
                {
                    Ok(true) => {
                        leases.insert(pool.clone(), now + Duration::from_millis(LEASE_MS));
                    }
                    Ok(false) => {
                        leases.remove(&pool);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, %pool, "pool lease");
                        continue;
                    }
                }
            }
            if let Err(e) = cycle(&core, &pool).await {
                tracing::warn!(error = %e, %pool, "matching failed");
            }
        }
    }
}

/// Matches one pool until nothing more can be formed; returns how many matches were claimed.
pub async fn cycle(core: &Arc<Core>, pool: &PoolKey) -> Result<usize, StoreError> {
    let mut claimed = 0;
    // A lost claim means the queue changed under us: look again (bounded).
    for _ in 0..8 {
        let tickets = core.store.tickets(pool).await?;
        let now = now_ms();
        let Some(mode) = core.modes.get(&pool.mode) else {
            for t in tickets {
                drop_ticket(core, &t, "mode_removed").await?;
            }
            return Ok(claimed);
        };
        let outcome = decide(mode, &tickets, now, core.config.timeouts.reconnect_grace_ms);
        for (t, reason) in &outcome.dropped {
            drop_ticket(core, t, reason).await?;
        }
        // Claims touch disjoint tickets: send them together (the Redis connection pipelines).
        let sessions: Vec<_> = outcome
            .matches
            .iter()
            .map(|f| (f, new_session(core, mode, pool, f, now)))
            .collect();
        let results = futures_util::future::join_all(
            sessions
                .iter()
                .map(|(f, s)| core.store.claim(&f.tickets, s)),
        )
        .await;
        let enqueued: HashMap<&str, u64> = tickets
            .iter()
            .map(|t| (t.id.as_str(), t.enqueued_ms))
            .collect();
        let mut lost = false;
        let mut matched = 0;
        let mut won_sessions = Vec::new();
        for ((formed, session), won) in sessions.into_iter().zip(results) {
            if !won? {
                lost = true;
                continue;
            }
            claimed_one(core, pool, formed, &session, &enqueued, now);
            claimed += 1;
            matched += formed.tickets.len();
            won_sessions.push(session);
        }
        let events: Vec<Event> = won_sessions
            .iter()
            .map(|s| Event::Session {
                session: s.id.clone(),
                state: s.state,
            })
            .collect();
        for r in futures_util::future::join_all(events.iter().map(|e| core.store.publish(e))).await
        {
            r?;
        }
        for session in won_sessions {
            let (core, id) = (core.clone(), session.id);
            tokio::spawn(async move {
                if let Err(e) = try_place(&core, &id).await {
                    tracing::warn!(session_id = %id, error = %e, "placement failed");
                }
            });
        }
        // The memory store never yields: let the replica's other tasks (events, sockets) run
        // between passes.
        tokio::task::yield_now().await;
        core.metrics
            .queue_depth
            .get_or_create(&vec![
                ("mode", pool.mode.clone()),
                ("region", pool.region.clone()),
            ])
            .set((tickets.len() - matched - outcome.dropped.len()) as i64);
        if !lost {
            return Ok(claimed);
        }
    }
    Ok(claimed)
}

/// Metrics and a log line for a claimed match.
fn claimed_one(
    core: &Core,
    pool: &PoolKey,
    formed: &crate::matching::Formed,
    session: &crate::model::Session,
    enqueued: &HashMap<&str, u64>,
    now: u64,
) {
    core.metrics.matches.inc();
    let wait = core
        .metrics
        .queue_wait
        .get_or_create(&vec![("mode", pool.mode.clone())]);
    for id in &formed.tickets {
        if let Some(at) = enqueued.get(id.as_str()) {
            wait.observe(now.saturating_sub(*at) as f64 / 1000.0);
        }
    }
    tracing::debug!(session_id = %session.id, %pool, players = session.players.len(), "match formed");
}

async fn drop_ticket(
    core: &Core,
    t: &crate::model::Ticket,
    reason: &str,
) -> Result<(), StoreError> {
    // Only this ticket: the player may have queued again meanwhile.
    if let Some(crate::model::Binding::Queued { ticket, .. }) =
        core.store.binding(&t.player).await?
    {
        if ticket == t.id {
            core.store.dequeue(&t.player).await?;
            core.store
                .publish(&Event::Dequeued {
                    player: t.player.clone(),
                    ticket: t.id.clone(),
                    reason: reason.to_owned(),
                })
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::test_core;
    use crate::model::{Binding, SessionState, Ticket};
    use berth_protocol::PlayerId;

    fn duel() -> PoolKey {
        PoolKey {
            mode: "duel".into(),
            region: "local".into(),
        }
    }

    async fn enqueue(core: &Core, player: &str, enqueued_ms: u64) -> Ticket {
        let t = Ticket {
            id: format!("t-{player}"),
            player: PlayerId::new(player).expect("id"),
            pool: duel(),
            party: None,
            skill: 1000.0,
            enqueued_ms,
            away_since_ms: None,
            latencies: None,
        };
        core.store.enqueue(&t).await.expect("enqueue");
        t
    }

    #[tokio::test(start_paused = true)]
    async fn two_queued_duel_players_become_one_session() {
        let core = test_core();
        let now = now_ms();
        let (a, b) = (
            enqueue(&core, "a", now).await,
            enqueue(&core, "b", now).await,
        );
        assert_eq!(cycle(&core, &duel()).await.expect("cycle"), 1);
        assert!(core
            .store
            .tickets(&duel())
            .await
            .expect("tickets")
            .is_empty());
        let sessions = core.store.sessions(None).await.expect("sessions");
        assert_eq!(sessions.len(), 1);
        let s = &sessions[0];
        assert_eq!(s.state, SessionState::Placing);
        assert_eq!(s.teams.len(), 2);
        for p in [&a.player, &b.player] {
            assert!(s.players.contains(p));
            assert_eq!(
                core.store.binding(p).await.expect("binding"),
                Some(Binding::Session {
                    session: s.id.clone()
                })
            );
        }
        // Nothing left to match: a second pass claims nothing.
        assert_eq!(cycle(&core, &duel()).await.expect("cycle"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn one_player_waits_and_a_ticket_past_max_wait_is_dropped_with_its_reason() {
        let core = test_core();
        let mut events = core.store.subscribe();
        let max_wait_ms = core.modes.0["duel"].max_wait_s * 1000;
        let fresh = enqueue(&core, "fresh", now_ms()).await;
        assert_eq!(cycle(&core, &duel()).await.expect("cycle"), 0);
        assert_eq!(core.store.tickets(&duel()).await.expect("tickets").len(), 1);
        let old = enqueue(&core, "old", now_ms() - max_wait_ms - 1_000).await;
        // The old ticket is dropped, not matched with the fresh one.
        assert_eq!(cycle(&core, &duel()).await.expect("cycle"), 0);
        let left = core.store.tickets(&duel()).await.expect("tickets");
        assert_eq!(left.iter().map(|t| &t.id).collect::<Vec<_>>(), [&fresh.id]);
        assert_eq!(
            core.store.binding(&old.player).await.expect("binding"),
            None
        );
        let dropped = loop {
            match events.recv().await.expect("an event") {
                Event::Dequeued { player, reason, .. } => break (player, reason),
                _ => continue,
            }
        };
        assert_eq!(dropped, (old.player, "max_wait".to_owned()));
    }
}
