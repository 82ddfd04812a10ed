//! Writing H.264 in MP4 with FFmpeg: yuv420p, the index at the front (`+faststart`), so that the
//! file plays in Chrome and Firefox, frames at their own timestamps.

use std::path::Path;

use ffmpeg_next::{self as ff, format::Pixel, software::scaling};

/// Timestamps are in milliseconds.
const TIME_BASE: (i32, i32) = (1, 1000);

/// An open MP4 being written; `finish` completes it.
pub struct Mp4Writer {
    output: ff::format::context::Output,
    encoder: ff::encoder::Video,
    /// Converts RGB pictures of the size last seen to the encoder's YUV size.
    scaler: Option<(usize, usize, scaling::Context)>,
    width: usize,
    height: usize,
    stream_time_base: ff::Rational,
    /// One frame's duration at the nominal rate, in milliseconds: what a packet whose duration
    /// the encoder left open lasts (the last one, above all, or players drop it).
    frame_ms: i64,
    last_pts: Option<i64>,
    bytes: u64,
}

impl Mp4Writer {
    /// Starts `path` for pictures of `width x height` (each made even, as yuv420p needs) at
    /// about `frame_rate` frames per second.
    pub fn create(path: &Path, width: usize, height: usize, frame_rate: f64) -> Result<Mp4Writer, ff::Error> {
        ff::init()?;
        let (width, height) = ((width & !1).max(2), (height & !1).max(2));
        let mut output = ff::format::output_as(path, "mp4")?;
        let codec = ff::encoder::find_by_name("libx264").or_else(|| ff::encoder::find(ff::codec::Id::H264)).ok_or(ff::Error::EncoderNotFound)?;
        let global_header = output.format().flags().contains(ff::format::Flags::GLOBAL_HEADER);
        let mut encoder = ff::codec::context::Context::new_with_codec(codec).encoder().video()?;
        encoder.set_width(width as u32);
        encoder.set_height(height as u32);
        encoder.set_format(Pixel::YUV420P);
        encoder.set_time_base(TIME_BASE);
        let rate = if (1.0..=1000.0).contains(&frame_rate) { frame_rate } else { 30.0 };
        encoder.set_frame_rate(Some(ff::Rational::new((rate * 1000.0).round() as i32, 1000)));
        if global_header {
            encoder.set_flags(ff::codec::Flags::GLOBAL_HEADER);
        }
        let mut options = ff::Dictionary::new();
        // Fast enough to keep up with detection on a small CPU; the picture is a preview.
        options.set("preset", "veryfast");
        options.set("crf", "26");
        let encoder = encoder.open_as_with(codec, options)?;
        let mut stream = output.add_stream(codec)?;
        stream.set_parameters(&encoder);
        stream.set_time_base(TIME_BASE);
        let mut muxer = ff::Dictionary::new();
        muxer.set("movflags", "+faststart");
        output.write_header_with(muxer)?;
        let stream_time_base = output.stream(0).map_or(ff::Rational::new(1, 1000), |s| s.time_base());
        let frame_ms = (1000.0 / rate).round().max(1.0) as i64;
        Ok(Mp4Writer { output, encoder, scaler: None, width, height, stream_time_base, frame_ms, last_pts: None, bytes: 0 })
    }

    /// Bytes of encoded video written so far (the file holds a little more: the index).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Encodes one packed RGB picture of `width x height` shown at `pts` seconds; a picture of
    /// another size than the first is scaled to it.
    pub fn write(&mut self, rgb: &[u8], width: usize, height: usize, pts: f64) -> Result<(), ff::Error> {
        let mut picture = ff::frame::Video::new(Pixel::RGB24, width as u32, height as u32);
        let stride = picture.stride(0);
        for (row, line) in rgb.chunks_exact(width * 3).take(height).enumerate() {
            picture.data_mut(0)[row * stride..row * stride + width * 3].copy_from_slice(line);
        }
        if self.scaler.as_ref().is_none_or(|(w, h, _)| (*w, *h) != (width, height)) {
            let context = scaling::Context::get(
                Pixel::RGB24,
                width as u32,
                height as u32,
                Pixel::YUV420P,
                self.width as u32,
                self.height as u32,
                scaling::Flags::BILINEAR,
            )?;
            self.scaler = Some((width, height, context));
        }
        let mut yuv = ff::frame::Video::new(Pixel::YUV420P, self.width as u32, self.height as u32);
        if let Some((_, _, scaler)) = &mut self.scaler {
            scaler.run(&picture, &mut yuv)?;
        }
        // Strictly increasing, as the muxer wants, even if two frames claim one millisecond.
        let mut pts = (pts * 1000.0).round() as i64;
        if let Some(last) = self.last_pts {
            pts = pts.max(last + 1);
        }
        self.last_pts = Some(pts);
        yuv.set_pts(Some(pts));
        self.encoder.send_frame(&yuv)?;
        self.drain()
    }

    /// Flushes the encoder and writes the index; the file is complete.
    pub fn finish(mut self) -> Result<(), ff::Error> {
        self.encoder.send_eof()?;
        self.drain()?;
        self.output.write_trailer()
    }

    fn drain(&mut self) -> Result<(), ff::Error> {
        let mut packet = ff::Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            self.bytes += packet.size() as u64;
            if packet.duration() <= 0 {
                packet.set_duration(self.frame_ms);
            }
            packet.set_stream(0);
            packet.rescale_ts(TIME_BASE, self.stream_time_base);
            packet.write_interleaved(&mut self.output)?;
        }
        Ok(())
    }
}
