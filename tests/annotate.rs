//! The annotated video (`annotate=1`, `streamdet detect --annotate`): an H.264 MP4 that ffprobe
//! agrees with, boxes drawn where the detections say, served over HTTP for the replay window and
//! then removed, within its size cap, and never left behind by a session that fails.

use std::io::Read;
use std::process::Command;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::decode::fixtures;
use crate::server::{Server, get, ndjson, read_body, read_head, read_response_head, upload};

const DOOR: &str = "door:320,0,320,480";

/// ffprobe's view of a video: codec, pixel format, width, height, decoded frames.
fn probe(path: &std::path::Path) -> (String, String, u64, u64, u64) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,pix_fmt,width,height,nb_read_frames",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &json["streams"][0];
    let number = |v: &Value| v.as_u64().or_else(|| v.as_str().and_then(|t| t.parse().ok())).unwrap();
    (s["codec_name"].as_str().unwrap().into(), s["pix_fmt"].as_str().unwrap().into(), number(&s["width"]), number(&s["height"]), number(&s["nb_read_frames"]))
}

/// The picture shown at `seconds`, as packed RGB.
fn picture_at(path: &std::path::Path, seconds: f64) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-ss", &seconds.to_string(), "-i"])
        .arg(path)
        .args(["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Whether the index (`moov`) comes before the media data (`mdat`): the file plays while it
/// downloads.
fn index_first(bytes: &[u8]) -> bool {
    let find = |tag: &[u8]| bytes.windows(4).position(|w| w == tag);
    matches!((find(b"moov"), find(b"mdat")), (Some(moov), Some(mdat)) if moov < mdat)
}

#[test]
fn the_cli_writes_an_mp4_with_the_boxes_where_the_detections_are() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("annotated.mp4");
    let run = Command::new(env!("CARGO_BIN_EXE_streamdet"))
        .current_dir(crate::support::root())
        .args(["detect", "fixtures/walking_cat.mp4", "--lines", DOOR, "--annotate"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let events = ndjson(&String::from_utf8(run.stdout).unwrap());
    let end = events.last().unwrap();
    assert_eq!(end["video"]["frames"], 50, "{end}");
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(end["video"]["bytes"].as_u64(), Some(bytes.len() as u64));
    assert!(index_first(&bytes), "moov comes before mdat");
    assert_eq!(probe(&out), ("h264".into(), "yuv420p".into(), 640, 480, 50));

    // At 4.5 s the cat stands still; its box is drawn in its track's colour (a green), the grey
    // background away from it is untouched.
    let frame = events.iter().find(|e| e["type"] == "frame" && e["index"] == 45).unwrap();
    let bbox: Vec<f64> = frame["detections"][0]["box"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let rgb = picture_at(&out, 4.5);
    assert_eq!(rgb.len(), 640 * 480 * 3);
    let pixel = |x: f64, y: f64| {
        let at = (y.round() as usize * 640 + x.round() as usize) * 3;
        (i32::from(rgb[at]), i32::from(rgb[at + 1]), i32::from(rgb[at + 2]))
    };
    let green = |(r, g, b): (i32, i32, i32)| g > 170 && g - r > 90 && g - b > 60;
    let along_top: Vec<bool> = (1..10).map(|i| green(pixel(bbox[0] + (bbox[2] - bbox[0]) * f64::from(i) / 10.0, bbox[1] + 1.5))).collect();
    let along_left: Vec<bool> = (3..10).map(|i| green(pixel(bbox[0] + 1.5, bbox[1] + (bbox[3] - bbox[1]) * f64::from(i) / 10.0))).collect();
    assert!(along_top.iter().chain(&along_left).all(|g| *g), "the box's edges are drawn: {along_top:?} {along_left:?}");
    let (r, g, b) = pixel(450.0, 420.0);
    assert!((r - 128).abs() < 12 && (g - 128).abs() < 12 && (b - 128).abs() < 12, "the background stays grey: {:?}", (r, g, b));
}

/// The files of streamdet in a temp directory (uploads and annotated videos).
fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn the_service_serves_the_video_for_the_replay_window_then_removes_it() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_str().unwrap();
    let server = Server::start(&[("STREAMDET_STORAGE_TEMP_DIR", dir), ("STREAMDET_SERVER_REPLAY_SECONDS", "3")]);
    let addr = &server.addr;
    let clip = std::fs::read(fixtures().join("walking_cat.mp4")).unwrap();
    let id = "annotated-video-000001";
    let (mut reader, _) = upload(addr, &format!("/detect/video?annotate=1&track=bytetrack&stride=2&session={id}"), clip.clone(), 8 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    let end = ndjson(&read_body(&mut reader)).pop().unwrap();
    let url = end["video"]["url"].as_str().unwrap_or_else(|| panic!("no video in {end}")).to_string();
    assert_eq!(url, format!("/sessions/{id}/video?session={id}"));
    let mut response = get(addr, &url, "");
    let (status, headers) = read_response_head(&mut response);
    assert_eq!((status, headers.get("content-type").map(String::as_str)), (200, Some("video/mp4")));
    let mut body = Vec::new();
    response.read_to_end(&mut body).unwrap();
    assert_eq!(Some(body.len() as u64), end["video"]["bytes"].as_u64());
    let copy = temp.path().join("copy.mp4");
    std::fs::write(&copy, &body).unwrap();
    assert_eq!(probe(&copy).4, end["video"]["frames"].as_u64().unwrap());
    assert_eq!(end["video"]["frames"], 25, "every second frame");
    std::fs::remove_file(&copy).unwrap();
    assert_eq!(files_in(temp.path()), 1, "the video waits for its clients");

    // After the replay window the file is gone.
    thread::sleep(Duration::from_secs(4));
    let mut response = get(addr, &url, "");
    assert_eq!(read_head(&mut response), 404);
    assert_eq!(files_in(temp.path()), 0, "the video is removed after the replay window");

    // Past its size cap, the annotation stops and says why; the detections go on, no file stays.
    drop(server);
    let server = Server::start(&[("STREAMDET_STORAGE_TEMP_DIR", dir), ("STREAMDET_SERVER_MAX_ANNOTATED_BYTES", "2000")]);
    let (mut reader, _) = upload(&server.addr, "/detect/video?annotate=1", clip.clone(), 8 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    let end = events.last().unwrap();
    assert_eq!(end["frames_processed"], 50);
    assert!(end["video"]["error"].as_str().unwrap().contains("limit"), "{end}");
    assert_eq!(files_in(temp.path()), 0);

    // A session that fails (the client leaves mid-upload) leaves no file either.
    let (mut reader, _) = upload(&server.addr, "/detect/video?annotate=1", clip[..clip.len() / 2].to_vec(), 4 << 10, Duration::from_millis(20));
    assert_eq!(read_head(&mut reader), 200);
    drop(reader);
    // It goes once the session has ended: with the whole suite running on a slow machine, that
    // once took more than 5 s.
    let left = (0..300).map(|_| {
        thread::sleep(Duration::from_millis(100));
        files_in(temp.path())
    });
    assert!(left.into_iter().any(|n| n == 0), "a failed session leaves no file");
}
