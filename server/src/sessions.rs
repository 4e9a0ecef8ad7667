//! The session lifecycle: placement on a host, activation answers, ending, and the sweeper
//! that enforces every state's deadline and marks silent hosts lost.
//!
//! Every change is a compare-and-set on the stored session followed by an
//! [`Event::Session`], so any replica may make it and every replica tells its own players.

use crate::config::{Placement, Policy, Zones};
use crate::domain::Core;
use crate::matching::Formed;
use crate::model::{Event, HostRecord, HostState, PoolKey, Session, SessionState, Transition};
use crate::modes::Mode;
use crate::store::StoreError;
use crate::util::{now_ms, random_id, random_key};
use berth_protocol::{HostId, SessionId, VmId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How many times a compare-and-set is retried against concurrent writers.
const CAS_TRIES: usize = 8;

/// A new session for a formed match, in `Placing`.
pub fn new_session(core: &Core, mode: &Mode, pool: &PoolKey, formed: &Formed, now: u64) -> Session {
    let id = SessionId::new(format!("s-{}", &random_id()[..20])).expect("hex is a valid id");
    let players = formed.teams.iter().flatten().cloned().collect();
    Session {
        id,
        version: 0,
        pool: pool.clone(),
        region: formed.region.clone(),
        region_reason: Some(formed.reason.clone()),
        migration: None,
        image: mode.image.clone(),
        state: SessionState::Placing,
        players,
        teams: formed.teams.clone(),
        ticket_key: random_key(),
        params: mode.params_json(),
        host: None,
        tried_hosts: Vec::new(),
        vm: None,
        endpoint: None,
        created_ms: now,
        deadline_ms: now + core.config.timeouts.placing_ms,
        ends_by_ms: now + mode.session_max_s * 1000,
        history: vec![Transition {
            state: SessionState::Placing,
            at_ms: now,
            note: String::new(),
        }],
        end_reason: None,
        results: serde_json::Value::Null,
        match_ms: now.saturating_sub(formed.oldest_ms),
    }
}

/// Reads, changes with `f` (which returns `false` to leave it alone) and compare-and-sets the
/// session, retrying on concurrent changes; publishes the new state. `None` if `f` declined or
/// the session is gone.
pub async fn modify(
    core: &Core,
    id: &SessionId,
    mut f: impl FnMut(&mut Session) -> bool,
) -> Result<Option<Session>, StoreError> {
    for _ in 0..CAS_TRIES {
        let Some(current) = core.store.session(id).await? else {
            return Ok(None);
        };
        let mut next = current.clone();
        if !f(&mut next) {
            return Ok(None);
        }
        if let Some(stored) = core.store.update_session(&next).await? {
            if stored.state != current.state {
                core.store
                    .publish(&Event::Session {
                        session: stored.id.clone(),
                        state: stored.state,
                    })
                    .await?;
            }
            return Ok(Some(stored));
        }
    }
    tracing::warn!(session_id = %id, "session kept changing under us; giving up this step");
    Ok(None)
}

/// The VM resources a session's mode asks for (unknown mode: the image's defaults).
fn wants(core: &Core, s: &Session) -> (u32, u32) {
    core.modes
        .get(&s.pool.mode)
        .map_or((0, 0), |m| (m.vm.memory_mib, m.vm.vcpus))
}

/// Orders candidate hosts for `image` in `region`: warm clones first, then a docked substrate,
/// then (zones spread) the zone running the fewest of the candidates' VMs, then the policy.
/// Hosts of another region, without room, draining, not up, or already tried are left out (a
/// host that names no region serves any).
pub fn rank_hosts<'a>(
    hosts: &'a [HostRecord],
    (image, region): (&str, &str),
    (memory_mib, vcpus): (u32, u32),
    tried: &[HostId],
    pending: &dyn Fn(&HostId) -> u32,
    placement: &Placement,
) -> Vec<&'a HostRecord> {
    let mut c: Vec<(&HostRecord, u32, bool, bool)> = hosts
        .iter()
        .filter(|h| h.state == HostState::Up && !h.draining && !tried.contains(&h.id))
        .filter(|h| h.region.as_deref().is_none_or(|r| r == region))
        .filter_map(|h| {
            let img = h
                .images
                .iter()
                .find(|i| i.name == image && i.memory_mib >= memory_mib && i.vcpus >= vcpus)?;
            let busy = h.running() + pending(&h.id);
            (busy < h.max_vms).then_some((h, busy, img.warm > pending(&h.id), img.docked))
        })
        .collect();
    let mut zone_load: HashMap<Option<&str>, u32> = HashMap::new();
    if placement.zones == Zones::Spread {
        for (h, busy, ..) in &c {
            *zone_load.entry(h.zone.as_deref()).or_default() += busy;
        }
    }
    let zone = |h: &HostRecord| zone_load.get(&h.zone.as_deref()).copied().unwrap_or(0);
    c.sort_by(|a, b| {
        b.2.cmp(&a.2)
            .then(b.3.cmp(&a.3))
            .then(zone(a.0).cmp(&zone(b.0)))
            .then(match placement.policy {
                Policy::Spread => a.1.cmp(&b.1),
                Policy::Pack => b.1.cmp(&a.1),
            })
    });
    c.into_iter().map(|(h, ..)| h).collect()
}

