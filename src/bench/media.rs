//! The benchmark's inputs, made with the `ffmpeg` CLI: slideshows of the real photos that ship
//! with scikit-image and matplotlib (FFmpeg's test pattern when the project's venv is missing),
//! remuxed into the containers under test, and a large MPEG-TS for the memory stage.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Runs the ffmpeg CLI with `args`, quietly; fails with its error output.
fn ffmpeg(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .context("cannot run the ffmpeg CLI (scripts/setup.sh installs it)")?;
    if !output.status.success() {
        bail!("ffmpeg {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The photos, from the venv's packages (see scripts/photos.py); empty when unavailable.
pub fn photos(python: &Path) -> Vec<PathBuf> {
    let Ok(output) = Command::new(python).arg("scripts/photos.py").output() else { return Vec::new() };
    if !output.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&output.stdout).lines().map(PathBuf::from).filter(|p| p.exists()).collect()
}

/// How a clip is made.
#[derive(Debug, Clone)]
pub struct ClipSpec {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub seconds: f64,
    /// Target video bitrate, e.g. "4M".
    pub bitrate: &'static str,
}

impl ClipSpec {
    pub fn describe(&self) -> String {
        format!("{}x{} {} fps, {} s, H.264 at {}bit/s", self.width, self.height, self.fps, self.seconds, self.bitrate)
    }
}

/// Encodes an H.264 Matroska master at `out`: the photos, each an equal share of the clip,
/// scaled and padded to the size, with light temporal noise so the bitrate is a camera's. With
/// no photos, FFmpeg's moving test pattern.
pub fn master(photos: &[PathBuf], spec: &ClipSpec, out: &Path) -> anyhow::Result<()> {
    let (w, h, fps) = (spec.width, spec.height, spec.fps);
    let mut args: Vec<String> = Vec::new();
    let filter = if photos.is_empty() {
        args.extend(["-f", "lavfi", "-i"].map(String::from));
        args.push(format!("testsrc2=size={w}x{h}:rate={fps}:duration={}", spec.seconds));
        "[0:v]noise=alls=5:allf=t,format=yuv420p[out]".to_string()
    } else {
        let each = spec.seconds / photos.len() as f64;
        let mut chain = String::new();
        for (i, photo) in photos.iter().enumerate() {
            args.extend(["-loop".into(), "1".into(), "-t".into(), format!("{each}"), "-framerate".into(), fps.to_string(), "-i".into()]);
            args.push(arg(photo)?.to_string());
            chain
                .push_str(&format!("[{i}:v]scale={w}:{h}:force_original_aspect_ratio=decrease,pad={w}:{h}:(ow-iw)/2:(oh-ih)/2,setsar=1,format=yuv420p[v{i}];"));
        }
        let labels: String = (0..photos.len()).map(|i| format!("[v{i}]")).collect();
        format!("{chain}{labels}concat=n={}:v=1:a=0,noise=alls=5:allf=t,format=yuv420p[out]", photos.len())
    };
    args.extend(["-filter_complex".into(), filter, "-map".into(), "[out]".into()]);
    let gop = (fps * 2).to_string();
    args.extend(["-c:v", "libx264", "-preset", "veryfast", "-b:v", spec.bitrate, "-maxrate", spec.bitrate, "-bufsize", spec.bitrate].map(String::from));
    args.extend(["-g".into(), gop, "-r".into(), fps.to_string(), "-f".into(), "matroska".into(), arg(out)?.to_string()]);
    ffmpeg(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A container a clip is uploaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Container {
    /// MP4 with its index (moov) first.
    Faststart,
    /// MP4 with its index at the end: nothing decodes before the upload completes.
    MoovEnd,
    MpegTs,
}

impl Container {
    pub const ALL: [Container; 3] = [Container::Faststart, Container::MoovEnd, Container::MpegTs];

    pub fn label(self) -> &'static str {
        match self {
            Container::Faststart => "MP4 faststart",
            Container::MoovEnd => "MP4 moov at end",
            Container::MpegTs => "MPEG-TS",
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Container::Faststart => "faststart.mp4",
            Container::MoovEnd => "moov_end.mp4",
            Container::MpegTs => "clip.ts",
        }
    }

    /// Copies the master's stream into this container next to it.
    pub fn remux(self, master: &Path) -> anyhow::Result<PathBuf> {
        let out = master.with_file_name(format!("{}-{}", master.file_stem().and_then(|s| s.to_str()).unwrap_or("clip"), self.file_name()));
        let flags: &[&str] = match self {
            Container::Faststart => &["-movflags", "+faststart"],
            Container::MoovEnd => &[],
            Container::MpegTs => &["-f", "mpegts"],
        };
        let mut args = vec!["-i", arg(master)?, "-c", "copy"];
        args.extend_from_slice(flags);
        args.push(arg(&out)?);
        ffmpeg(&args)?;
        Ok(out)
    }
}

/// An MPEG-TS of about `bytes` bytes: `source` (any H.264 clip) repeated, stream-copied.
pub fn repeat_to_size(source: &Path, bytes: u64, out: &Path) -> anyhow::Result<()> {
    let size = bytes.to_string();
    ffmpeg(&["-stream_loop", "-1", "-i", arg(source)?, "-c", "copy", "-fs", &size, "-f", "mpegts", arg(out)?])
}

/// Decodes `path` and scales it to `width`x`height` RGB into a null output: the same work as the
/// decoder's conversion, done by the ffmpeg CLI.
pub fn ffmpeg_decode_scale(path: &Path, width: u32, height: u32) -> anyhow::Result<()> {
    let filter = format!("scale={width}:{height}:flags=bilinear,format=rgb24");
    ffmpeg(&["-i", arg(path)?, "-vf", &filter, "-f", "null", "-"])
}

/// Whether the ffmpeg CLI is there.
pub fn ffmpeg_available() -> bool {
    Command::new("ffmpeg").arg("-version").output().is_ok_and(|o| o.status.success())
}
