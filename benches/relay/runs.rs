//! The contenders of one run: the broker-alone and SQL-only limits, the relay binary
//! draining a backlog, the naive relay, and the steady-rate latency runs. Each gets a
//! fresh lane (schema, topic, empty broker) from [`Bench::lane`] and adds its rows and
//! its breakdown lines to the report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::{
    produce_all, relay_producer, send_sentinel, CountingConsumer, LatencyBook, DRAIN_FETCH_WAIT_MS,
};
use crate::relay_process::{self, histogram, shipped_int, Overrides, RelayProcess};
use crate::report::{thousands, DrainRow, LatencyRow};
use crate::workload::{self, BrokerRecord};
use crate::{cpu, Bench, BrokerKind};

/// The broker alone: the same records, produced with the relay's producer settings.
/// One record per partition goes first, unmeasured, so connections and metadata are
/// in place: this is the broker's best case.
pub async fn broker_limit(b: &mut Bench, n: u64) {
    let lane = b
        .lane("broker", &Overrides::default(), b.opts.partitions)
        .await;
    let records = workload::template_records(&b.admin, n).await;
    let producer = relay_producer(&lane.config_text);
    let warm = (b.opts.partitions as usize).min(records.len());
    produce_all(&producer, &lane.topic, &records[..warm]).await;
    let consumer = CountingConsumer::start(
        &lane.bootstrap,
        &lane.topic,
        lane.partitions,
        n + warm as u64,
        None,
        DRAIN_FETCH_WAIT_MS,
    );
    let got = consumer
        .wait_count(warm as u64, Duration::from_secs(30))
        .await;
    assert!(
        got >= warm as u64,
        "broker limit: the consumer read {got} of {warm} warm-up records"
    );
    progress!(b.t0, "broker limit: producing {} records", thousands(n));
    let c0 = cpu::sample(&b.procs, None);
    let started = Instant::now();
    let acked = produce_all(&producer, &lane.topic, &records).await;
    let reached = consumer.wait_target(Duration::from_secs(120)).await;
    let consumed = reached.map(|at| at - started).unwrap_or(started.elapsed());
    let c1 = cpu::sample(&b.procs, None);
    b.report.breakdown.push(format!(
        "broker alone, {} records: acks after {:.2} s, all at the consumer after {:.2} s",
        thousands(n),
        acked.as_secs_f64(),
        consumed.as_secs_f64()
    ));
    let line = b.cpu_split(&c0, &c1);
    b.report.breakdown.push(line);
    b.report.drains.push(DrainRow {
        key: "broker-acks".into(),
        label: "limit: broker alone, produce + acks".into(),
        events: n,
        elapsed: acked,
        complete: true,
        limit_key: None,
        proc: None,
    });
    b.report.drains.push(DrainRow {
        key: "broker".into(),
        label: "limit: broker alone, at the consumer".into(),
        events: consumer.count().saturating_sub(warm as u64).min(n),
        elapsed: consumed,
        complete: reached.is_some(),
        limit_key: None,
        proc: None,
    });
    // The relay's shape without PostgreSQL: one batch in flight, the next one sent only
    // when every record of the previous one is acknowledged.
    drop(consumer);
    let batch = b.opts.batch.max(1) as usize;
    let started = Instant::now();
    for chunk in records.chunks(batch) {
        produce_all(&producer, &lane.topic, chunk).await;
    }
    let serial = started.elapsed();
    b.report.drains.push(DrainRow {
        key: "broker-serial".into(),
        label: format!("limit: broker alone, {batch} at a time, acks"),
        events: n,
        elapsed: serial,
        complete: true,
        limit_key: None,
        proc: None,
    });
    b.drop_lane(&lane).await;
}

