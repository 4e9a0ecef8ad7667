//! hostd's Prometheus metrics (`GET /metrics` on the control API, text format), with
//! `/healthz` and `/readyz` beside them (see [`crate::control`]).
//!
//! Two kinds of figures, all under the `berth_hostd_` prefix:
//! - **counted as they happen**, from the pool's events: activations by image and path and
//!   their latency, VM failures by code, game reports, primes, prime failures, substrates
//!   discarded (damaged) and primed again, substrates shipped from peers and shipped ones
//!   refused;
//! - **read at each scrape** ([`Snapshot`]): VMs by state, the VM cap, the drain, each image's
//!   substrate (docked or not, bytes on disk), and the gateway's connections, refusals and
//!   closes by code, messages forwarded and its own forwarding time per direction. That last
//!   histogram is the gateway's lock-free one (recording is on the hot path of every game
//!   message), encoded here with Prometheus buckets.

use crate::gateway::Meter;
use crate::pool::{Pool, PoolEvent};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

type Labels = Vec<(&'static str, String)>;

/// Upper bounds (µs) of the gateway's forwarding-time buckets.
const FORWARD_BOUNDS_US: [u64; 10] = [25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000];

/// The counters the pool's events feed.
#[derive(Debug)]
struct Counted {
    activations: Family<Labels, Counter>,
    activation_seconds: Family<Labels, Histogram>,
    vm_failures: Family<Labels, Counter>,
    reports: Family<Labels, Counter>,
    primes: Family<Labels, Counter>,
    prime_failures: Family<Labels, Counter>,
    discards: Family<Labels, Counter>,
    shipped: Family<Labels, Counter>,
    ship_refusals: Family<Labels, Counter>,
    fetch_seconds: Histogram,
    migrations: Family<Labels, Counter>,
}

/// hostd's metrics: cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The registry for `pool` (and the gateway of `meter`, when this process runs one); a
    /// task counts the pool's events until the pool is gone.
    pub fn new(pool: Pool, meter: Option<Meter>) -> Self {
        let counted = Arc::new(Counted {
            activations: Family::default(),
            // 1 ms … ~32 s
            activation_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            vm_failures: Family::default(),
            reports: Family::default(),
            primes: Family::default(),
            prime_failures: Family::default(),
            discards: Family::default(),
            shipped: Family::default(),
            ship_refusals: Family::default(),
            // 10 ms … ~164 s
            fetch_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
            migrations: Family::default(),
        });
        let mut registry = Registry::with_prefix("berth_hostd");
        let c = &counted;
        let counters = [
            (
                "activations",
                "VMs activated, by image and path (warm, substrate, cold, adopted)",
                &c.activations,
            ),
            (
                "vm_failures",
                "VMs that died or went silent, by code",
                &c.vm_failures,
            ),
            (
                "reports",
                "Game ends reported upstream, by kind (ended, failed)",
                &c.reports,
            ),
            (
                "primes",
                "Substrates primed and docked, by image",
                &c.primes,
            ),
            (
                "prime_failures",
                "Primings that failed, by image and code",
                &c.prime_failures,
            ),
            (
                "substrate_discards",
                "Substrates discarded and primed again, by image and code",
                &c.discards,
            ),
            (
                "substrates_shipped",
                "Substrates fetched from a peer and docked without priming, by image",
                &c.shipped,
            ),
            (
                "ship_refusals",
                "Shipped substrates refused or not fetched (then primed), by image and code",
                &c.ship_refusals,
            ),
            (
                "migrations",
                "Sessions moved live to (out) or from (in) a peer host",
                &c.migrations,
            ),
        ];
        for (name, help, family) in counters {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "substrate_fetch_seconds",
            "A shipped substrate from asking for it to docked, checks included",
            c.fetch_seconds.clone(),
        );
        registry.register(
            "activation_seconds",
            "Pool-side activation time, by path",
            c.activation_seconds.clone(),
        );
        // The task holds the counters only, not the pool: it ends when the pool is gone.
        let events = pool.subscribe();
        tokio::spawn(watch(counted.clone(), events));
        registry.register_collector(Box::new(Snapshot { pool, meter }));
        Metrics {
            registry: Arc::new(registry),
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

/// Counts the pool's events until its channel closes.
async fn watch(counted: Arc<Counted>, mut events: tokio::sync::broadcast::Receiver<PoolEvent>) {
    loop {
        match events.recv().await {
            Ok(e) => counted.count(&e),
            Err(RecvError::Lagged(n)) => tracing::debug!(missed = n, "metrics lagged"),
            Err(RecvError::Closed) => return,
        }
    }
}

impl Counted {
    fn count(&self, e: &PoolEvent) {
        let c = self;
        match e {
            PoolEvent::Activated { vm } => {
                let path = vm.path.as_str().to_owned();
                c.activations
                    .get_or_create(&vec![("image", vm.image.clone()), ("path", path.clone())])
                    .inc();
                c.activation_seconds
                    .get_or_create(&vec![("path", path)])
                    .observe(vm.activate_us as f64 / 1e6);
            }
            PoolEvent::Failed { code, .. } => {
                c.vm_failures
                    .get_or_create(&vec![("code", code.clone())])
                    .inc();
                c.reports
                    .get_or_create(&vec![("kind", "failed".into())])
                    .inc();
            }
            PoolEvent::Ended { .. } => {
                c.reports
                    .get_or_create(&vec![("kind", "ended".into())])
                    .inc();
            }
            PoolEvent::Docked { image, .. } => {
                c.primes
                    .get_or_create(&vec![("image", image.clone())])
                    .inc();
            }
            PoolEvent::PrimeFailed { image, code, .. } => {
                let labels = vec![("image", image.clone()), ("code", code.clone())];
                c.prime_failures.get_or_create(&labels).inc();
            }
            PoolEvent::SubstrateDiscarded { image, code, .. } => {
                let labels = vec![("image", image.clone()), ("code", code.clone())];
                c.discards.get_or_create(&labels).inc();
            }
            PoolEvent::Shipped {
                image, fetch_ms, ..
            } => {
                c.shipped
                    .get_or_create(&vec![("image", image.clone())])
                    .inc();
                c.fetch_seconds.observe(*fetch_ms as f64 / 1e3);
            }
            PoolEvent::ShipRefused { image, code, .. } => {
                let labels = vec![("image", image.clone()), ("code", code.clone())];
                c.ship_refusals.get_or_create(&labels).inc();
            }
            PoolEvent::MigratedOut { .. } => {
                let labels = vec![("direction", "out".to_owned())];
                c.migrations.get_or_create(&labels).inc();
            }
            PoolEvent::MigratedIn { .. } => {
                let labels = vec![("direction", "in".to_owned())];
                c.migrations.get_or_create(&labels).inc();
            }
            PoolEvent::Destroyed { .. } | PoolEvent::Draining => {}
        }
    }
}

/// What is read from the pool and the gateway at each scrape.
#[derive(Debug)]
struct Snapshot {
    pool: Pool,
    meter: Option<Meter>,
}

/// One gauge (or counter) family with its samples.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.pool.status();
        let warm: u32 = status.images.iter().map(|i| i.warm).sum();
        let vms = vec![
            (
                vec![("state", "active".into())],
                ConstGauge::new(status.vms.len() as i64),
            ),
            (
                vec![("state", "warm".into())],
                ConstGauge::new(i64::from(warm)),
            ),
        ];
        family(&mut encoder, "vms", "VMs by state", MetricType::Gauge, vms)?;
        let one = |v: i64| vec![(Labels::new(), ConstGauge::new(v))];
        family(
            &mut encoder,
            "max_vms",
            "The VM cap",
            MetricType::Gauge,
            one(i64::from(status.max_vms)),
        )?;
        family(
            &mut encoder,
            "draining",
            "1 while draining",
            MetricType::Gauge,
            one(i64::from(status.draining)),
        )?;
        let per_image = |f: &dyn Fn(&crate::pool::ImageStatus) -> i64| {
            status
                .images
                .iter()
                .map(|i| (vec![("image", i.name.clone())], ConstGauge::new(f(i))))
                .collect::<Vec<_>>()
        };
        let docked =
            per_image(&|i| i64::from(i.substrate == berth_protocol::SubstrateState::Docked));
        family(
            &mut encoder,
            "substrate_docked",
            "1 when the image's substrate is docked",
            MetricType::Gauge,
            docked,
        )?;
        let bytes = per_image(&|i| i.substrate_bytes as i64);
        family(
            &mut encoder,
            "substrate_bytes",
            "Bytes the substrate occupies",
            MetricType::Gauge,
            bytes,
        )?;
        if let Some(meter) = &self.meter {
            encode_gateway(&mut encoder, meter)?;
        }
        Ok(())
    }
}

fn encode_gateway(encoder: &mut DescriptorEncoder, meter: &Meter) -> Result<(), std::fmt::Error> {
    let s = meter.stats();
    let conns = vec![
        (
            vec![("state", "open".into())],
            ConstGauge::new(s.connections.open as i64),
        ),
        (
            vec![("state", "playing".into())],
            ConstGauge::new(s.connections.playing as i64),
        ),
    ];
    family(
        encoder,
        "gateway_connections",
        "Gateway websockets now, by state",
        MetricType::Gauge,
        conns,
    )?;
    let counts = |m: &std::collections::BTreeMap<String, u64>, key: &'static str| {
        m.iter()
            .map(|(k, v)| (vec![(key, k.clone())], ConstCounter::new(*v)))
            .collect::<Vec<_>>()
    };
    family(
        encoder,
        "gateway_refused",
        "Gateway connections refused, by code",
        MetricType::Counter,
        counts(&s.refused, "code"),
    )?;
    family(
        encoder,
        "gateway_closed",
        "Gateway connections closed, by reason",
        MetricType::Counter,
        counts(&s.closed, "reason"),
    )?;
    let forwarded = vec![
        (
            vec![("direction", "to_game".into())],
            ConstCounter::new(s.forwarded.to_game),
        ),
        (
            vec![("direction", "to_client".into())],
            ConstCounter::new(s.forwarded.to_client),
        ),
    ];
    family(
        encoder,
        "gateway_forwarded",
        "Messages forwarded, by direction",
        MetricType::Counter,
        forwarded,
    )?;
    let mut metric = encoder.encode_descriptor(
        "gateway_forward_seconds",
        "The gateway's own time per forwarded message, by direction",
        None,
        MetricType::Histogram,
    )?;
    for (direction, h) in meter.forwarding(&FORWARD_BOUNDS_US) {
        let labels: Labels = vec![("direction", direction.into())];
        let buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .map(|(us, n)| (*us as f64 / 1e6, *n))
            .collect();
        metric.encode_family(&labels)?.encode_histogram::<Labels>(
            h.sum_us as f64 / 1e6,
            h.count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}
