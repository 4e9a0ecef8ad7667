//! Substrate shipping, the server's part: a host that lacks a docked substrate asks
//! (`want_substrate`) before it primes; the server picks a peer from its host registry that
//! has the same substrate docked ([`pick_peer`], a pure function), mints a one-time grant, tells
//! that peer to let one fetch in with it (`share_substrate`, through the store's event stream
//! so that the replica holding the peer's websocket sends it) and answers the asker with
//! `fetch_substrate` — or `no_substrate`, and the asker primes.
//!
//! Why the server brokers it: the host links are already authenticated (host JWTs), so no
//! new secret is shared between hosts; the grant is 256 random bits, good for one fetch of one
//! image within [`GRANT_TTL_MS`]. The asker checks what it fetched against its own expected
//! header and the content digests anyway: a grant protects the peer, not the asker.

use crate::model::{Event, HostRecord, HostState};
use crate::state::Ctx;
use crate::util::random_key;
use berth_protocol::host::ServerToHost;

/// How long a peer accepts the one fetch a grant allows.
pub const GRANT_TTL_MS: u64 = 30_000;

/// The peer `asker` should fetch `image` from: another host, up and not draining, that
/// serves substrates (`peer`) and has `image` docked with this `fingerprint`. Same region
/// as the asker first, then the least busy (fewest running VMs), then by id.
pub fn pick_peer<'a>(
    hosts: &'a [HostRecord],
    asker: &HostRecord,
    image: &str,
    fingerprint: &str,
) -> Option<&'a HostRecord> {
    hosts
        .iter()
        .filter(|h| h.id != asker.id && h.state == HostState::Up && !h.draining)
        .filter(|h| h.peer.is_some())
        .filter(|h| {
            h.images
                .iter()
                .any(|i| i.name == image && i.docked && i.substrate.as_deref() == Some(fingerprint))
        })
        .min_by_key(|h| (h.region != asker.region, h.running(), h.id.clone()))
}

/// Answers a `want_substrate` from `record`'s host.
pub async fn want(
    ctx: &Ctx,
    record: &HostRecord,
    image: String,
    fingerprint: String,
) -> ServerToHost {
    let no = |reason: &str| {
        ctx.metrics.substrate_want(reason);
        ServerToHost::NoSubstrate {
            image: image.clone(),
            reason: reason.into(),
        }
    };
    let hosts = match ctx.store.hosts().await {
        Ok(hosts) => hosts,
        Err(e) => {
            tracing::warn!(error = %e, "want_substrate: reading the hosts");
            return no("store_unavailable");
        }
    };
    let Some(peer) = pick_peer(&hosts, record, &image, &fingerprint) else {
        tracing::info!(host_id = %record.id, image, "no peer has this substrate: the host primes");
        return no("no_peer");
    };
    let Some(from) = peer.peer.clone() else {
        return no("no_peer");
    };
    let grant = random_key();
    let share = Event::Share {
        host: peer.id.clone(),
        image: image.clone(),
        grant: grant.clone(),
        ttl_ms: GRANT_TTL_MS,
    };
    if let Err(e) = ctx.store.publish(&share).await {
        tracing::warn!(error = %e, "want_substrate: telling the peer");
        return no("store_unavailable");
    }
    ctx.metrics.substrate_want("shipped");
    tracing::info!(host_id = %record.id, peer = %peer.id, image, "substrate shipped from a peer");
    ServerToHost::FetchSubstrate { image, from, grant }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, region: &str, substrate: Option<&str>, running: u32) -> HostRecord {
        let mut h = crate::sessions::tests::host(id, running, 0, substrate.is_some());
        h.images[0].substrate = substrate.map(String::from);
        h.region = Some(region.into());
        h.peer = Some(format!("http://{id}:7072"));
        h
    }

    fn picked(hosts: &[HostRecord], asker: &HostRecord) -> Option<String> {
        pick_peer(hosts, asker, "arena", "sha256:a").map(|h| h.id.to_string())
    }

    #[test]
    fn a_peer_with_the_same_substrate_docked_is_picked_same_region_first() {
        let asker = host("new", "eu", None, 0);
        let us = host("us1", "us", Some("sha256:a"), 0);
        let eu_busy = host("eu1", "eu", Some("sha256:a"), 3);
        let eu_idle = host("eu2", "eu", Some("sha256:a"), 1);
        let hosts = vec![asker.clone(), us.clone(), eu_busy.clone(), eu_idle.clone()];
        assert_eq!(picked(&hosts, &asker).as_deref(), Some("eu2"));
        // Another region's host is better than none.
        assert_eq!(
            picked(&[asker.clone(), us.clone()], &asker).as_deref(),
            Some("us1")
        );
    }

    #[test]
    fn no_peer_unless_it_is_up_serving_and_holds_the_same_fingerprint() {
        let asker = host("new", "eu", None, 0);
        let other_fp = host("a", "eu", Some("sha256:b"), 0);
        let undocked = host("b", "eu", None, 0);
        let mut lost = host("c", "eu", Some("sha256:a"), 0);
        lost.state = HostState::Lost;
        let mut draining = host("d", "eu", Some("sha256:a"), 0);
        draining.draining = true;
        let mut no_peer = host("e", "eu", Some("sha256:a"), 0);
        no_peer.peer = None;
        let mut itself = asker.clone();
        itself.images[0].substrate = Some("sha256:a".into());
        let hosts = [other_fp, undocked, lost, draining, no_peer, itself.clone()];
        assert_eq!(picked(&hosts, &itself), None);
    }
}
