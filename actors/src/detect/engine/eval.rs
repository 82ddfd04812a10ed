//! The evaluator: runs one step's operator on its input tensors, on the CPU custom operations
//! where they apply and on candle's operations otherwise (other devices, other layouts).

use crate::detect::kernels::parallel;
use candle_core::{CpuStorage, DType, Device, Tensor};

use super::custom_ops::{ConvWithResidual, CpuAttention, CpuBinary, CpuMatMul, CpuMaxPool, CpuPermute, CpuSoftmax, CpuUnary, CpuUpsample};
use super::fold::CONV_MORE_PARTS;
use super::{AttentionViews, BinaryOp, CResult, ConvOp, NestedConcat, Op, ReduceKind, SoftmaxConvOp, Target, tensor_from_data};
use super::{blocked, spread, upsampled};
use crate::detect::kernels::activation::{self, Activation, UnaryFn};
use crate::detect::kernels::conv::{ChannelLayout, Conv2d};
use crate::detect::kernels::pool::MaxPool;
use crate::detect::kernels::{self, attention, packed_gemm};
use crate::detect::model::TensorValues;
use crate::detect::views::{self, ViewStep};

/// `f` of each element of `t`: the CPU kernel on a CPU `f32` tensor, candle's operations on
/// anything else.
fn unary(t: &Tensor, f: UnaryFn, target: &Target) -> CResult<Tensor> {
    if target.native_f32(t) {
        return t.contiguous()?.apply_op1_no_bwd(&CpuUnary(f));
    }
    match f {
        UnaryFn::Sigmoid => candle_nn::ops::sigmoid(t),
        UnaryFn::Exp => t.exp(),
        UnaryFn::Silu => t.silu(),
    }
}

/// One part of a concatenation: an input, or the inputs of a concatenation folded into it.
struct ConcatPart<'a> {
    tensors: Vec<&'a Tensor>,
    map: Option<UnaryFn>,
    nested: Option<&'a NestedConcat>,
}

impl ConcatPart<'_> {
    /// The part's shape, and for a nested concatenation the axis its inputs are joined along;
    /// an error when those inputs do not fit together or a reshape does not fit them.
    fn dims(&self) -> CResult<(Vec<usize>, Option<usize>)> {
        let first = self.tensors[0].dims();
        let Some(nested) = self.nested else { return Ok((first.to_vec(), None)) };
        let axis = normalize_axis(nested.axis, first.len())?;
        let mut dims = joined_dims(&self.tensors.iter().map(|t| t.dims()).collect::<Vec<_>>(), axis)?;
        for spec in &nested.reshapes {
            dims = views::reshape_dims(&dims, spec)?;
        }
        Ok((dims, Some(axis)))
    }

    /// The part as one tensor, through its function: what candle concatenates.
    fn materialize(&self, target: &Target) -> CResult<Tensor> {
        let joined = match self.nested {
            None => self.tensors[0].clone(),
            Some(nested) => {
                let (dims, _) = self.dims()?;
                let axis = normalize_axis(nested.axis, self.tensors[0].rank())?;
                Tensor::cat(&self.tensors, axis)?.reshape(dims)?
            }
        };
        match self.map {
            Some(f) => unary(&joined, f, target),
            None => Ok(joined),
        }
    }
}

/// The parts of a concatenation from its step's inputs: each present input with the function
/// of its place, or a nested concatenation's inputs (`maps` and `nested` follow the parts).
fn concat_parts<'a>(args: &[Option<&'a Tensor>], maps: &[Option<UnaryFn>], nested: &'a [Option<NestedConcat>]) -> CResult<Vec<ConcatPart<'a>>> {
    let mut args = args.iter().copied();
    let mut parts = Vec::new();
    for place in 0.. {
        let nest = nested.get(place).and_then(Option::as_ref);
        let count = nest.map_or(1, |n| n.parts);
        let taken: Vec<Option<&Tensor>> = args.by_ref().take(count).collect();
        if taken.is_empty() {
            break;
        }
        let map = maps.get(place).copied().flatten();
        match (nest, taken.iter().copied().collect::<Option<Vec<&Tensor>>>()) {
            (Some(_), Some(tensors)) if tensors.len() == count => parts.push(ConcatPart { tensors, map, nested: nest }),
            (Some(_), _) => candle_core::bail!("a nested concatenation of {count} inputs without all of them"),
            (None, Some(tensors)) => parts.push(ConcatPart { tensors, map, nested: None }),
            // An absent input leaves its part out.
            (None, None) => {}
        }
    }
    Ok(parts)
}

/// The shape of tensors of `dims` joined along `axis`; an error unless they agree elsewhere.
fn joined_dims(dims: &[&[usize]], axis: usize) -> CResult<Vec<usize>> {
    let first = dims[0];
    if dims.iter().any(|d| d.len() != first.len() || d[..axis] != first[..axis] || d[axis + 1..] != first[axis + 1..]) {
        candle_core::bail!("Concat of mismatched shapes {dims:?}");
    }
    let mut joined = first.to_vec();
    joined[axis] = dims.iter().map(|d| d[axis]).sum();
    Ok(joined)
}

/// Concatenation of contiguous CPU `f32` tensors along `axis`, copying in parallel (candle's
/// `cat` copies on one thread), each part through its function where it has one, a nested
/// concatenation's inputs straight into place; `None` for anything else, which candle then
/// concatenates.
fn concat_cpu(parts: &[ConcatPart], axis: usize) -> CResult<Option<Tensor>> {
    let shapes = parts.iter().map(ConcatPart::dims).collect::<CResult<Vec<_>>>()?;
    let dims = joined_dims(&shapes.iter().map(|(d, _)| d.as_slice()).collect::<Vec<_>>(), axis)?;
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let widths: Vec<usize> = shapes.iter().map(|(d, _)| d[axis] * inner).collect();
    let total = outer * widths.iter().sum::<usize>();
    let tensors: Vec<&Tensor> = parts.iter().flat_map(|p| p.tensors.iter().copied()).collect();
    let Some(offsets) = tensors.iter().map(|t| t.layout().contiguous_offsets()).collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    let maps: Vec<Option<UnaryFn>> = parts.iter().map(|p| p.map).collect();
    // Parts may be views of one storage (the halves of a split): one read guard per storage.
    let out = with_cpu_storages(&tensors, |buffers| {
        let mut slices = buffers.iter().zip(&offsets).map(|(data, &(start, end))| &data[start..end]);
        let sources: Vec<Vec<&[f32]>> = parts
            .iter()
            .zip(&shapes)
            .map(|(part, (_, nested_axis))| {
                let own: Vec<&[f32]> = slices.by_ref().take(part.tensors.len()).collect();
                match nested_axis {
                    Some(axis) => joined_blocks(&part.tensors, &own, *axis),
                    None => own,
                }
            })
            .collect();
        gather_blocks(&sources, &maps, &widths, outer, total)
    })?;
    let Some(out) = out else { return Ok(None) };
    Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
}

