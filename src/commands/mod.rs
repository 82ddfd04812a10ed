//! One module per command of the `streamdet` binary.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args as ClapArgs;
use streamdet_actors::decode::FrameSelection;
use streamdet_actors::detect::{DetectParams, Detector};

use crate::config::Config;

pub mod bench_model;
pub mod decode;
pub mod detect;
pub mod detect_image;
pub mod serve;

/// What a command reports besides success: a usage error (exit 2) or a runtime error (exit 1).
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure::Runtime(err.into())
    }
}

/// Which model to load and how many threads it may use; unset flags take the configuration's.
#[derive(Debug, ClapArgs)]
pub struct ModelArgs {
    /// ONNX model (an ultralytics detect export) [default: model.path of the configuration].
    #[arg(long, env = "STREAMDET_MODEL")]
    pub model: Option<PathBuf>,
    /// CPU threads for inference, 0 = one per core [default: model.threads].
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    pub fn path(&self, config: &Config) -> PathBuf {
        self.model.clone().unwrap_or_else(|| config.model.path.clone())
    }

    pub fn threads(&self, config: &Config) -> usize {
        self.threads.unwrap_or(config.model.threads)
    }

    pub fn load(&self, config: &Config) -> anyhow::Result<Detector> {
        let path = self.path(config);
        let device = match config.model.device.as_str() {
            "cuda" => Device::new_cuda(0).context("opening CUDA device 0")?,
            _ => Device::Cpu,
        };
        Detector::load_with_threads(&path, device, self.threads(config)).with_context(|| format!("loading {}", path.display()))
    }
}

/// Which decoded frames to process.
#[derive(Debug, ClapArgs)]
pub struct SelectionArgs {
    /// Only frames whose index is a multiple of N.
    #[arg(long, conflicts_with = "fps")]
    stride: Option<u64>,
    /// At most F frames per second of video time.
    #[arg(long)]
    fps: Option<f64>,
}

impl SelectionArgs {
    /// The flags' selection, or the configuration's (`[detect]`) when neither flag is given.
    pub fn selection(&self, config: &Config) -> Result<FrameSelection, Failure> {
        match (self.stride, self.fps) {
            (Some(0), _) => Err(Failure::Usage("--stride must be at least 1".into())),
            (Some(n), _) => Ok(FrameSelection::Stride(n)),
            (None, Some(f)) if !(f > 0.0 && f.is_finite()) => Err(Failure::Usage("--fps must be positive".into())),
            (None, Some(f)) => Ok(FrameSelection::Fps(f)),
            (None, None) => Ok(config.detect.default_selection()),
        }
    }
}

/// Thresholds and class filter of detection.
#[derive(Debug, ClapArgs)]
pub struct DetectArgs {
    /// Minimum confidence [default: detect.conf of the configuration, 0.25].
    #[arg(long)]
    conf: Option<f32>,
    /// IoU threshold of non-maximum suppression [default: detect.iou, 0.45].
    #[arg(long)]
    iou: Option<f32>,
    /// Only these classes, by name, comma-separated (e.g. `person,cat`).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
}

impl DetectArgs {
    /// Checks the thresholds (before the model loads, so a typo fails fast).
    pub fn validate(&self) -> Result<(), Failure> {
        for (name, v) in [("--conf", self.conf), ("--iou", self.iou)] {
            if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                return Err(Failure::Usage(format!("{name} must be between 0 and 1")));
            }
        }
        Ok(())
    }

    /// The parameters, with class names resolved against the model (an unknown one is a usage
    /// error).
    pub fn params(&self, detector: &Detector, config: &Config) -> Result<DetectParams, Failure> {
        let classes = if self.classes.is_empty() { None } else { Some(detector.class_ids(self.classes.iter().map(String::as_str)).map_err(Failure::Usage)?) };
        let conf = self.conf.unwrap_or(config.detect.conf);
        let iou = self.iou.unwrap_or(config.detect.iou);
        Ok(DetectParams { conf, iou, classes, ..Default::default() })
    }
}
