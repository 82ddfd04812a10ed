//! Packing the operands of the matrix product into the panels its microkernels read: `A` (a
//! convolution's weights) once at load time in panels of `mr` rows ([`PackedA`]), `B` (a tile
//! of input columns) per call in panels of `nr` columns ([`PackedB`]), and blocks of `B` rows
//! gathered from scattered offsets ([`gather_rows_of`]).

use super::isa::{self, Isa};

/// `A` in panels of `mr` rows for one [`Isa`]: panel `p` holds, for each `k`, rows
/// `p*mr..p*mr+mr` (zero rows past `m`).
#[derive(Debug, Clone)]
pub struct PackedA {
    isa: Isa,
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedA {
    /// Packs row-major `a` (`m x k`) for `isa`'s microkernel.
    pub fn new(isa: Isa, a: &[f32], m: usize, k: usize) -> Self {
        Self::strided(isa, a, m, k, k, 1)
    }

    /// Packs `m x k` whose element `(i, j)` is `a[i * row_stride + j * col_stride]` (a stored
    /// transposed has `row_stride = 1, col_stride = m`).
    ///
    /// Panics when this CPU cannot run `isa`'s microkernel: every `PackedA` is for a supported
    /// [`Isa`], so the products that dispatch on [`isa`](Self::isa) run only instructions the
    /// CPU has. (The check is a cached feature flag, beside a pass over `A`.)
    pub fn strided(isa: Isa, a: &[f32], m: usize, k: usize, row_stride: usize, col_stride: usize) -> Self {
        assert!(isa.supported(), "this CPU cannot run the {isa:?} microkernel");
        if m > 0 && k > 0 {
            assert!((m - 1) * row_stride + (k - 1) * col_stride < a.len(), "A is smaller than its strides say");
        }
        let mr = isa.mr();
        let panels = m.div_ceil(mr);
        // Written in the order it is stored, each step of `k` a column of a panel's rows: an
        // interleave of the panel's rows where each row is stored whole (weights, attention's
        // values), one copy per column where the rows are adjacent (attention's keys), a gather
        // otherwise (an interleaved panel is zeroed as it is appended, while it is in L1; the
        // others write only a partial panel's missing rows as zeros). Filled element by
        // element, row by row, into a zeroed buffer, the packing of attention's operands took
        // some 1.6 % of YOLOv12n's CPU time (`perf` samples, 2 threads: 1.3 % the packing, 0.3 %
        // zeroing its buffers); written this way, 0.9 %.
        let mut data = Vec::with_capacity(panels * k * mr);
        if col_stride == 1 && row_stride != 1 {
            let zeros = vec![0.0; k];
            for p in 0..panels {
                let rows = mr.min(m - p * mr);
                let row = |r: usize| if r < rows { &a[(p * mr + r) * row_stride..][..k] } else { &zeros[..] };
                match isa {
                    Isa::Avx512 => interleave::<{ Isa::Avx512.mr() }>(std::array::from_fn(row), &mut data),
                    Isa::Avx2 => interleave::<{ Isa::Avx2.mr() }>(std::array::from_fn(row), &mut data),
                }
            }
            return PackedA { isa, m, k, data };
        }
        for p in 0..panels {
            let rows = mr.min(m - p * mr);
            if row_stride == 1 && rows == mr {
                match isa {
                    Isa::Avx512 => columns::<{ Isa::Avx512.mr() }>(&a[p * mr..], k, col_stride, &mut data),
                    Isa::Avx2 => columns::<{ Isa::Avx2.mr() }>(&a[p * mr..], k, col_stride, &mut data),
                }
                continue;
            }
            for kk in 0..k {
                let first = p * mr * row_stride + kk * col_stride;
                if row_stride == 1 {
                    data.extend_from_slice(&a[first..first + rows]);
                } else {
                    data.extend((0..rows).map(|r| a[first + r * row_stride]));
                }
                data.extend(std::iter::repeat_n(0.0, mr - rows));
            }
        }
        PackedA { isa, m, k, data }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Multiplies every element by `factor` (a product's scale, applied once to the operand).
    pub fn scale(&mut self, factor: f32) {
        self.data.iter_mut().for_each(|v| *v *= factor);
    }

    pub(super) fn m(&self) -> usize {
        self.m
    }

    pub(super) fn k(&self) -> usize {
        self.k
    }

    /// Panel `p`: `k * mr` floats.
    pub(super) fn panel(&self, p: usize) -> &[f32] {
        let mr = self.isa.mr();
        &self.data[p * self.k * mr..][..self.k * mr]
    }
}

/// Appends rows of equal length interleaved (element `kk` of every row, then `kk + 1`): a
/// panel of `A` from `MR` rows stored whole.
fn interleave<const MR: usize>(rows: [&[f32]; MR], out: &mut Vec<f32>) {
    let k = rows[0].len();
    assert!(rows.iter().all(|row| row.len() == k), "rows of one panel differ in length");
    let start = out.len();
    out.resize(start + k * MR, 0.0);
    // Row by row, each read in order: the panel (`k x MR` floats) stays in L1 meanwhile, where
    // the column-by-column order kept the `MR` values of each column on the stack.
    for (r, row) in rows.iter().enumerate() {
        for (place, &value) in out[start + r..].iter_mut().step_by(MR).zip(*row) {
            *place = value;
        }
    }
}

/// Appends a whole panel of `A` whose `MR` rows are adjacent (`a[r + kk * col_stride]` is
/// element `(r, kk)`): each of its `k` columns, `MR` floats, copied as one block of a length
/// known when compiled. (Copied by a length known only at run time, each column was a call to
/// `memmove`, 4 % of the attention's samples at one thread; `cargo bench --bench conv -- 1
/// attention`, five runs each: 1.88-1.94 ms against 1.92-1.96.)
fn columns<const MR: usize>(a: &[f32], k: usize, col_stride: usize, out: &mut Vec<f32>) {
    out.reserve(k * MR);
    for kk in 0..k {
        let column: &[f32; MR] = a[kk * col_stride..][..MR].try_into().expect("a column of MR floats");
        out.extend_from_slice(column);
    }
}

/// 64 bytes: one cache line, one AVX-512 register.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Packed `B` panels, aligned to cache lines so that no microkernel load splits across two.
/// Reused across calls: it grows, and is never cleared (packing writes every element).
#[derive(Debug, Clone, Default)]
pub struct PackedB(Vec<Line>);

impl PackedB {
    pub const fn new() -> Self {
        PackedB(Vec::new())
    }

    /// The first `len` floats, grown (zeros) when shorter.
    pub(super) fn floats_mut(&mut self, len: usize) -> &mut [f32] {
        let lines = len.div_ceil(16);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0.0; 16]));
        }
        // SAFETY: `Line` is `repr(C)` of 16 `f32` and has no padding (64 bytes, align 64), so
        // `lines` of them are `lines * 16` contiguous floats.
        unsafe { &mut std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<f32>(), lines * 16)[..len] }
    }

    pub(super) fn as_ptr(&self) -> *const f32 {
        self.0.as_ptr().cast()
    }

    pub(super) fn len(&self) -> usize {
        self.0.len() * 16
    }
}

