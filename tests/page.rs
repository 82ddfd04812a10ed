//! The page at `/` in a real browser: headless Chromium (Debian's, driven by selenium from the
//! project's venv) against a real `streamdet serve`. tests/browser/page_test.py does the
//! clicking and says what it saw; the screenshots of the video, image and tracking cases are
//! kept under target/test-artifacts/ (not committed).

use std::process::Command;

use crate::decode::fixtures;
use crate::server::Server;

#[test]
fn the_page_shows_detections_during_an_upload_errors_in_words_boxes_on_images_and_tracks() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(std::path::Path::new(tool).exists(), "{tool} is missing: run `bash scripts/setup.sh`");
    }
    let server = Server::start(&[]);
    let root = crate::support::root();
    let artifacts = root.join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let temp = tempfile::tempdir().unwrap();
    let junk = temp.path().join("junk.bin");
    std::fs::write(&junk, (0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>()).unwrap();
    let person = crate::support::photos().into_iter().find(|p| p.ends_with("grace_hopper.jpg")).expect("grace_hopper.jpg");
    let screenshot = artifacts.join("page-video.png");
    let output = Command::new(crate::support::python())
        .arg(root.join("tests/browser/page_test.py"))
        .args(["--base", &format!("http://{}", server.addr), "--stride", "5"])
        .arg("--video")
        .arg(fixtures().join("photos.mp4"))
        .arg("--image")
        .arg(&person)
        .arg("--junk")
        .arg(&junk)
        .arg("--screenshot")
        .arg(&screenshot)
        .arg("--image-screenshot")
        .arg(artifacts.join("page-image.png"))
        .arg("--tracking-video")
        .arg(fixtures().join("walking_cat.mp4"))
        .arg("--tracking-screenshot")
        .arg(artifacts.join("page-tracking.png"))
        .arg("--annotated")
        .output()
        .expect("run the browser test");
    let said = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{said}");
    assert!(output.status.success(), "the browser test failed:\n{said}");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000, "the screenshot is nearly empty");
}
