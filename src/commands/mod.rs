//! One module per command of the `streamdet` binary.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args as ClapArgs;
use streamdet_actors::detect::Detector;

pub mod bench_model;
pub mod decode;
pub mod detect_image;

/// Which model to load and how many threads it may use.
#[derive(Debug, ClapArgs)]
pub struct ModelArgs {
    /// ONNX model (an ultralytics detect export).
    #[arg(long, env = "STREAMDET_MODEL", default_value = "models/yolov12n.onnx")]
    pub model: PathBuf,
    /// CPU threads for inference (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Detector> {
        Detector::load_with_threads(&self.model, Device::Cpu, self.threads)
            .with_context(|| format!("loading {}", self.model.display()))
    }
}
