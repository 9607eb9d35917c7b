//! The four services under load. Each transaction changes domain rows and writes the
//! change's events to the service's outbox, then commits, or in a few percent of cases
//! rolls back (a failed validation, a client gone): then neither the rows nor the events
//! exist, and the relay must never publish them.
//!
//! Every event carries its aggregate's `version`, bumped in the domain row by the same
//! transaction. The UPDATE locks the row until commit, so two transactions on one
//! aggregate write their outbox rows in version order; that is what lets the relay keep
//! per-aggregate order, and what the consumer checks.
//!
//! One module per service: its domain tables (`TABLES`) and its transactions (`run`).

mod customer;
mod product;
mod product_admin;
mod product_loader;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls, Statement, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ledger::Ledger;
use crate::postgres::Postgres;
use crate::{Service, SERVICES};

pub use customer::write_poison;

/// Share of transactions rolled back after writing their domain rows and events.
const ROLLBACK_RATE: f64 = 0.03;

/// Creates the domain tables of the services living in `database`, next to their
/// outboxes (which `migrate_all` created).
pub async fn create_domain_tables(url: &str, database: &str) -> Result<()> {
    let client = connect(url).await?;
    for s in SERVICES.into_iter().filter(|s| s.database() == database) {
        let tables = match s {
            Service::Customer => customer::TABLES,
            Service::Product => product::TABLES,
            Service::ProductAdmin => product_admin::TABLES,
            Service::ProductLoader => product_loader::TABLES,
        };
        client
            .batch_execute(tables)
            .await
            .with_context(|| format!("create the domain tables of {}", s.name()))?;
    }
    Ok(())
}

/// A connection whose driver runs on its own task.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// One writer: a service instance with its own connection.
pub struct Writer {
    /// The service it plays.
    pub service: Service,
    /// Its database.
    pub url: String,
    /// Committed events per second it aims at.
    pub rate: f64,
    /// The aggregates it shares with the service's other writers.
    pub aggregates: Arc<Aggregates>,
}

/// The writers: two per service (so two transactions sometimes race for one aggregate),
/// one for the loader, sharing `rate` events per second.
pub fn writer_plan(pg: &Postgres, rate: u32) -> Vec<Writer> {
    let mut plan = Vec::new();
    for s in SERVICES {
        let (writers, share) = match s {
            Service::Customer => (2, 0.15),
            Service::Product => (2, 0.25),
            Service::ProductAdmin => (2, 0.30),
            Service::ProductLoader => (1, 0.30),
        };
        let aggregates = Arc::new(Aggregates::default());
        for _ in 0..writers {
            plan.push(Writer {
                service: s,
                url: pg.url(s.database()),
                rate: (f64::from(rate) * share / writers as f64).max(0.1),
                aggregates: aggregates.clone(),
            });
        }
    }
    plan
}

/// Runs one writer until `cancel`, which it checks between transactions.
pub async fn run_writer(w: Writer, ledger: Arc<Ledger>, cancel: CancellationToken) -> Result<()> {
    let mut client = connect(&w.url).await?;
    let schema = w.service.schema();
    let outbox = client
        .prepare(&format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, \
                 headers, correlation_id, idempotency_token) \
             SELECT e.aggregate_type, e.aggregate_id, e.event_type, e.payload::jsonb, $7::text::jsonb, \
                 e.correlation_id, e.idempotency_token \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
                 WITH ORDINALITY AS e(aggregate_type, aggregate_id, event_type, payload, \
                     correlation_id, idempotency_token, n) \
             ORDER BY e.n \
             RETURNING event_id"
        ))
        .await
        .context("prepare the outbox insert")?;
    let headers = json!({
        "content-type": "application/json",
        "producer": format!("{}-service", w.service.name()),
        "schema-version": "1",
    })
    .to_string();
    let mut ctx = Ctx {
        service: w.service,
        outbox,
        headers,
        ledger,
        rng: StdRng::from_os_rng(),
        pace: Pace::new(w.rate),
        cancel,
    };
    let a = &w.aggregates;
    match w.service {
        Service::Customer => customer::run(&mut client, &mut ctx, a).await,
        Service::Product => product::run(&mut client, &mut ctx, a).await,
        Service::ProductAdmin => product_admin::run(&mut client, &mut ctx, a).await,
        Service::ProductLoader => product_loader::run(&mut client, &mut ctx, a).await,
    }
}

/// One outbox row as a service writes it.
struct Event {
    aggregate_type: &'static str,
    aggregate_id: String,
    event_type: &'static str,
    payload: String,
    correlation_id: String,
    idempotency_token: String,
}

