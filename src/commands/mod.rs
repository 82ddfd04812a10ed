//! One module per command of the `streamdet` binary.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args as ClapArgs;
use streamdet_actors::detect::Detector;

use crate::config::Config;

pub mod bench_model;
pub mod decode;
pub mod detect;
pub mod detect_image;

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
