//! `streamdet detect-image IMAGE...`: one JSON line per image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;
use streamdet_actors::ErrorCode;
use streamdet_actors::detect::{DetectParams, Detector};

use super::Failure;
use super::{DetectArgs, ModelArgs};
use crate::config::Config;
use crate::image_detections::detect_image;

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
    let max_pixels = config.limits.max_image_pixels;
    let mut failed = false;
    let stdout = std::io::stdout();
    for path in &args.images {
        let line = match detect_one(&detector, path, &params, max_pixels) {
            Ok(line) => line,
            Err((code, message)) => {
                failed = true;
                eprintln!("streamdet: {}: {message}", path.display());
                json!({"type": "error", "image": path, "code": code, "message": message})
            }
        };
        writeln!(stdout.lock(), "{line}")?;
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// One image's line, or the error code and message of its error line.
fn detect_one(detector: &Detector, path: &Path, params: &DetectParams, max_pixels: u64) -> Result<serde_json::Value, (ErrorCode, String)> {
    let bytes = std::fs::read(path).map_err(|e| (ErrorCode::UnsupportedMedia, format!("cannot read it: {e}")))?;
    let found = detect_image(detector, bytes, params, max_pixels).map_err(|f| (f.code, f.message))?;
    Ok(json!({"type": "image", "image": path, "width": found.width, "height": found.height, "detections": found.detections}))
}
