//! The decoder over a buffer that another thread is still writing, on every container and codec
//! it must read, against `ffprobe` on the same files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use streamdet_actors::buffer::{self, Buffer, BufferOptions, WriteState};
use streamdet_actors::decode::{DecodeError, DecodeOptions, Decoder, FrameSelection, SelectedFrame};

use crate::support::{self, run_ok};

/// A generous guard against hangs; never a speed check.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The generated test videos (made once per test run; the script itself is idempotent).
pub fn fixtures() -> PathBuf {
    static MADE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    MADE.get_or_init(|| {
        run_ok(Command::new("bash").arg(support::root().join("scripts/make-fixtures.sh")));
    });
    support::root().join("fixtures")
}

/// How a test upload hands out its bytes.
#[derive(Clone, Copy)]
enum Pace {
    /// A pause after each piece, whatever the reader does: the reader may fall behind.
    Pause(Duration),
    /// The next piece only once the reader has read everything written (or waits further on,
    /// or has gone): what the first frame needed then no longer depends on how fast this
    /// machine decodes, only on the piece size.
    Lockstep,
}

/// How long a lockstep upload waits for the reader before it writes on regardless (a reader
/// that decodes without reading, or a bug; never a speed check).
const LOCKSTEP_STALL: Duration = Duration::from_millis(500);

/// Writes `path` into a new buffer from another thread, in `chunk`-byte pieces at `pace`, and
/// returns the buffer while the upload goes on.
fn upload_slowly(path: &Path, chunk: usize, pace: Pace) -> (Buffer, thread::JoinHandle<()>) {
    let data = std::fs::read(path).unwrap();
    let mut writer = buffer::create(&BufferOptions::default()).unwrap();
    let buffer = writer.buffer().clone();
    let handle = thread::spawn(move || {
        let mut reader_seen = false;
        for piece in data.chunks(chunk) {
            if writer.append(piece).is_err() {
                return; // aborted by the test
            }
            match pace {
                Pace::Pause(pause) => thread::sleep(pause),
                Pace::Lockstep => {
                    let since = Instant::now();
                    while since.elapsed() < LOCKSTEP_STALL {
                        match writer.buffer().lag() {
                            Some(0) => break,
                            Some(_) => reader_seen = true,
                            None if reader_seen => break, // the reader is done
                            None => {}                    // the reader is not open yet
                        }
                        thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        }
        writer.finish();
    });
    (buffer, handle)
}

struct Observed {
    frames: Vec<SelectedFrame>,
    /// Bytes written and the writer's state when the first frame came out.
    at_first_frame: Option<(u64, WriteState)>,
    /// Time from the start of decoding (the start of the upload) to the first frame.
    first_frame_after: Option<Duration>,
    result: Result<(), DecodeError>,
    container: String,
    codec: String,
    size: (u32, u32),
}

fn decode_buffer(buffer: &Buffer, options: DecodeOptions) -> Observed {
    let start = Instant::now();
    let mut decoder = match Decoder::open(buffer.reader(), options) {
        Ok(d) => d,
        Err(err) => {
            return Observed {
                frames: vec![],
                at_first_frame: None,
                first_frame_after: None,
                result: Err(err),
                container: String::new(),
                codec: String::new(),
                size: (0, 0),
            };
        }
    };
    let mut frames = Vec::new();
    let mut at_first_frame = None;
    let mut first_frame_after = None;
    let result = loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                at_first_frame.get_or_insert((buffer.written(), buffer.write_state()));
                first_frame_after.get_or_insert(start.elapsed());
                frames.push(frame);
            }
            Ok(None) => break Ok(()),
            Err(err) => break Err(err),
        }
    };
    let media = decoder.media().clone();
    Observed { frames, at_first_frame, first_frame_after, result, container: media.container, codec: media.codec, size: (media.width, media.height) }
}