/// The SQL-only limit at one batch size.
pub async fn sql_limit(
    b: &mut Bench,
    n: u64,
    label: &str,
    key: &str,
    batch: i64,
    delete: usize,
    cap: Duration,
) {
    let lane = b
        .lane(
            &format!("sql{batch}"),
            &Overrides::default(),
            b.opts.partitions,
        )
        .await;
    progress!(
        b.t0,
        "SQL-only limit, {label}: loading {} events",
        thousands(n)
    );
    workload::load_backlog(&b.admin, &lane.schema, n).await;
    // A pooled connection, as the relay's own claims and deletes use.
    let pool = outbox_relay::db::DatabaseUrl::parse(&b.db_url)
        .and_then(|u| u.pool(1, Duration::from_secs(30)))
        .expect("pool for the SQL-only limit");
    let client = pool.get().await.expect("connection for the SQL-only limit");
    b.reset_statements().await;
    progress!(b.t0, "SQL-only limit, {label}: draining");
    let c0 = cpu::sample(&b.procs, None);
    let (drained, elapsed) =
        workload::drain_sql_only(&client, &lane.schema, batch, delete, cap).await;
    let c1 = cpu::sample(&b.procs, None);
    let lines = b
        .top_statements(&format!("SQL-only limit, {label}"), elapsed)
        .await;
    b.report.breakdown.extend(lines);
    let line = b.cpu_split(&c0, &c1);
    b.report.breakdown.push(line);
    b.report.drains.push(DrainRow {
        key: key.into(),
        label: format!("limit: SQL only, {label}"),
        events: drained,
        elapsed,
        complete: drained >= n,
        limit_key: None,
        proc: None,
    });
    drop(client);
    b.drop_lane(&lane).await;
}

/// `perf record -a -g` while it lives; `report` summarises what it saw.
struct Perf {
    child: std::process::Child,
    data: PathBuf,
}

impl Perf {
    fn start(dir: &std::path::Path) -> Option<Perf> {
        let data = dir.join("perf.data");
        let child = std::process::Command::new("perf")
            .args(["record", "-a", "-g", "-F", "499", "-o"])
            .arg(&data)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("bench: perf unavailable: {e}"))
            .ok()?;
        std::thread::sleep(Duration::from_millis(300)); // perf needs a moment to attach
        Some(Perf { child, data })
    }

    /// Stops recording; returns the busiest threads and the relay's hottest symbols.
    fn report(mut self, relay_pid: u32) -> Vec<String> {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let run = |args: &[&str]| -> Vec<String> {
            std::process::Command::new("perf")
                .arg("report")
                .arg("-i")
                .arg(&self.data)
                .args([
                    "--stdio",
                    "--no-children",
                    "--percentage",
                    "relative",
                    "-q",
                    "-g",
                    "none",
                    "--percent-limit",
                    "1.5",
                ])
                .args(args)
                .stderr(std::process::Stdio::null())
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .take(14)
                        .map(|l| format!("      {}", l.trim_end_matches([' ', '-'])))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut lines = vec!["    perf, all CPUs, by thread name and binary:".to_string()];
        lines.extend(run(&["--sort", "comm,dso"]));
        lines.push("    perf, the relay process only, by symbol:".into());
        lines.extend(run(&[
            "--pid",
            &relay_pid.to_string(),
            "--sort",
            "dso,symbol",
        ]));
        lines
    }
}

