//! Medians and the other small arithmetic of the report.

use super::client::UploadOutcome;
use super::report::Measured;

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub fn median_opt(values: Vec<Option<f64>>) -> Option<f64> {
    let present: Vec<f64> = values.into_iter().flatten().collect();
    (!present.is_empty()).then(|| median(present))
}

pub const MIB: f64 = 1024.0 * 1024.0;

pub fn summarize(outcomes: &[UploadOutcome]) -> Measured {
    let frames = outcomes.first().map_or(0, |o| o.frames);
    Measured {
        first_frame_s: median_opt(outcomes.iter().map(|o| o.first_frame_seconds).collect()),
        total_s: median(outcomes.iter().map(|o| o.total_seconds).collect()),
        frames,
        fps: median(outcomes.iter().map(|o| o.frames as f64 / o.total_seconds).collect()),
    }
}

/// The size a `width`x`height` frame takes inside a `side`-square letterbox.
pub fn letterboxed_size(width: u32, height: u32, side: u32) -> (u32, u32) {
    let scale = side as f64 / width.max(height) as f64;
    ((width as f64 * scale).round() as u32, (height as f64 * scale).round() as u32)
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
