//! 2-D convolution over NCHW `f32`, with the bias, the activation and an optional residual
//! fused into the epilogue.
//!
//! A convolution is a matrix product `out[Cout x P] = W[Cout x K] * cols[K x P]` per group, where
//! `P` is the number of output pixels and `K = Cin/groups x kh x kw`; the weights are packed once
//! for the microkernel (AVX-512 or AVX2), which applies the bias, SiLU and residual to each tile
//! before storing it. With it, a 1x1 convolution packs tiles of its input's channel rows; any
//! other shape never builds `cols`: the input is copied once into zero-padded planes split by
//! stride phase, and the microkernel reads each patch row in place at a fixed offset
//! (`run_direct`), over several output rows at once when a row would end inside a panel. The
//! input may be a concatenation read in place ([`ConvInput`]). Without AVX2, the portable path
//! fills a per-tile column buffer (im2col) for the `gemm` crate. Depthwise convolutions (one
//! input channel per group) use a direct kernel. Work runs in parallel on the current rayon
//! pool: tiles of pixels or rows of the output, and blocks of output channels when a layer has
//! few pixels.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::activation::{Activation, bias_activation, bias_activation_tile};
use super::SendPtr;
use super::cache;
use super::packed_gemm::{self, Isa, PackedA, PackedB};

/// A convolution's shape: everything but its weights. Plain data; [`Conv2d::new`] checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    /// Padding (top, left, bottom, right).
    pub pads: (usize, usize, usize, usize),
    pub activation: Activation,
}

/// Why [`Conv2d::new`] or [`Conv2d::with_weights_packed_for`] refused a convolution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvError {
    #[error("{0}")]
    Shape(String),
    #[error("this CPU cannot run the {0:?} microkernel")]
    UnsupportedIsa(Isa),
}

/// A convolution's fixed parameters and weights, laid out once at load time. Built only by
/// [`Conv2d::new`], which checks that the shape and the weights agree, and packed only for a
/// microkernel this CPU runs: the `unsafe` code of [`run`](Self::run) relies on both.
#[derive(Debug, Clone)]
pub struct Conv2d {
    spec: ConvSpec,
    /// `[out_channels][in_channels / groups * kh * kw]`, ONNX's OIHW order.
    weights: Vec<f32>,
    /// One per output channel (zeros when the model has none).
    bias: Vec<f32>,
    /// The weights of each group packed for the microkernel (empty when the CPU lacks it).
    /// Every panel's [`Isa`] is supported: `PackedA` checks it when it packs.
    packed: Vec<PackedA>,
}

/// Output pixels per tile: a tile's column matrix (`K x TILE` floats) should fit in L2.
fn tile_width(k: usize, pixels: usize, tasks_wanted: usize) -> usize {
    let by_cache = (cache::L2_FLOATS / k.max(1)).clamp(64, 4096);
    let by_parallelism = pixels.div_ceil(tasks_wanted.max(1));
    by_cache.min(by_parallelism).max(16).div_ceil(16) * 16
}

thread_local! {
    /// Each rayon worker's reusable buffers: the patch matrix (portable path) and packed panels
    /// (pointwise convolutions).
    /// Kept across tasks and calls so no tile allocates or zero-fills memory.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, PackedB)> = const { std::cell::RefCell::new((Vec::new(), PackedB::new())) };
}

/// One tensor whose channels are part of a convolution's input: image `b`'s channel `c` is the
/// `h * w` floats at `b * image_stride + c * h * w` of `data`.
#[derive(Debug, Clone, Copy)]
pub struct InputPart<'a> {
    pub data: &'a [f32],
    pub channels: usize,
    pub image_stride: usize,
}

/// A convolution's input, `[n][channels][h][w]`, as the channels of one or more tensors one
/// after another: a concatenation along channels that the convolution reads where its parts
/// lie, instead of a copy made for it.
#[derive(Debug, Clone)]
pub struct ConvInput<'a> {
    parts: Vec<InputPart<'a>>,
    n: usize,
    h: usize,
    w: usize,
}

impl<'a> ConvInput<'a> {
    /// The parts' channels, in order; `None` when a part is too short for `n` images of
    /// `h x w`, or when there is no part.
    pub fn new(parts: Vec<InputPart<'a>>, n: usize, h: usize, w: usize) -> Option<Self> {
        let fits = |p: &InputPart| n == 0 || p.channels * h * w == 0 || (n - 1) * p.image_stride + p.channels * h * w <= p.data.len();
        (!parts.is_empty() && parts.iter().all(fits)).then_some(ConvInput { parts, n, h, w })
    }

    /// One row-major tensor.
    pub fn contiguous(data: &'a [f32], n: usize, channels: usize, h: usize, w: usize) -> Self {
        ConvInput { parts: vec![InputPart { data, channels, image_stride: channels * h * w }], n, h, w }
    }

    pub fn channels(&self) -> usize {
        self.parts.iter().map(|p| p.channels).sum()
    }

    /// Channel `c` of image `b`.
    fn plane(&self, b: usize, mut c: usize) -> &'a [f32] {
        let plane = self.h * self.w;
        for part in &self.parts {
            if c < part.channels {
                return &part.data[b * part.image_stride + c * plane..][..plane];
            }
            c -= part.channels;
        }
        panic!("channel past the input's channels");
    }

    /// The input as one row-major buffer: borrowed when it is one, gathered otherwise.
    fn to_contiguous(&self) -> std::borrow::Cow<'a, [f32]> {
        let channels = self.channels();
        let plane = self.h * self.w;
        match self.parts.as_slice() {
            [part] if part.image_stride == channels * plane => std::borrow::Cow::Borrowed(&part.data[..self.n * channels * plane]),
            _ => std::borrow::Cow::Owned((0..self.n).flat_map(|b| (0..channels).flat_map(move |c| self.plane(b, c).iter().copied())).collect()),
        }
    }
}

