//! Queueing by latency, as a phone does it: read the regions and their gateways' probes
//! (`GET /v1/regions` with the player's token), time each probe, and queue with each region's
//! best round trip (`queue.latencies`).

use berth_protocol::play::{Regions, MAX_LATENCIES, MAX_LATENCY_MS};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Round trips timed per probe URL; the fastest counts (the first pays for the connection).
pub const TRIES: usize = 3;
/// A probe slower than this is left out (the region is not measured through it).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The milliseconds to each region that answered a probe, or the failure's stable code
/// (`unreachable`, `http_<status>`, `bad_body`, `no_regions`).
pub async fn measure(
    http: &reqwest::Client,
    regions_url: &str,
    token: &str,
) -> Result<BTreeMap<String, u32>, String> {
    let resp = http
        .get(regions_url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|_| "unreachable".to_owned())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("http_{}", status.as_u16()));
    }
    let regions: Regions = resp.json().await.map_err(|_| "bad_body".to_owned())?;
    let mut out = BTreeMap::new();
    for r in regions.regions.iter().take(MAX_LATENCIES) {
        let mut best: Option<u32> = None;
        for url in &r.probes {
            if let Some(ms) = time_probe(http, url).await {
                best = Some(best.map_or(ms, |b| b.min(ms)));
            }
        }
        if let Some(ms) = best {
            out.insert(r.region.clone(), ms);
        }
    }
    if out.is_empty() {
        return Err("no_regions".into());
    }
    Ok(out)
}

/// The fastest of [`TRIES`] round trips to one probe, in whole milliseconds (at least 1).
async fn time_probe(http: &reqwest::Client, url: &str) -> Option<u32> {
    let mut best: Option<Duration> = None;
    for _ in 0..TRIES {
        let t = Instant::now();
        let ok = http
            .get(url)
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            let took = t.elapsed();
            best = Some(best.map_or(took, |b| b.min(took)));
        }
    }
    best.map(|d| (d.as_millis() as u32).clamp(1, MAX_LATENCY_MS))
}
