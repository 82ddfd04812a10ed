//! Convolutions as tiles of a matrix product: pointwise (1x1) convolutions on packed weights,
//! each tile packing its input's channel rows, and every shape on the portable path, which
//! fills a column buffer per tile ([`im2col`](super::im2col)) for the `gemm` crate.

use std::mem::MaybeUninit;

use crate::detect::kernels::parallel;

use super::super::SendPtr;
use super::super::isa::Isa;
use super::super::{cache, pack, portable, tiling};
use super::schedule::{self, SCRATCH};
use super::{Conv2d, ConvInput, OutputPlanes, add_assign};

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    /// Into `out` (`planes`), adding `residual` last.
    pub(super) fn run_gemm(&self, input: &ConvInput, planes: OutputPlanes, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let (n, h, w) = (input.n, input.h, input.w);
        let OutputPlanes { oh, ow, pitch } = planes;
        let g = self.spec.groups;
        let cin_g = self.spec.in_channels / g;
        let m_g = self.spec.out_channels / g;
        let (kh, kw) = self.spec.kernel;
        let k = cin_g * kh * kw;
        let pixels = oh * ow;
        let threads = parallel::threads();
        let tile = schedule::tile_width(k, pixels, 4 * threads / (n * g).max(1), self.isa().map_or(16, Isa::nr));
        let tiles = pixels.div_ceil(tile);
        // Small late layers have few pixels: split the output channels too, so both cores work.
        let (m_block, m_blocks) = schedule::channel_blocks(n * g * tiles, m_g, self.panel_rows(), threads);
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        let pointwise = self.is_pointwise();
        parallel::for_each(n * g * tiles * m_blocks, |task| {
            SCRATCH.with_borrow_mut(|(cols, packed_b)| {
                let mb = task % m_blocks;
                let tile_index = (task / m_blocks) % tiles;
                let group = (task / m_blocks / tiles) % g;
                let batch = task / m_blocks / tiles / g;
                let m0 = mb * m_block;
                let rows = m_block.min(m_g - m0);
                let p0 = tile_index * tile;
                let width = tile.min(pixels - p0);
                let plane = |c: usize| input.plane(batch, group * cin_g + c);
                let packed = self.packed.get(group);
                let (rhs, rhs_rs) = if pointwise {
                    // On the portable path the input is one buffer, so the group's channels follow
                    // each other `h * w` apart; the packed path reads each channel where it lies.
                    (plane(0)[p0..].as_ptr(), (h * w) as isize)
                } else {
                    // Grown, never cleared: im2col writes every element, padding included.
                    if cols.len() < k * width {
                        cols.resize(k * width, 0.0);
                    }
                    for kk in 0..k {
                        self.im2col_row(plane(kk / (kh * kw)), h, w, ow, p0, kk, &mut cols[kk * width..][..width]);
                    }
                    (cols.as_ptr(), width as isize)
                };
                let channel0 = group * m_g + m0;
                // SAFETY: this task writes rows `channel0..channel0+rows` of image `batch`, columns
                // `p0..p0+width` — a region no other task writes (tasks differ in batch, group, tile
                // or channel block) and inside `out`, whose length `run` checked. `rhs` covers
                // `k x width` elements with row stride `rhs_rs`. The packed weights were made for a
                // supported ISA (`PackedA` checks), so packing the input for it is sound.
                unsafe {
                    let first = (batch * self.spec.out_channels + channel0) * pitch + p0;
                    let dst = out_ptr.get().add(first);
                    let residual = residual.map(|r| (r[first..].as_ptr(), pitch));
                    if let Some(packed) = packed {
                        // Only pointwise convolutions come here with packed weights (the others run
                        // in place, `run_direct`). Packing their scattered channel rows into panels
                        // measured faster than reading them in place.
                        let row = |kk: usize| plane(kk)[p0..].as_ptr();
                        pack::pack_b_rows(packed.isa(), &row, k, width, packed_b);
                        if cache::rows_share_cache_sets(pitch) {
                            // Such rows evict each other from L1: a product written to a compact
                            // tile and copied out row by row measured 10-15 % faster on such layers
                            // (and slower on others).
                            // Written to a compact tile, then copied out row by row.
                            if cols.len() < rows * width {
                                cols.resize(rows * width, 0.0);
                            }
                            let epilogue = self.epilogue(channel0..channel0 + rows, None);
                            tiling::gemm(packed, m0..m0 + rows, packed_b, width, cols.as_mut_ptr(), width, Some(&epilogue));
                            for r in 0..rows {
                                let d = std::slice::from_raw_parts_mut(dst.add(r * pitch), width);
                                d.copy_from_slice(&cols[r * width..][..width]);
                                if let Some((res, ld)) = residual {
                                    add_assign(d, std::slice::from_raw_parts(res.add(r * ld), width));
                                }
                            }
                        } else {
                            let epilogue = self.epilogue(channel0..channel0 + rows, residual);
                            tiling::gemm(packed, m0..m0 + rows, packed_b, width, dst, pitch, Some(&epilogue));
                        }
                    } else {
                        let lhs = &self.weights[channel0 * k..][..rows * k];
                        portable::product_tile(
                            lhs,
                            rows,
                            k,
                            rhs,
                            rhs_rs,
                            width,
                            dst,
                            pitch,
                            &self.bias[channel0..channel0 + rows],
                            self.spec.activation,
                            residual,
                        );
                    }
                }
            })
        });
    }
}
