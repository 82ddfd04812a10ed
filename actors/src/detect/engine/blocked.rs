//! Convolution outputs kept in blocks of 8 channels ([`ChannelLayout::Blocked`]) between
//! pointwise, depthwise and Winograd's 3x3 convolutions, into stride-2 ones, and through the
//! channel splits between them: a tensor `[n, c, h, w]` held as `[n, c / 8, h, w, 8]`.
//!
//! A pointwise convolution's tile of pixels by channels reads, for each input channel, one
//! value of each of its pixels, and stores its sums for each output channel. In planes those
//! are as many lines as channels, each partly used, and a transpose of the sums before the
//! stores; in blocks each pixel's 8 channels are one stretch of memory, read whole and
//! stored as they come from the registers. A depthwise convolution with the channels in the
//! lanes computes in blocks anyway, and transposes in and out of planes. A tensor is kept so
//! only where the convolution that makes it writes blocks in its own kernel
//! ([`Conv2d::runs_blocked`]) and every step that reads it reads them so
//! ([`Conv2d::reads_blocked`]): the pointwise layers of an attention block's chain (`qkv`,
//! `proj`, the MLP, their skip connections and the concatenation after them), the heads'
//! depthwise and pointwise layers of the class branch, and the outputs that stride-2 layers
//! read (the backbone's 64 -> 64 channels from 160x160, 128 -> 128 from 80x80 and 128 -> 256
//! from 40x40), whose tile then reads each pixel's 8 channels from one stretch of a row, in
//! order, where planes are a stream of lines per input channel. The latter two are also read
//! by a neck's pointwise layer beside an upsampled part
//! ([`upsampled`](super::upsampled)), whose product over the other parts reads blocks. With
//! AVX2, Winograd's 3x3 layers read blocks (their phase planes split from them) and write them,
//! so the heads' inputs and branches, and the C3k2 blocks (a pointwise layer, a channel split
//! into halves that are views of its blocks, a bottleneck's two 3x3 layers and the pointwise
//! layer over all three) stay in blocks end to end. The tensor's 5-D shape says so to every
//! step: one that does not take blocks cannot mistake it for planes; a `Shape` or `Split` that
//! reads one is marked so.
//!
//! YOLOv12n and YOLO11n on a Zen 3 (AVX2), 2 threads, 150 rounds in one process alternating
//! with every tensor in planes: the calls 0.985 of their time, the pointwise layers 0.97-0.975
//! (those of the attention blocks' MLP at 40x40 0.79-0.88), the depthwise ones 0.76-0.80
//! (0.56-0.63 at 80x80).

use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};

use super::fold::CONV_MORE_PARTS;
use super::{CResult, Op, Step, Target};
use crate::detect::kernels::conv::{BLOCK, Conv2d};

/// `STREAMDET_BLOCKED=off` keeps every tensor in planes, to compare the two.
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("STREAMDET_BLOCKED").map_or(true, |v| v != "off"))
}

/// Where a convolution step reads slot `slot`: as a part of its input (`inputs[0]` or from
/// [`CONV_MORE_PARTS`] on), as its residual (`inputs[3]`), or as a weight or bias.
fn is_part(index: usize) -> bool {
    index == 0 || index >= CONV_MORE_PARTS
}
const RESIDUAL: usize = 3;

/// The slots of a convolution step's input parts, but an upsampled one (which is read in
/// planes, at its own size).
fn parts(step: &Step) -> impl Iterator<Item = usize> + '_ {
    let upsampled = match &step.op {
        Op::Conv(c) => c.upsampled.as_ref().map(|up| up.input_index()),
        _ => None,
    };
    step.inputs.iter().enumerate().filter(move |&(i, _)| is_part(i) && Some(i) != upsampled).filter_map(|(_, s)| *s)
}