/// Packs `k x width` of a row-major matrix (`row_stride` apart) into `isa.nr()`-column panels
/// (`[panel][k][nr]`, zero columns past `width`) in `out`.
///
/// # Safety
/// `src` must be valid for reads of `k` rows of `width` elements, `row_stride` apart, and this
/// CPU must support `isa` (take it from a [`PackedA`], whose constructor checks).
pub unsafe fn pack_b(isa: Isa, src: *const f32, row_stride: usize, k: usize, width: usize, out: &mut PackedB) {
    // SAFETY: the caller's contract: row `kk` starts `kk * row_stride` floats after `src`.
    unsafe { pack_b_rows(isa, &|kk| src.add(kk * row_stride), k, width, out) }
}

/// Like [`pack_b`], with row `kk` starting at `row(kk)`: rows that lie in different buffers,
/// such as the channels of a concatenation read in place.
///
/// # Safety
/// `row(kk)` must be valid for reads of `width` elements, for every `kk < k`, and this CPU must
/// support `isa`.
pub unsafe fn pack_b_rows(isa: Isa, row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
    // SAFETY: the caller's contract: the rows are readable and `isa` is supported, so the CPU
    // has the features each instantiation is compiled for.
    unsafe { isa::pack_b_rows(isa, row, k, width, out) }
}

