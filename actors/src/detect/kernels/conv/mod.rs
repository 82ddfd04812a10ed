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
//!
//! One file per way of running a convolution: [`pointwise`] (1x1 on packed tiles, and every
//! shape on the portable path with [`im2col`]), [`direct`] (in place over stride-phase planes),
//! [`depthwise`], and on x86-64 Winograd's, the pixel tiles, the stem (a model's first
//! layer, and with AVX-512 the stride-2 layers of up to 64 input channels on wide outputs) and,
//! on CPUs with Intel AMX, its tile units ([`amx_tiles`]: strided and pointwise
//! layers with many channels); [`schedule`] splits the work into tasks. The input is read through
//! [`input`].

#[cfg(target_arch = "x86_64")]
mod amx_tiles;
mod depthwise;
mod direct;
mod im2col;
mod input;
#[cfg(target_arch = "x86_64")]
mod pixel_tiles;
mod pointwise;
mod schedule;
#[cfg(target_arch = "x86_64")]
mod stem;
#[cfg(target_arch = "x86_64")]
mod winograd;
#[cfg(target_arch = "x86_64")]
mod winograd_lanes;

use std::mem::MaybeUninit;

use super::activation::Activation;
use super::epilogue::Epilogue;
use super::isa::Isa;
use super::pack::PackedA;

pub use input::{BLOCK, ChannelLayout, ConvInput, InputPart};
#[cfg(all(target_arch = "x86_64", feature = "bench-internals"))]
pub use pixel_tiles::tile_gflops;

/// Where a way of running a convolution writes its output: `[n][out_channels]` planes of
/// `oh x ow` pixels, `pitch` floats apart (`pitch >= oh * ow`; the floats between planes are
/// not the kernel's to write), the residual laid out the same.
#[derive(Debug, Clone, Copy)]
struct OutputPlanes {
    oh: usize,
    ow: usize,
    pitch: usize,
}

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