/// Marks the convolutions whose outputs stay in blocks: on the CPU kernels, each output that a
/// convolution writing blocks makes ([`Conv2d::runs_blocked`]) and only convolutions reading
/// them read ([`Conv2d::reads_blocked`]), as input parts or skip connections (or `Shape`, which
/// then gives the logical shape, or a channel split into whole blocks whose outputs are all so
/// read: those go with their input), and not the graph's output. A convolution reads all its
/// parts in one layout, and its skip connection in its output's: the marks are withdrawn until
/// both hold everywhere.
pub(super) fn mark_blocked_outputs(mut steps: Vec<Step>, constants: &HashMap<usize, Tensor>, output_slot: usize, target: &Target) -> Vec<Step> {
    if !target.native || !enabled() {
        return steps;
    }
    let splits_blocks = |s: &Step| splits_whole_blocks(s, constants);
    let native = |s: &Step, can: fn(&Conv2d) -> bool| matches!(&s.op, Op::Conv(c) if c.candle.is_none() && c.upsampled.is_none() && can(&c.conv));
    let reads_in_blocks = |reader: &Step, slot: usize| {
        let reads = |i: usize, s: &Option<usize>| *s != Some(slot) || is_part(i) || i == RESIDUAL;
        match &reader.op {
            // The parts of a concatenation with an upsampled one, but that one, go to a
            // pointwise product over their channels alone (the split's), which reads blocks
            // as this convolution's tiles would (with fewer input channels: where those are
            // too many for the tiles, the product gets planes first).
            Op::Conv(c) if c.candle.is_none() && c.upsampled.is_some() => {
                let up = c.upsampled.as_ref().map(|up| up.input_index());
                c.conv.tiles_take_blocks() && reader.inputs.iter().enumerate().all(|(i, s)| reads(i, s) && (Some(i) != up || *s != Some(slot)))
            }
            // A dynamic export's anchors come from the shapes of the heads' inputs: `Shape`
            // reads a blocked tensor's logical shape.
            Op::Shape { .. } => true,
            // A split into whole blocks passes on views of them, which its outputs' readers
            // must take (the loop below keeps a split's input and outputs together).
            Op::Split { .. } => splits_blocks(reader) && reader.inputs.first() == Some(&Some(slot)),
            _ => native(reader, Conv2d::reads_blocked) && reader.inputs.iter().enumerate().all(|(i, s)| reads(i, s)),
        }
    };
    let mut blocked: HashSet<usize> = steps
        .iter()
        .filter(|step| native(step, Conv2d::runs_blocked))
        .filter_map(|step| match step.outputs.as_slice() {
            &[out] if out != output_slot => Some(out),
            _ => None,
        })
        .chain(steps.iter().filter(|step| splits_blocks(step)).flat_map(|step| step.outputs.iter().copied().filter(|&out| out != output_slot)))
        .filter(|&out| {
            let mut readers = steps.iter().filter(|s| s.inputs.contains(&Some(out))).peekable();
            readers.peek().is_some() && readers.all(|r| reads_in_blocks(r, out))
        })
        .collect();
    loop {
        let before = blocked.len();
        // A split's input and outputs are all in blocks or none.
        for step in steps.iter().filter(|s| splits_blocks(s)) {
            let slots = || step.inputs.first().copied().flatten().into_iter().chain(step.outputs.iter().copied());
            if !slots().all(|s| blocked.contains(&s)) {
                slots().for_each(|s| _ = blocked.remove(&s));
            }
        }
        for step in steps.iter().filter(|s| matches!(s.op, Op::Conv(_))) {
            let parts: Vec<usize> = parts(step).collect();
            if !parts.iter().all(|p| blocked.contains(p)) {
                parts.iter().for_each(|p| _ = blocked.remove(p));
            }
            if let (Some(Some(residual)), &[out]) = (step.inputs.get(RESIDUAL), step.outputs.as_slice())
                && blocked.contains(residual) != blocked.contains(&out)
            {
                blocked.remove(residual);
                blocked.remove(&out);
            }
        }
        if blocked.len() == before {
            break;
        }
    }
    for step in &mut steps {
        match (&mut step.op, step.outputs.as_slice()) {
            (Op::Conv(conv), &[out]) if blocked.contains(&out) => {
                conv.blocked_output = true;
                conv.spread_output = false;
            }
            (Op::Shape { of_blocked } | Op::Split { of_blocked, .. }, _) => {
                *of_blocked = step.inputs.first().copied().flatten().is_some_and(|input| blocked.contains(&input))
            }
            _ => {}
        }
    }
    steps
}

