//! `streamdet bench-model`: model latency on random input, one JSON line, comparable with
//! `../shared/peers/ort_bench.py` for ONNX Runtime.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::json;
use streamdet_actors::detect::{OpProfile, Size, StepTime};

use super::Failure;
use super::ModelArgs;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
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
    /// Also print where the time goes, averaged over as many more runs: a `profile` line with
    /// milliseconds per operator type (`--profile`), and with `--profile steps` a `steps` line
    /// too, with each step's layer, input shape and milliseconds, to compare layer by layer.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "ops")]
    profile: Option<Profile>,
}

/// How much `--profile` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Profile {
    /// Milliseconds per operator type.
    Ops,
    /// Per operator type, and per step.
    Steps,
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

pub fn run(args: Args, config: &Config) -> Result<ExitCode, Failure> {
    if args.batch == 0 || args.runs == 0 {
        return Err(Failure::Usage("--batch and --runs must be at least 1".into()));
    }
    let detector = args.model.load(config)?;
    let Size { width: w, height: h } = detector.input_size();
    // The same kind of input as ort_bench.py: uniform random values in [0, 1).
    let input = Tensor::rand(0f32, 1f32, (args.batch, 3, h, w), &Device::Cpu)?;
    // One call takes the input from the host and brings the output back to it, as `detect`
    // does and as ONNX Runtime's `run` does with host arrays. On a GPU, bringing the output back
    // is also what waits for the call's kernels, which run asynchronously; on the CPU it costs
    // nothing (the output is already there).
    let call = || -> Result<(), Failure> {
        detector.run_raw(&input)?.to_device(&Device::Cpu)?;
        Ok(())
    };
    for _ in 0..args.warmup {
        call()?;
    }
    let mut times = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let start = Instant::now();
        call()?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    let threads = match args.model.threads(config) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    println!(
        "{}",
        json!({
            "type": "bench", "runtime": "streamdet", "version": env!("CARGO_PKG_VERSION"),
            "model": args.model.path(config), "device": if detector.device().is_cuda() { "cuda" } else { "cpu" },
            "threads": threads, "batch": args.batch,
            "median_ms": round2(median(&times)), "min_ms": round2(times[0]),
            "max_ms": round2(times[times.len() - 1]), "runs": args.runs,
        })
    );
    if let Some(detail) = args.profile {
        // Each step's milliseconds per call, averaged over the runs (a model of fixed batch
        // size runs its steps once per part of a larger batch: their times add up). After the
        // timed runs above, the results that follow from the input's shape are kept, so every
        // run below runs the same steps.
        let mut steps: BTreeMap<usize, StepTime> = BTreeMap::new();
        for _ in 0..args.runs {
            for step in detector.profile_steps(&input)? {
                let ms = step.ms / args.runs as f64;
                steps.entry(step.index).and_modify(|s| s.ms += ms).or_insert(StepTime { ms, ..step });
            }
        }
        let mut total = OpProfile::new();
        for step in steps.values() {
            let entry = total.entry(step.op.clone()).or_default();
            entry.0 += step.ms;
            entry.1 += 1;
        }
        let ops: serde_json::Map<String, serde_json::Value> =
            total.into_iter().map(|(op, (ms, steps))| (op, json!({"ms": round2(ms), "steps": steps}))).collect();
        println!("{}", json!({"type": "profile", "batch": args.batch, "ops": ops}));
        if detail == Profile::Steps {
            let steps: Vec<serde_json::Value> = steps
                .values()
                .map(|s| json!({"index": s.index, "op": s.op, "layer": s.layer, "input": s.input, "ms": (s.ms * 1000.0).round() / 1000.0}))
                .collect();
            println!("{}", json!({"type": "steps", "batch": args.batch, "steps": steps}));
        }
    }
    Ok(ExitCode::SUCCESS)
}
