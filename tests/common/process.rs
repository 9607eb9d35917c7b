//! What every server of the harness shares: unique names, free ports, a per-binary
//! scratch directory, and watchdogs that clean up after a test process that died.

use std::collections::HashSet;
use std::fs;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How long server starts / restarts may take before we give up.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval of the servers' own start loops.
pub(crate) const POLL: Duration = Duration::from_millis(25);

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

pub(crate) fn port_accepts(port: u16) -> bool {
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
pub(crate) fn scratch_root() -> &'static Path {
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

pub(crate) fn sh_quote(p: &Path) -> String {
    let s = p.to_str().expect("non-UTF-8 path");
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub(crate) fn tail(path: &Path, max_lines: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

pub(crate) fn output_text(out: &Output) -> String {
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
pub(crate) struct Watchdog {
    child: Child,
}

impl Watchdog {
    pub(crate) fn new(script: &str) -> Watchdog {
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
