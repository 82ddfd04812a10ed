//! `streamdet bench`: one command that reproduces every performance figure of the README, on
//! inputs it makes itself, next to its peers (the ffmpeg CLI, ONNX Runtime, the Python seed
//! service) run in the same invocation, interleaved. Writes `REPORT.md`, `results.json` and SVG
//! charts into `--out`.
//!
//! Stages: buffer, decode, model, end-to-end over HTTP, pipeline overhead, concurrent uploads,
//! memory. The same actors that serve HTTP drive the in-process stages.

pub mod client;
mod media;
mod peers;
mod progress;
mod report;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use streamdet_actors::buffer::{self, BufferOptions};
use streamdet_actors::decode::{DecodeOptions, Decoder, FrameSelection};
use streamdet_actors::detect::{DetectParams, Detector};
use streamdet_actors::pipeline::{Pipeline, PipelineOptions, SessionParams, UploadPace};

use self::client::{Pacer, Upload, UploadOutcome};
use self::media::{ClipSpec, Container};
use self::peers::{PeerPaths, ServerProcess};
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

/// Input sizes and repetitions of one kind of run.
struct Plan {
    name: &'static str,
    reps: usize,
    buffer_bytes: u64,
    decode_clip: ClipSpec,
    model_runs: usize,
    e2e_clip: ClipSpec,
    e2e_stride: u64,
    concurrency: Vec<usize>,
    concurrency_clip: ClipSpec,
    concurrency_stride: u64,
    overhead_clip: ClipSpec,
    overhead_stride: u64,
    memory_source: ClipSpec,
    memory_sizes: Vec<u64>,
}

fn clip(width: u32, height: u32, fps: u32, seconds: f64, bitrate: &'static str) -> ClipSpec {
    ClipSpec { width, height, fps, seconds, bitrate }
}

impl Plan {
    fn full() -> Plan {
        Plan {
            name: "full",
            reps: 3,
            buffer_bytes: 1 << 30,
            decode_clip: clip(1920, 1080, 30, 10.0, "6M"),
            model_runs: 10,
            e2e_clip: clip(1280, 720, 30, 10.0, "4M"),
            e2e_stride: 5,
            concurrency: vec![1, 2, 4, 8],
            concurrency_clip: clip(1280, 720, 30, 4.0, "4M"),
            concurrency_stride: 10,
            overhead_clip: clip(1280, 720, 30, 4.0, "4M"),
            overhead_stride: 1,
            memory_source: clip(1920, 1080, 25, 6.0, "40M"),
            memory_sizes: vec![256 << 20, 1 << 30],
        }
    }

    fn quick() -> Plan {
        Plan {
            name: "quick",
            reps: 1,
            buffer_bytes: 256 << 20,
            decode_clip: clip(1920, 1080, 30, 4.0, "6M"),
            model_runs: 5,
            e2e_clip: clip(1280, 720, 30, 10.0, "4M"),
            e2e_stride: 15,
            concurrency: vec![1, 2, 4, 8],
            concurrency_clip: clip(1280, 720, 30, 2.0, "4M"),
            concurrency_stride: 15,
            overhead_clip: clip(1280, 720, 30, 2.0, "4M"),
            overhead_stride: 2,
            memory_source: clip(1920, 1080, 25, 6.0, "40M"),
            memory_sizes: vec![128 << 20],
        }
    }

    fn tiny() -> Plan {
        Plan {
            name: "tiny",
            reps: 1,
            buffer_bytes: 8 << 20,
            decode_clip: clip(640, 360, 30, 1.0, "2M"),
            model_runs: 1,
            e2e_clip: clip(640, 360, 30, 2.0, "2M"),
            e2e_stride: 30,
            concurrency: vec![1, 2],
            concurrency_clip: clip(640, 360, 30, 1.0, "2M"),
            concurrency_stride: 30,
            overhead_clip: clip(640, 360, 30, 1.0, "2M"),
            overhead_stride: 15,
            memory_source: clip(640, 360, 25, 2.0, "8M"),
            memory_sizes: vec![8 << 20],
        }
    }

