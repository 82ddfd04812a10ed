//! The actor pipeline, run as `streamdet detect` runs it: real FFmpeg, the real default model.

use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use crate::decode::fixtures;

fn detect(args: &[&str], stdin: Option<std::fs::File>) -> (Output, Vec<serde_json::Value>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamdet"));
    cmd.current_dir(crate::support::root()).arg("detect").args(args);
    if let Some(file) = stdin {
        cmd.stdin(file);
    }
    let out = cmd.output().unwrap();
    let events = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (out, events)
}

fn classes(event: &serde_json::Value) -> Vec<&str> {
    event["detections"].as_array().unwrap().iter().map(|d| d["class"].as_str().unwrap()).collect()
}

#[test]
fn a_clip_of_photos_yields_real_detections_in_order() {
    let clip = fixtures().join("photos.mp4");
    let (out, events) = detect(&[clip.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let start = &events[0];
    assert_eq!(start["type"], "start");
    assert_eq!((start["media"]["width"].as_u64(), start["media"]["height"].as_u64()), (Some(1280), Some(720)));
    assert_eq!(start["model"]["name"], "yolov12n");
    assert_eq!(start["model"]["classes"], 80);
    let frames: Vec<&serde_json::Value> = events.iter().filter(|e| e["type"] == "frame").collect();
    assert_eq!(frames.len(), 30, "six photos, one second each at 5 fps");
    for (i, frame) in frames.iter().enumerate() {
        assert_eq!(frame["index"].as_u64(), Some(i as u64), "frames in order");
    }
    // Photo order: astronaut, chelsea, coffee, motorcycle_left, camera, grace_hopper.
    for (i, frame) in frames.iter().enumerate().take(10).skip(5) {
        assert!(classes(frame).contains(&"cat"), "chelsea frame {i}: {frame:?}");
    }
    for (i, frame) in frames.iter().enumerate().take(30).skip(25) {
        assert!(classes(frame).contains(&"person"), "grace_hopper frame {i}: {frame:?}");
    }
    let end = events.last().unwrap();
    assert_eq!(end["type"], "end", "end is last");
    assert_eq!((end["frames_decoded"].as_u64(), end["frames_processed"].as_u64()), (Some(30), Some(30)));
    let bytes = std::fs::read(&clip).unwrap();
    assert_eq!(end["bytes"].as_u64(), Some(bytes.len() as u64));
    let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(end["sha256"].as_str(), Some(sha.as_str()));
}

#[test]
fn stdin_is_read_as_it_arrives_with_a_stride() {
    let ts = std::fs::File::open(fixtures().join("clip.ts")).unwrap();
    let (out, events) = detect(&["-", "--stride", "25"], Some(ts));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let indices: Vec<u64> = events.iter().filter(|e| e["type"] == "frame").map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [0, 25, 50, 75]);
    assert_eq!(events.last().unwrap()["frames_decoded"], 100);
}

#[test]
fn errors_are_events_and_exit_code_one() {
    let image = fixtures().join("image.jpg");
    let (out, events) = detect(&[image.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "error");
    assert_eq!(events[0]["code"], "unsupported_media");

    let truncated = fixtures().join("truncated.mp4");
    let (out, events) = detect(&[truncated.to_str().unwrap(), "--stride", "20"], None);
    assert_eq!(out.status.code(), Some(1));
    let last = events.last().unwrap();
    assert_eq!((last["type"].as_str(), last["code"].as_str()), (Some("error"), Some("truncated")));
    assert!(events.iter().filter(|e| e["type"] == "frame").count() >= 2, "frames before the damage are reported");

    let (out, _) = detect(&["x.mp4", "--stride", "0"], None);
    assert_eq!(out.status.code(), Some(2));
}
