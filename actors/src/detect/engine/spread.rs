//! Convolution outputs whose channel planes lie further apart than their size, so that the
//! next convolution's reads of many planes at the same pixel spread over the L1 cache sets
//! ([`spread_plane_pitch`]): a tensor of `[n, c, h + extra, w]` seen through `narrow` as
//! `[n, c, h, w]`. Only outputs that every reader takes in place get them: the convolutions
//! (which read channel planes at any pitch, `InputPart::plane_stride`) and channel splits that
//! only convolutions read. Any other reader would copy the tensor first.
//!
//! On a Zen 3 (AVX2), 2 threads, rounds in one process alternating with packed planes (median
//! of the paired ratios, two sittings each): YOLOv12n and YOLO11n 0.98-0.99 of their time, all
//! of it in the 1x1 layers at 160x160 (0.72-0.86); the other layers level.

use candle_core::{Device, Tensor};

use super::{CResult, Op, Step, Target};
use crate::detect::kernels::cache::spread_plane_pitch;

/// `STREAMDET_SPREAD_PLANES=off` keeps every output's planes packed, to compare the two.
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("STREAMDET_SPREAD_PLANES").map_or(true, |v| v != "off"))
}

/// Marks the convolutions whose outputs may have spread planes: on the CPU kernels, every
/// reader a convolution of stride 1 or a channel split that only such convolutions read, and
/// not the graph's output. Strided readers gain nothing from spread planes (their input rows
/// are read in place, a few at a time): in YOLOv12n, 16 -> 32 channels from 320x320 and 64 ->
/// 64 from 160x160, both stride 2, took 1.06-1.08 of their time on them.
pub(super) fn mark_spread_outputs(mut steps: Vec<Step>, output_slot: usize, target: &Target) -> Vec<Step> {
    if !target.native || !enabled() {
        return steps;
    }
    let readers = |slot: usize| steps.iter().filter(move |s| s.inputs.contains(&Some(slot)));
    let stride_one_conv = |s: &Step| matches!(&s.op, Op::Conv(c) if c.conv.spec().stride == (1, 1));
    let only_convs = |slot: usize| slot != output_slot && readers(slot).all(stride_one_conv);
    let spread: Vec<bool> = steps
        .iter()
        .map(|step| {
            let Op::Conv(conv) = &step.op else { return false };
            let &[out] = step.outputs.as_slice() else { return false };
            let channel_split = |s: &Step| matches!(s.op, Op::Split { axis: 1 | -3, .. }) && s.inputs.first() == Some(&Some(out));
            conv.candle.is_none()
                && out != output_slot
                && readers(out).next().is_some()
                && readers(out).all(|s| stride_one_conv(s) || (channel_split(s) && s.outputs.iter().all(|&o| only_convs(o))))
        })
        .collect();
    for (step, spread) in steps.iter_mut().zip(spread) {
        if let Op::Conv(conv) = &mut step.op {
            conv.spread_output = spread;
        }
    }
    steps
}

/// The pitch of `t`'s channel planes when its data, from its start offset, is
/// `[n][c][pitch]` with each plane's `h x w` pixels first (a row-major tensor, or one made by
/// [`planes_tensor`]); `None` otherwise.
pub(super) fn plane_pitch(t: &Tensor) -> Option<usize> {
    match (t.dims(), t.layout().stride()) {
        (&[n, c, h, w], &[s0, pitch, s2, 1]) if s2 == w && pitch >= h * w && w > 0 && pitch.is_multiple_of(w) && (n == 1 || s0 == c * pitch) => Some(pitch),
        _ => None,
    }
}

/// The pitch for a convolution's `oh x ow` output planes: spread when `spread` and the kernel
/// writes such planes, packed otherwise.
pub(super) fn output_pitch(spread: bool, writes_pitched: bool, oh: usize, ow: usize) -> usize {
    if spread && writes_pitched { spread_plane_pitch(oh, ow) } else { oh * ow }
}

/// `data`, `[n][c][pitch]` with each plane's `h x w` pixels first, as a `[n, c, h, w]` tensor.
pub(super) fn planes_tensor(data: Vec<f32>, [n, c, h, w]: [usize; 4], pitch: usize) -> CResult<Tensor> {
    if pitch == h * w {
        return Tensor::from_vec(data, (n, c, h, w), &Device::Cpu);
    }
    if w == 0 || !pitch.is_multiple_of(w) || pitch < h * w {
        candle_core::bail!("a pitch of {pitch} for planes of {h}x{w}");
    }
    Tensor::from_vec(data, (n, c, pitch / w, w), &Device::Cpu)?.narrow(2, 0, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_planes_read_as_the_tensor_they_hold() {
        let (n, c, h, w) = (2, 3, 4, 5);
        let pitch = (h + 2) * w;
        let data: Vec<f32> = (0..n * c * pitch).map(|i| if i % pitch < h * w { i as f32 } else { 0.0 }).collect();
        let t = planes_tensor(data.clone(), [n, c, h, w], pitch).unwrap();
        assert_eq!(t.dims(), &[n, c, h, w]);
        assert_eq!(plane_pitch(&t), Some(pitch));
        let want: Vec<f32> = data.chunks_exact(pitch).flat_map(|p| p[..h * w].iter().copied()).collect();
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // A channel split keeps the pitch at batch 1 only (its images lie further apart).
        assert_eq!(plane_pitch(&t.narrow(1, 1, 2).unwrap()), None);
        let single = planes_tensor(data[..c * pitch].to_vec(), [1, c, h, w], pitch).unwrap();
        assert_eq!(plane_pitch(&single.narrow(1, 1, 2).unwrap()), Some(pitch));
        // A packed tensor's pitch is its planes' size; a transposed one has none.
        let packed = Tensor::zeros((n, c, h, w), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(plane_pitch(&packed), Some(h * w));
        assert_eq!(plane_pitch(&packed.transpose(2, 3).unwrap()), None);
        assert!(planes_tensor(vec![0.0; 10], [1, 1, 2, 3], 7).is_err());
    }
}
