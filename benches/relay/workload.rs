//! The events every contender moves, and the PostgreSQL-side contenders: the SQL-only
//! limit, the naive row-at-a-time relay, and the steady-rate writer of the latency runs.
//!
//! One template table, `bench_data.events`, is generated once per run; every backlog is
//! an `INSERT ... SELECT` from it into a freshly migrated outbox, so each contender
//! drains byte-for-byte the same rows.

use std::time::{Duration, Instant};

use futures::future::join_all;
use outbox_relay::source::store::Store;
use rdkafka::client::ClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_postgres::{Client, NoTls};

use crate::kafka::LatencyBook;

/// Aggregates the events are spread over (the Kafka keys).
pub const AGGREGATES: u64 = 1_000;

/// Opens a plain connection and spawns its driver.
pub async fn connect(url: &str) -> Client {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(30), tokio_postgres::connect(url, NoTls))
            .await
            .unwrap_or_else(|_| panic!("connect to {url}: timed out"))
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("bench: postgres connection ended: {e}");
        }
    });
    client
}

/// Generates rows `from..=to` of the template: an order-lifecycle event with a ~300-byte
/// JSON payload, one of 1,000 aggregates, and 1-3 string headers.
pub async fn generate_template(client: &Client, from: u64, to: u64) {
    if from == 1 {
        client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS bench_data;
                 CREATE TABLE IF NOT EXISTS bench_data.events (
                     seq bigint PRIMARY KEY,
                     aggregate_type text NOT NULL,
                     aggregate_id text NOT NULL,
                     event_type text NOT NULL,
                     payload jsonb NOT NULL,
                     headers jsonb NOT NULL)",
            )
            .await
            .expect("create bench_data.events");
    }
    let sql = format!(
        "INSERT INTO bench_data.events
         SELECT g, 'order', 'order-' || lpad(((g * 7919) % {AGGREGATES})::text, 5, '0'),
           (ARRAY['OrderPlaced','OrderPaid','OrderShipped','OrderDelivered'])[1 + g % 4],
           jsonb_build_object(
             'order_id', 'order-' || lpad(((g * 7919) % {AGGREGATES})::text, 5, '0'),
             'customer_id', 'cust-' || lpad(((g * 31) % 50000)::text, 6, '0'),
             'status', (ARRAY['placed','paid','shipped','delivered'])[1 + g % 4],
             'currency', 'EUR',
             'total_cents', (g * 137) % 100000,
             'items', jsonb_build_array(
               jsonb_build_object('sku', 'SKU-' || lpad(((g * 13) % 99999)::text, 5, '0'),
                                  'qty', 1 + g % 3, 'price_cents', (g * 53) % 10000),
               jsonb_build_object('sku', 'SKU-' || lpad(((g * 17) % 99999)::text, 5, '0'),
                                  'qty', 1 + g % 2, 'price_cents', (g * 71) % 10000)),
             'shipping', jsonb_build_object(
               'country', (ARRAY['DE','FR','NL','US'])[1 + g % 4],
               'postcode', lpad(((g * 97) % 99999)::text, 5, '0'),
               'method', 'standard'),
             'occurred_at', to_char(timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
                                    'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
             'schema_version', 3),
           jsonb_build_object('traceparent',
               '00-' || md5(g::text) || '-' || substr(md5((g + 1)::text), 1, 16) || '-01')
             || CASE WHEN g % 3 >= 1 THEN jsonb_build_object('tenant', 'tenant-' || (g % 40)) ELSE '{{}}' END
             || CASE WHEN g % 3 = 2 THEN jsonb_build_object('content_type', 'application/json') ELSE '{{}}' END
         FROM generate_series({from}::bigint, {to}::bigint) g"
    );
    client
        .batch_execute(&sql)
        .await
        .expect("generate template rows");
}

/// Average payload bytes (as the relay reads them: `payload::text`) and headers per row.
pub async fn template_shape(client: &Client) -> (f64, f64, i64) {
    let r = client
        .query_one(
            "SELECT avg(length(payload::text))::float8,
                    avg((SELECT count(*) FROM jsonb_object_keys(headers)))::float8,
                    count(DISTINCT aggregate_id)
             FROM (SELECT * FROM bench_data.events ORDER BY seq LIMIT 100000) t",
            &[],
        )
        .await
        .expect("template shape");
    (r.get(0), r.get(1), r.get(2))
}

/// Fills `schema.outbox` with the first `n` template rows (one statement, like a backlog
/// that built up), then vacuums and analyzes it and checkpoints, so every contender
/// starts from the same on-disk state.
pub async fn load_backlog(client: &Client, schema: &str, n: u64) -> Duration {
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO \"{schema}\".outbox (aggregate_type, aggregate_id, event_type, payload, headers)
             SELECT aggregate_type, aggregate_id, event_type, payload, headers
             FROM bench_data.events WHERE seq <= {n} ORDER BY seq"
        ))
        .await
        .expect("load backlog");
    client
        .batch_execute(&format!("VACUUM (ANALYZE) \"{schema}\".outbox"))
        .await
        .expect("vacuum backlog");
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    started.elapsed()
}

