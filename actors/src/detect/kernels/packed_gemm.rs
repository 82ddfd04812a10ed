//! Single-threaded f32 matrix product on packed operands, with AVX-512 and AVX2+FMA
//! microkernels chosen at run time.
//!
//! `C[m x n] = A[m x k] * B[k x n]`, where `A` (a convolution's weights) is packed once at load
//! time into panels of `mr` rows, and `B` (a tile of input columns) is packed per call into
//! panels of `nr` columns. The microkernel (8x32 with AVX-512, 6x16 with AVX2) keeps its
//! accumulators in registers and walks `k` in blocks that keep a `B` panel in L1. Callers
//! parallelise over tiles.

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, Lanes};

/// The widest `B` panel of any microkernel: callers leave this many floats of slack after data
/// that the kernel reads in place.
pub const MAX_NR: usize = 32;
/// The most rows of `A` per microkernel call.
const MAX_MR: usize = 8;
/// Floats in one block of a `B` panel (16 KiB, half of L1).
const BLOCK_FLOATS: usize = 4096;

/// What the last pass over `k` does to a tile of `C` before it is stored, while the tile is in
/// registers: a convolution's bias, SiLU and skip connection cost no trip through memory.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Added to each row of the product (`bias[i]` to row `rows.start + i`).
    pub bias: &'a [f32],
    /// SiLU after the bias.
    pub silu: bool,
    /// Added last: element `(i, j)` of the product gets `residual.0[i * residual.1 + j]`
    /// (a pointer to the residual's element for the product's first row, and its row stride).
    pub residual: Option<(*const f32, usize)>,
}

/// The epilogue of one microkernel tile: `mr` biases (zero past the product's rows) and the
/// residual tile's start, when it can be read whole.
#[derive(Clone, Copy)]
struct TileEpilogue {
    bias: [f32; MAX_MR],
    silu: bool,
    residual: Option<(*const f32, usize)>,
}

/// The microkernel a CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 6x16 tiles, AVX2 and FMA.
    Avx2,
    /// 8x32 tiles, AVX-512F.
    Avx512,
}

impl Isa {
    /// The best microkernel this CPU runs, or `None` (the engine then uses its portable path).
    /// `STREAMDET_CPU_KERNEL=avx2` or `=portable` caps the choice, to compare kernels on one
    /// machine.
    pub fn detect() -> Option<Isa> {
        static CHOSEN: OnceLock<Option<Isa>> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let cap = std::env::var("STREAMDET_CPU_KERNEL").unwrap_or_default();
            let allowed: &[Isa] = match cap.as_str() {
                "portable" => &[],
                "avx2" => &[Isa::Avx2],
                _ => &[Isa::Avx512, Isa::Avx2],
            };
            allowed.iter().copied().find(|isa| isa.supported())
        })
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Rows of `A` per panel and per microkernel call.
    pub const fn mr(self) -> usize {
        match self {
            Isa::Avx2 => 6,
            Isa::Avx512 => 8,
        }
    }

    /// Columns of `B` per panel and per microkernel call.
    pub const fn nr(self) -> usize {
        match self {
            Isa::Avx2 => 16,
            Isa::Avx512 => 32,
        }
    }

    /// Depth of one pass over a `B` panel.
    const fn kc(self) -> usize {
        BLOCK_FLOATS / self.nr()
    }
}

