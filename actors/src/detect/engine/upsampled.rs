//! A pointwise convolution of a channel concatenation one of whose parts is a nearest-neighbour
//! upsampling (a YOLO neck: `Conv1x1(Concat(Resize(a), b))`), computed with that part's share
//! of the product at the low resolution.
//!
//! A 1x1 convolution is linear in each input pixel, and nearest-neighbour upsampling only
//! repeats pixels, so `W · up(a) = up(W_a · a)`: the product over `a`'s channels runs on the
//! small image (a quarter of the pixels at a factor of 2), the rest of the product on the other
//! parts at full size, and one pass over the output adds the repeated low-resolution sums, the
//! bias and the activation. The upsampled tensor is never made. In YOLOv12n's neck, 384 -> 64
//! channels at 40x40 (256 of them upsampled from 20x20) and 256 -> 32 at 80x80 (128 from
//! 40x40) do half and five eighths of their multiplies, and the two `Resize` steps go.

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use super::custom_ops::CpuUpsample;
use super::eval::{conv_of_parts, conv_parts_in_place, input_part, with_cpu_storages};
use super::fold::CONV_MORE_PARTS;
use super::spread;
use super::{CResult, ConvOp, Op, Step, Target, blocked};
use crate::detect::kernels::activation::{Activation, bias_activation};
use crate::detect::kernels::conv::{Conv2d, ConvInput, ConvSpec};
use crate::detect::kernels::parallel;

/// Which part of a convolution's concatenation arrives before its upsampling, and the
/// convolution split along that part's channels (made at the first run, when the parts'
/// channel counts are known).
#[derive(Debug)]
pub(super) struct UpsampledPart {
    part: usize,
    /// The `Resize`'s scales along rows and columns.
    factors: (usize, usize),
    split: OnceLock<Option<Split>>,
}

/// The convolution's weights split in two, both without bias or activation: `low` over the
/// upsampled part's channels (`channels` from `offset`), `rest` over the others.
#[derive(Debug)]
struct Split {
    offset: usize,
    channels: usize,
    low: Conv2d,
    rest: Conv2d,
}

impl UpsampledPart {
    fn new(part: usize, factors: (usize, usize)) -> Self {
        UpsampledPart { part, factors, split: OnceLock::new() }
    }

    /// Where the convolution step takes the upsampled part among its inputs.
    pub(super) fn input_index(&self) -> usize {
        if self.part == 0 { 0 } else { CONV_MORE_PARTS + self.part - 1 }
    }

    /// The split for the part at input channels `offset..offset + channels`: the one made at
    /// the first run, or `None` when this run's parts differ from that run's.
    fn split(&self, conv: &Conv2d, offset: usize, channels: usize) -> Option<&Split> {
        let split = self.split.get_or_init(|| Split::new(conv, offset, channels)).as_ref()?;
        (split.offset == offset && split.channels == channels).then_some(split)
    }
}

impl Split {
    /// `None` unless the part leaves channels on both sides of the split.
    fn new(conv: &Conv2d, offset: usize, channels: usize) -> Option<Self> {
        let spec = conv.spec();
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        if channels == 0 || channels >= cin || offset.checked_add(channels)? > cin {
            return None;
        }
        let linear = |in_channels| ConvSpec { in_channels, activation: Activation::Identity, ..*spec };
        let columns = |keep: &dyn Fn(usize) -> bool| -> Vec<f32> {
            conv.weights().chunks_exact(cin).flat_map(|row| row.iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, &w)| w)).collect()
        };
        let inside = |i: usize| (offset..offset + channels).contains(&i);
        let make = |in_channels, weights| {
            let conv2d = Conv2d::new(linear(in_channels), weights, vec![0.0; cout]).ok()?;
            match conv.isa() {
                Some(isa) => conv2d.with_weights_packed_for(isa).ok(),
                None => Some(conv2d),
            }
        };
        Some(Split { offset, channels, low: make(channels, columns(&inside))?, rest: make(cin - channels, columns(&|i| !inside(i)))? })
    }
}