/// The elements of `tensors` joined along `axis` (their shapes checked), as the blocks of
/// their data in the order of the result: for each index before the axis, each tensor's block.
fn joined_blocks<'a>(tensors: &[&Tensor], data: &[&'a [f32]], axis: usize) -> Vec<&'a [f32]> {
    let outer: usize = tensors[0].dims()[..axis].iter().product();
    let widths: Vec<usize> = tensors.iter().map(|t| t.dims()[axis..].iter().product()).collect();
    (0..outer).flat_map(|o| data.iter().zip(&widths).map(move |(d, &w)| &d[o * w..][..w])).collect()
}

/// For each of `outer` rows, each source's next `width` floats, in order, source `i`'s through
/// `maps[i]` where that is given: the body of a concatenation, copied in parallel pieces. A
/// source is a run of blocks read one after another (one block for a plain input).
fn gather_blocks(sources: &[Vec<&[f32]>], maps: &[Option<UnaryFn>], widths: &[usize], outer: usize, total: usize) -> Vec<f32> {
    /// Floats per copy task: enough to amortise a task, few enough to share among threads.
    const PIECE: usize = 1 << 15;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    // The output in order is, for each outer index, each part's block: cut it into pieces
    // (consecutive ranges of the output) paired with their sources, then copy the pieces in
    // parallel.
    let mut ranges = Vec::new();
    let mut chunks = Vec::new();
    // Where each source's next floats start: a block and a place in it.
    let mut cursors = vec![(0usize, 0usize); sources.len()];
    for _ in 0..outer {
        for (i, (blocks, &width)) in sources.iter().zip(widths).enumerate() {
            let map = maps.get(i).copied().flatten();
            let mut left = width;
            while left > 0 {
                let (block, at) = cursors[i];
                let data = &blocks[block][at..];
                let taken = left.min(data.len());
                for chunk in data[..taken].chunks(PIECE) {
                    let start = ranges.last().map_or(0, |r: &std::ops::Range<usize>| r.end);
                    ranges.push(start..start + chunk.len());
                    chunks.push((chunk, map));
                }
                left -= taken;
                cursors[i] = if taken == data.len() { (block + 1, 0) } else { (block, at + taken) };
            }
        }
    }
    assert_eq!(ranges.last().map_or(0, |r| r.end), total, "the parts fill the output");
    parallel::for_each_range_mut(&mut out.spare_capacity_mut()[..total], &ranges, |index, dst| {
        let (chunk, map) = chunks[index];
        let written = dst.write_copy_of_slice(chunk);
        if let Some(f) = map {
            // On the piece just written, while it is in L1.
            activation::map_inplace(written, f);
        }
    });
    // SAFETY: the pieces tile the first `total` elements exactly, and each was written.
    unsafe { out.set_len(total) };
    out
}

/// Calls `f` with the elements of a contiguous CPU `f32` tensor.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("expected a contiguous CPU f32 tensor");
    };
    Ok(f(&data[start..end]))
}

/// Calls `f` with the CPU `f32` storage of each of `tensors` (the whole buffer, to be read
/// through the tensor's layout); `Ok(None)` when one is not such a tensor. Holds one read guard
/// per distinct storage: tensors that share one (the operands of a folded attention, the parts
/// of a split that a convolution reads back together) share its guard, since a second read
/// lock on a storage this thread already holds would deadlock once a writer waits for it.
pub(super) fn with_cpu_storages<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> CResult<Option<R>> {
    // A storage's identity is its address, which the tensors keep alive; read with one lock
    // held at a time.
    let key = |t: &Tensor| std::ptr::from_ref::<candle_core::Storage>(&t.storage_and_layout().0).addr();
    let keys: Vec<usize> = tensors.iter().map(|t| key(t)).collect();
    let mut guards = Vec::with_capacity(tensors.len());
    for (t, &k) in tensors.iter().zip(&keys) {
        if !guards.iter().any(|(held, _)| *held == k) {
            guards.push((k, t.storage_and_layout().0));
        }
    }
    let mut buffers = Vec::with_capacity(tensors.len());
    for k in &keys {
        let (_, storage) = guards.iter().find(|(held, _)| held == k).expect("a guard per storage");
        let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &**storage else { return Ok(None) };
        buffers.push(data.as_slice());
    }
    Ok(Some(f(&buffers)))
}

/// Runs a chain of views one step at a time (transposes of CPU `f32` tensors on their own
/// kernel), for when it cannot be read in place.
fn run_chain(t: &Tensor, chain: &[ViewStep], target: &Target) -> CResult<Tensor> {
    chain.iter().try_fold(t.clone(), |t, step| match step {
        ViewStep::Permute(perm) if target.native_f32(&t) => {
            let perm = perm.clone().unwrap_or_else(|| (0..t.rank()).rev().collect());
            t.contiguous()?.apply_op1_no_bwd(&CpuPermute(perm))
        }
        _ => step.apply(&t),
    })
}

/// [`Op::SoftmaxConv`]: on the CPU in one pass over its input where the folded views leave it
/// as NCHW with adjacent pixels; elsewhere the views, a softmax and a product with candle.
fn softmax_conv(op: &SoftmaxConvOp, t: &Tensor, target: &Target) -> CResult<Tensor> {
    let (channels, outputs) = (op.dot.channels(), op.dot.outputs());
    if target.native_f32(t) {
        let t = t.contiguous()?;
        if let Some(view) = views::view_through(t.dims(), &op.view)?.and_then(|v| v.channels_view())
            && view.dims[1] == channels
        {
            let out = with_cpu_f32(&t, |data| op.dot.run(data, &view))?;
            let [n, _, h, w] = view.dims;
            return Tensor::from_vec(out, (n, outputs, h, w), t.device());
        }
    }
    let x = run_chain(t, &op.view, target)?;
    let (n, c, h, w) = x.dims4()?;
    if c != channels {
        candle_core::bail!("a softmax and convolution over {channels} channels got {:?}", x.dims());
    }
    let p = candle_nn::ops::softmax(&x, 1)?.reshape((n, c, h * w))?;
    let y = op.weight.broadcast_matmul(&p)?.broadcast_add(&op.bias.reshape((outputs, 1))?)?;
    y.reshape((n, outputs, h, w))
}

