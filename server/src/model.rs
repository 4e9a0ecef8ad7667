//! The records the server keeps in its [`crate::store::Store`]: tickets, sessions, hosts, player
//! bindings, and the events replicas tell each other.

use berth_protocol::host::{HostVm, ImageCapacity};
use berth_protocol::play::{PartySpec, RegionReason};
use berth_protocol::{HostId, PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a ticket waits: one queue per game mode and region.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PoolKey {
    pub mode: String,
    pub region: String,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.mode, self.region)
    }
}

/// One player waiting for a match. Party members each hold their own ticket with the same
/// `party`; the matcher takes a party only whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub id: String,
    pub player: PlayerId,
    pub pool: PoolKey,
    #[serde(default)]
    pub party: Option<PartySpec>,
    pub skill: f64,
    pub enqueued_ms: u64,
    /// Set while the player has no live connection; the ticket is dropped after the grace.
    #[serde(default)]
    pub away_since_ms: Option<u64>,
    /// Queued with latencies (in the mode's [`BY_LATENCY`] pool): the milliseconds the client
    /// measured to each region the mode offers.
    ///
    /// [`BY_LATENCY`]: berth_protocol::play::BY_LATENCY
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latencies: Option<std::collections::BTreeMap<String, u32>>,
}

/// What a player is bound to: one live ticket or one session, never both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Binding {
    Queued { ticket: String, pool: PoolKey },
    Session { session: SessionId },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Placing,
    Activating,
    Active,
    Ending,
    Ended,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Placing => "placing",
            SessionState::Activating => "activating",
            SessionState::Active => "active",
            SessionState::Ending => "ending",
            SessionState::Ended => "ended",
        }
    }

    pub const ALL: [SessionState; 5] = [
        SessionState::Placing,
        SessionState::Activating,
        SessionState::Active,
        SessionState::Ending,
        SessionState::Ended,
    ];

    pub fn is_live(self) -> bool {
        self != SessionState::Ended
    }
}

impl std::str::FromStr for SessionState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SessionState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown session state {}", berth_protocol::echo(s)))
    }
}

/// One entry of a session's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub state: SessionState,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A live session moving from one host to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub from: HostId,
    pub to: HostId,
    pub started_ms: u64,
    /// The source said `sent`: the VM left it.
    #[serde(default)]
    pub sent: bool,
}

/// A match and the VM that runs it. Changed only by compare-and-set on `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub version: u64,
    /// The queue it was matched from (its region is [`BY_LATENCY`] for latency-queued players).
    ///
    /// [`BY_LATENCY`]: berth_protocol::play::BY_LATENCY
    pub pool: PoolKey,
    /// The region it is played in (placement: a host of this region), and why; empty in
    /// records from before regions were chosen (then the pool's region, see [`Self::region`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_reason: Option<RegionReason>,
    /// A move to another host under way (see [`crate::migration`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    pub image: String,
    pub state: SessionState,
    pub players: Vec<PlayerId>,
    pub teams: Vec<Vec<PlayerId>>,
    /// Per-session key (hex) for this session's tickets; never shown to operators.
    pub ticket_key: String,
    pub params: serde_json::Value,
    pub host: Option<HostId>,
    /// Hosts that failed this session's activation; placement avoids them.
    #[serde(default)]
    pub tried_hosts: Vec<HostId>,
    pub vm: Option<VmId>,
    pub endpoint: Option<String>,
    pub created_ms: u64,
    /// When the current state must be left; the sweeper acts on sessions past it.
    pub deadline_ms: u64,
    /// When an active session ends at the latest.
    pub ends_by_ms: u64,
    pub history: Vec<Transition>,
    pub end_reason: Option<String>,
    #[serde(default)]
    pub results: serde_json::Value,
    /// Milliseconds from the oldest ticket's enqueue to the match being formed.
    pub match_ms: u64,
}

impl Session {
    /// Moves to `state`, recording the transition; the caller stores it with compare-and-set.
    pub fn transition(&mut self, state: SessionState, now_ms: u64, deadline_ms: u64, note: &str) {
        self.state = state;
        self.deadline_ms = deadline_ms;
        self.history.push(Transition {
            state,
            at_ms: now_ms,
            note: note.to_owned(),
        });
    }

