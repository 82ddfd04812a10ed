//! A convolution's input read where it lies: the channels of one or more tensors, one after
//! another (a concatenation along channels that is never copied).

/// Channels per block of a tensor in [`ChannelLayout::Blocked`]: one AVX2 register.
pub const BLOCK: usize = 8;

/// How the channels of a `[n, c, h, w]` tensor lie in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelLayout {
    /// `[n][c][h][w]`: each channel a plane of pixels, planes `plane_stride` apart.
    Planes,
    /// `[n][c / 8][h][w][8]`: blocks of [`BLOCK`] channels (`c` a multiple of 8), each pixel's 8
    /// values side by side, blocks `8 * plane_stride` apart. A pointwise convolution's tile reads
    /// the 8 channels of its pixels from one stretch of memory and stores its sums whole, where
    /// planes scatter both over as many lines as channels.
    Blocked,
}

/// One tensor whose channels are part of a convolution's input: image `b`'s channel `c` is the
/// `h * w` floats at `b * image_stride + c * plane_stride` of `data` (in
/// [`ChannelLayout::Planes`]; in blocks, see [`ConvInput::blocked`]).
#[derive(Debug, Clone, Copy)]
pub struct InputPart<'a> {
    pub data: &'a [f32],
    pub channels: usize,
    pub image_stride: usize,
    /// At least `h * w`: planes may lie further apart than their size
    /// ([`spread_plane_pitch`](super::super::cache::spread_plane_pitch)).
    pub plane_stride: usize,
    /// Written long enough ago to have left the cores' L2 caches (a skip connection's tensor,
    /// made many layers before): the kernels fetch it ahead of use. A hint only: a wrong value
    /// costs time, never changes a result.
    pub cold: bool,
}

/// A convolution's input, `[n][channels][h][w]`, as the channels of one or more tensors one
/// after another: a concatenation along channels that the convolution reads where its parts
/// lie, instead of a copy made for it.
#[derive(Debug, Clone)]
pub struct ConvInput<'a> {
    parts: Vec<InputPart<'a>>,
    pub(super) n: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    layout: ChannelLayout,
}

impl<'a> ConvInput<'a> {
    /// The parts' channels, in order; `None` when a part's planes are closer than `h * w` or
    /// the part is too short for `n` images of them, or when there is no part.
    pub fn new(parts: Vec<InputPart<'a>>, n: usize, h: usize, w: usize) -> Option<Self> {
        // One past the last float of the last plane (of a part with images and channels).
        let end = |p: &InputPart| -> Option<usize> {
            let last_image = (n - 1).checked_mul(p.image_stride)?;
            let last_plane = (p.channels - 1).checked_mul(p.plane_stride)?;
            last_image.checked_add(last_plane)?.checked_add(h * w)
        };
        let fits = |p: &InputPart| p.plane_stride >= h * w && (n == 0 || p.channels * h * w == 0 || end(p).is_some_and(|end| end <= p.data.len()));
        (!parts.is_empty() && parts.iter().all(fits)).then_some(ConvInput { parts, n, h, w, layout: ChannelLayout::Planes })
    }

    /// The parts' channels, in order, each part in [`ChannelLayout::Blocked`]: image `b`'s
    /// channel `c` at pixel `p` is float `b * image_stride + (c / 8) * 8 * plane_stride + 8 p +
    /// c % 8` of its `data`. `None` when a part's channels are not whole blocks, its blocks are
    /// closer than `8 * h * w`, or it is too short for `n` images of them, or when there is no
    /// part.
    pub fn blocked(parts: Vec<InputPart<'a>>, n: usize, h: usize, w: usize) -> Option<Self> {
        let end = |p: &InputPart| -> Option<usize> {
            let last_image = (n - 1).checked_mul(p.image_stride)?;
            let last_block = (p.channels / BLOCK - 1).checked_mul(BLOCK * p.plane_stride)?;
            last_image.checked_add(last_block)?.checked_add(BLOCK * h * w)
        };
        let fits = |p: &InputPart| {
            p.channels.is_multiple_of(BLOCK) && p.plane_stride >= h * w && (n == 0 || p.channels * h * w == 0 || end(p).is_some_and(|end| end <= p.data.len()))
        };
        (!parts.is_empty() && parts.iter().all(fits)).then_some(ConvInput { parts, n, h, w, layout: ChannelLayout::Blocked })
    }