/// [`Op::Attention`] on the CPU with its view chains folded: the operands are read where they
/// lie in the tensors the step reads, and the result is written where the chain after it
/// would put it. `Ok(None)` when a chain cannot be seen as a view.
fn attention_in_place(operands: [&Tensor; 3], transposed: [bool; 3], alpha: f32, views: &AttentionViews) -> CResult<Option<Tensor>> {
    let bases = operands.map(|t| t.contiguous());
    let [q, k, v] = bases;
    let (q, k, v) = (q?, k?, v?);
    let mut matrices = Vec::with_capacity(3);
    let mut batch_dims = Vec::with_capacity(3);
    for ((base, chain), transposed) in [&q, &k, &v].into_iter().zip(&views.operands).zip(transposed) {
        let Some(view) = views::view_through(base.dims(), chain)? else { return Ok(None) };
        let dims = view.dims();
        if dims.len() < 2 {
            candle_core::bail!("attention operand of {dims:?} has fewer than two axes");
        }
        let Some(m) = view.matrices() else { return Ok(None) };
        batch_dims.push(dims[..dims.len() - 2].to_vec());
        matrices.push(if transposed { m.transposed() } else { m });
    }
    let [qm, km, vm]: [attention::MatrixBatch; 3] = matrices.try_into().expect("three operands");
    let (queries, depth, keys, channels) = (qm.rows(), qm.cols(), km.cols(), vm.rows());
    if km.rows() != depth || vm.cols() != keys || keys == 0 || depth == 0 || batch_dims[1] != batch_dims[0] || batch_dims[2] != batch_dims[0] {
        candle_core::bail!("attention of {:?}, {:?} and {:?}", q.dims(), k.dims(), v.dims());
    }
    let mut result_dims = batch_dims.swap_remove(0);
    result_dims.extend([channels, queries]);
    let Some((end_dims, placed)) = views::placement_through(&result_dims, &views.result)? else { return Ok(None) };
    let Some(out) = placed.matrices().and_then(attention::OutputView::new) else { return Ok(None) };
    let operands = [&q, &k, &v];
    let result = with_cpu_storages(&operands, |buffers| {
        // Each base is contiguous: its view starts at the layout's offset.
        let mut parts =
            operands.iter().zip(buffers).zip([qm, km, vm]).map(|((t, data), view)| attention::Operand::new(&data[t.layout().start_offset()..], view));
        let (Some(q), Some(k), Some(v)) = (parts.next().flatten(), parts.next().flatten(), parts.next().flatten()) else {
            candle_core::bail!("an attention operand's view reaches past its tensor");
        };
        Ok(attention::attention_strided(q, k, v, alpha, &out))
    })?;
    let Some(result) = result.transpose()? else { candle_core::bail!("expected CPU f32 attention operands") };
    Ok(Some(Tensor::from_vec(result, end_dims, &Device::Cpu)?))
}

/// [`Op::Attention`] on operands that are already what the step multiplies.
fn attention_unfolded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    [q_transposed, k_transposed, v_transposed]: [bool; 3],
    alpha: f32,
    target: &Target,
) -> CResult<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let rank = q.rank();
    let same_batch = rank >= 2 && [&k, &v].iter().all(|t| t.rank() == rank && t.dims()[..rank - 2] == q.dims()[..rank - 2]);
    if [&q, &k, &v].iter().all(|t| target.native_f32(t)) && same_batch && packed_gemm::available() {
        let op = CpuAttention { q_transposed, k_transposed, v_transposed, alpha };
        return q.apply_op3_no_bwd(&k, &v, &op);
    }
    // The three steps it fuses, on whatever device holds the tensors.
    let product = Op::MatMul { a_transposed: q_transposed, b_transposed: k_transposed, alpha };
    let scores = eval(&product, &[Some(&q), Some(&k)], target)?.remove(0);
    let weights = eval(&Op::Softmax { axis: -1 }, &[Some(&scores)], target)?.remove(0);
    let mix = Op::MatMul { a_transposed: v_transposed, b_transposed: true, alpha: 1.0 };
    Ok(eval(&mix, &[Some(&v), Some(&weights)], target)?.remove(0))
}

fn normalize_axis(axis: i64, rank: usize) -> CResult<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank.max(1) {
        candle_core::bail!("axis {axis} out of range for rank {rank}");
    }
    Ok(a as usize)
}

fn input<'a>(args: &[Option<&'a Tensor>], i: usize) -> CResult<&'a Tensor> {
    args.get(i).copied().flatten().ok_or_else(|| candle_core::Error::Msg(format!("missing input {i}")))
}

pub(super) fn ints(t: &Tensor) -> CResult<Vec<i64>> {
    t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()
}

