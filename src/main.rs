use std::process::ExitCode;

use clap::Parser;

use outbox_relay::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::main(cli)
}
