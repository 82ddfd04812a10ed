//! Tracks, line crossings and zone counts over HTTP and from the CLI, on a clip whose motion is
//! known (the cat photo walking across a line and through a zone, then back; see
//! scripts/make-fixtures.sh) and on the photos' clip; and the tracker against a Python ByteTrack
//! on MOTChallenge ground truth.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::decode::fixtures;
use crate::server::{Server, ndjson, read_body, read_head, request, upload};

/// A vertical line the cat's bottom centre crosses at about 1.0 s (going right) and 3.0 s (going
/// left), and a zone it is in from about 1.5 s to 2.5 s (the box is a little narrower than the
/// photo).
const DOOR: &str = "door:320,0,320,480";
const CORNER: &str = "corner:400,300,640,300,640,480,400,480";

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// What the walking cat must give, whichever frames are processed.
fn check_walking_cat(events: &[Value], processed: u64) {
    let frames = of_type(events, "frame");
    assert_eq!(frames.len() as u64, processed);
    for frame in &frames {
        let detections = frame["detections"].as_array().unwrap();
        assert_eq!(detections.len(), 1, "{frame}");
        assert_eq!((detections[0]["class"].as_str(), detections[0]["track_id"].as_u64()), (Some("cat"), Some(1)), "{frame}");
    }
    let crossings: Vec<(&str, f64)> = of_type(events, "crossing").iter().map(|c| (c["direction"].as_str().unwrap(), c["pts"].as_f64().unwrap())).collect();
    assert_eq!(crossings.iter().map(|c| c.0).collect::<Vec<_>>(), ["out", "in"], "{crossings:?}");
    assert!((1.0..1.4).contains(&crossings[0].1) && (3.0..3.4).contains(&crossings[1].1), "{crossings:?}");
    let zone: Vec<(&str, f64)> = of_type(events, "zone").iter().map(|z| (z["action"].as_str().unwrap(), z["pts"].as_f64().unwrap())).collect();
    assert_eq!(zone.iter().map(|z| z.0).collect::<Vec<_>>(), ["enter", "exit"], "{zone:?}");
    assert!((1.4..1.9).contains(&zone[0].1) && (2.4..2.8).contains(&zone[1].1), "{zone:?}");
    let tracks = of_type(events, "track");
    assert_eq!(tracks.len(), 1);
    assert_eq!((tracks[0]["track_id"].as_u64(), tracks[0]["frames"].as_u64()), (Some(1), Some(processed)));
    let end = events.last().unwrap();
    assert_eq!(end["type"], "end", "{end}");
    assert_eq!(end["tracks"], json!({"cat": 1}));
    assert_eq!(end["lines"], json!([{"name": "door", "in": {"cat": 1}, "out": {"cat": 1}}]));
    assert_eq!(end["zones"], json!([{"name": "corner", "entries": {"cat": 1}, "max_occupancy": 1}]));
}

#[test]
fn a_walking_cat_is_one_track_that_crosses_a_line_twice_and_visits_a_zone_once() {
    // Over HTTP, every frame.
    let server = Server::start(&[]);
    let clip = std::fs::read(fixtures().join("walking_cat.mp4")).unwrap();
    let (mut reader, _) = upload(&server.addr, &format!("/detect/video?lines={DOOR}&zones={CORNER}"), clip, 8 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    check_walking_cat(&ndjson(&read_body(&mut reader)), 50);

    // From the CLI, every third frame: the tracker follows in video time.
    let out = Command::new(env!("CARGO_BIN_EXE_streamdet"))
        .current_dir(crate::support::root())
        .args(["detect", "fixtures/walking_cat.mp4", "--stride", "3", "--lines", DOOR, "--zones", CORNER])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check_walking_cat(&ndjson(&String::from_utf8(out.stdout).unwrap()), 17);
}

#[test]
fn each_object_of_the_photos_clip_keeps_one_track() {
    let server = Server::start(&[]);
    let clip = std::fs::read(fixtures().join("photos.mp4")).unwrap();
    let (mut reader, _) = upload(&server.addr, "/detect/video?track=bytetrack", clip, 64 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    // The cat's photo is frames 5-9 (one second at 5 fps): one track, of the cat alone, confirmed
    // by its second frame (ByteTrack gives a new object's first box no id).
    let cat_ids: Vec<Option<u64>> = of_type(&events, "frame")[5..10]
        .iter()
        .flat_map(|f| f["detections"].as_array().unwrap().iter().filter(|d| d["class"] == "cat").map(|d| d["track_id"].as_u64()))
        .collect();
    assert_eq!(cat_ids.len(), 5);
    assert!(cat_ids[0].is_none() && cat_ids[1].is_some() && cat_ids[1..].iter().all(|id| *id == cat_ids[1]), "{cat_ids:?}");
    let tracks = of_type(&events, "track");
    let cat = tracks.iter().find(|t| t["class"] == "cat").expect("the cat's track");
    assert_eq!((cat["first_pts"].as_f64(), cat["last_pts"].as_f64(), cat["frames"].as_u64()), (Some(1.0), Some(1.8), Some(5)));
    assert!(tracks.iter().all(|t| t["frames"].as_u64().unwrap() <= 10), "no track runs across the clip: {tracks:?}");
    let end = events.last().unwrap();
    assert_eq!((end["tracks"]["cat"].as_u64(), end["tracks"]["motorcycle"].as_u64()), (Some(1), Some(1)), "{end}");
    assert!(end.get("lines").is_none(), "no lines asked for: {end}");
}

#[test]
fn tracking_parameters_are_checked() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    for query in ["track=sort", "lines=1,2,3", "zones=z:0,0,1,1", "track=none&lines=0,0,10,10", "lines=a:0,0,1,1;a:2,2,3,3"] {
        let head = format!("POST /detect/video?{query} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let (status, body) = request(addr, &head, b"");
        assert_eq!((status, body["code"].as_str()), (400, Some("bad_parameter")), "{query}: {body}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_streamdet"))
        .current_dir(crate::support::root())
        .args(["detect", "fixtures/walking_cat.mp4", "--lines", "1,2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_tracker_scores_at_least_the_python_bytetrack_on_motchallenge_ground_truth() {
    let out = tempfile::tempdir().unwrap();
    crate::support::run_ok(
        Command::new(env!("CARGO_BIN_EXE_streamdet"))
            .current_dir(crate::support::root())
            .args(["bench", "--only", "tracking", "--quick", "--out"])
            .arg(out.path()),
    );
    let report = std::fs::read_to_string(out.path().join("REPORT.md")).unwrap();
    println!("{report}");
    let results: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    let rows = results["tracking"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "both sequences: {results}");
    for row in rows {
        let (ours, peer) = (&row["ours"], &row["peer"]);
        for metric in ["mota", "idf1"] {
            assert!(ours[metric].as_f64() >= peer[metric].as_f64(), "{}: {metric} {} under the peer's {}", row["sequence"], ours[metric], peer[metric]);
        }
        assert_eq!(ours["seeds"].as_array().unwrap().len(), 3);
    }
}
