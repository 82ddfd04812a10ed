//! Fused attention on the CPU: `out[b] = V[b] x softmax(alpha * Q[b] x K[b])^T`, the softmax
//! over keys, without the `queries x keys` matrix ever reaching memory.
//!
//! Blocks of [`BLOCK`] queries run in parallel. A block computes its scores transposed,
//! `S^T = (alpha K^T) x Q_block^T` (`keys x BLOCK`), written straight in the packed panels
//! of a right operand, takes the softmax down each column, and multiplies `V x S^T`: the
//! weights are then the right operand as they lie, and the product lands in the output's own
//! rows (`channels x BLOCK`). So nothing is repacked or transposed per block: `K^T` and `V`
//! are packed once per batch item, and a block packs only its `depth x BLOCK` queries.

use crate::detect::kernels::parallel;

use super::activation;
use super::isa::{self, Isa};
use super::pack::{self, PackedA, PackedB};
use super::tiling;

/// Queries per task: the block's scores (`keys x BLOCK`) stay in L2. A multiple of every
/// microkernel's panel width, so that the panels of a row of scores never leave it. The last
/// block of YOLO's 400 queries fills half a panel, which costs next to nothing: 384 queries ran
/// at 75.0 GFLOP/s, 400 at 74.7 (`cargo bench --bench conv`, one thread, an AMD EPYC).
const BLOCK: usize = 64;
const _: () = assert!(BLOCK.is_multiple_of(isa::MAX_NR) && BLOCK.is_multiple_of(Isa::Avx2.nr()));

/// A batch of matrices stored at fixed strides in one buffer: element `(i, j)` of item `b` is
/// at `item_offset(b) + i * row_stride + j * col_stride`, where `item_offset` walks the batch
/// axes (`batch_dims`, row-major) with `batch_strides`. A transpose or an axis permutation of a
/// contiguous tensor is such a view of its buffer, so operands are read where they lie.
///
/// Built by [`new`](Self::new), which checks that the strides agree with the axes and that the
/// furthest element's offset fits in `usize`; the view is checked against a buffer when it
/// becomes an [`Operand`] or an [`OutputView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixBatch {
    offset: usize,
    batch_dims: Vec<usize>,
    batch_strides: Vec<usize>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
    /// One past the furthest element (0 when there is none), worked out once.
    extent: usize,
}

impl MatrixBatch {
    /// Items over `batch_dims` (row-major) at `batch_strides`, each `rows x cols` at
    /// `(row_stride, col_stride)`, from `offset`; `None` when the batch axes and strides differ
    /// in number or the furthest element's offset overflows.
    pub fn new(
        offset: usize,
        batch_dims: Vec<usize>,
        batch_strides: Vec<usize>,
        (rows, cols): (usize, usize),
        (row_stride, col_stride): (usize, usize),
    ) -> Option<Self> {
        if batch_dims.len() != batch_strides.len() {
            return None;
        }
        let empty = batch_dims.iter().chain([&rows, &cols]).any(|&d| d == 0);
        let extent = if empty {
            0
        } else {
            // The last element's offset, plus one.
            let mut last = offset;
            for (&dim, &stride) in batch_dims.iter().zip(&batch_strides).chain([(&rows, &row_stride), (&cols, &col_stride)]) {
                last = last.checked_add((dim - 1).checked_mul(stride)?)?;
            }
            last.checked_add(1)?
        };
        Some(MatrixBatch { offset, batch_dims, batch_strides, rows, cols, row_stride, col_stride, extent })
    }

    /// `batch` row-major `rows x cols` matrices, one after another.
    pub fn contiguous(batch: usize, rows: usize, cols: usize) -> Self {
        Self::new(0, vec![batch], vec![rows * cols], (rows, cols), (cols, 1)).expect("a contiguous batch fits in memory")
    }