    fn describe(&self, stages: &[Stage]) -> Vec<String> {
        let mut lines = vec![format!("plan: {}; {} repetition(s) of every measurement, peers interleaved with ours", self.name, self.reps)];
        let on = |s: Stage| stages.contains(&s);
        if on(Stage::Buffer) {
            lines.push(format!("buffer: {} MiB", self.buffer_bytes >> 20));
        }
        if on(Stage::Decode) {
            lines.push(format!("decode: {} (photos slideshow)", self.decode_clip.describe()));
        }
        if on(Stage::Model) {
            lines.push(format!("model: {} timed runs per figure, after 3 warm-up runs", self.model_runs));
        }
        if on(Stage::EndToEnd) {
            lines.push(format!("end to end: {}, stride {}", self.e2e_clip.describe(), self.e2e_stride));
        }
        if on(Stage::Overhead) {
            lines.push(format!("pipeline overhead: {}, stride {}", self.overhead_clip.describe(), self.overhead_stride));
        }
        if on(Stage::Concurrency) {
            lines.push(format!("concurrency: {:?} uploads of {}, stride {}", self.concurrency, self.concurrency_clip.describe(), self.concurrency_stride));
        }
        if on(Stage::Memory) {
            let sizes: Vec<String> = self.memory_sizes.iter().map(|b| format!("{} MiB", b >> 20)).collect();
            lines.push(format!("memory: MPEG-TS of {} ({} repeated), processed at fps=0.5", sizes.join(" and "), self.memory_source.describe()));
        }
        lines
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn median_opt(values: Vec<Option<f64>>) -> Option<f64> {
    let present: Vec<f64> = values.into_iter().flatten().collect();
    (!present.is_empty()).then(|| median(present))
}

const MIB: f64 = 1024.0 * 1024.0;

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
        vec![Stage::Buffer, Stage::Decode, Stage::Model, Stage::EndToEnd, Stage::Overhead, Stage::Concurrency, Stage::Memory]
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

    fn buffer(&mut self) -> anyhow::Result<()> {
        let mut progress = self.progress.stage("buffer", self.plan.reps as u64);
        peers::reset_own_peak_rss();
        let mut rates = Vec::new();
        for _ in 0..self.plan.reps {
            let seconds = stream_through_buffer(self.plan.buffer_bytes)?;
            rates.push(self.plan.buffer_bytes as f64 / seconds / (1u64 << 30) as f64);
            progress.step("append + mapped read");
        }
        let peak = peers::peak_rss_of("/proc/self/status").unwrap_or(0) as f64 / MIB;
        self.results.buffer = Some(BufferResult { bytes: self.plan.buffer_bytes, gib_per_s: median(rates), peak_rss_mib: peak });
        progress.finish();
        Ok(())
    }

    fn decode(&mut self) -> anyhow::Result<()> {
        let mut progress = self.progress.stage("decode", 1 + 2 * self.plan.reps as u64);
        let spec = self.plan.decode_clip.clone();
        let clip = self.remuxed(&self.master("decode", &spec)?, Container::Faststart)?;
        progress.step("clip made");
        let (w, h) = letterboxed_size(spec.width, spec.height, 640);
        let (mut ours, mut theirs, mut frames) = (Vec::new(), Vec::new(), 0);
        for _ in 0..self.plan.reps {
            let (seconds, n) = decode_all(&clip)?;
            frames = n;
            ours.push(n as f64 / seconds);
            progress.step("streamdet");
            let start = Instant::now();
            media::ffmpeg_decode_scale(&clip, w, h)?;
            theirs.push(n as f64 / start.elapsed().as_secs_f64());
            progress.step("ffmpeg CLI");
        }
        self.results.decode = Some(DecodeResult { clip: spec.describe(), frames, ours_fps: median(ours), ffmpeg_fps: Some(median(theirs)) });
        progress.finish();
        Ok(())
    }

    fn model(&mut self) -> anyhow::Result<()> {
        let mut cases = vec![(self.model.clone(), 1)];
        match &self.batch_model {
            Some(batch_model) => cases.extend([(batch_model.clone(), 1), (batch_model.clone(), 4)]),
            None => self.skip("model latency of the dynamic-batch export: --batch-model not found".into()),
        }
        let ort_missing = self.peers.ort_missing();
        if let Some(why) = &ort_missing {
            self.skip(format!("ONNX Runtime: {why}"));
        }
        let mut progress = self.progress.stage("model", (cases.len() * self.plan.reps) as u64);
        for (model, batch) in cases {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let name = model.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned());
            for _ in 0..self.plan.reps {
                ours.push(peers::our_model_ms(&model, batch, self.threads, self.plan.model_runs)?);
                if ort_missing.is_none() {
                    theirs.push(Some(peers::ort_model_ms(&self.peers, &model, batch, self.threads, self.plan.model_runs)?));
                }
                progress.step(&format!("{name} batch {batch}"));
            }
            self.results.model.push(ModelRow { model: name, batch, ours_ms: median(ours), ort_ms: median_opt(theirs) });
        }
        progress.finish();
        Ok(())
    }

