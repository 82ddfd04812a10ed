//! The cache sizes the kernels block for, in one place: every blocking constant of the matrix
//! product, the convolutions and attention derives from these.
//!
//! The values are those of the CPUs the kernels were tuned on (32 KiB of L1 data cache and at
//! least 256 KiB of L2 per core), not measured at run time: the blocking they give was measured
//! to suit both the AVX2 and the AVX-512 machines.

/// Bytes of L1 data cache per core.
pub const L1_BYTES: usize = 32 * 1024;
/// Bytes of L2 cache per core.
pub const L2_BYTES: usize = 256 * 1024;
/// Bytes per page: rows a multiple of this apart map to the same L1 cache sets.
pub const PAGE_BYTES: usize = 4096;

const FLOAT: usize = std::mem::size_of::<f32>();

/// `f32`s in L1.
pub const L1_FLOATS: usize = L1_BYTES / FLOAT;
/// `f32`s in L2.
pub const L2_FLOATS: usize = L2_BYTES / FLOAT;

/// Floats in one block of a packed `B` panel, which the microkernel walks `k` over: half of L1,
/// leaving the other half to the `A` panels and the output tile.
pub const B_BLOCK_FLOATS: usize = L1_FLOATS / 2;

/// Columns per product when a convolution runs several output rows as one product into a
/// scratch tile: a tile of 64 output channels of this many columns fills L2.
pub const SCRATCH_TILE_COLUMNS: usize = L2_FLOATS / 64;

/// Whether rows `stride` floats apart all start at the same offset within a page, as the
/// channel planes of a 160x160 or 320x320 output do: a microkernel tile stored straight into
/// them lands in one set of L1 cache lines, its rows evicting each other.
pub const fn rows_share_cache_sets(stride: usize) -> bool {
    (stride * FLOAT).is_multiple_of(PAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocking_constants_keep_their_tuned_values() {
        assert_eq!(B_BLOCK_FLOATS, 4096);
        assert_eq!(L2_FLOATS, 64 * 1024);
        assert_eq!(SCRATCH_TILE_COLUMNS, 1024);
        assert!(rows_share_cache_sets(160 * 160) && rows_share_cache_sets(320 * 320) && !rows_share_cache_sets(80 * 80));
    }
}