impl Event {
    fn new(
        aggregate_type: &'static str,
        aggregate_id: &str,
        event_type: &'static str,
        payload: Value,
        correlation_id: &str,
        idempotency_token: String,
    ) -> Event {
        Event {
            aggregate_type,
            aggregate_id: aggregate_id.to_string(),
            event_type,
            payload: payload.to_string(),
            correlation_id: correlation_id.to_string(),
            idempotency_token,
        }
    }
}

/// What one writer carries between transactions.
struct Ctx {
    service: Service,
    outbox: Statement,
    headers: String,
    ledger: Arc<Ledger>,
    rng: StdRng,
    pace: Pace,
    cancel: CancellationToken,
}

impl Ctx {
    /// Writes `events` to the outbox in `tx`, after the domain change, then commits, or
    /// (in ROLLBACK_RATE of cases) rolls back. Returns whether it committed.
    async fn finish(&mut self, tx: Transaction<'_>, events: Vec<Event>) -> Result<bool> {
        let col = |f: fn(&Event) -> &str| events.iter().map(f).collect::<Vec<&str>>();
        let ids: Vec<Uuid> = tx
            .query(
                &self.outbox,
                &[
                    &col(|e| e.aggregate_type),
                    &col(|e| &e.aggregate_id),
                    &col(|e| e.event_type),
                    &col(|e| &e.payload),
                    &col(|e| &e.correlation_id),
                    &col(|e| &e.idempotency_token),
                    &self.headers,
                ],
            )
            .await
            .context("insert into the outbox")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        self.pace.count(events.len());
        if self.rng.random_bool(ROLLBACK_RATE) {
            self.ledger.rolling_back(self.service, &ids);
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await.context("commit")?;
        self.ledger.committed(self.service, events.len());
        Ok(true)
    }

    /// Waits as long as the writer's rate asks.
    async fn pace(&mut self) {
        self.pace.wait(&self.cancel).await;
    }

    fn uuid(&mut self) -> String {
        uuid::Builder::from_random_bytes(self.rng.random())
            .into_uuid()
            .to_string()
    }
}

/// Spreads a writer's events evenly over time at its rate.
struct Pace {
    per_second: f64,
    since: Instant,
    events: f64,
}

impl Pace {
    fn new(per_second: f64) -> Pace {
        Pace {
            per_second,
            since: Instant::now(),
            events: 0.0,
        }
    }

    fn count(&mut self, events: usize) {
        self.events += events as f64;
    }

    async fn wait(&mut self, cancel: &CancellationToken) {
        let due = self.since + Duration::from_secs_f64(self.events / self.per_second);
        let now = Instant::now();
        if due > now {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = cancel.cancelled() => {}
            }
        } else if now - due > Duration::from_secs(1) {
            // Fell behind (the machine is busy): do not burst to catch up.
            self.since = now;
            self.events = 0.0;
        }
    }
}

/// The aggregates one service's writers share: ids of live ones, and a counter for new ids.
#[derive(Default)]
pub struct Aggregates {
    live: Mutex<Vec<String>>,
    next: AtomicU64,
}

impl Aggregates {
    fn new_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:06}",
            self.next.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    fn add(&self, id: String) {
        if let Ok(mut l) = self.live.lock() {
            l.push(id);
        }
    }

    /// A random live aggregate, left in place.
    fn pick(&self, rng: &mut StdRng) -> Option<String> {
        self.live.lock().ok()?.choose(rng).cloned()
    }

    /// A random live aggregate, removed so that nobody else deletes it too.
    fn take(&self, rng: &mut StdRng) -> Option<String> {
        let mut l = self.live.lock().ok()?;
        if l.is_empty() {
            return None;
        }
        let i = rng.random_range(0..l.len());
        Some(l.swap_remove(i))
    }
}

/// Now, as RFC 3339 with milliseconds, for payloads.
fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A plausible product name.
fn product_name(rng: &mut StdRng) -> String {
    format!(
        "{} {}",
        ADJECTIVES.choose(rng).unwrap_or(&"Plain"),
        NOUNS.choose(rng).unwrap_or(&"Mug")
    )
}

/// Words for product names.
const ADJECTIVES: &[&str] = &[
    "Compact", "Deluxe", "Eco", "Classic", "Smart", "Rugged", "Foldable", "Wireless", "Ceramic",
    "Bamboo",
];
const NOUNS: &[&str] = &[
    "Kettle",
    "Lamp",
    "Backpack",
    "Chair",
    "Blender",
    "Planter",
    "Headphones",
    "Desk",
    "Tent",
    "Teapot",
];