    fn end_to_end(&mut self) -> anyhow::Result<()> {
        let spec = self.plan.e2e_clip.clone();
        let master = self.master("e2e", &spec)?;
        let clips: Vec<(Container, PathBuf)> =
            Container::ALL.iter().map(|&c| Ok((c, self.remuxed(&master, c)?))).collect::<anyhow::Result<_>>()?;
        let seed_missing = self.peers.seed_missing();
        if let Some(why) = &seed_missing {
            self.skip(format!("the Python seed service: {why}"));
        }
        let rates = [("full speed", None), ("2 MB/s", Some(2e6))];
        let mut progress = self.progress.stage("end to end", (self.plan.reps * clips.len() * rates.len()) as u64);
        let ours = ServerProcess::ours(&self.model, self.threads, &[("STREAMDET_SERVER_MAX_SESSIONS", "8".into()), ("STREAMDET_SERVER_MAX_SESSIONS_PER_CLIENT", "0".into())])?;
        let seed = match seed_missing {
            None => Some(ServerProcess::seed(&self.peers, &self.model, self.threads)?),
            Some(_) => None,
        };
        let path = format!("/detect/video?stride={}", self.plan.e2e_stride);
        // Per (container, rate): our runs and the seed's.
        let mut runs: Vec<(Vec<UploadOutcome>, Vec<UploadOutcome>)> = vec![Default::default(); clips.len() * rates.len()];
        for rep in 0..self.plan.reps {
            for (ci, (container, clip)) in clips.iter().enumerate() {
                for (ri, (rate_name, rate)) in rates.iter().enumerate() {
                    let upload = |addr| Upload { addr, path: &path, body: clip, pacer: Pacer { rate: *rate }, chunk: 64 << 10 };
                    let outcome = upload(ours.addr).run()?;
                    if let Some(error) = &outcome.error {
                        bail!("streamdet failed on {} at {rate_name}: {error}", container.label());
                    }
                    let slot = &mut runs[ci * rates.len() + ri];
                    if rep == 0 && *container == Container::Faststart && rate.is_some() {
                        self.results.timelines.push(timeline("streamdet", container, rate_name, &outcome));
                    }
                    slot.0.push(outcome);
                    if let Some(seed) = &seed {
                        let outcome = upload(seed.addr).run()?;
                        if let Some(error) = &outcome.error {
                            self.results.skipped.push(format!("seed service on {} at {rate_name}: {error}", container.label()));
                        } else {
                            if rep == 0 && *container == Container::Faststart && rate.is_some() {
                                self.results.timelines.push(timeline("seed (Python)", container, rate_name, &outcome));
                            }
                            slot.1.push(outcome);
                        }
                    }
                    progress.step(&format!("{} at {rate_name}", container.label()));
                }
            }
        }
        for (ci, (container, _)) in clips.iter().enumerate() {
            for (ri, (rate_name, _)) in rates.iter().enumerate() {
                let (ours, seed) = &runs[ci * rates.len() + ri];
                self.results.end_to_end.push(EndToEndRow {
                    container: container.label().into(),
                    rate: rate_name.to_string(),
                    ours: summarize(ours),
                    seed: (!seed.is_empty()).then(|| summarize(seed)),
                });
            }
        }
        progress.finish();
        Ok(())
    }

    fn overhead(&mut self) -> anyhow::Result<()> {
        let mut progress = self.progress.stage("overhead", 1 + 2 * self.plan.reps as u64);
        let spec = self.plan.overhead_clip.clone();
        let clip = self.remuxed(&self.master("overhead", &spec)?, Container::Faststart)?;
        let detector = Arc::new(Detector::load_with_threads(&self.model, candle_core::Device::Cpu, self.threads).context("loading the model")?);
        let selection = FrameSelection::Stride(self.plan.overhead_stride);
        let frames = decode_selected(&clip, selection, detector.input_size())?;
        progress.step("frames decoded");
        let params = DetectParams::default();
        detector.detect(&frames[..1], &params)?; // warm-up
        let (mut alone, mut pipeline) = (Vec::new(), Vec::new());
        for _ in 0..self.plan.reps {
            let start = Instant::now();
            for frame in &frames {
                detector.detect(std::slice::from_ref(frame), &params)?;
            }
            alone.push(frames.len() as f64 / start.elapsed().as_secs_f64());
            progress.step("detector alone");
            let (processed, seconds) = run_pipeline(Arc::clone(&detector), &clip, selection, &self.config)?;
            if processed != frames.len() as u64 {
                bail!("the pipeline processed {processed} frames, the decoder selected {}", frames.len());
            }
            pipeline.push(processed as f64 / seconds);
            progress.step("pipeline");
        }
        self.results.overhead = Some(OverheadResult { frames: frames.len() as u64, detector_fps: median(alone), pipeline_fps: median(pipeline) });
        progress.finish();
        Ok(())
    }