    /// The same elements seen with rows and columns swapped.
    pub fn transposed(self) -> Self {
        MatrixBatch { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    pub fn items(&self) -> usize {
        self.batch_dims.iter().product()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    #[cfg(test)]
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    #[cfg(test)]
    pub fn col_stride(&self) -> usize {
        self.col_stride
    }

    #[cfg(test)]
    pub fn batch_strides(&self) -> &[usize] {
        &self.batch_strides
    }

    /// Where item `b`'s element `(0, 0)` lies.
    pub fn item_offset(&self, mut b: usize) -> usize {
        let mut offset = self.offset;
        for (&dim, &stride) in self.batch_dims.iter().zip(&self.batch_strides).rev() {
            offset += b % dim * stride;
            b /= dim;
        }
        offset
    }

    /// One past the furthest element the view reaches (0 when it has none).
    pub fn extent(&self) -> usize {
        self.extent
    }

    /// Whether no two elements of the view share an offset, by a sufficient test: the axes of
    /// more than one element, sorted by stride, each step further than all the inner ones
    /// reach together (`stride > sum of (size - 1) * stride` over the axes inside it). Then
    /// two indices that differ first (from the outside) on an axis differ there by at least
    /// its stride, which the inner axes cannot make up. The views of reshapes, permutations and
    /// splits of a tensor pass; a zero stride, or two axes that overlap, fail.
    pub fn is_injective(&self) -> bool {
        if self.extent == 0 {
            return true;
        }
        let mut axes: Vec<(usize, usize)> = self
            .batch_dims
            .iter()
            .zip(&self.batch_strides)
            .map(|(&d, &s)| (d, s))
            .chain([(self.rows, self.row_stride), (self.cols, self.col_stride)])
            .filter(|&(dim, _)| dim > 1)
            .collect();
        axes.sort_unstable_by_key(|&(_, stride)| stride);
        // The inner axes' reach is at most the extent, which fits (checked in `new`).
        let mut reach = 0;
        for (dim, stride) in axes {
            if stride <= reach {
                return false;
            }
            reach += (dim - 1) * stride;
        }
        true
    }
}

/// An attention operand read in place: a [`MatrixBatch`] checked, when it is made, to lie
/// inside its buffer.
#[derive(Debug, Clone)]
pub struct Operand<'a> {
    data: &'a [f32],
    view: MatrixBatch,
}

impl<'a> Operand<'a> {
    /// `None` when `view` reaches past the end of `data`.
    pub fn new(data: &'a [f32], view: MatrixBatch) -> Option<Self> {
        (view.extent() <= data.len()).then_some(Operand { data, view })
    }

    pub fn view(&self) -> &MatrixBatch {
        &self.view
    }
}

/// Where attention writes its result: a [`MatrixBatch`] whose columns are adjacent (a
/// `col_stride` of one) and whose elements all lie at different offsets
/// ([`MatrixBatch::is_injective`]), checked when it is made, so that the tasks that each write
/// a part of it never write the same float. The output buffer is exactly
/// [`extent`](MatrixBatch::extent) floats long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputView(MatrixBatch);

impl OutputView {
    /// `None` when columns are not adjacent or two elements share an offset.
    pub fn new(view: MatrixBatch) -> Option<Self> {
        (view.col_stride == 1 && view.is_injective()).then_some(OutputView(view))
    }

    pub fn view(&self) -> &MatrixBatch {
        &self.0
    }
}

/// Sizes of a batch of attention heads. Per batch item: queries `Q` (`queries x depth`), keys
/// `K` (`depth x keys`) and values `V` (`channels x keys`).
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub depth: usize,
    pub channels: usize,
}

/// Which attention operands are stored (contiguously) with their two axes swapped.
#[derive(Debug, Clone, Copy)]
pub struct AttentionLayout {
    pub q_transposed: bool,
    pub k_transposed: bool,
    pub v_transposed: bool,
}

/// Attention over contiguous operands, each stored as [`AttentionShape`] says or, when its
/// [`AttentionLayout`] flag is set, transposed. Returns `[batch][channels][queries]`. Needs
/// [`isa::available`]; `keys` and `depth` must be positive.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, layout: AttentionLayout, alpha: f32) -> Vec<f32> {
    let isa = Isa::detect().expect("callers check `available()` first");
    let [qv, kv, vv] = contiguous_views(shape, layout);
    let operand = |data, view| Operand::new(data, view).expect("an operand shorter than its shape");
    let out = OutputView::new(MatrixBatch::contiguous(shape.batch, shape.channels, shape.queries)).expect("a contiguous view is injective");
    attention_on(isa, operand(q, qv), operand(k, kv), operand(v, vv), alpha, &out)
}

/// The views of contiguous operands stored as `layout` says.
fn contiguous_views(shape: AttentionShape, layout: AttentionLayout) -> [MatrixBatch; 3] {
    let AttentionShape { batch, queries, keys, depth, channels } = shape;
    let view = |rows: usize, cols: usize, transposed: bool| {
        if transposed { MatrixBatch::contiguous(batch, cols, rows).transposed() } else { MatrixBatch::contiguous(batch, rows, cols) }
    };
    [view(queries, depth, layout.q_transposed), view(depth, keys, layout.k_transposed), view(channels, keys, layout.v_transposed)]
}

