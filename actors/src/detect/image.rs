//! Decoding an uploaded image (JPEG, PNG, WebP) into packed RGB without trusting its header.
//!
//! An image file states its size in a few header bytes, and a decoder allocates its output from
//! them before it reads a single pixel: a 2 KB PNG can ask for 28.8 GB (the allocation fails
//! and the process aborts), a 28-byte lossless WebP for 768 MB. So the size is read from the
//! header and checked against a pixel limit before any pixel buffer exists.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::ErrorCode;

/// Bytes per pixel of the widest colour type the enabled decoders produce (PNG, RGBA 16-bit).
const MAX_BYTES_PER_PIXEL: u64 = 8;

/// What the decoders may allocate while they read the header and metadata (ICC profiles, text
/// and EXIF chunks), before the pixel limit has been checked: the `png` crate's own default.
const METADATA_BUDGET: u64 = 64 << 20;

/// Why an image was not decoded.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not a JPEG, PNG or WebP, or damaged.
    #[error("{0}")]
    Unsupported(String),
    /// The header states more pixels than allowed.
    #[error("the image is {width}x{height} pixels, more than the limit of {max_pixels} pixels")]
    TooLarge { width: u32, height: u32, max_pixels: u64 },
}

impl ImageError {
    /// The error code of the HTTP API and of `detect-image`'s error lines.
    pub fn code(&self) -> ErrorCode {
        match self {
            ImageError::Unsupported(_) => ErrorCode::UnsupportedMedia,
            ImageError::TooLarge { .. } => ErrorCode::TooLarge,
        }
    }

    fn from_image(err: image::ImageError) -> Self {
        ImageError::Unsupported(err.to_string())
    }
}

/// Decodes image bytes (JPEG, PNG, WebP) with EXIF orientation applied, into packed RGB and its
/// displayed width and height.
///
/// An image of more than `max_pixels` pixels is refused from its header, before its pixels are
/// decoded. Memory stays within the decoded image at its own colour type plus its RGB copy
/// (about 11 bytes per pixel for 16-bit RGBA, 3 for RGB, which is decoded in place).
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<(Vec<u8>, usize, usize), ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Unsupported(e.to_string()))?;
    if !matches!(reader.format(), Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)) {
        return Err(ImageError::Unsupported("not a JPEG, PNG or WebP image".into()));
    }
    let pixel_budget = max_pixels.saturating_mul(MAX_BYTES_PER_PIXEL);
    // The PNG decoder takes its allocation limit when it is made (later limits do not reach
    // it); it then reads only up to the first image data chunk.
    let mut header_limits = Limits::default();
    header_limits.max_alloc = Some(METADATA_BUDGET);
    reader.limits(header_limits);
    let mut decoder = reader.into_decoder().map_err(ImageError::from_image)?;

    // The check itself: from the header's dimensions, before any pixel buffer exists.
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooLarge { width, height, max_pixels });
    }
    // A second guard, should a decoder ever report a size other than the one it then decodes:
    // the image crate's limits on each side and on the buffer it allocates. `max_alloc` is not
    // enforced by every decoder (PNG ignores it), so the buffer is also reserved here.
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    let mut limits = Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(pixel_budget);
    decoder.set_limits(limits.clone()).map_err(ImageError::from_image)?;
    if limits.reserve(decoder.total_bytes()).is_err() {
        return Err(ImageError::TooLarge { width, height, max_pixels });
    }

    // Orientation only swaps the sides, never changes the pixel count; unreadable EXIF is
    // ignored as other viewers do.
    let orientation = if webp_exif_overruns(bytes) { Orientation::NoTransforms } else { decoder.orientation().unwrap_or(Orientation::NoTransforms) };
    // RGB8 sources decode straight into the returned buffer; others (grey, alpha, 16-bit)
    // decode at their own type and are converted once.
    let rgb = DynamicImage::from_decoder(decoder).map_err(ImageError::from_image)?.into_rgb8();
    // Oriented after the conversion, so that a rotation copies the smaller RGB buffer.
    let mut img = DynamicImage::ImageRgb8(rgb);
    img.apply_orientation(orientation);
    // Still RGB8 (orienting keeps the colour type), so this takes the buffer without a copy.
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Ok((rgb.into_raw(), w, h))
}

