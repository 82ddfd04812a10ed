//! Demuxing and decoding a video with FFmpeg while its bytes are still arriving.
//!
//! [`Decoder::open`] reads a [`BufferReader`] through custom I/O ([`avio`]) — the demuxer can
//! open nothing else: formats are whitelisted and the protocol whitelist is empty. Frames come
//! out of [`Decoder::next_frame`] in presentation order with their index and time; the selected
//! ones are converted once, by swscale, straight to the model's letterboxed input ([`convert`]).
//! Every call blocks on the buffer when bytes are missing; aborting the buffer wakes it.
//!
//! Nothing an upload holds may exhaust the process: only the allowed codecs are decoded (by
//! FFmpeg's probing too), FFmpeg's own `max_pixels` refuses pictures over the size limit before
//! it allocates them (in probing and in the decoder; see [`open`]), and every decoded frame is
//! checked again.

use ffmpeg_next::{self as ff, ffi};

use crate::ErrorCode;
use crate::buffer::{Buffer, BufferReader};
use crate::frame::{ModelFrame, Size};

mod avio;
pub mod convert;
mod headers;
mod open;

use avio::BufferIo;
use convert::{FrameConverter, Rotation};
use headers::SizeParser;
use open::{DECODER_WHITELIST, codec_allowed, max_pixels, open_input};

/// Which decoded frames are reported and converted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FrameSelection {
    All,
    /// Frames whose index is a multiple of N.
    Stride(u64),
    /// At most this many frames per second of presentation time.
    Fps(f64),
}

#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Model input width and height; selected frames are letterboxed to it.
    pub target: Size,
    pub selection: FrameSelection,
    /// Largest accepted coded width and height.
    pub max_dimensions: (u32, u32),
    /// Decoder threads (0: FFmpeg's choice).
    pub threads: usize,
    /// The input is unbounded (a pipe, a live encode): free the buffer's disk blocks behind the
    /// demuxer when its container never seeks back, so disk use stays bounded.
    pub live: bool,
    /// Stop after this many selected frames (the session's `max_frames`); enforced by whoever
    /// drives [`Decoder::next_frame`].
    pub max_frames: Option<u64>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { target: Size::new(640, 640), selection: FrameSelection::All, max_dimensions: (8192, 8192), threads: 0, live: false, max_frames: None }
    }
}

/// What the container and stream say, with dimensions as displayed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MediaInfo {
    pub container: String,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
}

impl MediaInfo {
    /// The usual file extension for this container (and codec, for Matroska/WebM), without the
    /// dot: the name a stored upload gets.
    pub fn file_extension(&self) -> &'static str {
        let format = self.container.split(',').next().unwrap_or_default();
        match format {
            "mov" => "mp4",
            "matroska" if matches!(self.codec.as_str(), "vp8" | "vp9" | "av1") => "webm",
            "matroska" => "mkv",
            "mpegts" => "ts",
            "h264" => "h264",
            "hevc" => "hevc",
            "m4v" => "m4v",
            "ivf" => "ivf",
            "avi" => "avi",
            "flv" => "flv",
            _ => "bin",
        }
    }
}

/// Why decoding stopped, in words a user understands.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a video this service can read ({0})")]
    UnsupportedMedia(String),
    #[error("the file has no video stream")]
    NoVideoStream,
    #[error("the video codec {0} is not supported")]
    UnsupportedCodec(String),
    #[error("the video is {width}x{height}, larger than the allowed {max_width}x{max_height}")]
    TooLarge { width: u32, height: u32, max_width: u32, max_height: u32 },
    /// The decoder refused a picture over the limit without saying its size (VP8, VP9, MPEG-4,
    /// MJPEG and AV1 decoders reset or keep their old size when they refuse one).
    #[error("a frame of the video is larger than the allowed {max_width}x{max_height}")]
    FrameTooLarge { max_width: u32, max_height: u32 },
    #[error("the file ends early: {0}")]
    Truncated(String),
    #[error("decoding was cancelled")]
    Cancelled,
    #[error("decoder failure: {0}")]
    Internal(String),
}

