//! Wake-ups: a row committed while the relay goes idle must not wait for the next
//! `process_interval`. With migration 005 an insert notifies only while its source
//! waits; the waiting lock closes the race between "nothing found" and "asleep".

mod common;

use std::time::{Duration, Instant};

use common::broker::Stream;
use common::{connect, Scenario};

/// Rounds of "the relay goes idle, one row is committed at that moment".
const ROUNDS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_as_the_relay_goes_idle_arrives_in_milliseconds_every_time() {
    // No fallback: the look for pending rows comes once an hour, so only a wake-up can
    // deliver a row that a claim missed.
    let (sc, mut relay) = Scenario::builder()
        .source("wakeup")
        .set("process_interval", "1h")
        .set("health.refresh_interval", "1h")
        .start()
        .await;
    let src = sc.src().clone();
    let writer = connect(&src.url).await;
    let insert = writer
        .prepare(&format!(
            "INSERT INTO {}.outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('order', 'a', 'OrderChanged', jsonb_build_object('seq', $1::int4))",
            src.schema
        ))
        .await
        .unwrap();
    let bootstrap = sc.bootstrap();
    let topic = src.topic.clone();
    let arrivals = tokio::task::spawn_blocking(move || Stream::start(&bootstrap, &topic))
        .await
        .unwrap();
    let mut latencies = Vec::with_capacity(ROUNDS);
    let mut seq = 0i32;
    for round in 0..ROUNDS {
        // A row, then, as the relay finishes with it and goes idle (it claims again
        // 2 ms after a claim that found rows, finds nothing, announces that it waits,
        // looks a last time, sleeps), a second row; then nothing until it arrives.
        // The gap sweeps 0-8 ms over the rounds, landing the second commit in each of
        // those moments; a second row that no claim sees and no notification
        // announces waits for the hourly look, and the round fails.
        writer.execute(&insert, &[&seq]).await.unwrap();
        seq += 1;
        tokio::time::sleep(Duration::from_micros(((round * 37) % 32) as u64 * 250)).await;
        let committed = Instant::now();
        writer.execute(&insert, &[&seq]).await.unwrap();
        let wanted = seq;
        seq += 1;
        let at = loop {
            let (at, value) =
                tokio::task::block_in_place(|| arrivals.next(Duration::from_secs(10)))
                    .unwrap_or_else(|| {
                        panic!("round {round}: the row committed as the relay went idle did not arrive within 10 s (the fallback look is an hour away)")
                    });
            let v: serde_json::Value =
                serde_json::from_str(value.as_deref().unwrap_or("{}")).unwrap();
            if v["seq"] == wanted as i64 {
                break at;
            }
        };
        latencies.push(at.saturating_duration_since(committed));
        // Idle again before the next round.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    eprintln!(
        "{ROUNDS} rounds: commit to consumer p50 {:?}, p99 {:?}, max {:?}",
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    assert!(
        pct(0.99) < Duration::from_millis(500),
        "p99 {:?}: wake-ups are late",
        pct(0.99)
    );
    drop(arrivals);
    relay.stop().await;
}