/// Whether `bytes` is a WebP whose EXIF chunk claims more bytes than the file holds. The WebP
/// decoder allocates the EXIF chunk's declared size (up to 4 GiB) before it reads it: the
/// allocation is virtual and freed when the read fails, but under an address-space limit it
/// aborts the process. Such a chunk cannot be read anyway.
fn webp_exif_overruns(bytes: &[u8]) -> bool {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WEBP" {
        return false;
    }
    let len = bytes.len() as u64;
    let mut at = 12u64;
    while at + 8 <= len {
        let header = &bytes[at as usize..at as usize + 8];
        let size = u64::from(u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")));
        if &header[..4] == b"EXIF" {
            return at + 8 + size > len;
        }
        at += 8 + size + (size & 1);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 40_000_000;

    /// CRC-32 of PNG chunks (ISO 3309), bit by bit: the tests need only a few.
    fn crc32(parts: &[&[u8]]) -> u32 {
        let mut crc = !0u32;
        for &byte in parts.iter().flat_map(|p| p.iter()) {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
    }

    /// A PNG whose IHDR (with a valid CRC) declares `width x height` at `depth` bits and colour
    /// `colour`, followed by a little image data that the check must never reach.
    fn png_header(width: u32, height: u32, depth: u8, colour: u8) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[depth, colour, 0, 0, 0]);
        png_chunk(&mut out, b"IHDR", &ihdr);
        // A zlib stream header and one empty stored block: well-formed, holds no pixels.
        png_chunk(&mut out, b"IDAT", &[0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01]);
        png_chunk(&mut out, b"IEND", &[]);
        out
    }

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    /// A small photo-like RGB picture: smooth gradients and a sharp edge.
    fn picture(width: u32, height: u32) -> image::RgbImage {
        image::RgbImage::from_fn(width, height, |x, y| {
            let edge = if x > width / 2 { 200 } else { 30 };
            image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, edge])
        })
    }

    /// A lossless WebP (VP8L) of `width x height` pixels of one colour: every prefix code holds a
    /// single symbol, so each pixel costs no bits and the whole file is 28 bytes.
    fn webp_lossless(width: u32, height: u32) -> Vec<u8> {
        let mut bits: Vec<u8> = Vec::new();
        let mut put = |value: u32, n: u32| bits.extend((0..n).map(|i| ((value >> i) & 1) as u8));
        put(width - 1, 14);
        put(height - 1, 14);
        put(0, 1); // no alpha
        put(0, 3); // version 0
        put(0, 1); // no transform
        put(0, 1); // no colour cache
        put(0, 1); // no meta prefix codes
        for _ in 0..5 {
            put(0b0001, 4); // simple code, one symbol, 1-bit symbol 0
        }
        let mut data = vec![0x2f];
        data.extend(bits.chunks(8).map(|byte| byte.iter().enumerate().fold(0u8, |acc, (i, &b)| acc | (b << i))));
        if data.len() % 2 == 1 {
            data.push(0);
        }
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(12 + data.len() as u32).to_le_bytes());
        out.extend_from_slice(b"WEBPVP8L");
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&data);
        out
    }

    fn assert_too_large(result: Result<(Vec<u8>, usize, usize), ImageError>, want: (u32, u32)) {
        match result {
            Err(err @ ImageError::TooLarge { width, height, max_pixels: LIMIT }) => {
                assert_eq!((width, height), want);
                assert_eq!(err.code(), "too_large");
            }
            other => panic!("expected TooLarge {want:?}, got {:?}", other.map(|(_, w, h)| (w, h))),
        }
    }

    #[test]
    fn a_png_declaring_60000_squared_rgba16_is_refused_from_its_header() {
        // 28.8 GB of pixels if it were believed.
        let bomb = png_header(60_000, 60_000, 16, 6);
        assert!(bomb.len() < 100);
        assert_too_large(decode_image(&bomb, LIMIT), (60_000, 60_000));
    }

    #[test]
    fn a_jpeg_whose_sof_says_30000_squared_is_refused_from_its_header() {
        let mut jpeg = encode(&DynamicImage::ImageRgb8(picture(48, 48)), ImageFormat::Jpeg);
        let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc0]).expect("a baseline JPEG has SOF0");
        // SOF0: marker, length (2), precision (1), height (2), width (2).
        jpeg[sof + 5..sof + 7].copy_from_slice(&30_000u16.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&30_000u16.to_be_bytes());
        assert_too_large(decode_image(&jpeg, LIMIT), (30_000, 30_000));
    }

    #[test]
    fn a_28_byte_lossless_webp_of_16000_squared_is_refused_from_its_header() {
        let bomb = webp_lossless(16_000, 16_000);
        assert_eq!(bomb.len(), 28);
        assert_too_large(decode_image(&bomb, LIMIT), (16_000, 16_000));
        // The same construction at a small size is a real image, so the header above is one too.
        let (rgb, w, h) = decode_image(&webp_lossless(7, 5), LIMIT).unwrap();
        assert_eq!((w, h), (7, 5));
        assert_eq!(rgb, vec![0; 7 * 5 * 3]);
    }

    #[test]
    fn a_webp_exif_chunk_claiming_4_gib_is_not_read() {
        // VP8X (EXIF flag, 7x5 canvas), the 7x5 lossless image, and an EXIF chunk of "4 GiB".
        let simple = webp_lossless(7, 5);
        let mut body = b"WEBPVP8X".to_vec();
        body.extend_from_slice(&10u32.to_le_bytes());
        body.extend_from_slice(&[0x08, 0, 0, 0, 6, 0, 0, 4, 0, 0]);
        body.extend_from_slice(&simple[12..]);
        body.extend_from_slice(b"EXIF");
        body.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        body.extend_from_slice(b"MM\0\x2a\0\0\0\x08");
        let webp = [b"RIFF".as_slice(), &(body.len() as u32).to_le_bytes(), &body].concat();
        assert!(webp_exif_overruns(&webp));
        assert!(!webp_exif_overruns(&simple));
        let (_, w, h) = decode_image(&webp, LIMIT).unwrap();
        assert_eq!((w, h), (7, 5));
    }

    #[test]
    fn the_limit_counts_pixels_not_sides() {
        let png = encode(&DynamicImage::ImageRgb8(picture(64, 16)), ImageFormat::Png);
        assert_eq!(decode_image(&png, 64 * 16).unwrap().1, 64);
        let err = decode_image(&png, 64 * 16 - 1).unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { width: 64, height: 16, .. }), "{err}");
    }

    #[test]
    fn photos_in_every_format_decode_to_their_pixels() {
        let rgb = picture(33, 21);
        let expected = rgb.as_raw().clone();
        for format in [ImageFormat::Png, ImageFormat::WebP] {
            let (got, w, h) = decode_image(&encode(&DynamicImage::ImageRgb8(rgb.clone()), format), LIMIT).unwrap();
            assert_eq!((w, h), (33, 21), "{format:?}");
            assert_eq!(got, expected, "{format:?} is lossless");
        }
        let (got, w, h) = decode_image(&encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Jpeg), LIMIT).unwrap();
        assert_eq!((w, h), (33, 21));
        let worst = got.iter().zip(&expected).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst < 80, "JPEG is lossy but close: {worst}");
        // 16-bit RGBA and grey convert to RGB.
        let rgba16 = DynamicImage::ImageRgb8(rgb.clone()).into_rgba16();
        let (got, _, _) = decode_image(&encode(&DynamicImage::ImageRgba16(rgba16), ImageFormat::Png), LIMIT).unwrap();
        assert_eq!(got, expected);
        let grey = DynamicImage::ImageRgb8(rgb).into_luma8();
        let (got, _, _) = decode_image(&encode(&DynamicImage::ImageLuma8(grey.clone()), ImageFormat::Png), LIMIT).unwrap();
        assert_eq!(got.len(), 33 * 21 * 3);
        assert!(got.chunks_exact(3).zip(grey.as_raw()).all(|(px, &g)| px == [g, g, g]));
    }

    #[test]
    fn exif_orientation_swaps_the_sides() {
        // A JPEG with an APP1 EXIF segment saying "rotate 90" (orientation 6), inserted after SOI.
        let jpeg = encode(&DynamicImage::ImageRgb8(picture(40, 16)), ImageFormat::Jpeg);
        let tiff: &[u8] = &[
            b'M', b'M', 0, 42, 0, 0, 0, 8, // big-endian TIFF, first IFD at 8
            0, 1, // one entry
            0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, // Orientation, SHORT, 1, value 6
            0, 0, 0, 0, // no next IFD
        ];
        let mut app1 = vec![0xff, 0xe1];
        app1.extend_from_slice(&((2 + 6 + tiff.len()) as u16).to_be_bytes());
        app1.extend_from_slice(b"Exif\0\0");
        app1.extend_from_slice(tiff);
        let rotated = [&jpeg[..2], &app1, &jpeg[2..]].concat();
        let (rgb, w, h) = decode_image(&rotated, LIMIT).unwrap();
        assert_eq!((w, h), (16, 40));
        assert_eq!(rgb.len(), 16 * 40 * 3);
        // Rotated, the 40x16 image still has 640 pixels: the same limit applies.
        assert!(matches!(decode_image(&rotated, 639), Err(ImageError::TooLarge { width: 40, height: 16, .. })));
    }

    #[test]
    fn other_bytes_are_unsupported() {
        for bytes in [&b""[..], b"plain text", b"\xff\xd8\xff\xe0 not really a jpeg", b"GIF89a\x01\x00\x01\x00"] {
            let err = decode_image(bytes, LIMIT).unwrap_err();
            assert!(matches!(err, ImageError::Unsupported(_)), "{bytes:?}: {err}");
            assert_eq!(err.code(), "unsupported_media");
        }
        let png = encode(&DynamicImage::ImageRgb8(picture(32, 32)), ImageFormat::Png);
        let err = decode_image(&png[..png.len() / 2], LIMIT).unwrap_err();
        assert!(matches!(err, ImageError::Unsupported(_)), "a truncated PNG: {err}");
    }
}