/// Whether this CPU runs a microkernel.
pub fn available() -> bool {
    Isa::detect().is_some()
}

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
        let mut data = vec![0.0; panels * k * mr];
        for p in 0..panels {
            let panel = &mut data[p * k * mr..][..k * mr];
            for r in 0..mr.min(m - p * mr) {
                let row = (p * mr + r) * row_stride;
                for kk in 0..k {
                    panel[kk * mr + r] = a[row + kk * col_stride];
                }
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

    fn panel(&self, p: usize) -> &[f32] {
        let mr = self.isa.mr();
        &self.data[p * self.k * mr..][..self.k * mr]
    }
}

/// 64 bytes: one cache line, one AVX-512 register.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Packed `B` panels, aligned to cache lines so that no microkernel load splits across two.
/// Reused across calls: it grows, and is never cleared (packing writes every element).
#[derive(Default)]
pub struct PackedB(Vec<Line>);

impl PackedB {
    pub const fn new() -> Self {
        PackedB(Vec::new())
    }

    /// The first `len` floats, grown (zeros) when shorter.
    fn floats_mut(&mut self, len: usize) -> &mut [f32] {
        let lines = len.div_ceil(16);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0.0; 16]));
        }
        // SAFETY: `Line` is `repr(C)` of 16 `f32` and has no padding (64 bytes, align 64), so
        // `lines` of them are `lines * 16` contiguous floats.
        unsafe { &mut std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<f32>(), lines * 16)[..len] }
    }

    fn as_ptr(&self) -> *const f32 {
        self.0.as_ptr().cast()
    }

    fn len(&self) -> usize {
        self.0.len() * 16
    }
}

/// Packs `k x width` of a row-major matrix (`row_stride` apart) into `isa.nr()`-column panels
/// (`[panel][k][nr]`, zero columns past `width`) in `out`.
///
/// # Safety
/// `src` must be valid for reads of `k` rows of `width` elements, `row_stride` apart.
pub unsafe fn pack_b(isa: Isa, src: *const f32, row_stride: usize, k: usize, width: usize, out: &mut PackedB) {
    // SAFETY: the caller's contract: row `kk` starts `kk * row_stride` floats after `src`.
    unsafe { pack_b_rows(isa, &|kk| src.add(kk * row_stride), k, width, out) }
}

/// Like [`pack_b`], with row `kk` starting at `row(kk)`: rows that lie in different buffers,
/// such as the channels of a concatenation read in place.
///
/// # Safety
/// `row(kk)` must be valid for reads of `width` elements, for every `kk < k`.
pub unsafe fn pack_b_rows(isa: Isa, row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; `isa` is supported, so the CPU has the features each
    // instantiation is compiled for.
    unsafe {
        match isa {
            Isa::Avx2 => pack_b_avx2(row, k, width, out),
            Isa::Avx512 => pack_b_avx512(row, k, width, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, row, k, width, out);
        unreachable!("no microkernel on this architecture; `Isa::detect` returns None")
    }
}

/// [`pack_b_panels`] compiled for AVX2, whose 16-column panels then copy as two vector moves.
///
/// # Safety
/// As for [`pack_b_rows`]; the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_b_avx2(row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
    // SAFETY: the caller's contract.
    unsafe { pack_b_panels::<16>(row, k, width, out) }
}

/// [`pack_b_panels`] compiled for AVX-512F: a 32-column panel row is two vector moves.
///
/// # Safety
/// As for [`pack_b_rows`]; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_avx512(row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
    // SAFETY: the caller's contract.
    unsafe { pack_b_panels::<32>(row, k, width, out) }
}