/// Whether some host of `hosts` could take `s` now (activations in flight not counted).
fn could_place(core: &Core, hosts: &[HostRecord], s: &Session) -> bool {
    let none = |_: &HostId| 0;
    let target = (s.image.as_str(), s.region());
    let placement = &core.config.placement;
    !rank_hosts(
        hosts,
        target,
        wants(core, s),
        &s.tried_hosts,
        &none,
        placement,
    )
    .is_empty()
}

/// Tries once to put a `Placing` session on a host: moves it to `Activating` and asks the
/// host's replica to send `activate`. Leaves it `Placing` if no host has room now (the sweeper
/// tries again until the deadline).
pub async fn try_place(core: &Core, id: &SessionId) -> Result<(), StoreError> {
    let Some(s) = core.store.session(id).await? else {
        return Ok(());
    };
    if s.state != SessionState::Placing {
        return Ok(());
    }
    let hosts = core.store.hosts().await?;
    // No host could take it anyway: skip reading the activations in flight.
    if !could_place(core, &hosts, &s) {
        return Ok(());
    }
    let wanted = wants(core, &s);
    let activating = core.store.sessions(Some(SessionState::Activating)).await?;
    let pending = |h: &HostId| {
        activating
            .iter()
            .filter(|a| a.host.as_ref() == Some(h))
            .count() as u32
    };
    let ranked = rank_hosts(
        &hosts,
        (&s.image, s.region()),
        wanted,
        &s.tried_hosts,
        &pending,
        &core.config.placement,
    );
    let Some(host) = ranked.first() else {
        return Ok(());
    };
    let now = now_ms();
    let deadline = now + core.config.timeouts.activating_ms;
    let (host_id, gateway) = (host.id.clone(), host.gateway.clone());
    let placed = modify(core, id, |s| {
        if s.state != SessionState::Placing {
            return false;
        }
        s.host = Some(host_id.clone());
        s.endpoint = Some(gateway.clone());
        s.transition(SessionState::Activating, now, deadline, host_id.as_str());
        true
    })
    .await?;
    if let Some(s) = placed {
        core.metrics
            .placement
            .observe(now.saturating_sub(s.created_ms) as f64 / 1000.0);
        tracing::info!(session_id = %s.id, host_id = %host_id, "placing");
        core.store
            .publish(&Event::Place {
                host: host_id,
                session: s.id,
            })
            .await?;
    }
    Ok(())
}

/// hostd says the VM runs: the session becomes `Active` and its players are told.
pub async fn activated(
    core: &Core,
    host: &HostId,
    id: &SessionId,
    vm: &VmId,
    path: &str,
) -> Result<Option<Session>, StoreError> {
    let now = now_ms();
    let active = modify(core, id, |s| {
        if s.state != SessionState::Activating || s.host.as_ref() != Some(host) {
            return false;
        }
        s.vm = Some(vm.clone());
        let ends_by = s.ends_by_ms.max(now);
        s.transition(SessionState::Active, now, ends_by, path);
        true
    })
    .await?;
    if let Some(s) = &active {
        if let Some(placed_ms) = activation_started_ms(s) {
            core.metrics
                .activation
                .get_or_create(&vec![("path", path.to_owned())])
                .observe(now.saturating_sub(placed_ms) as f64 / 1000.0);
        }
        let oldest = s.created_ms.saturating_sub(s.match_ms);
        core.metrics
            .time_to_match
            .get_or_create(&vec![("mode", s.pool.mode.clone())])
            .observe(now.saturating_sub(oldest) as f64 / 1000.0);
        tracing::info!(session_id = %s.id, host_id = %host, vm_id = %vm, "active");
    }
    Ok(active)
}

