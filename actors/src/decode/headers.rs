//! The picture size an H.264 or HEVC packet announces, read by FFmpeg's bitstream parser before
//! the packet reaches the decoder.
//!
//! Those two decoders set up their per-macroblock tables for a new size before `max_pixels`
//! refuses it (measured with FFmpeg 5.1: about 27 MiB per frame thread for an 8192x8192 SPS,
//! four times that at the largest size H.264 allows), so a stream that switches to a huge size
//! would cost that much once per decoder thread. The parser reads only parameter sets and slice
//! headers. The other allowed decoders check the size before they allocate anything.

use std::ptr;

use ffmpeg_next::{self as ff, ffi};

/// A parser and the codec context it reads its extradata from (its own, never the decoder's:
/// the parser writes the profile and level there).
pub struct SizeParser {
    parser: *mut ffi::AVCodecParserContext,
    context: *mut ffi::AVCodecContext,
    codec: ff::codec::Id,
}

// SAFETY: both pointers are owned by this value and used by one thread at a time (the decoder
// thread that owns the `Decoder`).
unsafe impl Send for SizeParser {}

impl SizeParser {
    /// A parser for a stream of `codec` whose extradata (`avcC`/`hvcC`, or nothing for Annex B
    /// streams) is `extradata`; `None` for the codecs that do not need one.
    pub fn new(codec: ff::codec::Id, extradata: &[u8]) -> Option<SizeParser> {
        if !matches!(codec, ff::codec::Id::H264 | ff::codec::Id::HEVC) {
            return None;
        }
        let id: ffi::AVCodecID = codec.into();
        // SAFETY: plain allocations; on failure everything allocated so far is freed.
        unsafe {
            let mut context = ffi::avcodec_alloc_context3(ptr::null());
            if context.is_null() {
                return None;
            }
            (*context).codec_type = ffi::AVMediaType::AVMEDIA_TYPE_VIDEO;
            (*context).codec_id = id;
            if !extradata.is_empty() {
                let padded = extradata.len() + ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
                let copy = ffi::av_mallocz(padded) as *mut u8;
                if copy.is_null() {
                    ffi::avcodec_free_context(&mut context);
                    return None;
                }
                ptr::copy_nonoverlapping(extradata.as_ptr(), copy, extradata.len());
                // The context owns it now; avcodec_free_context frees it.
                (*context).extradata = copy;
                (*context).extradata_size = extradata.len() as i32;
            }
            let parser = ffi::av_parser_init(id as i32);
            if parser.is_null() {
                ffi::avcodec_free_context(&mut context);
                return None;
            }
            // Demuxed packets hold whole frames: parse each one as it is.
            (*parser).flags |= ffi::PARSER_FLAG_COMPLETE_FRAMES;
            Some(SizeParser { parser, context, codec })
        }
    }

    /// The size (as decoded, cropped) that the parameter sets seen so far give the pictures of
    /// `packet`; `None` until a slice header has been parsed.
    pub fn size(&mut self, packet: &ff::Packet) -> Option<(u32, u32)> {
        // New parameter sets out of band (an FLV or Matroska sequence header mid-stream): a
        // parser that starts from them.
        if let Some(side) = packet.side_data().find(|s| s.kind() == ff::packet::side_data::Type::NewExtraData) {
            *self = SizeParser::new(self.codec, side.data())?;
        }
        let data = packet.data()?;
        let mut out = ptr::null_mut();
        let mut out_size = 0;
        // SAFETY: `data` is the packet's payload (FFmpeg pads packets, as parsers require); the
        // parser and context are valid until `drop`. With complete frames the parser consumes
        // the whole input and points `out` into it.
        unsafe {
            ffi::av_parser_parse2(
                self.parser,
                self.context,
                &mut out,
                &mut out_size,
                data.as_ptr(),
                data.len() as i32,
                ffi::AV_NOPTS_VALUE,
                ffi::AV_NOPTS_VALUE,
                0,
            );
            let (width, height) = ((*self.parser).width, (*self.parser).height);
            (width > 0 && height > 0).then_some((width as u32, height as u32))
        }
    }
}

impl Drop for SizeParser {
    fn drop(&mut self) {
        // SAFETY: both were allocated in `new` and are freed once, here.
        unsafe {
            ffi::av_parser_close(self.parser);
            ffi::avcodec_free_context(&mut self.context);
        }
    }
}