/// The relay binary emptying a backlog of `n`, measured at the consumer; with `profile`,
/// under `perf record -a` (BENCH_PERF).
pub async fn relay_drain(
    b: &mut Bench,
    n: u64,
    label: &str,
    o: &Overrides,
    cap: Duration,
    key: &str,
    profile: bool,
) -> DrainRow {
    let lane = b
        .lane(
            &format!("relay{}", o.batch_size.unwrap_or(0)),
            o,
            b.opts.partitions,
        )
        .await;
    progress!(b.t0, "{label}: loading {} events", thousands(n));
    workload::load_backlog(&b.admin, &lane.schema, n).await;
    let consumer = CountingConsumer::start(
        &lane.bootstrap,
        &lane.topic,
        lane.partitions,
        n + 1,
        None,
        DRAIN_FETCH_WAIT_MS,
    );
    send_sentinel(&relay_producer(&lane.config_text), &lane.topic).await;
    let got = consumer.wait_count(1, Duration::from_secs(30)).await;
    assert!(
        got >= 1,
        "{label}: the consumer did not read the sentinel record within 30 s"
    );
    consumer.set_base();
    b.reset_statements().await;
    let perf = if profile {
        Perf::start(b.dir.path())
    } else {
        None
    };
    progress!(b.t0, "{label}: draining");
    let log = b.dir.path().join(format!("{}.relay.log", lane.schema));
    let c0 = cpu::sample(&b.procs, None);
    let mut relay = RelayProcess::start(&lane.config, &log, lane.http_port, o.binary.as_deref());
    let end = relay.started + cap;
    let reached = loop {
        relay.assert_running();
        if let Some(at) = consumer.wait_target(Duration::from_millis(100)).await {
            break Some(at);
        }
        if Instant::now() >= end {
            break None;
        }
    };
    let elapsed = reached.unwrap_or_else(Instant::now) - relay.started;
    let first_record = consumer.first_at().map(|at| at - relay.started);
    let events = consumer.count().saturating_sub(1).min(n);
    let stats = relay.stats();
    let c1 = cpu::sample(&b.procs, Some(relay.pid()));
    let metrics = relay.metrics();
    let mut left = -1;
    if reached.is_some() {
        // Deleting the last batch follows its acknowledgement; wait for it.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            left = workload::pending(&b.admin, &lane.schema).await;
            if left == 0 || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let emptied = relay.started.elapsed();
    let relay_pid = relay.pid();
    let perf_lines = match perf {
        Some(p) => tokio::task::spawn_blocking(move || p.report(relay_pid))
            .await
            .expect("perf report"),
        None => Vec::new(),
    };
    tokio::task::spawn_blocking(move || relay.stop())
        .await
        .expect("stop relay");
    let mut lines = b
        .top_statements(&format!("{label} (N = {})", thousands(n)), elapsed)
        .await;
    if let (Some((bs, bc)), Some((ps, pc))) = (
        histogram(&metrics, "outbox_batch_duration_seconds"),
        histogram(&metrics, "outbox_publish_duration_seconds"),
    ) {
        lines.push(format!(
            "    relay /metrics: {} batches, mean batch {:.2} ms, mean publish+acks {:.2} ms; first record at the consumer {} ms after the start, then {} events/s to the last; outbox empty {:.2} s after start{}",
            thousands(bc as u64),
            1e3 * bs / bc.max(1.0),
            1e3 * ps / pc.max(1.0),
            first_record.map_or("-".into(), |d| d.as_millis().to_string()),
            match (first_record, reached.is_some()) {
                (Some(f), true) if elapsed > f => thousands(
                    ((events.saturating_sub(1)) as f64 / (elapsed - f).as_secs_f64()).round() as u64
                ),
                _ => "-".into(),
            },
            emptied.as_secs_f64(),
            if left > 0 { format!(" ({left} rows still there)") } else { String::new() }
        ));
    }
    lines.push(b.cpu_split(&c0, &c1));
    lines.extend(perf_lines);
    b.report.breakdown.extend(lines);
    drop(consumer);
    b.drop_lane(&lane).await;
    DrainRow {
        key: key.into(),
        label: label.into(),
        events,
        elapsed,
        complete: reached.is_some(),
        limit_key: None,
        proc: Some(stats),
    }
}

/// The naive row-at-a-time relay on the same backlog, capped.
pub async fn naive(b: &mut Bench, n: u64) {
    let lane = b
        .lane("naive", &Overrides::default(), b.opts.partitions)
        .await;
    progress!(b.t0, "naive relay: loading {} events", thousands(n));
    workload::load_backlog(&b.admin, &lane.schema, n).await;
    let producer = relay_producer(&lane.config_text);
    let mut client = workload::connect(&b.db_url).await;
    let consumer = CountingConsumer::start(
        &lane.bootstrap,
        &lane.topic,
        lane.partitions,
        n,
        None,
        DRAIN_FETCH_WAIT_MS,
    );
    progress!(
        b.t0,
        "naive relay: running for up to {} s",
        b.opts.naive_secs
    );
    let source = lane.schema.replace('_', "-");
    b.reset_statements().await;
    let c0 = cpu::sample(&b.procs, None);
    let (done, elapsed) = workload::naive_relay(
        &mut client,
        &producer,
        &lane.schema,
        &source,
        &lane.topic,
        Duration::from_secs_f64(b.opts.naive_secs),
    )
    .await;
    let c1 = cpu::sample(&b.procs, None);
    let seen = consumer.wait_count(done, Duration::from_secs(30)).await;
    assert!(
        seen >= done,
        "naive relay: the consumer saw {seen} of {done} events"
    );
    let lines = b.top_statements("naive relay", elapsed).await;
    b.report.breakdown.extend(lines);
    let line = b.cpu_split(&c0, &c1);
    b.report.breakdown.push(line);
    b.report.drains.push(DrainRow {
        key: "naive".into(),
        label: "naive relay (row at a time, FOR UPDATE SKIP LOCKED)".into(),
        events: done,
        elapsed,
        complete: done >= n,
        limit_key: None,
        proc: None,
    });
    drop(consumer);
    drop(client);
    b.drop_lane(&lane).await;
}

/// How long the consumer is given after a latency run's writer stops.
const LATENCY_GRACE: Duration = Duration::from_secs(10);

/// Commit-to-consumer latency at a steady `rate` on `broker`: through the relay
/// (defaults plus process_interval 5s, so wake-up comes from NOTIFY) or the broker alone.
pub async fn latency(b: &mut Bench, broker: BrokerKind, rate: u64, through_relay: bool) {
    let o = Overrides {
        process_interval: Some("5s"),
        ..Overrides::default()
    };
    let name = match (broker, through_relay) {
        (BrokerKind::Tansu, true) => "lat",
        (BrokerKind::Tansu, false) => "latbroker",
        (BrokerKind::Mock, true) => "latmock",
        (BrokerKind::Mock, false) => "latbrokermock",
    };
    let lane = b.lane_on(broker, name, &o, b.opts.latency_partitions).await;
    let templates: Vec<BrokerRecord> = workload::template_records(&b.admin, 10_000).await;
    let warm = rate;
    let measured = (rate as f64 * b.opts.latency_secs) as u64;
    let total = warm + measured;
    let book = Arc::new(LatencyBook::new(total));
    let consumer = CountingConsumer::start(
        &lane.bootstrap,
        &lane.topic,
        lane.partitions,
        total,
        Some(book.clone()),
        broker.fetch_wait_ms(),
    );
    let what = if through_relay {
        "relay"
    } else {
        "broker alone"
    };
    let label = if through_relay {
        format!(
            "relay @ {}/s (default.toml {}/{}, NOTIFY) [{}]",
            thousands(rate),
            shipped_int("batch_size").map_or("?".into(), |v| v.to_string()),
            shipped_int("delete_batch_size").map_or("?".into(), |v| v.to_string()),
            broker.name()
        )
    } else {
        format!(
            "broker alone @ {}/s (producer -> consumer) [{}]",
            thousands(rate),
            broker.name()
        )
    };
    progress!(
        b.t0,
        "latency, {what} at {}/s on {}: 1 s warm-up, then {} s",
        thousands(rate),
        broker.name(),
        b.opts.latency_secs
    );
    let mut relay = None;
    let client = workload::connect(&b.db_url).await;
    let producer = relay_producer(&lane.config_text);
    if through_relay {
        let log = b.dir.path().join(format!("{}.relay.log", lane.schema));
        relay = Some(RelayProcess::start(
            &lane.config,
            &log,
            lane.http_port,
            o.binary.as_deref(),
        ));
    }
    let write = |seqs: std::ops::Range<u64>| {
        let (client, producer, lane, templates, book) =
            (&client, &producer, &lane, &templates, &book);
        async move {
            if through_relay {
                workload::write_outbox_at_rate(
                    client,
                    &lane.schema,
                    templates,
                    rate as f64,
                    seqs,
                    book,
                )
                .await
            } else {
                workload::produce_at_rate(producer, &lane.topic, templates, rate as f64, seqs, book)
                    .await
            }
        }
    };
    write(0..warm).await;
    let got = consumer.wait_count(warm, Duration::from_secs(60)).await;
    if let Some(r) = relay.as_mut() {
        r.assert_running();
    }
    assert!(
        got >= warm,
        "latency warm-up: {got} of {warm} events arrived within 60 s"
    );
    let relay_pid = relay.as_ref().map(RelayProcess::pid);
    b.reset_statements().await;
    let window = Instant::now();
    let c0 = cpu::sample(&b.procs, relay_pid);
    let stats = write(warm..total).await;
    let got = consumer.wait_count(total, LATENCY_GRACE).await;
    let c1 = cpu::sample(&b.procs, relay_pid);
    let statements = b
        .top_statements(&format!("latency, {label}"), window.elapsed())
        .await;
    let proc = relay.as_ref().map(|r| relay_process::ProcStats {
        peak_rss_kib: r.stats().peak_rss_kib,
        cpu: Duration::from_secs_f64(c1.relay_since(&c0)),
    });
    if let Some(r) = relay {
        tokio::task::spawn_blocking(move || r.stop())
            .await
            .expect("stop relay");
    }
    let (latencies, missing) = book.latencies_ms(warm..total);
    if got < total {
        eprintln!(
            "latency, {what} at {rate}/s on {}: only {got} of {total} events arrived",
            broker.name()
        );
    }
    b.report.breakdown.extend(statements);
    let line = b.cpu_split(&c0, &c1);
    b.report.breakdown.push(line);
    b.report.latencies.push(LatencyRow {
        label,
        broker,
        through_relay,
        target_rate: rate as f64,
        achieved_rate: stats.rate(),
        per_tx: stats.events as f64 / stats.transactions.max(1) as f64,
        mean_commit: stats.mean_commit,
        latencies,
        missing,
        waited: LATENCY_GRACE,
        duplicates: book.duplicates(),
        proc,
    });
    drop(consumer);
    drop(client);
    b.drop_lane(&lane).await;
}