impl Conv2d {
    /// A convolution of `spec` with `weights` (`[out_channels][in_channels / groups][kh][kw]`)
    /// and `bias` (one per output channel), on the portable path until it is packed
    /// ([`with_packed_weights`](Self::with_packed_weights)). Refuses a shape that the kernels
    /// cannot run: a zero size, stride or dilation, channels that the groups do not divide, or
    /// weights and biases of the wrong length.
    pub fn new(spec: ConvSpec, weights: Vec<f32>, bias: Vec<f32>) -> Result<Self, ConvError> {
        let ConvSpec { in_channels, out_channels, groups, kernel: (kh, kw), stride, dilation, pads: (pt, pl, pb, pr), .. } = spec;
        let bad = |what: String| Err(ConvError::Shape(what));
        if [in_channels, out_channels, groups, kh, kw].contains(&0) {
            return bad(format!("a zero size in {spec:?}"));
        }
        if stride.0 == 0 || stride.1 == 0 || dilation.0 == 0 || dilation.1 == 0 {
            return bad(format!("a zero stride or dilation in {spec:?}"));
        }
        if in_channels % groups != 0 || out_channels % groups != 0 {
            return bad(format!("{groups} groups do not divide {in_channels} input and {out_channels} output channels"));
        }
        // Every size the kernels compute from the shape fits in `usize`.
        let weights_len = (in_channels / groups).checked_mul(kh).and_then(|k| k.checked_mul(kw)).and_then(|k| k.checked_mul(out_channels));
        let spans = [(dilation.0, kh, pt, pb), (dilation.1, kw, pl, pr)].map(|(d, k, a, b)| d.checked_mul(k - 1).and_then(|s| s.checked_add(a)).and_then(|s| s.checked_add(b)));
        if spans.contains(&None) {
            return bad(format!("the kernel's span overflows in {spec:?}"));
        }
        if weights_len != Some(weights.len()) {
            return bad(format!("{} weights for {spec:?}", weights.len()));
        }
        if bias.len() != out_channels {
            return bad(format!("{} biases for {out_channels} output channels", bias.len()));
        }
        Ok(Conv2d { spec, weights, bias, packed: Vec::new() })
    }

    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// `[out_channels][in_channels / groups * kh * kw]`, ONNX's OIHW order.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// One per output channel.
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// The microkernel the weights are packed for; `None` on the portable path.
    pub fn isa(&self) -> Option<Isa> {
        self.packed.first().map(PackedA::isa)
    }

    /// Packs the weights for the best microkernel this CPU runs, once; unchanged (portable)
    /// when it runs none, and for depthwise convolutions (which have their own kernel).
    pub fn with_packed_weights(self) -> Self {
        match Isa::detect() {
            Some(isa) => self.with_weights_packed_for(isa).expect("`Isa::detect` returns a supported microkernel"),
            None => self,
        }
    }

    /// Packs the weights for `isa`'s microkernel; an error when this CPU cannot run it.
    /// A depthwise convolution is returned unpacked (it has its own kernel).
    pub fn with_weights_packed_for(self, isa: Isa) -> Result<Self, ConvError> {
        if !isa.supported() {
            return Err(ConvError::UnsupportedIsa(isa));
        }
        Ok(if self.is_depthwise() { self } else { self.pack_for(isa) })
    }

