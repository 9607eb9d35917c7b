//! PostgreSQL connection settings: URLs with libpq's `sslmode`s, TLS, pools and
//! dedicated connections; [`DbError`] for what goes wrong.

mod conninfo;
mod error;

use conninfo::ConnInfo;

pub use error::{DbError, DbErrorKind};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime};
use native_tls::{Certificate, TlsConnector};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

/// How the server's certificate is checked, as libpq's `sslmode` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// `disable`, `prefer`, `require`: encrypt if asked, trust any certificate
    /// (unless `sslrootcert` is given, when `require` acts as `verify-ca`, as libpq does).
    None,
    /// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
    Ca,
    /// `verify-full`: chain and host name are checked.
    Full,
}

/// A parsed database URL. Its `Debug`, `Display` and `Serialize` never show the password.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    verify: Verify,
    root_cert: Option<String>,
    redacted: String,
    /// Built once for every connection to this database: see [`Tls`].
    tls: Arc<Mutex<Option<TlsConnector>>>,
}

impl DatabaseUrl {
    /// Parses a `postgres://` URL or a `key=value` connection string, accepting libpq's
    /// `sslmode=verify-ca|verify-full` and `sslrootcert=PATH` besides what tokio-postgres knows.
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        let mut info = ConnInfo::parse(url)?;
        let redacted = info.redacted();
        let root_cert = info.take("sslrootcert");
        let mut verify = match info.get("sslmode") {
            Some("verify-full") => Verify::Full,
            Some("verify-ca") => Verify::Ca,
            _ => Verify::None,
        };
        if verify != Verify::None {
            info.set("sslmode", "require");
        } else if info.get("sslmode") == Some("require") && root_cert.is_some() {
            verify = Verify::Ca;
        }
        // tokio-postgres parses the values found above, quoted: it reads the same
        // password, and its errors name the bad key, never a value.
        let mut config: tokio_postgres::Config = info
            .to_pairs()
            .parse()
            .map_err(|e| format!("not a PostgreSQL connection string: {e}"))?;
        if config.get_hosts().is_empty() {
            return Err("names no host".into());
        }
        if config.get_application_name().is_none() {
            config.application_name("outbox-relay");
        }
        // Notice a dead peer (a failed-over primary, a partition) in seconds, not hours.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        // And give up on a peer that leaves what the relay sent unacknowledged for 20 s
        // (keepalives only probe an idle connection).
        config.tcp_user_timeout(Duration::from_secs(20));
        Ok(DatabaseUrl {
            config,
            verify,
            root_cert,
            redacted,
            tls: Arc::default(),
        })
    }

    /// `host:port/dbname`: which database this is, for grouping sources into pools.
    pub fn identity(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("");
        let db = self.config.get_dbname().unwrap_or(user);
        format!("{host}:{port}/{db}")
    }

    /// Everything that makes two URLs' connections interchangeable: hosts (and their
    /// addresses), ports, target session attributes, channel binding, load balancing,
    /// connect timeout, database, user, TLS mode and certificates, server options. The
    /// password is not part of it: one role's sources share a pool. Sources whose URLs
    /// share it share one pool and one coordination connection; sources of one database
    /// under two roles get one each, so each works as its own role.
    pub fn pool_key(&self) -> String {
        let c = &self.config;
        format!(
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            c.get_hosts(),
            c.get_hostaddrs(),
            c.get_ports(),
            c.get_target_session_attrs(),
            c.get_channel_binding(),
            c.get_load_balance_hosts(),
            c.get_connect_timeout(),
            c.get_dbname(),
            c.get_user(),
            c.get_ssl_mode(),
            self.verify,
            self.root_cert,
            c.get_options(),
            c.get_application_name(),
        )
    }

    /// The user this URL connects as (the server's default, the OS user, when unset).
    pub fn user(&self) -> Option<&str> {
        self.config.get_user()
    }

    /// The connection settings, with a connect timeout.
    pub fn config(&self, connect_timeout: Duration) -> tokio_postgres::Config {
        let mut c = self.config.clone();
        if c.get_connect_timeout().is_none() {
            c.connect_timeout(connect_timeout);
        }
        // Every relay statement touches a batch of rows by id, in a queue table that is
        // often nearly empty and full of dead tuples. A plan cached while the table looked
        // small (a new table is never analyzed) was a sequential scan, and each claim and
        // delete then read every dead tuple until autovacuum came: 0.4 ms per 1-3 row
        // delete instead of 0.04. With sequential scans priced out, the relay's
        // statements always go by the primary key.
        //
        // And no JIT: a plan that must still scan a table sequentially is priced at
        // enable_seqscan's penalty (10^10), far above jit_above_cost, and was compiled
        // on every execution: 1.1 s instead of 0.25 ms for a look at 32 empty outboxes.
        // No relay statement runs long enough for JIT to pay.
        //
        // And one plan per prepared statement: PostgreSQL plans a statement's first five
        // executions afresh (custom plans) before it settles on a generic one, and a
        // quiet source's statements rarely get past five on a connection. With 100
        // tenants written at 250 events/s, planning their claims took 1.8 s of the
        // server's CPU against 0.3 s of executing them (scale bench); forced generic,
        // planning per claim halved (0.13 -> 0.06 ms). Every relay statement goes by the
        // primary key whatever its parameters, so the generic plan is the plan.
        add_options(
            &mut c,
            "-c enable_seqscan=off -c jit=off -c plan_cache_mode=force_generic_plan",
        );
        c
    }

    /// The TLS connector this URL's `sslmode` asks for. With a root certificate or a
    /// `verify-*` mode it is built now, so a bad certificate file fails at start; under
    /// `prefer` and `require` it is built at the first handshake a server accepts.
    pub fn tls(&self) -> Result<Tls, String> {
        let tls = Tls { url: self.clone() };
        if self.root_cert.is_some() || self.verify != Verify::None {
            tls.connector()?;
        }
        Ok(tls)
    }

    /// Builds the connector: the system's CA bundle, plus `sslrootcert`.
    fn build_tls(&self) -> Result<TlsConnector, String> {
        let mut b = TlsConnector::builder();
        if let Some(path) = &self.root_cert {
            let pem = std::fs::read(path).map_err(|e| format!("sslrootcert {path}: {e}"))?;
            let cert =
                Certificate::from_pem(&pem).map_err(|e| format!("sslrootcert {path}: {e}"))?;
            b.add_root_certificate(cert);
        }
        match self.verify {
            Verify::None => {
                b.danger_accept_invalid_certs(true);
                b.danger_accept_invalid_hostnames(true);
            }
            Verify::Ca => {
                b.danger_accept_invalid_hostnames(true);
            }
            Verify::Full => {}
        }
        b.build().map_err(|e| format!("TLS setup: {e}"))
    }

    /// Whether the URL asks for TLS at all.
    pub fn uses_tls(&self) -> bool {
        self.config.get_ssl_mode() != SslMode::Disable
    }

    /// Opens one dedicated connection (not pooled), spawning its driver task.
    /// The returned receiver yields the connection's notifications and closes when it dies.
    pub async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio::sync::mpsc::UnboundedReceiver<Notice>,
        ),
        DbError,
    > {
        use futures::StreamExt;
        let what = || format!("connect to {}", self.redacted);
        let tls = self.tls().map_err(|e| DbError::other(what(), e))?;
        let mut cfg = self.config(timeout);
        // This connection holds the sources' advisory locks. Ask the server to probe it,
        // so that if the relay's node vanishes the locks are freed in seconds, not after
        // the kernel's two-hour default: keepalives while it is idle, and a 20 s limit on
        // unacknowledged data (notifications) while it is not.
        add_options(
            &mut cfg,
            "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 \
             -c tcp_user_timeout=20000",
        );
        let (client, mut connection) = tokio::time::timeout(timeout, cfg.connect(tls))
            .await
            .map_err(|_| DbError::timed_out(what(), timeout))?
            .map_err(|e| DbError::pg(what(), &e))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send(Notice::Notify(n.payload().to_string())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Notice::Closed(e.to_string()));
                        return;
                    }
                }
            }
            let _ = tx.send(Notice::Closed("connection closed".into()));
        });
        Ok((client, rx))
    }

    /// A pool of `size` connections to this database; every wait is bounded by `timeout`.
    pub fn pool(&self, size: usize, timeout: Duration) -> Result<Pool, String> {
        let mgr = Manager::from_config(
            self.config(timeout),
            self.tls()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // The connection returned last is handed out first: at light load one or two
        // connections do the work, and the others stay unopened or cold. Each server
        // process keeps what it learned of every table it touched (about 55 KB of
        // catalog caches per source), so spreading a light load over every connection
        // would make each of them pay for every source. Waiters are still served first
        // come, first served.
        Pool::builder(mgr)
            .max_size(size)
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| format!("pool for {}: {e}", self.redacted))
    }
}

