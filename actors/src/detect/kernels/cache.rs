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

/// Floats from one channel plane of an `h x w` tensor to the next: `h * w`, unless the planes
/// are a whole number of pages ([`rows_share_cache_sets`]), as those of 160x160 and 320x320 are;
/// then `(h + extra) * w` for the fewest extra rows (at most 16) that keep each plane on a cache
/// line boundary and put plane starts at least 16 lines apart modulo a page (`h * w` when no
/// such count exists).
///
/// A 1x1 convolution reads the same pixels of every input plane at once: planes a page apart
/// put all those lines in one L1 set of 8 ways, and they evict each other before the next tile
/// reads them. On a Zen 3 (AVX2), YOLO11n and YOLOv12n at 2 threads, in-process rounds
/// alternating with packed planes: 48 -> 64 channels at 160x160 0.72-0.88 of its time, 32 -> 32
/// 0.71-0.89. Planes of 80x80 (a quarter page more than six) gained nothing so, and some of
/// their layers took 1.06-1.12 of their time.
pub fn spread_plane_pitch(h: usize, w: usize) -> usize {
    const LINE_FLOATS: usize = 64 / FLOAT;
    const PAGE_LINES: usize = PAGE_BYTES / 64;
    let spreads = |pitch: usize| pitch.is_multiple_of(LINE_FLOATS) && gcd(pitch / LINE_FLOATS, PAGE_LINES) <= 4;
    if w == 0 || !rows_share_cache_sets(h * w) {
        return h * w;
    }
    (1..=16).map(|extra| (h + extra) * w).find(|&pitch| spreads(pitch)).unwrap_or(h * w)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_planes_start_on_lines_in_many_sets() {
        // Planes a whole number of pages: one extra row; others stay packed.
        assert_eq!(spread_plane_pitch(160, 160), 161 * 160);
        assert_eq!(spread_plane_pitch(320, 320), 321 * 320);
        assert_eq!(spread_plane_pitch(32, 32), 33 * 32);
        assert_eq!(spread_plane_pitch(80, 80), 80 * 80);
        assert_eq!(spread_plane_pitch(20, 20), 20 * 20);
        for (h, w) in [(160, 160), (80, 80), (40, 40), (20, 20), (320, 320), (64, 64), (1024, 1), (7, 9), (1, 1), (0, 5)] {
            let pitch = spread_plane_pitch(h, w);
            assert!(pitch >= h * w && pitch <= (h + 16) * w && (w == 0 || pitch.is_multiple_of(w)), "{h}x{w}: {pitch}");
            assert!(pitch == h * w || !rows_share_cache_sets(pitch), "{h}x{w}: {pitch}");
        }
    }

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
