use std::process::ExitCode;

use clap::Parser;

use outbox_relay::cli::{self, Cli};

/// jemalloc for the whole process: Rust's allocations and, through the unprefixed
/// `malloc`/`free` it exports on Linux, librdkafka's. librdkafka frees on its broker and
/// polling threads what the relay allocated on a tokio worker, and glibc's malloc spent
/// about a quarter of the relay's CPU in a drain on that traffic (`_int_free`,
/// `_int_malloc`, `unlink_chunk`, `malloc_consolidate` in `perf`). benches/README.md has
/// the A/B.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in options (`MALLOC_CONF` in the environment adds to them): one
/// arena instead of four per CPU, since a relay has a handful of busy threads and its
/// resident size counts against the pod's memory request, and freed pages go back to
/// the system after a second instead of ten. Where tikv-jemalloc-sys prefixes jemalloc's
/// symbols (macOS, Android), the option string is `_rjem_malloc_conf`.
#[allow(non_upper_case_globals)]
#[cfg_attr(
    any(
        target_vendor = "apple",
        target_os = "android",
        target_os = "dragonfly"
    ),
    unsafe(export_name = "_rjem_malloc_conf")
)]
#[cfg_attr(
    not(any(
        target_vendor = "apple",
        target_os = "android",
        target_os = "dragonfly"
    )),
    unsafe(export_name = "malloc_conf")
)]
pub static malloc_conf: &u8 = &b"narenas:1,dirty_decay_ms:1000\0"[0];

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::main(cli)
}