    /// The `activate` that asks its host for a VM (idempotent by session id: sent again after
    /// a host's reconnect).
    pub fn activate_message(self) -> berth_protocol::host::ServerToHost {
        berth_protocol::host::ServerToHost::Activate {
            session: self.id,
            image: self.image,
            players: self.players,
            teams: self.teams,
            ticket_key: self.ticket_key,
            params: self.params,
            deadline_ms: self.deadline_ms,
        }
    }

    /// The region the session is played in.
    pub fn region(&self) -> &str {
        if self.region.is_empty() {
            &self.pool.region
        } else {
            &self.region
        }
    }

    pub fn since_ms(&self) -> u64 {
        self.history.last().map_or(self.created_ms, |t| t.at_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Up,
    /// The websocket closed; the host is lost unless it reconnects within the grace.
    Disconnected,
    Lost,
}

/// A host as the server knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: HostId,
    pub state: HostState,
    pub draining: bool,
    pub accel: String,
    pub driver: String,
    pub gateway: String,
    pub max_vms: u32,
    pub images: Vec<ImageCapacity>,
    pub vms: Vec<HostVm>,
    /// The region it serves (only that region's sessions are placed on it); None: any.
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// Where it serves its docked substrates to peers (`http://IP:PORT`); None: it serves none.
    #[serde(default)]
    pub peer: Option<String>,
    /// The replica holding this host's websocket.
    pub replica: String,
    pub connected_ms: u64,
    pub last_seen_ms: u64,
}

impl HostRecord {
    pub fn running(&self) -> u32 {
        self.images.iter().map(|i| i.running).sum()
    }

    /// A test double of an up host with one 128 MiB `arena` image: `running` VMs, `warm`
    /// clones, a docked substrate or not; room for 4 VMs, no region.
    #[cfg(test)]
    pub fn test_double(id: &str, running: u32, warm: u32, docked: bool) -> HostRecord {
        HostRecord {
            id: HostId::new(id).expect("id"),
            state: HostState::Up,
            draining: false,
            accel: "tcg".into(),
            driver: "qemu".into(),
            gateway: String::new(),
            max_vms: 4,
            images: vec![ImageCapacity {
                name: "arena".into(),
                docked,
                warm,
                running,
                memory_mib: 128,
                vcpus: 1,
                substrate: None,
            }],
            vms: vec![],
            region: None,
            zone: None,
            peer: None,
            replica: String::new(),
            connected_ms: 0,
            last_seen_ms: 0,
        }
    }
}

/// What replicas tell each other over the store's event channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Tickets arrived in this pool: its matcher should look.
    QueueChanged { pool: PoolKey },
    /// A ticket left the queue without a match (tell the player why).
    Dequeued {
        player: PlayerId,
        ticket: String,
        reason: String,
    },
    /// A session moved to `state`; replicas with its players' sockets tell them.
    Session {
        session: SessionId,
        state: SessionState,
    },
    /// The replica holding `host`'s websocket should send it `activate` for `session`.
    Place { host: HostId, session: SessionId },
    /// The replica holding `host`'s websocket should send it `receive` for `session`.
    Receive { host: HostId, session: SessionId },
    /// The replica holding `host`'s websocket should send it `send` for `session` to `to`.
    Send {
        host: HostId,
        session: SessionId,
        to: String,
    },
    /// The replica holding `host`'s websocket should send it `destroy` for `session`.
    Destroy { host: HostId, session: SessionId },
    /// The replica holding `host`'s websocket should send it `share_substrate` (a peer asked
    /// for its substrate of `image`; see [`crate::shipping`]).
    Share {
        host: HostId,
        image: String,
        grant: String,
        ttl_ms: u64,
    },
    /// A player connected on `conn`; any other connection of theirs is closed.
    PlayerConnected { player: PlayerId, conn: String },
    /// Never published: the store's event stream had a gap (its subscription was lost and is
    /// back), so this replica's sockets re-read what they may have missed.
    Resync,
}
