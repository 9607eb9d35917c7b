//! PgBouncer, the pooler users put in front of PostgreSQL: Debian's `pgbouncer` binary,
//! run as the `postgres` user (it refuses root) on a free port, in front of a test's
//! [`PgServer`], in the pool mode the test asks for.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::postgres::{chown_to_pg, pg_os_user, PgServer};
use super::process::{free_port, port_accepts, scratch_root, tail, Watchdog};

/// One PgBouncer process.
pub struct PgBouncer {
    pub port: u16,
    child: Child,
    _watchdog: Watchdog,
    log: PathBuf,
}

impl PgBouncer {
    /// Starts PgBouncer in `pool_mode` (`session` or `transaction`) in front of every
    /// database of `pg`, trusting every user, and waits until it accepts connections.
    /// The relay's `options` startup parameter is ignored, as a user must configure it
    /// (PgBouncer refuses parameters it does not know).
    pub fn start(pg: &PgServer, pool_mode: &str) -> PgBouncer {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = scratch_root().join(format!("pgbouncer-{}", N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&dir).unwrap();
        chown_to_pg(&dir);
        let port = free_port();
        let ini = dir.join("pgbouncer.ini");
        let users = dir.join("userlist.txt");
        let log = dir.join("pgbouncer.log");
        fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        fs::write(
            &ini,
            format!(
                "[databases]\n* = host=127.0.0.1 port={pg_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                 pool_mode = {pool_mode}\nmax_client_conn = 500\ndefault_pool_size = 50\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {log}\npidfile = {pid}\n",
                pg_port = pg.port,
                users = users.display(),
                log = log.display(),
                pid = dir.join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
        for f in [&ini, &users] {
            chown_to_pg(f);
        }
        let mut cmd = Command::new(pgbouncer_bin());
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = pg_os_user() {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("spawn pgbouncer");
        let watchdog = Watchdog::new(&format!("kill -KILL {} 2>/dev/null", child.id()));
        let end = Instant::now() + Duration::from_secs(30);
        while !port_accepts(port) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("pgbouncer exited ({status})\n{}", tail(&log, 20));
            }
            assert!(Instant::now() < end, "pgbouncer did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        PgBouncer {
            port,
            child,
            _watchdog: watchdog,
            log,
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`, through the pooler.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Its log, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_bin() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pgbouncer"))
}
