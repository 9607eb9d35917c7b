//! `/health`, `/health/deep` and `/metrics` of a real relay over a real PostgreSQL and
//! librdkafka's mock cluster.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Metrics, Scenario, TestRelay, DEADLINE};
use outbox_relay::sink::Reason;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_every_event_and_every_series_exists_from_the_start() {
    let (sc, mut relay) = Scenario::builder()
        .source("busy")
        .source("quiet")
        .partitions(2)
        .set("batch_size", 30)
        .set("max_batch_size", 30)
        .start()
        .await;
    let (busy, quiet) = (&sc.sources[0], &sc.sources[1]);

    let (code, first) = relay.get("/metrics").await;
    assert_eq!(code, 200);
    let m = Metrics::parse(&first);
    for reason in Reason::ALL.map(Reason::label) {
        assert_eq!(
            m.value(
                "outbox_events_failed_total",
                &[("source", &quiet.name), ("reason", reason)]
            ),
            Some(0.0),
            "failed_total{{reason={reason}}} exists at zero"
        );
    }

    let n = 250;
    sc.insert_events(busy, n, 9, 0);
    let got = sc.consume(&busy.topic, n).await;
    assert_eq!(got.len(), n);
    sc.wait_outbox_empty(busy).await;
    let (_, text) = relay
        .until("/metrics", DEADLINE, |_, b| {
            let m = Metrics::parse(b);
            m.value("outbox_events_pending", &[("source", &busy.name)]) == Some(0.0)
                && m.value("outbox_events_published_total", &[("source", &busy.name)])
                    == Some(n as f64)
        })
        .await;
    let m = Metrics::parse(&text);
    let busy_l = [("source", busy.name.as_str())];
    let quiet_l = [("source", quiet.name.as_str())];
    assert_eq!(
        m.value("outbox_events_published_total", &busy_l),
        Some(n as f64)
    );
    assert_eq!(
        m.value("outbox_events_published_total", &quiet_l),
        Some(0.0)
    );
    assert_eq!(
        m.value("outbox_end_to_end_latency_seconds_count", &busy_l),
        Some(n as f64)
    );
    assert!(
        m.value("outbox_batch_duration_seconds_count", &busy_l)
            .unwrap()
            >= (n / 30) as f64
    );
    assert!(
        m.value("outbox_publish_duration_seconds_count", &busy_l)
            .unwrap()
            >= 1.0
    );
    assert_eq!(m.value("outbox_source_leader", &busy_l), Some(1.0));
    assert_eq!(m.value("outbox_source_up", &quiet_l), Some(1.0));
    for name in [
        "outbox_events_dead_lettered_total",
        "outbox_events_pending",
        "outbox_oldest_pending_age_seconds",
        "outbox_dead_letter_rows",
        "outbox_poll_errors_total",
    ] {
        assert_eq!(m.value(name, &quiet_l), Some(0.0), "{name}");
    }
    for name in ["process_resident_memory_bytes", "process_open_fds"] {
        assert!(m.value(name, &[]).unwrap_or(0.0) > 0.0, "{name}");
    }
    // Whole seconds in the prometheus crate's collector: present, maybe still 0.
    assert!(m.value("process_cpu_seconds_total", &[]).is_some());
    assert_eq!(
        m.value(
            "outbox_relay_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("outbox_wakeup_mode", &[("mode", "notify")]),
        Some(1.0),
        "the wake-up mode in use"
    );
    let (_, deep) = relay.get("/health/deep").await;
    let deep: serde_json::Value = serde_json::from_str(&deep).unwrap();
    assert_eq!(deep["wakeup"], "notify", "{deep}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_turns_deep_health_503_while_liveness_stays_200() {
    let (sc, mut relay) = Scenario::builder()
        .source("pgdown")
        .partitions(2)
        .start()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    let (code, body) = relay.until("/health/deep", DEADLINE, |c, _| c == 200).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    let checks = v["checks"].as_array().unwrap();
    let lag = checks
        .iter()
        .find(|c| c["component"] == format!("lag:{}", src.name))
        .unwrap();
    for k in [
        "events_processed",
        "events_failed",
        "events_pending",
        "last_error",
        "health_status",
    ] {
        assert!(lag["details"].get(k).is_some(), "{k} missing from {lag}");
    }
    assert_eq!(code, 200);

    pg.stop();
    let (_, body) = relay.until("/health/deep", DEADLINE, |c, _| c == 503).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let db = common::http::database_check(&v, &src.name);
    assert_eq!(db["status"], "down", "{v}");
    for _ in 0..10 {
        let (code, body) = relay.get("/health").await;
        assert_eq!(code, 200, "liveness must not depend on PostgreSQL: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pg.restart();
    relay.until("/health/deep", DEADLINE, |c, _| c == 200).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_task_turns_liveness_503() {
    let (sc, mut relay) = Scenario::builder()
        .source("stall")
        .partitions(2)
        .set("operation_timeout", "1s")
        .start()
        .await;
    let src = sc.src();
    let (_, body) = relay.until("/health", DEADLINE, |c, _| c == 200).await;
    // The bound is the longest a source may stay silent: 5s past the 1s operation
    // timeout (the longest step) and 5s of slack; 20s with the default 10s.
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["bound_s"], 11.0, "{v}");
    assert_eq!(v["sources"][0]["source"], src.name.as_str(), "{v}");
    // Led with nothing to do: parked, waiting for a wake-up, which is not stuck.
    assert_eq!(v["sources"][0]["status"], "idle", "{v}");
    let hooks = relay.running().hooks(&src.name).unwrap().clone();
    hooks.stall.store(true, Ordering::Relaxed);
    // A row wakes the source, and its claim stalls.
    sc.insert_events(src, 1, 1, 0);
    let (_, body) = relay.until("/health", DEADLINE, |c, _| c == 503).await;
    assert!(body.contains("stuck"), "{body}");
    hooks.stall.store(false, Ordering::Relaxed);
    relay.until("/health", DEADLINE, |c, _| c == 200).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_whose_tables_are_gone_keeps_the_others_figures_fresh_and_counts_its_errors() {
    let (sc, mut relay) = Scenario::builder()
        .source("figures")
        .source("gone")
        .set("health.refresh_interval", "200ms")
        .start()
        .await;
    let (kept, gone) = (&sc.sources[0], &sc.sources[1]);
    relay.stop().await;
    sc.pg.psql(
        "postgres",
        &format!(
            "DROP TABLE {s}.outbox, {s}.outbox_dead_letter",
            s = gone.schema
        ),
    );
    sc.insert_events(kept, 7, 2, 0);
    // A relay that is disabled publishes nothing, so the kept source's rows stay and
    // its gauge must show them, whatever its neighbour's state.
    let relay = TestRelay::start(sc.config.clone().set("enabled", false).settings()).await;
    let (_, text) = relay
        .until("/metrics", DEADLINE, |_, b| {
            let m = Metrics::parse(b);
            m.value("outbox_events_pending", &[("source", &kept.name)]) == Some(7.0)
                && m.value(
                    "outbox_stats_refresh_errors_total",
                    &[("source", &gone.name)],
                )
                .is_some_and(|n| n >= 2.0)
        })
        .await;
    let m = Metrics::parse(&text);
    assert_eq!(
        m.value(
            "outbox_stats_refresh_errors_total",
            &[("source", &kept.name)]
        ),
        Some(0.0),
        "the healthy source's refresh never failed"
    );
    // A backlog beyond the exact count is estimated from its ids: with no gaps between
    // them, the estimate is the count.
    let big = outbox_relay::source::store::EXACT_PENDING as usize + 50;
    sc.insert_events(kept, big, 2, 100);
    relay
        .until("/metrics", DEADLINE, |_, b| {
            Metrics::parse(b).value("outbox_events_pending", &[("source", &kept.name)])
                == Some((big + 7) as f64)
        })
        .await;
    let mut relay = relay;
    relay.stop().await;
}

/// Every metric the Grafana dashboard and the alert rules query is one a running relay
/// exports: a renamed metric fails here, not on a blank panel at 3 a.m.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_and_the_alerts_query_only_metrics_the_relay_exports() {
    let (sc, mut relay) = Scenario::builder().source("dash").start().await;
    let src = sc.src();
    sc.insert_events(src, 5, 1, 0);
    sc.consume(&src.topic, 5).await;
    sc.wait_outbox_empty(src).await;
    let (_, text) = relay.get("/metrics").await;
    relay.stop().await;
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s/monitoring/");
    let mut checked = 0;
    for file in ["outbox-relay-dashboard.json", "prometheusrule.yaml"] {
        let queries = std::fs::read_to_string(format!("{dir}{file}")).expect("read");
        let mut names: Vec<&str> = queries
            .match_indices("outbox_")
            .map(|(i, _)| {
                let rest = &queries[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .filter(|n| n.len() > "outbox_".len() && *n != "outbox_relay")
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(
                exported.contains(name),
                "{file} queries {name}, which the relay does not export"
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} metric names checked");
}