    /// One row-major tensor.
    pub fn contiguous(data: &'a [f32], n: usize, channels: usize, h: usize, w: usize) -> Self {
        ConvInput {
            parts: vec![InputPart { data, channels, image_stride: channels * h * w, plane_stride: h * w, cold: false }],
            n,
            h,
            w,
            layout: ChannelLayout::Planes,
        }
    }

    pub fn layout(&self) -> ChannelLayout {
        self.layout
    }

    /// Where channel `c` of image `b` starts: its plane, or (in blocks) its lane of pixel 0's
    /// block; the next pixel is 1 float on (8 in blocks).
    pub(super) fn channel_start(&self, b: usize, mut c: usize) -> *const f32 {
        for part in &self.parts {
            if c < part.channels {
                let at = match self.layout {
                    ChannelLayout::Planes => b * part.image_stride + c * part.plane_stride,
                    ChannelLayout::Blocked => b * part.image_stride + (c - c % BLOCK) * part.plane_stride + c % BLOCK,
                };
                return part.data[at..].as_ptr();
            }
            c -= part.channels;
        }
        panic!("channel past the input's channels");
    }

    /// The block of channels `c .. c + 8` of image `b` (in [`ChannelLayout::Blocked`], `c` a
    /// multiple of 8): `h * w` pixels of 8 floats.
    pub(super) fn block(&self, b: usize, mut c: usize) -> &'a [f32] {
        assert!(self.layout == ChannelLayout::Blocked && c.is_multiple_of(BLOCK), "a block of a blocked input");
        for part in &self.parts {
            if c < part.channels {
                return &part.data[b * part.image_stride + c * part.plane_stride..][..BLOCK * self.h * self.w];
            }
            c -= part.channels;
        }
        panic!("channel past the input's channels");
    }

    /// The input in [`ChannelLayout::Planes`], packed: `[n][channels][h * w]`.
    pub(super) fn to_planes(&self) -> Vec<f32> {
        let (channels, pixels) = (self.channels(), self.h * self.w);
        match self.layout {
            ChannelLayout::Planes => self.to_contiguous().into_owned(),
            ChannelLayout::Blocked => {
                let mut out = Vec::with_capacity(self.n * channels * pixels);
                for b in 0..self.n {
                    for part in &self.parts {
                        for c in 0..part.channels {
                            let block = &part.data[b * part.image_stride + (c - c % BLOCK) * part.plane_stride..][..BLOCK * pixels];
                            out.extend(block.iter().skip(c % BLOCK).step_by(BLOCK));
                        }
                    }
                }
                out
            }
        }
    }

    pub fn channels(&self) -> usize {
        self.parts.iter().map(|p| p.channels).sum()
    }

    /// Channel `c` of image `b` from its first pixel, and the floats from one pixel to the
    /// next: its plane and 1, or (in blocks) its block from the channel's lane and 8.
    pub(super) fn channel(&self, b: usize, c: usize) -> (&'a [f32], usize) {
        match self.layout {
            ChannelLayout::Planes => (self.plane(b, c), 1),
            ChannelLayout::Blocked => (&self.block(b, c - c % BLOCK)[c % BLOCK..], BLOCK),
        }
    }

    /// Channel `c` of image `b` (in [`ChannelLayout::Planes`]).
    pub(super) fn plane(&self, b: usize, mut c: usize) -> &'a [f32] {
        assert_eq!(self.layout, ChannelLayout::Planes, "a plane of a blocked input");
        let plane = self.h * self.w;
        for part in &self.parts {
            if c < part.channels {
                return &part.data[b * part.image_stride + c * part.plane_stride..][..plane];
            }
            c -= part.channels;
        }
        panic!("channel past the input's channels");
    }

    /// Asks the CPU to bring `pixels` (clamped to the plane) of image `b`'s cold channel planes
    /// ([`InputPart::cold`]) into its L2 cache, without waiting for them.
    pub(super) fn fetch_cold(&self, b: usize, pixels: std::ops::Range<usize>) {
        let plane = self.h * self.w;
        let pixels = pixels.start.min(plane)..pixels.end.min(plane);
        for part in self.parts.iter().filter(|part| part.cold) {
            match self.layout {
                ChannelLayout::Planes => {
                    for c in 0..part.channels {
                        fetch_into_l2(&part.data[b * part.image_stride + c * part.plane_stride..][pixels.clone()]);
                    }
                }
                ChannelLayout::Blocked => {
                    let floats = BLOCK * pixels.start..BLOCK * pixels.end;
                    for c in (0..part.channels).step_by(BLOCK) {
                        fetch_into_l2(&part.data[b * part.image_stride + c * part.plane_stride..][floats.clone()]);
                    }
                }
            }
        }
    }

    /// Asks the CPU to bring `pixels` (clamped to the plane) of every channel plane of image `b`
    /// into its L2 cache, without waiting for them.
    pub(super) fn fetch(&self, b: usize, pixels: std::ops::Range<usize>) {
        assert_eq!(self.layout, ChannelLayout::Planes, "planes of a blocked input");
        let plane = self.h * self.w;
        let pixels = pixels.start.min(plane)..pixels.end.min(plane);
        for part in &self.parts {
            for c in 0..part.channels {
                fetch_into_l2(&part.data[b * part.image_stride + c * part.plane_stride..][pixels.clone()]);
            }
        }
    }

    /// The input as one row-major buffer: borrowed when it is one, gathered otherwise.
    pub(super) fn to_contiguous(&self) -> std::borrow::Cow<'a, [f32]> {
        assert_eq!(self.layout, ChannelLayout::Planes, "planes of a blocked input");
        let channels = self.channels();
        let plane = self.h * self.w;
        match self.parts.as_slice() {
            [part] if part.image_stride == channels * plane && part.plane_stride == plane => {
                std::borrow::Cow::Borrowed(&part.data[..self.n * channels * plane])
            }
            _ => std::borrow::Cow::Owned((0..self.n).flat_map(|b| (0..channels).flat_map(move |c| self.plane(b, c).iter().copied())).collect()),
        }
    }
}

