//! One [`Metrics`] registered once and shared by `Arc`. Every labelled series is
//! created at zero for every configured source, so alerts and `rate()` see it before
//! the first failure.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::sink::Reason;

/// The relay's metrics.
pub struct Metrics {
    registry: Registry,
    /// Events Kafka acknowledged.
    pub published: IntCounterVec,
    /// Failed publish attempts, by reason.
    pub failed: IntCounterVec,
    /// Events moved to the dead-letter table.
    pub dead_lettered: IntCounterVec,
    /// Rows in the outbox (refreshed on a timer).
    pub pending: IntGaugeVec,
    /// Age of the oldest pending row (refreshed on a timer).
    pub oldest_pending_age: prometheus::GaugeVec,
    /// Rows in the dead-letter table (refreshed on a timer).
    pub dead_letter_rows: IntGaugeVec,
    /// Capacity of the dead-letter table (`dead_letter_size`).
    pub dead_letter_capacity: IntGaugeVec,
    /// Kafka acknowledgement latency of one batch.
    pub publish_duration: HistogramVec,
    /// Claim, publish and delete of one batch.
    pub batch_duration: HistogramVec,
    /// From `created_at` to Kafka's acknowledgement.
    pub end_to_end_latency: HistogramVec,
    /// 1 while the source's database answers.
    pub source_up: IntGaugeVec,
    /// 1 while this replica holds the source.
    pub source_leader: IntGaugeVec,
    /// Failed PostgreSQL operations of the relay loop.
    pub poll_errors: IntCounterVec,
    /// Connections of a database's pool: `open`, `idle`, and tasks `waiting` for one.
    pub pool_connections: IntGaugeVec,
    /// Relay replicas alive for a database (membership locks held).
    pub replicas: IntGaugeVec,
    /// 1 while the database's coordination connection is up.
    pub coordination_up: IntGaugeVec,
    /// Sources of a database this replica leads.
    pub sources_led: IntGaugeVec,
    /// Sources of a database (configured or found by `schema_pattern`).
    pub sources: IntGaugeVec,
    /// Connections this replica holds to a database: the pool's and the coordination one.
    pub connections: IntGaugeVec,
    /// Sources given up for want of a pooled connection.
    pub gave_up: IntCounterVec,
    /// Sources this replica handed over to another one, to share the work.
    pub handovers: IntCounterVec,
    /// Failed refreshes of a source's pending, lag and dead-letter figures.
    pub stats_errors: IntCounterVec,
    /// Source task restarts after a panic.
    pub task_restarts: IntCounterVec,
    /// 1 while Kafka is unreachable for the source.
    pub kafka_outage: IntGaugeVec,
    /// 1 for the wake-up mode in use (`wakeup`).
    pub wakeup_mode: IntGaugeVec,
    /// Build information.
    pub build_info: IntGaugeVec,
    /// Unix time the process started.
    pub start_time: IntGauge,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ]
}

