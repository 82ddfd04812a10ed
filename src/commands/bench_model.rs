//! `streamdet bench-model`: model latency on random input, one JSON line, comparable with
//! `../shared/peers/ort_bench.py` for ONNX Runtime.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::json;
use streamdet_actors::detect::{OpProfile, Size, StepTime, cpu_kernels};

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
    /// Also print where the time goes, over as many more runs (each step's median): a
    /// `profile` line with milliseconds per operator type (`--profile`), and with `--profile
    /// steps` a `steps` line too, with each step's layer, input shape and milliseconds, to
    /// compare layer by layer.
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

/// Each step's milliseconds per call, the median over the calls `runs` (a model of fixed batch
/// size runs its steps once per part of a larger batch: their times in a call add up). A
/// median, not a mean: on a shared machine a thread that loses its core for a while stalls the
/// step it is in, and a few such stalls in 20 calls raise a step's mean far above its usual
/// time, unevenly from step to step.
fn step_medians(runs: Vec<Vec<StepTime>>) -> BTreeMap<usize, StepTime> {
    let calls = runs.len();
    let mut per_call: BTreeMap<usize, (StepTime, Vec<f64>)> = BTreeMap::new();
    for (call, steps) in runs.into_iter().enumerate() {
        for step in steps {
            let ms = step.ms;
            per_call.entry(step.index).or_insert_with(|| (step, vec![0.0; calls])).1[call] += ms;
        }
    }
    per_call
        .into_iter()
        .map(|(index, (step, mut times))| {
            times.sort_by(f64::total_cmp);
            (index, StepTime { ms: median(&times), ..step })
        })
        .collect()
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
            "kernels": if detector.device().is_cuda() { "candle" } else { cpu_kernels() },
            "threads": threads, "batch": args.batch,
            "median_ms": round2(median(&times)), "min_ms": round2(times[0]),
            "max_ms": round2(times[times.len() - 1]), "runs": args.runs,
        })
    );
    if let Some(detail) = args.profile {
        // After the timed runs above, the results that follow from the input's shape are
        // kept, so every run below runs the same steps.
        let runs = (0..args.runs).map(|_| detector.profile_steps(&input)).collect::<Result<Vec<_>, _>>()?;
        let steps = step_medians(runs);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn step(index: usize, ms: f64) -> StepTime {
        StepTime { index, op: "Conv 1x1".into(), layer: "64->64 k1 s1".into(), input: vec![1, 64, 40, 40], ms }
    }

    #[test]
    fn a_step_takes_its_median_call_and_adds_up_its_parts_within_a_call() {
        // Step 3 runs twice per call (two parts of a batch); the third call stalls in step 0.
        let runs = vec![
            vec![step(0, 1.0), step(3, 0.5), step(3, 0.75)],
            vec![step(0, 1.2), step(3, 0.5), step(3, 0.5)],
            vec![step(0, 9.0), step(3, 0.5), step(3, 1.0)],
        ];
        let steps = step_medians(runs);
        assert_eq!(steps.keys().copied().collect::<Vec<_>>(), [0, 3]);
        assert_eq!(steps[&0].ms, 1.2);
        assert_eq!(steps[&3].ms, 1.25);
        assert_eq!((steps[&3].op.as_str(), steps[&3].input.as_slice()), ("Conv 1x1", &[1, 64, 40, 40][..]));
    }
}
