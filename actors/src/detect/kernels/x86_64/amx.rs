//! Intel AMX (tile registers and the BF16 tile product, `TDPBF16PS`) for `f32` matrix
//! products: detection and the operating system's permission, the tile configuration, the
//! 32x32 block kernel, and the conversion of `f32` rows into the tiles' operand layout.
//!
//! AMX multiplies BF16 numbers (8 significant bits) and accumulates in `f32`. To keep an `f32`
//! product's accuracy, each operand is split into two BF16 parts, `x = hi + lo` (`hi` is `x`
//! rounded to BF16, `lo` the remainder rounded to BF16: 16 significant bits together, a
//! relative error of at most about 2^-17), and the product is `hi*hi + hi*lo + lo*hi`; the
//! dropped `lo*lo` is below 2^-16 of it. Three tile products per block of `k`, at 16 times the
//! multiply-adds per cycle of AVX-512's `f32` FMA, is still about five times its rate.
//!
//! Operand layouts (`TDPBF16PS`'s): an `A` tile is 16 rows of 32 BF16 values along `k`; a `B`
//! tile is 16 rows, row `r` holding, for each of 16 columns, the pair `(B[2r][j], B[2r+1][j])`
//! as one 32-bit lane (the even `k` in the low half); a `C` tile is 16 rows of 16 `f32`.
//! Every tile here is 16 rows of 64 bytes, so one configuration serves all eight registers.
//!
//! Registers of a 32x32 block: `tmm0..tmm3` the four 16x16 sums (`C[i][j]` in `tmm(2i + j)`),
//! `tmm4`, `tmm5` the two row tiles of `A`, `tmm6`, `tmm7` the two column tiles of `B`.

use std::arch::asm;
use std::arch::x86_64::*;

use super::super::simd::Lanes;
use super::avx512::Avx512;

/// One tile row: 64 bytes, aligned as the tile loads like them.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub(in super::super) struct TileRow(pub(in super::super) [u32; 16]);

impl std::fmt::Debug for TileRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TileRow({:08x?})", self.0)
    }
}

/// Whether this CPU has AMX with BF16 and the operating system lets this process use its
/// tile data (Linux asks each process to request it; [`request_tile_data`]). Checked once.
/// `STREAMDET_AMX=off` answers no, to compare with the AVX-512 kernels on one machine.
pub(in super::super) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("STREAMDET_AMX").is_ok_and(|v| v == "off") {
            return false;
        }
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE (asked only when
        // the CPU answers leaf 7).
        let has_amx = __cpuid(0).eax >= 7 && {
            let edx = __cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0
        };
        has_amx && std::arch::is_x86_feature_detected!("avx512f") && request_tile_data()
    })
}

/// Asks Linux for permission to use the AMX tile data in this process
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without it the first tile
/// instruction kills the process.
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: `arch_prctl` with this request only reads its two integer arguments and changes
    // which extended states the process may use.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// The tile configuration (`LDTILECFG`'s 64-byte operand): palette 1, eight tiles of 16 rows
/// of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const ALL_16_BY_64: TileConfig = {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut tile = 0;
        while tile < 8 {
            // Bytes per row (a little-endian `u16` per tile from byte 16), rows (a byte per
            // tile from byte 48).
            bytes[16 + 2 * tile] = 64;
            bytes[48 + tile] = 16;
            tile += 1;
        }
        TileConfig(bytes)
    };
}

