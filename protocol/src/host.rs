//! hostd ↔ server messages on the `/v1/hosts` websocket: one JSON object per text frame.
//!
//! ```text
//! hostd:  {"type":"register","v":1,"host":"h1",...,"vms":[…]}   (first message, every connect)
//! server: {"type":"welcome","v":1,"heartbeat_ms":2000}
//!         {"type":"destroy","session":"…"}                    (reconciliation, if any)
//! hostd:  {"type":"heartbeat","images":[…]}                   (every heartbeat_ms)
//! server: {"type":"activate","session":"…","image":"arena",…}
//! hostd:  {"type":"activated","session":"…","vm":"…",…} | {"type":"activate_failed",…}
//! hostd:  {"type":"ended","session":"…","reason":"game_over","results":{…}}   (game over)
//! server: {"type":"recorded","session":"…"}                  (hostd may forget the ended)
//! server: {"type":"destroy","session":"…"}
//! hostd:  {"type":"destroyed","session":"…","vm":"…"}
//! ```
//!
//! Substrate shipping (a host without a docked substrate asks for a peer's before it primes):
//! ```text
//! hostd:  {"type":"want_substrate","image":"arena","fingerprint":"sha256:…"}
//! server: {"type":"fetch_substrate","image":"arena","from":"http://10.0.0.7:7072","grant":"…"}
//!       | {"type":"no_substrate","image":"arena","reason":"no_peer"}          (then it primes)
//! server → the peer: {"type":"share_substrate","image":"arena","grant":"…","ttl_ms":30000}
//! ```
//! hostd authenticates with a bearer JWT whose `role` is `host` and whose `sub` is its host id.

use crate::codes::{ActivationPath, ErrorCode};
use crate::ids::{HostId, PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of these messages.
pub const HOST_PROTOCOL_VERSION: u32 = 1;

/// What a host can run of one image right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageCapacity {
    pub name: String,
    /// A substrate is docked: activations need no boot.
    pub docked: bool,
    /// Warm clones waiting only for an identity.
    pub warm: u32,
    /// Running (activated) VMs of this image.
    pub running: u32,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The identity of the docked substrate (its header's fingerprint, `sha256:<hex>`): hosts
    /// whose substrates have the same one can restore each other's. None: nothing docked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substrate: Option<String>,
}

/// A VM a host really has, reported on every (re)connect so the server can reconcile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostVm {
    pub vm: VmId,
    pub session: SessionId,
    pub image: String,
}

