//! `streamdet detect-image IMAGE...`: one JSON line per image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;
use streamdet_actors::detect::{self, DetectParams, Detector, ModelFrame};

use super::{DetectArgs, ModelArgs};
use crate::cli::Failure;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// JPEG, PNG or WebP files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    detect: DetectArgs,
}

pub fn run(args: Args, config: &Config) -> Result<ExitCode, Failure> {
    args.detect.validate()?;
    let detector = args.model.load(config)?;
    let params = args.detect.params(&detector, config)?;
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