impl DecodeError {
    /// The error code of the event protocol.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedMedia(_) => ErrorCode::UnsupportedMedia,
            DecodeError::NoVideoStream => ErrorCode::NoVideoStream,
            DecodeError::UnsupportedCodec(_) => ErrorCode::UnsupportedCodec,
            DecodeError::TooLarge { .. } | DecodeError::FrameTooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::Truncated(_) => ErrorCode::Truncated,
            DecodeError::Cancelled => ErrorCode::Internal,
            DecodeError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// One decoded frame that the selection kept.
#[derive(Debug, Clone)]
pub struct SelectedFrame {
    /// Position in presentation order among all decoded frames, from 0.
    pub index: u64,
    /// Seconds from the stream's first frame.
    pub pts: f64,
    pub keyframe: bool,
    /// The frame letterboxed to the model input.
    pub model_frame: ModelFrame,
}

/// Counters for the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecodeStats {
    /// Every decoded frame.
    pub frames: u64,
    /// Frames the selection kept.
    pub selected: u64,
    /// Packets the decoder rejected (skipped; decoding went on).
    pub corrupt_packets: u64,
}

/// A video being decoded from a buffer. Field order is drop order: the codec, then the format
/// context, then the I/O it reads through.
pub struct Decoder {
    decoder: ff::decoder::Video,
    input: ff::format::context::Input,
    _io: BufferIo,
    buffer: Buffer,
    stream_index: usize,
    time_base: f64,
    start_pts: Option<i64>,
    media: MediaInfo,
    converter: FrameConverter,
    options: DecodeOptions,
    stats: DecodeStats,
    /// Frames the container declares (0: unknown), to recognise a file cut short.
    declared_frames: u64,
    last_fps_bucket: Option<i64>,
    demux_done: bool,
    flushed: bool,
    pending_error: Option<DecodeError>,
    /// Whether consumed bytes are discarded (live input over a forward-only container).
    discard_consumed: bool,
    /// A frame decoded while opening (to learn the size), not yet delivered.
    primed: Option<ff::frame::Video>,
    /// Reads the size each H.264/HEVC packet announces before the decoder sees it.
    size_parser: Option<SizeParser>,
}

/// Bytes kept behind the demuxer's furthest read when discarding: FFmpeg may re-read within its
/// own I/O buffer and probe window.
const DISCARD_MARGIN: u64 = 4 << 20;
/// Discard in steps of at least this much, so each punch-hole call frees a useful range.
const DISCARD_STEP: u64 = 1 << 20;

fn ff_error_text(err: ff::Error) -> String {
    err.to_string()
}