/// [`pack_b_rows`] for panels of `NR` columns, a constant so that whole panels copy as vectors.
///
/// # Safety
/// As for [`pack_b_rows`].
#[inline(always)]
unsafe fn pack_b_panels<const NR: usize>(source_row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
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

/// `C[rows, 0..width] = A[rows] * B` for panel-aligned `rows` of `a` and `b` packed for `a`'s
/// [`Isa`] with the same `k`, then the [`Epilogue`], if any. `C` is row-major with `ldc`
/// elements per row.
///
/// # Safety
/// `a`'s [`Isa`] must be supported; `b` must hold the packed panels of `width` columns; `c`
/// must be valid for writes of `rows.len()` rows of `width` elements, `ldc` apart;
/// `rows.start` must be a multiple of `mr`. An epilogue's `bias` holds `rows.len()` values and
/// its residual is readable over the same `rows.len() x width` shape.
pub unsafe fn gemm(a: &PackedA, rows: std::ops::Range<usize>, b: &PackedB, width: usize, c: *mut f32, ldc: usize, epilogue: Option<&Epilogue>) {
    let (k, nr) = (a.k, a.isa.nr());
    assert!(b.len() >= width.div_ceil(nr) * k * nr, "B holds fewer panels than the width needs");
    let b = b.as_ptr();
    // SAFETY: the caller's contract; each block is `kc` rows of one packed `B` panel.
    unsafe { tiles(a, rows, width, c, ldc, epilogue, |k0, _kc, q| b.add((q * k + k0) * nr)) }
}

/// Like [`gemm`], with row `kk` of `B` the `width` floats at `base + offsets[kk]`: a
/// convolution's patches are such rows of its (padded) input, so it needs no im2col.
///
/// # Safety
/// As for [`gemm`]; `offsets.len()` must be `a`'s `k`, and `base + offsets[kk] + j` readable for
/// every `kk` and every `j < width.div_ceil(nr) * nr` (columns past `width` are read, not used).
pub unsafe fn gemm_offsets(a: &PackedA, rows: std::ops::Range<usize>, base: *const f32, offsets: &[usize], width: usize, c: *mut f32, ldc: usize, epilogue: Option<&Epilogue>) {
    assert_eq!(offsets.len(), a.k);
    let nr = a.isa.nr();
    // The block of `B` that every `A` panel multiplies is gathered once into an aligned buffer
    // that stays in L1: read in place, its rows straddle cache lines and scatter over the
    // input's planes, and every `A` panel would read them again.
    // Not zeroed: each call below writes the `kc * nr` floats the kernel then reads.
    let mut block = std::mem::MaybeUninit::<Block>::uninit();
    let block = block.as_mut_ptr().cast::<f32>();
    // SAFETY: the caller's contract covers every address read; `block` holds `kc * nr <=
    // BLOCK_FLOATS` floats.
    unsafe {
        tiles(a, rows, width, c, ldc, epilogue, |k0, kc, q| {
            let src = base.add(q * nr);
            let offsets = &offsets[k0..k0 + kc];
            gather_rows(a.isa, src, offsets, block);
            block.cast_const()
        })
    }
}

/// Copies the `isa.nr()` floats at `src + offsets[i]` to `dst + i * nr`, for each `i`.
///
/// # Safety
/// `isa` is supported; every source row must be readable and `dst` writable for
/// `offsets.len() * nr` floats.
#[inline]
unsafe fn gather_rows(isa: Isa, src: *const f32, offsets: &[usize], dst: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; `isa` is supported, so the CPU has the features each
    // instantiation is compiled for.
    unsafe {
        match isa {
            Isa::Avx2 => gather_rows_avx2(src, offsets, dst),
            Isa::Avx512 => gather_rows_avx512(src, offsets, dst),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, src, offsets, dst);
        unreachable!("no microkernel on this architecture; `Isa::detect` returns None")
    }
}

/// [`gather_rows_of`] for 16-float rows, each two AVX moves.
///
/// # Safety
/// As for [`gather_rows`]; the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_rows_avx2(src: *const f32, offsets: &[usize], dst: *mut f32) {
    // SAFETY: the caller's contract.
    unsafe { gather_rows_of::<16>(src, offsets, dst) }
}

/// [`gather_rows_of`] for 32-float rows, each two AVX-512 moves.
///
/// # Safety
/// As for [`gather_rows`]; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_rows_avx512(src: *const f32, offsets: &[usize], dst: *mut f32) {
    // SAFETY: the caller's contract.
    unsafe { gather_rows_of::<32>(src, offsets, dst) }
}

/// Copies the `N` floats at `src + offsets[i]` to `dst + i * N`, for each `i`. `N` is a constant
/// so that each copy is a few vector moves, not a call to `memcpy`; the callers compile it for
/// their vector width (without that, the moves are 16-byte SSE ones).
///
/// # Safety
/// Every source row must be readable and `dst` writable for `offsets.len() * N` floats.
#[inline(always)]
unsafe fn gather_rows_of<const N: usize>(src: *const f32, offsets: &[usize], dst: *mut f32) {
    for (i, &offset) in offsets.iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe { dst.add(i * N).cast::<[f32; N]>().write(src.add(offset).cast::<[f32; N]>().read_unaligned()) }
    }
}

