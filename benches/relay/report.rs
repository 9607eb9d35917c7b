//! The printed result: the machine, one table of drain rates with ratios against the
//! limits measured in the same run, one of latencies, memory and CPU, and what the
//! profile showed.

use std::fmt::Write as _;
use std::time::Duration;

use crate::relay_process::ProcStats;
use crate::BrokerKind;

/// One contender emptying (or, when capped, working on) a backlog.
#[derive(Debug, Clone)]
pub struct DrainRow {
    /// Identifies the row for ratios: "sql-1000-1000", "relay-100-100",
    /// "relay-1000-1000#2" for a round, "naive", ...
    pub key: String,
    pub label: String,
    /// Events delivered (or rows drained, for the SQL-only limit).
    pub events: u64,
    pub elapsed: Duration,
    /// False when the run hit its cap before the backlog was empty.
    pub complete: bool,
    /// The row this one is compared with as its limit.
    pub limit_key: Option<String>,
    /// The relay process's figures.
    pub proc: Option<ProcStats>,
}

impl DrainRow {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Commit-to-consumer latency at a steady rate.
#[derive(Debug, Clone)]
pub struct LatencyRow {
    pub label: String,
    pub broker: BrokerKind,
    /// Through the relay (else the broker alone).
    pub through_relay: bool,
    pub target_rate: f64,
    pub achieved_rate: f64,
    /// Events per transaction (INSERT) of the writer.
    pub per_tx: f64,
    pub mean_commit: Duration,
    /// Sorted latencies, ms.
    pub latencies: Vec<f64>,
    pub missing: u64,
    /// How long the consumer was given after the writer stopped.
    pub waited: Duration,
    pub duplicates: u64,
    pub proc: Option<ProcStats>,
}

/// Everything a run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub header: Vec<String>,
    pub drains: Vec<DrainRow>,
    pub latencies: Vec<LatencyRow>,
    pub big: Option<DrainRow>,
    pub breakdown: Vec<String>,
    /// The relay rows the 0.70 target applies to ("relay-1000-1000"): the throughput
    /// setting. The smaller batch settings are reported for reference.
    pub throughput_key: Option<String>,
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The `q` quantile (nearest rank) of sorted values plus `missing` values larger than
/// all of them (events that did not arrive in time): infinite when it falls among those.
pub fn quantile(sorted: &[f64], missing: u64, q: f64) -> Option<f64> {
    let n = sorted.len() + missing as usize;
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    Some(sorted.get(rank - 1).copied().unwrap_or(f64::INFINITY))
}

/// The median (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_infinite() => "late".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
        None => "-".into(),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn cpu_per_100k(p: &ProcStats, events: u64) -> String {
    if events == 0 {
        return "-".into();
    }
    format!("{:.2} s", p.cpu.as_secs_f64() * 100_000.0 / events as f64)
}

/// The machine, from /proc.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.1} GiB RAM, Linux {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

impl Report {
    fn row(&self, key: &str) -> Option<&DrainRow> {
        self.drains.iter().find(|r| r.key == key)
    }