impl Decoder {
    /// Probes the container and opens the best video stream. Blocks while the bytes it needs
    /// have not arrived; fails with [`DecodeError::Cancelled`] if the buffer is aborted.
    pub fn open(reader: BufferReader, options: DecodeOptions) -> Result<Self, DecodeError> {
        ff::init().map_err(|e| DecodeError::Internal(ff_error_text(e)))?;
        // FFmpeg's own log lines would go to stderr for every damaged packet; errors reach the
        // caller as values instead.
        ff::util::log::set_level(ff::util::log::Level::Fatal);
        let buffer = reader.buffer();
        let io = BufferIo::new(reader).ok_or_else(|| DecodeError::Internal("out of memory".into()))?;
        let input = open_input(&io, &buffer, options.max_dimensions)?;
        let stream = input.streams().best(ff::media::Type::Video).ok_or(DecodeError::NoVideoStream)?;
        let stream_index = stream.index();
        let parameters = stream.parameters();
        let codec_id = parameters.id();
        let codec_name = codec_id.name().to_string();
        if !codec_allowed(codec_id) {
            return Err(DecodeError::UnsupportedCodec(codec_name));
        }
        // The decoder this FFmpeg build picks for the codec must be an allowed one too.
        let codec = ff::decoder::find(codec_id)
            .filter(|codec| DECODER_WHITELIST.split(',').any(|name| name == codec.name()))
            .ok_or_else(|| DecodeError::UnsupportedCodec(format!("{codec_name} (no allowed decoder in this FFmpeg)")))?;
        // SAFETY: `parameters` wraps the stream's live AVCodecParameters, whose extradata holds
        // `extradata_size` bytes when it is not null.
        let (width, height, size_parser) = unsafe {
            let par = &*parameters.as_ptr();
            let extradata = match par.extradata.is_null() {
                true => &[][..],
                false => std::slice::from_raw_parts(par.extradata, par.extradata_size.max(0) as usize),
            };
            (par.width, par.height, SizeParser::new(codec_id, extradata))
        };
        // Zero when probing did not decode the stream (see `open_input`): the first frame tells.
        let (width, height) = (width.max(0) as u32, height.max(0) as u32);
        let mut context = ff::codec::context::Context::from_parameters(parameters).map_err(|e| DecodeError::Internal(ff_error_text(e)))?;
        context.set_threading(ff::threading::Config { kind: ff::threading::Type::Frame, count: options.threads, ..Default::default() });
        // FFmpeg refuses a picture over `max_pixels` before it allocates it; the decoder then
        // fails, which `refused_size` recognises.
        let mut codec_options = ff::Dictionary::new();
        codec_options.set("max_pixels", &max_pixels(options.max_dimensions).to_string());
        codec_options.set("codec_whitelist", DECODER_WHITELIST);
        let decoder = context
            .decoder()
            .open_as_with(codec, codec_options)
            .and_then(|opened| opened.video())
            .map_err(|e| DecodeError::UnsupportedCodec(format!("{codec_name} ({e})")))?;
        let rotation = Rotation::of_stream(&stream);
        let (display_w, display_h) = rotation.displayed(width, height);
        // The average rate when the container states it (MP4, Matroska), else the stream's base
        // rate (MPEG-TS, raw streams).
        let rate = [stream.avg_frame_rate(), stream.rate()].into_iter().find(|r| r.numerator() > 0 && r.denominator() > 0);
        let fps = rate.map_or(0.0, f64::from);
        let time_base = f64::from(stream.time_base());
        // AVI counts empty chunks, which mark a dropped or repeated frame (ffmpeg writes them to
        // keep audio in sync), among its frames: its count says nothing about truncation.
        let declared_frames = match input.format().name() {
            "avi" => 0,
            _ => u64::try_from(stream.frames()).unwrap_or(0),
        };
        let start = stream.start_time();
        let start_pts = (start != ffi::AV_NOPTS_VALUE).then_some(start);
        let media = MediaInfo {
            container: input.format().name().to_string(),
            codec: codec_name,
            width: display_w,
            height: display_h,
            fps: (fps * 1000.0).round() / 1000.0,
        };
        let converter = FrameConverter::new((options.target.width, options.target.height), rotation);
        // The mov demuxer reads samples by offset and may go back; the others read forward.
        let discard_consumed = options.live && !media.container.starts_with("mov");
        let mut decoder = Decoder {
            decoder,
            input,
            _io: io,
            buffer,
            stream_index,
            time_base,
            start_pts,
            media,
            converter,
            options,
            stats: DecodeStats::default(),
            declared_frames,
            last_fps_bucket: None,
            demux_done: false,
            flushed: false,
            pending_error: None,
            discard_consumed,
            primed: None,
            size_parser,
        };
        if width == 0 || height == 0 {
            let (w, h) = decoder.prime()?;
            (decoder.media.width, decoder.media.height) = rotation.displayed(w, h);
        }
        Ok(decoder)
    }

