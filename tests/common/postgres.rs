//! A throwaway PostgreSQL cluster per test: [`PgServer`] copies a data directory made once
//! per test binary by `initdb`, starts it on a free port (127.0.0.1 only, trust auth for
//! `postgres`, fsync off) and removes it on drop, or by its watchdog if the test process
//! dies.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::process::{
    free_port, output_text, scratch_root, sh_quote, tail, Watchdog, START_DEADLINE,
};
use super::wait::eventually_blocking;

/// A plain (no TLS) client of `url`, its connection driven on a task of its own.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// Directory holding initdb/pg_ctl/postgres/psql: `$PG_BIN_DIR`, else the (symlink-resolved)
/// directory of `initdb` on PATH, else the newest `/usr/lib/postgresql/*/bin`.
fn pg_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("PG_BIN_DIR") {
            return PathBuf::from(d);
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let candidate = dir.join("initdb");
                if candidate.is_file() {
                    let real = fs::canonicalize(&candidate).unwrap_or(candidate);
                    return real.parent().unwrap().to_path_buf();
                }
            }
        }
        let mut dirs: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").is_file())
            .collect();
        dirs.sort_by_key(|p| {
            p.parent()
                .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                .unwrap_or(0)
        });
        dirs.pop()
            .expect("PostgreSQL not found: put initdb on PATH or set PG_BIN_DIR (see .ci/install-test-deps)")
    })
}

fn pg_tool(name: &str) -> PathBuf {
    let p = pg_bin_dir().join(name);
    if p.is_file() {
        p
    } else {
        PathBuf::from(name)
    }
}

/// `Some((uid, gid))` of the `postgres` system user when we run as root (initdb/postgres
/// refuse to run as root); `None` when we are an ordinary user and can run them directly.
pub(crate) fn pg_os_user() -> Option<(u32, u32)> {
    static IDS: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *IDS.get_or_init(|| {
        let me = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1);
        if me != 0 {
            return None;
        }
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let ids = passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4 && f[0] == "postgres" {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        });
        Some(
            ids.expect(
                "running as root but there is no `postgres` user (run .ci/install-test-deps)",
            ),
        )
    })
}

