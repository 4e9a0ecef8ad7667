//! `GET /v1/regions`: the regions that have hosts taking sessions now, each with a few of its
//! gateways' latency probes, for a client to time before it queues with `latencies`. Any
//! player's token may read it (it names hosts' public gateway addresses, which `matched`
//! hands out anyway).

use crate::access::{verify_role, ApiError};
use crate::auth::Role;
use crate::model::{HostRecord, HostState};
use crate::state::Ctx;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use berth_protocol::game::probe_url;
use berth_protocol::play::{RegionProbes, Regions};
use std::collections::BTreeMap;

/// Probes listed per region: enough to see past one slow host, few enough to time quickly.
pub const PROBES_PER_REGION: usize = 3;

pub async fn handler(
    State(ctx): State<Ctx>,
    headers: axum::http::HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    verify_role(&ctx, &headers, Role::Player)?;
    let hosts = ctx.store.hosts().await?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(regions(&hosts))))
}

/// Each region of an up, undrained host, with the probes of its least busy hosts (a host
/// that names no region serves any and is not listed).
pub fn regions(hosts: &[HostRecord]) -> Regions {
    let mut by_region: BTreeMap<&str, Vec<&HostRecord>> = BTreeMap::new();
    for h in hosts
        .iter()
        .filter(|h| h.state == HostState::Up && !h.draining)
    {
        if let Some(region) = h.region.as_deref() {
            by_region.entry(region).or_default().push(h);
        }
    }
    let regions = by_region
        .into_iter()
        .map(|(region, mut hosts)| {
            hosts.sort_by_key(|h| (h.running(), h.id.clone()));
            RegionProbes {
                region: region.to_owned(),
                probes: hosts
                    .iter()
                    .filter_map(|h| probe_url(&h.gateway))
                    .take(PROBES_PER_REGION)
                    .collect(),
            }
        })
        .filter(|r| !r.probes.is_empty())
        .collect();
    Regions { regions }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, region: Option<&str>, running: u32, gateway: &str) -> HostRecord {
        let mut h = HostRecord::test_double(id, running, 0, true);
        h.region = region.map(Into::into);
        h.gateway = gateway.into();
        h
    }

    #[test]
    fn regions_list_the_least_busy_hosts_probes_of_hosts_taking_sessions() {
        let mut hosts: Vec<HostRecord> = (0..5)
            .map(|i| {
                host(
                    &format!("eu-{i}"),
                    Some("eu"),
                    4 - i,
                    &format!("ws://10.0.0.{i}:7071/v1/game"),
                )
            })
            .collect();
        hosts.push(host("us-1", Some("us"), 0, "wss://us.example:443/v1/game"));
        hosts.push(host("any", None, 0, "ws://10.0.1.1:7071/v1/game"));
        let mut lost = host("asia-1", Some("asia"), 0, "ws://10.0.2.1:7071/v1/game");
        lost.state = HostState::Lost;
        hosts.push(lost);
        let mut draining = host("sa-1", Some("sa"), 0, "ws://10.0.3.1:7071/v1/game");
        draining.draining = true;
        hosts.push(draining);
        hosts.push(host("bad", Some("bad"), 0, "not a url"));
        let r = regions(&hosts);
        let names: Vec<&str> = r.regions.iter().map(|r| r.region.as_str()).collect();
        assert_eq!(names, ["eu", "us"], "{r:?}");
        assert_eq!(
            r.regions[0].probes,
            [
                "http://10.0.0.4:7071/v1/probe",
                "http://10.0.0.3:7071/v1/probe",
                "http://10.0.0.2:7071/v1/probe"
            ]
        );
        assert_eq!(r.regions[1].probes, ["https://us.example:443/v1/probe"]);
    }
}
