//! Which microkernel this CPU runs, and the dispatch from an [`Isa`] to its code: detection,
//! the kernels' tile shapes, and every `match` that picks an instruction set's microkernel or
//! packing routine. The code itself lives in [`x86_64`](super::x86_64) (one file per
//! instruction set); the element-wise kernels ([`activation`](super::activation)) follow the
//! same choice ([`Vectors`]).

use std::sync::OnceLock;

use super::cache;
use super::epilogue::TileEpilogue;
use super::pack::PackedB;

/// The widest `B` panel of any microkernel: callers leave this many floats of slack after data
/// that the kernel reads in place.
pub const MAX_NR: usize = 32;
/// The most rows of `A` per microkernel call.
pub const MAX_MR: usize = 8;

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
            let chosen = allowed.iter().copied().find(|isa| isa.supported());
            #[cfg(target_arch = "x86_64")]
            if chosen == Some(Isa::Avx512) {
                super::x86_64::avx512::choose_division();
            }
            chosen
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

    /// Floats per vector register.
    pub const fn lanes(self) -> usize {
        match self {
            Isa::Avx2 => 8,
            Isa::Avx512 => 16,
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

    /// Whether the microkernel has tiles of fewer than [`mr`](Self::mr) rows ([`kernel`]).
    /// AVX-512's panels of 8 rows fit the channel counts of YOLO's layers and attention heads;
    /// AVX2's of 6 leave the last tile of 16, 32, 64 or 80 rows with 4 or 2.
    pub(super) const fn short_tiles(self) -> bool {
        matches!(self, Isa::Avx2)
    }

    /// Depth of one pass over a `B` panel: one block of [`cache::b_block_floats`].
    pub(super) fn kc(self) -> usize {
        cache::b_block_floats() / self.nr()
    }
}

/// Whether this CPU runs a microkernel.
pub fn available() -> bool {
    Isa::detect().is_some()
}

/// The CPU kernels this process runs, as benchmark figures name them: `avx512+amx`, `avx512`,
/// `avx2` or `portable` (after `STREAMDET_CPU_KERNEL` and `STREAMDET_AMX`).
pub fn cpu_kernels() -> &'static str {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        Some(Isa::Avx512) if super::x86_64::amx::available() => "avx512+amx",
        Some(Isa::Avx512) => "avx512",
        Some(Isa::Avx2) => "avx2",
        None => "portable",
    }
}

/// The instruction sets the element-wise kernels ([`activation`](super::activation)) are
/// compiled for, best first: the same choice as the matrix products'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Vectors {
    Avx512,
    Avx2,
    Scalar,
}

pub(super) fn vectors() -> Vectors {
    // The same choice as the matrix products (`STREAMDET_CPU_KERNEL` caps both).
    match Isa::detect() {
        Some(Isa::Avx512) => Vectors::Avx512,
        Some(Isa::Avx2) => Vectors::Avx2,
        None => Vectors::Scalar,
    }
}

impl Vectors {
    pub(super) fn supported(self) -> bool {
        match self {
            Vectors::Avx512 => Isa::Avx512.supported(),
            Vectors::Avx2 => Isa::Avx2.supported(),
            Vectors::Scalar => true,
        }
    }
}

/// Every microkernel this CPU runs (the engine uses the best; tests check them all).
#[cfg(test)]
pub(super) fn all_supported() -> Vec<Isa> {
    let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported()).collect();
    if isas.is_empty() {
        eprintln!("SKIPPED: no AVX2/FMA or AVX-512 on this CPU; the engine uses the portable path");
    }
    isas
}

/// `C[rows x nr] (+)= A_panel[kc x rows] * B_panel[kc x nr]` with `isa`'s microkernel, then
/// the tile's epilogue, if any: `rows` is `isa.mr()`, or fewer where [`Isa::short_tiles`] says
/// the microkernel has tiles of fewer rows (they read the first `rows` of each of the panel's
/// `mr`).
///
/// # Safety
/// `isa` must be supported; `a` holds `kc * mr` and `b` `kc * nr` readable floats (`b` aligned
/// to 64 bytes for AVX-512); `c` is valid for reads and writes of `rows` rows of `nr` floats,
/// `ldc` apart; an epilogue's residual is readable over the same tile.
#[inline]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel(
    isa: Isa,
    rows: usize,
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    epilogue: Option<&TileEpilogue>,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        use super::x86_64::{avx2, avx512};
        match (isa, rows) {
            (Isa::Avx2, 6) => avx2::kernel_x16::<6, 1>(kc, a, b, c, ldc, accumulate, epilogue),
            (Isa::Avx2, 5) => avx2::kernel_x16::<5, 1>(kc, a, b, c, ldc, accumulate, epilogue),
            (Isa::Avx2, 4) => avx2::kernel_x16::<4, 1>(kc, a, b, c, ldc, accumulate, epilogue),
            (Isa::Avx2, 3) => avx2::kernel_x16::<3, 2>(kc, a, b, c, ldc, accumulate, epilogue),
            (Isa::Avx2, 2) => avx2::kernel_x16::<2, 2>(kc, a, b, c, ldc, accumulate, epilogue),
            (Isa::Avx2, 1) => avx2::kernel_x16::<1, 4>(kc, a, b, c, ldc, accumulate, epilogue),
            (Isa::Avx512, 8) => avx512::kernel_8x32(kc, a, b, c, ldc, accumulate, epilogue),
            _ => panic!("no {isa:?} microkernel of {rows} rows"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, rows, kc, a, b, c, ldc, accumulate, epilogue);
        unreachable!("no microkernel on this architecture; `Isa::detect` returns None")
    }
}

/// Packs `k` rows of `width` floats (row `kk` at `row(kk)`) into `isa.nr()`-column panels
/// with the packing routine compiled for `isa` (see [`pack_b_rows`](super::pack::pack_b_rows)).
///
/// # Safety
/// `isa` must be supported; `row(kk)` must be valid for reads of `width` elements, for every
/// `kk < k`.
pub(super) unsafe fn pack_b_rows(isa: Isa, row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; `isa` is supported, so the CPU has the features each
    // instantiation is compiled for.
    unsafe {
        use super::x86_64::{avx2, avx512};
        match isa {
            Isa::Avx2 => avx2::pack_b(row, k, width, out),
            Isa::Avx512 => avx512::pack_b(row, k, width, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, row, k, width, out);
        unreachable!("no microkernel on this architecture; `Isa::detect` returns None")
    }
}

/// Copies the `isa.nr()` floats at `src + offsets[i]` to `dst + i * nr`, for each `i`.
///
/// # Safety
/// `isa` is supported; every source row must be readable and `dst` writable for
/// `offsets.len() * nr` floats.
#[inline]
pub(super) unsafe fn gather_rows(isa: Isa, src: *const f32, offsets: &[usize], dst: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; `isa` is supported, so the CPU has the features each
    // instantiation is compiled for.
    unsafe {
        use super::x86_64::{avx2, avx512};
        match isa {
            Isa::Avx2 => avx2::gather_rows(src, offsets, dst),
            Isa::Avx512 => avx512::gather_rows(src, offsets, dst),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, src, offsets, dst);
        unreachable!("no microkernel on this architecture; `Isa::detect` returns None")
    }
}
