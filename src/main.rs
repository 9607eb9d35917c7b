use std::process::ExitCode;

use clap::Parser;

use outbox_relay::cli::{self, Cli};

/// jemalloc for the whole process: Rust's allocations and, through the unprefixed
/// `malloc`/`free` it exports, librdkafka's. librdkafka frees on its broker and polling
/// threads what the relay allocated on a tokio worker, and glibc's malloc spent a sixth
/// of the relay's CPU on that traffic (`_int_free`, `malloc_consolidate`,
/// `unlink_chunk` in `perf`); benches/README.md has the measurement.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in options (`MALLOC_CONF` in the environment adds to them): one
/// arena instead of four per CPU, since a relay has a handful of busy threads and its
/// resident size counts against the pod's memory request, and freed pages go back to
/// the system after a second instead of ten.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &u8 = &b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::main(cli)
}
