//! Object detection with ultralytics ONNX exports (YOLOv8, YOLO11, YOLOv12) on candle tensors.
//!
//! [`Detector::load`] reads and plans a model once; [`Detector::detect`] takes letterboxed RGB
//! frames (see [`letterbox`]) and returns detections in frame pixels.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use kernels::parallel::{self, Team};

mod allocator;
mod engine;
mod image;
// Crate-private: safe calls into the kernels rely on checks made where their inputs are built.
// The micro-benchmarks (`benches/conv.rs`) reach them through the `bench-internals` feature.
#[cfg(feature = "bench-internals")]
pub mod kernels;
#[cfg(not(feature = "bench-internals"))]
pub(crate) mod kernels;
pub mod model;
mod onnx_proto;
pub mod postprocess;
mod views;

pub use self::image::{ImageError, decode_image};
pub use crate::frame::{Letterbox, ModelFrame, Size, letterbox_rgb};
pub use allocator::LineAligned;
pub use engine::{Engine, Kernels, OpProfile, StepTime, StepTimes};
pub use kernels::isa::cpu_kernels;
pub use model::ModelInfo;
pub use postprocess::{DetectParams, Detection};

/// Everything that can go wrong loading or running a model, or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a usable model: {message}")]
    BadModel { path: PathBuf, message: String },
    #[error("the model is not usable: {0}")]
    BadModelText(String),
    #[error("node {node:?} ({op}) is not supported: {message}")]
    Unsupported { node: String, op: String, message: String },
    #[error("node {node:?} ({op}) failed: {message}")]
    Execution { node: String, op: String, message: String },
    #[error("tensor error: {0}")]
    Tensor(#[source] candle_core::Error),
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("cannot start the inference threads: {0}")]
    Threads(#[source] rayon::ThreadPoolBuildError),
    #[error("cannot start the kernels' helper threads: {0}")]
    Helpers(#[source] std::io::Error),
    #[error("{path} is not a readable image: {message}")]
    BadImage { path: PathBuf, message: String },
}

impl DetectError {
    pub(crate) fn from_candle(err: candle_core::Error) -> Self {
        DetectError::Tensor(err)
    }
}

/// Whether the model takes any batch size or a fixed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// The batch dimension is symbolic: N frames may run as one call (they do on a GPU).
    Dynamic,
    /// The export fixed the batch size (the default model: 1): N frames run as N calls.
    Fixed(usize),
}

/// A loaded, planned model and the threads it runs on.
#[derive(Debug)]
pub struct Detector {
    engine: Engine,
    info: ModelInfo,
    batch: BatchMode,
    /// Frames per call to the engine; `None`: the whole batch in one call.
    frames_per_call: Option<usize>,
    classes: usize,
    pool: rayon::ThreadPool,
    /// The kernels' parallel loops run on this team, led by the thread that calls the model.
    team: Team,
}

impl Detector {
    /// Loads `path` for `device`, running CPU work on all cores.
    pub fn load(path: &Path, device: Device) -> Result<Self, DetectError> {
        Self::load_with_threads(path, device, 0)
    }

    /// Loads `path` for `device`; CPU kernels use `threads` threads (0: one per core).
    pub fn load_with_threads(path: &Path, device: Device, threads: usize) -> Result<Self, DetectError> {
        Self::load_with(path, device, threads, Kernels::Native)
    }

    /// Loads `path` for `device` with the given kernels: [`Kernels::Generic`] runs candle's
    /// operations for every step, as a GPU build does, on whatever device.
    ///
    /// On the CPU, the first load sets glibc's allocator to serve blocks up to 32 MiB from its
    /// heap and keep up to 1 GiB of freed heap for the next call, process-wide (unless
    /// `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` is set): a call's activations are
    /// then not page-faulted afresh every call (see `detect/allocator.rs`).
    pub fn load_with(path: &Path, device: Device, threads: usize, kernels: Kernels) -> Result<Self, DetectError> {
        let model = model::OnnxModel::load(path)?;
        let bad = |message: String| DetectError::BadModel { path: path.to_path_buf(), message };
        let input = model.inputs.first().ok_or_else(|| bad("the graph has no input".into()))?;
        if input.shape.len() != 4 || input.shape[1].is_some_and(|c| c != 3) {
            return Err(bad(format!("expected a [batch, 3, height, width] input, got {:?}", input.shape)));
        }
        let batch = match input.shape[0] {
            Some(n) => BatchMode::Fixed(n),
            None => BatchMode::Dynamic,
        };
        let info = ModelInfo::from_metadata(&model.metadata, input).map_err(bad)?;
        let engine = Engine::plan_with(&model, &device, kernels)?;
        if device.is_cpu() {
            allocator::keep_freed_memory_for_the_next_call();
        }
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("streamdet-infer-{i}")).build().map_err(DetectError::Threads)?;
        let team = Team::new(pool.current_num_threads(), "streamdet-kernels").map_err(DetectError::Helpers)?;
        let frames_per_call = match batch {
            BatchMode::Fixed(n) => Some(n),
            // On the CPU kernels a dynamic batch runs one frame at a time too: one frame's
            // activations at 640x640 stay in the L3 cache from layer to layer, four frames'
            // go through memory. Measured on YOLO11n, four frames, 2 threads: 113 ms in one
            // call, 102 ms frame by frame (medians of five runs). A GPU (and candle's
            // operations) gain from the batch.
            BatchMode::Dynamic if device.is_cpu() && kernels == Kernels::Native => Some(1),
            BatchMode::Dynamic => None,
        };
        let mut detector = Detector { engine, info, batch, frames_per_call, classes: 0, pool, team };
        detector.classes = match &detector.info.class_names {
            names if !names.is_empty() => names.len(),
            // No `names` metadata: the output's rows (4 box coordinates, then one score per
            // class) say how many classes there are; the classes are then known by number.
            _ => {
                let classes = detector.probe_classes().map_err(|e| bad(format!("cannot find its number of classes: {e}")))?;
                detector.info.class_names = (0..classes).map(|i| i.to_string()).collect();
                classes
            }
        };
        Ok(detector)
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn class_names(&self) -> &[String] {
        &self.info.class_names
    }