/// Lets pointwise convolutions that read a channel concatenation in parts
/// ([`fold_concats_into_convs`](super::fold::fold_concats_into_convs)) take a part that a
/// nearest-neighbour `Resize` makes, and that nothing else reads, before the `Resize`, which
/// goes away. Only on the CPU, for convolutions without a residual, and for a `Resize` by
/// constant whole scales.
pub(super) fn fold_upsampled_parts(mut steps: Vec<Step>, constants: &HashMap<usize, Tensor>, output_slot: usize, target: &Target) -> Vec<Step> {
    if !target.native {
        return steps;
    }
    let mut dead = vec![false; steps.len()];
    for i in 0..steps.len() {
        let Op::Conv(c) = &steps[i].op else { continue };
        let spec = c.conv.spec();
        let pointwise = spec.kernel == (1, 1) && spec.stride == (1, 1) && spec.pads == (0, 0, 0, 0) && spec.groups == 1;
        let residual = steps[i].inputs.get(3).copied().flatten().is_some();
        if c.concat_parts == 0 || c.upsampled.is_some() || !pointwise || residual {
            continue;
        }
        let part_slots: Vec<Option<usize>> = std::iter::once(steps[i].inputs[0]).chain(steps[i].inputs.iter().skip(CONV_MORE_PARTS).copied()).collect();
        let resized = part_slots.iter().enumerate().find_map(|(part, &slot)| {
            let slot = slot?;
            let producer = steps.iter().position(|s| s.outputs.contains(&slot))?;
            let resize = &steps[producer];
            let read_once = steps.iter().flat_map(|s| &s.inputs).filter(|&&s| s == Some(slot)).count() == 1;
            let factors = whole_scales(resize, constants)?;
            (matches!(resize.op, Op::ResizeNearest) && !dead[producer] && read_once && slot != output_slot && resize.outputs.len() == 1)
                .then(|| (part, producer, resize.inputs[0], factors))
        });
        let Some((part, producer, Some(low_slot), factors)) = resized else { continue };
        let upsampled = UpsampledPart::new(part, factors);
        steps[i].inputs[upsampled.input_index()] = Some(low_slot);
        if let Op::Conv(c) = &mut steps[i].op {
            c.upsampled = Some(upsampled);
        }
        dead[producer] = true;
    }
    steps.into_iter().zip(dead).filter(|(_, d)| !d).map(|(s, _)| s).collect()
}

/// The scales along rows and columns of a `Resize` whose scales are constant whole numbers
/// `[1, 1, fy, fx]` (and that has no sizes).
fn whole_scales(resize: &Step, constants: &HashMap<usize, Tensor>) -> Option<(usize, usize)> {
    if resize.inputs.get(3).copied().flatten().is_some() {
        return None;
    }
    let scales = constants.get(&resize.inputs.get(2).copied().flatten()?)?;
    let scales = scales.to_dtype(DType::F32).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok()?;
    let whole = |s: f32| (s >= 1.0 && s.fract() == 0.0 && s <= 1024.0).then_some(s as usize);
    match scales.as_slice() {
        &[1.0, 1.0, fy, fx] => Some((whole(fy)?, whole(fx)?)),
        _ => None,
    }
}

