//! A convolution's input read where it lies: the channels of one or more tensors, one after
//! another (a concatenation along channels that is never copied).

/// One tensor whose channels are part of a convolution's input: image `b`'s channel `c` is the
/// `h * w` floats at `b * image_stride + c * plane_stride` of `data`.
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
        (!parts.is_empty() && parts.iter().all(fits)).then_some(ConvInput { parts, n, h, w })
    }

    /// One row-major tensor.
    pub fn contiguous(data: &'a [f32], n: usize, channels: usize, h: usize, w: usize) -> Self {
        ConvInput { parts: vec![InputPart { data, channels, image_stride: channels * h * w, plane_stride: h * w, cold: false }], n, h, w }
    }

    pub fn channels(&self) -> usize {
        self.parts.iter().map(|p| p.channels).sum()
    }

    /// Channel `c` of image `b`.
    pub(super) fn plane(&self, b: usize, mut c: usize) -> &'a [f32] {
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
            for c in 0..part.channels {
                fetch_into_l2(&part.data[b * part.image_stride + c * part.plane_stride..][pixels.clone()]);
            }
        }
    }

    /// Asks the CPU to bring `pixels` (clamped to the plane) of every channel plane of image `b`
    /// into its L2 cache, without waiting for them.
    pub(super) fn fetch(&self, b: usize, pixels: std::ops::Range<usize>) {
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