/// When the session's last activation attempt began (its last move to `Activating`, when
/// `activate` went to the host): the session's history is the one record of it, on every
/// replica.
pub fn activation_started_ms(s: &Session) -> Option<u64> {
    s.history
        .iter()
        .rev()
        .find(|t| t.state == SessionState::Activating)
        .map(|t| t.at_ms)
}

/// hostd could not activate (or did not answer in time): try another host, or give up after
/// `placement.attempts` hosts.
pub async fn activation_failed(
    core: &Core,
    host: &HostId,
    id: &SessionId,
    why: &str,
) -> Result<(), StoreError> {
    let now = now_ms();
    let attempts = core.config.placement.attempts as usize;
    let placing_ms = core.config.timeouts.placing_ms;
    let next = modify(core, id, |s| {
        if s.state != SessionState::Activating || s.host.as_ref() != Some(host) {
            return false;
        }
        s.tried_hosts.push(host.clone());
        s.host = None;
        s.endpoint = None;
        if s.tried_hosts.len() >= attempts {
            s.end_reason = Some("placement_failed".into());
            s.transition(SessionState::Ended, now, now, why);
        } else {
            s.transition(SessionState::Placing, now, now + placing_ms, why);
        }
        true
    })
    .await?;
    tracing::warn!(session_id = %id, host_id = %host, why, "activation failed");
    // Whatever the host did meanwhile, it must not keep a VM for this session.
    core.store
        .publish(&Event::Destroy {
            host: host.clone(),
            session: id.clone(),
        })
        .await?;
    if let Some(s) = next {
        if s.state == SessionState::Placing {
            try_place(core, id).await?;
        } else {
            count_end(core, &s);
        }
    }
    Ok(())
}

fn count_end(core: &Core, s: &Session) {
    core.metrics
        .sessions_ended
        .get_or_create(&vec![("reason", s.end_reason.clone().unwrap_or_default())])
        .inc();
}

/// Ends a live session for `reason`: players are told (with `results`), and the VM, if one may
/// exist, is destroyed; the session is `Ended` once its host confirms (or at the deadline).
/// Returns the session as stored, `None` if it had already ended or is unknown.
pub async fn end(
    core: &Core,
    id: &SessionId,
    reason: &str,
    results: serde_json::Value,
) -> Result<Option<Session>, StoreError> {
    let now = now_ms();
    let ending_ms = core.config.timeouts.ending_ms;
    let ended = modify(core, id, |s| {
        match s.state {
            SessionState::Ending | SessionState::Ended => return false,
            SessionState::Placing => {
                s.end_reason = Some(reason.to_owned());
                s.results = results.clone();
                // No VM can exist yet: it ends here (players are told on `Ended` too).
                s.transition(SessionState::Ended, now, now, reason);
            }
            SessionState::Activating | SessionState::Active => {
                s.end_reason = Some(reason.to_owned());
                s.results = results.clone();
                s.transition(SessionState::Ending, now, now + ending_ms, reason);
            }
        }
        true
    })
    .await?;
    if let Some(s) = &ended {
        tracing::info!(session_id = %s.id, reason, "session ending");
        count_end(core, s);
        if let (SessionState::Ending, Some(host)) = (s.state, &s.host) {
            core.store
                .publish(&Event::Destroy {
                    host: host.clone(),
                    session: s.id.clone(),
                })
                .await?;
        }
    }
    Ok(ended)
}

/// The session's VM is gone: `Ending` → `Ended`. A VM that vanished while the session was live
/// ends it as `vm_lost`.
pub async fn destroyed(core: &Core, host: &HostId, id: &SessionId) -> Result<(), StoreError> {
    let now = now_ms();
    modify(core, id, |s| {
        if s.host.as_ref() != Some(host) || !s.state.is_live() {
            return false;
        }
        if s.state != SessionState::Ending {
            s.end_reason = Some("vm_lost".into());
        }
        s.transition(SessionState::Ended, now, now, "vm destroyed");
        true
    })
    .await?;
    Ok(())
}