impl Metrics {
    /// Registers every metric, with series for `sources` at zero.
    pub fn new(sources: &[&str]) -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(latency_buckets()),
                &["source"],
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let published = counter(
            "outbox_events_published_total",
            "Events Kafka acknowledged.",
            &["source"],
        );
        let failed = counter(
            "outbox_events_failed_total",
            "Failed publish attempts, by reason.",
            &["source", "reason"],
        );
        let dead_lettered = counter(
            "outbox_events_dead_lettered_total",
            "Events moved to the dead-letter table.",
            &["source"],
        );
        let pending = gauge(
            "outbox_events_pending",
            "Rows waiting in the outbox table.",
            &["source"],
        );
        let oldest_pending_age = prometheus::GaugeVec::new(
            Opts::new(
                "outbox_oldest_pending_age_seconds",
                "Age of the oldest row waiting in the outbox table.",
            ),
            &["source"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(oldest_pending_age.clone()))
            .expect("unique metric");
        let dead_letter_rows = gauge(
            "outbox_dead_letter_rows",
            "Rows in the dead-letter table.",
            &["source"],
        );
        let dead_letter_capacity = gauge(
            "outbox_dead_letter_capacity",
            "Capacity of the dead-letter table (dead_letter_size).",
            &["source"],
        );
        let publish_duration = histogram(
            "outbox_publish_duration_seconds",
            "Time from handing a batch to the producer to Kafka's last acknowledgement.",
        );
        let batch_duration = histogram(
            "outbox_batch_duration_seconds",
            "Time to claim, publish and settle one batch.",
        );
        let end_to_end_latency = histogram(
            "outbox_end_to_end_latency_seconds",
            "Time from an event's created_at to Kafka's acknowledgement.",
        );
        let source_up = gauge(
            "outbox_source_up",
            "1 while the source's database answers.",
            &["source"],
        );
        let source_leader = gauge(
            "outbox_source_leader",
            "1 while this replica holds the source.",
            &["source"],
        );
        let poll_errors = counter(
            "outbox_poll_errors_total",
            "Failed PostgreSQL operations of the relay loop.",
            &["source"],
        );
        let pool_connections = gauge(
            "outbox_pool_connections",
            "Connections of the database's pool for claims, settles and stats: open, idle, in_use, and tasks waiting for one.",
            &["database", "state"],
        );
        let coordination_up = gauge(
            "outbox_coordination_up",
            "1 while the database's coordination connection (the sources' locks and wake-ups) is up.",
            &["database"],
        );
        let sources_led = gauge(
            "outbox_sources_led",
            "Sources of the database this replica leads.",
            &["database"],
        );
        let sources_known = gauge(
            "outbox_sources",
            "Sources of the database, configured or found by schema_pattern.",
            &["database"],
        );
        let connections = gauge(
            "outbox_connections",
            "Connections this replica holds to the database: the pool's and the coordination connection.",
            &["database"],
        );
        let replicas = gauge(
            "outbox_replicas",
            "Relay replicas alive for the database, as its membership locks say.",
            &["database"],
        );
        let gave_up = counter(
            "outbox_source_gave_up_total",
            "Times this replica gave the source up because no pooled connection was free for a claim within operation_timeout.",
            &["source"],
        );
        let handovers = counter(
            "outbox_handovers_total",
            "Times this replica handed the source over to another replica (to share the sources), after its batches in flight settled.",
            &["source"],
        );
        let stats_errors = counter(
            "outbox_stats_refresh_errors_total",
            "Failed refreshes of the source's pending, lag and dead-letter figures (the gauges keep their last values).",
            &["source"],
        );
        let task_restarts = counter(
            "outbox_source_task_restarts_total",
            "Source task restarts after a panic.",
            &["source"],
        );
        let kafka_outage = gauge(
            "outbox_kafka_outage",
            "1 while Kafka is unreachable for the source.",
            &["source"],
        );
        let wakeup_mode = gauge(
            "outbox_wakeup_mode",
            "1 for the wake-up mode in use: notify (inserts notify while their source waits) or poll.",
            &["mode"],
        );
        let build_info = gauge(
            "outbox_relay_build_info",
            "Build information; always 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let start_time = IntGauge::new(
            "outbox_relay_start_time_seconds",
            "Unix time the relay started.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(start_time.clone()))
            .expect("unique metric");
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");

        let m = Metrics {
            registry,
            published,
            failed,
            dead_lettered,
            pending,
            oldest_pending_age,
            dead_letter_rows,
            dead_letter_capacity,
            publish_duration,
            batch_duration,
            end_to_end_latency,
            source_up,
            source_leader,
            poll_errors,
            stats_errors,
            handovers,
            gave_up,
            pool_connections,
            replicas,
            coordination_up,
            sources_led,
            sources: sources_known,
            connections,
            task_restarts,
            kafka_outage,
            wakeup_mode,
            build_info,
            start_time,
        };
        for s in sources {
            m.add_source(s);
        }
        m
    }

    /// Creates a source's series at zero, so alerts and `rate()` see them before the
    /// first event.
    pub fn add_source(&self, s: &str) {
        self.each_source_series(s, true);
    }

    /// Removes a source's series (its schema is gone).
    pub fn remove_source(&self, s: &str) {
        self.each_source_series(s, false);
    }

    /// Creates (or removes) every series labelled with source `s`.
    fn each_source_series(&self, s: &str, create: bool) {
        macro_rules! each {
            ($($family:ident),* $(,)?) => {$(
                if create {
                    self.$family.with_label_values(&[s]);
                } else {
                    let _ = self.$family.remove_label_values(&[s]);
                }
            )*};
        }
        each!(
            published,
            dead_lettered,
            pending,
            oldest_pending_age,
            dead_letter_rows,
            dead_letter_capacity,
            publish_duration,
            batch_duration,
            end_to_end_latency,
            source_up,
            source_leader,
            poll_errors,
            stats_errors,
            handovers,
            gave_up,
            task_restarts,
            kafka_outage,
        );
        for r in Reason::ALL.map(Reason::label) {
            if create {
                self.failed.with_label_values(&[s, r]);
            } else {
                let _ = self.failed.remove_label_values(&[s, r]);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            return format!("# encode error: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The source's histogram handles, resolved once rather than per event.
    pub fn source_histograms(&self, source: &str) -> (Histogram, Histogram, Histogram) {
        (
            self.publish_duration.with_label_values(&[source]),
            self.batch_duration.with_label_values(&[source]),
            self.end_to_end_latency.with_label_values(&[source]),
        )
    }
}