    /// The whole report, as printed.
    pub fn render(&self) -> String {
        let mut o = String::new();
        for h in &self.header {
            let _ = writeln!(o, "{h}");
        }
        let naive = self.row("naive").map(DrainRow::rate);

        if !self.drains.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "{:<54} {:>10} {:>9} {:>8} {:>9} {:>10} {:>11}",
                "DRAIN", "events/s", "elapsed", "/ limit", "/ naive", "peak RSS", "CPU/100k"
            );
            for r in &self.drains {
                let limit = r
                    .limit_key
                    .as_deref()
                    .and_then(|k| self.row(k))
                    .map(|l| format!("{:.2}", r.rate() / l.rate()))
                    .unwrap_or_else(|| "-".into());
                let vs_naive = match (naive, r.key.starts_with("relay")) {
                    (Some(n), true) => format!("{:.0}x", r.rate() / n),
                    _ => "-".into(),
                };
                let (rss, cpu) = match &r.proc {
                    Some(p) => (mib(p.peak_rss_kib), cpu_per_100k(p, r.events)),
                    None => ("-".into(), "-".into()),
                };
                let mut label = r.label.clone();
                if !r.complete {
                    label.push_str(" *");
                }
                let _ = writeln!(
                    o,
                    "{:<54} {:>10} {:>8.1}s {:>8} {:>9} {:>10} {:>11}",
                    label,
                    thousands(r.rate().round() as u64),
                    r.elapsed.as_secs_f64(),
                    limit,
                    vs_naive,
                    rss,
                    cpu
                );
            }
            if self.drains.iter().any(|r| !r.complete) {
                let _ = writeln!(
                    o,
                    "  * capped: stopped at the time limit; the rate is over the events it moved by then"
                );
            }
            let _ = writeln!(
                o,
                "  / limit: events/s over the SQL-only limit with the same batch sizes (the relay's own claim and delete, no Kafka)"
            );
        }

