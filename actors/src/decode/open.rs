//! Opening a container over the growing buffer: which demuxers and decoders may run, and the
//! size limits set before stream probing decodes anything.

use std::ffi::{CString, c_void};

use ffmpeg_next::{self as ff, ffi};

use super::avio::BufferIo;
use super::{DecodeError, ff_error_text};
use crate::buffer::Buffer;

/// Containers the demuxer may recognise (libavformat demuxer names).
const FORMAT_WHITELIST: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,mpegts,h264,hevc,m4v,ivf,avi,flv";

/// The video decoders (FFmpeg decoder names, not codec names) of the README's codecs. AV1 is
/// decoded by whichever of libdav1d (Debian's choice), libaom or the native decoder the FFmpeg
/// build registers first.
macro_rules! video_decoders {
    () => {
        "h264,hevc,vp8,vp9,libdav1d,libaom-av1,av1,mpeg4,mjpeg"
    };
}

/// The decoders our own decoder may be.
pub(super) const DECODER_WHITELIST: &str = video_decoders!();

/// The decoders FFmpeg's probing may open: the video ones, and the usual audio decoders of the
/// accepted containers. Probing opens an audio decoder only to learn a stream's channel count
/// or frame size; without it, it reads a whole `analyzeduration` (1 s of media) more before
/// the first frame of any file with audio (measured: MP4 and WebM read 6-8 times the bytes).
/// Audio is never decoded after that.
const PROBE_DECODERS: &str = concat!(
    video_decoders!(),
    ",aac,mp3float,mp3,mp2float,mp2,opus,vorbis,ac3,eac3,flac,alac,amrnb,amrwb",
    ",pcm_s16le,pcm_s16be,pcm_s24le,pcm_s24be,pcm_f32le,pcm_u8,pcm_mulaw,pcm_alaw"
);

/// A decoder whitelist that matches no decoder: probing of containers whose streams appear
/// only while packets are read (see `open_input`).
const NO_DECODER: &std::ffi::CStr = c"none";

/// How much media (microseconds) probing analyses when it opens no decoder.
const NO_DECODER_ANALYZE_US: i64 = 250_000;

/// The codecs decoded: H.264, HEVC, VP8, VP9, AV1, MPEG-4 Part 2 and MJPEG.
pub(super) fn codec_allowed(id: ff::codec::Id) -> bool {
    use ff::codec::Id;
    matches!(id, Id::H264 | Id::HEVC | Id::VP8 | Id::VP9 | Id::AV1 | Id::MPEG4 | Id::MJPEG)
}

/// FFmpeg's `max_pixels` for a size limit. FFmpeg compares it with the width rounded up to its
/// stride alignment (64 at most) in some places, so the width is rounded up too: a frame within
/// the limit is never refused; the exact limit is checked on every decoded frame.
pub(super) fn max_pixels(max: (u32, u32)) -> i64 {
    (u64::from(max.0).next_multiple_of(64) * u64::from(max.1)).min(i64::MAX as u64) as i64
}

/// Refuses any video stream larger than `max`, before a decoder allocates frames for it.
fn check_dimensions(input: &ff::format::context::Input, max: (u32, u32)) -> Result<(), DecodeError> {
    for stream in input.streams() {
        let parameters = stream.parameters();
        if parameters.medium() != ff::media::Type::Video {
            continue;
        }
        // SAFETY: `parameters` wraps the stream's live AVCodecParameters.
        let (w, h) = unsafe { ((*parameters.as_ptr()).width, (*parameters.as_ptr()).height) };
        let (w, h) = (w.max(0) as u32, h.max(0) as u32);
        if w > max.0 || h > max.1 {
            return Err(DecodeError::TooLarge { width: w, height: h, max_width: max.0, max_height: max.1 });
        }
    }
    Ok(())
}

