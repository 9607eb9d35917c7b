//! The HTTP server: `/health` (liveness), `/health/deep` (readiness), `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use crate::config::Settings;
use crate::database::Database;
use crate::metrics::Metrics;
use crate::sink::Sink;

/// How long a `/health/deep` answer is reused: probes arriving together share one check.
const DEEP_CACHE: Duration = Duration::from_secs(2);

/// What the handlers read.
pub struct HttpState {
    /// Settings.
    pub settings: Arc<Settings>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Each database, with its sources.
    pub databases: Vec<Arc<Database>>,
    /// The producer, for cluster metadata.
    pub sink: Arc<Sink>,
    /// The last deep check, shared by concurrent probes.
    pub deep_cache: tokio::sync::Mutex<Option<(Instant, StatusCode, serde_json::Value)>>,
}

/// What the relay holds of a database: the pool's connections, the coordination
/// connection (replicas sharing the database's sources, sources this one leads), and
/// the database's sources.
fn connections(d: &Database) -> serde_json::Value {
    let p = d.pool.status();
    let c = d.coordinator.status();
    let sources: Vec<String> = d.sources().iter().map(|s| s.name().to_string()).collect();
    json!({
        "pool": {
            "max": p.max_size,
            "open": p.size,
            "idle": p.available,
            "in_use": p.size.saturating_sub(p.available),
            "waiting": p.waiting,
        },
        "connections": p.size + c.up as usize,
        "replicas": c.replicas,
        "coordination": c,
        "sources_led": c.led,
        "sources": sources,
    })
}

/// The router; tests drive it with `tower::ServiceExt::oneshot`.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/deep", get(health_deep))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// How long a source task may go without a sign of life before `/health` fails: its
/// longest idle wait or its longest single step (a Kafka acknowledgement wait is bounded
/// by `operation_timeout` plus a 5s margin), plus 5s of slack.
pub fn liveness_bound(s: &Settings) -> Duration {
    s.process_interval
        .max(s.operation_timeout + Duration::from_secs(5))
        + Duration::from_secs(5)
}

async fn health(State(st): State<Arc<HttpState>>) -> Response {
    let bound = liveness_bound(&st.settings);
    let mut ok = true;
    let sources: Vec<_> = st
        .databases
        .iter()
        .flat_map(|d| d.sources())
        .map(|s| {
            let silent = s.health.silent_for();
            let parked = s.health.is_parked();
            // A parked task waits for nothing but a wake-up or a lead: idle, not stuck.
            let alive = parked || silent <= bound;
            ok &= alive;
            json!({
                "source": s.name(),
                "status": if !alive { "stuck" } else if parked { "idle" } else { "ok" },
                "silent_for_s": silent.as_secs_f64(),
                "leader": s.health.is_leader(),
            })
        })
        .collect();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ok { "ok" } else { "down" },
        "bound_s": bound.as_secs_f64(),
        "sources": sources,
    });
    (code, Json(body)).into_response()
}

#[derive(Serialize)]
struct Check {
    component: String,
    status: &'static str,
    latency_ms: f64,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
}

async fn health_deep(State(st): State<Arc<HttpState>>) -> Response {
    // Holding the lock while checking makes concurrent probes wait for this check
    // instead of starting their own: checks never pile up.
    let mut cache = st.deep_cache.lock().await;
    if let Some((at, code, body)) = cache.as_ref() {
        if at.elapsed() < DEEP_CACHE {
            return (*code, Json(body.clone())).into_response();
        }
    }
    let (code, body) = deep_check(&st).await;
    *cache = Some((Instant::now(), code, body.clone()));
    (code, Json(body)).into_response()
}