/// Decodes `name` while uploading it in 4 KiB pieces in lockstep with the decoder.
fn decode_while_uploading(name: &str, options: DecodeOptions) -> (Observed, u64) {
    decode_during_upload(name, options, 4096, Pace::Lockstep)
}

fn decode_during_upload(name: &str, options: DecodeOptions, chunk: usize, pace: Pace) -> (Observed, u64) {
    let path = fixtures().join(name);
    let total = std::fs::metadata(&path).unwrap().len();
    let (buffer, writer) = upload_slowly(&path, chunk, pace);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(decode_buffer(&buffer, options)).unwrap());
    let observed = rx.recv_timeout(HANG_GUARD).unwrap_or_else(|_| panic!("{name}: decoding hung"));
    writer.join().unwrap();
    (observed, total)
}

/// Every frame's presentation time as ffprobe reports it, in presentation order, from the
/// first frame; `None` for each frame of a stream without timestamps (raw H.264).
fn ffprobe_pts(path: &Path) -> Vec<Option<f64>> {
    let out = run_ok(
        Command::new("ffprobe")
            .args(["-v", "error", "-select_streams", "v:0", "-show_entries", "frame=best_effort_timestamp_time", "-of", "csv=p=0"])
            .arg(path),
    );
    let parsed: Vec<Option<f64>> = out.lines().filter(|l| !l.trim().is_empty()).map(|l| l.trim().trim_end_matches(',').parse::<f64>().ok()).collect();
    if parsed.iter().any(Option::is_none) {
        return vec![None; parsed.len()];
    }
    let mut pts: Vec<f64> = parsed.into_iter().flatten().collect();
    pts.sort_by(f64::total_cmp);
    let first = pts.first().copied().unwrap_or(0.0);
    pts.iter().map(|p| Some(p - first)).collect()
}

#[test]
fn streamable_formats_give_frames_before_half_the_upload() {
    for name in ["faststart.mp4", "fragmented.mp4", "clip.mkv", "vp9.webm", "vp8.webm", "clip.ts", "clip.h264", "hevc.mp4", "mpeg4.mp4", "av1.webm"] {
        let (observed, total) = decode_while_uploading(name, DecodeOptions::default());
        observed.result.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
        let (written, state) = observed.at_first_frame.unwrap_or_else(|| panic!("{name}: no frame"));
        eprintln!("{name}: first frame with {written} of {total} bytes written; {} frames ({}, {})", observed.frames.len(), observed.container, observed.codec);
        assert_eq!(state, WriteState::Open, "{name}: the first frame came only after the upload ended");
        assert!(written < total / 2, "{name}: first frame only after {written} of {total} bytes");
        let path = fixtures().join(name);
        let want = ffprobe_pts(&path);
        assert_eq!(observed.frames.len(), want.len(), "{name}: frame count differs from ffprobe");
        for (i, (frame, pts)) in observed.frames.iter().zip(&want).enumerate() {
            assert_eq!(frame.index, i as u64, "{name}");
            if let Some(pts) = pts {
                assert!((frame.pts - pts).abs() < 1e-3, "{name}: frame {i} at {} s, ffprobe says {pts}", frame.pts);
            }
        }
        assert_eq!(observed.size, (640, 360), "{name}");
    }
}

#[test]
fn moov_at_the_end_decodes_every_frame_after_the_upload() {
    let (observed, total) = decode_while_uploading("moov_end.mp4", DecodeOptions::default());
    observed.result.unwrap();
    // The moov atom is in the last bytes: no frame before all of them are written (the writer
    // may not have called `finish` yet at that instant).
    let (written, _) = observed.at_first_frame.unwrap();
    assert_eq!(written, total, "frames cannot come before the moov atom");
    assert_eq!(observed.frames.len(), ffprobe_pts(&fixtures().join("moov_end.mp4")).len());
}

