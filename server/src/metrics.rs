//! Prometheus metrics (`/metrics`): queue depth and wait, time to match, placement and
//! activation latency, sessions by state, host capacity, connections and refusals by code.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

fn seconds() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub queue_depth: Family<Labels, Gauge>,
    pub queue_wait: Family<Labels, Histogram, fn() -> Histogram>,
    pub time_to_match: Family<Labels, Histogram, fn() -> Histogram>,
    pub placement: Histogram,
    pub activation: Family<Labels, Histogram, fn() -> Histogram>,
    pub sessions: Family<Labels, Gauge>,
    pub sessions_ended: Family<Labels, Counter>,
    pub host_capacity: Family<Labels, Gauge>,
    pub hosts: Family<Labels, Gauge>,
    pub player_connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub host_connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub refused: Family<Labels, Counter>,
    pub matches: Counter<u64, AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let m = Metrics {
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(seconds),
            time_to_match: Family::new_with_constructor(seconds),
            placement: seconds(),
            activation: Family::new_with_constructor(seconds),
            sessions: Family::default(),
            sessions_ended: Family::default(),
            host_capacity: Family::default(),
            hosts: Family::default(),
            player_connections: Gauge::default(),
            host_connections: Gauge::default(),
            refused: Family::default(),
            matches: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "queue_depth",
            "Tickets waiting, by mode and region",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time a ticket waited from queue to match formed, by mode",
            m.queue_wait.clone(),
        );
        registry.register(
            "time_to_match_seconds",
            "Time from the oldest ticket's queue to players told matched (VM active), by mode",
            m.time_to_match.clone(),
        );
        registry.register(
            "placement_seconds",
            "Time from match formed to a host asked to activate",
            m.placement.clone(),
        );
        registry.register(
            "activation_seconds",
            "Time from activate sent to the host's activated answer, by path",
            m.activation.clone(),
        );
        registry.register("sessions", "Sessions by state", m.sessions.clone());
        registry.register(
            "sessions_ended",
            "Sessions ended, by reason",
            m.sessions_ended.clone(),
        );
        registry.register(
            "host_capacity",
            "VM capacity per host and image: kind = warm | running | max",
            m.host_capacity.clone(),
        );
        registry.register("hosts", "Hosts by state", m.hosts.clone());
        registry.register(
            "player_connections",
            "Player websockets open on this replica",
            m.player_connections.clone(),
        );
        registry.register(
            "host_connections",
            "hostd websockets open on this replica",
            m.host_connections.clone(),
        );
        registry.register(
            "refused",
            "Messages or connections refused, by error code",
            m.refused.clone(),
        );
        registry.register(
            "matches",
            "Matches formed by this replica",
            m.matches.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn refuse(&self, code: &str) {
        self.refused
            .get_or_create(&vec![("code", code.to_owned())])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
