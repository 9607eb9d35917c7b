//! The live progress table and the closing summary.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::ledger::{Counters, Ledger};
use crate::SERVICES;

/// How often the progress table is printed when stdout is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// One service's line of the progress table.
pub struct Row {
    pub name: &'static str,
    /// Events committed.
    pub written: u64,
    /// Events written in rolled-back transactions.
    pub rolled_back: u64,
    /// Committed events the consumer received.
    pub relayed: u64,
    /// Rows in the outbox (the relay's last refresh).
    pub pending: i64,
    /// Age of the oldest pending row, seconds.
    pub lag_s: f64,
    /// Rows in the dead-letter table.
    pub dead_lettered: i64,
}

/// Redraws the table in place on a terminal; otherwise prints it every few seconds.
pub struct Progress {
    tty: bool,
    drawn: usize,
    /// When stdout is not a terminal: when the next frame is due.
    next_plain: Instant,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            next_plain: Instant::now() + PLAIN_EVERY,
        }
    }

    /// Shows the current state; `footer` lines only on a terminal.
    pub fn show(&mut self, phase: &str, rows: &[Row], footer: &[String]) {
        if !self.tty {
            // A little slack: the 1s ticks land just before the 5s marks.
            if Instant::now() + Duration::from_millis(200) < self.next_plain {
                return;
            }
            self.next_plain += PLAIN_EVERY;
        }
        self.print(phase, rows, if self.tty { footer } else { &[] });
    }

    /// Shows the final state, whatever the time since the last print.
    pub fn show_final(&mut self, phase: &str, rows: &[Row], footer: &[String]) {
        self.print(phase, rows, if self.tty { footer } else { &[] });
        self.drawn = 0;
    }

    fn print(&mut self, phase: &str, rows: &[Row], footer: &[String]) {
        let mut lines = vec![
            phase.to_string(),
            format!(
                "  {:<16}{:>10}{:>13}{:>10}{:>9}{:>8}{:>15}",
                "service", "written", "rolled back", "relayed", "pending", "lag", "dead-lettered"
            ),
        ];
        for r in rows {
            lines.push(format!(
                "  {:<16}{:>10}{:>13}{:>10}{:>9}{:>7.1}s{:>15}",
                r.name,
                thousands(r.written),
                thousands(r.rolled_back),
                thousands(r.relayed),
                r.pending,
                r.lag_s,
                r.dead_lettered
            ));
        }
        lines.push(format!(
            "  {:<16}{:>10}{:>13}{:>10}{:>9}{:>8}{:>15}",
            "total",
            thousands(rows.iter().map(|r| r.written).sum()),
            thousands(rows.iter().map(|r| r.rolled_back).sum()),
            thousands(rows.iter().map(|r| r.relayed).sum()),
            rows.iter().map(|r| r.pending).sum::<i64>(),
            "",
            rows.iter().map(|r| r.dead_lettered).sum::<i64>()
        ));
        lines.extend(footer.iter().cloned());

        let mut out = std::io::stdout().lock();
        if self.tty && self.drawn > 0 {
            // Back to the first line of the previous frame.
            let _ = write!(out, "\x1b[{}A", self.drawn);
        }
        for l in &lines {
            if self.tty {
                let _ = write!(out, "\r\x1b[2K");
            }
            let _ = writeln!(out, "{l}");
        }
        if !self.tty {
            let _ = writeln!(out);
        }
        let _ = out.flush();
        self.drawn = lines.len();
    }
}

/// The closing report.
pub struct Summary<'a> {
    pub ledger: &'a Ledger,
    /// Rows left in each outbox after the relay stopped.
    pub left_in_outbox: [i64; 4],
    /// Rows in each dead-letter table.
    pub dead_lettered: [i64; 4],
    pub load_time: Duration,
    pub drain_time: Duration,
    /// Whether the outboxes emptied and the consumer caught up in time.
    pub drained: bool,
    /// Failures of the demo's own parts (writers, consumer, relay shutdown).
    pub problems: Vec<String>,
}