    fn concurrency(&mut self) -> anyhow::Result<()> {
        let Some(batch_model) = self.batch_model.clone() else {
            self.skip("concurrent uploads: the dynamic-batch export (--batch-model) was not found".into());
            return Ok(());
        };
        let spec = self.plan.concurrency_clip.clone();
        let clip = self.remuxed(&self.master("concurrency", &spec)?, Container::Faststart)?;
        let counts = self.plan.concurrency.clone();
        let mut progress = self.progress.stage("concurrency", (2 * counts.len() * self.plan.reps) as u64);
        let path = format!("/detect/video?stride={}", self.plan.concurrency_stride);
        for batching in [false, true] {
            let env = [
                ("STREAMDET_SERVER_MAX_SESSIONS", counts.iter().max().copied().unwrap_or(1).to_string()),
                // Every upload comes from this one client.
                ("STREAMDET_SERVER_MAX_SESSIONS_PER_CLIENT", "0".to_string()),
                ("STREAMDET_SERVER_BATCH_SIZE", if batching { "4" } else { "1" }.to_string()),
                ("STREAMDET_SERVER_BATCH_TIMEOUT_MS", "10".to_string()),
            ];
            let server = ServerProcess::ours(&batch_model, self.threads, &env)?;
            for &n in &counts {
                let mut rates = Vec::new();
                for _ in 0..self.plan.reps {
                    let start = Instant::now();
                    let outcomes: Vec<anyhow::Result<UploadOutcome>> = std::thread::scope(|scope| {
                        let handles: Vec<_> = (0..n)
                            .map(|_| {
                                let upload = Upload { addr: server.addr, path: &path, body: &clip, pacer: Pacer { rate: None }, chunk: 64 << 10 };
                                scope.spawn(move || upload.run().map_err(anyhow::Error::from))
                            })
                            .collect();
                        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("an upload thread panicked")))).collect()
                    });
                    let seconds = start.elapsed().as_secs_f64();
                    let mut frames = 0;
                    for outcome in outcomes {
                        let outcome = outcome?;
                        if let Some(error) = outcome.error {
                            bail!("{n} concurrent uploads: {error}");
                        }
                        frames += outcome.frames;
                    }
                    rates.push(frames as f64 / seconds);
                    progress.step(&format!("{n} uploads, batching {}", if batching { "on" } else { "off" }));
                }
                self.results.concurrency.push(ConcurrencyRow { uploads: n, batching, aggregate_fps: median(rates) });
            }
        }
        progress.finish();
        Ok(())
    }

    fn memory(&mut self) -> anyhow::Result<()> {
        let sizes = self.plan.memory_sizes.clone();
        let mut progress = self.progress.stage("memory", 1 + sizes.len() as u64);
        let spec = self.plan.memory_source.clone();
        let source = self.master("memory-source", &spec)?;
        progress.step("source clip made");
        for bytes in sizes {
            let file = self.media_dir.join(format!("{}-memory-{}MiB.ts", self.plan.name, bytes >> 20));
            if !file.exists() {
                media::repeat_to_size(&source, bytes, &file)?;
            }
            let env = [("STREAMDET_SERVER_MAX_UPLOAD_BYTES", (bytes * 2).to_string())];
            let server = ServerProcess::ours(&self.model, self.threads, &env)?;
            let idle = server.peak_rss().unwrap_or(0) as f64 / MIB;
            let upload = Upload { addr: server.addr, path: "/detect/video?fps=0.5", body: &file, pacer: Pacer { rate: None }, chunk: 256 << 10 };
            let outcome = upload.run()?;
            if let Some(error) = outcome.error {
                bail!("the {} MiB upload failed: {error}", bytes >> 20);
            }
            let peak = server.peak_rss().unwrap_or(0) as f64 / MIB;
            let upload_bytes = std::fs::metadata(&file)?.len();
            self.results.memory.push(MemoryRow { upload_bytes, idle_rss_mib: idle, peak_rss_mib: peak, seconds: outcome.total_seconds });
            progress.step(&format!("{} MiB", bytes >> 20));
        }
        progress.finish();
        Ok(())
    }
}

fn timeline(server: &str, container: &Container, rate: &str, outcome: &UploadOutcome) -> NamedTimeline {
    NamedTimeline { server: server.into(), label: format!("{} at {rate}", container.label()), timeline: outcome.timeline.clone() }
}

