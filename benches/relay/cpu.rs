//! Who used the CPUs during a run, from /proc: the relay, PostgreSQL (the postmaster,
//! its live backends, and the backends that exited), tansu, the mock broker process of
//! the latency runs on librdkafka's mock cluster, the bench process itself
//! (its producer, consumer and SQL client), and idle time. On a 2-core machine every
//! contender shares the cores with the broker and the database, so this split says more
//! than a rate alone.

use std::time::Instant;

/// Processes the split is over.
#[derive(Debug, Clone, Copy)]
pub struct Procs {
    pub postmaster: Option<u32>,
    pub tansu: Option<u32>,
    pub mock: Option<u32>,
}

/// Cumulative CPU seconds at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    busy: f64,
    idle: f64,
    relay: f64,
    postgres: f64,
    tansu: f64,
    mock: f64,
    bench: f64,
}

fn clk_tck() -> f64 {
    crate::relay_process::clock_ticks() as f64
}

/// (ppid, own utime+stime, waited-for children's cutime+cstime) in ticks.
fn stat(pid: &str) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some((n(1) as u32, n(11) + n(12), n(13) + n(14)))
}

/// The pid of the tansu broker listening on `port`.
pub fn tansu_pid(port: u16) -> Option<u32> {
    let needle = format!("127.0.0.1:{port}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("tansu") && cmd.contains(&needle) && !cmd.starts_with("sh")).then_some(pid)
    })
}

/// The postmaster's pid, from the data directory.
pub fn postmaster_pid(data: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Cumulative CPU of everyone now.
pub fn sample(p: &Procs, relay: Option<u32>) -> Sample {
    let tck = clk_tck();
    let mut postgres = 0u64;
    if let Some(pm) = p.postmaster {
        if let Some((_, own, children)) = stat(&pm.to_string()) {
            postgres += own + children;
        }
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                if let Some((ppid, own, _)) = stat(pid) {
                    if ppid == pm {
                        postgres += own;
                    }
                }
            }
        }
    }
    let own = |pid: Option<u32>| {
        pid.and_then(|p| stat(&p.to_string()))
            .map(|(_, o, c)| o + c)
            .unwrap_or(0)
    };
    let machine = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = machine
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    let all: u64 = f.iter().take(8).sum();
    Sample {
        at: Instant::now(),
        busy: (all - idle) as f64 / tck,
        idle: idle as f64 / tck,
        relay: own(relay) as f64 / tck,
        postgres: postgres as f64 / tck,
        tansu: own(p.tansu) as f64 / tck,
        mock: own(p.mock) as f64 / tck,
        bench: stat("self").map(|(_, o, _)| o).unwrap_or(0) as f64 / tck,
    }
}

impl Sample {
    /// The relay's CPU seconds since `earlier`.
    pub fn relay_since(&self, earlier: &Sample) -> f64 {
        self.relay - earlier.relay
    }
}

/// CPU seconds used by processes outside the bench between two samples, and the
/// capacity (wall time x CPUs) of that window.
pub fn others(a: &Sample, b: &Sample) -> (f64, f64) {
    let named = (b.relay - a.relay)
        + (b.postgres - a.postgres)
        + (b.tansu - a.tansu)
        + (b.mock - a.mock)
        + (b.bench - a.bench);
    let busy = b.busy - a.busy;
    let capacity = (b.busy + b.idle) - (a.busy + a.idle);
    ((busy - named).max(0.0), capacity)
}

/// How busy the machine is over `window`, before the bench starts anything: (0..1).
pub fn machine_load(window: std::time::Duration) -> f64 {
    let p = Procs {
        postmaster: None,
        tansu: None,
        mock: None,
    };
    let a = sample(&p, None);
    std::thread::sleep(window);
    let b = sample(&p, None);
    let total = (b.busy + b.idle) - (a.busy + a.idle);
    ((b.busy - a.busy) - (b.bench - a.bench)) / total.max(1e-9)
}

/// One line: CPU seconds each party used between two samples.
pub fn split(a: &Sample, b: &Sample) -> String {
    let wall = (b.at - a.at).as_secs_f64();
    let busy = b.busy - a.busy;
    let parts = [
        ("relay", b.relay - a.relay),
        ("postgres", b.postgres - a.postgres),
        ("tansu", b.tansu - a.tansu),
        ("mock broker", b.mock - a.mock),
        ("bench", b.bench - a.bench),
    ];
    let named: f64 = parts.iter().map(|p| p.1).sum();
    let mut s = format!("    CPU over {wall:.2} s wall:");
    for (name, v) in parts {
        if v > 0.0 || !matches!(name, "relay" | "mock broker") {
            s.push_str(&format!(" {name} {v:.2} s,"));
        }
    }
    s.push_str(&format!(
        " other {:.2} s, idle {:.2} s",
        (busy - named).max(0.0),
        b.idle - a.idle
    ));
    s
}