#[test]
fn stride_and_fps_select_frames() {
    let options = |selection| DecodeOptions { selection, ..Default::default() };
    let (stride, _) = decode_while_uploading("clip.mkv", options(FrameSelection::Stride(30)));
    let indices: Vec<u64> = stride.frames.iter().map(|f| f.index).collect();
    assert_eq!(indices, [0, 30, 60, 90]);
    // 4 s at 25 fps, at most 2 per second: 8 frames, 12 or 13 apart.
    let (fps, _) = decode_while_uploading("clip.mkv", options(FrameSelection::Fps(2.0)));
    let pts: Vec<f64> = fps.frames.iter().map(|f| f.pts).collect();
    assert_eq!(pts, [0.0, 0.52, 1.0, 1.52, 2.0, 2.52, 3.0, 3.52]);
}

/// The white 100x50 rectangle at (40, 30) in a 640x360 clip, as the model input shows it.
fn white_extent(frame: &SelectedFrame) -> (usize, usize, usize, usize) {
    let (tw, _) = frame.model_frame.letterbox.target;
    let rgb = &frame.model_frame.rgb;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        if px.iter().all(|&v| v > 200) {
            let (x, y) = (i % tw, i / tw);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
        }
    }
    (x0, y0, x1, y1)
}

#[test]
fn letterboxed_rectangle_maps_back_to_the_frame() {
    let (observed, _) = decode_while_uploading("rect.mp4", DecodeOptions::default());
    let frame = &observed.frames[0];
    // 640x360 into 640x640: scale 1, 140 rows of padding on top.
    assert_eq!(frame.model_frame.letterbox.pad, (0, 140));
    let (x0, y0, x1, y1) = white_extent(frame);
    let back = frame.model_frame.letterbox.to_source([x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
    for (got, want) in back.iter().zip([40.0, 30.0, 140.0, 80.0]) {
        assert!((got - want).abs() <= 1.0, "rectangle maps back to {back:?}");
    }
    assert_eq!(frame.model_frame.rgb[0], 114, "padding is gray 114");
}

#[test]
fn display_rotation_is_applied() {
    let (observed, _) = decode_while_uploading("rect_rotated.mp4", DecodeOptions::default());
    assert_eq!(observed.size, (360, 640), "display size of a clip tagged with a 90 degree rotation");
    let frame = &observed.frames[0];
    let (x0, y0, x1, y1) = white_extent(frame);
    let back = frame.model_frame.letterbox.to_source([x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
    // Where `ffmpeg` itself (autorotate) shows the rectangle in the 360x640 picture.
    for (got, want) in back.iter().zip([30.0, 500.0, 80.0, 600.0]) {
        assert!((got - want).abs() <= 1.0, "rotated rectangle at {back:?}");
    }
}

fn decode_file(name: &str) -> Observed {
    let path = fixtures().join(name);
    let mut writer = buffer::create(&BufferOptions::default()).unwrap();
    writer.append(&std::fs::read(path).unwrap()).unwrap();
    decode_buffer(&writer.finish(), DecodeOptions::default())
}

fn decode_bytes(bytes: &[u8]) -> Observed {
    let mut writer = buffer::create(&BufferOptions::default()).unwrap();
    writer.append(bytes).unwrap();
    decode_buffer(&writer.finish(), DecodeOptions::default())
}

#[test]
fn bad_inputs_are_clear_errors() {
    let random: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for (what, observed, code) in [
        ("random bytes", decode_bytes(&random), "unsupported_media"),
        ("zero bytes", decode_bytes(&[]), "unsupported_media"),
        ("a JPEG", decode_file("image.jpg"), "unsupported_media"),
        ("audio only", decode_file("audio.m4a"), "no_video_stream"),
        ("65535x65535 declared", decode_file("huge.mkv"), "too_large"),
    ] {
        let err = observed.result.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
    }
    let truncated = decode_file("truncated.mp4");
    assert!(truncated.frames.len() >= 50, "the frames before the damage are delivered");
    assert_eq!(truncated.result.unwrap_err().code(), "truncated");
}

#[test]
fn corrupt_packets_are_skipped_and_decoding_goes_on() {
    let observed = decode_file("corrupt.ts");
    observed.result.expect("damage in the middle is not fatal");
    let frames = observed.frames.len();
    assert!((80..=100).contains(&frames), "{frames} frames");
    assert!(observed.frames.last().unwrap().pts > 3.5, "decoding reached the end");
}

#[test]
fn live_input_frees_what_the_demuxer_has_read() {
    let path = fixtures().join("live.ts");
    let total = std::fs::metadata(&path).unwrap().len();
    assert!(total > 6 << 20, "the live fixture must outgrow the discard margin");
    let (buffer, writer) = upload_slowly(&path, 64 << 10, Pace::Pause(Duration::from_millis(1)));
    let mut decoder = Decoder::open(buffer.reader(), DecodeOptions { live: true, ..Default::default() }).unwrap();
    let mut frames = 0;
    while decoder.next_frame().unwrap().is_some() {
        frames += 1;
    }
    writer.join().unwrap();
    assert_eq!(frames, 200);
    let freed = buffer.discarded_before();
    assert!(freed > 0 && freed < total, "discarded before {freed} of {total}");
    // Without `live`, nothing is discarded.
    let (buffer, writer) = upload_slowly(&path, 64 << 10, Pace::Pause(Duration::ZERO));
    let mut decoder = Decoder::open(buffer.reader(), DecodeOptions::default()).unwrap();
    while decoder.next_frame().unwrap().is_some() {}
    writer.join().unwrap();
    assert_eq!(buffer.discarded_before(), 0);
}

#[test]
fn playlists_and_concat_scripts_cannot_open_files() {
    // A FIFO blocks whoever opens it for reading until a writer comes, which never happens: if
    // FFmpeg tried to open it, decoding would hang instead of failing.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("secret");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.display();
    let playlist = format!("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nfile://{fifo}\n#EXTINF:2.0,\n{fifo}\n#EXT-X-ENDLIST\n");
    let concat = format!("ffconcat version 1.0\nfile '{fifo}'\nfile '/etc/passwd'\n");
    for text in [playlist, concat] {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || tx.send(decode_bytes(text.as_bytes()).result.map_err(|e| e.code().as_str())).unwrap());
        let result = rx.recv_timeout(HANG_GUARD).expect("the demuxer tried to open a named file");
        assert_eq!(result, Err("unsupported_media"));
    }
}

#[test]
fn cancelling_wakes_a_blocked_open_and_a_blocked_read() {
    // During open: nothing written yet.
    let writer = buffer::create(&BufferOptions::default()).unwrap();
    let buffer = writer.buffer().clone();
    let (tx, rx) = mpsc::channel();
    let b = buffer.clone();
    thread::spawn(move || tx.send(decode_buffer(&b, DecodeOptions::default()).result.map_err(|e| e.to_string())).unwrap());
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "open returned without data");
    buffer.abort();
    let result = rx.recv_timeout(HANG_GUARD).expect("abort did not wake the blocked open");
    assert!(result.unwrap_err().contains("cancelled"));
    drop(writer);

    // During reading: half a file, then nothing.
    let data = std::fs::read(fixtures().join("clip.mkv")).unwrap();
    let mut writer = buffer::create(&BufferOptions::default()).unwrap();
    writer.append(&data[..data.len() / 2]).unwrap();
    let buffer = writer.buffer().clone();
    let (tx, rx) = mpsc::channel();
    let b = buffer.clone();
    thread::spawn(move || {
        let observed = decode_buffer(&b, DecodeOptions::default());
        tx.send((observed.frames.len(), observed.result.map_err(|e| e.to_string()))).unwrap()
    });
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "decoding finished without the rest of the file");
    buffer.abort();
    let (frames, result) = rx.recv_timeout(HANG_GUARD).expect("abort did not wake the blocked read");
    assert!(frames > 0, "frames from the first half were delivered");
    assert!(result.unwrap_err().contains("cancelled"));
    drop(writer);
}

#[test]
fn cli_decode_reports_frames_and_errors() {
    let dir = fixtures();
    let out = Command::new(env!("CARGO_BIN_EXE_streamdet")).args(["decode", "--stride", "25"]).arg(dir.join("clip.ts")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[1]["index"], 25);
    let end = &lines[4];
    assert_eq!((end["type"].as_str(), end["frames"].as_u64(), end["selected"].as_u64()), (Some("end"), Some(100), Some(4)));
    assert_eq!((end["container"].as_str(), end["codec"].as_str()), (Some("mpegts"), Some("h264")));

    // `-` reads standard input as it arrives.
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamdet"))
        .args(["decode", "-", "--fps", "1"])
        .stdin(std::fs::File::open(dir.join("clip.ts")).unwrap())
        .output()
        .unwrap();
    assert!(child.status.success());
    let last: serde_json::Value = serde_json::from_str(String::from_utf8(std::mem::take(&mut child.stdout)).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(last["selected"], 4);

    let out = Command::new(env!("CARGO_BIN_EXE_streamdet")).arg("decode").arg(dir.join("image.jpg")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["code"], "unsupported_media");
    let out = Command::new(env!("CARGO_BIN_EXE_streamdet")).args(["decode", "--stride", "0", "x.mp4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Uploads `name` at the pace of its playback (`seconds` of video) while decoding it.
fn decode_at_playback_pace(name: &str, seconds: f64) -> (Observed, u64) {
    let total = std::fs::metadata(fixtures().join(name)).unwrap().len();
    let chunk = 4096;
    let pause = Duration::from_secs_f64(seconds * chunk as f64 / total as f64);
    decode_during_upload(name, DecodeOptions::default(), chunk, Pace::Pause(pause))
}

#[test]
fn avi_and_flv_give_frames_while_uploading() {
    let clips = [("mpeg4.avi", "avi", "mpeg4"), ("mjpeg.avi", "avi", "mjpeg"), ("clip.flv", "flv", "h264")];
    for (name, container, codec) in clips {
        let (observed, total) = decode_while_uploading(name, DecodeOptions::default());
        observed.result.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((observed.container.as_str(), observed.codec.as_str(), observed.size), (container, codec, (320, 240)), "{name}");
        let (written, state) = observed.at_first_frame.unwrap_or_else(|| panic!("{name}: no frame"));
        assert_eq!(state, WriteState::Open, "{name}: the first frame came only after the upload ended");
        assert!(written < total / 2, "{name}: first frame only after {written} of {total} bytes");
        let want = ffprobe_pts(&fixtures().join(name));
        assert_eq!(observed.frames.len(), want.len(), "{name}: frame count differs from ffprobe");
        for (i, (frame, pts)) in observed.frames.iter().zip(&want).enumerate() {
            assert_eq!(frame.index, i as u64, "{name}");
            let pts = pts.expect("AVI and FLV have timestamps");
            assert!((frame.pts - pts).abs() < 1e-3, "{name}: frame {i} at {} s, ffprobe says {pts}", frame.pts);
        }
    }
    // Uploaded as fast as the 4 s clips play, all three at once: the first frame comes within
    // the first quarter of the bytes (the time it took is printed, not asserted).
    thread::scope(|scope| {
        let runs: Vec<_> = clips.iter().map(|(name, ..)| (name, scope.spawn(move || decode_at_playback_pace(name, 4.0)))).collect();
        for (name, run) in runs {
            let (observed, total) = run.join().unwrap();
            observed.result.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
            let after = observed.first_frame_after.unwrap();
            let (written, _) = observed.at_first_frame.unwrap();
            eprintln!("{name}: first frame {:.2} s into a 4 s upload, with {written} of {total} bytes written", after.as_secs_f64());
            assert!(written < total / 4, "{name}: first frame only after {written} of {total} bytes ({after:?})");
        }
    });
}

#[test]
fn audio_tracks_do_not_delay_the_first_frame() {
    // Probing opens the audio decoders it needs for a stream's parameters; without them it
    // would analyse a whole second of media (a quarter of these clips) before the first frame.
    for name in ["with_aac.mp4", "with_opus.webm"] {
        let (observed, total) = decode_while_uploading(name, DecodeOptions::default());
        observed.result.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
        let (written, _) = observed.at_first_frame.unwrap_or_else(|| panic!("{name}: no frame"));
        eprintln!("{name}: first frame with {written} of {total} bytes written");
        assert!(written < total / 8, "{name}: first frame only after {written} of {total} bytes");
        assert_eq!(observed.frames.len(), ffprobe_pts(&fixtures().join(name)).len(), "{name}");
    }
}

#[test]
fn codecs_outside_the_allow_list_are_refused() {
    for (name, codec) in [("png.mkv", "png"), ("rawvideo.mkv", "rawvideo")] {
        let observed = decode_file(name);
        let err = observed.result.expect_err(name);
        assert_eq!(err.code(), "unsupported_codec", "{name}: {err}");
        assert!(err.to_string().contains(codec), "{name}: {err}");
        assert!(observed.frames.is_empty());
    }
}

fn with_limit(max: (u32, u32)) -> DecodeOptions {
    DecodeOptions { max_dimensions: max, ..Default::default() }
}

#[test]
fn a_stream_that_grows_past_the_limit_ends_after_its_small_frames() {
    // 25 frames of 64x64, then 25 of 1024x1024 (a new SPS, a VP9 or AV1 keyframe of the new
    // size), over a 512x512 limit, with one decoder thread and with frame threads.
    for name in ["switch.h264", "switch.hevc", "switch_vp9.webm", "switch_av1.webm"] {
        for threads in [1, 0] {
            let options = DecodeOptions { threads, ..with_limit((512, 512)) };
            let (observed, _) = decode_during_upload(name, options, 4096, Pace::Pause(Duration::from_millis(1)));
            let frames = observed.frames.len();
            eprintln!("{name}, {threads} threads: {frames} frames, then {:?}", observed.result);
            assert!(observed.frames.iter().all(|f| f.model_frame.letterbox.source == (64, 64)), "{name}");
            match observed.result {
                // H.264 and HEVC packets are refused from their parameter sets, with the size.
                Err(DecodeError::TooLarge { width, height, max_width, max_height }) => {
                    assert_eq!((width, height, max_width, max_height), (1024, 1024, 512, 512), "{name}");
                }
                // VP9 and AV1 frames are refused by the decoder's `max_pixels`, which does not say
                // the size.
                Err(DecodeError::FrameTooLarge { max_width: 512, max_height: 512 }) if name.ends_with(".webm") => {}
                other => panic!("{name}: expected too_large, got {other:?}"),
            }
            assert_eq!(frames, 25, "{name}, {threads} threads: every small frame is delivered");
        }
    }
    // A limit too narrow for 1024x1024 that FFmpeg's `max_pixels` (an area) lets through:
    // every decoded frame is checked.
    for name in ["switch_vp9.webm", "switch_av1.webm"] {
        let (observed, _) = decode_during_upload(name, with_limit((1000, 4096)), 4096, Pace::Pause(Duration::from_millis(1)));
        assert_eq!(observed.frames.len(), 25, "{name}");
        match observed.result {
            Err(DecodeError::TooLarge { width: 1024, height: 1024, max_width: 1000, max_height: 4096 }) => {}
            other => panic!("{name}: expected too_large for 1024x1024, got {other:?}"),
        }
    }
}

#[test]
fn size_changes_within_the_limit_are_converted_at_each_size() {
    let (observed, _) = decode_while_uploading("switch.h264", DecodeOptions::default());
    observed.result.unwrap();
    assert_eq!(observed.frames.len(), 50);
    assert_eq!(observed.size, (64, 64), "the size the stream starts with");
    for (i, frame) in observed.frames.iter().enumerate() {
        let want = if i < 25 { (64, 64) } else { (1024, 1024) };
        assert_eq!(frame.model_frame.letterbox.source, want, "frame {i}");
        assert_eq!(frame.model_frame.rgb.len(), 640 * 640 * 3);
    }
    // testsrc2's picture fills both sizes: the converted frames are not padding.
    let last = &observed.frames[49].model_frame.rgb;
    assert!(last.chunks_exact(3).filter(|p| p.iter().all(|&v| v == 114)).count() < last.len() / 3 / 2);
}

#[test]
fn first_frame_over_the_limit_is_refused_before_allocation() {
    for name in ["huge_first.h264", "huge_first.flv"] {
        // In this process: the error a user gets.
        let path = fixtures().join(name);
        let mut writer = buffer::create(&BufferOptions::default()).unwrap();
        writer.append(&std::fs::read(&path).unwrap()).unwrap();
        let observed = decode_buffer(&writer.finish(), with_limit((512, 512)));
        assert!(observed.frames.is_empty(), "{name}");
        match observed.result {
            Err(DecodeError::TooLarge { width: 8192, height: 8192, .. }) => {}
            other => panic!("{name}: expected too_large for 8192x8192, got {other:?}"),
        }
        // In a process of its own: the peak memory. One 8192x8192 picture is 96 MiB, and
        // FFmpeg's H.264 decoder allocates about 300 MiB of tables for that size while it only
        // parses the headers; refused by `max_pixels`, none of it exists.
        // This test binary (which cargo may replace on disk while it runs).
        let out = Command::new("/proc/self/exe")
            .args(["decode::child_decodes_with_a_small_limit", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("STREAMDET_CHILD_DECODE", name)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find_map(|l| Some(l.split_once("child-decode ")?.1)).unwrap_or_else(|| panic!("{name}: no result from the child: {stdout}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        let peak_mib: u64 = fields[1].parse::<u64>().unwrap() / 1024;
        eprintln!("{name}: refused as {}, peak memory of the decoding process {peak_mib} MiB", fields[0]);
        assert_eq!(fields[0], "too_large", "{name}");
        assert!(peak_mib < 150, "{name}: the decoding process peaked at {peak_mib} MiB");
    }
}

/// Decodes the fixture named by `STREAMDET_CHILD_DECODE` with a 512x512 limit and prints the
/// error code and this process's peak resident memory (KiB). Run in a child process by
/// `first_frame_over_the_limit_is_refused_before_allocation`; does nothing otherwise.
#[test]
#[ignore = "runs in a child process of first_frame_over_the_limit_is_refused_before_allocation"]
fn child_decodes_with_a_small_limit() {
    let Ok(name) = std::env::var("STREAMDET_CHILD_DECODE") else { return };
    let mut writer = buffer::create(&BufferOptions::default()).unwrap();
    writer.append(&std::fs::read(fixtures().join(name)).unwrap()).unwrap();
    let observed = decode_buffer(&writer.finish(), with_limit((512, 512)));
    let code = observed.result.err().map_or("none", |e| e.code().as_str());
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak_kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches("kB").trim().to_string();
    println!("child-decode {code} {peak_kib}");
}

/// Damaged data is the client's, never an internal error: a keyframe spliced into the middle
/// of a VP9 stream (the mutation battery found the decoder answering "invalid argument").
#[test]
fn spliced_vp9_data_is_skipped_as_damage() {
    let clip = std::fs::read(fixtures().join("vp9.webm")).unwrap();
    // The battery's case: 3462 bytes from offset 534335 copied over offset 26800.
    let (from, to, len) = (534_335, 26_800, 3_462);
    assert!(clip.len() > from + len, "vp9.webm is {} bytes", clip.len());
    let mut spliced = clip.clone();
    spliced.copy_within(from..from + len, to);
    let observed = decode_bytes(&spliced);
    let code = observed.result.as_ref().err().map_or("none", |e| e.code().as_str());
    assert_ne!(code, "internal", "{:?}", observed.result);
    assert!(!observed.frames.is_empty(), "the frames before the damage are delivered");
}