/// Rows left in `schema.outbox`.
pub async fn pending(client: &Client, schema: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".outbox"), &[])
        .await
        .expect("count outbox")
        .get(0)
}

/// The SQL-only limit: the relay's own claim and delete (`outbox_relay::source::store::
/// Store`, the statements and row decoding the relay uses, with nothing in flight) in a
/// loop, with no Kafka: claim `batch` rows, delete them `delete_batch` ids per
/// statement, until the outbox is empty or `deadline` passes. Returns (rows drained,
/// elapsed).
pub async fn drain_sql_only<C: deadpool_postgres::GenericClient>(
    client: &C,
    schema: &str,
    batch: i64,
    delete_batch: usize,
    deadline: Duration,
) -> (u64, Duration) {
    let store = Store::new(schema);
    let started = Instant::now();
    let mut drained = 0u64;
    while started.elapsed() < deadline {
        let claimed = store
            .claim(client, batch, 3, false, &[], 1_000_000)
            .await
            .expect("claim");
        if claimed.is_empty() {
            break;
        }
        let ids: Vec<i64> = claimed.iter().map(|e| e.id).collect();
        drained += store
            .delete(client, &ids, delete_batch)
            .await
            .expect("delete");
    }
    (drained, started.elapsed())
}

/// The relay a user writes without us: one row at a time, in a transaction that holds
/// the row lock while it waits for Kafka. Runs until the outbox is empty or `cap`
/// passes. Returns (events published and deleted, elapsed).
pub async fn naive_relay<C: ClientContext + 'static>(
    client: &mut Client,
    producer: &FutureProducer<C>,
    schema: &str,
    source: &str,
    topic: &str,
    cap: Duration,
) -> (u64, Duration) {
    let select = client
        .prepare(&format!(
            "SELECT id, event_id::text, aggregate_type, aggregate_id, event_type, payload::text, \
             headers::text FROM \"{schema}\".outbox ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
        ))
        .await
        .expect("prepare naive select");
    let delete = client
        .prepare(&format!("DELETE FROM \"{schema}\".outbox WHERE id = $1"))
        .await
        .expect("prepare naive delete");
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < cap {
        let tx = client.transaction().await.expect("begin");
        let Some(row) = tx.query_opt(&select, &[]).await.expect("naive select") else {
            tx.commit().await.expect("commit");
            break;
        };
        let id: i64 = row.get(0);
        let event_id: String = row.get(1);
        let aggregate_type: String = row.get(2);
        let aggregate_id: String = row.get(3);
        let event_type: String = row.get(4);
        let payload: Option<String> = row.get(5);
        let extra = parse_headers(row.get::<_, Option<String>>(6).as_deref());
        let headers = contract_headers(&event_id, &event_type, &aggregate_type, source, &extra);
        let mut record = FutureRecord::to(topic).key(&aggregate_id).headers(headers);
        if let Some(p) = &payload {
            record = record.payload(p);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => {}
            Err((e, _)) => panic!("naive relay: publish failed: {e}"),
        }
        tx.execute(&delete, &[&id]).await.expect("naive delete");
        tx.commit().await.expect("commit");
        done += 1;
    }
    (done, started.elapsed())
}

/// The headers the relay puts on every record, then the row's own.
pub fn contract_headers(
    event_id: &str,
    event_type: &str,
    aggregate_type: &str,
    source: &str,
    extra: &[(String, String)],
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(4 + extra.len());
    for (k, v) in [
        ("event_id", event_id),
        ("event_type", event_type),
        ("aggregate_type", aggregate_type),
        ("source", source),
    ] {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    for (k, v) in extra {
        h = h.insert(Header {
            key: k.as_str(),
            value: Some(v.as_str()),
        });
    }
    h
}

/// A row's `headers` JSON object as (name, value) pairs.
pub fn parse_headers(text: Option<&str>) -> Vec<(String, String)> {
    let Some(text) = text else { return Vec::new() };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) => m
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// One record of the broker-only runs, as the relay would build it from a template row.
pub struct BrokerRecord {
    pub key: String,
    pub payload: String,
    pub event_id: String,
    pub event_type: String,
    pub aggregate_type: String,
    pub headers: Vec<(String, String)>,
}

/// The first `n` template rows as records.
pub async fn template_records(client: &Client, n: u64) -> Vec<BrokerRecord> {
    let rows = client
        .query(
            "SELECT gen_random_uuid()::text, aggregate_type, aggregate_id, event_type, \
             payload::text, headers::text FROM bench_data.events WHERE seq <= $1 ORDER BY seq",
            &[&(n as i64)],
        )
        .await
        .expect("read template records");
    rows.iter()
        .map(|r| BrokerRecord {
            event_id: r.get(0),
            aggregate_type: r.get(1),
            key: r.get(2),
            event_type: r.get(3),
            payload: r.get(4),
            headers: parse_headers(r.get::<_, Option<String>>(5).as_deref()),
        })
        .collect()
}

/// What a steady-rate writer achieved.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterStats {
    /// Events written.
    pub events: u64,
    /// Wall time of the writing.
    pub elapsed: Duration,
    /// Transactions (INSERT statements in autocommit, or produce calls).
    pub transactions: u64,
    /// Mean round trip of one INSERT (its commit included).
    pub mean_commit: Duration,
}