/// Configures this thread's tiles for the kernels here, for as long as a [`Tiles`] lives,
/// and releases them when it is dropped (the released state costs nothing to save when the
/// thread is switched out). The configuration belongs to the thread: a `Tiles` is neither
/// `Send` nor `Sync`.
pub(in super::super) struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Configures the tiles; `None` when AMX is not [`available`].
    pub(in super::super) fn configure() -> Option<Tiles> {
        if !available() {
            return None;
        }
        // SAFETY: AMX is present and permitted (`available`); the configuration is a valid
        // palette-1 configuration, read from 64 aligned bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) TileConfig::ALL_16_BY_64.0.as_ptr(), options(nostack, readonly)) };
        Some(Tiles(std::marker::PhantomData))
    }

    /// `C = bias + A * B` for one block of 32 rows by 32 columns, over `b.len()` steps of 32 of
    /// `k`, each operand given as its two BF16 parts; `C` is written as 32 rows of 32 `f32`
    /// (128 bytes apart) to `c`.
    ///
    /// Per step, `a` holds four `A` tiles, one after another: the high parts of rows 0-15,
    /// of rows 16-31, then the low parts of both. `b[step]` locates the step's `B` tiles:
    /// their high and low parts each start at a row of pair lanes for columns 0-15, followed
    /// by those of columns 16-31 (64 bytes on), the rows `b_stride` bytes apart. `bias` holds
    /// two `C` tiles to start the sums from (rows 0-15, rows 16-31).
    ///
    /// # Safety
    /// `a` is readable for `4 * b.len()` tiles, each `b[step]` part for 16 rows of 128 bytes
    /// `b_stride` apart, `bias` for two tiles, `c` writable for 32 rows of 128 bytes; `b` is
    /// not empty.
    pub(in super::super) unsafe fn block_32x32(&self, a: *const TileRow, b: &[StepB], b_stride: usize, bias: *const TileRow, c: *mut f32) {
        assert!(!b.is_empty(), "a product of at least one step");
        // SAFETY: this thread's tiles are configured (`self` was made on it, and stays on it),
        // and the caller's contract covers every address read and written. Each step's products
        // are ordered so that consecutive products go to different sums: one sum's products are
        // four apart.
        unsafe {
            asm!(
                "tileloadd tmm0, [{bias} + {row}*1]",
                "tileloadd tmm1, [{bias} + {row}*1]",
                "tileloadd tmm2, [{bias} + {row}*1 + 1024]",
                "tileloadd tmm3, [{bias} + {row}*1 + 1024]",
                "2:",
                "mov {hi}, [{list}]",
                "mov {lo}, [{list} + 8]",
                "tileloadd tmm4, [{a} + {row}*1]",
                "tileloadd tmm5, [{a} + {row}*1 + 1024]",
                "tileloadd tmm6, [{hi} + {stride}*1]",
                "tileloadd tmm7, [{hi} + {stride}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                // A's high parts by B's low parts.
                "tileloadd tmm6, [{lo} + {stride}*1]",
                "tileloadd tmm7, [{lo} + {stride}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                // A's low parts by B's high parts.
                "tileloadd tmm4, [{a} + {row}*1 + 2048]",
                "tileloadd tmm5, [{a} + {row}*1 + 3072]",
                "tileloadd tmm6, [{hi} + {stride}*1]",
                "tileloadd tmm7, [{hi} + {stride}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, 4096",
                "add {list}, 16",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c} + {row}*2], tmm0",
                "tilestored [{c} + {row}*2 + 64], tmm1",
                "tilestored [{c} + {row}*2 + 2048], tmm2",
                "tilestored [{c} + {row}*2 + 2112], tmm3",
                bias = in(reg) bias,
                a = inout(reg) a => _,
                list = inout(reg) b.as_ptr() => _,
                steps = inout(reg) b.len() => _,
                stride = in(reg) b_stride,
                c = in(reg) c,
                row = in(reg) 64usize,
                hi = out(reg) _,
                lo = out(reg) _,
                options(nostack),
            );
        }
    }
}

/// Where one step's `B` tiles lie ([`Tiles::block_32x32`]): its high and low parts.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(in super::super) struct StepB {
    pub(in super::super) hi: *const u32,
    pub(in super::super) lo: *const u32,
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: AMX is available (a `Tiles` exists); releasing returns the tiles to their
        // initial state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `x` rounded to BF16 (to nearest, ties to even), as the upper half of an `f32`'s bits.
#[inline(always)]
unsafe fn round_to_bf16(x: __m512i) -> __m512i {
    // SAFETY: AVX-512F (the caller's contract).
    unsafe {
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), odd);
        _mm512_and_si512(rounded, _mm512_set1_epi32(0xffff_0000u32 as i32))
    }
}

/// The high and low BF16 parts of 16 floats, each as the upper half of an `f32`'s bits.
#[inline(always)]
unsafe fn split(x: __m512) -> (__m512i, __m512i) {
    // SAFETY: AVX-512F (the caller's contract).
    unsafe {
        let hi = round_to_bf16(_mm512_castps_si512(x));
        let rest = _mm512_sub_ps(x, _mm512_castsi512_ps(hi));
        (hi, round_to_bf16(_mm512_castps_si512(rest)))
    }
}

/// Writes one row of a `B` tile's high part and of its low part: the pairs of `even[j]` and
/// `odd[j]` for the `valid` first columns of 16 ([`pair_run`]), zeros past them. A null row
/// reads as zeros.
///
/// # Safety
/// AVX-512F; `even` and `odd`, where not null, readable for `valid <= 16` floats.
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn pair_row(even: *const f32, odd: *const f32, valid: usize, hi: &mut TileRow, lo: &mut TileRow) {
    assert!(valid <= 16, "a tile row has 16 columns");
    *hi = TileRow::default();
    *lo = TileRow::default();
    // SAFETY: the caller's contract; each row has 16 lanes.
    unsafe { pair_run(even, odd, valid, 1, hi.0.as_mut_ptr(), lo.0.as_mut_ptr()) };
}