/// Runs every deep check concurrently, each under its own deadline.
async fn deep_check(st: &HttpState) -> (StatusCode, serde_json::Value) {
    let deadline = st.settings.operation_timeout.min(Duration::from_secs(3));
    let enabled = st.settings.enabled;
    let db_checks = st.databases.iter().map(|d| async move {
        let started = Instant::now();
        let r = tokio::time::timeout(deadline, async {
            let c = d.pool.get().await.map_err(|e| e.to_string())?;
            c.simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {deadline:?}")));
        // Reachable, but no coordination connection: no source can be led here.
        let coordination = d.coordinator.status();
        let r = match (r, coordination.error) {
            (Ok(()), Some(e)) if enabled => Err(format!("coordination connection: {e}")),
            (r, _) => r,
        };
        Check {
            component: format!("database:{}", d.label),
            status: if r.is_ok() { "ok" } else { "down" },
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            message: r.err().unwrap_or_else(|| "reachable".into()),
            details: Some(connections(d)),
        }
    });
    let sink = st.sink.clone();
    let kafka_check = async move {
        let started = Instant::now();
        let r = tokio::task::spawn_blocking(move || sink.broker_count(deadline)).await;
        let (status, message) = match r {
            Ok(Ok(n)) if n > 0 => ("ok", format!("{n} brokers in cluster metadata")),
            Ok(Ok(_)) => ("down", "cluster metadata lists no broker".to_string()),
            Ok(Err(e)) => ("down", format!("cluster metadata: {e}")),
            Err(e) => ("down", format!("metadata task: {e}")),
        };
        Check {
            component: "kafka".into(),
            status,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            message,
            details: None,
        }
    };
    let (dbs, kafka) = tokio::join!(futures::future::join_all(db_checks), kafka_check);
    let mut checks: Vec<Check> = dbs;
    checks.push(kafka);

    let lag_threshold = st.settings.health.lag_threshold.as_secs_f64();
    for s in st.databases.iter().flat_map(|d| d.sources()) {
        let name = s.name();
        let age = st
            .metrics
            .oldest_pending_age
            .with_label_values(&[name])
            .get();
        let h = s.health.snapshot();
        let lag_ok = age <= lag_threshold;
        checks.push(Check {
            component: format!("lag:{name}"),
            status: if lag_ok { "ok" } else { "degraded" },
            latency_ms: 0.0,
            message: format!(
                "oldest pending event is {age:.1}s old (threshold {lag_threshold:.0}s)"
            ),
            details: Some(json!({
                "events_processed": h.processed,
                "events_failed": h.failed,
                "events_pending": h.pending,
                "oldest_pending_age_s": age,
                "last_error": h.last_error,
                "leader": h.leader,
                "health_status": if lag_ok { "healthy" } else { "lagging" },
            })),
        });
        let rows = h.dead_letter_rows;
        let cap = st.settings.dead_letter_size;
        let fill_ok = rows < cap || cap == 0 && rows == 0;
        checks.push(Check {
            component: format!("dead_letter:{name}"),
            status: if rows >= cap && cap > 0 {
                "down"
            } else if rows * 10 >= cap * 8 && rows > 0 {
                "degraded"
            } else {
                "ok"
            },
            latency_ms: 0.0,
            message: format!(
                "{rows} of {cap} rows{}",
                if fill_ok {
                    ""
                } else {
                    ": full, failing events stay in the outbox"
                }
            ),
            details: None,
        });
    }
    let worst = if checks.iter().any(|c| c.status == "down") {
        "down"
    } else if checks.iter().any(|c| c.status == "degraded") {
        "degraded"
    } else {
        "ok"
    };
    let code = if worst == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        json!({ "status": worst, "wakeup": st.settings.wakeup.label(), "checks": checks }),
    )
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    //! The router without a socket (tower's `oneshot`): what a probe and a scraper get.
    //! The database and the brokers named here do not exist, which is the point of the
    //! deep check's test and harmless to the others.

    use std::collections::HashMap;
    use std::sync::atomic::Ordering;

    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    const TOML: &str = r#"
        operation_timeout = "1s"
        pool_size = 2
        [kafka]
        brokers = "127.0.0.1:1"
        [[sources]]
        name = "orders"
        schema = "orders"
        topic = "orders.events"
        database_url = "postgres://relay@127.0.0.1:1/app"
    "#;

    fn state() -> Arc<HttpState> {
        let settings =
            Arc::new(Settings::from_parts(Some(TOML), &HashMap::new()).expect("settings"));
        let metrics = Arc::new(Metrics::new(&[]));
        let s = settings.sources[0].clone();
        let sink = Arc::new(Sink::new(&settings.kafka, settings.operation_timeout).expect("sink"));
        // Built, not run: nothing connects until a probe asks.
        let db = Database::new(
            s.database_url.identity(),
            vec![s],
            Vec::new(),
            settings.clone(),
            sink.clone(),
            metrics.clone(),
            Arc::default(),
            tokio_util::sync::CancellationToken::new(),
        )
        .expect("a database connects lazily");
        Arc::new(HttpState {
            settings: settings.clone(),
            metrics,
            databases: vec![db],
            sink,
            deep_cache: tokio::sync::Mutex::new(None),
        })
    }

    async fn get(st: &Arc<HttpState>, path: &str) -> (StatusCode, String, String) {
        let req = Request::builder().uri(path).body(Body::empty()).unwrap();
        let resp = router(st.clone()).oneshot(req).await.expect("infallible");
        let code = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        (code, ctype, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn liveness_follows_the_source_tasks_heartbeat_only() {
        let st = state();
        let (code, _, body) = get(&st, "/health").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["sources"][0]["source"], "orders");
        assert_eq!(v["sources"][0]["status"], "ok");
        // A task silent for longer than the bound: stuck, whatever the database says.
        let bound = liveness_bound(&st.settings);
        let source = st.databases[0].sources()[0].clone();
        let old = source.health.heartbeat_ms.load(Ordering::Relaxed);
        source
            .health
            .heartbeat_ms
            .store(old - bound.as_millis() as u64 - 1000, Ordering::Relaxed);
        let (code, _, body) = get(&st, "/health").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("\"stuck\""), "{body}");
    }

    #[tokio::test]
    async fn readiness_names_the_database_it_cannot_reach() {
        let st = state();
        let (code, _, body) = get(&st, "/health/deep").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let checks = v["checks"].as_array().expect("checks");
        let db = checks
            .iter()
            .find(|c| c["component"] == "database:127.0.0.1:1/app")
            .expect("a database check");
        assert_eq!(db["status"], "down", "{body}");
        assert_eq!(db["details"]["pool"]["max"], 2, "{body}");
        assert!(
            db["details"]["replicas"].is_null(),
            "no coordination connection: {body}"
        );
        assert!(
            checks.iter().any(|c| c["component"] == "lag:orders"),
            "{body}"
        );
        assert!(!body.contains("password"), "{body}");
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_with_every_series_of_the_source() {
        let st = state();
        let (code, ctype, body) = get(&st, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        for reason in crate::sink::Reason::ALL.map(crate::sink::Reason::label) {
            let series =
                format!("outbox_events_failed_total{{reason=\"{reason}\",source=\"orders\"}} 0");
            assert!(body.contains(&series), "{series} missing");
        }
        assert!(
            body.contains("outbox_source_leader{source=\"orders\"} 0"),
            "{body}"
        );
        assert_eq!(get(&st, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