    /// The ids of the classes named (surrounding spaces ignored); an error names the first
    /// class the model does not have.
    pub fn class_ids<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Vec<usize>, String> {
        names
            .into_iter()
            .map(|name| self.class_names().iter().position(|c| c == name.trim()).ok_or_else(|| format!("the model has no class {name:?}")))
            .collect()
    }

    /// Model input width and height.
    pub fn input_size(&self) -> Size {
        self.info.input_size
    }

    pub fn batch_mode(&self) -> BatchMode {
        self.batch
    }

    pub fn device(&self) -> &Device {
        self.engine.device()
    }

    /// Runs the model on a `[n, 3, h, w]` f32 tensor and returns its raw output
    /// (`[n, 4 + classes, anchors]`), splitting the batch into calls for fixed-batch models.
    pub fn run_raw(&self, input: &Tensor) -> Result<Tensor, DetectError> {
        self.run_batches(input, None)
    }

    /// Runs like [`run_raw`](Self::run_raw) and returns the time spent per operator type.
    pub fn profile(&self, input: &Tensor) -> Result<OpProfile, DetectError> {
        let mut profile = OpProfile::new();
        for step in self.profile_steps(input)? {
            let entry = profile.entry(step.op).or_default();
            entry.0 += step.ms;
            entry.1 += 1;
        }
        Ok(profile)
    }

    /// Runs like [`run_raw`](Self::run_raw) and returns the time of each step, in the order
    /// they ran (a model of fixed batch size runs its steps once per call). The steps are named
    /// here, on the caller's thread, not on the one that ran them ([`Engine::run_timed`]).
    pub fn profile_steps(&self, input: &Tensor) -> Result<Vec<StepTime>, DetectError> {
        let mut runs = Vec::new();
        self.run_batches(input, Some(&mut runs))?;
        Ok(runs.iter().flat_map(|times| self.engine.describe(times)).collect())
    }

    fn run_batches(&self, input: &Tensor, times: Option<&mut Vec<StepTimes>>) -> Result<Tensor, DetectError> {
        let input = input.to_device(self.engine.device()).map_err(DetectError::from_candle)?;
        self.pool.install(|| self.team.lead(|| self.run_on_team(&input, times)))
    }

    /// The body of [`run_batches`](Self::run_batches), on the leader of the kernels' team.
    ///
    /// A batch of several calls' frames (a model of fixed batch size, or frame by frame on the
    /// CPU kernels: `frames_per_call`) whose calls share out evenly among the team's threads
    /// runs as that many calls side by side, each on one thread with its kernels' loops serial,
    /// rather than one call after the other on all threads: then no thread reads what another
    /// wrote and no loop waits for another thread. On a cloud VM whose two vCPUs sometimes sat
    /// on different parts of the host (a round trip between them of some 340 ns instead of
    /// 70: `cargo bench --bench conv -- cores`), YOLO11n's four frames took 155-162 ms a call
    /// on the team, where two processes of one thread and two frames each took 111-116 ms; side
    /// by side they took 117-128 ms. With the vCPUs close, 117-122 ms either way. Profiles
    /// (`times`) keep to one call at a time, whose steps they time.
    fn run_on_team(&self, input: &Tensor, mut times: Option<&mut Vec<StepTimes>>) -> Result<Tensor, DetectError> {
        let n = input.dim(0).map_err(DetectError::from_candle)?;
        let size = match self.frames_per_call {
            Some(size) if size != n => {
                if size == 0 || n % size != 0 {
                    return Err(DetectError::BadInput(format!("the model takes batches of {size}, got {n}")));
                }
                size
            }
            _ => return self.run_part(input.clone(), times),
        };
        let calls = n / size;
        let part = |i: usize| input.narrow(0, i * size, size).map_err(DetectError::from_candle);
        let threads = parallel::threads();
        let outputs = if times.is_none() && threads > 1 && calls.is_multiple_of(threads) && self.engine.device().is_cpu() {
            parallel::map(calls, |i| self.engine.run(part(i)?)).into_iter().collect::<Result<Vec<_>, _>>()?
        } else {
            let mut outputs = Vec::with_capacity(calls);
            for i in 0..calls {
                outputs.push(self.run_part(part(i)?, times.as_deref_mut())?);
            }
            outputs
        };
        Tensor::cat(&outputs, 0).map_err(DetectError::from_candle)
    }

