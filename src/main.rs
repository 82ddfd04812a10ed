//! The `streamdet` command line.

use std::process::ExitCode;

use clap::Parser;

mod bench;
mod cli;
mod commands;
mod config;
mod image_detections;
mod metrics;
mod server;
mod sessions;

/// Large blocks (tensors above all) start on a cache line: see [`LineAligned`](streamdet_actors::detect::LineAligned).
#[global_allocator]
static ALLOCATOR: streamdet_actors::detect::LineAligned = streamdet_actors::detect::LineAligned;

fn main() -> ExitCode {
    // Logs for people go to stderr; RUST_LOG chooses how much (warnings by default).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            let _ = err.print();
            // clap uses 0 for --help/--version and 2 for usage errors.
            return ExitCode::from(err.exit_code() as u8);
        }
    };
    cli::run(args)
}