    /// Packs for `isa`, which is supported (`PackedA::new` asserts it again).
    fn pack_for(mut self, isa: Isa) -> Self {
        let m_g = self.spec.out_channels / self.spec.groups;
        let k = self.spec.in_channels / self.spec.groups * self.spec.kernel.0 * self.spec.kernel.1;
        self.packed = (0..self.spec.groups).map(|g| PackedA::new(isa, &self.weights[g * m_g * k..][..m_g * k], m_g, k)).collect();
        self
    }

    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (kh, kw) = self.spec.kernel;
        let span_h = self.spec.dilation.0 * (kh - 1) + 1;
        let span_w = self.spec.dilation.1 * (kw - 1) + 1;
        let ph = h + self.spec.pads.0 + self.spec.pads.2;
        let pw = w + self.spec.pads.1 + self.spec.pads.3;
        if ph < span_h || pw < span_w {
            return None;
        }
        Some(((ph - span_h) / self.spec.stride.0 + 1, (pw - span_w) / self.spec.stride.1 + 1))
    }

    /// Output channels per microkernel panel (1 on the portable path, which has no panels).
    fn panel_rows(&self) -> usize {
        self.isa().map_or(1, Isa::mr)
    }

    /// The microkernel's epilogue for output channels `channels`: their biases, the activation
    /// and the residual's first element and row stride, if any.
    fn epilogue(&self, channels: std::ops::Range<usize>, residual: Option<(*const f32, usize)>) -> packed_gemm::Epilogue<'_> {
        packed_gemm::Epilogue { bias: &self.bias[channels], silu: self.spec.activation == Activation::Silu, residual }
    }

    fn is_pointwise(&self) -> bool {
        self.spec.kernel == (1, 1) && self.spec.stride == (1, 1) && self.spec.pads == (0, 0, 0, 0)
    }

    fn is_depthwise(&self) -> bool {
        self.spec.groups == self.spec.in_channels && self.spec.groups == self.spec.out_channels && self.spec.groups > 1
    }

    /// Runs the convolution on `input` (`[n][in_channels][h][w]`) and returns the output
    /// (`[n][out_channels][oh][ow]`, `oh, ow` from [`output_size`](Self::output_size)).
    /// A `residual` of the output's shape is added last (after the activation), in the same
    /// pass: a network's skip connection costs no extra trip through memory.
    pub fn run(&self, input: &[f32], n: usize, h: usize, w: usize, residual: Option<&[f32]>) -> Vec<f32> {
        assert_eq!(input.len(), n * self.spec.in_channels * h * w, "input length");
        self.run_input(&ConvInput::contiguous(input, n, self.spec.in_channels, h, w), residual)
    }

    /// Like [`run`](Self::run), on an input made of parts.
    pub fn run_input(&self, input: &ConvInput, residual: Option<&[f32]>) -> Vec<f32> {
        let (n, h, w) = (input.n, input.h, input.w);
        let (oh, ow) = self.output_size(h, w).expect("caller checked the output size");
        let len = n * self.spec.out_channels * oh * ow;
        assert_eq!(input.channels(), self.spec.in_channels, "input channels");
        if let Some(residual) = residual {
            assert_eq!(residual.len(), len, "residual length");
        }
        // Not zero-filled first: every element is written below, and zeroing a layer's output
        // is a pass through memory of its own.
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let spare = &mut out.spare_capacity_mut()[..len];
        if self.is_depthwise() {
            self.run_depthwise(&input.to_contiguous(), h, w, oh, ow, residual, spare);
        } else if !self.packed.is_empty() && !self.is_pointwise() {
            self.run_direct(input, oh, ow, residual, spare);
        } else if !self.packed.is_empty() {
            self.run_gemm(input, oh, ow, residual, spare);
        } else {
            // The portable path reads its input as one buffer.
            let whole = input.to_contiguous();
            self.run_gemm(&ConvInput::contiguous(&whole, n, self.spec.in_channels, h, w), oh, ow, residual, spare);
        }
        // SAFETY: every path initialises all `len` elements (the GEMM tiles cover every output
        // channel and pixel; the depthwise planes are zeroed, then accumulated).
        unsafe { out.set_len(len) };
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn run_gemm(&self, input: &ConvInput, oh: usize, ow: usize, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let (n, h, w) = (input.n, input.h, input.w);
        let g = self.spec.groups;
        let cin_g = self.spec.in_channels / g;
        let m_g = self.spec.out_channels / g;
        let (kh, kw) = self.spec.kernel;
        let k = cin_g * kh * kw;
        let pixels = oh * ow;
        let threads = rayon::current_num_threads();
        let tile = tile_width(k, pixels, 4 * threads / (n * g).max(1));
        let tiles = pixels.div_ceil(tile);
        // Small late layers have few pixels: split the output channels too, so both cores work.
        let m_blocks = if n * g * tiles >= 2 * threads { 1 } else { (2 * threads).div_ceil(n * g * tiles).min(m_g.div_ceil(16)) }.max(1);
        // Channel blocks start on microkernel panels.
        let mr = self.panel_rows();
        let m_block = m_g.div_ceil(m_blocks).div_ceil(mr) * mr;
        let m_blocks = m_g.div_ceil(m_block);
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        let pointwise = self.is_pointwise();
        (0..n * g * tiles * m_blocks).into_par_iter().for_each(|task| SCRATCH.with_borrow_mut(|(cols, packed_b)| {
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
            // `k x width` elements with row stride `rhs_rs`.
            unsafe {
                let first = (batch * self.spec.out_channels + channel0) * pixels + p0;
                let dst = out_ptr.get().add(first);
                let residual = residual.map(|r| (r[first..].as_ptr(), pixels));
                if let Some(packed) = packed {
                    // Only pointwise convolutions come here with packed weights (the others run
                    // in place, `run_direct`). Packing their scattered channel rows into panels
                    // measured faster than reading them in place.
                    let row = |kk: usize| plane(kk)[p0..].as_ptr();
                    packed_gemm::pack_b_rows(packed.isa(), &row, k, width, packed_b);
                    if cache::rows_share_cache_sets(pixels) {
                        // Such rows evict each other from L1: a product written to a compact
                        // tile and copied out row by row measured 10-15 % faster on such layers
                        // (and slower on others).
                        // Written to a compact tile, then copied out row by row.
                        if cols.len() < rows * width {
                            cols.resize(rows * width, 0.0);
                        }
                        let epilogue = self.epilogue(channel0..channel0 + rows, None);
                        packed_gemm::gemm(packed, m0..m0 + rows, packed_b, width, cols.as_mut_ptr(), width, Some(&epilogue));
                        for r in 0..rows {
                            let d = std::slice::from_raw_parts_mut(dst.add(r * pixels), width);
                            d.copy_from_slice(&cols[r * width..][..width]);
                            if let Some((res, ld)) = residual {
                                add_assign(d, std::slice::from_raw_parts(res.add(r * ld), width));
                            }
                        }
                    } else {
                        let epilogue = self.epilogue(channel0..channel0 + rows, residual);
                        packed_gemm::gemm(packed, m0..m0 + rows, packed_b, width, dst, pixels, Some(&epilogue));
                    }
                } else {
                    let lhs = &self.weights[channel0 * k..][..rows * k];
                    gemm::gemm(
                        rows, width, k,
                        dst, 1, pixels as isize,
                        false,
                        lhs.as_ptr(), 1, k as isize,
                        rhs, 1, rhs_rs,
                        0.0, 1.0,
                        false, false, false,
                        gemm::Parallelism::None,
                    );
                    bias_activation_tile(dst, pixels, width, &self.bias[channel0..channel0 + rows], self.spec.activation, residual);
                }
            }
        }));
    }

    /// A convolution without im2col. The input is copied once into zero-padded planes split by
    /// stride phase (for stride 2: even and odd rows times even and odd columns), so that the
    /// input a kernel tap sees for 16 consecutive output pixels is 16 consecutive floats of one
    /// phase plane; for each output row the microkernel then reads every patch row in place, at
    /// a fixed offset from the row's start (`gemm_offsets`). Output rows run in parallel.
    #[allow(clippy::too_many_arguments)]
    fn run_direct(&self, input: &ConvInput, oh: usize, ow: usize, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let (n, h, w) = (input.n, input.h, input.w);
        let g = self.spec.groups;
        let cin_g = self.spec.in_channels / g;
        let m_g = self.spec.out_channels / g;
        let (kh, kw) = self.spec.kernel;
        let (dh, dw) = self.spec.dilation;
        let (sh, sw) = self.spec.stride;
        let (pt, pl, pb, pr) = self.spec.pads;
        // Each channel becomes `sh * sw` phase planes of `hp x wp`.
        let (hp, wp) = ((h + pt + pb).div_ceil(sh), (w + pl + pr).div_ceil(sw));
        let plane = hp * wp;
        let channel_len = sh * sw * plane;
        // The last tile of a row reads up to `nr - 1` columns past it: slack after the last plane.
        let planes_len = n * self.spec.in_channels * channel_len;
        let mut padded: Vec<f32> = Vec::with_capacity(planes_len + packed_gemm::MAX_NR);
        zeroed(&mut padded.spare_capacity_mut()[planes_len..planes_len + packed_gemm::MAX_NR]);
        let isa = self.isa();
        let layout = PhaseLayout { h, w, pt, pl, sh, sw, plane, hp, wp };
        padded.spare_capacity_mut()[..planes_len].par_chunks_mut(channel_len).enumerate().for_each(|(index, dst)| {
            let src = input.plane(index / self.spec.in_channels, index % self.spec.in_channels);
            // Only the padding is zeroed (the pixels are written next), here rather than by the
            // allocator: in parallel, and just before the copy.
            zero_phase_padding(dst, &layout);
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU supports AVX-512F (the weights were packed for it).
                Some(Isa::Avx512) => unsafe { split_phases_avx512(dst, src, &layout) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU supports AVX2 (the weights were packed for it).
                Some(Isa::Avx2) => unsafe { split_phases_avx2(dst, src, &layout) },
                _ => split_phases(dst, src, &layout),
            }
        });
        // SAFETY: every element was written: the padding and the pixels of each plane (which
        // partition it, see `zero_phase_padding`) by the loop above, the slack before it.
        unsafe { padded.set_len(planes_len + packed_gemm::MAX_NR) };
        // Tap (c, ky, kx) of output pixel (oy, ox) reads phase ((ky*dh) % sh, (kx*dw) % sw) of
        // channel c at row oy + ky*dh/sh, column ox + kx*dw/sw.
        let offsets: Vec<usize> = (0..cin_g * kh * kw)
            .map(|kk| {
                let (c, ky, kx) = (kk / (kh * kw), kk / kw % kh, kk % kw);
                let phase = (ky * dh % sh) * sw + kx * dw % sw;
                c * channel_len + phase * plane + (ky * dh / sh) * wp + kx * dw / sw
            })
            .collect();
        let pixels = oh * ow;
        let threads = rayon::current_num_threads();
        let units = n * g;
        let rows_per_task = oh.div_ceil((4 * threads).div_ceil(units).clamp(1, oh));
        let row_tasks = oh.div_ceil(rows_per_task);
        // Few rows (small late layers): split the output channels too, so both cores work.
        let m_blocks = if units * row_tasks >= 2 * threads { 1 } else { (2 * threads).div_ceil(units * row_tasks).min(m_g.div_ceil(16)) }.max(1);
        let mr = self.panel_rows();
        let m_block = m_g.div_ceil(m_blocks).div_ceil(mr) * mr;
        let m_blocks = m_g.div_ceil(m_block);
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        let padded = &padded;
        (0..units * row_tasks * m_blocks).into_par_iter().for_each(|task| {
            let mb = task % m_blocks;
            let row_task = (task / m_blocks) % row_tasks;
            let (batch, group) = (task / m_blocks / row_tasks / g, task / m_blocks / row_tasks % g);
            let m0 = mb * m_block;
            let rows = m_block.min(m_g - m0);
            let channel0 = group * m_g + m0;
            let image = &padded[(batch * self.spec.in_channels + group * cin_g) * channel_len..];
            let task_rows = row_task * rows_per_task..((row_task + 1) * rows_per_task).min(oh);
            let packed = &self.packed[group];
            if ow % packed.isa().nr() != 0 || cache::rows_share_cache_sets(pixels) {
                // Rows that end inside a panel would waste its last columns (a 40-pixel row is
                // 1.25 panels of 32): the product runs over several rows at once instead, into
                // a compact tile (which also suits outputs whose channel planes alias).
                // SAFETY: as below, for the rows of this task.
                unsafe { self.direct_rows_flattened(group, m0..m0 + rows, image, &offsets, wp, (oh, ow), task_rows, batch, residual, out_ptr) };
                return;
            }
            for oy in task_rows {
                let first = (batch * self.spec.out_channels + channel0) * pixels + oy * ow;
                // SAFETY: this task writes rows `channel0..channel0+rows` of output row `oy` of
                // image `batch` — a region no other task writes — inside `out`. Each patch row
                // starts at `image[oy * wp + offsets[kk]]` and the kernel reads at most
                // `ow.div_ceil(nr) * nr` floats from there: within the padded planes, or the
                // slack after the last one.
                unsafe {
                    let dst = out_ptr.get().add(first);
                    let epilogue = self.epilogue(channel0..channel0 + rows, residual.map(|r| (r[first..].as_ptr(), pixels)));
                    packed_gemm::gemm_offsets(&self.packed[group], m0..m0 + rows, image.as_ptr().add(oy * wp), &offsets, ow, dst, pixels, Some(&epilogue));
                }
            }
        });
    }

    /// Output rows `out_rows` of channels `channels` (of image `batch`, relative to `group`'s
    /// first) of a convolution run in place
    /// ([`run_direct`](Self::run_direct)), as products over several rows at once: output pixel
    /// `(oy, ox)` is column `(oy - oy0) * wp + ox` of a product whose `B` rows run along the
    /// padded phase planes, `wp` floats per row, so one product covers `oy0..oy1` with the
    /// `wp - ow` columns between rows computed and dropped. The product lands in a scratch
    /// tile (bias and activation applied by the kernel); its rows are copied out, adding the
    /// residual on the way.
    ///
    /// # Safety
    /// As for the row-by-row loop in `run_direct`: this task alone writes these channels of
    /// these rows of `out`; `image` has the padded planes of the group's channels and the
    /// slack after them.
    #[allow(clippy::too_many_arguments)]
    unsafe fn direct_rows_flattened(&self, group: usize, channels: std::ops::Range<usize>, image: &[f32], offsets: &[usize], wp: usize, (oh, ow): (usize, usize), out_rows: std::ops::Range<usize>, batch: usize, residual: Option<&[f32]>, out: SendPtr) {
        // Columns per product: about 32 panels, so that the scratch tile stays in L2.
        const COLUMNS: usize = cache::SCRATCH_TILE_COLUMNS;
        let pixels = oh * ow;
        let packed = &self.packed[group];
        let channel0 = group * (self.spec.out_channels / self.spec.groups) + channels.start;
        let rows = channels.len();
        let per_product = (COLUMNS / wp).max(1);
        let epilogue = self.epilogue(channel0..channel0 + rows, None);
        SCRATCH.with_borrow_mut(|(scratch, _)| {
            let mut oy0 = out_rows.start;
            while oy0 < out_rows.end {
                let oy1 = (oy0 + per_product).min(out_rows.end);
                let width = (oy1 - oy0 - 1) * wp + ow;
                // Grown, never cleared: the product writes every element it covers.
                if scratch.len() < rows * width {
                    scratch.resize(rows * width, 0.0);
                }
                // SAFETY: the caller's contract; the `B` rows start at `oy0 * wp + offsets[kk]`
                // and are read for at most `width.div_ceil(nr) * nr` floats, which ends where
                // the row-by-row product of row `oy1 - 1` ends: inside the planes or the slack.
                unsafe { packed_gemm::gemm_offsets(packed, channels.clone(), image.as_ptr().add(oy0 * wp), offsets, width, scratch.as_mut_ptr(), width, Some(&epilogue)) };
                for r in 0..rows {
                    for oy in oy0..oy1 {
                        let first = (batch * self.spec.out_channels + channel0 + r) * pixels + oy * ow;
                        // SAFETY: row `oy` of output channel `channel0 + r`: this task's alone.
                        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(first), ow) };
                        dst.copy_from_slice(&scratch[r * width + (oy - oy0) * wp..][..ow]);
                        if let Some(residual) = residual {
                            add_assign(dst, &residual[first..][..ow]);
                        }
                    }
                }
                oy0 = oy1;
            }
        });
    }

    /// Fills `dst` with row `kk` (input channel, kernel row, kernel column) of the patches of
    /// output pixels `p0..p0 + dst.len()`, zero where the kernel reads padding; `plane` is that
    /// input channel.
    #[allow(clippy::too_many_arguments)]
    fn im2col_row(&self, plane: &[f32], h: usize, w: usize, ow: usize, p0: usize, kk: usize, dst: &mut [f32]) {
        let (kh, kw) = self.spec.kernel;
        let (sh, sw) = self.spec.stride;
        let (dh, dw) = self.spec.dilation;
        let (pt, pl) = (self.spec.pads.0 as isize, self.spec.pads.1 as isize);
        let (ky, kx) = (kk / kw % kh, kk % kw);
        let width = dst.len();
        let mut p = p0;
        let mut filled = 0;
        while filled < width {
            let (oy, ox) = (p / ow, p % ow);
            let run = (ow - ox).min(width - filled);
            let iy = (oy * sh) as isize - pt + (ky * dh) as isize;
            let dst = &mut dst[filled..filled + run];
            if iy < 0 || iy >= h as isize {
                dst.fill(0.0);
            } else {
                let src = &plane[iy as usize * w..][..w];
                let ix0 = (ox * sw) as isize - pl + (kx * dw) as isize;
                // Columns j with 0 <= ix0 + j*sw < w read the image; the rest is padding.
                let j_lo = if ix0 >= 0 { 0 } else { ((-ix0) as usize).div_ceil(sw) }.min(run);
                let j_hi = if ix0 >= w as isize { 0 } else { ((w as isize - ix0) as usize).div_ceil(sw) };
                let j_hi = j_hi.clamp(j_lo, run);
                dst[..j_lo].fill(0.0);
                dst[j_hi..].fill(0.0);
                let first = (ix0 + (j_lo * sw) as isize) as usize;
                let inside = &mut dst[j_lo..j_hi];
                if sw == 1 {
                    inside.copy_from_slice(&src[first..first + inside.len()]);
                } else {
                    for (d, &v) in inside.iter_mut().zip(src[first..].iter().step_by(sw)) {
                        *d = v;
                    }
                }
            }
            filled += run;
            p += run;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_depthwise(&self, input: &[f32], h: usize, w: usize, oh: usize, ow: usize, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let channels = self.spec.out_channels;
        let isa = Isa::detect();
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane_index, dst)| {
            let dst = zeroed(dst);
            let c = plane_index % channels;
            let src = &input[plane_index * h * w..][..h * w];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU supports AVX-512F (`Isa::detect` checked it).
                Some(Isa::Avx512) => unsafe { depthwise_plane_avx512(self, c, src, h, w, oh, ow, dst) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU supports AVX2 and FMA (`Isa::detect` checked it).
                Some(Isa::Avx2) => unsafe { depthwise_plane_avx2(self, c, src, h, w, oh, ow, dst) },
                _ => depthwise_plane(self, c, src, h, w, oh, ow, dst),
            }
            if let Some(residual) = residual {
                add_assign(dst, &residual[plane_index * oh * ow..][..oh * ow]);
            }
        });
    }
}

