//! The `streamdet` command line.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod config;
mod server;

fn main() -> ExitCode {
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