/// hostd → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    Register {
        v: u32,
        host: HostId,
        /// `kvm`, `tcg` or `xen`.
        accel: String,
        driver: String,
        /// Where players reach this host's gateway (`ws://…`).
        gateway: String,
        max_vms: u32,
        images: Vec<ImageCapacity>,
        vms: Vec<HostVm>,
        /// The region this host serves (`eu`, `us-east`…; the modes' region names): sessions
        /// of that region only. None: any region.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// Its zone within the region (a rack, a data centre), for the operators' views.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        zone: Option<String>,
        /// Where this host serves its docked substrates to peers (`http://IP:PORT`); None: it
        /// serves none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
        /// The `ended` and `failed` reports hostd holds that the server has not acknowledged
        /// with `recorded` (their VMs are gone, so `vms` cannot say it): the server records
        /// them before it reconciles `vms`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        outbox: Vec<HostMessage>,
    },
    Heartbeat {
        images: Vec<ImageCapacity>,
        /// hostd is draining (stopping): it takes no new sessions, and its live ones finish.
        /// The server then places nothing more on it, as after an admin drain.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        draining: bool,
    },
    Activated {
        session: SessionId,
        vm: VmId,
        /// `warm`, `substrate`, `cold`, or `adopted` (a VM an earlier hostd left running).
        path: ActivationPath,
        activate_us: u64,
    },
    ActivateFailed {
        session: SessionId,
        code: ErrorCode,
        message: String,
    },
    /// The game in the VM reported game over; hostd destroys the VM next.
    Ended {
        session: SessionId,
        vm: VmId,
        /// The game's own reason, as it said it (empty: it named none, which is `game_over`);
        /// see [`crate::EndReason::from_game`].
        reason: String,
        #[serde(default)]
        results: serde_json::Value,
    },
    /// The VM died or stopped answering (`code` as hostd's pool reports it).
    Failed {
        session: SessionId,
        vm: VmId,
        code: String,
        reason: String,
    },
    /// The VM is gone and its slot is back in the pool.
    Destroyed { session: SessionId, vm: VmId },
    /// Answer to `receive`: a clone waits for the session's VM at `addr` (`HOST:PORT`).
    Receiving { session: SessionId, addr: String },
    /// The session's VM moved here and runs (answer to `receive`, after the stream).
    Received { session: SessionId, vm: VmId },
    /// Answer to `send`: the session's VM left this host for the peer, running.
    Sent {
        session: SessionId,
        vm: VmId,
        /// How long the VM was paused, the whole migration, and the bytes sent.
        downtime_ms: u64,
        total_ms: u64,
        sent_bytes: u64,
    },
    /// A `receive` or `send` failed (`side`: `receive` or `send`). A failed send leaves the
    /// VM running on the source; the receiving clone is destroyed.
    MigrationFailed {
        session: SessionId,
        side: String,
        code: String,
        message: String,
    },
    /// This host has no docked substrate of `image` and would like a peer's with this
    /// `fingerprint` (`sha256:<hex>` of its expected header fingerprint) instead of priming.
    /// Answered with `fetch_substrate` or `no_substrate`.
    WantSubstrate { image: String, fingerprint: String },
}

/// server → hostd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerToHost {
    Welcome {
        v: u32,
        heartbeat_ms: u64,
    },
    /// Activate a VM for this session; the session id is the idempotency key.
    Activate {
        session: SessionId,
        image: String,
        players: Vec<PlayerId>,
        /// The players by team, as matched (team index = position).
        #[serde(default)]
        teams: Vec<Vec<PlayerId>>,
        /// Hex key the gateway and the game check this session's tickets with.
        ticket_key: String,
        #[serde(default)]
        params: serde_json::Value,
        deadline_ms: u64,
    },
    Destroy {
        session: SessionId,
    },
    /// The server is done with this session's `ended` or `failed` report: it recorded it, or
    /// never will (the session is over or not this host's). Until this comes, hostd keeps the
    /// report on disk and sends it again.
    Recorded {
        session: SessionId,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Prepare to take this session's VM from a peer (a live migration): a clone of the
    /// docked substrate of `image` listens for it; answered `receiving` with its address,
    /// then `received` once the VM runs here (or `migration_failed`).
    Receive {
        session: SessionId,
        image: String,
        players: Vec<PlayerId>,
        #[serde(default)]
        teams: Vec<Vec<PlayerId>>,
        ticket_key: String,
        #[serde(default)]
        params: serde_json::Value,
        deadline_ms: u64,
    },
    /// Move this session's running VM to the peer clone listening at `to` (`HOST:PORT`, from
    /// the peer's `receiving`); answered `sent` or `migration_failed`.
    Send {
        session: SessionId,
        to: String,
    },
    /// To the host that asked with `want_substrate`: fetch it from the peer at `from` with
    /// `grant` (a one-time bearer token that peer was given with `share_substrate`).
    FetchSubstrate {
        image: String,
        from: String,
        grant: String,
    },
    /// To the host that asked with `want_substrate`: no peer has one (`reason`); prime it.
    NoSubstrate {
        image: String,
        reason: String,
    },
    /// To a peer: let one fetch of `image` with `grant` in within `ttl_ms`.
    ShareSubstrate {
        image: String,
        grant: String,
        ttl_ms: u64,
    },
}
