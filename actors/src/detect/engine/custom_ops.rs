//! The CPU custom operations: streamdet's kernels wrapped as candle `CustomOp`s, run on
//! contiguous `f32` CPU storage.

use std::mem::MaybeUninit;

use crate::detect::kernels::parallel;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};

use super::{BinaryOp, CResult};
use crate::detect::kernels::activation::{self, UnaryFn};
use crate::detect::kernels::conv::Conv2d;
use crate::detect::kernels::pool::MaxPool;
use crate::detect::kernels::{attention, packed_gemm, transpose};

impl CustomOp1 for Conv2d {
    fn name(&self) -> &'static str {
        "streamdet-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let &[n, c, h, w] = layout.dims() else {
            candle_core::bail!("conv input must be 4-D, got {:?}", layout.dims());
        };
        if c != self.spec().in_channels {
            candle_core::bail!("conv expects {} input channels, got {c}", self.spec().in_channels);
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("conv input must be contiguous");
        };
        let input = &storage.as_slice::<f32>()?[start..end];
        let Some((oh, ow)) = self.output_size(h, w) else {
            candle_core::bail!("conv input {h}x{w} is smaller than the kernel");
        };
        let out = self.run(input, n, h, w, None);
        Ok((CpuStorage::F32(out), Shape::from((n, self.spec().out_channels, oh, ow))))
    }
}

/// A convolution whose output gets a residual of its own shape added in the epilogue.
pub(super) struct ConvWithResidual<'a>(pub(super) &'a Conv2d);

impl CustomOp2 for ConvWithResidual<'_> {
    fn name(&self) -> &'static str {
        "streamdet-conv2d-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let conv = self.0;
        let &[n, c, h, w] = l1.dims() else {
            candle_core::bail!("conv input must be 4-D, got {:?}", l1.dims());
        };
        let Some((oh, ow)) = conv.output_size(h, w) else {
            candle_core::bail!("conv input {h}x{w} is smaller than the kernel");
        };
        if c != conv.spec().in_channels || l2.dims() != [n, conv.spec().out_channels, oh, ow] {
            candle_core::bail!("conv of {:?} cannot take a residual of {:?}", l1.dims(), l2.dims());
        }
        let (input, residual) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let out = conv.run(input, n, h, w, Some(residual));
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }
}

/// Element-wise arithmetic on the CPU, in parallel: two tensors of one shape, or a tensor and a
/// scalar.
pub(super) struct CpuBinary(pub(super) BinaryOp);

