//! The cache sizes the kernels block for, in one place: every blocking constant of the matrix
//! product, the convolutions and attention derives from these.
//!
//! The values are those of the CPUs the kernels were tuned on (32 KiB of L1 data cache and at
//! least 256 KiB of L2 per core): the blocking they give was measured to suit both the AVX2 and
//! the AVX-512 machines. The one exception is the depth of a pass over a `B` panel, which
//! follows the CPU's own L1 data cache ([`b_block_floats`]): 48 KiB caches (Zen 5, Ice Lake
//! and later) hold a deeper block, and the model ran about 1 % faster with it.

/// Bytes of L1 data cache per core assumed when the CPU's own is unknown.
pub const L1_BYTES: usize = 32 * 1024;
/// The largest L1 data cache the blocking follows.
const MAX_L1_BYTES: usize = 64 * 1024;
/// Bytes of L2 cache per core.
pub const L2_BYTES: usize = 256 * 1024;
/// Bytes per page: rows a multiple of this apart map to the same L1 cache sets.
pub const PAGE_BYTES: usize = 4096;

const FLOAT: usize = std::mem::size_of::<f32>();

/// `f32`s in L2.
pub const L2_FLOATS: usize = L2_BYTES / FLOAT;

/// The most floats in one block of a packed `B` panel ([`b_block_floats`]), on any CPU.
pub const MAX_B_BLOCK_FLOATS: usize = MAX_L1_BYTES / FLOAT / 2;

/// Floats in one block of a packed `B` panel, which the microkernel walks `k` over: half of
/// this CPU's L1 data cache, leaving the other half to the `A` panels and the output tile.
pub fn b_block_floats() -> usize {
    static FLOATS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FLOATS.get_or_init(|| l1_data_bytes().unwrap_or(L1_BYTES).clamp(L1_BYTES, MAX_L1_BYTES) / FLOAT / 2)
}

/// The first CPU's level-1 data cache, as Linux reports it (`48K`); `None` elsewhere.
fn l1_data_bytes() -> Option<usize> {
    cache_bytes("1", "Data")
}

/// Bytes of L2 cache per core: this CPU's own (Linux's report), or [`L2_BYTES`] when unknown.
/// The blocking does not follow it (see the module's notes); the engine reads it to tell a
/// convolution's input that has left the caches (`InputPart::cold`).
pub fn l2_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| cache_bytes("2", "Unified").unwrap_or(L2_BYTES).max(L2_BYTES))
}

/// The first CPU's cache of `level` and `kind` (`Data`, `Unified`), as Linux reports it.
fn cache_bytes(level: &str, kind: &str) -> Option<usize> {
    let caches = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..8).find_map(|index| {
        let dir = caches.join(format!("index{index}"));
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok().map(|s| s.trim().to_string());
        if read("level")? != level || read("type")? != kind {
            return None;
        }
        parse_size(&read("size")?)
    })
}

/// `48K` or `1M` as bytes.
fn parse_size(text: &str) -> Option<usize> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let scale = match unit {
        "" => 1,
        "K" => 1024,
        "M" => 1024 * 1024,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(scale)
}

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
        assert!((4096..=MAX_B_BLOCK_FLOATS).contains(&b_block_floats()));
        assert_eq!(MAX_B_BLOCK_FLOATS, 8192);
        assert_eq!(
            (parse_size("48K"), parse_size("1M"), parse_size("512"), parse_size("4G"), parse_size("")),
            (Some(48 * 1024), Some(1 << 20), Some(512), None, None)
        );
        assert_eq!(L2_FLOATS, 64 * 1024);
        assert!(l2_bytes() >= L2_BYTES);
        assert_eq!(SCRATCH_TILE_COLUMNS, 1024);
        assert!(rows_share_cache_sets(160 * 160) && rows_share_cache_sets(320 * 320) && !rows_share_cache_sets(80 * 80));
    }
}
