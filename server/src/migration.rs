//! Moving a live session to another host (issue 15): the server's part. It picks the target
//! (same region, the same substrate docked, up, undrained, with room), books the migration on
//! the session, and relays: `receive` to the target, whose `receiving` address goes to the
//! source as `send`; the target's `received` moves the session to it in one compare-and-set
//! (host, VM, endpoint) and its players get a fresh `matched`. Any `migration_failed` clears
//! the booking and the session plays on where it was — unless the source had already sent the
//! VM, which then is lost.

use crate::domain::Core;
use crate::model::{Event, HostRecord, HostState, Migration, Session, SessionState};
use crate::sessions::modify;
use crate::store::StoreError;
use crate::util::now_ms;
use berth_protocol::{HostId, SessionId, VmId};

/// Why a migration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("no session {0}")]
    Unknown(SessionId),
    #[error("session {0} is not active (it is {1})")]
    NotActive(SessionId, &'static str),
    #[error("session {0} is already moving to {1}")]
    InFlight(SessionId, HostId),
    #[error("no host can take session {0}: {1}")]
    NoTarget(SessionId, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl MigrateError {
    pub fn code(&self) -> &'static str {
        match self {
            MigrateError::Unknown(_) => "unknown_session",
            MigrateError::NotActive(..) => "not_active",
            MigrateError::InFlight(..) => "migration_in_flight",
            MigrateError::NoTarget(..) => "no_target",
            MigrateError::Store(e) => e.code(),
        }
    }
}

/// How long the server waits for a migration it started before it gives up on it.
pub const MIGRATION_TIMEOUT_MS: u64 = 30_000;

/// Starts moving `id` to `to` (or the best host): books it and asks the target to receive.
/// Returns the source and the target.
pub async fn start(
    core: &Core,
    id: &SessionId,
    to: Option<&HostId>,
) -> Result<(HostId, HostId), MigrateError> {
    let s = core
        .store
        .session(id)
        .await?
        .ok_or_else(|| MigrateError::Unknown(id.clone()))?;
    if s.state != SessionState::Active {
        return Err(MigrateError::NotActive(id.clone(), s.state.as_str()));
    }
    if let Some(m) = &s.migration {
        return Err(MigrateError::InFlight(id.clone(), m.to.clone()));
    }
    let from = s
        .host
        .clone()
        .ok_or_else(|| MigrateError::NotActive(id.clone(), "unplaced"))?;
    let hosts = core.store.hosts().await?;
    let target = pick_target(&hosts, &s, &from, to)
        .map_err(|why| MigrateError::NoTarget(id.clone(), why))?;
    let now = now_ms();
    let booked = modify(core, id, |s| {
        if s.state != SessionState::Active
            || s.migration.is_some()
            || s.host.as_ref() != Some(&from)
        {
            return false;
        }
        s.migration = Some(Migration {
            from: from.clone(),
            to: target.clone(),
            started_ms: now,
            sent: false,
        });
        let note = format!("moving from {from} to {target}");
        s.history.push(crate::model::Transition {
            state: SessionState::Active,
            at_ms: now,
            note,
        });
        true
    })
    .await?;
    if booked.is_none() {
        return Err(MigrateError::InFlight(id.clone(), target));
    }
    core.store
        .publish(&Event::Receive {
            host: target.clone(),
            session: id.clone(),
        })
        .await?;
    Ok((from, target))
}

/// The host to move `s` to: `to` if it can take it, else the least busy that can. Same
/// region, the same substrate docked as the source's, up, undrained, with room, not the source.
pub fn pick_target(
    hosts: &[HostRecord],
    s: &Session,
    from: &HostId,
    to: Option<&HostId>,
) -> Result<HostId, String> {
    let substrate = |h: &HostRecord| {
        h.images
            .iter()
            .find(|i| i.name == s.image && i.docked)
            .and_then(|i| i.substrate.clone())
    };
    let source = hosts.iter().find(|h| &h.id == from);
    let wanted = source.and_then(substrate);
    let can = |h: &&HostRecord| {
        &h.id != from
            && h.state == HostState::Up
            && !h.draining
            && h.peer.is_some()
            && h.region.as_deref().is_none_or(|r| r == s.region())
            && h.running() < h.max_vms
            && wanted.is_some()
            && substrate(h) == wanted
    };
    if let Some(to) = to {
        let h = hosts
            .iter()
            .find(|h| &h.id == to)
            .ok_or(format!("no host {to}"))?;
        return can(&h).then(|| h.id.clone()).ok_or(format!(
            "host {to} cannot take it (region, substrate, room, peer address or state)"
        ));
    }
    hosts
        .iter()
        .filter(can)
        .min_by_key(|h| (h.running(), h.id.clone()))
        .map(|h| h.id.clone())
        .ok_or(
            "no other host of its region with the same substrate, room and a peer address".into(),
        )
}

/// `receive` for the target, built from the booked session.
pub fn receive_message(s: &Session) -> berth_protocol::host::ServerToHost {
    berth_protocol::host::ServerToHost::Receive {
        session: s.id.clone(),
        image: s.image.clone(),
        players: s.players.clone(),
        teams: s.teams.clone(),
        ticket_key: s.ticket_key.clone(),
        params: s.params.clone(),
        deadline_ms: s.ends_by_ms,
    }
}

/// The target waits at `addr`: the source is asked to send.
pub async fn receiving(
    core: &Core,
    host: &HostId,
    id: &SessionId,
    addr: String,
) -> Result<(), StoreError> {
    let Some(s) = core.store.session(id).await? else {
        return Ok(());
    };
    let Some(m) = s.migration.filter(|m| &m.to == host) else {
        return Ok(());
    };
    core.store
        .publish(&Event::Send {
            host: m.from,
            session: id.clone(),
            to: addr,
        })
        .await
}

/// The source sent the VM: booked (a failure of the target from now on loses it), with the
/// figures in the timeline — also when the target's `received` came first.
pub async fn sent(
    core: &Core,
    host: &HostId,
    id: &SessionId,
    note: String,
) -> Result<(), StoreError> {
    let now = now_ms();
    modify(core, id, |s| {
        match s.migration.as_mut() {
            Some(m) if &m.from == host => m.sent = true,
            // Already moved on from this host.
            None if s.host.as_ref() != Some(host) && s.state.is_live() => {}
            _ => return false,
        }
        s.history.push(crate::model::Transition {
            state: s.state,
            at_ms: now,
            note: note.clone(),
        });
        true
    })
    .await?;
    Ok(())
}

/// The VM runs on the target: the session is its, in one compare-and-set; players are told.
pub async fn received(
    core: &Core,
    host: &HostId,
    id: &SessionId,
    vm: &VmId,
) -> Result<bool, StoreError> {
    let Some(record) = core.store.host(host).await? else {
        return Ok(false);
    };
    let now = now_ms();
    let moved = modify(core, id, |s| {
        let Some(m) = s.migration.take_if(|m| &m.to == host) else {
            return false;
        };
        s.host = Some(host.clone());
        s.vm = Some(vm.clone());
        s.endpoint = Some(record.gateway.clone());
        s.history.push(crate::model::Transition {
            state: s.state,
            at_ms: now,
            note: format!("moved from {} to {host}", m.from),
        });
        true
    })
    .await?;
    Ok(moved.is_some())
}

/// A side failed: the booking is cleared and the session plays on at the source, unless the
/// source had already sent the VM (then it is lost).
pub async fn failed(
    core: &Core,
    host: &HostId,
    id: &SessionId,
    why: String,
) -> Result<(), StoreError> {
    let now = now_ms();
    let lost = std::sync::atomic::AtomicBool::new(false);
    modify(core, id, |s| {
        let Some(m) = s.migration.take_if(|m| &m.to == host || &m.from == host) else {
            return false;
        };
        lost.store(
            m.sent && &m.to == host,
            std::sync::atomic::Ordering::Relaxed,
        );
        s.history.push(crate::model::Transition {
            state: s.state,
            at_ms: now,
            note: format!("moving to {} failed: {why}", m.to),
        });
        true
    })
    .await?;
    if lost.into_inner() {
        crate::sessions::abandon(core, id, "vm_lost").await?;
    }
    Ok(())
}

/// Moves every active session off `host` (it is draining), one after another, each to the
/// best host that can take it; one that none can take plays to its end where it is. Returns
/// how many moved. Runs in the background of whoever drained the host.
pub async fn drain(core: std::sync::Arc<Core>, host: HostId) -> usize {
    let sessions = match crate::sessions::live_sessions(&core).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(host_id = %host, error = %e, "drain: reading the live sessions");
            return 0;
        }
    };
    let mut moved = 0;
    for s in sessions
        .into_iter()
        .filter(|s| s.host.as_ref() == Some(&host))
    {
        if s.state != SessionState::Active {
            continue;
        }
        match start(&core, &s.id, None).await {
            Ok((_, to)) => match settled(&core, &s.id).await {
                Ok(Some(after)) if after.host.as_ref() == Some(&to) => moved += 1,
                Ok(_) => {
                    tracing::warn!(session_id = %s.id, "drain: the move failed; it plays on here")
                }
                Err(e) => {
                    tracing::warn!(session_id = %s.id, error = %e, "drain: waiting for the move")
                }
            },
            Err(e) => {
                tracing::info!(session_id = %s.id, code = e.code(), error = %e, "drain: not moved; it plays on here")
            }
        }
    }
    tracing::info!(host_id = %host, moved, "drain: sessions moved off");
    moved
}

/// Waits until `id`'s migration is over (its booking cleared), failing it after
/// [`MIGRATION_TIMEOUT_MS`] (a host that never answered); the session then (`None`: it is
/// gone).
pub async fn settled(core: &Core, id: &SessionId) -> Result<Option<Session>, StoreError> {
    loop {
        let Some(s) = core.store.session(id).await? else {
            return Ok(None);
        };
        let Some(m) = &s.migration else {
            return Ok(Some(s));
        };
        if now_ms().saturating_sub(m.started_ms) > MIGRATION_TIMEOUT_MS {
            let to = m.to.clone();
            failed(core, &to, id, "no answer in time".into()).await?;
            continue;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
