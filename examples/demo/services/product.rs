//! The product service: ProductCreated, ProductUpdated, PriceChanged, StockAdjusted (alone,
//! or with PriceChanged in one transaction: a promotion), ProductDeleted, keyed by SKU.

use anyhow::Result;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{now, product_name, Aggregates, Ctx, Event};

/// The domain table, in database `platform`.
pub const TABLES: &str = "
    CREATE TABLE product.products (
        sku         text PRIMARY KEY,
        name        text NOT NULL,
        category    text NOT NULL,
        price_cents bigint NOT NULL,
        stock       integer NOT NULL,
        version     bigint NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now());";

/// Writes product transactions until the writer is cancelled.
pub async fn run(client: &mut Client, ctx: &mut Ctx, products: &Aggregates) -> Result<()> {
    let insert = client
        .prepare(
            "INSERT INTO product.products (sku, name, category, price_cents, stock, version) \
             VALUES ($1, $2, $3, $4, $5, 1)",
        )
        .await?;
    let rename = client
        .prepare(
            "UPDATE product.products SET name = $2, category = $3, version = version + 1, \
             updated_at = now() WHERE sku = $1 RETURNING version",
        )
        .await?;
    let reprice = client
        .prepare(
            "UPDATE product.products SET price_cents = $2, version = version + 1, \
             updated_at = now() WHERE sku = $1 RETURNING version",
        )
        .await?;
    let restock = client
        .prepare(
            "UPDATE product.products SET stock = greatest(stock + $2, 0), \
             version = version + 1, updated_at = now() WHERE sku = $1 RETURNING version, stock",
        )
        .await?;
    let reprice_restock = client
        .prepare(
            "UPDATE product.products SET price_cents = $2, stock = greatest(stock + $3, 0), \
             version = version + 2, updated_at = now() WHERE sku = $1 RETURNING version, stock",
        )
        .await?;
    let delete = client
        .prepare("DELETE FROM product.products WHERE sku = $1 RETURNING version")
        .await?;
    while !ctx.cancel.is_cancelled() {
        let live = products.len();
        let dice = ctx.rng.random_range(0..100);
        let correlation_id = ctx.uuid();
        let event = |sku: &str, event_type, payload: Value, version: i64| {
            Event::new(
                "product",
                sku,
                event_type,
                payload,
                &correlation_id,
                format!("product:{sku}:v{version}"),
            )
        };
        if live < 30 || dice < 20 {
            let sku = products.new_id("SKU");
            let name = product_name(&mut ctx.rng);
            let category = *CATEGORIES.choose(&mut ctx.rng).unwrap_or(&"home");
            let price: i64 = ctx.rng.random_range(199..49_999);
            let stock: i32 = ctx.rng.random_range(0..500);
            let tx = client.transaction().await?;
            tx.execute(&insert, &[&sku, &name, &category, &price, &stock])
                .await?;
            let e = event(
                &sku,
                "ProductCreated",
                json!({"sku": sku, "name": name, "category": category, "price_cents": price,
                       "currency": "EUR", "stock": stock, "version": 1, "occurred_at": now()}),
                1,
            );
            if ctx.finish(tx, vec![e]).await? {
                products.add(sku);
            }
        } else if dice < 93 || live < 150 {
            let Some(sku) = products.pick(&mut ctx.rng) else {
                continue;
            };
            let tx = client.transaction().await?;
            let events = if dice < 35 {
                let name = product_name(&mut ctx.rng);
                let category = *CATEGORIES.choose(&mut ctx.rng).unwrap_or(&"home");
                tx.query_opt(&rename, &[&sku, &name, &category])
                    .await?
                    .map(|row| {
                        let v: i64 = row.get(0);
                        vec![event(
                            &sku,
                            "ProductUpdated",
                            json!({"sku": sku, "name": name, "category": category,
                                   "version": v, "occurred_at": now()}),
                            v,
                        )]
                    })
            } else if dice < 55 {
                let price: i64 = ctx.rng.random_range(199..49_999);
                tx.query_opt(&reprice, &[&sku, &price]).await?.map(|row| {
                    let v: i64 = row.get(0);
                    vec![event(
                        &sku,
                        "PriceChanged",
                        json!({"sku": sku, "price_cents": price, "currency": "EUR",
                               "version": v, "occurred_at": now()}),
                        v,
                    )]
                })
            } else if dice < 80 {
                let delta: i32 = ctx.rng.random_range(-20..50);
                tx.query_opt(&restock, &[&sku, &delta]).await?.map(|row| {
                    let (v, stock): (i64, i32) = (row.get(0), row.get(1));
                    vec![event(
                        &sku,
                        "StockAdjusted",
                        json!({"sku": sku, "delta": delta, "stock": stock,
                               "version": v, "occurred_at": now()}),
                        v,
                    )]
                })
            } else {
                // A promotion: new price and a restock, two events in one transaction.
                let price: i64 = ctx.rng.random_range(199..49_999);
                let delta: i32 = ctx.rng.random_range(10..100);
                tx.query_opt(&reprice_restock, &[&sku, &price, &delta])
                    .await?
                    .map(|row| {
                        let (v, stock): (i64, i32) = (row.get(0), row.get(1));
                        vec![
                            event(
                                &sku,
                                "PriceChanged",
                                json!({"sku": sku, "price_cents": price, "currency": "EUR",
                                       "reason": "promotion", "version": v - 1,
                                       "occurred_at": now()}),
                                v - 1,
                            ),
                            event(
                                &sku,
                                "StockAdjusted",
                                json!({"sku": sku, "delta": delta, "stock": stock,
                                       "reason": "promotion", "version": v,
                                       "occurred_at": now()}),
                                v,
                            ),
                        ]
                    })
            };
            match events {
                Some(events) => {
                    ctx.finish(tx, events).await?;
                }
                None => tx.rollback().await?, // deleted meanwhile
            }
        } else {
            let Some(sku) = products.take(&mut ctx.rng) else {
                continue;
            };
            let tx = client.transaction().await?;
            let Some(row) = tx.query_opt(&delete, &[&sku]).await? else {
                tx.rollback().await?;
                continue;
            };
            let v = row.get::<_, i64>(0) + 1;
            let e = event(
                &sku,
                "ProductDeleted",
                json!({"sku": sku, "version": v, "occurred_at": now()}),
                v,
            );
            if !ctx.finish(tx, vec![e]).await? {
                products.add(sku);
            }
        }
        ctx.pace().await;
    }
    Ok(())
}

const CATEGORIES: &[&str] = &["kitchen", "garden", "office", "outdoor", "home", "toys"];