fn summarize(outcomes: &[UploadOutcome]) -> Measured {
    let frames = outcomes.first().map_or(0, |o| o.frames);
    Measured {
        first_frame_s: median_opt(outcomes.iter().map(|o| o.first_frame_seconds).collect()),
        total_s: median(outcomes.iter().map(|o| o.total_seconds).collect()),
        frames,
        fps: median(outcomes.iter().map(|o| o.frames as f64 / o.total_seconds).collect()),
    }
}

/// The size a `width`x`height` frame takes inside a `side`-square letterbox.
fn letterboxed_size(width: u32, height: u32, side: u32) -> (u32, u32) {
    let scale = side as f64 / width.max(height) as f64;
    ((width as f64 * scale).round() as u32, (height as f64 * scale).round() as u32)
}

/// Appends `total` bytes in 64 KiB chunks while a reader thread reads them through the map;
/// seconds from the first append to the reader's last byte.
fn stream_through_buffer(total: u64) -> anyhow::Result<f64> {
    const CHUNK: usize = 64 << 10;
    let mut writer = buffer::create(&BufferOptions::default())?;
    let mut reader = writer.buffer().reader();
    let start = Instant::now();
    let reading = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut chunk = vec![0u8; CHUNK];
        let mut seen = 0;
        loop {
            match reader.read(&mut chunk)? {
                0 => return Ok(seen),
                n => seen += n as u64,
            }
        }
    });
    let chunk: Vec<u8> = (0..CHUNK).map(|i| i as u8).collect();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        writer.append(&chunk[..n])?;
        sent += n as u64;
    }
    writer.finish();
    let seen = reading.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    if seen != total {
        bail!("the reader saw {seen} of {total} bytes");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// A whole file in a finished buffer.
fn buffered(path: &Path) -> anyhow::Result<streamdet_actors::buffer::Buffer> {
    let mut writer = buffer::create(&BufferOptions::default())?;
    writer.append(&std::fs::read(path)?)?;
    Ok(writer.finish())
}

/// Decodes every frame to the model's 640x640 letterbox: (seconds, frames).
fn decode_all(path: &Path) -> anyhow::Result<(f64, u64)> {
    let buffer = buffered(path)?;
    let start = Instant::now();
    let mut decoder = Decoder::open(buffer.reader(), DecodeOptions::default())?;
    while decoder.next_frame()?.is_some() {}
    Ok((start.elapsed().as_secs_f64(), decoder.stats().selected))
}

/// The selected frames of a file, converted for the model.
fn decode_selected(path: &Path, selection: FrameSelection, target: (usize, usize)) -> anyhow::Result<Vec<streamdet_actors::detect::ModelFrame>> {
    let buffer = buffered(path)?;
    let mut decoder = Decoder::open(buffer.reader(), DecodeOptions { target, selection, ..Default::default() })?;
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame()? {
        frames.push(frame.model_frame);
    }
    Ok(frames)
}

/// The whole pipeline in this process, fed the file at full speed: (frames processed, seconds).
fn run_pipeline(detector: Arc<Detector>, path: &Path, selection: FrameSelection, config: &Config) -> anyhow::Result<(u64, f64)> {
    let bytes = bytes::Bytes::from(std::fs::read(path)?);
    let options = PipelineOptions { max_session_duration: None, ..config.pipeline_options("model".into()) };
    actix_rt::System::new().block_on(async move {
        let start = Instant::now();
        let pipeline = Pipeline::start(detector, options);
        let session = pipeline.session(SessionParams { selection, ..Default::default() })?;
        let (upload, mut events) = session.split();
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..bytes.len()).step_by(64 << 10).map(|at| Ok(bytes.slice(at..(at + (64 << 10)).min(bytes.len())))).collect();
        actix_rt::spawn(upload.feed_all(futures_util::stream::iter(chunks), UploadPace { idle: Some(Duration::from_secs(60)), min_rate: None }));
        while let Some(event) = events.recv().await {
            match event {
                streamdet_actors::actors::Event::End { frames_processed, .. } => return Ok((frames_processed, start.elapsed().as_secs_f64())),
                streamdet_actors::actors::Event::Error { message, .. } => bail!("the pipeline failed: {message}"),
                _ => {}
            }
        }
        bail!("the pipeline ended without an end event")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_letterbox_sizes() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median_opt(vec![None, Some(2.0), None]), Some(2.0));
        assert_eq!(median_opt(vec![None]), None);
        assert_eq!(letterboxed_size(1920, 1080, 640), (640, 360));
        assert_eq!(letterboxed_size(720, 1280, 640), (360, 640));
    }
}