impl CustomOp2 for CpuBinary {
    fn name(&self) -> &'static str {
        "streamdet-binary"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (a, b) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        // One loop per operation, so that each is inlined and vectorised (through a function
        // pointer, the box decoding's `Add` of 16,800 floats took 25 µs).
        let out = match (b, self.0) {
            (&[y], BinaryOp::Add) => map_into(a, |x| x + y),
            (&[y], BinaryOp::Sub) => map_into(a, |x| x - y),
            (&[y], BinaryOp::Mul) => map_into(a, |x| x * y),
            (&[y], BinaryOp::Div) => map_into(a, |x| x / y),
            (_, BinaryOp::Add) if b.len() == a.len() => zip_into(a, b, |x, y| x + y),
            (_, BinaryOp::Sub) if b.len() == a.len() => zip_into(a, b, |x, y| x - y),
            (_, BinaryOp::Mul) if b.len() == a.len() => zip_into(a, b, |x, y| x * y),
            (_, BinaryOp::Div) if b.len() == a.len() => zip_into(a, b, |x, y| x / y),
            _ => candle_core::bail!("element-wise operands {:?} and {:?}", l1.dims(), l2.dims()),
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Floats per parallel task of an element-wise operation.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// `f` of each element of `a`, into a new vector, in parallel pieces.
fn map_into(a: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    build(a.len(), |index, out| {
        let a = &a[index * ELEMENTWISE_CHUNK..][..out.len()];
        write_all(out, a.iter().map(|&x| f(x)));
    })
}

/// `f` of each pair of elements of `a` and `b` (of one length), into a new vector, in
/// parallel pieces.
fn zip_into(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    build(a.len(), |index, out| {
        let (a, b) = (&a[index * ELEMENTWISE_CHUNK..][..out.len()], &b[index * ELEMENTWISE_CHUNK..][..out.len()]);
        write_all(out, a.iter().zip(b).map(|(&x, &y)| f(x, y)));
    })
}

/// A copy of `input` made in parallel pieces (`to_vec` copies on one thread), each of which
/// `then` updates in place while it is in cache.
fn copy_then(input: &[f32], then: impl Fn(&mut [f32]) + Sync) -> Vec<f32> {
    build(input.len(), |index, out| then(write_all(out, input[index * ELEMENTWISE_CHUNK..][..out.len()].iter().copied())))
}

/// A vector of `len` floats, made in parallel pieces of [`ELEMENTWISE_CHUNK`] by `fill`, which
/// must write every float of its piece (its index, the piece) through [`write_all`]. Not
/// zero-filled first: on one thread, that pass over memory took about as long as the
/// operation (the detection head's sigmoid of 672,000 floats).
fn build(len: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    let pieces = &mut out.spare_capacity_mut()[..len];
    // A piece not written completely panics in `write_all`, and then `out` is dropped empty.
    parallel::for_each_chunk_mut(pieces, ELEMENTWISE_CHUNK, |index, piece| fill(index, piece));
    // SAFETY: every piece was written whole by `write_all` (which panics otherwise, before
    // this line is reached).
    unsafe { out.set_len(len) };
    out
}

/// Writes `values` into `out`, which they must fill exactly (a panic otherwise), and returns
/// it as initialised floats.
fn write_all(out: &mut [MaybeUninit<f32>], values: impl Iterator<Item = f32>) -> &mut [f32] {
    let mut written = 0;
    for (o, v) in out.iter_mut().zip(values) {
        o.write(v);
        written += 1;
    }
    assert_eq!(written, out.len(), "an element-wise piece left floats unwritten");
    // SAFETY: all `out.len()` elements were written just above; `MaybeUninit<f32>` has the
    // layout of `f32`.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> CResult<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Element-wise functions on the CPU with streamdet's vectorised kernels.
pub(super) struct CpuUnary(pub(super) UnaryFn);

impl CustomOp1 for CpuUnary {
    fn name(&self) -> &'static str {
        "streamdet-unary"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = copy_then(contiguous_f32(storage, layout)?, |chunk| activation::map_inplace(chunk, self.0));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Softmax over one axis on the CPU: rows in cache for the last axis, column-wise passes
/// (vectorised across the contiguous inner axes) for any other.
pub(super) struct CpuSoftmax {
    pub(super) axis: usize,
}

impl CustomOp1 for CpuSoftmax {
    fn name(&self) -> &'static str {
        "streamdet-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let len = dims[self.axis];
        let inner: usize = dims[self.axis + 1..].iter().product();
        let mut out = copy_then(contiguous_f32(storage, layout)?, |_| {});
        if len > 0 && inner > 0 {
            if inner == 1 {
                // Rows are short (attention's are 400): a task takes many.
                let rows_per_task = (16384 / len).max(1);
                parallel::for_each_chunk_mut(&mut out, len * rows_per_task, |_, rows| rows.chunks_exact_mut(len).for_each(activation::softmax_inplace));
            } else {
                parallel::for_each_chunk_mut(&mut out, len * inner, |_, block| activation::softmax_columns_inplace(block, len, inner));
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Axis permutation on the CPU (blocked transposes and row copies).
pub(super) struct CpuPermute(pub(super) Vec<usize>);

impl CustomOp1 for CpuPermute {
    fn name(&self) -> &'static str {
        "streamdet-permute"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let mut seen = vec![false; dims.len()];
        if self.0.len() != dims.len() || self.0.iter().any(|&a| a >= dims.len() || std::mem::replace(&mut seen[a], true)) {
            candle_core::bail!("permutation {:?} does not fit rank {}", self.0, dims.len());
        }
        let out = transpose::permute(contiguous_f32(storage, layout)?, dims, &self.0);
        let out_dims: Vec<usize> = self.0.iter().map(|&a| dims[a]).collect();
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// Batched matrix product with equal batch dimensions, on the packed microkernel.
pub(super) struct CpuMatMul {
    pub(super) a_transposed: bool,
    pub(super) b_transposed: bool,
    pub(super) alpha: f32,
}

impl CustomOp2 for CpuMatMul {
    fn name(&self) -> &'static str {
        "streamdet-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        let (m, k) = if self.a_transposed { (da[r - 1], da[r - 2]) } else { (da[r - 2], da[r - 1]) };
        let (kb, n) = if self.b_transposed { (db[r - 1], db[r - 2]) } else { (db[r - 2], db[r - 1]) };
        if kb != k {
            candle_core::bail!("matmul of {da:?} and {db:?}");
        }
        let batch: usize = da[..r - 2].iter().product();
        let (a, b) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let out = packed_gemm::batched_matmul(a, b, batch, m, k, n, self.a_transposed, self.b_transposed, self.alpha);
        let mut dims = da.to_vec();
        dims[r - 2] = m;
        dims[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Nearest-neighbour upsampling of NCHW planes by integer factors on the CPU, in parallel over
/// planes: each input row is widened once, then copied to its output rows.
pub(super) struct CpuUpsample {
    pub(super) height: usize,
    pub(super) width: usize,
}

impl CustomOp1 for CpuUpsample {
    fn name(&self) -> &'static str {
        "streamdet-upsample"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let &[n, c, h, w] = layout.dims() else {
            candle_core::bail!("upsampling needs a 4-D input, got {:?}", layout.dims());
        };
        let (oh, ow) = (self.height, self.width);
        if h == 0 || w == 0 || oh % h != 0 || ow % w != 0 {
            candle_core::bail!("only integer upsampling is supported ({h}x{w} to {oh}x{ow})");
        }
        let (fy, fx) = (oh / h, ow / w);
        let input = contiguous_f32(storage, layout)?;
        let len = n * c * oh * ow;
        // Not zero-filled first: every element is written below.
        let mut out: Vec<f32> = Vec::with_capacity(len);
        parallel::for_each_chunk_mut(&mut out.spare_capacity_mut()[..len], oh * ow, |index, dst| {
            let src = &input[index * h * w..][..h * w];
            for (row, rows_out) in src.chunks_exact(w).zip(dst.chunks_exact_mut(fy * ow)) {
                let (first, rest) = rows_out.split_at_mut(ow);
                if fx == 2 {
                    // The common case (YOLO necks), as pairs the compiler can vectorise.
                    for (pair, &v) in first.chunks_exact_mut(2).zip(row) {
                        pair[0].write(v);
                        pair[1].write(v);
                    }
                } else {
                    for (pixels, &v) in first.chunks_exact_mut(fx).zip(row) {
                        pixels.iter_mut().for_each(|p| _ = p.write(v));
                    }
                }
                for copy in rest.chunks_exact_mut(ow) {
                    copy.copy_from_slice(first);
                }
            }
        });
        // SAFETY: each plane's rows were written above: the first of each group of `fy` pixel by
        // pixel (`w * fx = ow` of them), the others copied from it; the planes cover `len`.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// Max pooling of NCHW planes on the CPU ([`MaxPool`]).
pub(super) struct CpuMaxPool(pub(super) MaxPool);

impl CustomOp1 for CpuMaxPool {
    fn name(&self) -> &'static str {
        "streamdet-maxpool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let &[n, c, h, w] = layout.dims() else {
            candle_core::bail!("max pooling needs a 4-D input, got {:?}", layout.dims());
        };
        let (Some((oh, ow)), Some(out)) = (self.0.output_size(h, w), self.0.run(contiguous_f32(storage, layout)?, h, w)) else {
            candle_core::bail!("max pooling {:?} does not fit {h}x{w}", self.0);
        };
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// [`Op::Attention`] on the CPU: [`attention::attention`] over contiguous operands.
pub(super) struct CpuAttention {
    pub(super) q_transposed: bool,
    pub(super) k_transposed: bool,
    pub(super) v_transposed: bool,
    pub(super) alpha: f32,
}

impl candle_core::CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "streamdet-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (dq, dk, dv) = (l1.dims(), l2.dims(), l3.dims());
        let r = dq.len();
        let last_two = |d: &[usize], swapped: bool| if swapped { (d[r - 1], d[r - 2]) } else { (d[r - 2], d[r - 1]) };
        let (queries, depth) = last_two(dq, self.q_transposed);
        let (depth_k, keys) = last_two(dk, self.k_transposed);
        let (channels, keys_v) = last_two(dv, self.v_transposed);
        if depth_k != depth || keys_v != keys || keys == 0 || depth == 0 {
            candle_core::bail!("attention of {dq:?}, {dk:?} and {dv:?}");
        }
        let batch: usize = dq[..r - 2].iter().product();
        let shape = attention::AttentionShape { batch, queries, keys, depth, channels };
        let layout = attention::AttentionLayout { q_transposed: self.q_transposed, k_transposed: self.k_transposed, v_transposed: self.v_transposed };
        let (q, k, v) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?);
        let out = attention::attention(q, k, v, shape, layout, self.alpha);
        let mut dims = dq.to_vec();
        dims[r - 2] = channels;
        dims[r - 1] = queries;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::detect::engine::eval::max_pool;

    #[test]
    fn cpu_upsampling_matches_candles() {
        let input: Vec<f32> = (0..2 * 3 * 5 * 7).map(|i| i as f32).collect();
        let x = Tensor::from_vec(input, (2, 3, 5, 7), &Device::Cpu).unwrap();
        for (height, width) in [(10, 14), (15, 7), (5, 21)] {
            let want = x.upsample_nearest2d(height, width).unwrap();
            let got = x.apply_op1_no_bwd(&CpuUpsample { height, width }).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{height}x{width}");
        }
    }

    #[test]
    fn cpu_max_pool_matches_candles() {
        let input: Vec<f32> = (0..2 * 3 * 9 * 11).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let x = Tensor::from_vec(input, (2, 3, 9, 11), &Device::Cpu).unwrap();
        for (kernel, stride, pads) in
            [((5, 5), (1, 1), (2, 2, 2, 2)), ((3, 3), (2, 2), (1, 1, 1, 1)), ((2, 2), (2, 2), (0, 0, 0, 0)), ((3, 3), (1, 1), (0, 2, 1, 0))]
        {
            let want = max_pool(&x, kernel, stride, pads).unwrap();
            let got = x.apply_op1_no_bwd(&CpuMaxPool(MaxPool::new(kernel, stride, pads).unwrap())).unwrap();
            assert_eq!(got.dims(), want.dims(), "{kernel:?} {stride:?} {pads:?}");
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{kernel:?} {stride:?} {pads:?}"
            );
        }
    }
}