/// The convolution of `c`'s concatenation of `parts`, where part `up.part` is given before its
/// upsampling by `up.factors` to the others' size (an error otherwise, as the concatenation's
/// would be). The other parts may be in blocks ([`blocked`](super::blocked)), which the
/// product over their channels reads in place; the output is in planes. Falls back to
/// upsampling the part first when a part is not a CPU tensor the kernels read in place.
pub(super) fn conv_with_upsampled_part(
    c: &ConvOp,
    up: &UpsampledPart,
    parts: &[&Tensor],
    cold: &[bool],
    residual: Option<&Tensor>,
    target: &Target,
) -> CResult<Tensor> {
    let low = parts[up.part];
    let rest: Vec<&Tensor> = parts.iter().enumerate().filter(|&(i, _)| i != up.part).map(|(_, &t)| t).collect();
    let rest_cold: Vec<bool> = (0..parts.len()).filter(|&i| i != up.part).map(|i| cold.get(i).copied().unwrap_or(false)).collect();
    let (Some([n, _, h, w]), &[ln, channels, lh, lw]) = (rest.first().and_then(|t| blocked::logical_dims(t)), low.dims()) else {
        candle_core::bail!("convolution parts of shapes {:?}", parts.iter().map(|p| p.dims()).collect::<Vec<_>>());
    };
    let (fy, fx) = up.factors;
    if ln != n || lh * fy != h || lw * fx != w {
        candle_core::bail!("Concat of mismatched shapes: {:?} upsampled by {fy}x{fx} and {:?}", low.dims(), rest[0].dims());
    }
    let offset: usize = parts[..up.part].iter().filter_map(|p| blocked::logical_dims(p)).map(|dims| dims[1]).sum();
    let split = if residual.is_none() && target.native_f32(low) { up.split(&c.conv, offset, channels) } else { None };
    if let Some(split) = split {
        let low_sums = with_cpu_storages(&[low], |buffers| {
            let input = ConvInput::new(vec![input_part(low, buffers[0], false)?], n, lh, lw)?;
            Some(split.low.run_input(&input, None))
        })?;
        if let Some(low_sums) = low_sums.flatten()
            && let Some(mut out) = conv_parts_in_place(&split.rest, &rest, &rest_cold, None, c.spread_output, false, target)?
        {
            let spec = c.conv.spec();
            add_upsampled(&mut out.data, out.pitch, &low_sums, (h, w), (lh, lw), spec.out_channels, c.conv.bias(), spec.activation);
            return spread::planes_tensor(out.data, out.dims, out.pitch);
        }
    }
    let upsampled =
        if target.native_f32(low) { low.contiguous()?.apply_op1_no_bwd(&CpuUpsample { height: h, width: w })? } else { low.upsample_nearest2d(h, w)? };
    let mut whole: Vec<Tensor> = parts.iter().map(|&p| blocked::to_planes(p)).collect::<CResult<_>>()?;
    whole[up.part] = upsampled;
    let whole: Vec<&Tensor> = whole.iter().collect();
    let mut cold = cold.to_vec();
    if let Some(fresh) = cold.get_mut(up.part) {
        *fresh = false;
    }
    conv_of_parts(c, &whole, &cold, residual, target)
}

