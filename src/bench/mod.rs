//! `streamdet bench`: one command that reproduces every performance figure of the README, on
//! inputs it makes itself, next to its peers (the ffmpeg CLI, ONNX Runtime, the Python seed
//! service) run in the same invocation, interleaved. Writes `REPORT.md`, `results.json` and SVG
//! charts into `--out`.
//!
//! Stages: buffer, decode, model, end-to-end over HTTP, pipeline overhead, concurrent uploads,
//! memory, tracking. The same actors that serve HTTP drive the in-process stages.

pub mod client;
mod http;
mod local;
mod media;
mod peers;
mod plan;
mod progress;
mod report;
mod stats;
mod tracking;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use self::media::{ClipSpec, Container};
use self::peers::PeerPaths;
use self::plan::Plan;
use self::progress::Progress;
use self::report::*;
use crate::commands::{Failure, ModelArgs};
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Buffer,
    Decode,
    Model,
    EndToEnd,
    Overhead,
    Concurrency,
    Memory,
    Tracking,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// About 3 minutes on a 2-core machine: shorter clips, fewer repetitions.
    #[arg(long)]
    quick: bool,
    /// Tiny inputs, one repetition (with or without --quick): checks that every stage runs, as
    /// the tests do; the figures mean little.
    #[arg(long)]
    tiny: bool,
    /// Where REPORT.md, results.json and the charts go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// The peers: ort_bench.py and seed_ref/.
    #[arg(long, default_value = "../shared/peers")]
    peers: PathBuf,
    /// A dynamic-batch export, for batching across sessions and batch-4 latency.
    #[arg(long, default_value = "../shared/models/yolo11n-random-dynamic.onnx")]
    batch_model: PathBuf,
    /// The Python that runs the peers (with onnxruntime; fastapi, uvicorn, av for the seed).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Only these stages (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Stage>,
}

/// Everything a stage needs.
struct Bench {
    plan: Plan,
    threads: usize,
    model: PathBuf,
    batch_model: Option<PathBuf>,
    peers: PeerPaths,
    media_dir: PathBuf,
    photos: Vec<PathBuf>,
    progress: Progress,
    config: Config,
    results: Results,
}

pub fn run(args: Args, config: &Config) -> Result<ExitCode, Failure> {
    let plan = if args.tiny {
        Plan::tiny()
    } else if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let stages: Vec<Stage> = if args.only.is_empty() {
        vec![Stage::Buffer, Stage::Decode, Stage::Model, Stage::EndToEnd, Stage::Overhead, Stage::Concurrency, Stage::Memory, Stage::Tracking]
    } else {
        args.only.clone()
    };
    if !media::ffmpeg_available() {
        return Err(Failure::Runtime(anyhow::anyhow!("the ffmpeg CLI is needed to make the benchmark's inputs (scripts/setup.sh installs it)")));
    }
    let threads = match args.model.threads(config) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let model = args.model.path(config);
    if !model.exists() {
        return Err(Failure::Runtime(anyhow::anyhow!("no model at {} (scripts/fetch-model.sh fetches the default one)", model.display())));
    }
    let media_dir = args.out.join("media");
    std::fs::create_dir_all(&media_dir).map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot create {}: {e}", media_dir.display())))?;
    let mut bench = Bench {
        results: Results {
            machine: Machine {
                cpu: peers::cpu_model(),
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                threads,
                kernels: streamdet_actors::detect::cpu_kernels().into(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            settings: plan.describe(&stages),
            ..Default::default()
        },
        plan,
        threads,
        model,
        batch_model: args.batch_model.exists().then(|| args.batch_model.clone()),
        peers: PeerPaths::new(args.python.clone(), &args.peers),
        photos: media::photos(&args.python),
        media_dir,
        progress: Progress::new(),
        config: config.clone(),
    };
    if bench.photos.is_empty() {
        bench.results.settings.push("clips show FFmpeg's test pattern: the photos (scripts/photos.py in the venv) were not found".into());
    }
    let started = Instant::now();
    for stage in &stages {
        let result = match stage {
            Stage::Buffer => bench.buffer(),
            Stage::Decode => bench.decode(),
            Stage::Model => bench.model(),
            Stage::EndToEnd => bench.end_to_end(),
            Stage::Overhead => bench.overhead(),
            Stage::Concurrency => bench.concurrency(),
            Stage::Memory => bench.memory(),
            Stage::Tracking => bench.tracking(),
        };
        result.map_err(|e| Failure::Runtime(e.context(format!("benchmark stage {stage:?}"))))?;
    }
    bench.results.settings.push(format!("the whole run took {:.0} s", started.elapsed().as_secs_f64()));
    let command = std::env::args().map(|a| if a.contains(' ') { format!("{a:?}") } else { a }).collect::<Vec<_>>().join(" ");
    let command = command.replacen(&std::env::args().next().unwrap_or_default(), "streamdet", 1);
    report::write_all(&bench.results, &args.out, &command).map_err(Failure::Runtime)?;
    let report = args.out.join("REPORT.md");
    println!("{}", serde_json::json!({"type": "report", "dir": args.out, "report": report}));
    Ok(ExitCode::SUCCESS)
}

impl Bench {
    fn skip(&mut self, what: String) {
        self.results.skipped.push(what);
    }

    /// A clip made once per plan and kept in the media directory.
    fn master(&self, name: &str, spec: &ClipSpec) -> anyhow::Result<PathBuf> {
        let path = self.media_dir.join(format!("{}-{name}.mkv", self.plan.name));
        if !path.exists() {
            let partial = path.with_extension("partial.mkv");
            media::master(&self.photos, spec, &partial)?;
            std::fs::rename(&partial, &path)?;
        }
        Ok(path)
    }

    fn remuxed(&self, master: &Path, container: Container) -> anyhow::Result<PathBuf> {
        container.remux(master)
    }
}
