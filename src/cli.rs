//! Command-line parsing and dispatch. Every command prints NDJSON (a `type` field on each line)
//! or one JSON document where it says so; messages for people go to stderr. Exit codes: 0 on
//! success, 1 on a runtime error, 2 on a usage error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use clap::{Args as ClapArgs, Parser, Subcommand};
use serde_json::json;
use streamdet_actors::detect::{self, DetectParams, Detector, ModelFrame};

#[derive(Debug, Parser)]
#[command(name = "streamdet", version, about = "Object detection on a video while it is being uploaded")]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Detect objects in images; prints one JSON line per image.
    DetectImage(DetectImageArgs),
    /// Time the model on random input; prints one JSON line (like ONNX Runtime's ort_bench.py).
    BenchModel(BenchModelArgs),
}

#[derive(Debug, ClapArgs)]
struct ModelArgs {
    /// ONNX model (an ultralytics detect export).
    #[arg(long, env = "STREAMDET_MODEL", default_value = "models/yolov12n.onnx")]
    model: PathBuf,
    /// CPU threads for inference (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Debug, ClapArgs)]
struct DetectImageArgs {
    /// JPEG, PNG or WebP files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Minimum confidence.
    #[arg(long, default_value_t = 0.25)]
    conf: f32,
    /// IoU threshold of non-maximum suppression.
    #[arg(long, default_value_t = 0.45)]
    iou: f32,
    /// Only these classes, by name, comma-separated (e.g. `person,cat`).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
}

#[derive(Debug, ClapArgs)]
struct BenchModelArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Frames per call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs (after warm-up runs).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
}

pub fn run(args: Args) -> ExitCode {
    let result = match args.command {
        Command::DetectImage(a) => detect_image(a),
        Command::BenchModel(a) => bench_model(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            println!("{}", json!({"type": "error", "code": "internal", "message": format!("{err:#}")}));
            eprintln!("streamdet: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn load(model: &ModelArgs) -> anyhow::Result<Detector> {
    Detector::load_with_threads(&model.model, Device::Cpu, model.threads)
        .with_context(|| format!("loading {}", model.model.display()))
}

fn class_ids(detector: &Detector, names: &[String]) -> anyhow::Result<Option<Vec<usize>>> {
    if names.is_empty() {
        return Ok(None);
    }
    names
        .iter()
        .map(|name| {
            detector
                .class_names()
                .iter()
                .position(|c| c == name.trim())
                .with_context(|| format!("the model has no class {name:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Some)
}

fn detect_image(args: DetectImageArgs) -> anyhow::Result<ExitCode> {
    for (name, v) in [("--conf", args.conf), ("--iou", args.iou)] {
        if !(0.0..=1.0).contains(&v) {
            eprintln!("streamdet: {name} must be between 0 and 1");
            return Ok(ExitCode::from(2));
        }
    }
    let detector = load(&args.model)?;
    let classes = match class_ids(&detector, &args.classes) {
        Ok(classes) => classes,
        Err(err) => {
            eprintln!("streamdet: {err:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let params = DetectParams { conf: args.conf, iou: args.iou, classes, ..Default::default() };
    let mut failed = false;
    let stdout = std::io::stdout();
    for path in &args.images {
        let line = match detect_one(&detector, path, &params) {
            Ok(line) => line,
            Err(err) => {
                failed = true;
                eprintln!("streamdet: {err}");
                json!({"type": "error", "image": path, "code": "unsupported_media", "message": err.to_string()})
            }
        };
        writeln!(stdout.lock(), "{line}")?;
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn detect_one(detector: &Detector, path: &Path, params: &DetectParams) -> Result<serde_json::Value, detect::DetectError> {
    let (rgb, width, height) = detect::read_image(path)?;
    let (model_rgb, letterbox) = detect::letterbox_rgb(&rgb, width, height, detector.input_size());
    let frame = ModelFrame { rgb: model_rgb, letterbox };
    let detections = detector.detect(std::slice::from_ref(&frame), params)?.pop().unwrap_or_default();
    Ok(json!({"type": "image", "image": path, "width": width, "height": height, "detections": detections}))
}

fn bench_model(args: BenchModelArgs) -> anyhow::Result<ExitCode> {
    if args.batch == 0 || args.runs == 0 {
        bail!("--batch and --runs must be at least 1");
    }
    let detector = load(&args.model)?;
    let (w, h) = detector.input_size();
    // Same kind of input as ort_bench.py: uniform random values in [0, 1).
    let input = Tensor::rand(0f32, 1f32, (args.batch, 3, h, w), &Device::Cpu)?;
    for _ in 0..args.warmup {
        detector.run_raw(&input)?;
    }
    let mut times = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let start = Instant::now();
        detector.run_raw(&input)?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let median = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
    };
    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    let threads = if args.model.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { args.model.threads };
    println!(
        "{}",
        json!({
            "type": "bench", "runtime": "streamdet", "version": env!("CARGO_PKG_VERSION"),
            "model": args.model.model, "threads": threads, "batch": args.batch,
            "median_ms": round2(median), "min_ms": round2(times[0]), "max_ms": round2(times[times.len() - 1]),
            "runs": args.runs,
        })
    );
    Ok(ExitCode::SUCCESS)
}