/// `out = activation(out + up(low) + bias)`, plane by plane: `out` is `[n][channels]` planes of
/// `h x w`, `pitch` apart, `low` `[n][channels][lh][lw]`, and `h, w` whole multiples of `lh, lw`.
#[allow(clippy::too_many_arguments)]
fn add_upsampled(
    out: &mut [f32],
    pitch: usize,
    low: &[f32],
    (h, w): (usize, usize),
    (lh, lw): (usize, usize),
    channels: usize,
    bias: &[f32],
    activation: Activation,
) {
    let (fy, fx) = (h / lh, w / lw);
    parallel::for_each_chunk_mut(out, pitch, |plane_index, plane| {
        let plane = &mut plane[..h * w];
        let low = &low[plane_index * lh * lw..][..lh * lw];
        for (y, row) in plane.chunks_exact_mut(w).enumerate() {
            let low_row = &low[y / fy * lw..][..lw];
            if fx == 2 {
                // The common case (YOLO necks), as pairs the compiler can vectorise.
                for (pair, &v) in row.chunks_exact_mut(2).zip(low_row) {
                    pair[0] += v;
                    pair[1] += v;
                }
            } else {
                for (pixels, &v) in row.chunks_exact_mut(fx).zip(low_row) {
                    pixels.iter_mut().for_each(|p| *p += v);
                }
            }
        }
        bias_activation(plane, bias[plane_index % channels], activation);
    });
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;
    use crate::detect::engine::test_graphs::{assert_close, floats, model, node, plan_and_run, tensor};
    use crate::detect::model::{Attribute, TensorData, TensorValues};

    /// `out = SiLU(Conv1x1(Concat(parts)))` where `up` is `a = MaxPool(x)` upsampled back to
    /// `x`'s size and `b = Sigmoid(x)`, with `extra` nodes after; the parts in `order`.
    fn neck(order: [&str; 2], extra: Vec<crate::detect::model::Node>) -> crate::detect::model::OnnxModel {
        let s = |v: &str| Attribute::String(v.into());
        let mut nodes = vec![
            node("MaxPool", &["x"], &["a"], &[("kernel_shape", Attribute::Ints(vec![2, 2])), ("strides", Attribute::Ints(vec![2, 2]))]),
            node(
                "Resize",
                &["a", "", "scales"],
                &["up"],
                &[("mode", s("nearest")), ("coordinate_transformation_mode", s("asymmetric")), ("nearest_mode", s("floor"))],
            ),
            node("Sigmoid", &["x"], &["b"], &[]),
            node("Concat", &order, &["c"], &[("axis", Attribute::Int(1))]),
            node("Conv", &["c", "w", "bias"], &["y"], &[]),
            node("Sigmoid", &["y"], &["ys"], &[]),
            node("Mul", &["y", "ys"], &["out"], &[]),
        ];
        nodes.extend(extra);
        let scales = TensorData { shape: vec![4], values: TensorValues::F32(vec![1.0, 1.0, 2.0, 2.0]) };
        model(nodes, &[("w", floats(&[5, 6, 1, 1], 30)), ("bias", floats(&[5], 31)), ("scales", scales)])
    }

    /// The unfused graph on candle's operations.
    fn reference(x: &Tensor, order: [&str; 2]) -> Tensor {
        let (h, w) = (x.dim(2).unwrap(), x.dim(3).unwrap());
        let up = x.max_pool2d(2).unwrap().upsample_nearest2d(h, w).unwrap();
        let b = candle_nn::ops::sigmoid(x).unwrap();
        let parts = if order[0] == "up" { [&up, &b] } else { [&b, &up] };
        let c = Tensor::cat(&parts, 1).unwrap();
        let y = c.conv2d(&tensor(&floats(&[5, 6, 1, 1], 30)), 0, 1, 1, 1).unwrap();
        y.broadcast_add(&tensor(&floats(&[5], 31)).reshape((1, 5, 1, 1)).unwrap()).unwrap().silu().unwrap()
    }

    #[test]
    fn the_upsampled_part_of_a_pointwise_convolution_is_computed_at_low_resolution() {
        // Two images, rows and columns of different counts; the part first and last.
        let x = tensor(&floats(&[2, 3, 6, 8], 32));
        for order in [["up", "b"], ["b", "up"]] {
            let (engine, got) = plan_and_run(&neck(order, Vec::new()), &x);
            let types: Vec<&str> = engine.steps.iter().map(|s| s.op_type.as_str()).collect();
            assert_eq!(types, ["MaxPool", "Sigmoid", "Conv"], "{order:?}");
            assert!(matches!(&engine.steps[2].op, Op::Conv(c) if c.upsampled.is_some()));
            assert_close(&got, &reference(&x, order));
            // A second run uses the split made by the first.
            assert_close(&engine.run(x.clone()).unwrap(), &reference(&x, order));
        }
    }

    #[test]
    fn an_upsampling_that_something_else_reads_stays() {
        // The output is the convolution's result and the upsampled part, side by side.
        let mut graph = neck(["up", "b"], vec![node("Concat", &["z", "up"], &["out"], &[("axis", Attribute::Int(1))])]);
        graph.nodes.iter_mut().find(|n| n.op_type == "Mul").unwrap().outputs = vec!["z".into()];
        let x = tensor(&floats(&[1, 3, 4, 4], 33));
        let (engine, got) = plan_and_run(&graph, &x);
        assert!(engine.steps.iter().any(|s| s.op_type == "Resize"));
        assert!(engine.steps.iter().all(|s| !matches!(&s.op, Op::Conv(c) if c.upsampled.is_some())));
        let up = x.max_pool2d(2).unwrap().upsample_nearest2d(4, 4).unwrap();
        assert_close(&got, &Tensor::cat(&[&reference(&x, ["up", "b"]), &up], 1).unwrap());
    }
}
