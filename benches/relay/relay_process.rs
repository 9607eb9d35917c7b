//! The relay under test: the release binary (`CARGO_BIN_EXE_outbox-relay`, built by
//! `cargo bench`) run as a child process with a config derived from the shipped
//! config/default.toml, and what /proc and /metrics say about it.

use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The relay binary `cargo bench` built with the bench (release) profile.
pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

/// Top-level keys a run overrides in the shipped configuration, and the binary it runs.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub batch_size: Option<i64>,
    /// The largest claim; the throughput lanes pin it to their batch, so the relay
    /// claims what the SQL-only limit it is set against claims.
    pub max_batch_size: Option<i64>,
    pub delete_batch_size: Option<i64>,
    pub process_interval: Option<&'static str>,
    /// Another relay binary than the one `cargo bench` built (BENCH_RELAY_BIN_B).
    pub binary: Option<PathBuf>,
}

/// The shipped config/default.toml, read at run time.
pub fn shipped_config() -> toml::Table {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// A shipped top-level integer (e.g. `batch_size`).
pub fn shipped_int(key: &str) -> Option<i64> {
    shipped_config().get(key)?.as_integer()
}

/// config/default.toml with its sources replaced by one bench source, the bench's
/// broker and HTTP port, JSON logs, and `o`'s overrides.
pub fn config_toml(
    o: &Overrides,
    source: &str,
    schema: &str,
    topic: &str,
    database_url: &str,
    brokers: &str,
    http_port: u16,
) -> String {
    use toml::Value;
    let mut t = shipped_config();
    t.remove("sources");
    if let Some(v) = o.batch_size {
        t.insert("batch_size".into(), Value::Integer(v));
    }
    if let Some(v) = o.delete_batch_size {
        t.insert("delete_batch_size".into(), Value::Integer(v));
    }
    if let Some(v) = o.max_batch_size {
        t.insert("max_batch_size".into(), Value::Integer(v));
    }
    if let Some(v) = o.process_interval {
        t.insert("process_interval".into(), Value::String(v.into()));
    }
    let table = |t: &mut toml::Table, k: &str| -> toml::Table {
        match t.remove(k) {
            Some(Value::Table(x)) => x,
            _ => toml::Table::new(),
        }
    };
    let mut kafka = table(&mut t, "kafka");
    kafka.insert("brokers".into(), Value::String(brokers.into()));
    t.insert("kafka".into(), Value::Table(kafka));
    let mut http = table(&mut t, "http");
    http.insert(
        "listen".into(),
        Value::String(format!("127.0.0.1:{http_port}")),
    );
    t.insert("http".into(), Value::Table(http));
    let mut log = table(&mut t, "log");
    log.insert("format".into(), Value::String("json".into()));
    t.insert("log".into(), Value::Table(log));
    let mut s = toml::Table::new();
    s.insert("name".into(), Value::String(source.into()));
    s.insert("schema".into(), Value::String(schema.into()));
    s.insert("topic".into(), Value::String(topic.into()));
    s.insert("database_url".into(), Value::String(database_url.into()));
    t.insert("sources".into(), Value::Array(vec![Value::Table(s)]));
    toml::to_string(&t).expect("serialize bench config")
}

/// The caller's OUTBOX_* variables the relay processes get: none, unless
/// BENCH_RELAY_ENV=1 asks for them (tuning runs, e.g. OUTBOX_KAFKA__PROPERTIES__LINGER_MS).
pub fn passed_relay_env() -> Vec<(String, String)> {
    if !std::env::var("BENCH_RELAY_ENV").is_ok_and(|v| v == "1") {
        return Vec::new();
    }
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("OUTBOX_"))
        .collect();
    vars.sort();
    vars
}

/// A relay command with the bench's config and none of the caller's OUTBOX_* variables
/// but those [`passed_relay_env`] passes.
fn relay_command(config: &Path, binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("--config").arg(config).stdin(Stdio::null());
    let passed = passed_relay_env();
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("OUTBOX_") && !passed.iter().any(|(p, _)| *p == k)) || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// `outbox-relay --config PATH migrate`, within 60 s.
pub fn migrate(config: &Path, log: &Path) {
    migrate_within(config, log, Duration::from_secs(60));
}

/// `outbox-relay --config PATH migrate`, within `limit`.
pub fn migrate_within(config: &Path, log: &Path, limit: Duration) {
    let out = std::fs::File::create(log).expect("create migrate log");
    let mut child = relay_command(config, &relay_bin())
        .arg("migrate")
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out)
        .spawn()
        .expect("spawn outbox-relay migrate");
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for migrate") {
            assert!(
                status.success(),
                "outbox-relay migrate failed ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("outbox-relay migrate did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running relay; killed on drop. A watchdog `sh` kills it too if the bench dies.
pub struct RelayProcess {
    child: Child,
    watchdog: Child,
    pub started: Instant,
    http_port: u16,
    log: PathBuf,
}

/// What /proc says about a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// Peak resident set (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// User + system CPU time.
    pub cpu: Duration,
}

pub fn clock_ticks() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// VmHWM and utime+stime of `pid`.
pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces:
    // state is field 3, utime 14, stime 15.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .unwrap_or(0);
    ProcStats {
        peak_rss_kib,
        cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64),
    }
}

impl RelayProcess {
    /// Starts `outbox-relay --config PATH run` (`binary`, or the one `cargo bench`
    /// built), logging to `log`.
    pub fn start(config: &Path, log: &Path, http_port: u16, binary: Option<&Path>) -> RelayProcess {
        let out = std::fs::File::create(log).expect("create relay log");
        let started = Instant::now();
        let child = relay_command(config, binary.unwrap_or(&relay_bin()))
            .arg("run")
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("spawn outbox-relay run");
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "trap '' INT HUP TERM; read _unused; kill -KILL {} 2>/dev/null",
                child.id()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn relay watchdog");
        RelayProcess {
            child,
            watchdog,
            started,
            http_port,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stats(&self) -> ProcStats {
        proc_stats(self.child.id())
    }

    /// Panics with the log's tail if the relay has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "the relay exited ({status}); log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// The relay's /metrics text (empty if it does not answer within 5 s).
    pub fn metrics(&self) -> String {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.http_port).into(),
            Duration::from_secs(5),
        ) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: the relay did not stop within 15s of SIGTERM; killing it");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// Sum and count of a histogram in Prometheus text, over all label sets.
pub fn histogram(metrics: &str, name: &str) -> Option<(f64, f64)> {
    let value = |suffix: &str| -> Option<f64> {
        let prefix = format!("{name}_{suffix}");
        let mut found = None;
        for l in metrics.lines() {
            if l.starts_with(&prefix) && l[prefix.len()..].starts_with(['{', ' ']) {
                let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    };
    Some((value("sum")?, value("count")?))
}