/// Whether `step` splits channels (axis 1 of `[n, c, h, w]`) into whole blocks, its sizes given
/// or constant: then, on a blocked tensor, its outputs are views of the input's blocks.
fn splits_whole_blocks(step: &Step, constants: &HashMap<usize, Tensor>) -> bool {
    let Op::Split { axis: 1 | -3, sizes, .. } = &step.op else { return false };
    let sizes = match sizes {
        Some(sizes) => sizes.clone(),
        None => match step.inputs.get(1).copied().flatten().and_then(|s| constants.get(&s)) {
            Some(t) => match super::eval::ints(t) {
                Ok(sizes) => sizes,
                Err(_) => return false,
            },
            None => return false,
        },
    };
    !sizes.is_empty() && sizes.iter().all(|&s| s > 0 && (s as usize).is_multiple_of(BLOCK))
}

/// The channel split of a blocked tensor `t` (`sizes` in channels, whole blocks) into views of
/// its blocks.
pub(super) fn split_blocks(t: &Tensor, sizes: &[usize]) -> CResult<Vec<Tensor>> {
    let channels = blocked_dims(t).map(|[_, c, _, _]| c);
    if channels != Some(sizes.iter().sum()) || sizes.iter().any(|s| !s.is_multiple_of(BLOCK)) {
        candle_core::bail!("a split of a {:?} tensor in blocks into {sizes:?} channels", t.dims());
    }
    let mut start = 0;
    sizes
        .iter()
        .map(|&s| {
            let part = t.narrow(1, start / BLOCK, s / BLOCK);
            start += s;
            part
        })
        .collect()
}

/// `[n, c, h, w]` when `t` is a blocked tensor `[n, c / 8, h, w, 8]`.
pub(super) fn blocked_dims(t: &Tensor) -> Option<[usize; 4]> {
    match *t.dims() {
        [n, blocks, h, w, BLOCK] => Some([n, blocks * BLOCK, h, w]),
        _ => None,
    }
}

/// `[n, c, h, w]` of a tensor in either layout.
pub(super) fn logical_dims(t: &Tensor) -> Option<[usize; 4]> {
    match *t.dims() {
        [n, c, h, w] => Some([n, c, h, w]),
        _ => blocked_dims(t),
    }
}

/// `data` (`[n][c / 8][h][w][8]`) as a blocked tensor.
pub(super) fn blocked_tensor(data: Vec<f32>, [n, c, h, w]: [usize; 4]) -> CResult<Tensor> {
    if !c.is_multiple_of(BLOCK) {
        candle_core::bail!("{c} channels in blocks of {BLOCK}");
    }
    Tensor::from_vec(data, (n, c / BLOCK, h, w, BLOCK), &Device::Cpu)
}

/// `t` in planes (`[n, c, h, w]`), whichever layout it is in.
pub(super) fn to_planes(t: &Tensor) -> CResult<Tensor> {
    match blocked_dims(t) {
        Some([n, c, h, w]) => t.permute((0, 1, 4, 2, 3))?.reshape((n, c, h, w)),
        None => Ok(t.clone()),
    }
}

