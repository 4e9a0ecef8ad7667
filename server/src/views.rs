//! What operators see of hosts, pools, sessions and queues: the views the admin API answers
//! with and the dashboard's feed carries, built from the store's records.

use crate::model::{HostRecord, HostState, Session, SessionState, Transition};
use berth_protocol::host::ImageCapacity;
use berth_protocol::{HostId, PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    pub id: HostId,
    /// `up`, `disconnected`, `lost`.
    pub state: HostState,
    pub draining: bool,
    pub accel: String,
    pub driver: String,
    pub gateway: String,
    pub max_vms: u32,
    pub running: u32,
    pub images: Vec<ImageCapacity>,
    /// The region it serves (None: any) and its zone.
    pub region: Option<String>,
    pub zone: Option<String>,
    /// Where it serves its docked substrates to peers (None: it serves none).
    pub peer: Option<String>,
    pub replica: String,
    pub connected_ms: u64,
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolView {
    pub image: String,
    /// Hosts up and not draining that offer the image.
    pub hosts: u32,
    pub docked_hosts: u32,
    pub warm: u32,
    pub running: u32,
}

/// A session as the list shows it (the rest — teams, timeline, results — is one
/// `GET /v1/admin/sessions/{id}` away).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRow {
    pub id: SessionId,
    pub state: SessionState,
    pub mode: String,
    /// The region it is played in (for players queued by latency, the one chosen for them).
    pub region: String,
    pub image: String,
    pub host: Option<HostId>,
    pub players: Vec<PlayerId>,
    pub created_ms: u64,
    /// When it entered its current state.
    pub since_ms: u64,
    pub end_reason: Option<String>,
}

impl From<&Session> for SessionRow {
    fn from(s: &Session) -> Self {
        SessionRow {
            id: s.id.clone(),
            state: s.state,
            mode: s.pool.mode.clone(),
            region: s.region().to_owned(),
            image: s.image.clone(),
            host: s.host.clone(),
            players: s.players.clone(),
            created_ms: s.created_ms,
            since_ms: s.since_ms(),
            end_reason: s.end_reason.clone(),
        }
    }
}

/// A session in full (`GET /v1/admin/sessions/{id}`): its row and the rest.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionView {
    #[serde(flatten)]
    pub row: SessionRow,
    pub vm: Option<VmId>,
    pub endpoint: Option<String>,
    pub teams: Vec<Vec<PlayerId>>,
    pub age_ms: u64,
    pub deadline_ms: u64,
    pub ends_by_ms: u64,
    pub match_ms: u64,
    pub results: serde_json::Value,
    pub history: Vec<Transition>,
}

impl SessionView {
    pub(crate) fn of(s: Session, now: u64) -> Self {
        SessionView {
            row: SessionRow::from(&s),
            age_ms: now.saturating_sub(s.created_ms),
            vm: s.vm,
            endpoint: s.endpoint,
            teams: s.teams,
            deadline_ms: s.deadline_ms,
            ends_by_ms: s.ends_by_ms,
            match_ms: s.match_ms,
            results: s.results,
            history: s.history,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueuedTicket {
    pub ticket: String,
    pub player: PlayerId,
    pub party: Option<String>,
    pub skill: f64,
    pub waited_ms: u64,
    pub away: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueueView {
    pub mode: String,
    pub region: String,
    pub depth: u64,
    pub oldest_wait_ms: u64,
    pub tickets: Vec<QueuedTicket>,
}

impl From<HostRecord> for HostView {
    fn from(h: HostRecord) -> Self {
        HostView {
            running: h.running(),
            id: h.id,
            state: h.state,
            draining: h.draining,
            accel: h.accel,
            driver: h.driver,
            gateway: h.gateway,
            max_vms: h.max_vms,
            images: h.images,
            region: h.region,
            zone: h.zone,
            peer: h.peer,
            replica: h.replica,
            connected_ms: h.connected_ms,
            last_seen_ms: h.last_seen_ms,
        }
    }
}

/// Capacity per image across `hosts`, by image name.
pub fn pool_views(hosts: &[HostRecord]) -> Vec<PoolView> {
    let mut by: BTreeMap<String, PoolView> = BTreeMap::new();
    for h in hosts {
        for i in &h.images {
            let p = by.entry(i.name.clone()).or_insert_with(|| PoolView {
                image: i.name.clone(),
                hosts: 0,
                docked_hosts: 0,
                warm: 0,
                running: 0,
            });
            p.running += i.running;
            if h.state == HostState::Up && !h.draining {
                p.hosts += 1;
                p.docked_hosts += i.docked as u32;
                p.warm += i.warm;
            }
        }
    }
    by.into_values().collect()
}