/// What a dedicated connection's driver reports.
#[derive(Debug, Clone)]
pub enum Notice {
    /// A `NOTIFY` payload.
    Notify(String),
    /// The connection ended, with why.
    Closed(String),
    /// The source is asked to hand its lock over: another replica joined, and this one
    /// leads more than its share.
    HandOver,
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted)
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted)
    }
}

/// The connection string with every secret replaced, for logs and `check-config`:
/// built from its parsed values, whatever the spelling.
pub fn redact(url: &str) -> String {
    ConnInfo::parse(url)
        .map(|i| i.redacted())
        .unwrap_or_else(|_| "[a connection string that does not parse]".into())
}

/// Adds server settings to the `options` the URL carries. The URL's own come last, so
/// they win where both set one: an operator can still override the relay.
fn add_options(cfg: &mut tokio_postgres::Config, extra: &str) {
    let options = match cfg.get_options() {
        Some(o) if !o.is_empty() => format!("{extra} {o}"),
        _ => extra.to_string(),
    };
    cfg.options(&options);
}

/// The TLS side of one database's connections. Building a connector loads the
/// system's CA bundle, tens of milliseconds of CPU: it is built once per database URL
/// and shared by the pool and the lock connection, and only when a server accepts TLS,
/// so a `prefer` connection to a server without TLS never pays for it.
#[derive(Clone)]
pub struct Tls {
    url: DatabaseUrl,
}

