//! `streamdet detect-image IMAGE...`: one JSON line per image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;
use streamdet_actors::detect::{self, DetectParams, Detector, ModelFrame};

use super::ModelArgs;
use crate::cli::Failure;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
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

/// Class ids for class names, or a usage error naming the unknown one.
pub fn class_ids(detector: &Detector, names: &[String]) -> Result<Option<Vec<usize>>, Failure> {
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
                .ok_or_else(|| Failure::Usage(format!("the model has no class {name:?}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

pub fn run(args: Args, config: &Config) -> Result<ExitCode, Failure> {
    for (name, v) in [("--conf", args.conf), ("--iou", args.iou)] {
        if !(0.0..=1.0).contains(&v) {
            return Err(Failure::Usage(format!("{name} must be between 0 and 1")));
        }
    }
    let detector = args.model.load(config)?;
    let classes = class_ids(&detector, &args.classes)?;
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
