//! One image in, its detections out: the path `POST /detect` and `streamdet detect-image` share.

use streamdet_actors::ErrorCode;
use streamdet_actors::detect::{self, DetectParams, Detection, Detector, ModelFrame};

/// An image's size (as displayed, EXIF orientation applied) and what was found in it.
#[derive(Debug, serde::Serialize)]
pub struct ImageDetections {
    pub width: usize,
    pub height: usize,
    pub detections: Vec<Detection>,
}

/// Why an image has no detections: an error code of the event protocol and a message.
#[derive(Debug)]
pub struct ImageFailure {
    pub code: ErrorCode,
    pub message: String,
}

/// Decodes `bytes` (JPEG, PNG, WebP; at most `max_pixels`, checked from the header), letterboxes
/// it and runs the model. Each full-size buffer is dropped as soon as the next step has its copy.
pub fn detect_image(detector: &Detector, bytes: Vec<u8>, params: &DetectParams, max_pixels: u64) -> Result<ImageDetections, ImageFailure> {
    let (rgb, width, height) = detect::decode_image(&bytes, max_pixels).map_err(|e| ImageFailure { code: e.code(), message: e.to_string() })?;
    drop(bytes);
    let (model_rgb, letterbox) = detect::letterbox_rgb(&rgb, width, height, detector.input_size());
    drop(rgb);
    let frame = ModelFrame { rgb: model_rgb, letterbox };
    let mut found = detector.detect(std::slice::from_ref(&frame), params).map_err(|e| ImageFailure { code: ErrorCode::Internal, message: e.to_string() })?;
    Ok(ImageDetections { width, height, detections: found.pop().unwrap_or_default() })
}