/// One block of a `B` panel, aligned for the microkernel's loads.
#[repr(C, align(64))]
struct Block([f32; BLOCK_FLOATS]);

/// The loops shared by [`gemm`] and [`gemm_offsets`]: `k` in blocks, then `B` panels, then `A`
/// panels. `b_block(k0, kc, q)` returns rows `k0..k0 + kc` of `B` panel `q`, packed
/// (`kc x nr`); it is called once before the `A` panels that use it. Tiles at the right and
/// bottom edges go through a buffer so that only `C`'s own elements are written.
///
/// # Safety
/// As for [`gemm`]; the pointer `b_block` returns must hold `kc * nr` readable floats until its
/// next call.
unsafe fn tiles(a: &PackedA, rows: std::ops::Range<usize>, width: usize, c: *mut f32, ldc: usize, epilogue: Option<&Epilogue>, mut b_block: impl FnMut(usize, usize, usize) -> *const f32) {
    let isa = a.isa;
    let (mr, nr, kc_max) = (isa.mr(), isa.nr(), isa.kc());
    assert!(rows.start % mr == 0 && rows.end <= a.m, "rows must start on a panel");
    if let Some(e) = epilogue {
        assert!(e.bias.len() >= rows.len(), "one bias per row");
    }
    let k = a.k;
    let panels = width.div_ceil(nr);
    let mut edge = [0f32; MAX_MR * MAX_NR];
    let edge = edge.as_mut_ptr();
    for k0 in (0..k).step_by(kc_max) {
        let kc = kc_max.min(k - k0);
        let accumulate = k0 > 0;
        let last = k0 + kc == k;
        for q in 0..panels {
            let cols = nr.min(width - q * nr);
            let bq = b_block(k0, kc, q);
            for row in (rows.start..rows.end).step_by(mr) {
                let ap = a.panel(row / mr)[k0 * mr..][..kc * mr].as_ptr();
                let valid = mr.min(rows.end - row);
                let full = valid == mr && cols == nr;
                let first = row - rows.start;
                // The epilogue of this tile, on the last pass; an edge tile adds its residual
                // while it is copied out, since the kernel would read past the residual's rows.
                let tile_epilogue = epilogue.filter(|_| last).map(|e| {
                    let mut bias = [0f32; MAX_MR];
                    bias[..valid].copy_from_slice(&e.bias[first..first + valid]);
                    // SAFETY: the residual covers the product's rows and columns (the caller's
                    // contract); this is the tile's first element.
                    let residual = e.residual.filter(|_| full).map(|(r, ld)| (unsafe { r.add(first * ld + q * nr) }, ld));
                    TileEpilogue { bias, silu: e.silu, residual }
                });
                // SAFETY: the caller guarantees `c` covers `rows` x `width`; `row` and `q * nr`
                // stay inside. Full tiles are written in place, edge tiles through `edge`.
                unsafe {
                    let dst = c.add(first * ldc + q * nr);
                    if full {
                        kernel(isa, kc, ap, bq, dst, ldc, accumulate, tile_epilogue.as_ref());
                    } else {
                        if accumulate {
                            for r in 0..valid {
                                std::ptr::copy_nonoverlapping(dst.add(r * ldc), edge.add(r * nr), cols);
                            }
                        }
                        kernel(isa, kc, ap, bq, edge, nr, accumulate, tile_epilogue.as_ref());
                        let residual = epilogue.filter(|_| last).and_then(|e| e.residual);
                        for r in 0..valid {
                            let out = std::slice::from_raw_parts_mut(dst.add(r * ldc), cols);
                            out.copy_from_slice(std::slice::from_raw_parts(edge.add(r * nr), cols));
                            if let Some((res, ld)) = residual {
                                let res = std::slice::from_raw_parts(res.add((first + r) * ld + q * nr), cols);
                                out.iter_mut().zip(res).for_each(|(o, x)| *o += x);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Batched `C[b] = alpha * A[b] * B[b]` (`m x k` times `k x n`) for contiguous `a` and `b`,
/// each stored row-major or, when its flag is set, transposed (`k x m`, `n x k`) — so that a
/// transpose feeding a product costs nothing, and a scale costs nothing either (it is applied
/// to the packed `A`). In parallel over the batch. Needs [`available`].
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize, a_transposed: bool, b_transposed: bool, alpha: f32) -> Vec<f32> {
    let isa = Isa::detect().expect("callers check `available()` first");
    batched_matmul_on(isa, a, b, batch, m, k, n, a_transposed, b_transposed, alpha)
}

#[allow(clippy::too_many_arguments)]
fn batched_matmul_on(isa: Isa, a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize, a_transposed: bool, b_transposed: bool, alpha: f32) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(isa.supported());
    assert!(a.len() == batch * m * k && b.len() == batch * k * n);
    if m * n == 0 || k == 0 {
        return vec![0.0; batch * m * n];
    }
    // Not zero-filled first: the first pass over `k` writes every element.
    let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
    out.spare_capacity_mut()[..batch * m * n].par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
        let (ai, bi) = (&a[i * m * k..][..m * k], &b[i * k * n..][..k * n]);
        let mut packed_b = PackedB::new();
        if b_transposed {
            // `C = A x Bt^T` is computed as `C^T = Bt x A^T`, then transposed: `Bt` packs by rows
            // (reading in order) and `A^T` is the small operand, whereas packing a large `Bt`
            // into column panels would read it across rows.
            let mut packed = PackedA::new(isa, bi, n, k);
            if alpha != 1.0 {
                packed.scale(alpha);
            }
            if a_transposed {
                // SAFETY: `ai` is `k x m` row-major, which is `A^T`.
                unsafe { pack_b(isa, ai.as_ptr(), m, k, m, &mut packed_b) };
            } else {
                pack_b_transposed(isa, ai, k, m, &mut packed_b);
            }
            let mut ct = Vec::<f32>::with_capacity(n * m);
            // SAFETY: `ct` has room for `n x m`; the microkernel is supported (asserted above).
            // With `k > 0`, the product writes every element, so `set_len` exposes no garbage.
            unsafe {
                gemm(&packed, 0..n, &packed_b, m, ct.as_mut_ptr(), m, None);
                ct.set_len(n * m);
            }
            for (j, row) in c.chunks_exact_mut(n).enumerate() {
                for (dst, src) in row.iter_mut().zip(ct.iter().skip(j).step_by(m)) {
                    dst.write(*src);
                }
            }
            return;
        }
        let mut packed = if a_transposed { PackedA::strided(isa, ai, m, k, 1, m) } else { PackedA::new(isa, ai, m, k) };
        if alpha != 1.0 {
            packed.scale(alpha);
        }
        // SAFETY: `bi` is `k x n` row-major.
        unsafe { pack_b(isa, bi.as_ptr(), n, k, n, &mut packed_b) };
        // SAFETY: `c` is `m x n`; the microkernel is supported (asserted above). `gemm` only
        // writes through the pointer until its first pass over `k` has initialised the tile.
        unsafe { gemm(&packed, 0..m, &packed_b, n, c.as_mut_ptr().cast::<f32>(), n, None) };
    });
    // SAFETY: with `k > 0`, `gemm` wrote every element of every `m x n` product.
    unsafe { out.set_len(batch * m * n) };
    out
}

/// `C[mr x nr] (+)= A_panel[kc x mr] * B_panel[kc x nr]` with `isa`'s microkernel, then the
/// tile's epilogue, if any.
///
/// # Safety
/// `isa` must be supported; `a` holds `kc * mr` and `b` `kc * nr` readable floats (`b` aligned
/// to 64 bytes for AVX-512); `c` is valid for reads and writes of `mr` rows of `nr` floats,
/// `ldc` apart; an epilogue's residual is readable over the same tile.
#[inline]
unsafe fn kernel(isa: Isa, kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool, epilogue: Option<&TileEpilogue>) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        match isa {
            Isa::Avx2 => kernel_6x16(kc, a, b, c, ldc, accumulate, epilogue),
            Isa::Avx512 => kernel_8x32(kc, a, b, c, ldc, accumulate, epilogue),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, kc, a, b, c, ldc, accumulate, epilogue);
        unreachable!("no microkernel on this architecture; `Isa::detect` returns None")
    }
}

/// One register of a finished tile: `+ bias`, SiLU when asked, `+ residual` when given.
///
/// # Safety
/// The CPU has `V`'s features; `residual`, if given, points at `V::LEN` readable floats.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish<V: Lanes>(v: V, bias: f32, silu: bool, residual: Option<*const f32>) -> V {
    // SAFETY: the caller's contract.
    unsafe {
        let mut v = v.add(V::splat(bias));
        if silu {
            v = v.mul(v.sigmoid());
        }
        if let Some(r) = residual {
            v = v.add(V::load(r));
        }
        v
    }
}

/// The AVX2 microkernel: 12 accumulators (6 rows of two 8-float registers).
///
/// # Safety
/// As for [`kernel`], with `mr = 6`, `nr = 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool, epilogue: Option<&TileEpilogue>) {
    use std::arch::x86_64::*;
    const MR: usize = 6;
    // SAFETY: every pointer access below stays within the bounds stated in the contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm256_loadu_ps(c.add(r * ldc));
                row[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
            }
        }
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(kk * 16));
            let b1 = _mm256_loadu_ps(b.add(kk * 16 + 8));
            let ak = a.add(kk * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ak.add(r));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        if let Some(e) = epilogue {
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    let residual = e.residual.map(|(p, ld)| p.add(r * ld + j * 8));
                    *v = finish(Avx2(*v), e.bias[r], e.silu, residual).0;
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), row[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
        }
    }
}

