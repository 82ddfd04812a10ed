//! One conversion per selected frame: swscale scales and converts the decoded frame (in the
//! stream's own colour matrix and range) straight to the letterboxed size as RGB, and the copy
//! into the padded model input applies the display rotation.

use ffmpeg_next::{self as ff, ffi};

use super::DecodeError;
use crate::frame::{Letterbox, ModelFrame, PAD_VALUE};

/// Clockwise rotation that displays the coded frame upright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    None,
    Cw90,
    Cw180,
    Cw270,
}

impl Rotation {
    /// From the stream's display matrix, as FFmpeg's own autorotation reads it.
    pub fn of_stream(stream: &ff::format::stream::Stream) -> Rotation {
        for side in stream.side_data() {
            if side.kind() == ff::packet::side_data::Type::DisplayMatrix && side.data().len() >= 36 {
                let matrix: Vec<i32> = side.data().chunks_exact(4).take(9).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
                // SAFETY: `matrix` holds the 9 integers av_display_rotation_get reads.
                let ccw = unsafe { ffi::av_display_rotation_get(matrix.as_ptr()) };
                return Rotation::from_clockwise_degrees(-ccw);
            }
        }
        Rotation::None
    }

    pub fn from_clockwise_degrees(degrees: f64) -> Rotation {
        if !degrees.is_finite() {
            return Rotation::None;
        }
        match (degrees.round() as i64).rem_euclid(360) {
            45..=134 => Rotation::Cw90,
            135..=224 => Rotation::Cw180,
            225..=314 => Rotation::Cw270,
            _ => Rotation::None,
        }
    }

    fn swaps_axes(self) -> bool {
        matches!(self, Rotation::Cw90 | Rotation::Cw270)
    }

    /// Width and height as displayed, for a coded `width x height`.
    pub fn displayed(self, width: u32, height: u32) -> (u32, u32) {
        if self.swaps_axes() { (height, width) } else { (width, height) }
    }
}

/// Scaler state, rebuilt only when the decoded frames change size or format.
pub struct FrameConverter {
    target: (usize, usize),
    rotation: Rotation,
    scaler: Option<(ScalerKey, ff::software::scaling::Context)>,
    scaled: ff::frame::Video,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct ScalerKey {
    format: ff::format::Pixel,
    width: u32,
    height: u32,
    space: ff::color::Space,
    range: ff::color::Range,
}

/// swscale's coefficient table for a stream's matrix; unspecified follows what players do
/// (BT.709 for HD, BT.601 below).
fn sws_colorspace(space: ff::color::Space, height: u32) -> i32 {
    match space {
        ff::color::Space::BT709 => ffi::SWS_CS_ITU709,
        ff::color::Space::BT2020NCL | ff::color::Space::BT2020CL => ffi::SWS_CS_BT2020,
        ff::color::Space::SMPTE240M => ffi::SWS_CS_SMPTE240M,
        ff::color::Space::FCC => ffi::SWS_CS_FCC,
        ff::color::Space::BT470BG | ff::color::Space::SMPTE170M => ffi::SWS_CS_ITU601,
        _ if height >= 720 => ffi::SWS_CS_ITU709,
        _ => ffi::SWS_CS_ITU601,
    }
}

impl FrameConverter {
    pub fn new(target: (usize, usize), rotation: Rotation) -> Self {
        FrameConverter { target, rotation, scaler: None, scaled: ff::frame::Video::empty() }
    }

    /// Letterboxes `frame` into a model input.
    pub fn convert(&mut self, frame: &ff::frame::Video) -> Result<ModelFrame, DecodeError> {
        let (w, h) = (frame.width(), frame.height());
        let (dw, dh) = self.rotation.displayed(w, h);
        let letterbox = Letterbox::new((dw as usize, dh as usize), self.target);
        let (sw, sh) = letterbox.scaled;
        // The scaler produces the scaled frame in coded orientation; the copy rotates it.
        let (cw, ch) = if self.rotation.swaps_axes() { (sh as u32, sw as u32) } else { (sw as u32, sh as u32) };
        let key = ScalerKey { format: frame.format(), width: w, height: h, space: frame.color_space(), range: frame.color_range() };
        if self.scaler.as_ref().is_none_or(|(k, _)| *k != key) {
            let mut scaler = ff::software::scaling::Context::get(
                key.format,
                w,
                h,
                ff::format::Pixel::RGB24,
                cw,
                ch,
                ff::software::scaling::Flags::BILINEAR | ff::software::scaling::Flags::ACCURATE_RND,
            )
            .map_err(|e| DecodeError::Internal(format!("cannot convert {:?} frames: {e}", key.format)))?;
            let full_range = key.range == ff::color::Range::JPEG;
            // SAFETY: the scaler is valid; the coefficient tables are static data of libswscale.
            unsafe {
                let coefficients = ffi::sws_getCoefficients(sws_colorspace(key.space, h));
                let rgb = ffi::sws_getCoefficients(ffi::SWS_CS_DEFAULT);
                ffi::sws_setColorspaceDetails(scaler.as_mut_ptr(), coefficients, i32::from(full_range), rgb, 1, 0, 1 << 16, 1 << 16);
            }
            self.scaled = ff::frame::Video::new(ff::format::Pixel::RGB24, cw, ch);
            self.scaler = Some((key, scaler));
        }
        let (_, scaler) = self.scaler.as_mut().expect("scaler was just built");
        scaler.run(frame, &mut self.scaled).map_err(|e| DecodeError::Internal(format!("conversion failed: {e}")))?;
        let (tw, th) = self.target;
        let mut rgb = vec![PAD_VALUE; tw * th * 3];
        let stride = self.scaled.stride(0);
        let src = self.scaled.data(0);
        let (cw, ch) = (cw as usize, ch as usize);
        let (px, py) = letterbox.pad;
        let pixel = |x: usize, y: usize| &src[y * stride + x * 3..][..3];
        for y in 0..sh {
            let dst = &mut rgb[((py + y) * tw + px) * 3..][..sw * 3];
            match self.rotation {
                Rotation::None => dst.copy_from_slice(&src[y * stride..][..sw * 3]),
                Rotation::Cw180 => {
                    for (x, d) in dst.chunks_exact_mut(3).enumerate() {
                        d.copy_from_slice(pixel(cw - 1 - x, ch - 1 - y));
                    }
                }
                Rotation::Cw90 => {
                    for (x, d) in dst.chunks_exact_mut(3).enumerate() {
                        d.copy_from_slice(pixel(y, ch - 1 - x));
                    }
                }
                Rotation::Cw270 => {
                    for (x, d) in dst.chunks_exact_mut(3).enumerate() {
                        d.copy_from_slice(pixel(cw - 1 - y, x));
                    }
                }
            }
        }
        Ok(ModelFrame { rgb, letterbox })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_from_degrees() {
        assert_eq!(Rotation::from_clockwise_degrees(90.0), Rotation::Cw90);
        assert_eq!(Rotation::from_clockwise_degrees(-90.0), Rotation::Cw270);
        assert_eq!(Rotation::from_clockwise_degrees(180.0), Rotation::Cw180);
        assert_eq!(Rotation::from_clockwise_degrees(0.0), Rotation::None);
        assert_eq!(Rotation::from_clockwise_degrees(f64::NAN), Rotation::None);
        assert_eq!(Rotation::Cw90.displayed(1280, 720), (720, 1280));
    }
}