/// Ends a session whose VM cannot be reached any more (host lost): straight to `Ended`.
pub async fn abandon(core: &Core, id: &SessionId, reason: &str) -> Result<(), StoreError> {
    let now = now_ms();
    let done = modify(core, id, |s| {
        if !s.state.is_live() {
            return false;
        }
        if s.state != SessionState::Ending {
            s.end_reason = Some(reason.to_owned());
        }
        s.transition(SessionState::Ended, now, now, reason);
        true
    })
    .await?;
    if let Some(s) = done {
        count_end(core, &s);
    }
    Ok(())
}

/// Every session not yet ended, through the store's per-state index (ended sessions are kept
/// for their results but need nothing).
pub async fn live_sessions(core: &Core) -> Result<Vec<Session>, StoreError> {
    let mut live = Vec::new();
    for st in SessionState::ALL.into_iter().filter(|s| s.is_live()) {
        live.extend(core.store.sessions(Some(st)).await?);
    }
    Ok(live)
}

/// One pass of deadline enforcement. Run by the replica holding the `sweeper` lease.
///
/// A host silent past `host_lost_ms` is marked lost (nothing new is placed on it); its live
/// sessions go on for `host_grace_ms` from when it was last heard, since a restarted or stalled
/// hostd comes back with their VMs still running, and only then end `host_lost` (their VMs
/// destroyed, should it still be connected). Time the store was unreachable counts against no
/// one: silence is measured from the store's return at the earliest, and no deadline is
/// enforced until the hosts have had `host_lost_ms` to be heard again.
pub async fn sweep(core: &Core) -> Result<(), StoreError> {
    let now = now_ms();
    let t = &core.config.timeouts;
    let back = core.outage.back_ms();
    let settled = now >= back.saturating_add(t.host_lost_ms);
    let hosts = core.store.hosts().await?;
    let lost = lost_hosts(core, &hosts, now, back).await?;
    for s in live_sessions(core).await? {
        let silent = s.host.as_ref().and_then(|h| lost.get(h).copied());
        if let (Some(silent), false) = (silent, s.state == SessionState::Placing) {
            if silent > t.host_grace_ms {
                abandon_lost(core, &s).await?;
                continue;
            }
        }
        if s.state == SessionState::Placing && now <= s.deadline_ms {
            if could_place(core, &hosts, &s) {
                try_place(core, &s.id).await?;
            }
        } else if settled && now > s.deadline_ms {
            overdue(core, &s).await?;
        }
    }
    Ok(())
}

/// Marks the hosts silent past `host_lost_ms` lost; returns every lost host with how long it
/// has been silent (counted from the store's return at the earliest, `back`).
async fn lost_hosts(
    core: &Core,
    hosts: &[HostRecord],
    now: u64,
    back: u64,
) -> Result<HashMap<HostId, u64>, StoreError> {
    let mut lost = HashMap::new();
    for h in hosts {
        let silent = now.saturating_sub(h.last_seen_ms.max(back));
        if h.state == HostState::Lost {
            lost.insert(h.id.clone(), silent);
        } else if silent > core.config.timeouts.host_lost_ms
            && core
                .store
                .mark_host(&h.id, h.last_seen_ms, HostState::Lost)
                .await?
        {
            tracing::warn!(host_id = %h.id, silent_ms = silent, "host lost");
            lost.insert(h.id.clone(), silent);
        }
    }
    Ok(lost)
}

/// Ends a session whose host stayed away past the grace; its VM is destroyed should the host
/// still be (or come back) connected.
async fn abandon_lost(core: &Core, s: &Session) -> Result<(), StoreError> {
    tracing::warn!(session_id = %s.id, "host away past the grace: session lost");
    abandon(core, &s.id, "host_lost").await?;
    if let Some(host) = &s.host {
        core.store
            .publish(&Event::Destroy {
                host: host.clone(),
                session: s.id.clone(),
            })
            .await?;
    }
    Ok(())
}

/// What a session past its state's deadline comes to.
async fn overdue(core: &Core, s: &Session) -> Result<(), StoreError> {
    match s.state {
        SessionState::Placing => {
            end(core, &s.id, "placement_failed", serde_json::Value::Null).await?;
        }
        SessionState::Activating => {
            if let Some(h) = &s.host {
                activation_failed(core, h, &s.id, "activation_timeout").await?;
            }
        }
        SessionState::Active => {
            end(core, &s.id, "deadline", serde_json::Value::Null).await?;
        }
        SessionState::Ending => abandon(core, &s.id, "ending_timeout").await?,
        SessionState::Ended => {}
    }
    Ok(())
}

