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

/// Declares `Metrics`: each field with its type, constructor, name and help, registered
/// under the `berth_` prefix in the order given.
macro_rules! metrics {
    ($($field:ident: $ty:ty = $init:expr, $name:literal, $help:literal;)*) => {
        pub struct Metrics {
            registry: Registry,
            $(#[doc = $help] pub $field: $ty,)*
        }

        impl Metrics {
            pub fn new() -> Self {
                let mut registry = Registry::with_prefix("berth");
                $(
                    let $field: $ty = $init;
                    registry.register($name, $help, $field.clone());
                )*
                Metrics { registry, $($field,)* }
            }
        }
    };
}

type Timings = Family<Labels, Histogram, fn() -> Histogram>;
type Level = Gauge<i64, std::sync::atomic::AtomicI64>;

metrics! {
    queue_depth: Family<Labels, Gauge> = Family::default(),
        "queue_depth", "Tickets waiting, by mode and region";
    queue_wait: Timings = Family::new_with_constructor(seconds),
        "queue_wait_seconds", "Time a ticket waited from queue to match formed, by mode";
    time_to_match: Timings = Family::new_with_constructor(seconds),
        "time_to_match_seconds",
        "Time from the oldest ticket's queue to players told matched (VM active), by mode";
    placement: Histogram = seconds(),
        "placement_seconds", "Time from match formed to a host asked to activate";
    activation: Timings = Family::new_with_constructor(seconds),
        "activation_seconds", "Time from activate sent to the host's activated answer, by path";
    sessions: Family<Labels, Gauge> = Family::default(),
        "sessions", "Sessions by state";
    sessions_ended: Family<Labels, Counter> = Family::default(),
        "sessions_ended", "Sessions ended, by reason";
    host_capacity: Family<Labels, Gauge> = Family::default(),
        "host_capacity", "VM capacity per host and image: kind = warm | running | max";
    hosts: Family<Labels, Gauge> = Family::default(),
        "hosts", "Hosts by state";
    player_connections: Level = Gauge::default(),
        "player_connections", "Player websockets open on this replica";
    host_connections: Level = Gauge::default(),
        "host_connections", "hostd websockets open on this replica";
    refused: Family<Labels, Counter> = Family::default(),
        "refused", "Messages or connections refused, by error code";
    matches: Counter<u64, AtomicU64> = Counter::default(),
        "matches", "Matches formed by this replica";
    substrate_wants: Family<Labels, Counter> = Family::default(),
        "substrate_wants",
        "Hosts' asks for a peer's substrate, by outcome (shipped, no_peer, store_unavailable)";
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
    pub fn refuse(&self, code: &str) {
        self.refused
            .get_or_create(&vec![("code", code.to_owned())])
            .inc();
    }

    /// A `want_substrate` answered with `outcome`.
    pub fn substrate_want(&self, outcome: &str) {
        self.substrate_wants
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