/// The AVX-512 microkernel: 16 accumulators (8 rows of two 16-float registers); each `A`
/// element is a broadcast operand of the multiply-add, so `B` needs only two registers.
///
/// # Safety
/// As for [`kernel`], with `mr = 8`, `nr = 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_8x32(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool, epilogue: Option<&TileEpilogue>) {
    use std::arch::x86_64::*;
    const MR: usize = 8;
    // SAFETY: every pointer access below stays within the bounds stated in the contract; `b`
    // is 64-byte aligned, so each row of the panel is two aligned loads.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(r * ldc));
                row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
            }
        }
        for kk in 0..kc {
            let b0 = _mm512_load_ps(b.add(kk * 32));
            let b1 = _mm512_load_ps(b.add(kk * 32 + 16));
            let ak = a.add(kk * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ak.add(r));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
        if let Some(e) = epilogue {
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    let residual = e.residual.map(|(p, ld)| p.add(r * ld + j * 16));
                    *v = finish(Avx512(*v), e.bias[r], e.silu, residual).0;
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), row[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every microkernel this CPU runs (the engine uses the best; tests check them all).
    fn supported() -> Vec<Isa> {
        let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported()).collect();
        if isas.is_empty() {
            eprintln!("SKIPPED: no AVX2/FMA or AVX-512 on this CPU; the engine uses the portable path");
        }
        isas
    }

    fn matrix(len: usize, mul: usize, modulus: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) / (modulus / 2) as f32).collect()
    }

    #[test]
    fn transposed_operands_give_the_same_product() {
        let (batch, m, k, n) = (2, 7, 19, 37);
        let (a, b) = (matrix(batch * m * k, 7, 13), matrix(batch * k * n, 5, 11));
        let transpose = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            x.chunks(rows * cols).flat_map(|m| (0..cols).flat_map(move |c| (0..rows).map(move |r| m[r * cols + c]))).collect()
        };
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        for isa in supported() {
            let plain = batched_matmul_on(isa, &a, &b, batch, m, k, n, false, false, 1.0);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum();
                    assert!((plain[i * n + j] - want).abs() < 1e-4, "{isa:?} [{i},{j}]");
                }
            }
            for (ta, tb) in [(true, false), (false, true), (true, true)] {
                let got = batched_matmul_on(isa, if ta { &at } else { &a }, if tb { &bt } else { &b }, batch, m, k, n, ta, tb, 1.0);
                for (x, y) in got.iter().zip(&plain) {
                    assert!((x - y).abs() < 1e-4, "{isa:?} transposed ({ta}, {tb})");
                }
            }
            let scaled = batched_matmul_on(isa, &at, &b, batch, m, k, n, true, false, 0.25);
            for (x, y) in scaled.iter().zip(&plain) {
                assert!((x - 0.25 * y).abs() < 1e-4, "{isa:?} scaled by alpha");
            }
        }
    }

    #[test]
    fn rows_read_in_place_at_offsets_match_packed_rows() {
        for isa in supported() {
            for &(m, k, width) in &[(6, 5, 16), (13, 300, 37), (8, 9, 20), (17, 700, 70)] {
                let a = matrix(m * k, 7, 13);
                // Row kk of B sits at a scattered offset in a larger buffer, with slack after it.
                let offsets: Vec<usize> = (0..k).map(|kk| (kk * 37) % 101 * (width + 3) + kk % 5).collect();
                let source = matrix(offsets.iter().max().unwrap() + width + 2 * MAX_NR, 5, 11);
                let rows: Vec<f32> = offsets.iter().flat_map(|&o| source[o..o + width].iter().copied()).collect();
                let packed_a = PackedA::new(isa, &a, m, k);
                let mut packed_b = PackedB::new();
                let (mut want, mut got) = (vec![0.0; m * width], vec![0.0; m * width]);
                // SAFETY: `isa` is supported; `rows` is `k x width`; `want` and `got` are
                // `m x width`; the offsets leave `2 * MAX_NR` floats of slack after `source`.
                unsafe {
                    pack_b(isa, rows.as_ptr(), width, k, width, &mut packed_b);
                    gemm(&packed_a, 0..m, &packed_b, width, want.as_mut_ptr(), width, None);
                    gemm_offsets(&packed_a, 0..m, source.as_ptr(), &offsets, width, got.as_mut_ptr(), width, None);
                }
                assert_eq!(got, want, "{isa:?} m={m} k={k} width={width}");
            }
        }
    }

    #[test]
    fn matches_a_naive_product_on_every_edge_shape() {
        for isa in supported() {
            let mr = isa.mr();
            for &(m, k, n) in &[(6, 1, 16), (7, 3, 17), (16, 300, 40), (64, 576, 100), (13, 27, 5), (32, 513, 33), (20, 129, 64)] {
                let (a, b) = (matrix(m * k, 7, 13), matrix(k * n, 5, 11));
                let packed = PackedA::new(isa, &a, m, k);
                let mut bp = PackedB::new();
                // SAFETY: `b` is k x n row-major.
                unsafe { pack_b(isa, b.as_ptr(), n, k, n, &mut bp) };
                // From the second panel on, into a C with a wider stride, to check offsets and
                // edges.
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                let start = if m > mr { mr } else { 0 };
                // SAFETY: `isa` is supported; `c` covers the rows.
                unsafe { gemm(&packed, start..m, &bp, n, c[start * ldc..].as_mut_ptr(), ldc, None) };
                for i in start..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum();
                        let got = c[i * ldc + j];
                        assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "{isa:?} ({m},{k},{n}) [{i},{j}] {got} vs {want}");
                    }
                    assert!(c[i * ldc + n].is_nan(), "{isa:?} wrote past the row");
                }
            }
        }
    }
}