/// Opens the format context over our I/O with the whitelists set, and reads stream information
/// unless a declared size is over the limit.
pub(super) fn open_input(io: &BufferIo, buffer: &Buffer, max_dimensions: (u32, u32)) -> Result<ff::format::context::Input, DecodeError> {
    let mut options = ff::Dictionary::new();
    options.set("format_whitelist", FORMAT_WHITELIST);
    // Nothing may be opened by name: no file, no URL, whatever a playlist says.
    options.set("protocol_whitelist", "");
    // Probing opens decoders to learn what headers do not say: only the allowed ones.
    options.set("codec_whitelist", PROBE_DECODERS);
    // Probing reads frames until it has estimated a frame rate and analysed 5 s of media —
    // for a raw H.264/HEVC stream or a short clip, most of the upload before the first frame.
    // Containers state their timing; a second of analysis finds every codec's parameters.
    options.set("fpsprobesize", "0");
    options.set("analyzeduration", "1000000");
    let limit = CString::new(max_pixels(max_dimensions).to_string()).expect("digits hold no NUL");
    // SAFETY: plain FFI construction of a format context that reads only through `io`. On
    // failure avformat_open_input frees the context (not the custom I/O, which `io` owns);
    // once wrapped in `Input`, the context is closed when `input` drops, on every return.
    unsafe {
        let mut ctx = ffi::avformat_alloc_context();
        if ctx.is_null() {
            return Err(DecodeError::Internal("out of memory".into()));
        }
        (*ctx).pb = io.as_ptr();
        (*ctx).flags |= ffi::AVFMT_FLAG_CUSTOM_IO;
        let mut dict = options.disown();
        let empty = CString::default();
        let rc = ffi::avformat_open_input(&mut ctx, empty.as_ptr(), std::ptr::null_mut(), &mut dict);
        ff::Dictionary::own(dict);
        if rc < 0 {
            return Err(open_error(rc, buffer));
        }
        let input = ff::format::context::Input::wrap(ctx);
        // Headers declare sizes before any frame exists: refuse absurd ones before probing
        // decodes anything, then again for streams whose size only probing reveals.
        check_dimensions(&input, max_dimensions)?;
        // Probing's decoders get `max_pixels` through per-stream options, which FFmpeg applies
        // only to the streams that exist now. FLV creates its streams while packets are read,
        // and MPEG-TS may add streams or find a stream's codec by its content; for these
        // formats probing opens no decoder at all, and `Decoder::open` learns the size from
        // the first frame of its own decoder, which has the limit.
        if (*ctx).ctx_flags & ffi::AVFMTCTX_NOHEADER != 0 {
            let rc = ffi::av_opt_set(ctx as *mut c_void, c"codec_whitelist".as_ptr(), NO_DECODER.as_ptr(), 0);
            if rc < 0 {
                return Err(DecodeError::Internal(ff_error_text(ff::Error::from(rc))));
            }
            // Without decoders, probing never completes a video stream's parameters and would
            // read the whole analysis window before the first frame; a short one still finds
            // the streams, their start times and frame rates.
            (*ctx).max_analyze_duration = NO_DECODER_ANALYZE_US;
        }
        let mut stream_options = vec![std::ptr::null_mut::<ffi::AVDictionary>(); (*ctx).nb_streams as usize];
        let mut set = 0;
        for dict in &mut stream_options {
            set = set.min(ffi::av_dict_set(dict, c"max_pixels".as_ptr(), limit.as_ptr(), 0));
        }
        let rc = if set < 0 {
            set
        } else {
            let array = if stream_options.is_empty() { std::ptr::null_mut() } else { stream_options.as_mut_ptr() };
            ffi::avformat_find_stream_info(ctx, array)
        };
        // FFmpeg leaves in each dictionary what its decoder did not use.
        for dict in &mut stream_options {
            ffi::av_dict_free(dict);
        }
        if rc < 0 {
            return Err(open_error(rc, buffer));
        }
        check_dimensions(&input, max_dimensions)?;
        Ok(input)
    }
}

fn open_error(rc: i32, buffer: &Buffer) -> DecodeError {
    if rc == ffi::AVERROR_EXIT || buffer.write_state() == crate::buffer::WriteState::Aborted {
        return DecodeError::Cancelled;
    }
    DecodeError::UnsupportedMedia(format!(
        "expected MP4, Matroska, WebM, MPEG-TS, AVI, FLV, IVF or raw H.264/HEVC/MPEG-4; FFmpeg says: {}",
        ff_error_text(ff::Error::from(rc))
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pixel_limit_admits_every_frame_within_the_dimensions() {
        // FFmpeg compares the area with the width rounded up to its stride alignment.
        assert_eq!(super::max_pixels((8192, 8192)), 8192 * 8192);
        assert_eq!(super::max_pixels((1000, 1000)), 1024 * 1000);
        assert_eq!(super::max_pixels((u32::MAX, u32::MAX)), i64::MAX);
    }
}
