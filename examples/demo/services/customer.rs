//! The customer service: CustomerCreated, CustomerUpdated, CustomerDeleted, one event per
//! transaction, keyed by customer id. Two writers share the customers, so updates and
//! deletes sometimes race for one row; the row lock orders them.

use anyhow::{Context, Result};
use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::json;
use tokio_postgres::Client;

use super::{connect, now, Aggregates, Ctx, Event};
use crate::ledger::Ledger;
use crate::Service;

/// The domain table, in database `platform`.
pub const TABLES: &str = "
    CREATE TABLE customer.customers (
        id          text PRIMARY KEY,
        email       text NOT NULL,
        name        text NOT NULL,
        tier        text NOT NULL,
        version     bigint NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now());";

/// Writes customer transactions until the writer is cancelled.
pub async fn run(client: &mut Client, ctx: &mut Ctx, customers: &Aggregates) -> Result<()> {
    let insert = client
        .prepare(
            "INSERT INTO customer.customers (id, email, name, tier, version) \
             VALUES ($1, $2, $3, $4, 1)",
        )
        .await?;
    let update = client
        .prepare(
            "UPDATE customer.customers SET email = $2, tier = $3, version = version + 1, \
             updated_at = now() WHERE id = $1 RETURNING version",
        )
        .await?;
    let delete = client
        .prepare("DELETE FROM customer.customers WHERE id = $1 RETURNING version")
        .await?;
    while !ctx.cancel.is_cancelled() {
        let live = customers.len();
        let dice = ctx.rng.random_range(0..100);
        let correlation_id = ctx.uuid();
        if live < 20 || dice < 30 {
            let id = customers.new_id("cus");
            let first = *FIRST_NAMES.choose(&mut ctx.rng).unwrap_or(&"Ada");
            let last = *LAST_NAMES.choose(&mut ctx.rng).unwrap_or(&"Lovelace");
            let name = format!("{first} {last}");
            let email = email(first, last, &id);
            let tier = *TIERS.choose(&mut ctx.rng).unwrap_or(&"standard");
            let tx = client.transaction().await?;
            tx.execute(&insert, &[&id, &email, &name, &tier]).await?;
            let event = Event::new(
                "customer",
                &id,
                "CustomerCreated",
                json!({"customer_id": id, "name": name, "email": email, "tier": tier,
                       "version": 1, "occurred_at": now()}),
                &correlation_id,
                format!("customer:{id}:v1"),
            );
            if ctx.finish(tx, vec![event]).await? {
                customers.add(id);
            }
        } else if dice < 88 || live < 100 {
            let Some(id) = customers.pick(&mut ctx.rng) else {
                continue;
            };
            let first = *FIRST_NAMES.choose(&mut ctx.rng).unwrap_or(&"Ada");
            let email = email(first, "moved", &id);
            let tier = *TIERS.choose(&mut ctx.rng).unwrap_or(&"standard");
            let tx = client.transaction().await?;
            // Locks the customer until commit: a concurrent change waits, then gets the
            // next version, and its outbox row a higher id.
            let Some(row) = tx.query_opt(&update, &[&id, &email, &tier]).await? else {
                tx.rollback().await?; // deleted meanwhile
                continue;
            };
            let version: i64 = row.get(0);
            let event = Event::new(
                "customer",
                &id,
                "CustomerUpdated",
                json!({"customer_id": id, "email": email, "tier": tier,
                       "version": version, "occurred_at": now()}),
                &correlation_id,
                format!("customer:{id}:v{version}"),
            );
            ctx.finish(tx, vec![event]).await?;
        } else {
            let Some(id) = customers.take(&mut ctx.rng) else {
                continue;
            };
            let tx = client.transaction().await?;
            let Some(row) = tx.query_opt(&delete, &[&id]).await? else {
                tx.rollback().await?;
                continue;
            };
            let version: i64 = row.get::<_, i64>(0) + 1;
            let event = Event::new(
                "customer",
                &id,
                "CustomerDeleted",
                json!({"customer_id": id, "reason": "account closed",
                       "version": version, "occurred_at": now()}),
                &correlation_id,
                format!("customer:{id}:v{version}"),
            );
            if !ctx.finish(tx, vec![event]).await? {
                customers.add(id);
            }
        }
        ctx.pace().await;
    }
    Ok(())
}

/// Commits `n` customer events the relay can never publish: their `headers` value is a
/// number, not a string, a permanent failure, so they go to the dead-letter table.
pub async fn write_poison(url: &str, n: u32, ledger: &Ledger) -> Result<()> {
    let mut client = connect(url).await?;
    let tx = client.transaction().await?;
    for i in 1..=n {
        tx.execute(
            "INSERT INTO customer.outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
             VALUES ('customer', $1, 'CustomerUpdated', '{\"version\": 1}', '{\"attempt\": 1}')",
            &[&format!("poison-{i}")],
        )
        .await
        .context("write a poison event")?;
    }
    tx.commit().await?;
    ledger.committed(Service::Customer, n as usize);
    Ok(())
}

fn email(first: &str, last: &str, id: &str) -> String {
    format!(
        "{}.{}+{}@example.com",
        first.to_lowercase(),
        last.to_lowercase(),
        id.trim_start_matches("cus-")
    )
}

const FIRST_NAMES: &[&str] = &[
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Radia", "Linus",
    "Frances", "John", "Hedy", "Dennis", "Sophie", "Tim",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Hamilton",
    "Thompson",
    "Perlman",
    "Torvalds",
    "Allen",
    "Backus",
    "Lamarr",
    "Ritchie",
    "Wilson",
    "Berners-Lee",
];
const TIERS: &[&str] = &["standard", "silver", "gold", "business"];