/// [`pack_b_rows`] for panels of `NR` columns, a constant so that whole panels copy as vectors.
///
/// # Safety
/// As for [`pack_b_rows`].
#[inline(always)]
pub(super) unsafe fn pack_b_panels<const NR: usize>(source_row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
    let out = out.floats_mut(width.div_ceil(NR) * k * NR);
    for kk in 0..k {
        // SAFETY: row `kk` of the source holds `width` readable elements (the caller's contract).
        let row = unsafe { std::slice::from_raw_parts(source_row(kk), width) };
        let mut chunks = row.chunks_exact(NR);
        for (q, chunk) in (&mut chunks).enumerate() {
            out[(q * k + kk) * NR..][..NR].copy_from_slice(chunk);
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let dst = &mut out[((width / NR) * k + kk) * NR..][..NR];
            dst[..tail.len()].copy_from_slice(tail);
            dst[tail.len()..].fill(0.0);
        }
    }
}

/// Like [`pack_b`] for `B` stored transposed: `bt` is `n x k` row-major.
pub fn pack_b_transposed(isa: Isa, bt: &[f32], k: usize, n: usize, out: &mut PackedB) {
    assert_eq!(bt.len(), n * k);
    let nr = isa.nr();
    let out = out.floats_mut(n.div_ceil(nr) * k * nr);
    // Panel by panel, writing each panel in order while reading its `nr` source rows side by
    // side: the writes stream, and the rows being read stay in L1.
    for (q, panel) in out.chunks_exact_mut(k * nr).enumerate() {
        let columns = nr.min(n - q * nr);
        for (kk, dst) in panel.chunks_exact_mut(nr).enumerate() {
            for (lane, d) in dst.iter_mut().enumerate() {
                *d = if lane < columns { bt[(q * nr + lane) * k + kk] } else { 0.0 };
            }
        }
    }
}

/// Copies the `N` floats at `src + offsets[i]` to `dst + i * N`, for each `i`. `N` is a constant
/// so that each copy is a few vector moves, not a call to `memcpy`; the callers compile it for
/// their vector width (without that, the moves are 16-byte SSE ones).
///
/// # Safety
/// Every source row must be readable and `dst` writable for `offsets.len() * N` floats.
#[inline(always)]
pub(super) unsafe fn gather_rows_of<const N: usize>(src: *const f32, offsets: &[usize], dst: *mut f32) {
    for (i, &offset) in offsets.iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe { dst.add(i * N).cast::<[f32; N]>().write(src.add(offset).cast::<[f32; N]>().read_unaligned()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way `A` may be stored (rows whole, rows adjacent, neither) packs to the same
    /// panels: panel `p` holds element `(p * mr + r, kk)` at `kk * mr + r`, zeros past `m`.
    #[test]
    fn strided_operands_pack_to_the_same_panels() {
        let (m, k) = (19, 5);
        let value = |i: usize, j: usize| (i * 10 + j) as f32;
        for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported()) {
            let mr = isa.mr();
            // Row-major, column-major, and rows 3 apart with columns 61 apart.
            for (row_stride, col_stride) in [(k, 1), (1, m), (3, 61)] {
                let mut a = vec![f32::NAN; (m - 1) * row_stride + (k - 1) * col_stride + 1];
                for i in 0..m {
                    for j in 0..k {
                        a[i * row_stride + j * col_stride] = value(i, j);
                    }
                }
                let packed = PackedA::strided(isa, &a, m, k, row_stride, col_stride);
                for p in 0..m.div_ceil(mr) {
                    for (at, &got) in packed.panel(p).iter().enumerate() {
                        let (kk, r) = (at / mr, at % mr);
                        let want = if p * mr + r < m { value(p * mr + r, kk) } else { 0.0 };
                        assert_eq!(got, want, "{isa:?} strides ({row_stride}, {col_stride}), panel {p}, place {at}");
                    }
                }
            }
        }
    }
}
