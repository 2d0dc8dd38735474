//! Metric pieces the relay and the agent share, so that the same thing carries the same labels
//! and buckets in `backhaul_relay_*` and `backhaul_agent_*` (each program keeps its own
//! registry and counters: proxy/src/metrics.rs, agent/src/metrics.rs).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    pub backend: String,
    pub transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub backend: String,
    /// Relay: `to_backend` or `to_client`; agent: `to_backend` or `from_backend`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Long-poll exchange durations by kind (`poll`, `push`): 1 ms to about 4.4 min, ×4 a bucket.
pub type Exchanges = Family<KindLabel, Histogram>;

/// A new, empty [`Exchanges`].
pub fn exchanges() -> Exchanges {
    Family::new_with_constructor(
        (|| Histogram::new(exponential_buckets(0.001, 4.0, 10))) as fn() -> Histogram,
    )
}

/// Records an exchange of `kind` that took `took`.
pub fn observe(exchanges: &Exchanges, kind: &'static str, took: Duration) {
    exchanges
        .get_or_create(&KindLabel { kind })
        .observe(took.as_secs_f64());
}

/// Registers `metric` in `registry` as `name` with `help`, and returns it for the program's
/// counters (the registry holds a clone that shares its values).
pub fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything in `registry`, in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
