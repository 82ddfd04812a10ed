//! Command-line parsing and dispatch. Every command prints NDJSON (a `type` field on each line)
//! or one JSON document where it says so; messages for people go to stderr. Exit codes: 0 on
//! success, 1 on a runtime error, 2 on a usage error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::commands::{self, Failure};
use crate::config::Config;

#[derive(Debug, Parser)]
#[command(name = "streamdet", version, about = "Object detection on a video while it is being uploaded")]
pub struct Args {
    /// Configuration file (default: ./config.toml when it exists).
    #[arg(long, global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (POST /detect/video streams detections while the upload arrives).
    Serve(commands::serve::Args),
    /// Detect objects in images; prints one JSON line per image.
    DetectImage(commands::detect_image::Args),
    /// Detect objects in a video file (or `-` for stdin, read as it arrives) with the streaming
    /// pipeline; prints its events: `start`, one `frame` per processed frame, `end`.
    Detect(commands::detect::Args),
    /// Decode a video file (or `-` for stdin, read as it arrives); prints one JSON line per
    /// selected frame and an `end` line.
    Decode(commands::decode::Args),
    /// Time the model on random input; prints one JSON line (like ONNX Runtime's ort_bench.py).
    BenchModel(commands::bench_model::Args),
    /// Run every benchmark next to its peers; writes REPORT.md, results.json and SVG charts.
    Bench(crate::bench::Args),
}

pub fn run(args: Args) -> ExitCode {
    let config = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("streamdet: {err:#}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command {
        Command::Serve(a) => commands::serve::run(a, &config),
        Command::DetectImage(a) => commands::detect_image::run(a, &config),
        Command::Detect(a) => commands::detect::run(a, &config),
        Command::Decode(a) => commands::decode::run(a, &config),
        Command::BenchModel(a) => commands::bench_model::run(a, &config),
        Command::Bench(a) => crate::bench::run(a, &config),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("streamdet: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(err)) => {
            println!("{}", json!({"type": "error", "code": "internal", "message": format!("{err:#}")}));
            eprintln!("streamdet: {err:#}");
            ExitCode::from(1)
        }
    }
}