/// Runs [`sweep`] every `period` while this replica holds the sweeper lease. Every replica
/// tries the lease each period, so each one sees the store's outages (see
/// [`crate::domain::Outage`]).
pub async fn run_sweeper(core: Arc<Core>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lease_ms = (period.as_millis() as u64 * 4).max(1000);
        let swept = match core.store.lease("sweeper", &core.replica, lease_ms).await {
            Ok(true) => sweep(&core).await,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        match swept {
            Ok(()) => core.outage.answered(now_ms()),
            Err(e) => {
                core.outage.failed();
                tracing::warn!(error = %e, "sweep failed");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::test_core;

    pub(crate) fn host(id: &str, running: u32, warm: u32, docked: bool) -> HostRecord {
        HostRecord::test_double(id, running, warm, docked)
    }

    #[test]
    fn a_host_serves_its_own_region_or_any_when_it_names_none() {
        let mut eu = host("eu-1", 0, 1, true);
        eu.region = Some("eu".into());
        let mut us = host("us-1", 0, 1, true);
        us.region = Some("us".into());
        let anywhere = host("any-1", 1, 0, true);
        let hosts = [eu, us, anywhere];
        let none = |_: &HostId| 0;
        let ids = |r: Vec<&HostRecord>| r.iter().map(|h| h.id.to_string()).collect::<Vec<_>>();
        let rank = |region| rank_hosts(&hosts, ("arena", region), (128, 1), &[], &none, &spread());
        assert_eq!(ids(rank("eu")), ["eu-1", "any-1"]);
        assert_eq!(ids(rank("us")), ["us-1", "any-1"]);
        assert_eq!(ids(rank("asia")), ["any-1"]);
    }

    /// Two duel players matched on `core`: the new session, `Placing` (or `Activating` once
    /// a host took it).
    async fn matched(core: &Arc<Core>) -> Session {
        use crate::model::{PoolKey, Ticket};
        let pool = PoolKey {
            mode: "duel".into(),
            region: "local".into(),
        };
        for p in ["a", "b"] {
            let t = Ticket {
                id: format!("t-{p}"),
                player: berth_protocol::PlayerId::new(p).expect("id"),
                pool: pool.clone(),
                party: None,
                skill: 1000.0,
                enqueued_ms: now_ms(),
                away_since_ms: None,
                latencies: None,
            };
            core.store.enqueue(&t).await.expect("enqueue");
        }
        assert_eq!(
            crate::matchmaker::cycle(core, &pool).await.expect("cycle"),
            1
        );
        core.store.sessions(None).await.expect("sessions").remove(0)
    }

    /// A host up with one VM slot, heard from just now.
    async fn host_up(core: &Core) -> HostRecord {
        let mut h = host("h1", 0, 1, true);
        h.last_seen_ms = now_ms();
        core.store.put_host(&h).await.expect("host");
        h
    }

    /// A match formed and placed on [`host_up`]'s host.
    async fn placed(core: &Arc<Core>) -> (HostRecord, Session) {
        let h = host_up(core).await;
        let s = matched(core).await;
        try_place(core, &s.id).await.expect("place");
        (h, s)
    }

    async fn state_of(core: &Core, id: &SessionId) -> (SessionState, Option<String>) {
        let s = core.store.session(id).await.expect("read").expect("kept");
        (s.state, s.end_reason)
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_ends_a_session_nobody_could_place_once_its_deadline_passed() {
        let core = test_core();
        let s = matched(&core).await;
        // No host: the session waits, placing, until its deadline.
        sweep(&core).await.expect("sweep");
        assert_eq!(state_of(&core, &s.id).await, (SessionState::Placing, None));
        modify(&core, &s.id, |s| {
            s.deadline_ms = now_ms() - 1;
            true
        })
        .await
        .expect("modify");
        let sweeper = tokio::spawn(run_sweeper(core.clone(), Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_secs(3)).await;
        sweeper.abort();
        assert_eq!(
            state_of(&core, &s.id).await,
            (SessionState::Ended, Some("placement_failed".into()))
        );
    }

    /// An active session on a host last heard `silent_ms` ago.
    async fn active_on_silent_host(core: &Arc<Core>, silent_ms: u64) -> (HostRecord, Session) {
        let (mut h, s) = placed(core).await;
        let vm = VmId::new("vm-1").expect("id");
        activated(core, &h.id, &s.id, &vm, "warm")
            .await
            .expect("activated");
        h.last_seen_ms = now_ms() - silent_ms;
        core.store.put_host(&h).await.expect("host");
        (h, s)
    }

    async fn host_state(core: &Core, h: &HostRecord) -> HostState {
        core.store
            .host(&h.id)
            .await
            .expect("read")
            .expect("kept")
            .state
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_host_keeps_its_live_sessions_for_the_grace_then_they_end_host_lost() {
        let core = test_core();
        let t = core.config.timeouts.clone();
        // Silent past host_lost_ms, within the grace: lost (nothing new goes there), but its
        // match goes on, since a restarted hostd comes back with the VM.
        let (h, s) = active_on_silent_host(&core, t.host_lost_ms + 1).await;
        sweep(&core).await.expect("sweep");
        assert_eq!(host_state(&core, &h).await, HostState::Lost);
        assert_eq!(state_of(&core, &s.id).await, (SessionState::Active, None));
        // Away past the grace: the session ends, and its VM is to go if the host is still there.
        let mut events = core.store.subscribe();
        let mut away = core.store.host(&h.id).await.expect("read").expect("kept");
        away.last_seen_ms = now_ms() - t.host_grace_ms - 1;
        core.store.put_host(&away).await.expect("host");
        sweep(&core).await.expect("sweep");
        assert_eq!(
            state_of(&core, &s.id).await,
            (SessionState::Ended, Some("host_lost".into()))
        );
        let destroy = loop {
            match events.try_recv().expect("an event") {
                Event::Destroy { host, session } => break (host, session),
                _ => continue,
            }
        };
        assert_eq!(destroy, (h.id.clone(), s.id.clone()));
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_store_was_down_counts_against_no_host_and_no_deadline() {
        let core = test_core();
        let t = core.config.timeouts.clone();
        // Silent far past the grace, but only because the store was down until just now.
        let (h, s) = active_on_silent_host(&core, t.host_grace_ms + 5_000).await;
        modify(&core, &s.id, |s| {
            s.deadline_ms = now_ms() - 1;
            true
        })
        .await
        .expect("modify");
        core.outage.failed();
        assert!(core.outage.is_down());
        core.outage.answered(now_ms());
        sweep(&core).await.expect("sweep");
        assert_eq!(host_state(&core, &h).await, HostState::Up);
        assert_eq!(state_of(&core, &s.id).await, (SessionState::Active, None));
        // Once the hosts have had host_lost_ms to be heard again, deadlines hold once more.
        core.outage.failed();
        core.outage.answered(now_ms() - t.host_lost_ms - 1);
        sweep(&core).await.expect("sweep");
        assert_eq!(
            state_of(&core, &s.id).await,
            (SessionState::Ending, Some("deadline".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_session_past_its_deadline_ends_and_its_vm_is_destroyed() {
        let core = test_core();
        let (h, s) = placed(&core).await;
        let vm = VmId::new("vm-1").expect("id");
        let active = activated(&core, &h.id, &s.id, &vm, "warm")
            .await
            .expect("activated");
        assert_eq!(active.map(|a| a.state), Some(SessionState::Active));
        let mut events = core.store.subscribe();
        modify(&core, &s.id, |s| {
            s.deadline_ms = now_ms() - 1;
            true
        })
        .await
        .expect("modify");
        sweep(&core).await.expect("sweep");
        assert_eq!(
            state_of(&core, &s.id).await,
            (SessionState::Ending, Some("deadline".into()))
        );
        let destroy = Event::Destroy {
            host: h.id.clone(),
            session: s.id.clone(),
        };
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e);
        }
        assert!(seen.contains(&destroy), "no destroy among {seen:?}");
        // The host confirms the VM is gone: ended, the reason kept.
        destroyed(&core, &h.id, &s.id).await.expect("destroyed");
        assert_eq!(
            state_of(&core, &s.id).await,
            (SessionState::Ended, Some("deadline".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn activation_latency_comes_from_the_sessions_history() {
        let core = test_core();
        let (h, s) = placed(&core).await;
        let placed = core
            .store
            .session(&s.id)
            .await
            .expect("read")
            .expect("kept");
        let started = activation_started_ms(&placed).expect("an activating transition");
        let vm = VmId::new("vm1").expect("id");
        let active = activated(&core, &h.id, &s.id, &vm, "warm")
            .await
            .expect("activated")
            .expect("now active");
        assert_eq!(active.state, SessionState::Active);
        assert!(started <= now_ms());
        // A second answer for the same session changes nothing.
        assert!(activated(&core, &h.id, &s.id, &vm, "warm")
            .await
            .expect("answered")
            .is_none());
    }

    fn ids(v: Vec<&HostRecord>) -> Vec<&str> {
        v.into_iter().map(|h| h.id.as_str()).collect()
    }

    fn spread() -> Placement {
        Placement::default()
    }

    fn pack() -> Placement {
        Placement {
            policy: Policy::Pack,
            ..Placement::default()
        }
    }

    #[test]
    fn sessions_spread_over_zones_among_equally_ready_hosts() {
        let zoned = |id, running, zone: &str| {
            let mut h = host(id, running, 1, true);
            h.zone = Some(zone.into());
            h
        };
        // Zone a runs 3 (a1 2 + a2 1), zone b runs 2: b's host wins although a2 is idler.
        let hosts = [
            zoned("a1", 2, "a"),
            zoned("a2", 1, "a"),
            zoned("b1", 2, "b"),
        ];
        let none = |_: &HostId| 0;
        let rank =
            |p: &Placement| ids(rank_hosts(&hosts, ("arena", "eu"), (128, 1), &[], &none, p));
        assert_eq!(rank(&spread()), ["b1", "a2", "a1"]);
        let ignore = Placement {
            zones: Zones::Ignore,
            ..Placement::default()
        };
        assert_eq!(rank(&ignore), ["a2", "a1", "b1"]);
        // Readiness still comes first: a warm clone beats the emptier zone.
        let mut cold_b = zoned("b1", 0, "b");
        cold_b.images[0].warm = 0;
        let hosts = [zoned("a1", 2, "a"), cold_b];
        assert_eq!(
            ids(rank_hosts(
                &hosts,
                ("arena", "eu"),
                (128, 1),
                &[],
                &none,
                &spread()
            )),
            ["a1", "b1"]
        );
    }

    #[test]
    fn warm_then_docked_then_policy() {
        let hosts = [
            host("busy", 3, 0, true),
            host("idle", 0, 0, true),
            host("warm", 2, 1, true),
            host("cold", 0, 0, false),
        ];
        let none = |_: &HostId| 0;
        let spread = rank_hosts(&hosts, ("arena", "eu"), (128, 1), &[], &none, &spread());
        assert_eq!(ids(spread), ["warm", "idle", "busy", "cold"]);
        let pack = rank_hosts(&hosts, ("arena", "eu"), (128, 1), &[], &none, &pack());
        assert_eq!(ids(pack), ["warm", "busy", "idle", "cold"]);
    }

    #[test]
    fn full_draining_lost_tried_or_too_small_hosts_are_left_out() {
        let mut draining = host("draining", 0, 1, true);
        draining.draining = true;
        let mut lost = host("lost", 0, 1, true);
        lost.state = HostState::Lost;
        let hosts = [
            host("full", 4, 0, true),
            draining,
            lost,
            host("tried", 0, 0, true),
            host("ok", 1, 0, true),
        ];
        let none = |_: &HostId| 0;
        let tried = [HostId::new("tried").expect("id")];
        assert_eq!(
            ids(rank_hosts(
                &hosts,
                ("arena", "eu"),
                (128, 1),
                &tried,
                &none,
                &spread()
            )),
            ["ok"]
        );
        assert!(
            rank_hosts(&hosts, ("arena", "eu"), (256, 1), &tried, &none, &spread()).is_empty(),
            "too small"
        );
        assert!(
            rank_hosts(&hosts, ("other", "eu"), (1, 1), &[], &none, &spread()).is_empty(),
            "no such image"
        );
        // Activations in flight count against room (and against warm clones).
        let three = |_: &HostId| 3;
        assert!(rank_hosts(
            &[host("ok", 1, 0, true)],
            ("arena", "eu"),
            (128, 1),
            &[],
            &three,
            &spread()
        )
        .is_empty());
    }
}