/// Where one input channel's pixels go among its zero-padded stride-phase planes (see
/// [`Conv2d::run_direct`]).
struct PhaseLayout {
    h: usize,
    w: usize,
    pt: usize,
    pl: usize,
    sh: usize,
    sw: usize,
    /// Floats per phase plane; its rows and their length.
    plane: usize,
    hp: usize,
    wp: usize,
}

/// The rows (or columns) of a phase plane that hold pixels: place `i` of phase `phase` holds
/// input index `i * stride + phase - pad`, which must lie in `0..len`; `places` in all.
fn pixel_span(len: usize, pad: usize, stride: usize, phase: usize, places: usize) -> std::ops::Range<usize> {
    let first = pad.saturating_sub(phase).div_ceil(stride);
    let end = if len + pad > phase { ((len - 1 + pad - phase) / stride + 1).min(places) } else { 0 };
    first.min(end)..end
}

/// Zeroes the padding of one channel's phase planes: every place that [`split_phases`] does
/// not write.
fn zero_phase_padding(dst: &mut [MaybeUninit<f32>], layout: &PhaseLayout) {
    let &PhaseLayout { h, w, pt, pl, sh, sw, plane, hp, wp } = layout;
    let zero = MaybeUninit::new(0.0f32);
    for py in 0..sh {
        let rows = pixel_span(h, pt, sh, py, hp);
        for px in 0..sw {
            let cols = pixel_span(w, pl, sw, px, wp);
            let phase = &mut dst[(py * sw + px) * plane..][..hp * wp];
            phase[..rows.start * wp].fill(zero);
            phase[rows.end * wp..].fill(zero);
            for row in phase[rows.start * wp..rows.end * wp].chunks_exact_mut(wp) {
                row[..cols.start].fill(zero);
                row[cols.end..].fill(zero);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn split_phases_avx2(dst: &mut [MaybeUninit<f32>], src: &[f32], layout: &PhaseLayout) {
    split_phases(dst, src, layout)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn split_phases_avx512(dst: &mut [MaybeUninit<f32>], src: &[f32], layout: &PhaseLayout) {
    split_phases(dst, src, layout)
}

/// Copies one channel (`src`, rows of `w`) into its phase planes (`dst`): pixel
/// `(y, x)` goes to phase `((y + pt) % sh, (x + pl) % sw)` at row `(y + pt) / sh`, column
/// `(x + pl) / sw`. Compiled for the CPU's vectors by the callers above: for stride 2 the
/// compiler then splits even and odd columns with vector shuffles.
#[inline(always)]
fn split_phases(dst: &mut [MaybeUninit<f32>], src: &[f32], layout: &PhaseLayout) {
    let &PhaseLayout { w, pt, pl, sh, sw, plane, wp, .. } = layout;
    for (y, row) in src.chunks_exact(w).enumerate() {
        let (py, y2) = ((y + pt) % sh, (y + pt) / sh);
        // Column x0 + k*sw lands at place (x0 + pl) / sw + k of its phase's row.
        let phase_row = |x0: usize| (py * sw + (x0 + pl) % sw) * plane + y2 * wp + (x0 + pl) / sw;
        match sw {
            1 => dst[phase_row(0)..][..w].iter_mut().zip(row).for_each(|(d, &v)| _ = d.write(v)),
            2 if w >= 2 => {
                // Both phases in one pass over the row: pairs (even, odd).
                let (even, odd) = (phase_row(0), phase_row(1));
                let pairs = row.chunks_exact(2);
                let last = pairs.remainder().first().copied();
                let (even_len, odd_len) = (w.div_ceil(2), w / 2);
                // The two rows lie in different planes: split `dst` between them.
                let (even_row, odd_row) = if even < odd {
                    let (head, tail) = dst.split_at_mut(odd);
                    (&mut head[even..][..even_len], &mut tail[..odd_len])
                } else {
                    let (head, tail) = dst.split_at_mut(even);
                    (&mut tail[..even_len], &mut head[odd..][..odd_len])
                };
                for ((e, o), pair) in even_row.iter_mut().zip(odd_row.iter_mut()).zip(pairs) {
                    e.write(pair[0]);
                    o.write(pair[1]);
                }
                if let Some(v) = last {
                    even_row[odd_len].write(v);
                }
            }
            _ => {
                for x0 in 0..sw.min(w) {
                    let start = phase_row(x0);
                    let count = (w - x0).div_ceil(sw);
                    dst[start..][..count].iter_mut().zip(row[x0..].iter().step_by(sw)).for_each(|(d, &v)| _ = d.write(v));
                }
            }
        }
    }
}

/// Fills `buf` with zeros and returns it as initialised floats.
fn zeroed(buf: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    buf.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was initialised just above, and `MaybeUninit<f32>` has the layout
    // of `f32`.
    unsafe { &mut *(buf as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `dst += src`, element-wise (the compiler vectorises it).
fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_avx2(conv: &Conv2d, c: usize, src: &[f32], h: usize, w: usize, oh: usize, ow: usize, dst: &mut [f32]) {
    depthwise_plane(conv, c, src, h, w, oh, ow, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_avx512(conv: &Conv2d, c: usize, src: &[f32], h: usize, w: usize, oh: usize, ow: usize, dst: &mut [f32]) {
    depthwise_plane(conv, c, src, h, w, oh, ow, dst)
}

/// One channel of a depthwise convolution into a zeroed `dst`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane(conv: &Conv2d, c: usize, src: &[f32], h: usize, w: usize, oh: usize, ow: usize, dst: &mut [f32]) {
    if conv.spec.stride == (1, 1) && conv.spec.dilation == (1, 1) {
        depthwise_plane_flat(conv, c, src, h, w, oh, ow, dst);
    } else {
        depthwise_plane_rows(conv, c, src, h, w, oh, ow, dst);
    }
    bias_activation(dst, conv.bias[c], conv.spec.activation);
}

/// A stride-1 depthwise convolution of one channel as one long multiply-add per tap. The plane
/// is copied once into a zero-padded buffer of width `wp`; output pixel `(oy, ox)` is then
/// computed at `oy * wp + ox` of an accumulator laid out like the padded plane, where tap
/// `(ky, kx)` reads the padded plane `ky * wp + kx` further on. Each tap is a single pass over
/// `oh * wp` floats (the `wp - ow` columns past each row are computed and dropped), instead of
/// `oh` short passes with their bounds.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_flat(conv: &Conv2d, c: usize, src: &[f32], h: usize, w: usize, oh: usize, ow: usize, dst: &mut [f32]) {
    let (kh, kw) = conv.spec.kernel;
    let (pt, pl, pb, pr) = conv.spec.pads;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    let weights = &conv.weights[c * kh * kw..][..kh * kw];
    let mut padded = vec![0.0f32; hp * wp];
    for (y, row) in src.chunks_exact(w).enumerate() {
        padded[(y + pt) * wp + pl..][..w].copy_from_slice(row);
    }
    let mut acc = vec![0.0f32; oh * wp];
    for ky in 0..kh {
        for kx in 0..kw {
            let wv = weights[ky * kw + kx];
            // The last tap ends at `(kh - 1 + oh) * wp + kw - 1 <= hp * wp`: inside the plane.
            let taps = &padded[ky * wp + kx..][..oh * wp - (kw - 1)];
            for (a, &p) in acc.iter_mut().zip(taps) {
                *a += wv * p;
            }
        }
    }
    for (drow, arow) in dst.chunks_exact_mut(ow).zip(acc.chunks(wp)) {
        drow.copy_from_slice(&arow[..ow]);
    }
}

/// A depthwise convolution of one channel, tap by tap over whole output rows so that the inner
/// loop is a vectorisable multiply-add; for any stride and dilation.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_rows(conv: &Conv2d, c: usize, src: &[f32], h: usize, w: usize, oh: usize, ow: usize, dst: &mut [f32]) {
    let (kh, kw) = conv.spec.kernel;
    let (sh, sw) = conv.spec.stride;
    let (dh, dw) = conv.spec.dilation;
    let (pt, pl) = (conv.spec.pads.0 as isize, conv.spec.pads.1 as isize);
    let weights = &conv.weights[c * kh * kw..][..kh * kw];
    for ky in 0..kh {
        for kx in 0..kw {
            let wv = weights[ky * kw + kx];
            // Output columns whose input column stays inside the image.
            let off_x = (kx * dw) as isize - pl;
            let x_lo = if off_x >= 0 { 0 } else { ((-off_x) as usize).div_ceil(sw) };
            let x_hi = if (w as isize) <= off_x { 0 } else { ((w as isize - off_x) as usize).div_ceil(sw).min(ow) };
            if x_lo >= x_hi {
                continue;
            }
            for oy in 0..oh {
                let iy = (oy * sh) as isize - pt + (ky * dh) as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let srow = &src[iy as usize * w..][..w];
                let drow = &mut dst[oy * ow..][..ow];
                if sw == 1 {
                    let start = (x_lo as isize + off_x) as usize;
                    let s = &srow[start..start + (x_hi - x_lo)];
                    for (d, &v) in drow[x_lo..x_hi].iter_mut().zip(s) {
                        *d += wv * v;
                    }
                } else {
                    for ox in x_lo..x_hi {
                        drow[ox] += wv * srow[(ox as isize * sw as isize + off_x) as usize];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output at a time.
    fn reference(conv: &Conv2d, input: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        let (oh, ow) = conv.output_size(h, w).unwrap();
        let cin_g = conv.spec.in_channels / conv.spec.groups;
        let m_g = conv.spec.out_channels / conv.spec.groups;
        let (kh, kw) = conv.spec.kernel;
        let mut out = vec![0.0; n * conv.spec.out_channels * oh * ow];
        for b in 0..n {
            for co in 0..conv.spec.out_channels {
                let g = co / m_g;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = conv.bias[co] as f64;
                        for ci in 0..cin_g {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * conv.spec.stride.0 + ky * conv.spec.dilation.0) as isize - conv.spec.pads.0 as isize;
                                    let ix = (ox * conv.spec.stride.1 + kx * conv.spec.dilation.1) as isize - conv.spec.pads.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let x = input[((b * conv.spec.in_channels + g * cin_g + ci) * h + iy as usize) * w + ix as usize];
                                    let wt = conv.weights[((co * cin_g + ci) * kh + ky) * kw + kx];
                                    acc += (x * wt) as f64;
                                }
                            }
                        }
                        let v = acc as f32;
                        out[((b * conv.spec.out_channels + co) * oh + oy) * ow + ox] = match conv.spec.activation {
                            Activation::Identity => v,
                            Activation::Silu => v / (1.0 + (-v).exp()),
                        };
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// A square convolution with SiLU and test weights, on the portable path and on every
    /// microkernel this CPU runs.
    fn variants(cin: usize, cout: usize, groups: usize, k: usize, stride: usize, pad: usize) -> Vec<Conv2d> {
        let spec = ConvSpec {
            in_channels: cin,
            out_channels: cout,
            groups,
            kernel: (k, k),
            stride: (stride, stride),
            dilation: (1, 1),
            pads: (pad, pad, pad, pad),
            activation: Activation::Silu,
        };
        let conv = Conv2d::new(spec, values(cout * cin / groups * k * k, 1), values(cout, 2)).unwrap();
        let packed = [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported() && !conv.is_depthwise());
        std::iter::once(conv.clone()).chain(packed.map(|isa| conv.clone().with_weights_packed_for(isa).unwrap())).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn check(cin: usize, cout: usize, groups: usize, k: usize, stride: usize, pad: usize, n: usize, h: usize, w: usize) {
        let input = values(n * cin * h * w, 3);
        // Every variant, with and without a residual.
        for conv in variants(cin, cout, groups, k, stride, pad) {
            let (oh, ow) = conv.output_size(h, w).unwrap();
            let residual = values(n * cout * oh * ow, 4);
            for with_residual in [false, true] {
                let out = conv.run(&input, n, h, w, with_residual.then_some(residual.as_slice()));
                assert_eq!(out.len(), n * cout * oh * ow);
                let mut want = reference(&conv, &input, n, h, w);
                if with_residual {
                    want.iter_mut().zip(&residual).for_each(|(w, r)| *w += r);
                }
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "cin={cin} cout={cout} g={groups} k={k} s={stride} residual={with_residual}: [{i}] {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn an_input_in_parts_gives_the_same_output() {
        // Batch 2; the second part is every other channel block of a larger tensor (a channel
        // split of it), so its images lie further apart than its own channels.
        let (n, h, w) = (2, 9, 11);
        for (cin, cout, groups, k, stride) in [(12, 16, 1, 1, 1), (12, 16, 1, 3, 1), (12, 8, 1, 3, 2), (12, 12, 12, 3, 1), (12, 8, 2, 3, 1)] {
            let first = values(n * 5 * h * w, 5);
            let wide = values(n * 14 * h * w, 6);
            let parts = vec![
                InputPart { data: &first, channels: 5, image_stride: 5 * h * w },
                InputPart { data: &wide[7 * h * w..], channels: 7, image_stride: 14 * h * w },
            ];
            let input = ConvInput::new(parts, n, h, w).unwrap();
            let whole = input.to_contiguous().into_owned();
            for conv in variants(cin, cout, groups, k, stride, k / 2) {
                assert_eq!(conv.run_input(&input, None), conv.run(&whole, n, h, w, None), "{cin}->{cout} k{k} s{stride} g{groups}");
            }
        }
        // A part shorter than its images is refused.
        let short = values(10, 1);
        assert!(ConvInput::new(vec![InputPart { data: &short, channels: 1, image_stride: 9 }], 2, 3, 3).is_none());
    }

    #[test]
    fn padding_and_pixels_fill_every_phase_plane() {
        for (h, w, pad, stride) in [(7usize, 9usize, 1usize, 2usize), (8, 6, 0, 2), (5, 5, 2, 3), (6, 7, 1, 1), (4, 4, 3, 2)] {
            let (hp, wp) = ((h + 2 * pad).div_ceil(stride), (w + 2 * pad).div_ceil(stride));
            let layout = PhaseLayout { h, w, pt: pad, pl: pad, sh: stride, sw: stride, plane: hp * wp, hp, wp };
            let src: Vec<f32> = (1..=h * w).map(|i| i as f32).collect();
            // NaN stands for memory nobody wrote.
            let mut dst = vec![MaybeUninit::new(f32::NAN); stride * stride * hp * wp];
            zero_phase_padding(&mut dst, &layout);
            split_phases(&mut dst, &src, &layout);
            // SAFETY: every element was initialised (with NaN) when the vector was made.
            let planes: Vec<f32> = dst.iter().map(|v| unsafe { v.assume_init() }).collect();
            for (i, &v) in planes.iter().enumerate() {
                let (phase, y2, x2) = (i / (hp * wp), i / wp % hp, i % wp);
                let (y, x) = ((y2 * stride + phase / stride) as isize - pad as isize, (x2 * stride + phase % stride) as isize - pad as isize);
                let inside = (0..h as isize).contains(&y) && (0..w as isize).contains(&x);
                let want = if inside { src[y as usize * w + x as usize] } else { 0.0 };
                assert_eq!(v, want, "{h}x{w} pad {pad} stride {stride}: phase {phase} ({y2}, {x2})");
            }
        }
    }

    #[test]
    fn a_convolution_is_checked_when_it_is_built() {
        let spec = ConvSpec {
            in_channels: 4,
            out_channels: 6,
            groups: 2,
            kernel: (3, 3),
            stride: (1, 1),
            dilation: (1, 1),
            pads: (1, 1, 1, 1),
            activation: Activation::Identity,
        };
        let make = |spec: ConvSpec| {
            let weights = spec.out_channels * spec.in_channels / spec.groups.max(1) * spec.kernel.0 * spec.kernel.1;
            Conv2d::new(spec, values(weights, 1), values(spec.out_channels, 2))
        };
        assert!(make(spec).is_ok());
        for bad in [
            ConvSpec { groups: 0, ..spec },
            ConvSpec { groups: 4, ..spec },
            ConvSpec { in_channels: 5, ..spec },
            ConvSpec { kernel: (0, 3), ..spec },
            ConvSpec { stride: (1, 0), ..spec },
            ConvSpec { dilation: (0, 1), ..spec },
            ConvSpec { dilation: (usize::MAX, 1), ..spec },
        ] {
            assert!(matches!(make(bad), Err(ConvError::Shape(_))), "{bad:?}");
        }
        assert!(Conv2d::new(spec, values(6 * 2 * 9 - 1, 1), values(6, 2)).is_err(), "one weight short");
        assert!(Conv2d::new(spec, values(6 * 2 * 9, 1), values(5, 2)).is_err(), "one bias short");
    }

    #[test]
    fn weights_are_packed_only_for_a_microkernel_this_cpu_runs() {
        let conv = variants(8, 16, 1, 3, 1, 1).remove(0);
        for isa in [Isa::Avx2, Isa::Avx512] {
            match conv.clone().with_weights_packed_for(isa) {
                Ok(packed) => assert!(isa.supported() && packed.isa() == Some(isa)),
                Err(e) => assert!(!isa.supported() && e == ConvError::UnsupportedIsa(isa), "{isa:?}: {e}"),
            }
            if !isa.supported() {
                // Packing by hand for it is refused too.
                assert!(std::panic::catch_unwind(|| PackedA::new(isa, &[1.0; 4], 2, 2)).is_err());
            }
        }
        assert_eq!(conv.clone().with_packed_weights().isa(), Isa::detect());
        // A depthwise convolution keeps its own kernel.
        let depthwise = variants(8, 8, 8, 3, 1, 1).remove(0);
        assert_eq!(depthwise.with_packed_weights().isa(), None);
    }

    #[test]
    fn matches_the_definition() {
        check(3, 16, 1, 3, 2, 1, 1, 37, 29); // first layer shape
        check(16, 32, 1, 1, 1, 0, 2, 9, 11); // pointwise, batch 2
        check(8, 12, 1, 3, 1, 1, 1, 64, 40); // many tiles
        check(32, 32, 32, 3, 1, 1, 1, 13, 9); // depthwise
        check(16, 16, 16, 7, 1, 3, 2, 10, 12); // depthwise 7x7
        check(16, 16, 16, 3, 2, 1, 1, 11, 11); // depthwise strided
        check(8, 8, 8, 5, 1, 0, 1, 9, 12); // depthwise without padding
        check(8, 8, 2, 3, 1, 1, 1, 6, 6); // grouped
        check(64, 128, 1, 3, 2, 1, 1, 5, 5); // small late layer: split channels
        check(24, 40, 1, 3, 1, 1, 2, 7, 21); // stride 1 in place: rows not a multiple of 16, batch 2
        check(70, 20, 1, 3, 1, 0, 1, 5, 19); // stride 1 without padding, k > one block of KC
        check(6, 10, 2, 5, 1, 2, 1, 9, 17); // stride 1, grouped, 5x5
        check(5, 9, 1, 3, 2, 0, 2, 12, 16); // stride 2 without padding: even columns in phase 0
        check(4, 6, 1, 3, 3, 1, 1, 10, 11); // stride 3
        check(8, 16, 1, 3, 1, 1, 2, 5, 32); // rows of whole panels, one product per row
    }
}