impl Tls {
    /// The connector, built on first use.
    fn connector(&self) -> Result<TlsConnector, String> {
        let mut built = self.url.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = built.as_ref() {
            return Ok(c.clone());
        }
        let c = self.url.build_tls()?;
        *built = Some(c.clone());
        Ok(c)
    }
}

impl<S> MakeTlsConnect<S> for Tls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = postgres_native_tls::TlsStream<S>;
    type TlsConnect = Handshake;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Handshake, Self::Error> {
        Ok(Handshake {
            tls: self.clone(),
            domain: domain.to_string(),
        })
    }
}

/// One connection's TLS handshake, run only if the server accepts TLS.
pub struct Handshake {
    tls: Tls,
    domain: String,
}

type HandshakeFuture<S> = Pin<
    Box<
        dyn Future<
                Output = Result<
                    postgres_native_tls::TlsStream<S>,
                    Box<dyn std::error::Error + Send + Sync>,
                >,
            > + Send,
    >,
>;

impl<S> TlsConnect<S> for Handshake
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = postgres_native_tls::TlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = HandshakeFuture<S>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = self.tls.connector()?;
            let handshake = postgres_native_tls::TlsConnector::new(connector, &self.domain);
            Ok(handshake.connect(stream).await?)
        })
    }
}

/// An error with its causes, `outer: inner: root`, so a TLS or network failure says why.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

/// Quotes a validated identifier for SQL.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("postgres://relay:s3cret@db:5432/app?sslmode=require"),
            "postgres://relay:[redacted]@db:5432/app?sslmode=require"
        );
        assert_eq!(
            redact("postgres://relay@db/app?password=s3cret&sslmode=disable"),
            "postgres://relay@db/app?password=[redacted]&sslmode=disable"
        );
        assert_eq!(
            redact("host=db user=relay password=s3cret"),
            "host=db user=relay password=[redacted]"
        );
        let u = DatabaseUrl::parse("postgres://relay:s3cret@db:5432/app").unwrap();
        assert!(!format!("{u} {u:?}").contains("s3cret"));
    }

    #[test]
    fn libpq_sslmodes_are_understood() {
        let u = DatabaseUrl::parse("postgres://u@h/db?sslmode=verify-full").unwrap();
        assert_eq!(u.verify, Verify::Full);
        assert!(u.uses_tls());
        let u =
            DatabaseUrl::parse("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/ca.pem").unwrap();
        assert_eq!(u.verify, Verify::Ca);
        assert_eq!(u.root_cert.as_deref(), Some("/ca.pem"));
        let u = DatabaseUrl::parse("host=h user=u sslmode=require").unwrap();
        assert_eq!(u.verify, Verify::None);
        assert!(u.uses_tls());
        let u = DatabaseUrl::parse("postgres://u@h/db?sslmode=disable").unwrap();
        assert!(!u.uses_tls());
        assert!(DatabaseUrl::parse("postgres://u@h/db?sslmode=bogus").is_err());
        assert_eq!(
            DatabaseUrl::parse("postgres://u@h:6432/db")
                .unwrap()
                .identity(),
            "h:6432/db"
        );
    }

    #[test]
    fn a_missing_root_certificate_fails_before_any_connection() {
        let u = DatabaseUrl::parse(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .unwrap();
        let Err(err) = u.pool(2, Duration::from_secs(1)) else {
            panic!("a pool with a missing sslrootcert");
        };
        assert!(err.contains("sslrootcert /nonexistent/ca.pem"), "{err}");
        let Err(err) = u.tls() else {
            panic!("a connector with a missing sslrootcert");
        };
        assert!(err.contains("sslrootcert /nonexistent/ca.pem"), "{err}");
    }
}
