//! A frame as the model takes it, and its geometry: letterboxing fits a frame into the model's
//! input with its aspect ratio kept, padded with gray 114, exactly as ultralytics does it — so
//! that boxes map back to the frame and detections agree with the reference pipeline.
//!
//! Decoding produces these and detection consumes them; neither module owns them.

/// A width and a height, in pixels; named, so that nobody reads one for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Size {
    pub width: usize,
    pub height: usize,
}

impl Size {
    pub fn new(width: usize, height: usize) -> Size {
        Size { width, height }
    }
}

/// A frame ready for the model: RGB at the model's input size, and where the original frame
/// sits inside it.
#[derive(Debug, Clone)]
pub struct ModelFrame {
    /// Packed RGB, `input width x input height x 3`.
    pub rgb: Vec<u8>,
    pub letterbox: Letterbox,
}

/// How a frame of `source` size was placed into the model input of `target` size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    /// Frame width and height as displayed.
    pub source: (usize, usize),
    /// Model input width and height.
    pub target: (usize, usize),
    /// Size of the scaled frame inside the input.
    pub scaled: (usize, usize),
    /// Input pixels per frame pixel.
    pub scale: f32,
    /// Left and top padding in input pixels.
    pub pad: (usize, usize),
}

/// The gray that ultralytics pads with.
pub const PAD_VALUE: u8 = 114;

/// Python's `round` (half to even), as ultralytics' arithmetic uses it.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 { 2.0 * (x / 2.0).round() } else { r }
}

impl Letterbox {
    /// Geometry for a `width x height` frame into a `target_w x target_h` input.
    pub fn new(source: (usize, usize), target: (usize, usize)) -> Letterbox {
        let (w, h) = (source.0.max(1) as f64, source.1.max(1) as f64);
        let (tw, th) = (target.0 as f64, target.1 as f64);
        let r = (th / h).min(tw / w);
        let scaled_w = (round_half_even(w * r) as usize).clamp(1, target.0);
        let scaled_h = (round_half_even(h * r) as usize).clamp(1, target.1);
        let dw = (tw - scaled_w as f64) / 2.0;
        let dh = (th - scaled_h as f64) / 2.0;
        let left = round_half_even(dw - 0.1).max(0.0) as usize;
        let top = round_half_even(dh - 0.1).max(0.0) as usize;
        Letterbox { source, target, scaled: (scaled_w, scaled_h), scale: r as f32, pad: (left, top) }
    }

    /// Maps a box `[x1, y1, x2, y2]` in input pixels back to frame pixels, clamped to the frame.
    pub fn to_source(&self, b: [f32; 4]) -> [f32; 4] {
        let (w, h) = (self.source.0 as f32, self.source.1 as f32);
        let (px, py) = (self.pad.0 as f32, self.pad.1 as f32);
        [
            ((b[0] - px) / self.scale).clamp(0.0, w),
            ((b[1] - py) / self.scale).clamp(0.0, h),
            ((b[2] - px) / self.scale).clamp(0.0, w),
            ((b[3] - py) / self.scale).clamp(0.0, h),
        ]
    }
}

/// Letterboxes packed RGB (`width x height x 3`) into a new `target` RGB buffer: bilinear
/// resampling with pixel centres aligned (OpenCV's `INTER_LINEAR`), gray padding.
pub fn letterbox_rgb(rgb: &[u8], width: usize, height: usize, target: Size) -> (Vec<u8>, Letterbox) {
    let (tw, th) = (target.width, target.height);
    let lb = Letterbox::new((width, height), (tw, th));
    let mut out = vec![PAD_VALUE; tw * th * 3];
    let (sw, sh) = lb.scaled;
    let fx = width as f32 / sw as f32;
    let fy = height as f32 / sh as f32;
    // Per output column: the two source columns and the weight of the right one.
    let columns: Vec<(usize, usize, f32)> = (0..sw)
        .map(|x| {
            let s = ((x as f32 + 0.5) * fx - 0.5).max(0.0);
            let x0 = (s.floor() as usize).min(width - 1);
            let x1 = (x0 + 1).min(width - 1);
            (x0, x1, s - x0 as f32)
        })
        .collect();
    for y in 0..sh {
        let s = ((y as f32 + 0.5) * fy - 0.5).max(0.0);
        let y0 = (s.floor() as usize).min(height - 1);
        let y1 = (y0 + 1).min(height - 1);
        let wy = s - y0 as f32;
        let row0 = &rgb[y0 * width * 3..][..width * 3];
        let row1 = &rgb[y1 * width * 3..][..width * 3];
        let dst = &mut out[((y + lb.pad.1) * tw + lb.pad.0) * 3..][..sw * 3];
        for (x, &(x0, x1, wx)) in columns.iter().enumerate() {
            for c in 0..3 {
                let top = row0[x0 * 3 + c] as f32 * (1.0 - wx) + row0[x1 * 3 + c] as f32 * wx;
                let bottom = row1[x0 * 3 + c] as f32 * (1.0 - wx) + row1[x1 * 3 + c] as f32 * wx;
                dst[x * 3 + c] = (top * (1.0 - wy) + bottom * wy).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    (out, lb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_ultralytics() {
        // 1280x720 into 640: scaled 640x360, dh = 140 -> top round(139.9)=140.
        let lb = Letterbox::new((1280, 720), (640, 640));
        assert_eq!((lb.scaled, lb.pad), ((640, 360), (0, 140)));
        // An odd remainder is split with the extra pixel at the bottom/right.
        let lb = Letterbox::new((640, 427), (640, 640));
        assert_eq!(lb.scaled, (640, 427));
        assert_eq!(lb.pad, (0, 106)); // dh = 106.5 -> top round(106.4) = 106
    }

    #[test]
    fn boxes_map_back_to_the_frame() {
        let lb = Letterbox::new((1280, 720), (640, 640));
        let b = lb.to_source([100.0, 150.0, 300.0, 500.0 + 140.0]);
        assert_eq!(b, [200.0, 20.0, 600.0, 720.0]);
        assert_eq!(lb.to_source([-10.0, 0.0, 700.0, 700.0])[0], 0.0);
    }

    #[test]
    fn letterboxed_image_keeps_a_known_rectangle() {
        // 200x100 black frame with a white rectangle at x 50..150, y 25..75.
        let (w, h) = (200, 100);
        let mut rgb = vec![0u8; w * h * 3];
        for y in 25..75 {
            for x in 50..150 {
                rgb[(y * w + x) * 3..][..3].fill(255);
            }
        }
        let (out, lb) = letterbox_rgb(&rgb, w, h, Size::new(64, 64));
        assert_eq!((lb.scaled, lb.pad), ((64, 32), (0, 16)));
        let at = |x: usize, y: usize| out[(y * 64 + x) * 3];
        assert_eq!(at(0, 0), PAD_VALUE);
        assert_eq!(at(32, 32), 255, "centre of the rectangle");
        assert_eq!(at(5, 32), 0, "left of the rectangle");
        let back = lb.to_source([16.0, 24.0, 48.0, 40.0]);
        assert_eq!(back, [50.0, 25.0, 150.0, 75.0]);
    }
}
