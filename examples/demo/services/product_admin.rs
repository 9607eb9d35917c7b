//! product-admin: a CSV file ingested in several transactions, all its events sharing the
//! file's correlation_id and keyed by the ingestion id: CsvIngestionStarted, a
//! CsvRowImported per row (25 rows per transaction), CsvIngestionCompleted. A rolled-back
//! step is retried, as the service would.

use anyhow::Result;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{now, product_name, Aggregates, Ctx, Event};

/// The domain tables, in database `catalog`.
pub const TABLES: &str = "
    CREATE TABLE product_admin.csv_ingestions (
        id            text PRIMARY KEY,
        file_name     text NOT NULL,
        rows_total    integer NOT NULL,
        rows_imported integer NOT NULL DEFAULT 0,
        status        text NOT NULL,
        version       bigint NOT NULL,
        started_at    timestamptz NOT NULL DEFAULT now(),
        completed_at  timestamptz);
    CREATE TABLE product_admin.imported_rows (
        ingestion_id  text NOT NULL REFERENCES product_admin.csv_ingestions (id),
        line          integer NOT NULL,
        sku           text NOT NULL,
        name          text NOT NULL,
        price_cents   bigint NOT NULL,
        PRIMARY KEY (ingestion_id, line));";

/// Ingests CSV files until the writer is cancelled.
pub async fn run(client: &mut Client, ctx: &mut Ctx, files: &Aggregates) -> Result<()> {
    let start = client
        .prepare(
            "INSERT INTO product_admin.csv_ingestions (id, file_name, rows_total, status, version) \
             VALUES ($1, $2, $3, 'running', 1)",
        )
        .await?;
    let import = client
        .prepare(
            "UPDATE product_admin.csv_ingestions SET rows_imported = rows_imported + $2, \
             version = version + $2 WHERE id = $1 RETURNING version",
        )
        .await?;
    let rows = client
        .prepare(
            "INSERT INTO product_admin.imported_rows (ingestion_id, line, sku, name, price_cents) \
             SELECT $1::text, r.* FROM unnest($2::int[], $3::text[], $4::text[], $5::bigint[]) AS r",
        )
        .await?;
    let complete = client
        .prepare(
            "UPDATE product_admin.csv_ingestions SET status = 'completed', completed_at = now(), \
             version = version + 1 WHERE id = $1 RETURNING version, rows_imported",
        )
        .await?;
    'files: while !ctx.cancel.is_cancelled() {
        let id = files.new_id("ing");
        let supplier = *SUPPLIERS.choose(&mut ctx.rng).unwrap_or(&"acme");
        let file = format!("{supplier}-catalog-{id}.csv");
        let total: i32 = ctx.rng.random_range(20..150);
        let correlation_id = ctx.uuid();
        let event = |event_type, payload: Value, token: String| {
            Event::new(
                "csv_ingestion",
                &id,
                event_type,
                payload,
                &correlation_id,
                token,
            )
        };

        let mut attempts = 0;
        loop {
            let tx = client.transaction().await?;
            tx.execute(&start, &[&id, &file, &total]).await?;
            let e = event(
                "CsvIngestionStarted",
                json!({"ingestion_id": id, "file_name": file, "rows_total": total,
                       "uploaded_by": "catalog-admin", "version": 1, "occurred_at": now()}),
                format!("csv:{id}:started"),
            );
            if ctx.finish(tx, vec![e]).await? {
                break;
            }
            attempts += 1;
            if attempts >= 5 || ctx.cancel.is_cancelled() {
                continue 'files;
            }
        }
        ctx.pace().await;

        let lines: Vec<i32> = (2..total + 2).collect(); // line 1 is the header
        for chunk in lines.chunks(25) {
            let skus: Vec<String> = chunk
                .iter()
                .map(|l| format!("{}-{id}-{l:03}", supplier.to_uppercase()))
                .collect();
            let names: Vec<String> = chunk.iter().map(|_| product_name(&mut ctx.rng)).collect();
            let prices: Vec<i64> = chunk
                .iter()
                .map(|_| ctx.rng.random_range(199..49_999))
                .collect();
            let n = chunk.len() as i32;
            loop {
                if ctx.cancel.is_cancelled() {
                    return Ok(());
                }
                let tx = client.transaction().await?;
                let last: i64 = tx.query_one(&import, &[&id, &n]).await?.get(0);
                tx.execute(&rows, &[&id, &chunk, &skus, &names, &prices])
                    .await?;
                let first = last - i64::from(n) + 1;
                let events: Vec<Event> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, line)| {
                        event(
                            "CsvRowImported",
                            json!({"ingestion_id": id, "line": line, "sku": skus[i],
                                   "name": names[i], "price_cents": prices[i],
                                   "version": first + i as i64}),
                            format!("csv:{id}:line:{line}"),
                        )
                    })
                    .collect();
                let committed = ctx.finish(tx, events).await?;
                ctx.pace().await;
                if committed {
                    break;
                }
            }
        }

        loop {
            if ctx.cancel.is_cancelled() {
                return Ok(());
            }
            let tx = client.transaction().await?;
            let row = tx.query_one(&complete, &[&id]).await?;
            let (v, imported): (i64, i32) = (row.get(0), row.get(1));
            let e = event(
                "CsvIngestionCompleted",
                json!({"ingestion_id": id, "file_name": file, "rows_imported": imported,
                       "version": v, "occurred_at": now()}),
                format!("csv:{id}:completed"),
            );
            let committed = ctx.finish(tx, vec![e]).await?;
            ctx.pace().await;
            if committed {
                break;
            }
        }
    }
    Ok(())
}

const SUPPLIERS: &[&str] = &["acme", "globex", "initech", "umbrella", "hooli"];