pub(super) fn eval(op: &Op, args: &[Option<&Tensor>], target: &Target) -> CResult<Vec<Tensor>> {
    let device = &target.device;
    let x = || input(args, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Conv(c) => one(conv_step(c, args, &[], target)?),
        Op::Unary(f) => one(unary(x()?, *f, target)?),
        Op::Binary(b) => {
            let (l, r) = (x()?, input(args, 1)?);
            if target.native_f32(l) && target.native_f32(r) && (l.dims() == r.dims() || r.elem_count() == 1) {
                return one(l.contiguous()?.apply_op2_no_bwd(&r.contiguous()?, &CpuBinary(*b))?);
            }
            one(match b {
                BinaryOp::Add => l.broadcast_add(r)?,
                BinaryOp::Sub => l.broadcast_sub(r)?,
                BinaryOp::Mul => l.broadcast_mul(r)?,
                BinaryOp::Div => l.broadcast_div(r)?,
            })
        }
        Op::Split { axis, sizes, of_blocked } => {
            let t = x()?;
            let sizes: Vec<usize> = match (args.get(1).copied().flatten(), sizes) {
                (Some(s), _) => ints(s)?.into_iter().map(|v| v as usize).collect(),
                (None, Some(s)) => s.iter().map(|&v| v as usize).collect(),
                (None, None) => candle_core::bail!("Split without sizes is not supported"),
            };
            if *of_blocked {
                return blocked::split_blocks(t, &sizes);
            }
            let axis = normalize_axis(*axis, t.rank())?;
            let dim = t.dim(axis)?;
            if sizes.iter().sum::<usize>() != dim {
                candle_core::bail!("split sizes {sizes:?} do not add up to {dim}");
            }
            let mut start = 0;
            let mut parts = Vec::with_capacity(sizes.len());
            for s in sizes {
                parts.push(t.narrow(axis, start, s)?);
                start += s;
            }
            Ok(parts)
        }
        Op::Concat { axis, maps, nested } => {
            if maps.len() > args.len() {
                candle_core::bail!("Concat of {} inputs with {} functions", args.len(), maps.len());
            }
            let parts = concat_parts(args, maps, nested)?;
            let first = parts.first().ok_or_else(|| candle_core::Error::Msg("Concat of nothing".into()))?;
            let axis = normalize_axis(*axis, first.dims()?.0.len())?;
            if let Some(t) = if target.native { concat_cpu(&parts, axis)? } else { None } {
                return one(t);
            }
            let mapped = parts.iter().map(|p| p.materialize(target));
            one(Tensor::cat(&mapped.collect::<CResult<Vec<_>>>()?, axis)?)
        }
        Op::MaxPool { kernel, stride, pads } => {
            let t = x()?;
            if target.native_f32(t) && t.rank() == 4 {
                let pool = MaxPool::new(*kernel, *stride, *pads)
                    .ok_or_else(|| candle_core::Error::Msg(format!("max pooling {kernel:?} stride {stride:?} pads {pads:?}")))?;
                one(t.contiguous()?.apply_op1_no_bwd(&CpuMaxPool(pool))?)
            } else {
                one(max_pool(t, *kernel, *stride, *pads)?)
            }
        }
        Op::ResizeNearest => {
            let t = x()?;
            let (h, w) = (t.dim(2)?, t.dim(3)?);
            let (oh, ow) = match (args.get(3).copied().flatten(), args.get(2).copied().flatten()) {
                (Some(sizes), _) => match ints(sizes)?.as_slice() {
                    &[_, _, oh, ow] if oh > 0 && ow > 0 => (oh as usize, ow as usize),
                    other => candle_core::bail!("Resize sizes {other:?} are not [n, c, h, w]"),
                },
                (None, Some(scales)) => {
                    let s = scales.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    if s.len() != 4 || s[0] != 1.0 || s[1] != 1.0 {
                        candle_core::bail!("only spatial resize is supported, scales {s:?}");
                    }
                    ((h as f32 * s[2]).floor() as usize, (w as f32 * s[3]).floor() as usize)
                }
                _ => candle_core::bail!("Resize needs scales or sizes"),
            };
            if h == 0 || w == 0 || oh % h != 0 || ow % w != 0 {
                candle_core::bail!("only integer upsampling is supported ({h}x{w} to {oh}x{ow})");
            }
            if target.native_f32(t) && t.rank() == 4 {
                one(t.contiguous()?.apply_op1_no_bwd(&CpuUpsample { height: oh, width: ow })?)
            } else {
                one(t.upsample_nearest2d(oh, ow)?)
            }
        }
        Op::Reshape => {
            let t = x()?;
            one(t.reshape(views::reshape_dims(t.dims(), &ints(input(args, 1)?)?)?)?)
        }
        Op::Transpose { perm } => {
            let t = x()?;
            let perm = perm.clone().unwrap_or_else(|| (0..t.rank()).rev().collect());
            if target.native_f32(t) { one(t.contiguous()?.apply_op1_no_bwd(&CpuPermute(perm))?) } else { one(t.permute(perm)?.contiguous()?) }
        }
        Op::Softmax { axis } => {
            let t = x()?;
            let axis = normalize_axis(*axis, t.rank())?;
            if target.native_f32(t) {
                one(t.contiguous()?.apply_op1_no_bwd(&CpuSoftmax { axis })?)
            } else if axis + 1 == t.rank() {
                one(candle_nn::ops::softmax_last_dim(&t.contiguous()?)?)
            } else {
                one(candle_nn::ops::softmax(t, axis)?)
            }
        }
        Op::Slice => {
            let t = x()?;
            let starts = ints(input(args, 1)?)?;
            let ends = ints(input(args, 2)?)?;
            let axes = match args.get(3).copied().flatten() {
                Some(a) => ints(a)?,
                None => (0..starts.len() as i64).collect(),
            };
            if let Some(steps) = args.get(4).copied().flatten()
                && ints(steps)?.iter().any(|&s| s != 1)
            {
                candle_core::bail!("Slice with steps other than 1 is not supported");
            }
            let mut out = t.clone();
            for ((&s, &e), &a) in starts.iter().zip(&ends).zip(&axes) {
                let axis = normalize_axis(a, t.rank())?;
                let dim = t.dim(axis)? as i64;
                let clamp = |v: i64| if v < 0 { (v + dim).max(0) } else { v.min(dim) };
                let (s, e) = (clamp(s), clamp(e));
                out = out.narrow(axis, s as usize, (e - s).max(0) as usize)?;
            }
            one(out)
        }
        Op::MatMul { a_transposed, b_transposed, alpha } => {
            let (a, b) = (x()?.contiguous()?, input(args, 1)?.contiguous()?);
            let same_batch = a.rank() >= 2 && a.rank() == b.rank() && a.dims()[..a.rank() - 2] == b.dims()[..b.rank() - 2];
            if target.native_f32(&a) && target.native_f32(&b) && same_batch && packed_gemm::available() {
                let op = CpuMatMul { a_transposed: *a_transposed, b_transposed: *b_transposed, alpha: *alpha };
                one(a.apply_op2_no_bwd(&b, &op)?)
            } else {
                let swap = |t: Tensor, swapped: bool| if swapped { t.transpose(t.rank() - 2, t.rank() - 1)?.contiguous() } else { Ok(t) };
                let product = swap(a, *a_transposed)?.broadcast_matmul(&swap(b, *b_transposed)?)?;
                one(if *alpha == 1.0 { product } else { product.affine(f64::from(*alpha), 0.0)? })
            }
        }
        Op::View(chain) => {
            let t = x()?;
            if target.native_f32(t) {
                let t = t.contiguous()?;
                if let Some(view) = views::view_through(t.dims(), chain)? {
                    // Rows that are runs of adjacent floats copy fast; anything else goes step by
                    // step, where transposes have their own kernel.
                    if view.rows_are_adjacent() {
                        let out = with_cpu_f32(&t, |data| view.gather(data))?;
                        return one(Tensor::from_vec(out, view.dims(), t.device())?);
                    }
                }
            }
            one(run_chain(t, chain, target)?)
        }
        Op::SoftmaxConv(op) => one(softmax_conv(op, x()?, target)?),
        Op::Attention { q_transposed, k_transposed, v_transposed, alpha, views } => {
            let operands = [x()?, input(args, 1)?, input(args, 2)?];
            if operands.iter().all(|t| target.native_f32(t))
                && packed_gemm::available()
                && let Some(result) = attention_in_place(operands, [*q_transposed, *k_transposed, *v_transposed], *alpha, views)?
            {
                return one(result);
            }
            let [q, k, v] = operands;
            let (q, k, v) = (run_chain(q, &views.operands[0], target)?, run_chain(k, &views.operands[1], target)?, run_chain(v, &views.operands[2], target)?);
            let result = attention_unfolded(&q, &k, &v, [*q_transposed, *k_transposed, *v_transposed], *alpha, target)?;
            one(run_chain(&result, &views.result, target)?)
        }
        Op::Reduce { kind, axes, keepdims } => {
            let t = x()?;
            let axes: Vec<i64> = match (args.get(1).copied().flatten(), axes) {
                (Some(a), _) => ints(a)?,
                (None, Some(a)) => a.clone(),
                (None, None) => (0..t.rank() as i64).collect(),
            };
            let mut axes: Vec<usize> = axes.iter().map(|&a| normalize_axis(a, t.rank())).collect::<CResult<_>>()?;
            axes.sort_unstable();
            let mut out = t.clone();
            for &a in axes.iter().rev() {
                out = match kind {
                    ReduceKind::Max => out.max_keepdim(a)?,
                    ReduceKind::Sum => out.sum_keepdim(a)?,
                };
                if !keepdims {
                    out = out.squeeze(a)?;
                }
            }
            one(out)
        }
        Op::Shape { of_blocked } => {
            let x = x()?;
            let dims = match of_blocked {
                true => super::blocked::blocked_dims(x)
                    .ok_or_else(|| candle_core::Error::Msg(format!("the shape of a blocked tensor, given {:?}", x.dims())))?
                    .to_vec(),
                false => x.dims().to_vec(),
            };
            let dims: Vec<i64> = dims.into_iter().map(|d| d as i64).collect();
            let len = dims.len();
            one(Tensor::from_vec(dims, len, device)?)
        }
        Op::Gather { axis } => {
            let t = x()?;
            let indices = input(args, 1)?;
            let axis = normalize_axis(*axis, t.rank())?;
            let dim = t.dim(axis)? as i64;
            let idx: Vec<i64> = ints(indices)?.into_iter().map(|i| if i < 0 { i + dim } else { i }).collect();
            if idx.iter().any(|&i| i < 0 || i >= dim) {
                candle_core::bail!("Gather index out of range");
            }
            let flat = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), t.device())?;
            let picked = t.index_select(&flat, axis)?;
            let mut dims: Vec<usize> = t.dims()[..axis].to_vec();
            dims.extend_from_slice(indices.dims());
            dims.extend_from_slice(&t.dims()[axis + 1..]);
            one(picked.reshape(dims)?)
        }
        Op::Unsqueeze { axes } => {
            let t = x()?;
            let axes = match (args.get(1).copied().flatten(), axes) {
                (Some(a), _) => ints(a)?,
                (None, Some(a)) => a.clone(),
                (None, None) => candle_core::bail!("Unsqueeze without axes"),
            };
            let rank = t.rank() + axes.len();
            let mut axes: Vec<usize> = axes.iter().map(|&a| normalize_axis(a, rank)).collect::<CResult<_>>()?;
            axes.sort_unstable();
            let mut dims = t.dims().to_vec();
            for a in axes {
                dims.insert(a, 1);
            }
            one(t.reshape(dims)?)
        }
        Op::Range => {
            let scalar = |i| -> CResult<Tensor> { input(args, i)?.flatten_all() };
            let (s, l, d) = (scalar(0)?, scalar(1)?, scalar(2)?);
            if s.dtype() == DType::F32 {
                let v = |t: &Tensor| -> CResult<f32> { Ok(t.to_vec1::<f32>()?[0]) };
                one(Tensor::arange_step(v(&s)?, v(&l)?, v(&d)?, device)?)
            } else {
                let v = |t: &Tensor| -> CResult<i64> { Ok(ints(t)?[0]) };
                one(Tensor::arange_step(v(&s)?, v(&l)?, v(&d)?, device)?)
            }
        }
        Op::Cast { to } => one(x()?.to_dtype(*to)?),
        Op::ConstantOfShape { value } => {
            let dims: Vec<usize> = ints(x()?)?.into_iter().map(|d| d.max(0) as usize).collect();
            one(match &value.values {
                TensorValues::F32(v) => Tensor::full(v.first().copied().unwrap_or(0.0), dims, device)?,
                TensorValues::I64(v) => Tensor::full(v.first().copied().unwrap_or(0), dims, device)?,
            })
        }
        Op::Expand => {
            let t = x()?;
            let shape: Vec<usize> = ints(input(args, 1)?)?.into_iter().map(|d| d.max(0) as usize).collect();
            let target = broadcast_shape(t.dims(), &shape)?;
            one(t.broadcast_as(target)?.contiguous()?)
        }
        Op::Constant(data) => one(tensor_from_data(data, device)?),
        Op::Identity => one(x()?.clone()),
    }
}