    fn run_part(&self, input: Tensor, times: Option<&mut Vec<StepTimes>>) -> Result<Tensor, DetectError> {
        match times {
            Some(times) => {
                let (output, run) = self.engine.run_timed(input)?;
                times.push(run);
                Ok(output)
            }
            None => self.engine.run(input),
        }
    }

    /// Turns letterboxed frames into the model's input: f32 NCHW scaled to 0..1, in one pass.
    pub fn input_tensor(&self, frames: &[ModelFrame]) -> Result<Tensor, DetectError> {
        let Size { width: w, height: h } = self.input_size();
        let plane = w * h;
        let mut data = vec![0f32; frames.len() * 3 * plane];
        for (frame, dst) in frames.iter().zip(data.chunks_exact_mut(3 * plane)) {
            if frame.rgb.len() != plane * 3 {
                return Err(DetectError::BadInput(format!("a frame has {} bytes, the model takes {w}x{h} RGB ({} bytes)", frame.rgb.len(), plane * 3)));
            }
            let (r, rest) = dst.split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            for (i, px) in frame.rgb.chunks_exact(3).enumerate() {
                r[i] = px[0] as f32 * (1.0 / 255.0);
                g[i] = px[1] as f32 * (1.0 / 255.0);
                b[i] = px[2] as f32 * (1.0 / 255.0);
            }
        }
        Tensor::from_vec(data, (frames.len(), 3, h, w), &Device::Cpu).map_err(DetectError::from_candle)
    }

    /// The number of classes the model scores, from one run on a blank frame.
    fn probe_classes(&self) -> Result<usize, DetectError> {
        let Size { width: w, height: h } = self.input_size();
        let batch = match self.batch {
            BatchMode::Fixed(n) => n.max(1),
            BatchMode::Dynamic => 1,
        };
        let input = Tensor::zeros((batch, 3, h, w), candle_core::DType::F32, &Device::Cpu).map_err(DetectError::from_candle)?;
        let (_, rows, _) = self.run_raw(&input)?.dims3().map_err(DetectError::from_candle)?;
        rows.checked_sub(4).filter(|&c| c > 0).ok_or_else(|| DetectError::BadModelText(format!("the output has {rows} rows: no class scores")))
    }

    /// Detects objects in each frame.
    pub fn detect(&self, frames: &[ModelFrame], params: &DetectParams) -> Result<Vec<Vec<Detection>>, DetectError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let input = self.input_tensor(frames)?;
        let output = self.run_raw(&input)?;
        self.detections(&output, frames, params)
    }

    /// The detections a raw output tensor holds for `frames`: thresholds, NMS, boxes mapped
    /// back to each frame.
    pub fn detections(&self, output: &Tensor, frames: &[ModelFrame], params: &DetectParams) -> Result<Vec<Vec<Detection>>, DetectError> {
        let (n, rows, anchors) = output.dims3().map_err(DetectError::from_candle)?;
        if n != frames.len() || rows != 4 + self.classes {
            return Err(DetectError::BadModelText(format!(
                "output shape [{n}, {rows}, {anchors}] does not fit {} frames and {} classes",
                frames.len(),
                self.classes
            )));
        }
        let flat = output.to_device(&Device::Cpu).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(DetectError::from_candle)?;
        Ok(frames
            .iter()
            .zip(flat.chunks_exact(rows * anchors))
            .map(|(frame, out)| postprocess::detections(out, anchors, &self.info.class_names, &frame.letterbox, params))
            .collect())
    }
}

/// The pixel limit of [`read_image`]: the default of `limits.max_image_pixels` in the service's
/// configuration.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 40_000_000;

/// Reads an image file (JPEG, PNG, WebP) of at most [`DEFAULT_MAX_IMAGE_PIXELS`] pixels, applies
/// its EXIF orientation, and returns packed RGB with its displayed width and height.
pub fn read_image(path: &Path) -> Result<(Vec<u8>, usize, usize), DetectError> {
    let bytes = std::fs::read(path).map_err(|source| DetectError::Io { path: path.to_path_buf(), source })?;
    decode_image(&bytes, DEFAULT_MAX_IMAGE_PIXELS).map_err(|e| DetectError::BadImage { path: path.to_path_buf(), message: e.to_string() })
}
