//! What the scale and writers benches share: the entry point, options from the
//! environment, progress lines and percentiles. Each includes it with `#[path]`, beside
//! the relay bench's modules it uses (`mock_broker` among them).

use std::time::Instant;

/// A progress line on stderr, with the seconds since `$t0`.
#[macro_export]
macro_rules! progress {
    ($t0:expr, $($arg:tt)*) => {
        eprintln!("[{:>6.1}s] {}", $t0.elapsed().as_secs_f64(), format!($($arg)*))
    };
}

/// The bench's `main`: serves the mock broker when re-executed as it, refuses to run
/// under `cargo test --benches`, runs `run` on a two-worker runtime and prints its
/// report on stdout.
pub fn bench_main<F>(name: &str, run: impl FnOnce(Instant) -> F)
where
    F: std::future::Future<Output = String>,
{
    if crate::mock_broker::serve_if_child() {
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "benches/{name}: a benchmark, not a test; run it with `cargo bench --bench {name}`"
        );
        return;
    }
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = rt.block_on(run(t0));
    println!("{report}");
    eprintln!(
        "benches/{name}: done in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
}

/// `BENCH_*` option `name`, or `default`; `_` in the value is ignored (`100_000`).
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Whether `BENCH_QUICK=1` asks for a smoke run.
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// The `p` quantile of `sorted` (NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 0.5)
}