fn broadcast_shape(a: &[usize], b: &[usize]) -> CResult<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= rank { s[i + s.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => Err(candle_core::Error::Msg(format!("cannot broadcast {x} with {y}"))),
        })
        .collect()
}

/// [`Op::Conv`] on its arguments. `cold[i]` says that argument `i` was written long before
/// this step ([`InputPart::cold`](kernels::conv::InputPart::cold)); arguments past the end of
/// `cold` are not.
pub(super) fn conv_step(c: &ConvOp, args: &[Option<&Tensor>], cold: &[bool], target: &Target) -> CResult<Tensor> {
    let any_blocked = args.iter().flatten().any(|t| blocked::blocked_dims(t).is_some());
    // A convolution with an upsampled part writes planes; the product over its other parts
    // reads them as they come ([`upsampled::conv_with_upsampled_part`]).
    if (!any_blocked && !c.blocked_output) || c.upsampled.is_some() {
        return conv_step_in_planes(c, args, cold, target);
    }
    // In blocks ([`blocked`]): the kernel that takes them reads the parts where they lie.
    let arguments: Vec<usize> = std::iter::once(0).chain(CONV_MORE_PARTS..args.len()).collect();
    let parts: Option<Vec<&Tensor>> = arguments.iter().map(|&i| args.get(i).copied().flatten()).collect();
    let cold_parts: Vec<bool> = arguments.iter().map(|&i| cold.get(i).copied().unwrap_or(false)).collect();
    if let (Some(parts), None) = (parts, &c.upsampled)
        && let Some(out) = conv_of_parts_in_place(c, &parts, &cold_parts, args.get(3).copied().flatten(), c.blocked_output, target)?
    {
        return Ok(out);
    }
    // Any other way reads and writes planes.
    let planes: Vec<Option<Tensor>> = args.iter().map(|a| a.map(blocked::to_planes).transpose()).collect::<CResult<_>>()?;
    let planes: Vec<Option<&Tensor>> = planes.iter().map(Option::as_ref).collect();
    let out = conv_step_in_planes(c, &planes, cold, target)?;
    if c.blocked_output { blocked::to_blocks(&out) } else { Ok(out) }
}