/// Attention over operands read in place through their views (`Q`: `queries x depth`, `K`:
/// `depth x keys`, `V`: `channels x keys`, with the same number of items), written through
/// `out` (`channels x queries` per item) into a new buffer of `out`'s extent, which must be the
/// number of elements: `out` is then a rearrangement of that whole buffer, as a chain of
/// reshapes and permutations of a tensor is. Needs [`isa::available`]; `keys` and
/// `depth` must be positive.
pub fn attention_strided(q: Operand, k: Operand, v: Operand, alpha: f32, out: &OutputView) -> Vec<f32> {
    let isa = Isa::detect().expect("callers check `available()` first");
    attention_on(isa, q, k, v, alpha, out)
}

fn attention_on(isa: Isa, q: Operand, k: Operand, v: Operand, alpha: f32, out: &OutputView) -> Vec<f32> {
    // The views lie inside their buffers (`Operand`) and the output's elements at different
    // offsets (`OutputView`): checked when they were made. What is left is that they agree.
    let (qv, kv, vv, ov) = (q.view(), k.view(), v.view(), out.view());
    let (k, v) = (k.data, v.data);
    let (batch, queries, depth, keys, channels) = (qv.items(), qv.rows, qv.cols, kv.cols, vv.rows);
    assert!(isa.supported() && keys > 0 && depth > 0);
    if batch * queries * channels == 0 {
        return vec![0.0; ov.extent()];
    }
    assert!(kv.items() == batch && vv.items() == batch && kv.rows == depth && vv.cols == keys, "attention operands disagree");
    let total = batch * channels * queries;
    assert!(ov.items() == batch && ov.rows == channels && ov.cols == queries && ov.extent() == total, "the output view does not fit");
    // Per item, once: `alpha K^T` (`keys x depth`) and `V` as left operands, packed as two
    // tasks: as one, a single image's packing ran on one thread while the other waited.
    let operands: Vec<PackedA> = parallel::map(2 * batch, |task| {
        let b = task / 2;
        if task % 2 == 0 {
            let mut keys_t = PackedA::strided(isa, &k[kv.item_offset(b)..], keys, depth, kv.col_stride, kv.row_stride);
            if alpha != 1.0 {
                keys_t.scale(alpha);
            }
            keys_t
        } else {
            PackedA::strided(isa, &v[vv.item_offset(b)..], channels, keys, vv.row_stride, vv.col_stride)
        }
    });
    // A block's scores (`S^T`, `keys x BLOCK`) are kept as `BLOCK / nr` packed panels of `nr`
    // queries each (`[panel][keys][nr]`): the first product writes them panel by panel, the
    // softmax runs down each panel's columns, and the second product reads them as its packed
    // right operand, with no gather in between.
    let nr = isa.nr();
    let panel_len = keys * nr;
    // Not zeroed first: that was a pass over the output on the calling thread alone, while the
    // other waited; the tasks write every element, as the `SAFETY` note at the end says.
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let out_ptr = super::SendPtr(out.as_mut_ptr());
    let blocks = queries.div_ceil(BLOCK);
    parallel::for_each(batch * blocks, |task| {
        SCRATCH.with_borrow_mut(|Scratch { queries_packed, scores, inverse_sums }| {
            let (b, i0) = (task / blocks, task % blocks * BLOCK);
            let rows = BLOCK.min(queries - i0);
            pack_query_block(isa, &q, b, i0, rows, queries_packed);
            // Zeroed once, when it grows: the second product reads whole panels, columns past
            // `rows` included, so every float must be initialised.
            let scores = scores.floats_mut(BLOCK * keys);
            let (keys_t, values) = (&operands[2 * b], &operands[2 * b + 1]);
            for panel in 0..rows.div_ceil(nr) {
                let width = nr.min(rows - panel * nr);
                let scores_panel = &mut scores[panel * panel_len..][..panel_len];
                // SAFETY: the microkernel is supported (asserted above); panel `panel` of the
                // packed queries is `depth x nr` at `panel * depth * nr`, inside
                // `queries_packed` (packed for `rows` columns); `S^T`'s panel is `keys x width`
                // with rows `nr` apart inside `scores_panel`, 64-byte aligned (`PackedB`).
                unsafe {
                    let queries_panel = queries_packed.as_ptr().add(panel * depth * nr);
                    tiling::gemm_panels(keys_t, 0..keys, queries_panel, width, scores_panel.as_mut_ptr(), nr, None);
                }
                activation::softmax_numerators_block(scores_panel, keys, nr, 0..width, &mut inverse_sums[panel * nr..][..width]);
            }
            // `V x S^T` straight into the output's rows (`channels x rows`, the view's columns
            // adjacent), whose columns are then divided by their softmax sums: `channels x
            // BLOCK` divisions instead of `keys x BLOCK`.
            let first = ov.item_offset(b) + i0;
            // SAFETY: as above; `scores` holds the `rows.div_ceil(nr)` panels the product reads,
            // each `keys x nr`, aligned. The product writes columns `i0..i0 + rows` of rows
            // `0..channels` of item `b` of the output view (rows `row_stride` apart, columns
            // adjacent: `OutputView`), and only those (tiles at the edges go through a buffer):
            // this task alone writes them, since the view is injective, and they lie inside `out`
            // (its extent is `total`, asserted above).
            unsafe { tiling::gemm_panels(values, 0..channels, scores.as_ptr(), rows, out_ptr.get().add(first), ov.row_stride, None) };
            for c in 0..channels {
                // SAFETY: row `c`'s `rows` floats of this task's columns, written just above by
                // this task and touched by no other.
                let row = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(first + c * ov.row_stride), rows) };
                activation::scale_columns(row, &inverse_sums[..rows]);
            }
        })
    });
    // SAFETY: the tasks wrote every element: each writes columns `i0..i0 + rows` of every row
    // of item `b` of the output view, so together they write the view's `batch * channels *
    // queries` elements, which lie at different offsets below `total` (the view is injective
    // and its extent is `total`, asserted above): all of `0..total`.
    unsafe { out.set_len(total) };
    out
}

