//! Decode + letterbox-to-640 throughput from a buffer, next to the `ffmpeg` CLI doing the same
//! decode and scale to a null output, interleaved in one run. Generates a 30 s 1080p H.264 clip
//! (fixtures/bench_1080p_30s.mp4) the first time.
//! `cargo bench --bench decode [-- ROUNDS]`

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use streamdet_actors::buffer::{self, BufferOptions};
use streamdet_actors::decode::{DecodeOptions, Decoder};

fn make_clip(path: &Path) {
    if path.exists() {
        return;
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    eprintln!("encoding {} (once) ...", path.display());
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=1920x1080:rate=30:duration=30"])
        .args(["-c:v", "libx264", "-preset", "veryfast", "-b:v", "6M", "-pix_fmt", "yuv420p", "-g", "60", "-movflags", "+faststart"])
        .arg(path)
        .status()
        .expect("run ffmpeg");
    assert!(status.success(), "ffmpeg could not make the benchmark clip");
}

fn ours(path: &Path) -> (f64, u64) {
    let mut writer = buffer::create(&BufferOptions::default()).unwrap();
    writer.append(&std::fs::read(path).unwrap()).unwrap();
    let buffer = writer.finish();
    let start = Instant::now();
    let mut decoder = Decoder::open(buffer.reader(), DecodeOptions::default()).unwrap();
    while decoder.next_frame().unwrap().is_some() {}
    (start.elapsed().as_secs_f64(), decoder.stats().selected)
}

fn ffmpeg_cli(path: &Path) -> f64 {
    let start = Instant::now();
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-i"])
        .arg(path)
        .args(["-vf", "scale=640:360:flags=bilinear,format=rgb24", "-f", "null", "-"])
        .status()
        .expect("run ffmpeg");
    assert!(status.success());
    start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().filter_map(|a| a.parse().ok()).next().unwrap_or(3);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bench_1080p_30s.mp4");
    make_clip(&path);
    let (mut a, mut b, mut frames) = (Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        let (secs, n) = ours(&path);
        a.push(secs);
        frames = n;
        b.push(ffmpeg_cli(&path));
    }
    let (ours, theirs) = (median(a), median(b));
    println!(
        "decode 1080p H.264 -> 640 RGB letterbox, {frames} frames: streamdet {:.2} s ({:.0} frames/s), ffmpeg CLI {:.2} s ({:.0} frames/s), ratio {:.2}",
        ours,
        frames as f64 / ours,
        theirs,
        frames as f64 / theirs,
        ours / theirs
    );
}