/// [`conv_step`] on arguments in planes, into planes.
fn conv_step_in_planes(c: &ConvOp, args: &[Option<&Tensor>], cold: &[bool], target: &Target) -> CResult<Tensor> {
    let is_cold = |i: usize| cold.get(i).copied().unwrap_or(false);
    let residual = args.get(3).copied().flatten();
    if c.concat_parts > 0 {
        let arguments = std::iter::once(0).chain(CONV_MORE_PARTS..args.len());
        let parts: Vec<&Tensor> = arguments
            .clone()
            .map(|i| args.get(i).copied().flatten())
            .collect::<Option<_>>()
            .ok_or_else(|| candle_core::Error::Msg("missing concatenation part".into()))?;
        let cold: Vec<bool> = arguments.map(is_cold).collect();
        return match &c.upsampled {
            Some(up) => upsampled::conv_with_upsampled_part(c, up, &parts, &cold, residual, target),
            None => conv_of_parts(c, &parts, &cold, residual, target),
        };
    }
    let x = input(args, 0)?;
    // Read in place (where the kernels learn whether it is cold, and take planes at any pitch).
    if let Some(out) = conv_of_parts_in_place(c, &[x], &[is_cold(0)], residual, false, target)? {
        return Ok(out);
    }
    conv(c, x, residual, target)
}

/// A convolution, plus `residual` when the graph adds one to its output.
fn conv(c: &ConvOp, x: &Tensor, residual: Option<&Tensor>, target: &Target) -> CResult<Tensor> {
    let Some(residual) = residual else { return conv_alone(c, x) };
    let fits = match (x.dims(), residual.dims()) {
        (&[n, _, h, w], &[rn, rc, rh, rw]) => {
            c.candle.is_none() && target.native_f32(residual) && c.conv.output_size(h, w) == Some((rh, rw)) && (n, c.conv.spec().out_channels) == (rn, rc)
        }
        _ => false,
    };
    if fits {
        let x = x.contiguous()?.to_dtype(DType::F32)?;
        x.apply_op2_no_bwd(&residual.contiguous()?, &ConvWithResidual(&c.conv))
    } else {
        conv_alone(c, x)?.broadcast_add(residual)
    }
}

/// A convolution of the concatenation of `parts` along channels (`cold` as in [`conv_step`], one
/// per part). On the CPU it reads each part where it lies; otherwise the parts are concatenated
/// first.
pub(super) fn conv_of_parts(c: &ConvOp, parts: &[&Tensor], cold: &[bool], residual: Option<&Tensor>, target: &Target) -> CResult<Tensor> {
    if let Some(out) = conv_of_parts_in_place(c, parts, cold, residual, false, target)? {
        return Ok(out);
    }
    let axis = 1;
    let plain: Vec<ConcatPart> = parts.iter().map(|&t| ConcatPart { tensors: vec![t], map: None, nested: None }).collect();
    let x = match if target.native { concat_cpu(&plain, axis)? } else { None } {
        Some(t) => t,
        None => Tensor::cat(parts, axis)?,
    };
    conv(c, &x, residual, target)
}

/// [`conv_of_parts`] on the CPU kernel, when every part is a CPU `f32` tensor of the same
/// `[n, _, h, w]` whose channel planes (or blocks) are contiguous; `Ok(None)` otherwise. The
/// output is in blocks when `blocked_out`.
fn conv_of_parts_in_place(
    c: &ConvOp,
    parts: &[&Tensor],
    cold: &[bool],
    residual: Option<&Tensor>,
    blocked_out: bool,
    target: &Target,
) -> CResult<Option<Tensor>> {
    if c.candle.is_some() {
        return Ok(None);
    }
    let Some(out) = conv_parts_in_place(&c.conv, parts, cold, residual, c.spread_output, blocked_out, target)? else { return Ok(None) };
    Ok(Some(match out.layout {
        ChannelLayout::Planes => spread::planes_tensor(out.data, out.dims, out.pitch)?,
        ChannelLayout::Blocked => blocked::blocked_tensor(out.data, out.dims)?,
    }))
}

/// A convolution's output from [`conv_parts_in_place`]: `dims` (`[n, c, h, w]`), its channel
/// planes `pitch` floats apart in `data`, zeros between them; or in blocks of 8 channels
/// ([`blocked`]; `pitch` is then `h * w`).
pub(super) struct ConvOutput {
    pub data: Vec<f32>,
    pub dims: [usize; 4],
    pub pitch: usize,
    pub layout: ChannelLayout,
}

