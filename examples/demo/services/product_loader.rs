//! product-loader: bulk loads, each one transaction upserting 100 to 600 products and
//! writing a BulkProductsLoaded event per 10 of them, keyed by the load job's id.

use anyhow::Result;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::json;
use tokio_postgres::Client;

use super::{now, product_name, Aggregates, Ctx, Event};

/// The domain tables, in database `catalog`.
pub const TABLES: &str = "
    CREATE TABLE product_loader.load_jobs (
        id            text PRIMARY KEY,
        source        text NOT NULL,
        products      integer NOT NULL,
        version       bigint NOT NULL,
        loaded_at     timestamptz NOT NULL DEFAULT now());
    CREATE TABLE product_loader.products (
        sku           text PRIMARY KEY,
        name          text NOT NULL,
        price_cents   bigint NOT NULL,
        load_job      text NOT NULL,
        updated_at    timestamptz NOT NULL DEFAULT now());";

/// Runs bulk loads until the writer is cancelled.
pub async fn run(client: &mut Client, ctx: &mut Ctx, jobs: &Aggregates) -> Result<()> {
    let job = client
        .prepare(
            "INSERT INTO product_loader.load_jobs (id, source, products, version) \
             VALUES ($1, $2, $3, $4)",
        )
        .await?;
    let upsert = client
        .prepare(
            "INSERT INTO product_loader.products (sku, name, price_cents, load_job) \
             SELECT p.*, $4::text FROM unnest($1::text[], $2::text[], $3::bigint[]) AS p \
             ON CONFLICT (sku) DO UPDATE SET name = excluded.name, \
                 price_cents = excluded.price_cents, load_job = excluded.load_job, \
                 updated_at = now()",
        )
        .await?;
    let mut next_sku = 0u64;
    while !ctx.cancel.is_cancelled() {
        let id = jobs.new_id("load");
        let source = *LOAD_SOURCES.choose(&mut ctx.rng).unwrap_or(&"erp-sync");
        let count: usize = ctx.rng.random_range(100..=600);
        let skus: Vec<String> = (0..count)
            .map(|_| {
                next_sku += 1;
                format!("LD-{next_sku:07}")
            })
            .collect();
        let names: Vec<String> = (0..count).map(|_| product_name(&mut ctx.rng)).collect();
        let prices: Vec<i64> = (0..count)
            .map(|_| ctx.rng.random_range(199..49_999))
            .collect();
        let chunks: Vec<&[String]> = skus.chunks(10).collect();
        let correlation_id = ctx.uuid();
        let tx = client.transaction().await?;
        tx.execute(
            &job,
            &[&id, &source, &(count as i32), &(chunks.len() as i64)],
        )
        .await?;
        tx.execute(&upsert, &[&skus, &names, &prices, &id]).await?;
        let events: Vec<Event> = chunks
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let chunk = i as i64 + 1;
                Event::new(
                    "load_job",
                    &id,
                    "BulkProductsLoaded",
                    json!({"job_id": id, "source": source, "chunk": chunk,
                           "chunks": chunks.len(), "skus": part, "version": chunk,
                           "occurred_at": now()}),
                    &correlation_id,
                    format!("load:{id}:chunk:{chunk}"),
                )
            })
            .collect();
        ctx.finish(tx, events).await?;
        ctx.pace().await;
    }
    Ok(())
}

const LOAD_SOURCES: &[&str] = &["erp-sync", "supplier-feed", "marketplace-import"];
