//! Connections that watch the outbox and dead-letter tables, for the drain and the
//! summary.

use anyhow::Result;
use tokio_postgres::Client;

use crate::postgres::Postgres;
use crate::services::connect;
use crate::SERVICES;

/// One connection per service.
pub struct Observers {
    clients: Vec<Client>,
}

impl Observers {
    /// One connection per service (four connections; simpler than sharing).
    pub async fn connect(pg: &Postgres) -> Result<Observers> {
        let mut clients = Vec::new();
        for s in SERVICES {
            clients.push(connect(&pg.url(s.database())).await?);
        }
        Ok(Observers { clients })
    }

    /// Rows in each service's outbox.
    pub async fn pending(&self) -> Result<[i64; 4]> {
        self.count("outbox").await
    }

    /// Rows in each service's dead-letter table.
    pub async fn dead_lettered(&self) -> Result<[i64; 4]> {
        self.count("outbox_dead_letter").await
    }

    async fn count(&self, table: &str) -> Result<[i64; 4]> {
        let mut out = [0; 4];
        for (s, client) in SERVICES.iter().zip(&self.clients) {
            let sql = format!("SELECT count(*) FROM {}.{table}", s.schema());
            out[s.index()] = client.query_one(&sql, &[]).await?.get(0);
        }
        Ok(out)
    }
}