/// Converts `count` columns of a pair of input rows into pair lanes: column `j` takes
/// `even[j * step]` and `odd[j * step]` (`step` 1 or 2), split into BF16 parts, its high
/// parts' lane going to `hi[j]` and its low parts' to `lo[j]`. A null row reads as zeros.
///
/// # Safety
/// AVX-512F; `step` is 1 or 2; `even` and `odd`, where not null, readable for
/// `(count - 1) * step + 1` floats; `hi` and `lo` writable for `count` lanes.
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn pair_run(even: *const f32, odd: *const f32, count: usize, step: usize, hi: *mut u32, lo: *mut u32) {
    debug_assert!(step == 1 || step == 2);
    let even_columns = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for j in (0..count).step_by(16) {
        let lanes = (count - j).min(16);
        let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
        // SAFETY: every load reads only lanes of the `(count - 1) * step + 1` readable floats
        // (masked), from a pointer inside them (`j * step` is below that length); the stores
        // write lanes `j..j + lanes` of `count`.
        unsafe {
            let load = |p: *const f32| -> __m512 {
                if p.is_null() {
                    return _mm512_setzero_ps();
                }
                let p = p.add(j * step);
                if step == 1 {
                    return _mm512_maskz_loadu_ps(mask, p);
                }
                // The even floats of the next `2 * lanes - 1`.
                let span = 2 * lanes - 1;
                let first: __mmask16 = ((1u32 << span.min(16)) - 1) as u16;
                let second: __mmask16 = ((1u32 << span.saturating_sub(16)) - 1) as u16;
                let a = _mm512_maskz_loadu_ps(first, p);
                let b = if second == 0 { _mm512_setzero_ps() } else { _mm512_maskz_loadu_ps(second, p.add(16)) };
                _mm512_permutex2var_ps(a, even_columns, b)
            };
            let (even_hi, even_lo) = split(load(even));
            let (odd_hi, odd_lo) = split(load(odd));
            let pair = |even: __m512i, odd: __m512i| _mm512_or_si512(odd, _mm512_srli_epi32::<16>(even));
            _mm512_mask_storeu_epi32(hi.add(j).cast(), mask, pair(even_hi, odd_hi));
            _mm512_mask_storeu_epi32(lo.add(j).cast(), mask, pair(even_lo, odd_lo));
        }
    }
}

/// SiLU of every row of a block written by [`Tiles::block_32x32`], in place.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn silu_rows(block: &mut [[f32; 32]]) {
    // Four rows at a time: eight vectors' SiLU side by side hides its latency.
    for rows in block.chunks_mut(4) {
        let mut v = [Avx512(_mm512_setzero_ps()); 8];
        for (r, row) in rows.iter().enumerate() {
            for half in 0..2 {
                // SAFETY: reads 16 of the row's 32 floats.
                v[2 * r + half] = unsafe { Avx512::load(row.as_ptr().add(16 * half)) };
            }
        }
        // SAFETY: AVX-512F.
        v = unsafe { Avx512::silu_each(v) };
        for (r, row) in rows.iter_mut().enumerate() {
            for half in 0..2 {
                // SAFETY: writes 16 of the row's 32 floats.
                unsafe { v[2 * r + half].store(row.as_mut_ptr().add(16 * half)) };
            }
        }
    }
}

/// Stores `columns` of each row of a block: row `r`'s to `rows[r]`, plus the residual row
/// `residual[r]` where given.
///
/// # Safety
/// AVX-512F; `columns` lies in `0..32`; every `rows[r]` is writable and every residual row
/// readable for `columns.len()` floats.
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn store_rows(block: &[[f32; 32]], rows: &[*mut f32], residual: Option<&[*const f32]>, columns: std::ops::Range<usize>) {
    debug_assert!(columns.end <= 32 && rows.len() <= block.len());
    let len = columns.len();
    for (r, (&dst, row)) in rows.iter().zip(block).enumerate() {
        for offset in (0..len).step_by(16) {
            let mask: __mmask16 = ((1u32 << (len - offset).min(16)) - 1) as u16;
            // SAFETY: the masked loads and stores touch the lanes `offset..offset + 16` that
            // fall inside `columns` of the block's row and inside the `len` floats of the
            // destination and residual rows (the caller's contract); the pointers themselves
            // stay inside them (`columns.start + offset < columns.end <= 32`, `offset < len`).
            unsafe {
                let mut x = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(columns.start + offset));
                if let Some(residual) = residual {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, residual[r].add(offset)));
                }
                _mm512_mask_storeu_ps(dst.add(offset), mask, x);
            }
        }
    }
}

/// `x` split into its high and low BF16 parts, as the bits of each (the scalar form of
/// [`pair_row`]'s split, for packing weights once).
pub(in super::super) fn split_scalar(x: f32) -> (u16, u16) {
    let round = |bits: u32| bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    let hi = round(x.to_bits());
    let lo = round((x - f32::from_bits(hi)).to_bits());
    ((hi >> 16) as u16, (lo >> 16) as u16)
}