/// `t` (`[n, c, h, w]`, `c` whole blocks) in blocks, whichever layout it is in.
pub(super) fn to_blocks(t: &Tensor) -> CResult<Tensor> {
    if blocked_dims(t).is_some() {
        return Ok(t.clone());
    }
    let &[n, c, h, w] = t.dims() else { candle_core::bail!("blocks of a {:?} tensor", t.dims()) };
    if !c.is_multiple_of(BLOCK) {
        candle_core::bail!("{c} channels in blocks of {BLOCK}");
    }
    t.reshape((n, c / BLOCK, BLOCK, h, w))?.permute((0, 1, 3, 4, 2))?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::engine::test_graphs::{floats, model, node, plan_and_run, tensor};
    use crate::detect::model::{Attribute, TensorData};

    /// The convolution steps of `engine`'s plan, in order.
    fn conv_steps(engine: &super::super::Engine) -> Vec<&super::super::ConvOp> {
        engine.steps.iter().filter_map(|s| if let Op::Conv(c) = &s.op { Some(c.as_ref()) } else { None }).collect()
    }

    /// `x` convolved by candle with initializer `w` (`pad` on every side, `stride`), plus bias `b`.
    fn candle_conv(x: &Tensor, initializers: &[(&str, TensorData)], (w, b): (&str, &str), pad: usize, stride: usize) -> Tensor {
        let find = |name: &str| tensor(&initializers.iter().find(|(n, _)| *n == name).unwrap().1);
        x.conv2d(&find(w), pad, stride, 1, 1).unwrap().broadcast_add(&find(b).reshape((1, (), 1, 1)).unwrap()).unwrap()
    }

    /// `got` against candle's `want`, element by element, relative to the largest value: layers
    /// of random weights make values in the tens.
    fn assert_near(got: &Tensor, want: &Tensor) {
        assert_eq!(got.dims(), want.dims());
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = flat(want).into_iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in flat(got).into_iter().zip(flat(want)).enumerate() {
            assert!((g - w).abs() <= 1e-5 * scale, "element {i}: {g} against candle's {w}");
        }
    }

    #[test]
    fn pointwise_chains_pass_blocks_and_compute_the_same() {
        // a = conv(x); r = conv(a) + a; c = conv(concat(r, a)); out = conv3x3(c).
        let weights = [("wa", [16, 16, 1, 1]), ("wb", [16, 16, 1, 1]), ("wc", [8, 32, 1, 1]), ("wd", [8, 8, 3, 3])];
        let mut initializers: Vec<(&str, TensorData)> = Vec::new();
        for (i, (name, shape)) in weights.iter().enumerate() {
            initializers.push((name, floats(shape, 20 + i as u64)));
        }
        let bias = ["ba", "bb", "bc", "bd"];
        for (i, (name, (_, shape))) in bias.iter().zip(&weights).enumerate() {
            initializers.push((name, floats(&shape[..1], 30 + i as u64)));
        }
        let nodes = vec![
            node("Conv", &["x", "wa", "ba"], &["a"], &[]),
            node("Conv", &["a", "wb", "bb"], &["b"], &[]),
            node("Add", &["b", "a"], &["r"], &[]),
            node("Concat", &["r", "a"], &["cat"], &[("axis", Attribute::Int(1))]),
            node("Conv", &["cat", "wc", "bc"], &["c"], &[]),
            node("Conv", &["c", "wd", "bd"], &["out"], &[("pads", Attribute::Ints(vec![1, 1, 1, 1]))]),
        ];
        // Batch 2, a plane whose last tile overlaps the one before.
        let x = tensor(&floats(&[2, 16, 6, 7], 40));
        let (engine, got) = plan_and_run(&model(nodes, &initializers), &x);
        let convs = conv_steps(&engine);
        assert_eq!(convs.len(), 4);
        // Where the pointwise kernels take blocks (AVX2), `a` and `r` stay in them; `c`, which a
        // 3x3 convolution reads, and the output do not.
        let in_blocks = convs[0].conv.runs_blocked();
        let marks: Vec<bool> = convs.iter().map(|c| c.blocked_output).collect();
        assert_eq!(marks, [in_blocks, in_blocks, false, false]);

        let conv = |t: &Tensor, w: &str, b: &str, pad: usize| candle_conv(t, &initializers, (w, b), pad, 1);
        let a = conv(&x, "wa", "ba", 0);
        let r = (conv(&a, "wb", "bb", 0) + &a).unwrap();
        let c = conv(&Tensor::cat(&[&r, &a], 1).unwrap(), "wc", "bc", 0);
        let want = conv(&c, "wd", "bd", 1);
        assert_near(&got, &want);
    }

    #[test]
    fn a_stride_2_layer_reads_its_input_in_blocks() {
        // a = conv(x); out = conv3x3 stride 2 (a), on rows wide enough for a tile of interior
        // columns (and the border columns on each side).
        let initializers = [("wa", floats(&[16, 16, 1, 1], 60)), ("ba", floats(&[16], 61)), ("ws", floats(&[8, 16, 3, 3], 62)), ("bs", floats(&[8], 63))];
        let strided = [("pads", Attribute::Ints(vec![1, 1, 1, 1])), ("strides", Attribute::Ints(vec![2, 2]))];
        let nodes = vec![node("Conv", &["x", "wa", "ba"], &["a"], &[]), node("Conv", &["a", "ws", "bs"], &["out"], &strided)];
        let x = tensor(&floats(&[2, 16, 9, 21], 64));
        let (engine, got) = plan_and_run(&model(nodes, &initializers), &x);
        let convs = conv_steps(&engine);
        // Where the stride-2 tiles read blocks (AVX2), `a` is one.
        assert!(!convs[1].blocked_output);
        assert_eq!(convs[0].blocked_output, convs[0].conv.runs_blocked() && convs[1].conv.reads_blocked());

        let conv = |t: &Tensor, w: &str, b: &str, pad: usize, stride: usize| candle_conv(t, &initializers, (w, b), pad, stride);
        let a = conv(&x, "wa", "ba", 0, 1);
        let want = conv(&a, "ws", "bs", 1, 2);
        assert_near(&got, &want);
    }

    #[test]
    fn a_winograd_layer_reads_and_writes_blocks_and_shape_reads_them() {
        // a = conv(x); w = conv3x3(a); out = Reshape(conv(w), Shape(a)): the 3x3 layer
        // (Winograd at 20x20) splits its phase planes from blocks and writes blocks, and `Shape`
        // gives `a`'s logical shape.
        let initializers = [
            ("wa", floats(&[24, 16, 1, 1], 80)),
            ("ba", floats(&[24], 81)),
            ("ww", floats(&[24, 24, 3, 3], 82)),
            ("bw", floats(&[24], 83)),
            ("wp", floats(&[24, 24, 1, 1], 85)),
            ("bp", floats(&[24], 86)),
        ];
        let nodes = vec![
            node("Conv", &["x", "wa", "ba"], &["a"], &[]),
            node("Conv", &["a", "ww", "bw"], &["w"], &[("pads", Attribute::Ints(vec![1, 1, 1, 1]))]),
            node("Conv", &["w", "wp", "bp"], &["p"], &[]),
            node("Shape", &["a"], &["shape"], &[]),
            node("Reshape", &["p", "shape"], &["out"], &[]),
        ];
        let x = tensor(&floats(&[2, 16, 20, 20], 84));
        let (engine, got) = plan_and_run(&model(nodes, &initializers), &x);
        let convs = conv_steps(&engine);
        // Where Winograd reads and writes blocks (AVX2), `a` and `w` are, and the shape step
        // knows `a` is.
        assert_eq!(convs[0].blocked_output, convs[0].conv.runs_blocked() && convs[1].conv.reads_blocked());
        assert_eq!(convs[1].blocked_output, convs[1].conv.runs_blocked() && convs[2].conv.reads_blocked());
        let shape_of_blocked = engine.steps.iter().any(|s| matches!(s.op, Op::Shape { of_blocked: true }));
        assert_eq!(shape_of_blocked, convs[0].blocked_output);

        let conv = |t: &Tensor, w: &str, b: &str, pad: usize, stride: usize| candle_conv(t, &initializers, (w, b), pad, stride);
        let a = conv(&x, "wa", "ba", 0, 1);
        let w = conv(&a, "ww", "bw", 1, 1);
        let want = conv(&w, "wp", "bp", 0, 1);
        assert_near(&got, &want);
    }

    #[test]
    fn a_channel_split_passes_views_of_blocks() {
        // a = conv(x); p, q = Split(a); m = conv3x3(q) + q; out = conv(concat(p, q, m)): a C3k2
        // block. `a`, `p`, `q` and `m` stay in blocks (AVX2), the halves views of `a`'s.
        let initializers = [
            ("wa", floats(&[48, 16, 1, 1], 90)),
            ("ba", floats(&[48], 91)),
            ("sizes", crate::detect::engine::test_graphs::ints(&[24, 24])),
            ("wm", floats(&[24, 24, 3, 3], 92)),
            ("bm", floats(&[24], 93)),
            ("wo", floats(&[8, 72, 1, 1], 94)),
            ("bo", floats(&[8], 95)),
        ];
        let nodes = vec![
            node("Conv", &["x", "wa", "ba"], &["a"], &[]),
            node("Split", &["a", "sizes"], &["p", "q"], &[("axis", Attribute::Int(1))]),
            node("Conv", &["q", "wm", "bm"], &["c"], &[("pads", Attribute::Ints(vec![1, 1, 1, 1]))]),
            node("Add", &["c", "q"], &["m"], &[]),
            node("Concat", &["p", "q", "m"], &["cat"], &[("axis", Attribute::Int(1))]),
            node("Conv", &["cat", "wo", "bo"], &["out"], &[]),
        ];
        let x = tensor(&floats(&[2, 16, 20, 20], 96));
        let (engine, got) = plan_and_run(&model(nodes, &initializers), &x);
        let convs = conv_steps(&engine);
        let split_of_blocked = engine.steps.iter().any(|s| matches!(s.op, Op::Split { of_blocked: true, .. }));
        // Where the 3x3 layer reads and writes blocks (AVX2 Winograd), the block is all blocks.
        let blocks = convs[1].conv.runs_blocked() && convs[1].conv.reads_blocked() && convs[2].conv.reads_blocked();
        assert_eq!((convs[0].blocked_output, split_of_blocked, convs[1].blocked_output), (blocks, blocks, blocks));

        let conv = |t: &Tensor, w: &str, b: &str, pad: usize, stride: usize| candle_conv(t, &initializers, (w, b), pad, stride);
        let a = conv(&x, "wa", "ba", 0, 1);
        let (p, q) = (a.narrow(1, 0, 24).unwrap(), a.narrow(1, 24, 24).unwrap());
        let m = (conv(&q, "wm", "bm", 1, 1) + &q).unwrap();
        let cat = Tensor::cat(&[&p, &q, &m], 1).unwrap();
        let want = conv(&cat, "wo", "bo", 0, 1);
        assert_near(&got, &want);
    }

    #[test]
    fn a_neck_reads_blocks_beside_its_upsampled_part() {
        // a = conv(x); low = conv3x3 stride 2 (a); out = conv(concat(resize(low), a)): `a`, read
        // by the stride-2 layer and by the neck's product over its own channels, stays in blocks
        // (AVX2); `low`, the upsampled part, in planes.
        let s = |v: &str| Attribute::String(v.into());
        let scales = TensorData { shape: vec![4], values: crate::detect::model::TensorValues::F32(vec![1.0, 1.0, 2.0, 2.0]) };
        let initializers = [
            ("wa", floats(&[16, 16, 1, 1], 70)),
            ("ba", floats(&[16], 71)),
            ("ws", floats(&[8, 16, 3, 3], 72)),
            ("bs", floats(&[8], 73)),
            ("wn", floats(&[16, 24, 1, 1], 74)),
            ("bn", floats(&[16], 75)),
            ("scales", scales),
        ];
        let nodes = vec![
            node("Conv", &["x", "wa", "ba"], &["a"], &[]),
            node("Conv", &["a", "ws", "bs"], &["low"], &[("pads", Attribute::Ints(vec![1, 1, 1, 1])), ("strides", Attribute::Ints(vec![2, 2]))]),
            node(
                "Resize",
                &["low", "", "scales"],
                &["up"],
                &[("mode", s("nearest")), ("coordinate_transformation_mode", s("asymmetric")), ("nearest_mode", s("floor"))],
            ),
            node("Concat", &["up", "a"], &["cat"], &[("axis", Attribute::Int(1))]),
            node("Conv", &["cat", "wn", "bn"], &["out"], &[]),
        ];
        let x = tensor(&floats(&[2, 16, 10, 22], 76));
        let (engine, got) = plan_and_run(&model(nodes, &initializers), &x);
        let convs = conv_steps(&engine);
        assert_eq!(convs.len(), 3);
        assert!(convs[2].upsampled.is_some());
        let marks: Vec<bool> = convs.iter().map(|c| c.blocked_output).collect();
        let in_blocks = convs[0].conv.runs_blocked() && convs[1].conv.reads_blocked();
        assert_eq!(marks, [in_blocks, false, false]);

        let conv = |t: &Tensor, w: &str, b: &str, pad: usize, stride: usize| candle_conv(t, &initializers, (w, b), pad, stride);
        let a = conv(&x, "wa", "ba", 0, 1);
        let low = conv(&a, "ws", "bs", 1, 2);
        let cat = Tensor::cat(&[&low.upsample_nearest2d(10, 22).unwrap(), &a], 1).unwrap();
        let want = conv(&cat, "wn", "bn", 0, 1);
        assert_near(&got, &want);
        // A second run takes the split the first made.
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&engine.run(x.clone()).unwrap()), flat(&got));
    }

    #[test]
    fn a_convolution_that_does_not_take_blocks_gets_planes() {
        // On candle's operations (the generic path) and on the kernels: the same output from a
        // blocked input as from its planes, in the layout the step is marked for.
        let initializers = [("w", floats(&[8, 16, 3, 3], 50)), ("b", floats(&[8], 51))];
        let nodes = vec![node("Conv", &["x", "w", "b"], &["out"], &[("pads", Attribute::Ints(vec![1, 1, 1, 1]))])];
        let x = tensor(&floats(&[2, 16, 6, 7], 52));
        let blocks = to_blocks(&x).unwrap();
        for kernels in [super::super::Kernels::Generic, super::super::Kernels::Native] {
            let engine = super::super::Engine::plan_with(&model(nodes.clone(), &initializers), &Device::Cpu, kernels).unwrap();
            let step = &engine.steps[0];
            let Op::Conv(conv) = &step.op else { panic!("a convolution step") };
            let args = |x: &Tensor| -> Vec<Option<Tensor>> {
                step.inputs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| if i == 0 { Some(x.clone()) } else { s.map(|s| engine.constants.iter().find(|(c, _)| *c == s).unwrap().1.clone()) })
                    .collect()
            };
            let run = |x: &Tensor| {
                let args = args(x);
                let refs: Vec<Option<&Tensor>> = args.iter().map(Option::as_ref).collect();
                super::super::eval::conv_step(conv, &refs, &[], &engine.target).unwrap()
            };
            let (want, got) = (run(&x), run(&blocks));
            assert_eq!(got.dims(), want.dims(), "{kernels:?}");
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (g, w) in flat(&got).into_iter().zip(flat(&want)) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{kernels:?}: {g} against {w}");
            }
        }
    }

    #[test]
    fn blocks_hold_each_pixels_channels_together() {
        let (n, c, h, w) = (2, 16, 3, 5);
        let planes = Tensor::arange(0f32, (n * c * h * w) as f32, &Device::Cpu).unwrap().reshape((n, c, h, w)).unwrap();
        let blocks = to_blocks(&planes).unwrap();
        assert_eq!(blocks.dims(), &[n, c / 8, h, w, 8]);
        assert_eq!((blocked_dims(&blocks), logical_dims(&blocks), logical_dims(&planes)), (Some([n, c, h, w]), Some([n, c, h, w]), Some([n, c, h, w])));
        assert_eq!(blocked_dims(&planes), None);
        // Pixel (1, 2) of image 1, channels 8..16: one stretch of 8 floats.
        let values: Vec<f32> = blocks.get(1).unwrap().get(1).unwrap().get(1).unwrap().get(2).unwrap().to_vec1().unwrap();
        let want: Vec<f32> = (8..16).map(|ch| ((n - 1) * c * h * w + ch * h * w + w + 2) as f32).collect();
        assert_eq!(values, want);
        let back = to_planes(&blocks).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), planes.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let data = blocks.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(blocked_tensor(data, [n, c, h, w]).unwrap().dims(), blocks.dims());
        assert!(blocked_tensor(vec![0.0; 12], [1, 12, 1, 1]).is_err());
        assert!(to_blocks(&Tensor::zeros((1, 12, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap()).is_err());
    }
}