/// `t` (in planes or blocks, its storage `data`) as one part of a convolution's input, read
/// where it lies, and its layout: `None` unless its rows (each block's rows) are contiguous and
/// its planes (blocks) `h * w` (`8 h w`) or more apart.
fn input_part_laid_out<'a>(t: &Tensor, data: &'a [f32], cold: bool) -> Option<(kernels::conv::InputPart<'a>, ChannelLayout)> {
    let Some([_, channels, h, w]) = blocked::blocked_dims(t) else { return input_part(t, data, cold).map(|part| (part, ChannelLayout::Planes)) };
    let &[image_stride, block_stride, row_stride, 8, 1] = t.layout().stride() else { return None };
    let part = kernels::conv::InputPart { data: &data[t.layout().start_offset()..], channels, image_stride, plane_stride: block_stride / 8, cold };
    (row_stride == 8 * w && block_stride.is_multiple_of(8) && block_stride >= 8 * h * w).then_some((part, ChannelLayout::Blocked))
}

/// `t` (`[n, c, h, w]`, its storage `data`) as one part of a convolution's input, read where
/// it lies: `None` unless its rows are contiguous and its planes `h * w` or more apart.
pub(super) fn input_part<'a>(t: &Tensor, data: &'a [f32], cold: bool) -> Option<kernels::conv::InputPart<'a>> {
    let &[_, channels, h, w] = t.dims() else { return None };
    let &[image_stride, plane_stride, row_stride, 1] = t.layout().stride() else { return None };
    (row_stride == w && plane_stride >= h * w).then(|| kernels::conv::InputPart {
        data: &data[t.layout().start_offset()..],
        channels,
        image_stride,
        plane_stride,
        cold,
    })
}

/// `conv` on the concatenation of `parts` along channels, read where they lie (`cold` as in
/// [`conv_step`], one per part); its output planes spread when `spread` allows
/// ([`spread::output_pitch`]), or its output in blocks when `blocked_out` (with a residual in
/// blocks, which is made so when it is not). `Ok(None)` unless every part is a CPU `f32` tensor
/// of the same `[n, _, h, w]` whose rows are contiguous ([`input_part`]), all in planes or all
/// in blocks.
pub(super) fn conv_parts_in_place(
    conv: &Conv2d,
    parts: &[&Tensor],
    cold: &[bool],
    residual: Option<&Tensor>,
    spread: bool,
    blocked_out: bool,
    target: &Target,
) -> CResult<Option<ConvOutput>> {
    let Some([n, _, h, w]) = parts.first().and_then(|p| blocked::logical_dims(p)) else { return Ok(None) };
    let Some((oh, ow)) = conv.output_size(h, w) else {
        candle_core::bail!("conv input {h}x{w} is smaller than the kernel");
    };
    let dims = [n, conv.spec().out_channels, oh, ow];
    let usable = |t: &Tensor| target.native_f32(t) && matches!(blocked::logical_dims(t), Some([pn, _, ph, pw]) if (pn, ph, pw) == (n, h, w));
    let residual_fits = residual.is_none_or(|r| target.native_f32(r) && blocked::logical_dims(r) == Some(dims));
    let in_blocks = |t: &&Tensor| blocked::blocked_dims(t).is_some();
    let one_layout = parts.iter().all(in_blocks) || !parts.iter().any(in_blocks);
    if !parts.iter().all(|t| usable(t)) || !residual_fits || !one_layout || (blocked_out && !dims[1].is_multiple_of(kernels::conv::BLOCK)) {
        return Ok(None);
    }
    let channels: usize = parts.iter().filter_map(|p| blocked::logical_dims(p)).map(|d| d[1]).sum();
    if channels != conv.spec().in_channels {
        candle_core::bail!("conv expects {} input channels, its parts have {channels}", conv.spec().in_channels);
    }
    if blocked_out || parts.iter().any(in_blocks) {
        return Ok(conv_blocks_in_place(conv, parts, cold, residual, blocked_out, [n, h, w], dims)?.map(|data| {
            let layout = if blocked_out { ChannelLayout::Blocked } else { ChannelLayout::Planes };
            ConvOutput { data, dims, pitch: oh * ow, layout }
        }));
    }
    let writes_pitched = conv.writes_pitched(oh, ow);
    // The output takes the residual's pitch (the kernels read the residual where they write
    // the output); a residual of another pitch than the output may have is packed first.
    let residual = match residual.map(|r| (r, spread::plane_pitch(r))) {
        Some((r, Some(pitch))) if pitch == oh * ow || (spread && writes_pitched) => Some((r.clone(), pitch)),
        Some((r, _)) => Some((r.contiguous()?, oh * ow)),
        None => None,
    };
    let pitch = residual.as_ref().map_or_else(|| spread::output_pitch(spread, writes_pitched, oh, ow), |(_, pitch)| *pitch);
    // The residual is a tensor of its own (it may share a part's storage): read under the same
    // guards as the parts.
    let mut tensors = parts.to_vec();
    tensors.extend(residual.as_ref().map(|(r, _)| r));
    let out = with_cpu_storages(&tensors, |buffers| {
        let input_parts =
            parts.iter().zip(buffers).enumerate().map(|(i, (t, data))| input_part(t, data, cold.get(i).copied().unwrap_or(false))).collect::<Option<_>>()?;
        let input = kernels::conv::ConvInput::new(input_parts, n, h, w)?;
        let residual = residual.as_ref().zip(buffers.last()).map(|((r, _), data)| &data[r.layout().start_offset()..]);
        Some(conv.run_input_pitched(&input, residual, pitch))
    })?;
    Ok(out.flatten().map(|data| ConvOutput { data, dims, pitch, layout: ChannelLayout::Planes }))
}