/// A rayon worker's buffers for one block of queries, reused across blocks and calls.
struct Scratch {
    /// `Q_block^T`, packed as a right operand.
    queries_packed: PackedB,
    /// The block's softmax numerators `S^T` (packed panels too).
    scores: PackedB,
    /// The reciprocal of each query's softmax sum.
    inverse_sums: [f32; BLOCK],
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch { queries_packed: PackedB::new(), scores: PackedB::new(), inverse_sums: [0.0; BLOCK] })
    };
}

/// Packs `Q_block^T` (`depth x rows`: queries `i0..i0 + rows` of item `b`) as a right operand.
fn pack_query_block(isa: Isa, q: &Operand, b: usize, i0: usize, rows: usize, out: &mut PackedB) {
    let (data, qv) = (q.data, q.view());
    assert!(b < qv.items() && i0 + rows <= qv.rows, "queries past the operand");
    let first = qv.item_offset(b) + i0 * qv.row_stride;
    if qv.row_stride == 1 {
        // Each depth's queries are consecutive: rows of `Q^T` in place.
        // SAFETY: the view lies inside `data` (an `Operand`), and these `depth` rows of `rows`
        // floats, `col_stride` apart from `first`, are elements of it (asserted just above).
        unsafe { pack::pack_b(isa, data[first..].as_ptr(), qv.col_stride, qv.cols, rows, out) };
    } else {
        let gathered: Vec<f32> = (0..qv.cols).flat_map(|d| (0..rows).map(move |i| data[first + i * qv.row_stride + d * qv.col_stride])).collect();
        // SAFETY: `gathered` is `depth x rows` row-major.
        unsafe { pack::pack_b(isa, gathered.as_ptr(), rows, qv.cols, rows, out) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(len: usize, mul: usize, modulus: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) / (modulus / 2) as f32).collect()
    }

    /// The definition in f64: scores, a softmax per query, then `V x P^T`.
    fn reference(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, alpha: f32) -> Vec<f32> {
        let AttentionShape { batch, queries, keys, depth, channels } = shape;
        let mut out = vec![0.0; batch * channels * queries];
        for b in 0..batch {
            for i in 0..queries {
                let scores: Vec<f64> = (0..keys)
                    .map(|j| alpha as f64 * (0..depth).map(|d| q[(b * queries + i) * depth + d] as f64 * k[(b * depth + d) * keys + j] as f64).sum::<f64>())
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for c in 0..channels {
                    let mixed: f64 = (0..keys).map(|j| v[(b * channels + c) * keys + j] as f64 * exps[j] / sum).sum();
                    out[(b * channels + c) * queries + i] = mixed as f32;
                }
            }
        }
        out
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        x.chunks(rows * cols).flat_map(|m| (0..cols).flat_map(move |c| (0..rows).map(move |r| m[r * cols + c]))).collect()
    }

    fn check(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "{what} [{i}] {g} vs {w}");
        }
    }

    fn supported() -> Vec<Isa> {
        let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported()).collect();
        if isas.is_empty() {
            eprintln!("SKIPPED: no AVX2/FMA or AVX-512 on this CPU; the engine runs attention as three candle steps");
        }
        isas
    }

    #[test]
    fn matches_the_definition_in_every_layout() {
        // Queries span two blocks and a partial one; keys are not a multiple of any panel.
        for (batch, queries, keys, depth, channels) in [(3, 150, 45, 19, 11), (2, 64, 400, 32, 32), (1, 7, 1, 1, 40)] {
            let shape = AttentionShape { batch, queries, keys, depth, channels };
            let (q, k, v) = (matrix(batch * queries * depth, 7, 13), matrix(batch * depth * keys, 5, 11), matrix(batch * channels * keys, 3, 17));
            let alpha = 0.3;
            let want = reference(&q, &k, &v, shape, alpha);
            for isa in supported() {
                for (qt, kt, vt) in [(false, false, false), (true, true, true), (true, false, false), (false, true, true)] {
                    let q_in = if qt { transpose(&q, queries, depth) } else { q.clone() };
                    let k_in = if kt { transpose(&k, depth, keys) } else { k.clone() };
                    let v_in = if vt { transpose(&v, channels, keys) } else { v.clone() };
                    let layout = AttentionLayout { q_transposed: qt, k_transposed: kt, v_transposed: vt };
                    let [qv, kv, vv] = contiguous_views(shape, layout);
                    let out = OutputView::new(MatrixBatch::contiguous(batch, channels, queries)).unwrap();
                    let (q_op, k_op, v_op) = (Operand::new(&q_in, qv).unwrap(), Operand::new(&k_in, kv).unwrap(), Operand::new(&v_in, vv).unwrap());
                    let got = attention_on(isa, q_op, k_op, v_op, alpha, &out);
                    check(&got, &want, &format!("{isa:?} {shape:?} {layout:?}"));
                }
            }
        }
    }

    #[test]
    fn reads_operands_through_batch_strides() {
        // Two heads of two areas interleaved in one channel-major buffer, as a detection
        // model's fused query/key/value convolution lays them out: item (area, head) has its
        // rows `head * 3 * depth + part * depth + d` and its columns `area * tokens + t`.
        let (areas, heads, tokens, depth) = (2, 2, 70, 8);
        let pixels = areas * tokens;
        let qkv = matrix(heads * 3 * depth * pixels, 7, 23);
        let part = |p: usize| MatrixBatch::new(p * depth * pixels, vec![areas, heads], vec![tokens, 3 * depth * pixels], (depth, tokens), (pixels, 1)).unwrap();
        let (qv, kv, vv) = (part(0).transposed(), part(1), part(2));
        let gather = |view: &MatrixBatch| -> Vec<f32> {
            (0..view.items())
                .flat_map(|b| (0..view.rows).flat_map(move |i| (0..view.cols).map(move |j| (b, i, j))))
                .map(|(b, i, j)| qkv[view.item_offset(b) + i * view.row_stride + j * view.col_stride])
                .collect()
        };
        let shape = AttentionShape { batch: areas * heads, queries: tokens, keys: tokens, depth, channels: depth };
        let want = reference(&gather(&qv), &gather(&kv), &gather(&vv), shape, 0.5);
        // The output goes back to the channel-major layout: item (area, head), channel d
        // lands in row `head * depth + d`, column `area * tokens + t`.
        let out = MatrixBatch::new(0, vec![areas, heads], vec![tokens, depth * pixels], (depth, tokens), (pixels, 1)).unwrap();
        let mut want_placed = vec![0.0; heads * depth * pixels];
        for (i, w) in want.iter().enumerate() {
            let (b, d, t) = (i / (depth * tokens), i / tokens % depth, i % tokens);
            want_placed[out.item_offset(b) + d * pixels + t] = *w;
        }
        for isa in supported() {
            let operand = |view: &MatrixBatch| Operand::new(&qkv, view.clone()).unwrap();
            let got = attention_on(isa, operand(&qv), operand(&kv), operand(&vv), 0.5, &OutputView::new(out.clone()).unwrap());
            check(&got, &want_placed, &format!("{isa:?} strided"));
        }
    }

    #[test]
    fn an_output_view_that_writes_a_float_twice_is_refused() {
        // Two items of 3 x 8 written over one another: a zero batch stride. Its extent is
        // 24, not the 48 elements, but a wrong state must not be buildable at all.
        let zero_batch = MatrixBatch::new(0, vec![2], vec![0], (3, 8), (8, 1)).unwrap();
        assert!(!zero_batch.is_injective());
        assert_eq!(OutputView::new(zero_batch), None);
        // Items that overlap each other's rows.
        let overlapping = MatrixBatch::new(0, vec![2], vec![4], (3, 8), (12, 1)).unwrap();
        assert_eq!(OutputView::new(overlapping), None);
        // As many elements as the buffer it spans (2 x 2 x 2 = 8 = its extent), so the old
        // extent check passed it, yet item 1's row 0 (offsets 3, 4) is item 0's row 1.
        let exact_size_overlap = MatrixBatch::new(0, vec![2], vec![3], (2, 2), (3, 1)).unwrap();
        assert_eq!((exact_size_overlap.extent(), exact_size_overlap.items() * 2 * 2), (8, 8));
        assert_eq!(OutputView::new(exact_size_overlap), None);
        // Rows that are not adjacent in a row's direction, or a row stride of zero, are refused
        // too; the layouts the engine writes (contiguous, heads interleaved) pass.
        assert_eq!(OutputView::new(MatrixBatch::contiguous(2, 3, 8).transposed()), None);
        assert_eq!(OutputView::new(MatrixBatch::new(0, vec![2], vec![24], (3, 8), (0, 1)).unwrap()), None);
        assert!(OutputView::new(MatrixBatch::contiguous(2, 3, 8)).is_some());
        let (areas, heads, tokens, depth) = (2, 2, 70, 8);
        let interleaved = MatrixBatch::new(0, vec![areas, heads], vec![tokens, depth * areas * tokens], (depth, tokens), (areas * tokens, 1)).unwrap();
        assert!(OutputView::new(interleaved).is_some());
    }

    #[test]
    fn views_are_checked_against_their_buffers_when_made() {
        let view = MatrixBatch::contiguous(2, 3, 4);
        assert!(Operand::new(&[0.0; 24], view.clone()).is_some());
        assert!(Operand::new(&[0.0; 23], view.clone()).is_none());
        // Axes and strides that differ in number, and offsets past `usize`, are not views.
        assert_eq!(MatrixBatch::new(0, vec![2, 2], vec![12], (3, 4), (4, 1)), None);
        assert_eq!(MatrixBatch::new(0, vec![2], vec![usize::MAX - 4], (3, 4), (4, 1)), None);
        assert_eq!(MatrixBatch::new(0, vec![3], vec![usize::MAX / 2], (3, 4), (4, 1)), None);
        assert_eq!(MatrixBatch::new(usize::MAX, vec![1], vec![0], (1, 1), (0, 0)), None);
        // An empty view reaches nothing, whatever its strides.
        assert_eq!(MatrixBatch::new(7, vec![0], vec![usize::MAX], (3, 4), (4, 1)).map(|m| m.extent()), Some(0));
    }

    #[test]
    #[should_panic(expected = "the output view does not fit")]
    fn an_output_view_smaller_than_the_result_is_refused() {
        let Some(&isa) = supported().first() else { panic!("the output view does not fit (no microkernel to run)") };
        let shape = AttentionShape { batch: 2, queries: 8, keys: 5, depth: 4, channels: 3 };
        let layout = AttentionLayout { q_transposed: false, k_transposed: false, v_transposed: false };
        let data = matrix(2 * 8 * 5 * 4, 7, 13);
        let [qv, kv, vv] = contiguous_views(shape, layout);
        // One item's worth of output for two items.
        let out = OutputView::new(MatrixBatch::contiguous(1, 3, 8)).unwrap();
        attention_on(isa, Operand::new(&data, qv).unwrap(), Operand::new(&data, kv).unwrap(), Operand::new(&data, vv).unwrap(), 1.0, &out);
    }
}