impl Summary<'_> {
    /// Prints the summary; returns the verdict (true: pass).
    pub fn print(&self) -> bool {
        let l = self.ledger;
        println!();
        println!(
            "summary: {:.1}s of load, drained in {:.1}s{}",
            self.load_time.as_secs_f64(),
            self.drain_time.as_secs_f64(),
            if self.drained {
                ""
            } else {
                " (did NOT drain: gave up waiting)"
            }
        );
        println!(
            "  {:<16}{:>10}{:>13}{:>10}{:>7}{:>12}{:>14}{:>18}",
            "service",
            "committed",
            "rolled back",
            "relayed",
            "lost",
            "duplicated",
            "out of order",
            "rolled-back seen"
        );
        let line = |name: &str, get: &dyn Fn(fn(&Counters) -> &AtomicU64) -> u64| {
            let committed = get(|c| &c.committed);
            let relayed = get(|c| &c.distinct);
            println!(
                "  {:<16}{:>10}{:>13}{:>10}{:>7}{:>12}{:>14}{:>18}",
                name,
                thousands(committed),
                thousands(get(|c| &c.rolled_back)),
                thousands(relayed),
                thousands(committed.saturating_sub(relayed)),
                thousands(get(|c| &c.duplicates)),
                thousands(get(|c| &c.out_of_order)),
                thousands(get(|c| &c.rolled_back_seen)),
            );
        };
        for s in SERVICES {
            let c = l.service(s);
            line(s.name(), &|f| f(c).load(Ordering::Relaxed));
        }
        line("total", &|f| l.total(f));

        let committed = l.total(|c| &c.committed);
        let lost: u64 = SERVICES
            .iter()
            .map(|s| {
                let c = l.service(*s);
                c.committed
                    .load(Ordering::Relaxed)
                    .saturating_sub(c.distinct.load(Ordering::Relaxed))
            })
            .sum();
        let out_of_order = l.total(|c| &c.out_of_order);
        let rolled_back = l.total(|c| &c.rolled_back);
        let rolled_back_seen = l.total(|c| &c.rolled_back_seen);
        let duplicates = l.total(|c| &c.duplicates);
        let left: i64 = self.left_in_outbox.iter().sum();
        let dead: i64 = self.dead_lettered.iter().sum();
        println!("  left in the outboxes: {left}, in the dead-letter tables: {dead}");

        let mut problems = self.problems.clone();
        let malformed = l.total(|c| &c.malformed);
        if malformed > 0 {
            problems.push(format!(
                "{malformed} records without event_id, key or version"
            ));
        }
        let extra: u64 = SERVICES
            .iter()
            .map(|s| {
                let c = l.service(*s);
                c.distinct
                    .load(Ordering::Relaxed)
                    .saturating_sub(c.committed.load(Ordering::Relaxed))
            })
            .sum();
        if extra > 0 {
            problems.push(format!(
                "{} that none of the demo's transactions wrote (inserted by hand?)",
                count(extra, "event arrived", "events arrived")
            ));
        }
        if committed == 0 {
            problems.push("no event was committed, so nothing was proven".into());
        }
        if let Ok(examples) = l.out_of_order_examples.lock() {
            for e in examples.iter() {
                println!("  out of order: {e}");
            }
        }
        for p in &problems {
            println!("  problem: {p}");
        }

        let pass = lost == 0 && out_of_order == 0 && rolled_back_seen == 0 && problems.is_empty();
        if pass {
            println!(
                "verdict: PASS: all {} committed events were relayed, none lost, none out of \
                 order, none of the {} rolled-back events published ({} duplicates; \
                 at-least-once allows them)",
                thousands(committed),
                thousands(rolled_back),
                thousands(duplicates)
            );
        } else {
            println!(
                "verdict: FAIL: {} of {} committed events not relayed{}, {} out of order, {} \
                 rolled-back events published{}",
                thousands(lost),
                thousands(committed),
                if dead > 0 && lost > 0 {
                    format!(" ({dead} of them in the dead-letter tables)")
                } else {
                    String::new()
                },
                thousands(out_of_order),
                thousands(rolled_back_seen),
                if problems.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} (above)",
                        count(problems.len() as u64, "problem", "problems")
                    )
                }
            );
        }
        pass
    }
}

/// "1 event", "2 events".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", thousands(n), if n == 1 { one } else { many })
}

/// 1234567 as "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