/// `planes` (channel planes of `pixels` floats, whole blocks of them) in
/// [`ChannelLayout::Blocked`].
pub(super) fn planes_to_blocks(planes: &[f32], pixels: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; planes.len()];
    for (blocks, planes) in out.chunks_exact_mut(BLOCK * pixels.max(1)).zip(planes.chunks_exact(BLOCK * pixels.max(1))) {
        for (c, plane) in planes.chunks_exact(pixels).enumerate() {
            for (value, pixel) in plane.iter().zip(blocks[c..].iter_mut().step_by(BLOCK)) {
                *pixel = *value;
            }
        }
    }
    out
}

/// `blocks` ([`ChannelLayout::Blocked`], of `pixels` pixels) as channel planes.
pub(super) fn blocks_to_planes(blocks: &[f32], pixels: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len());
    for block in blocks.chunks_exact(BLOCK * pixels.max(1)) {
        for c in 0..BLOCK {
            out.extend(block.iter().skip(c).step_by(BLOCK));
        }
    }
    out
}

/// Asks the CPU to bring `floats` into its L2 cache, a line at a time, without waiting.
fn fetch_into_l2(floats: &[f32]) {
    const LINE_FLOATS: usize = 16;
    #[cfg(target_arch = "x86_64")]
    for line in floats.chunks(LINE_FLOATS) {
        // SAFETY: a prefetch reads nothing into the program and never faults; the address is
        // inside `floats` all the same.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (floats, LINE_FLOATS);
}