    pub fn media(&self) -> &MediaInfo {
        &self.media
    }

    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// The buffer this decoder reads; aborting it cancels a blocked call.
    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }

    /// The next selected frame, `None` at the end. Frames before damage are returned first;
    /// the damage is the error of the call after them. A frame over the size limit ends
    /// decoding with [`DecodeError::TooLarge`] (or [`DecodeError::FrameTooLarge`]).
    pub fn next_frame(&mut self) -> Result<Option<SelectedFrame>, DecodeError> {
        loop {
            let frame = match self.primed.take() {
                Some(frame) => frame,
                None => match self.next_decoded()? {
                    Some(frame) => frame,
                    None => return self.finish(),
                },
            };
            if let Some(selected) = self.on_frame(&frame)? {
                return Ok(Some(selected));
            }
        }
    }

    /// Decodes the first frame of a stream whose size only its frames tell; the first
    /// `next_frame` delivers it.
    fn prime(&mut self) -> Result<(u32, u32), DecodeError> {
        match self.next_decoded()? {
            Some(frame) => {
                let size = (frame.width(), frame.height());
                self.primed = Some(frame);
                Ok(size)
            }
            None => {
                self.finish()?;
                Err(DecodeError::UnsupportedMedia("the video stream states no size and holds no decodable frame".into()))
            }
        }
    }

    /// The next decoded frame within the size limit, `None` at the end of the stream.
    fn next_decoded(&mut self) -> Result<Option<ff::frame::Video>, DecodeError> {
        let mut frame = ff::frame::Video::empty();
        loop {
            match self.decoder.receive_frame(&mut frame) {
                Ok(()) => {
                    self.check_frame_size(&frame)?;
                    return Ok(Some(frame));
                }
                Err(ff::Error::Eof) => return Ok(None),
                Err(ff::Error::Other { errno }) if errno == libc::EAGAIN => {}
                Err(err) => {
                    self.decoder_failed(err)?;
                    continue;
                }
            }
            if self.demux_done {
                if self.flushed {
                    return Ok(None);
                }
                self.flushed = true;
                // Draining may decode what the decoder still holds, and fail the same ways.
                if let Err(err) = self.decoder.send_eof() {
                    self.decoder_failed(err)?;
                }
                continue;
            }
            self.feed_packet()?;
        }
    }

    /// Every decoded frame is held to the limit: a stream may change its size at any
    /// keyframe (a new SPS, a VP9 keyframe, each MJPEG picture), and the headers and probing
    /// saw only the first one. Nothing over the limit reaches the converter or the model.
    fn check_frame_size(&self, frame: &ff::frame::Video) -> Result<(), DecodeError> {
        let (max_width, max_height) = self.options.max_dimensions;
        let (width, height) = (frame.width(), frame.height());
        if width > max_width || height > max_height {
            return Err(DecodeError::TooLarge { width, height, max_width, max_height });
        }
        Ok(())
    }

    /// The decoder refused a packet or a frame: a picture over the size limit ends decoding
    /// (after the frames decoded before it), damaged data is counted and skipped, anything
    /// else is a failure.
    fn decoder_failed(&mut self, err: ff::Error) -> Result<(), DecodeError> {
        if let Some(too_large) = self.refused_size(err) {
            self.pending_error.get_or_insert(too_large);
            self.demux_done = true;
            return Ok(());
        }
        match err {
            // Damaged data: decoders say it as invalid data, and some (VP9 on a spliced
            // keyframe) as an invalid argument. Either way it is the client's bytes, not our
            // fault: skip the packet, as a player would.
            ff::Error::InvalidData => {
                self.stats.corrupt_packets += 1;
                Ok(())
            }
            ff::Error::Other { errno } if errno == libc::EINVAL => {
                self.stats.corrupt_packets += 1;
                Ok(())
            }
            err => Err(DecodeError::Internal(ff_error_text(err))),
        }
    }

    /// Whether the decoder's error is its `max_pixels` refusing a picture. Decoders report it
    /// in their own ways (measured with FFmpeg 5.1): H.264 (invalid data) and HEVC (out of
    /// memory) keep the refused size in the codec context (their packets are usually refused
    /// before, by `announced_too_large`); VP8, VP9, MPEG-4 and MJPEG reset the context to 0x0
    /// and return EINVAL (`ff_set_dimensions`); libdav1d returns ERANGE for a frame over its
    /// frame size limit, which FFmpeg sets from `max_pixels`.
    fn refused_size(&self, err: ff::Error) -> Option<DecodeError> {
        let (max_width, max_height) = self.options.max_dimensions;
        let (width, height) = (self.decoder.width(), self.decoder.height());
        if width > max_width || height > max_height {
            return Some(DecodeError::TooLarge { width, height, max_width, max_height });
        }
        let ff::Error::Other { errno } = err else { return None };
        let refused = (errno == libc::EINVAL && (width == 0 || height == 0)) || errno == libc::ERANGE;
        refused.then_some(DecodeError::FrameTooLarge { max_width, max_height })
    }

    /// A packet whose parameter sets announce pictures over the size limit (H.264 and HEVC,
    /// see [`headers`]): it never reaches the decoder.
    fn announced_too_large(&mut self, packet: &ff::Packet) -> Option<DecodeError> {
        let (width, height) = self.size_parser.as_mut()?.size(packet)?;
        let (max_width, max_height) = self.options.max_dimensions;
        (width > max_width || height > max_height).then_some(DecodeError::TooLarge { width, height, max_width, max_height })
    }

    /// The end of the frames: a pending error, or a file that holds fewer frames than its
    /// header declared, is reported once.
    fn finish(&mut self) -> Result<Option<SelectedFrame>, DecodeError> {
        if let Some(err) = self.pending_error.take() {
            return Err(err);
        }
        let seen = self.stats.frames + self.stats.corrupt_packets;
        if self.declared_frames > 0 && seen < self.declared_frames {
            let declared = std::mem::take(&mut self.declared_frames);
            return Err(DecodeError::Truncated(format!("the container declares {declared} frames, the data holds {}", self.stats.frames)));
        }
        Ok(None)
    }

    /// Reads one packet of our stream (or finds the end) and gives it to the decoder.
    fn feed_packet(&mut self) -> Result<(), DecodeError> {
        loop {
            // A packet per read: `av_read_frame` overwrites a packet without releasing what it
            // held, so reusing one would leak every packet of the other streams skipped here.
            let mut packet = ff::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {
                    if self.discard_consumed {
                        let behind = self.buffer.furthest_read().saturating_sub(DISCARD_MARGIN);
                        if behind >= self.buffer.discarded_before() + DISCARD_STEP {
                            // Disk space is an optimisation here: a failed punch costs nothing else.
                            let _ = self.buffer.discard_before(behind);
                        }
                    }
                    if packet.stream() != self.stream_index {
                        continue;
                    }
                    if let Some(too_large) = self.announced_too_large(&packet) {
                        // The frames decoded before it still come out; then the error.
                        self.pending_error.get_or_insert(too_large);
                        self.demux_done = true;
                        return Ok(());
                    }
                    match self.decoder.send_packet(&packet) {
                        Ok(()) => {}
                        Err(ff::Error::Other { errno }) if errno == libc::EAGAIN => {
                            // The decoder is full; it must be drained first. Not expected, as we
                            // drain after every packet, but never lose the packet silently.
                            self.stats.corrupt_packets += 1;
                        }
                        Err(err) => self.decoder_failed(err)?,
                    }
                    return Ok(());
                }
                Err(ff::Error::Eof) => {
                    self.demux_done = true;
                    return Ok(());
                }
                Err(ff::Error::Exit) => return Err(DecodeError::Cancelled),
                Err(err) => {
                    if self.buffer.write_state() == crate::buffer::WriteState::Aborted {
                        return Err(DecodeError::Cancelled);
                    }
                    // The container is damaged or cut short: deliver what the decoder holds,
                    // then report it.
                    self.demux_done = true;
                    self.pending_error = Some(DecodeError::Truncated(ff_error_text(err)));
                    return Ok(());
                }
            }
        }
    }

    fn on_frame(&mut self, frame: &ff::frame::Video) -> Result<Option<SelectedFrame>, DecodeError> {
        let index = self.stats.frames;
        self.stats.frames += 1;
        let pts = match frame.timestamp() {
            Some(ts) => (ts - self.start_pts.unwrap_or(0)) as f64 * self.time_base,
            None if self.media.fps > 0.0 => index as f64 / self.media.fps,
            None => 0.0,
        };
        let pts = pts.max(0.0);
        let keep = match self.options.selection {
            FrameSelection::All => true,
            FrameSelection::Stride(n) => index.is_multiple_of(n.max(1)),
            FrameSelection::Fps(fps) => {
                // One frame per 1/fps slot of presentation time (a small tolerance absorbs
                // timestamp rounding).
                let bucket = ((pts + 1e-6) * fps).floor() as i64;
                if self.last_fps_bucket.is_some_and(|b| b >= bucket) {
                    false
                } else {
                    self.last_fps_bucket = Some(bucket);
                    true
                }
            }
        };
        if !keep {
            return Ok(None);
        }
        self.stats.selected += 1;
        let model_frame = self.converter.convert(frame)?;
        Ok(Some(SelectedFrame { index, pts: (pts * 1e6).round() / 1e6, keyframe: frame.is_key(), model_frame }))
    }
}

#[cfg(test)]
mod tests {
    use super::MediaInfo;

    #[test]
    fn stored_uploads_get_the_extension_of_their_container() {
        let media = |container: &str, codec: &str| MediaInfo { container: container.into(), codec: codec.into(), width: 1, height: 1, fps: 1.0 };
        assert_eq!(media("mov,mp4,m4a,3gp,3g2,mj2", "h264").file_extension(), "mp4");
        assert_eq!(media("matroska,webm", "vp9").file_extension(), "webm");
        assert_eq!(media("matroska,webm", "h264").file_extension(), "mkv");
        assert_eq!(media("mpegts", "h264").file_extension(), "ts");
        assert_eq!(media("h264", "h264").file_extension(), "h264");
        assert_eq!(media("avi", "mpeg4").file_extension(), "avi");
        assert_eq!(media("flv", "h264").file_extension(), "flv");
    }
}