/// A command that runs as the postgres OS user (if we are root) in `cwd`.
fn pg_command(tool: &str, cwd: &Path) -> Command {
    let mut cmd = Command::new(pg_tool(tool));
    cmd.current_dir(cwd).stdin(Stdio::null());
    if let Some((uid, gid)) = pg_os_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

pub fn chown_to_pg(path: &Path) {
    if let Some((uid, gid)) = pg_os_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// initdb once per test binary; every PgServer copies this data dir.
fn pg_template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = scratch_root().join("pg-template");
        fs::create_dir_all(&dir).unwrap();
        chown_to_pg(&dir);
        let data = dir.join("data");
        let out = pg_command("initdb", &dir)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            // 1 MB WAL segments instead of 16: a smaller template is faster to copy.
            .args(["--no-sync", "--no-instructions", "--wal-segsize=1"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed\n{}", output_text(&out));
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        // The port is passed on the pg_ctl command line (-o "-p N"). fsync=off only
        // risks data on an OS crash; synchronous_commit stays ON on purpose, so a commit
        // that returned survives `kill()` (-m immediate) like on a real server.
        conf.write_all(
            b"\n# --- outbox-relay test harness ---\n\
              listen_addresses = '127.0.0.1'\n\
              unix_socket_directories = ''\n\
              max_connections = 200\n\
              shared_buffers = 32MB\n\
              fsync = off\n\
              full_page_writes = off\n\
              wal_level = logical\n\
              max_wal_senders = 10\n\
              max_replication_slots = 10\n\
              log_min_messages = warning\n\
              log_statement = 'none'\n",
        )
        .unwrap();
        data
    })
}

/// One throwaway PostgreSQL cluster. See the module docs.
pub struct PgServer {
    pub port: u16,
    /// `<scratch>/pg-N`, owned by postgres; holds `data/` and `server.log`.
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    _watchdog: Watchdog,
}

impl PgServer {
    /// Copies the template data dir, starts the server on a free port and waits (≤30s)
    /// until it accepts queries.
    pub fn start() -> PgServer {
        static N: AtomicU64 = AtomicU64::new(0);
        let template = pg_template();
        let dir = scratch_root().join(format!("pg-{}", N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&dir).unwrap();
        chown_to_pg(&dir);
        let data = dir.join("data");
        let out = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&data)
            .output()
            .expect("run cp");
        assert!(
            out.status.success(),
            "cp -a template failed\n{}",
            output_text(&out)
        );
        // Armed before the first start: on test-process death, immediate-stop whatever
        // postmaster runs in `data` (read at trigger time, so restarts are covered) and
        // delete the directory.
        let watchdog = Watchdog::new(&format!(
            "pid=$(head -n1 {pidfile} 2>/dev/null); \
             if [ -n \"$pid\" ] && kill -QUIT \"$pid\" 2>/dev/null; then \
               i=0; while [ $i -lt 100 ] && [ -d /proc/$pid ] && \
                 ! grep -q '^State:[[:space:]]*Z' /proc/$pid/status 2>/dev/null; \
               do sleep 0.1; i=$((i+1)); done; \
               kill -KILL \"$pid\" 2>/dev/null; \
             fi; rm -rf {dir}",
            pidfile = sh_quote(&data.join("postmaster.pid")),
            dir = sh_quote(&dir),
        ));
        let log = dir.join("server.log");
        let mut server = PgServer {
            port: 0,
            dir,
            data,
            log,
            _watchdog: watchdog,
        };
        let mut attempt = 0;
        loop {
            server.port = free_port();
            match server.try_start() {
                Ok(()) => break,
                Err(msg) if attempt < 5 && msg.contains("Address already in use") => {
                    attempt += 1;
                }
                Err(msg) => panic!("PgServer::start failed: {msg}"),
            }
        }
        server.wait_ready();
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The cluster's data directory (removed on drop).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Server log (stderr of postgres), handy in assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Where the server log ends now, for [`PgServer::log_since`].
    pub fn log_mark(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// What the server logged after `mark`.
    pub fn log_since(&self, mark: u64) -> String {
        let bytes = fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(mark as usize..).unwrap_or_default()).into_owned()
    }

    /// Logs every statement (and every connection) from now on, to count what the
    /// relay asks of the server: `statements_in` reads them back.
    pub fn log_statements(&self) {
        self.psql(
            "postgres",
            "ALTER SYSTEM SET log_statement = 'all'; ALTER SYSTEM SET log_connections = on; \
             SELECT pg_reload_conf()",
        );
    }

    /// `CREATE DATABASE "name"`.
    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        );
    }

    /// Runs `sql` (any number of `;`-separated statements, each in autocommit mode) with
    /// `psql -X -tAq -v ON_ERROR_STOP=1`, returns stdout without trailing newlines (so a
    /// single value compares directly: `assert_eq!(pg.psql(db, "select 1"), "1")`; rows are
    /// `\n`-separated, columns `|`-separated). Panics with stderr if any statement fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut child = Command::new(pg_tool("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-f",
                "-",
            ])
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGAPPNAME", "test-harness")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        let mut stdin = child.stdin.take().unwrap();
        let sql_owned = sql.to_owned();
        // Write from a thread so large input and large output cannot deadlock.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(sql_owned.as_bytes());
        });
        let out = child.wait_with_output().expect("wait for psql");
        let _ = writer.join();
        if !out.status.success() {
            panic!(
                "psql on 127.0.0.1:{}/{db} failed ({}):\n--- sql ---\n{sql}\n--- stderr ---\n{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches(['\n', '\r'])
            .to_string()
    }

    /// `pg_ctl stop -m fast`; keeps the data dir. No-op if the server is not running.
    pub fn stop(&self) {
        self.pg_ctl_stop("fast")
            .unwrap_or_else(|e| panic!("PgServer::stop: {e}"));
    }

    /// `pg_ctl stop -m immediate` (crash-like; the next start runs recovery).
    pub fn kill(&self) {
        self.pg_ctl_stop("immediate")
            .unwrap_or_else(|e| panic!("PgServer::kill: {e}"));
    }

    /// Starts the server again on the same port and data dir and waits until it is ready.
    /// If it is still running it is stopped (`-m fast`) first.
    pub fn restart(&self) {
        self.stop();
        // The port was ours a moment ago; be patient if the kernel still holds it.
        let end = Instant::now() + START_DEADLINE;
        loop {
            match self.try_start() {
                Ok(()) => break,
                Err(msg) if Instant::now() < end && msg.contains("Address already in use") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(msg) => panic!("PgServer::restart failed: {msg}"),
            }
        }
        self.wait_ready();
    }

    /// Whether a postmaster is running on this data dir.
    pub fn is_running(&self) -> bool {
        pg_command("pg_ctl", &self.dir)
            .arg("status")
            .arg("-D")
            .arg(&self.data)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn try_start(&self) -> Result<(), String> {
        let out = pg_command("pg_ctl", &self.dir)
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", &START_DEADLINE.as_secs().to_string()])
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .output()
            .map_err(|e| format!("spawn pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start (port {}) failed\n{}\n--- server.log ---\n{}",
                self.port,
                output_text(&out),
                tail(&self.log, 30)
            ))
        }
    }

    fn wait_ready(&self) {
        let what = format!("PostgreSQL on port {} ready", self.port);
        eventually_blocking(&what, START_DEADLINE, || {
            let ok = Command::new(pg_tool("psql"))
                .args([
                    "-X",
                    "-tAq",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                ])
                .args(["-U", "postgres", "-d", "postgres", "-c", "select 1"])
                .env("PGCONNECT_TIMEOUT", "2")
                .stdin(Stdio::null())
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                Ok(())
            } else {
                Err(format!("--- server.log ---\n{}", tail(&self.log, 30)))
            }
        });
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), String> {
        if !self.data.join("postmaster.pid").exists() {
            return Ok(());
        }
        let out = pg_command("pg_ctl", &self.dir)
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "30"])
            .output()
            .map_err(|e| format!("spawn pg_ctl: {e}"))?;
        if out.status.success() || !self.is_running() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl stop -m {mode} failed\n{}",
                output_text(&out)
            ))
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(e) = self.pg_ctl_stop("immediate") {
            eprintln!("PgServer drop: {e}");
        }
        let _ = fs::remove_dir_all(&self.dir);
        // `_watchdog` is dropped (disarmed) after this.
    }
}