impl WriterStats {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Sleeps until row `sent` is due at `rate` per second; returns how many rows are due now.
async fn due_rows(start: Instant, rate: f64, sent: u64, total: u64) -> u64 {
    loop {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        if due > sent {
            return due;
        }
        let at = start + Duration::from_secs_f64(sent as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Inserts events `seqs` at `rate` per second, each due group in its own committed
/// transaction (one INSERT in autocommit), the way a service writes its outbox. Every
/// row carries its sequence number in the `bench_seq` header; its send time is taken
/// just before the INSERT goes out, so the measured latency includes the commit.
pub async fn write_outbox_at_rate(
    client: &Client,
    schema: &str,
    templates: &[BrokerRecord],
    rate: f64,
    seqs: std::ops::Range<u64>,
    book: &LatencyBook,
) -> WriterStats {
    let insert = client
        .prepare(&format!(
            "INSERT INTO \"{schema}\".outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
             SELECT a, k, t, p::jsonb, h::jsonb \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(a, k, t, p, h)"
        ))
        .await
        .expect("prepare writer insert");
    let total = seqs.end - seqs.start;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut stats = WriterStats::default();
    let mut commit_total = Duration::ZERO;
    while sent < total {
        let due = due_rows(start, rate, sent, total).await.min(sent + 500);
        let (mut a, mut k, mut t, mut p, mut h) = (vec![], vec![], vec![], vec![], vec![]);
        for i in sent..due {
            let seq = seqs.start + i;
            let r = &templates[(seq as usize) % templates.len()];
            a.push(r.aggregate_type.as_str());
            k.push(r.key.as_str());
            t.push(r.event_type.as_str());
            p.push(r.payload.as_str());
            let mut extra = serde_json::Map::new();
            extra.insert("bench_seq".into(), seq.to_string().into());
            for (hk, hv) in &r.headers {
                extra.insert(hk.clone(), hv.clone().into());
            }
            h.push(serde_json::Value::Object(extra).to_string());
        }
        let h_refs: Vec<&str> = h.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        for i in sent..due {
            book.mark_sent(seqs.start + i, t0);
        }
        client
            .execute(&insert, &[&a, &k, &t, &p, &h_refs])
            .await
            .expect("writer insert");
        commit_total += t0.elapsed();
        stats.transactions += 1;
        sent = due;
    }
    stats.events = total;
    stats.elapsed = start.elapsed();
    stats.mean_commit = commit_total / stats.transactions.max(1) as u32;
    stats
}

/// Produces events `seqs` straight to Kafka at `rate` per second (the broker-only
/// latency floor); the send time is taken just before each record is handed to the
/// producer. Waits for every acknowledgement.
pub async fn produce_at_rate<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
    templates: &[BrokerRecord],
    rate: f64,
    seqs: std::ops::Range<u64>,
    book: &LatencyBook,
) -> WriterStats {
    let total = seqs.end - seqs.start;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut acks = Vec::with_capacity(total as usize);
    while sent < total {
        let due = due_rows(start, rate, sent, total).await;
        for i in sent..due {
            let seq = seqs.start + i;
            let r = &templates[(seq as usize) % templates.len()];
            let seq_text = seq.to_string();
            let headers = contract_headers(
                &r.event_id,
                &r.event_type,
                &r.aggregate_type,
                "bench",
                &r.headers,
            )
            .insert(Header {
                key: "bench_seq",
                value: Some(seq_text.as_str()),
            });
            book.mark_sent(seq, Instant::now());
            let record = FutureRecord::to(topic)
                .key(&r.key)
                .payload(&r.payload)
                .headers(headers);
            match producer.send_result(record) {
                Ok(f) => acks.push(f),
                Err((e, _)) => panic!("broker-only writer: produce failed: {e}"),
            }
        }
        sent = due;
    }
    let elapsed = start.elapsed();
    let results = tokio::time::timeout(Duration::from_secs(60), join_all(acks))
        .await
        .expect("acknowledgements within 60s");
    for r in results {
        match r {
            Ok(Ok(_)) => {}
            other => panic!("broker-only writer: delivery failed: {other:?}"),
        }
    }
    WriterStats {
        events: total,
        elapsed,
        transactions: total,
        mean_commit: Duration::ZERO,
    }
}
