//! Prometheus metrics of the daemon, served on `/metrics` at an optional loopback address.
//!
//! - `pullbox_pulls_total{result}`: pulls by outcome (`ok`, or the gRPC code of the failure);
//! - `pullbox_pull_duration_seconds`: wall time of pulls, successful or not;
//! - `pullbox_fetched_bytes_total`: bytes downloaded from registries;
//! - `pullbox_policy_decisions_total{decision}`: `allow` for pulls the puller let through,
//!   `deny` for pulls it refused with `permission-denied`;
//! - `pullbox_puller_reloads_total{result}`: puller module/settings reloads;
//! - `pullbox_shadow_judgments_total{result}`: pulls the shadow puller judged (`agree`,
//!   `disagree`, `inconclusive`, `skipped`), and `pullbox_shadow_disagreements_total`: those
//!   where one of the real and the shadow puller allowed and the other denied.
//!
//! Bucket bounds of the duration histogram run from 0.1 s to about 7 min: pulls range from a
//! cached tag (milliseconds) to multi-gigabyte images.

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::{error::Code, oci::Digest, registry::Progress};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: String,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    pulls: Family<ResultLabel, Counter>,
    duration: Histogram,
    fetched: Counter,
    decisions: Family<DecisionLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    shadow: Family<ResultLabel, Counter>,
    disagreements: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pullbox");
        let pulls = Family::<ResultLabel, Counter>::default();
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.1, 2.0, 13));
        let fetched = Counter::default();
        let decisions = Family::<DecisionLabel, Counter>::default();
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register("pulls", "Image pulls by result", pulls.clone());
        registry.register("pull_duration_seconds", "Wall time of image pulls", duration.clone());
        registry.register("fetched_bytes", "Bytes downloaded from registries", fetched.clone());
        registry.register("policy_decisions", "Puller policy decisions", decisions.clone());
        registry.register("puller_reloads", "Puller reloads by result", reloads.clone());
        let shadow = Family::<ResultLabel, Counter>::default();
        let disagreements = Counter::default();
        registry.register("shadow_judgments", "Pulls judged by the shadow puller, by comparison", shadow.clone());
        registry.register("shadow_disagreements", "Pulls the shadow puller decided otherwise", disagreements.clone());
        Metrics { registry, pulls, duration, fetched, decisions, reloads, shadow, disagreements }
    }

    /// Records the outcome of one pull.
    pub fn pull_done(&self, outcome: Result<(), Code>, seconds: f64) {
        let result = match outcome {
            Ok(()) => "ok".to_owned(),
            Err(code) => code.to_string().replace(' ', "_"),
        };
        self.pulls.get_or_create(&ResultLabel { result }).inc();
        self.duration.observe(seconds);
        let decision = match outcome {
            Err(Code::PermissionDenied) => Some("deny"),
            Ok(()) => Some("allow"),
            Err(_) => None,
        };
        if let Some(decision) = decision {
            self.decisions.get_or_create(&DecisionLabel { decision: decision.into() }).inc();
        }
    }

    /// Records a reload of the puller.
    pub fn reload_done(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabel { result: result.into() }).inc();
    }

    /// Records how the shadow puller's verdict on a pull compared with the real one.
    pub fn shadow_done(&self, comparison: &crate::verdict::Comparison) {
        self.shadow.get_or_create(&ResultLabel { result: comparison.word().into() }).inc();
        if matches!(comparison, crate::verdict::Comparison::Disagree { .. }) {
            self.disagreements.inc();
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Serves `/metrics` on `addr` until the task is dropped.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> std::io::Result<()> {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = self.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app).await
    }
}

/// Counts downloaded bytes into the metrics.
impl Progress for Metrics {
    fn start(&self, _: &Digest, _: u64, _: u64) {}
    fn advance(&self, _: &Digest, n: u64) {
        self.fetched.inc_by(n);
    }
    fn done(&self, digest: &Digest) {
        tracing::debug!(%digest, "blob complete");
    }
}