// Tests and the conv bench build convolutions from a few numbers; the engine takes its shapes
// from the model.
#[cfg(any(test, feature = "bench-internals"))]
impl ConvSpec {
    /// A `k x k` kernel with the same stride and padding on both axes and no dilation.
    pub fn square(in_channels: usize, out_channels: usize, groups: usize, k: usize, stride: usize, pad: usize, activation: Activation) -> ConvSpec {
        ConvSpec { in_channels, out_channels, groups, kernel: (k, k), stride: (stride, stride), dilation: (1, 1), pads: (pad, pad, pad, pad), activation }
    }
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
    /// The weights transformed for F(4x4, 3x3), packed for the same microkernel, when the
    /// shape suits it ([`winograd::Winograd::applies`]).
    #[cfg(target_arch = "x86_64")]
    winograd: Option<winograd::Winograd>,
    /// The weights in panels of output channels for the pixel-major kernel, when the shape
    /// and the microkernel suit it ([`pixel_tiles::PixelTiles::applies`]).
    #[cfg(target_arch = "x86_64")]
    pixel_tiles: Option<pixel_tiles::PixelTiles>,
    /// The weights for the stem kernel, when the shape and the microkernel suit it
    /// ([`stem::Stem::applies`]).
    #[cfg(target_arch = "x86_64")]
    stem: Option<stem::Stem>,
    /// The weights as AMX tiles, on a CPU with AMX
    /// ([`amx_tiles::AmxTiles::applies`]).
    #[cfg(target_arch = "x86_64")]
    amx: Option<amx_tiles::AmxTiles>,
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
        let spans = [(dilation.0, kh, pt, pb), (dilation.1, kw, pl, pr)]
            .map(|(d, k, a, b)| d.checked_mul(k - 1).and_then(|s| s.checked_add(a)).and_then(|s| s.checked_add(b)));
        if spans.contains(&None) {
            return bad(format!("the kernel's span overflows in {spec:?}"));
        }
        if weights_len != Some(weights.len()) {
            return bad(format!("{} weights for {spec:?}", weights.len()));
        }
        if bias.len() != out_channels {
            return bad(format!("{} biases for {out_channels} output channels", bias.len()));
        }
        Ok(Conv2d {
            spec,
            weights,
            bias,
            packed: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            winograd: None,
            #[cfg(target_arch = "x86_64")]
            pixel_tiles: None,
            #[cfg(target_arch = "x86_64")]
            stem: None,
            #[cfg(target_arch = "x86_64")]
            amx: None,
        })
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
        #[cfg(target_arch = "x86_64")]
        {
            self.winograd = winograd::Winograd::applies(&self.spec).then(|| winograd::Winograd::new(isa, &self.spec, &self.weights));
            self.pixel_tiles = pixel_tiles::PixelTiles::applies(&self.spec).then(|| pixel_tiles::PixelTiles::new(isa, &self.spec, &self.weights, &self.bias));
            self.amx =
                (isa == Isa::Avx512 && amx_tiles::AmxTiles::applies(&self.spec)).then(|| amx_tiles::AmxTiles::new(&self.spec, &self.weights, &self.bias));
            // Where AMX tiles take a stride-2 layer, they run it: they were measured faster on
            // such layers than the AVX-512 kernels.
            self.stem = (stem::Stem::applies(&self.spec, isa) && self.amx.is_none()).then(|| stem::Stem::new(isa, &self.spec, &self.weights, &self.bias));
        }
        self
    }

    /// The same convolution without its AMX tiles: it runs on the AVX-512 kernels, to compare
    /// the two in one process.
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn without_amx(mut self) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            self.amx = None;
        }
        self
    }

    /// The same convolution with its pointwise runs on [`avx512::conv_tile`](super::x86_64::avx512)
    /// (channels in the lanes), and its small 3x3 ones by Winograd, rather than with the pixels
    /// in the lanes, to compare the two in one process.
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn without_pointwise_rows(mut self) -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = &mut self.pixel_tiles {
            tiles.without_rows();
        }
        self
    }

    /// Whether runs may put the pixels in the lanes (pointwise ones, and small 3x3 ones on
    /// large outputs).
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn runs_pointwise_rows(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.pixel_tiles.as_ref().is_some_and(|t| t.has_rows())
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether the convolution has AMX tiles (which take the output planes
    /// `AmxTiles::takes` allows).
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn runs_amx(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.amx.is_some()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
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
    fn epilogue(&self, channels: std::ops::Range<usize>, residual: Option<(*const f32, usize)>) -> Epilogue<'_> {
        Epilogue { bias: &self.bias[channels], silu: self.spec.activation == Activation::Silu, residual }
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
        let (oh, ow) = self.output_size(input.h, input.w).expect("caller checked the output size");
        self.run_input_pitched(input, residual, oh * ow)
    }

    /// Whether [`run_input_pitched`](Self::run_input_pitched) takes a pitch other than the
    /// planes' size for an output of `oh x ow` (every way but AMX tiles does).
    pub fn writes_pitched(&self, oh: usize, ow: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.amx.as_ref().is_some_and(|amx| amx.takes(oh * ow)) {
            return false;
        }
        let _ = (oh, ow);
        true
    }

    /// Like [`run_input`](Self::run_input), with the output's channel planes `pitch` floats
    /// apart (`[n][out_channels][pitch]`, each plane's `oh x ow` pixels first, then zeros): a
    /// pitch from [`spread_plane_pitch`](super::cache::spread_plane_pitch) keeps the next
    /// layer's reads of the planes from evicting each other. `residual` has the same layout.
    /// A pitch other than `oh * ow` needs [`writes_pitched`](Self::writes_pitched).
    pub fn run_input_pitched(&self, input: &ConvInput, residual: Option<&[f32]>, pitch: usize) -> Vec<f32> {
        if input.layout() == ChannelLayout::Blocked && !self.reads_blocks_in_place(input) {
            let planes = input.to_planes();
            return self.run_input_pitched(&ConvInput::contiguous(&planes, input.n, self.spec.in_channels, input.h, input.w), residual, pitch);
        }
        let (n, h, w) = (input.n, input.h, input.w);
        let (oh, ow) = self.output_size(h, w).expect("caller checked the output size");
        let pixels = oh * ow;
        assert!(pitch >= pixels && (pitch == pixels || self.writes_pitched(oh, ow)), "a pitch of {pitch} for {oh}x{ow} planes");
        let planes = n * self.spec.out_channels;
        let len = planes * pitch;
        assert_eq!(input.channels(), self.spec.in_channels, "input channels");
        if let Some(residual) = residual {
            // The last plane's padding may be absent (a channel split of a pitched tensor).
            assert!(residual.len() >= len - (pitch - pixels), "residual length");
        }
        // Not zero-filled first: every pixel is written below, and zeroing a layer's output is
        // a pass through memory of its own. The floats between planes are zeroed here.
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let spare = &mut out.spare_capacity_mut()[..len];
        if pitch > pixels {
            for plane in spare.chunks_exact_mut(pitch) {
                zeroed(&mut plane[pixels..]);
            }
        }
        self.run_kernel(input, residual, OutputPlanes { oh, ow, pitch }, spare);
        // SAFETY: every way of running writes all pixels of every plane: the stem's tasks every
        // pixel of their output rows of every channel, the tasks covering every image's rows;
        // AMX's blocks, Winograd's tiles and the pixel tiles (border columns included) every
        // pixel of every channel; the GEMM tiles every output channel and pixel; the depthwise
        // planes are zeroed, then accumulated. The floats between planes were zeroed above.
        unsafe { out.set_len(len) };
        out
    }

    /// Whether this convolution reads and writes tensors in [`ChannelLayout::Blocked`] in its
    /// own kernel, without converting them, its output channels whole blocks: a pointwise one
    /// in AVX2 pixel tiles (whose registers are one block wide), on any plane (on planes, the
    /// long products on small planes go to the channel-major product instead:
    /// `pixel_tiles::avx2_gemm_takes`; in blocks the tiles store each pixel's sums whole and
    /// win); a strided one in AVX2 pixel tiles that read its input's blocks in place
    /// ([`strided_tiles_read_blocks`](Self::strided_tiles_read_blocks)) and store each pixel's
    /// sums whole (YOLOv12n on a Xeon capped at AVX2, 2 threads, 12 rounds alternating with
    /// those layers writing planes: 16 -> 32 channels from 320x320 0.88 of its time, the
    /// others level, the pointwise layers that read them level to 0.94, the call 0.98; YOLO11n
    /// 0.97); a depthwise
    /// one with AVX2 whose channels go in the lanes
    /// ([`channel_lanes_suit`](Self::channel_lanes_suit): stride 1, a 3x3 to 7x7 kernel); a
    /// 3x3 stride-1 one by Winograd with AVX2 ([`winograd_writes_blocks`](Self::winograd_writes_blocks)),
    /// on the outputs it runs so. Others take and give blocked tensors too, through a copy in
    /// planes.
    pub fn runs_blocked(&self) -> bool {
        if !self.spec.out_channels.is_multiple_of(BLOCK) {
            return false;
        }
        if self.winograd_writes_blocks() || self.stem_writes_blocks() {
            return true;
        }
        #[cfg(target_arch = "x86_64")]
        if self.pixel_tiles.is_some() {
            return (self.is_pointwise() && self.tiles_take_blocks()) || self.strided_tiles_read_blocks();
        }
        #[cfg(target_arch = "x86_64")]
        if self.is_depthwise() {
            return self.channel_lanes_suit(true);
        }
        false
    }

    /// Whether this convolution runs on the AVX2 pixel tiles, whose registers are one block
    /// wide, with its output channels in whole blocks.
    ///
    /// AVX-512's tiles keep to planes. In blocks (each register a pixel's 16 channels, stored
    /// as halves into two blocks without a transpose; the taps read in place, 8 or 16 floats a
    /// pixel apart), YOLOv12n on an AMD EPYC (Zen 4), 2 threads, interleaved rounds against
    /// planes, took 1.012-1.017 of its time per call. The pointwise layers at 40x40 and 80x80
    /// that put the pixels in the lanes on planes ([`pixel_tiles`]' `pointwise_rows`) lost
    /// most in blocks (1.08-1.30). The stride-2 layers reading blocks in place came out level
    /// (1.00-1.06), the chains of the attention blocks at 20x20 level, and only their 64 -> 64
    /// projections at 40x40 gained (0.88-0.91).
    pub fn tiles_take_blocks(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = &self.pixel_tiles {
            return tiles.isa() == Isa::Avx2 && self.spec.out_channels.is_multiple_of(BLOCK);
        }
        false
    }

    /// Whether this convolution may be given its input in [`ChannelLayout::Blocked`], to read
    /// in its own kernel: one that [`runs_blocked`](Self::runs_blocked), or a stride-2 one with
    /// AVX2 pixel tiles, which reads its rows in place, each tap's pixels 16 floats apart
    /// ([`blocked_strided_tiles`](Self::blocked_strided_tiles) says on which inputs; on others
    /// it gets planes first). In blocks the 8 channels of a pixel share its cache lines, which
    /// the tile reads through in order: a few streams of lines where planes are one stream per
    /// input channel, more than the hardware prefetchers follow.
    pub fn reads_blocked(&self) -> bool {
        self.runs_blocked() || self.strided_tiles_read_blocks() || self.winograd_reads_blocks()
    }

    /// Whether this convolution's Winograd tiles write blocks ([`winograd`]'s output transform
    /// stores each pixel's 8 channels after a transpose; [`winograd_blocks`](Self::winograd_blocks)).
    /// Then the chains of 3x3 layers (a bottleneck's two, a head's box branch) pass blocks on.
    /// YOLO11n and YOLOv12n, 2 threads, 60 rounds alternating with Winograd writing planes:
    /// those layers 0.80-0.96 of their time, all 3x3 layers 0.966-0.982, the calls 0.978-0.983.
    fn winograd_writes_blocks(&self) -> bool {
        self.winograd_blocks(self.spec.out_channels)
    }

    /// Whether this convolution runs as the AVX2 stem with its output channels in whole
    /// blocks, which it then writes (each 8 pixels' sums transposed): the stride-2 layer after
    /// it reads them in place.
    fn stem_writes_blocks(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(stem) = &self.stem {
            return stem.isa() == Isa::Avx2 && self.spec.out_channels.is_multiple_of(BLOCK);
        }
        false
    }

    /// Whether this convolution's Winograd tiles may be given a blocked input
    /// ([`winograd_blocks`](Self::winograd_blocks)). Its phase planes are then split from
    /// blocks ([`direct::phase_planes`]), so that the layers beside it that read blocks keep
    /// them: the heads' inputs at 80x80 and 40x40, which their stride-2 layers and depthwise
    /// ones read too, and the pointwise layers that make them write. YOLO11n and YOLOv12n, 2
    /// threads, 60-80 rounds alternating with Winograd on planes: 64 -> 64 channels stride 2
    /// from 80x80 0.80-0.87 of its time, 128 -> 128 from 40x40 0.92-0.94, the depthwise layers
    /// 0.85-0.96, the Winograd layers themselves 0.93-0.96; all 3x3 layers 0.96-0.99.
    fn winograd_reads_blocks(&self) -> bool {
        self.winograd_blocks(self.spec.in_channels)
    }

    /// Whether this convolution's Winograd tiles take `channels` (its input's or its output's)
    /// in blocks: with AVX2, the channels in whole blocks. That includes the small layers whose
    /// pixel tiles put the pixels in the lanes on large outputs (`rows_take_kernel`), which read
    /// and write planes: given blocks, those run by Winograd too ([`winograd_call`](Self::winograd_call)),
    /// with the channels in the lanes. Against the pixel tiles on planes, YOLOv12n on a Xeon
    /// (Sapphire Rapids) capped at AVX2, 2 threads, 16 rounds alternating: 16 -> 8 and 8 -> 16
    /// channels at 160x160 0.70 and 0.67 of their time, the four 16 -> 16 at 80x80 (which had kept
    /// to planes with them) 0.62-0.65, the pointwise layers beside them 0.86-0.93, all 3x3 layers
    /// 0.96, the call 0.98; YOLO11n 0.99 (12 rounds).
    fn winograd_blocks(&self, channels: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(winograd) = &self.winograd {
            return winograd.isa() == Isa::Avx2 && channels.is_multiple_of(BLOCK);
        }
        let _ = channels;
        false
    }

    fn strided_tiles_read_blocks(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = &self.pixel_tiles {
            return tiles.isa() == Isa::Avx2
                && self.spec.stride == (2, 2)
                && !self.is_pointwise()
                && self.spec.in_channels.is_multiple_of(BLOCK)
                && self.stem.is_none()
                && self.amx.is_none();
        }
        false
    }

    /// Whether this convolution reads `input`, in blocks, in its own kernel.
    fn reads_blocks_in_place(&self, input: &ConvInput) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some((oh, ow)) = self.output_size(input.h, input.w) {
            return self.blocked_tiles(input).is_some()
                || self.channel_lanes_take((input.h, input.w), (oh, ow), true)
                || self.blocked_strided_tiles(input).is_some()
                || (self.winograd_reads_blocks() && self.winograd_call(input.n, (input.h, input.w), input.layout(), (oh, ow)).is_some());
        }
        let _ = input;
        false
    }

    /// The pixel tiles that run this convolution on `input` in blocks ([`runs_blocked`](Self::runs_blocked)),
    /// when its plane holds a tile: whatever else would run it on planes.
    #[cfg(target_arch = "x86_64")]
    fn blocked_tiles(&self, input: &ConvInput) -> Option<&pixel_tiles::PixelTiles> {
        let pixels = input.h * input.w;
        self.pixel_tiles
            .as_ref()
            .filter(|tiles| self.is_pointwise() && self.runs_blocked() && pixels >= tiles.shortest_run(pixels) && input.channels().is_multiple_of(BLOCK))
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn blocked_tiles(&self, _input: &ConvInput) -> Option<&()> {
        None
    }

    /// Like [`run_input`](Self::run_input), with the output in [`ChannelLayout::Blocked`]
    /// (`[n][out_channels / 8][oh][ow][8]`), and `residual` in that layout too. The input may
    /// be in either layout. The output channels must be whole blocks.
    pub fn run_input_blocked(&self, input: &ConvInput, residual: Option<&[f32]>) -> Vec<f32> {
        let (n, cout) = (input.n, self.spec.out_channels);
        assert!(cout.is_multiple_of(BLOCK), "{cout} output channels in blocks of {BLOCK}");
        let (oh, ow) = self.output_size(input.h, input.w).expect("caller checked the output size");
        let pixels = oh * ow;
        let len = n * cout * pixels;
        if let Some(residual) = residual {
            assert!(residual.len() >= len, "residual length");
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(stem), None, true) = (&self.stem, residual, self.stem_writes_blocks()) {
            let mut out: Vec<f32> = Vec::with_capacity(len);
            self.run_stem(stem, input, OutputPlanes { oh, ow, pitch: pixels }, ChannelLayout::Blocked, &mut out.spare_capacity_mut()[..len]);
            // SAFETY: the stem's tasks write every pixel of every block's rows of every image.
            unsafe { out.set_len(len) };
            return out;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(winograd) = self.winograd_call(n, (input.h, input.w), input.layout(), (oh, ow)).filter(|_| self.winograd_writes_blocks()) {
            // The input in either layout (`phase_planes` splits both).
            let mut out: Vec<f32> = Vec::with_capacity(len);
            self.run_winograd(winograd, input, OutputPlanes { oh, ow, pitch: pixels }, ChannelLayout::Blocked, residual, &mut out.spare_capacity_mut()[..len]);
            // SAFETY: Winograd's tiles write every pixel of every block of every image.
            unsafe { out.set_len(len) };
            return out;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = self.blocked_tiles(input).or_else(|| self.blocked_strided_tiles(input)) {
            let mut out: Vec<f32> = Vec::with_capacity(len);
            self.run_pixel_tiles(tiles, input, OutputPlanes { oh, ow, pitch: pixels }, ChannelLayout::Blocked, residual, &mut out.spare_capacity_mut()[..len]);
            // SAFETY: the pixel tiles write every pixel of every block of every image (a
            // strided layer's border columns included).
            unsafe { out.set_len(len) };
            return out;
        }
        #[cfg(target_arch = "x86_64")]
        if self.channel_lanes_take((input.h, input.w), (oh, ow), true) {
            let mut out: Vec<f32> = Vec::with_capacity(len);
            let ran =
                self.run_channel_lanes(input, OutputPlanes { oh, ow, pitch: pixels }, ChannelLayout::Blocked, residual, &mut out.spare_capacity_mut()[..len]);
            assert!(ran, "the depthwise kernel takes what it said it takes");
            // SAFETY: the kernel wrote every pixel of every block of every image (its tasks
            // cover every group's rows).
            unsafe { out.set_len(len) };
            return out;
        }
        let residual = residual.map(|r| input::blocks_to_planes(&r[..len], pixels));
        input::planes_to_blocks(&self.run_input_pitched(input, residual.as_deref(), pixels), pixels)
    }

    /// Runs the convolution into `out` (`[n][out_channels][pitch]`), by the fastest way the
    /// shape and the CPU allow.
    fn run_kernel(&self, input: &ConvInput, residual: Option<&[f32]>, planes: OutputPlanes, out: &mut [MaybeUninit<f32>]) {
        let (n, h, w) = (input.n, input.h, input.w);
        let OutputPlanes { oh, ow, .. } = planes;
        // A blocked input is read in place by the kernel that takes it (`run_input_pitched`
        // made it planes for any other).
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = self.blocked_tiles(input).filter(|_| input.layout() == ChannelLayout::Blocked) {
            return self.run_pixel_tiles(tiles, input, planes, ChannelLayout::Planes, residual, out);
        }
        #[cfg(target_arch = "x86_64")]
        if input.layout() == ChannelLayout::Blocked && self.run_channel_lanes(input, planes, ChannelLayout::Planes, residual, out) {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = self.blocked_strided_tiles(input) {
            return self.run_pixel_tiles(tiles, input, planes, ChannelLayout::Planes, residual, out);
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(stem), None, true) = (&self.stem, residual, stem::Stem::takes(self.spec.in_channels, ow)) {
            return self.run_stem(stem, input, planes, ChannelLayout::Planes, out);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(amx) = self.amx.as_ref().filter(|amx| amx.takes(oh * ow)) {
            return self.run_amx(amx, input, oh, ow, residual, out);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(winograd) = self.winograd_call(n, (h, w), input.layout(), (oh, ow)) {
            return self.run_winograd(winograd, input, planes, ChannelLayout::Planes, residual, out);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = self.pixel_tiles_for(oh, ow) {
            return self.run_pixel_tiles(tiles, input, planes, ChannelLayout::Planes, residual, out);
        }
        if self.is_depthwise() {
            self.run_depthwise(input, planes, residual, out);
        } else if !self.packed.is_empty() && !self.is_pointwise() {
            self.run_direct(input, planes, residual, out);
        } else if !self.packed.is_empty() {
            self.run_gemm(input, planes, residual, out);
        } else {
            // The portable path reads its input as one buffer.
            let whole = input.to_contiguous();
            self.run_gemm(&ConvInput::contiguous(&whole, n, self.spec.in_channels, h, w), planes, residual, out);
        }
    }
}

impl Conv2d {
    /// The Winograd weights, when this call (`n` images of `h x w` in `layout` into `oh x ow`)
    /// runs by them: not the small 3x3 layers whose pixel tiles put the pixels in the lanes on
    /// this output, which run so (`pixel_tiles::rows_take_kernel`), unless the input is in
    /// blocks, which those tiles do not read.
    #[cfg(target_arch = "x86_64")]
    fn winograd_call(&self, n: usize, (h, w): (usize, usize), layout: ChannelLayout, (oh, ow): (usize, usize)) -> Option<&winograd::Winograd> {
        let rows = || self.pixel_tiles_for(oh, ow).is_some_and(|t| t.rows_for(&self.spec, self.spec.in_channels * h * w, oh * ow));
        self.runs_winograd(n, oh, ow).filter(|_| layout == ChannelLayout::Blocked || !rows())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output at a time.
    pub(super) fn reference(conv: &Conv2d, input: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
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

    pub(super) fn values(len: usize, seed: u32) -> Vec<f32> {
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
        let spec = ConvSpec::square(cin, cout, groups, k, stride, pad, Activation::Silu);
        let conv = Conv2d::new(spec, values(cout * cin / groups * k * k, 1), values(cout, 2)).unwrap();
        let packed = [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported() && !conv.is_depthwise());
        let mut all: Vec<Conv2d> = std::iter::once(conv.clone()).chain(packed.map(|isa| conv.clone().with_weights_packed_for(isa).unwrap())).collect();
        // Where AMX tiles take a shape, the AVX-512 kernels are checked on it too.
        if let Some(tiled) = all.iter().find(|c| c.runs_amx()) {
            all.push(tiled.clone().without_amx());
        }
        // Where the pixels may go in the lanes (with either ISA), the channels are checked in
        // the lanes too.
        let in_channel_lanes: Vec<Conv2d> =
            all.iter().filter(|c| c.runs_pointwise_rows() && !c.runs_amx()).map(|c| c.clone().without_pointwise_rows()).collect();
        all.extend(in_channel_lanes);
        all
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn check(cin: usize, cout: usize, groups: usize, k: usize, stride: usize, pad: usize, n: usize, h: usize, w: usize) {
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
                    assert!(
                        (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "cin={cin} cout={cout} g={groups} k={k} s={stride} residual={with_residual}: [{i}] {a} vs {b}"
                    );
                }
                // The same with the planes of the input, the output and the residual further
                // apart than their size: NaN between the input's planes shows any read of them.
                let in_pitch = h * w + 5;
                let pitched_input = spread(&input, h * w, in_pitch, f32::NAN);
                let part = InputPart { data: &pitched_input, channels: cin, image_stride: cin * in_pitch, plane_stride: in_pitch, cold: false };
                let pitched = ConvInput::new(vec![part], n, h, w).unwrap();
                let pitch = if conv.writes_pitched(oh, ow) { oh * ow + 3 } else { oh * ow };
                let pitched_residual = spread(&residual, oh * ow, pitch, 0.0);
                let pitched_out = conv.run_input_pitched(&pitched, with_residual.then_some(pitched_residual.as_slice()), pitch);
                assert_eq!(pitched_out, spread(&out, oh * ow, pitch, 0.0), "cin={cin} cout={cout} g={groups} k={k} s={stride} pitch {pitch}");
            }
        }
    }

    /// `planes` of `size` floats, `pitch` apart, with `fill` between them.
    fn spread(planes: &[f32], size: usize, pitch: usize, fill: f32) -> Vec<f32> {
        planes.chunks_exact(size).flat_map(|plane| plane.iter().copied().chain(std::iter::repeat_n(fill, pitch - size))).collect()
    }

    #[test]
    fn an_input_in_parts_gives_the_same_output() {
        // Batch 2; the second part is every other channel block of a larger tensor (a channel
        // split of it), so its images lie further apart than its own channels.
        let (n, h, w) = (2, 9, 11);
        for (cin, cout, groups, k, stride) in [(12, 16, 1, 1, 1), (12, 16, 1, 3, 1), (12, 8, 1, 3, 2), (12, 12, 12, 3, 1), (12, 8, 2, 3, 1)] {
            let first = values(n * 5 * h * w, 5);
            let wide = values(n * 14 * h * w, 6);
            // The first part cold: read ahead of use, to the same result.
            let parts = vec![
                InputPart { data: &first, channels: 5, image_stride: 5 * h * w, plane_stride: h * w, cold: true },
                InputPart { data: &wide[7 * h * w..], channels: 7, image_stride: 14 * h * w, plane_stride: h * w, cold: false },
            ];
            let input = ConvInput::new(parts, n, h, w).unwrap();
            let whole = input.to_contiguous().into_owned();
            for conv in variants(cin, cout, groups, k, stride, k / 2) {
                assert_eq!(conv.run_input(&input, None), conv.run(&whole, n, h, w, None), "{cin}->{cout} k{k} s{stride} g{groups}");
            }
        }
        // A part shorter than its images is refused.
        let short = values(10, 1);
        assert!(ConvInput::new(vec![InputPart { data: &short, channels: 1, image_stride: 9, plane_stride: 9, cold: false }], 2, 3, 3).is_none());
    }

    #[test]
    fn blocked_tensors_give_the_same_output() {
        // Pointwise ones run blocks in their own tiles with AVX2 (a 16-channel panel and an 8 one,
        // a plane whose last tile overlaps, a plane of 160x160 whose planes would take the
        // pixels-in-lanes tile, a small plane that a long product would take to the
        // channel-major one), depthwise ones of stride 1 in their lanes (3x3 on a large plane,
        // 7x7), 3x3 ones of stride 2 read in place and written in blocks (their border columns
        // gathered from the blocks and stored into them: an odd width, an even one, 64 input
        // channels); the others (a 3x3 layer of
        // stride 1, one of stride 2 too narrow for a tile of interior columns, output channels
        // not whole blocks) through planes. The input is two blocked parts, the second a
        // channel split of a larger tensor, batch 2.
        let cases = [
            (16, 24, 1, 1, 1, 2, 7, 9),
            (32, 16, 1, 1, 1, 1, 160, 160),
            (256, 32, 1, 1, 1, 1, 10, 10),
            (16, 16, 16, 3, 1, 2, 50, 47),
            (24, 24, 24, 7, 1, 1, 12, 9),
            (16, 24, 1, 3, 2, 2, 15, 19),
            (24, 16, 1, 3, 2, 1, 9, 16),
            (64, 16, 1, 3, 2, 1, 40, 41),
            (16, 16, 1, 3, 1, 2, 7, 9),
            (16, 16, 1, 3, 2, 1, 6, 5),
            (16, 12, 1, 1, 1, 2, 7, 9),
        ];
        for (cin, cout, groups, k, stride, n, h, w) in cases {
            let pixels = h * w;
            let first = input::planes_to_blocks(&values(n * 8 * pixels, 5), pixels);
            let wide = input::planes_to_blocks(&values(n * (cin + 8) * pixels, 6), pixels);
            let parts = vec![
                InputPart { data: &first, channels: 8, image_stride: 8 * pixels, plane_stride: pixels, cold: true },
                InputPart { data: &wide[16 * pixels..], channels: cin - 8, image_stride: (cin + 8) * pixels, plane_stride: pixels, cold: false },
            ];
            let input = ConvInput::blocked(parts, n, h, w).unwrap();
            let planes = input.to_planes();
            for conv in variants(cin, cout, groups, k, stride, k / 2) {
                let (oh, ow) = conv.output_size(h, w).unwrap();
                let residual = values(n * cout * oh * ow, 4);
                let want = conv.run(&planes, n, h, w, Some(&residual));
                let close = |got: &[f32], want: &[f32], what: &str| {
                    assert_eq!(got.len(), want.len());
                    for (i, (a, b)) in got.iter().zip(want).enumerate() {
                        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{cin}->{cout} k{k} {h}x{w} {what}: [{i}] {a} vs {b}");
                    }
                };
                // The AVX2 tiles of stride 2 read the blocks in place wherever a tile of interior
                // columns fits.
                #[cfg(target_arch = "x86_64")]
                if stride == 2 && conv.reads_blocked() {
                    assert_eq!(conv.blocked_strided_tiles(&input).is_some(), w > 5, "{cin}->{cout} {h}x{w}");
                }
                close(&conv.run_input(&input, Some(&residual)), &want, "blocked in");
                if cout.is_multiple_of(BLOCK) {
                    let blocked_residual = input::planes_to_blocks(&residual, oh * ow);
                    let want = input::planes_to_blocks(&want, oh * ow);
                    close(&conv.run_input_blocked(&input, Some(&blocked_residual)), &want, "blocked in and out");
                    let from_planes = ConvInput::contiguous(&planes, n, cin, h, w);
                    close(&conv.run_input_blocked(&from_planes, Some(&blocked_residual)), &want, "blocked out");
                }
            }
        }
        // Channels that are not whole blocks, and a part too short for its blocks, are refused.
        let data = values(2 * 8 * 9, 1);
        let part = |channels: usize, image_stride: usize| InputPart { data: &data, channels, image_stride, plane_stride: 9, cold: false };
        assert!(ConvInput::blocked(vec![part(8, 72)], 2, 3, 3).is_some());
        assert!(ConvInput::blocked(vec![part(4, 72)], 2, 3, 3).is_none());
        assert!(ConvInput::blocked(vec![part(8, 80)], 2, 3, 3).is_none());
        let blocks = input::planes_to_blocks(&data, 9);
        assert_eq!(input::blocks_to_planes(&blocks, 9), data);
        assert_eq!(&blocks[..3], &[data[0], data[9], data[18]]);
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
    fn small_3x3_layers_on_large_outputs_match_with_the_pixels_in_the_lanes() {
        // At most 16 channels each way, outputs of 160x160 and more: the pixels go in the
        // lanes with AVX2 (Winograd checked beside them, `variants`); rows of 161 end in a
        // partial tile; the residual goes through the same stores.
        check(16, 8, 1, 3, 1, 1, 1, 160, 161);
        check(8, 16, 1, 3, 1, 1, 1, 161, 160);
        let spec = ConvSpec::square(16, 8, 1, 3, 1, 1, Activation::Silu);
        let packed_for = |isa| Conv2d::new(spec, values(8 * 16 * 9, 1), vec![0.0; 8]).unwrap().with_weights_packed_for(isa).unwrap();
        if Isa::Avx2.supported() {
            let conv = packed_for(Isa::Avx2);
            let tiles = conv.pixel_tiles_for(160, 160).expect("pixel tiles");
            assert!(tiles.rows_for(&conv.spec, 16 * 160 * 160, 160 * 160), "160x160 takes the rows");
            assert!(!tiles.rows_for(&conv.spec, 16 * 80 * 80, 80 * 80), "80x80 stays on Winograd");
        }
        if Isa::Avx512.supported() {
            let conv = packed_for(Isa::Avx512);
            let tiles = conv.pixel_tiles_for(160, 160).expect("pixel tiles");
            assert!(!tiles.rows_for(&conv.spec, 16 * 160 * 160, 160 * 160), "AVX-512 leaves 160x160 to Winograd");
        }
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
        check(24, 24, 24, 3, 1, 1, 2, 12, 37); // depthwise, rows in whole blocks of 4
        check(16, 16, 16, 7, 1, 3, 1, 8, 70); // depthwise 7x7, rows in whole blocks, wide rows
        // Depthwise rows 20, 40, 60, 80 and 160 wide: blocks of 2 to 5 vectors (1 or 2 with AVX2)
        // on planes too large for channels in the lanes, and small planes with them (AVX-512).
        for (h, w) in [(81, 20), (41, 40), (9, 60), (9, 80), (9, 160), (9, 20), (40, 40)] {
            check(4, 4, 4, 3, 1, 1, 1, h, w);
        }
        check(40, 40, 40, 7, 1, 3, 2, 20, 20); // depthwise 7x7 on small planes, channels past 32, batch 2
        check(16, 16, 16, 7, 1, 3, 1, 40, 40); // depthwise 7x7, rows of 40 in the lanes
        check(17, 17, 17, 3, 1, 1, 1, 6, 6); // depthwise, small planes not a multiple of a task's
        check(8, 8, 8, 9, 1, 4, 1, 12, 20); // depthwise 9x9: no block kernel for that side, rows by taps
        check(8, 8, 2, 3, 1, 1, 1, 6, 6); // grouped
        check(64, 128, 1, 3, 2, 1, 1, 5, 5); // small late layer: split channels
        check(128, 128, 1, 3, 2, 1, 1, 11, 9); // stride 2, many channels (AMX tiles where the CPU has them)
        check(256, 256, 1, 1, 1, 0, 1, 7, 9); // pointwise, many channels (AMX tiles where the CPU has them)
        check(24, 40, 1, 3, 1, 1, 2, 7, 21); // stride 1 in place: rows not a multiple of 16, batch 2
        check(70, 20, 1, 3, 1, 0, 1, 5, 19); // stride 1 without padding, k > one block of KC
        check(6, 10, 2, 5, 1, 2, 1, 9, 17); // stride 1, grouped, 5x5
        check(5, 9, 1, 3, 2, 0, 2, 12, 16); // stride 2 without padding: even columns in phase 0
        check(4, 6, 1, 3, 3, 1, 1, 10, 11); // stride 3
        check(8, 16, 1, 3, 1, 1, 2, 5, 32); // rows of whole panels, one product per row
        check(16, 20, 1, 3, 2, 1, 1, 9, 133); // stride 2 on a wide output (the stem's kernel with AVX-512)
    }

    #[test]
    fn stride_2_layers_of_up_to_64_channels_on_wide_outputs_run_as_the_stem_with_avx512() {
        if !Isa::Avx512.supported() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let packed = |cin: usize| {
            let spec = ConvSpec::square(cin, 32, 1, 3, 2, 1, Activation::Silu);
            Conv2d::new(spec, values(32 * cin * 9, 1), vec![0.0; 32]).unwrap().with_weights_packed_for(Isa::Avx512).unwrap()
        };
        for cin in [3, 16, 64] {
            // Where AMX tiles take a layer, they run it instead.
            assert_eq!(packed(cin).stem.is_some(), packed(cin).amx.is_none(), "{cin} input channels");
        }
        assert!(packed(128).stem.is_none(), "128 input channels stay on the pixel tiles");
        assert!(stem::Stem::takes(3, 20) && stem::Stem::takes(16, 160) && stem::Stem::takes(64, 80));
        assert!(!stem::Stem::takes(64, 40), "a 40-pixel output stays on the pixel tiles");
    }

    #[test]
    fn matches_the_definition_on_sixteen_threads() {
        // A machine with 16 cores splits the same layers into more, smaller tasks than 2 do:
        // tasks that begin in the padding, and more parts than channels.
        rayon::ThreadPoolBuilder::new().num_threads(16).build().unwrap().install(matches_the_definition);
    }
}