/// [`conv_parts_in_place`] where the parts are in blocks or the output is to be: the residual
/// is made the output's layout (packed), and the output's planes are `oh * ow` apart.
fn conv_blocks_in_place(
    conv: &Conv2d,
    parts: &[&Tensor],
    cold: &[bool],
    residual: Option<&Tensor>,
    blocked_out: bool,
    [n, h, w]: [usize; 3],
    dims: [usize; 4],
) -> CResult<Option<Vec<f32>>> {
    let residual = match residual {
        Some(r) if blocked_out => Some(blocked::to_blocks(r)?.contiguous()?),
        Some(r) => Some(blocked::to_planes(r)?.contiguous()?),
        None => None,
    };
    let mut tensors = parts.to_vec();
    tensors.extend(residual.as_ref());
    let out = with_cpu_storages(&tensors, |buffers| {
        let laid_out: Vec<_> = parts
            .iter()
            .zip(buffers)
            .enumerate()
            .map(|(i, (t, data))| input_part_laid_out(t, data, cold.get(i).copied().unwrap_or(false)))
            .collect::<Option<_>>()?;
        let in_blocks = laid_out.iter().all(|(_, layout)| *layout == ChannelLayout::Blocked);
        let parts = laid_out.into_iter().map(|(part, _)| part).collect();
        let input = if in_blocks { kernels::conv::ConvInput::blocked(parts, n, h, w)? } else { kernels::conv::ConvInput::new(parts, n, h, w)? };
        let residual = residual.as_ref().zip(buffers.last()).map(|(r, data)| &data[r.layout().start_offset()..]);
        Some(match blocked_out {
            true => conv.run_input_blocked(&input, residual),
            false => conv.run_input_pitched(&input, residual, dims[2] * dims[3]),
        })
    })?;
    Ok(out.flatten())
}

fn conv_alone(c: &ConvOp, x: &Tensor) -> CResult<Tensor> {
    match &c.candle {
        Some(candle) => {
            let conv = c.conv.spec();
            let (t, l, b, r) = conv.pads;
            let (x, pad) = if t == b && l == r && t == l { (x.clone(), t) } else { (x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, 0) };
            if conv.stride.0 != conv.stride.1 || conv.dilation.0 != conv.dilation.1 {
                candle_core::bail!("anisotropic stride or dilation needs the CPU kernel");
            }
            let y = x.conv2d(&candle.weight, pad, conv.stride.0, conv.dilation.0, candle.groups)?.broadcast_add(&candle.bias)?;
            match conv.activation {
                Activation::Identity => Ok(y),
                Activation::Silu => y.silu(),
            }
        }
        None => x.contiguous()?.to_dtype(DType::F32)?.apply_op1_no_bwd(&c.conv),
    }
}

pub(super) fn max_pool(x: &Tensor, kernel: (usize, usize), stride: (usize, usize), pads: (usize, usize, usize, usize)) -> CResult<Tensor> {
    if kernel.0 != kernel.1 || stride.0 != stride.1 {
        candle_core::bail!("only square pooling is supported");
    }
    let (t, l, b, r) = pads;
    if t >= kernel.0 || l >= kernel.1 || b >= kernel.0 || r >= kernel.1 {
        candle_core::bail!("pooling padding must be smaller than the kernel");
    }
    // Padding by repeating the edge equals padding with -inf for a max: every window that covers
    // padding also covers the edge value it repeats.
    let padded = x.pad_with_same(2, t, b)?.pad_with_same(3, l, r)?;
    padded.max_pool2d_with_stride(kernel.0, stride.0)
}

#[cfg(test)]
mod tests {
    use super::super::Kernels;
    use super::*;

    #[test]
    fn tensors_that_share_a_storage_share_one_read_guard() {
        // Two halves of one tensor, read together while another thread waits to write it: a
        // second read lock on the storage would queue behind the writer, which waits for the
        // first, and never return.
        let whole = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap();
        let (first, second) = (whole.narrow(0, 0, 4).unwrap(), whole.narrow(0, 4, 4).unwrap());
        let other = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let ones = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        std::thread::scope(|scope| {
            let read = with_cpu_storages(&[&first, &other, &second], |buffers| {
                let writer = scope.spawn(|| whole.slice_set(&ones, 0, 0));
                // Let the writer queue on the lock before the buffers are used.
                std::thread::sleep(std::time::Duration::from_millis(100));
                assert!(!writer.is_finished(), "the writer waits while the storage is read");
                (buffers.len(), std::ptr::eq(buffers[0], buffers[2]), buffers[2][4..].to_vec(), buffers[1].len())
            });
            assert_eq!(read.unwrap(), Some((3, true, vec![4.0, 5.0, 6.0, 7.0], 3)));
        });
        assert_eq!(whole.to_vec1::<f32>().unwrap()[..4], [1.0; 4]);
    }

    #[test]
    fn a_nested_concatenation_is_the_same_copied_in_place_or_by_candle() {
        // Rows of 3 then of 5, joined along the last axis and reshaped, then joined again with
        // a plain part and through a function. A transposed input cannot be copied in place:
        // candle joins it.
        let values = |n: usize| Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap().affine(0.1, -1.0).unwrap();
        let (a, b, plain) = (values(12).reshape((2, 2, 3)).unwrap(), values(20).reshape((2, 2, 5)).unwrap(), values(16).reshape((2, 8)).unwrap());
        let nested = vec![None, Some(NestedConcat { axis: -1, parts: 2, reshapes: vec![vec![2, -1]] })];
        let op = Op::Concat { axis: 1, maps: vec![None, Some(UnaryFn::Sigmoid)], nested };
        let inner = Tensor::cat(&[&a, &b], 2).unwrap().reshape((2, 16)).unwrap();
        let want = Tensor::cat(&[plain.clone(), candle_nn::ops::sigmoid(&inner).unwrap()], 1).unwrap();
        let transposed = values(20).reshape((5, 2, 2)).unwrap().permute((1, 2, 0)).unwrap();
        let want_transposed = {
            let inner = Tensor::cat(&[&a, &transposed], 2).unwrap().reshape((2, 16)).unwrap();
            Tensor::cat(&[plain.clone(), candle_nn::ops::sigmoid(&inner).unwrap()], 1).unwrap()
        };
        for kernels in [Kernels::Native, Kernels::Generic] {
            let target = Target::new(&Device::Cpu, kernels);
            for (second, want) in [(&b, &want), (&transposed, &want_transposed)] {
                let got = eval(&op, &[Some(&plain), Some(&a), Some(second)], &target).unwrap();
                let diff = (&got[0] - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-6, "{kernels:?}: {diff}");
            }
        }
        // A nested part without all its inputs is an error.
        assert!(eval(&op, &[Some(&plain), Some(&a)], &Target::new(&Device::Cpu, Kernels::Native)).is_err());
    }
}