        if !self.latencies.is_empty() {
            let w = self
                .latencies
                .iter()
                .map(|l| l.label.len())
                .fold(46, usize::max);
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "{:<w$} {:>9} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8} {:>10} {:>9}",
                "LATENCY commit -> consumer (ms)",
                "events/s",
                "per tx",
                "p50",
                "p99",
                "p999",
                "max",
                "samples",
                "peak RSS",
                "CPU/100k"
            );
            for l in &self.latencies {
                let n = l.latencies.len() as u64;
                let (rss, cpu) = match &l.proc {
                    Some(p) => (mib(p.peak_rss_kib), cpu_per_100k(p, n + l.missing)),
                    None => ("-".into(), "-".into()),
                };
                let _ = writeln!(
                    o,
                    "{:<w$} {:>9} {:>6.1} {:>7} {:>7} {:>7} {:>7} {:>8} {:>10} {:>9}",
                    l.label,
                    thousands(l.achieved_rate.round() as u64),
                    l.per_tx,
                    ms(quantile(&l.latencies, l.missing, 0.50)),
                    ms(quantile(&l.latencies, l.missing, 0.99)),
                    ms(quantile(&l.latencies, l.missing, 0.999)),
                    ms(quantile(&l.latencies, l.missing, 1.0)),
                    thousands(n),
                    rss,
                    cpu
                );
                if l.missing > 0 || l.duplicates > 0 {
                    let _ = writeln!(
                        o,
                        "  ^ {} events had not arrived {} s after the writer stopped (\"late\": the relay fell behind), {} duplicates",
                        l.missing,
                        l.waited.as_secs(),
                        l.duplicates
                    );
                }
            }
            if let Some(c) = self
                .latencies
                .iter()
                .filter(|l| l.mean_commit > Duration::ZERO)
                .map(|l| l.mean_commit)
                .max()
            {
                let _ = writeln!(
                    o,
                    "  send time = just before the writer's INSERT (autocommit) goes out, so the figures include the commit (mean INSERT round trip <= {:.2} ms)",
                    c.as_secs_f64() * 1e3
                );
            }
        }

        if let Some(b) = &self.big {
            let _ = writeln!(o);
            let p = b.proc.unwrap_or_default();
            let _ = writeln!(
                o,
                "MEMORY: {} draining {} pending events: peak RSS {}, {} events/s, CPU {} per 100k{}",
                b.label,
                thousands(b.events),
                mib(p.peak_rss_kib),
                thousands(b.rate().round() as u64),
                cpu_per_100k(&p, b.events),
                if b.complete { "" } else { " (capped, not all delivered)" }
            );
        }

        let _ = writeln!(o);
        let _ = writeln!(o, "TARGETS (issue 6)");
        // (label, verdict), printed in one column as wide as the longest label.
        let mut targets: Vec<(String, String)> = Vec::new();
        // One verdict per setting: rounds of the same setting ("relay-1000-1000#2", each just
        // after its own "sql-1000-1000#2") are judged on the median of their paired ratios.
        // The machine's speed drifts by a factor of two or more over minutes, so each
        // relay drain is set against the limit measured seconds before it, and no single
        // disturbed round, on either side, decides the verdict.
        let mut settings: Vec<(String, String, Vec<f64>)> = Vec::new();
        for r in self.drains.iter().filter(|r| r.key.starts_with("relay")) {
            let Some(l) = r.limit_key.as_deref().and_then(|k| self.row(k)) else {
                continue;
            };
            let ratio = r.rate() / l.rate();
            let base = r.key.split('#').next().unwrap_or(&r.key).to_string();
            match settings.iter_mut().find(|s| s.0 == base) {
                Some(s) => s.2.push(ratio),
                None => {
                    let label = match r.label.find(" [round ") {
                        Some(at) => r.label[..at].to_string(),
                        None => r.label.clone(),
                    };
                    settings.push((base, label, vec![ratio]));
                }
            }
        }
        for (base, label, ratios) in settings {
            let m = median(&ratios);
            if self
                .throughput_key
                .as_deref()
                .is_some_and(|t| base.starts_with("relay-") && base != t)
            {
                targets.push((
                    label,
                    format!("{m:.2} of the SQL-only limit (for reference: the target is judged at the throughput batch)"),
                ));
                continue;
            }
            let verdict = if m >= 0.70 { "met" } else { "NOT met" };
            targets.push((
                label,
                if ratios.len() > 1 {
                    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
                    format!(
                        "{m:.2} of the SQL-only limit, median of {} rounds ({}) (target >= 0.70): {verdict}",
                        ratios.len(),
                        each.join(", ")
                    )
                } else {
                    format!("{m:.2} of the SQL-only limit (target >= 0.70): {verdict}")
                },
            ));
        }
        for l in self
            .latencies
            .iter()
            .filter(|l| l.through_relay && l.target_rate == 1000.0)
        {
            let p99 = quantile(&l.latencies, l.missing, 0.99);
            targets.push((
                l.label.clone(),
                format!(
                    "p99 {} ms (target <= 15 ms): {}",
                    ms(p99),
                    if p99.is_some_and(|v| v <= 15.0) && l.missing == 0 {
                        "met"
                    } else {
                        "NOT met"
                    }
                ),
            ));
            // What the relay adds to the broker's own floor, on the same broker.
            if let Some(floor) = self.latencies.iter().find(|f| {
                !f.through_relay && f.broker == l.broker && f.target_rate == l.target_rate
            }) {
                let floor99 = quantile(&floor.latencies, floor.missing, 0.99);
                let added = match (p99, floor99) {
                    (Some(r), Some(f)) if r.is_finite() && f.is_finite() => {
                        format!("{:+.1} ms", r - f)
                    }
                    _ => "-".into(),
                };
                targets.push((
                    format!(
                        "  added by the relay over the broker alone [{}]",
                        l.broker.name()
                    ),
                    format!(
                        "p99 {added} (relay {} ms - broker alone {} ms)",
                        ms(p99),
                        ms(floor99)
                    ),
                ));
            }
        }
        if let Some(b) = &self.big {
            let peak = b.proc.map(|p| p.peak_rss_kib).unwrap_or(0);
            targets.push((
                format!("draining {} events", thousands(b.events)),
                format!(
                    "peak RSS {} (target < 64 MiB): {}",
                    mib(peak),
                    if peak > 0 && peak < 64 * 1024 && b.complete {
                        "met"
                    } else {
                        "NOT met"
                    }
                ),
            ));
        }
        let w = targets.iter().map(|t| t.0.len()).fold(60, usize::max);
        for (label, verdict) in &targets {
            let _ = writeln!(o, "  {label:<w$} {verdict}");
        }

        if !self.breakdown.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "WHERE THE TIME GOES");
            for l in &self.breakdown {
                let _ = writeln!(o, "{l}");
            }
        }
        o
    }
}
