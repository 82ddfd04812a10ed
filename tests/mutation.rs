//! A mutation battery: thousands of damaged copies of valid inputs (videos, images, the model)
//! thrown at the parsers that face uploads: the video decoder over a buffer, `decode_image` and
//! the model loader. Every mutant must end in a result or a clear error: no panic, no abort, no
//! hang, bounded memory, no temp file left behind.
//!
//! The battery runs in a child process (this test binary again, running the ignored
//! `battery_child`), so that an abort or a hang is reported with the case that caused it instead
//! of killing the test run, and so that its peak RSS is its own. Mutants are deterministic:
//! `MUTATION_SEED=n` explores other ones, `MUTATION_SCALE=k` runs k times as many, and
//! `MUTATION_ONLY=video|image|model` runs one kind of target.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use streamdet_actors::buffer::{self, BufferOptions};
use streamdet_actors::decode::{DecodeError, DecodeOptions, Decoder, FrameSelection};
use streamdet_actors::detect::model::OnnxModel;
use streamdet_actors::detect::{self, DetectError, Detector};

use crate::support::{self, run_ok};

const DEFAULT_SEED: u64 = 0x5EED_0FBA_77E5;
/// Frames decoded per video mutant: the structure (headers, sample tables, first clusters and
/// fragments) and the first pictures are where damage changes the code path; the rest of a
/// clip repeats it.
const MAX_FRAMES: usize = 8;
/// Where most byte-level damage to a video lands: the part those first frames are read from.
const VIDEO_HOT_BYTES: usize = 48 << 10;
/// The pixel limit of `decode_image` in the battery: small, so that a mutant whose header
/// still passes cannot take long to decode, and large enough for the fixtures.
const IMAGE_MAX_PIXELS: u64 = 4_000_000;
/// The child's peak RSS must stay under this (the model alone is about 100 MB).
const MAX_RSS_BYTES: u64 = 1 << 30;
/// The child's address space (it peaks near 0.5 GiB): an allocation sized by a header's claim
/// fails, and aborts the battery naming its case, even when it would be lazily zeroed memory
/// that never shows in RSS (4 GiB for a WebP chunk claiming it, say).
const ADDRESS_SPACE_LIMIT: u64 = 2 << 30;
/// A case that runs longer than this is a hang.
const CASE_GUARD: Duration = Duration::from_secs(30);
/// The whole battery, as a last resort (it takes well under a minute).
const BATTERY_GUARD: Duration = Duration::from_secs(600);

const CHILD_ENV: &str = "STREAMDET_MUTATION_CHILD";

#[test]
fn mutants_end_in_results_or_clear_errors() {
    let work = tempfile::tempdir().unwrap();
    let buffers = work.path().join("buffers");
    std::fs::create_dir(&buffers).unwrap();
    let trace = work.path().join("current-case");
    let log = work.path().join("child.log");
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "mutation::battery_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, work.path())
        .stdout(Stdio::from(File::create(&log).unwrap()))
        .stderr(Stdio::from(File::options().append(true).open(&log).unwrap()))
        .spawn()
        .unwrap();
    let current_case = || std::fs::read_to_string(&trace).unwrap_or_default();
    let (mut last, mut since) = (String::new(), Instant::now());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let case = current_case();
        if case != last {
            (last, since) = (case, Instant::now());
        }
        if since.elapsed() > CASE_GUARD || started.elapsed() > BATTERY_GUARD {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the battery hung on {last}\n{}", tail(&log));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let report: Vec<&str> = output.lines().filter(|l| l.starts_with("mutation:")).collect();
    eprintln!("{}", report.join("\n"));
    assert!(status.success(), "the battery process failed ({status}) during {}\n{}", current_case(), tail(&log));
    let left: Vec<_> = std::fs::read_dir(&buffers).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
    eprintln!("mutation: battery took {:.1} s", started.elapsed().as_secs_f64());
}

/// What a failed battery shows: each panic with its backtrace, then the end of the log.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut shown = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") && shown.len() < 400 {
            shown.extend_from_slice(&lines[i..(i + 40).min(lines.len())]);
            shown.push("[...]");
        }
    }
    shown.extend_from_slice(&lines[lines.len().saturating_sub(30)..]);
    shown.join("\n")
}

/// Where the inputs that made the code under test panic are kept, to reproduce them.
fn panics_dir() -> PathBuf {
    support::root().join("target/mutation-panics")
}

/// The battery itself; run by [`mutants_end_in_results_or_clear_errors`] in a child process.
#[test]
#[ignore = "run in a child process by mutants_end_in_results_or_clear_errors"]
fn battery_child() {
    let Some(work) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let limit = libc::rlimit { rlim_cur: ADDRESS_SPACE_LIMIT, rlim_max: ADDRESS_SPACE_LIMIT };
    // SAFETY: setrlimit only reads the struct passed by reference, and lowers this process's
    // own limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0, "setrlimit(RLIMIT_AS)");
    let seed = std::env::var("MUTATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    let scale: usize = std::env::var("MUTATION_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let only = std::env::var("MUTATION_ONLY").ok();
    let runs = |kind: &str| only.as_deref().is_none_or(|only| only == kind);
    let mut battery = Battery {
        rng: Rng(seed),
        dir: work.join("buffers"),
        trace: File::create(work.join("current-case")).unwrap(),
        outcomes: BTreeMap::new(),
        panics: Vec::new(),
        cases: 0,
        peaks: (proc_status_bytes("VmHWM:"), proc_status_bytes("VmPeak:")),
    };
    // Counts every panic, also those caught inside the code under test (the decoder's AVIO
    // callbacks catch theirs), then reports it as usual.
    let report_panic = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        report_panic(info);
    }));
    println!("mutation: seed {seed:#x}, scale {scale}");
    let started = Instant::now();

    let fixtures = crate::decode::fixtures();
    let dir = battery.dir.clone();
    for name in ["faststart.mp4", "fragmented.mp4", "clip.mkv", "vp9.webm", "clip.ts"].into_iter().filter(|_| runs("video")) {
        let data = std::fs::read(fixtures.join(name)).unwrap();
        let fields = size_fields(name, &data);
        battery.run(name, &data, &fields, 500 * scale, VIDEO_HOT_BYTES, |bytes| decode_video(bytes, &dir));
    }
    let video_time = started.elapsed();

    let images = image_fixtures(&fixtures.join("image.jpg"), &work);
    for (name, data) in images.iter().filter(|_| runs("image")) {
        let fields = size_fields(name, data);
        battery.run(name, data, &fields, 250 * scale, data.len(), decode_picture);
    }
    let image_time = started.elapsed() - video_time;

    if runs("model") {
        let model = std::fs::read(support::default_model()).unwrap();
        let fields = size_fields("model.onnx", &model);
        println!("mutation: model.onnx has {} integer and length fields outside the weights", fields.len());
        battery.run("model.onnx (parse)", &model, &fields, 1000 * scale, 0, parse_model);
        battery.run("model.onnx (load)", &model, &fields, 100 * scale, 0, |bytes| load_model(bytes, &dir));
    }
    let model_time = started.elapsed() - video_time - image_time;

    battery.report();
    println!(
        "mutation: {} cases in {:.1} s (videos {:.1} s, images {:.1} s, model {:.1} s)",
        battery.cases,
        started.elapsed().as_secs_f64(),
        video_time.as_secs_f64(),
        image_time.as_secs_f64(),
        model_time.as_secs_f64()
    );
    let peak = proc_status_bytes("VmHWM:");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("mutation: peak RSS {:.0} MiB (bound {} MiB), peak address space {:.0} MiB", mib(peak), MAX_RSS_BYTES >> 20, mib(proc_status_bytes("VmPeak:")));
    for (case, message) in &battery.panics {
        println!("mutation: PANIC in {case}: {message}");
    }
    assert!(battery.panics.is_empty(), "{} mutants panicked (the inputs are under {})", battery.panics.len(), panics_dir().display());
    assert!(battery.cases >= 2000 || only.is_some(), "only {} cases", battery.cases);
    assert!(peak < MAX_RSS_BYTES, "peak RSS {peak} bytes");
    let left: Vec<_> = std::fs::read_dir(&battery.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

/// Panics seen by the panic hook, wherever they were caught.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// What one mutant came to: `ok` or an error code.
type Outcome = String;

struct Battery {
    rng: Rng,
    /// Where buffers (and model mutants) are written; must be empty at the end.
    dir: PathBuf,
    /// Holds the case being run, for the parent to name a hang or an abort.
    trace: File,
    outcomes: BTreeMap<(String, Outcome), usize>,
    panics: Vec<(String, String)>,
    cases: usize,
    /// Peak RSS and address space last reported: a case that raises either much is named.
    peaks: (u64, u64),
}

impl Battery {
    /// Runs `count` mutants of `data` through `target`. `hot` bytes at the start take most of
    /// the byte-level damage (0: around the structure's length fields instead).
    fn run(&mut self, name: &str, data: &[u8], fields: &[SizeField], count: usize, hot: usize, mut target: impl FnMut(&[u8]) -> Outcome) {
        let intact = target(data);
        assert_eq!(intact, "ok", "{name}: the unmutated input must be valid");
        if name.ends_with(".png") {
            let mut copy = data.to_vec();
            repair_png_crcs(&mut copy);
            assert!(copy == data, "{name}: recomputing its CRCs changes nothing");
        }
        for i in 0..count {
            let mutation = Mutation::pick(&mut self.rng, data, fields, hot);
            // PNG checks a CRC on every chunk: half of its mutants get theirs recomputed, so that
            // the damage reaches the parsers behind the check.
            let repair = name.ends_with(".png") && self.rng.below(2) == 0;
            let case = format!("{name} #{i}: {mutation}{}", if repair { ", chunk CRCs repaired" } else { "" });
            self.trace.set_len(0).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&self.trace, case.as_bytes(), 0).unwrap();
            let mut mutant = mutation.apply(data);
            if repair {
                repair_png_crcs(&mut mutant);
            }
            let panics_before = PANICS.load(Ordering::SeqCst);
            let result = panic::catch_unwind(AssertUnwindSafe(|| target(&mutant)));
            let caught_inside = PANICS.load(Ordering::SeqCst) != panics_before;
            let outcome = match result {
                Ok(outcome) if !caught_inside => outcome,
                result => {
                    let message = match &result {
                        Ok(outcome) => format!("a panic was caught inside the code under test (it returned {outcome})"),
                        Err(payload) => {
                            payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
                        }
                    };
                    let saved = panics_dir();
                    std::fs::create_dir_all(&saved).unwrap();
                    std::fs::write(saved.join(format!("{}-{i}", name.replace([' ', '(', ')'], ""))), &mutant).unwrap();
                    self.panics.push((case.clone(), message));
                    "PANIC".into()
                }
            };
            let (rss, space) = (proc_status_bytes("VmHWM:"), proc_status_bytes("VmPeak:"));
            if rss > self.peaks.0 + (64 << 20) || space > self.peaks.1 + (256 << 20) {
                println!("mutation: peak RSS {} MiB, address space {} MiB after {case}", rss >> 20, space >> 20);
                self.peaks = (rss, space);
            }
            if outcome == "internal" {
                // Damaged input is the client's fault: `internal` says the server failed.
                println!("mutation: `internal` for {case}");
            }
            *self.outcomes.entry((name.to_string(), outcome)).or_default() += 1;
            self.cases += 1;
        }
    }

    fn report(&self) {
        let mut by_target: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for ((target, outcome), n) in &self.outcomes {
            by_target.entry(target).or_default().push(format!("{outcome} {n}"));
        }
        for (target, outcomes) in by_target {
            let total: usize = self.outcomes.iter().filter(|((t, _), _)| t == target).map(|(_, n)| n).sum();
            println!("mutation: {target}: {total} mutants: {}", outcomes.join(", "));
        }
        let mut totals: BTreeMap<&str, usize> = BTreeMap::new();
        for ((_, outcome), n) in &self.outcomes {
            *totals.entry(outcome).or_default() += n;
        }
        println!("mutation: all targets: {totals:?}");
    }
}

fn decode_video(bytes: &[u8], dir: &Path) -> Outcome {
    let outcome = decode_video_result(bytes, dir);
    if let Err(err) = &outcome
        && err.code() == "internal"
    {
        println!("mutation: decoder error: {err}");
    }
    outcome.map_or_else(|err| err.code().into(), |()| "ok".into())
}

fn decode_video_result(bytes: &[u8], dir: &Path) -> Result<(), DecodeError> {
    let mut writer = buffer::create(&BufferOptions { dir: dir.to_path_buf(), window_bytes: 4 << 20 }).unwrap();
    writer.append(bytes).unwrap();
    // A finished buffer: reads past the end see EOF, so nothing can wait for more bytes.
    let buffer = writer.finish();
    let options = DecodeOptions {
        target: streamdet_actors::frame::Size::new(160, 160),
        selection: FrameSelection::All,
        max_dimensions: (2048, 2048),
        threads: 1,
        ..DecodeOptions::default()
    };
    let mut decoder = Decoder::open(buffer.reader(), options)?;
    for _ in 0..MAX_FRAMES {
        match decoder.next_frame()? {
            Some(frame) => assert_eq!(frame.model_frame.rgb.len(), 160 * 160 * 3),
            None => break,
        }
    }
    Ok(())
}

fn decode_picture(bytes: &[u8]) -> Outcome {
    match detect::decode_image(bytes, IMAGE_MAX_PIXELS) {
        Ok((rgb, w, h)) => {
            assert_eq!(rgb.len(), w * h * 3);
            assert!(w as u64 * h as u64 <= IMAGE_MAX_PIXELS);
            "ok".into()
        }
        Err(err) => err.code().into(),
    }
}

fn parse_model(bytes: &[u8]) -> Outcome {
    match OnnxModel::parse(bytes) {
        Ok(_) => "ok".into(),
        Err(_) => "bad_model".into(),
    }
}

fn load_model(bytes: &[u8], dir: &Path) -> Outcome {
    // Deleted when dropped, also while a panic unwinds.
    let mut file = tempfile::Builder::new().suffix(".onnx").tempfile_in(dir).unwrap();
    file.write_all(bytes).unwrap();
    match Detector::load_with_threads(file.path(), Device::Cpu, 1) {
        Ok(_) => "ok".into(),
        Err(err) => match err {
            DetectError::Io { .. } => "io",
            DetectError::BadModel { .. } | DetectError::BadModelText(_) => "bad_model",
            DetectError::Unsupported { .. } => "unsupported_op",
            DetectError::Execution { .. } => "execution",
            DetectError::Tensor(_) => "tensor",
            DetectError::BadInput(_) => "bad_input",
            DetectError::Threads(_) | DetectError::Helpers(_) => "threads",
            DetectError::BadImage { .. } => "bad_image",
        }
        .into(),
    }
}

/// The photo fixture and the same picture as PNG (8-bit RGB, 16-bit RGBA, grey) and WebP (lossy
/// and lossless), made with FFmpeg's encoders.
fn image_fixtures(jpeg: &Path, work: &Path) -> Vec<(String, Vec<u8>)> {
    let mut images = vec![("image.jpg".to_string(), std::fs::read(jpeg).unwrap())];
    let made = work.join("images");
    std::fs::create_dir_all(&made).unwrap();
    for (name, args) in [
        ("rgb24.png", &["-pix_fmt", "rgb24"][..]),
        ("rgba64.png", &["-pix_fmt", "rgba64be"][..]),
        ("gray.png", &["-pix_fmt", "gray"][..]),
        ("lossy.webp", &["-c:v", "libwebp", "-quality", "60"][..]),
        ("lossless.webp", &["-c:v", "libwebp", "-lossless", "1"][..]),
    ] {
        let out = made.join(name);
        run_ok(Command::new("ffmpeg").args(["-v", "error", "-y", "-i"]).arg(jpeg).args(args).args(["-frames:v", "1"]).arg(&out));
        images.push((name.to_string(), std::fs::read(&out).unwrap()));
    }
    let lossless = images.last().unwrap().1.clone();
    images.push(("exif.webp".to_string(), webp_with_exif(&lossless)));
    images
}

/// A simple lossless WebP rewrapped as an extended one (VP8X) with an EXIF chunk saying "rotate
/// 90 degrees": the orientation path, and a chunk whose declared size the decoder allocates.
fn webp_with_exif(simple: &[u8]) -> Vec<u8> {
    assert_eq!(&simple[12..16], b"VP8L", "a simple lossless WebP");
    let bits = u32::from_le_bytes(simple[21..25].try_into().unwrap());
    let (width_minus_1, height_minus_1) = (bits & 0x3FFF, (bits >> 14) & 0x3FFF);
    let tiff: &[u8] = &[b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0];
    let mut body = b"WEBPVP8X".to_vec();
    body.extend_from_slice(&10u32.to_le_bytes());
    body.extend_from_slice(&[0x08 | 0x10, 0, 0, 0]); // EXIF and alpha flags
    body.extend_from_slice(&width_minus_1.to_le_bytes()[..3]);
    body.extend_from_slice(&height_minus_1.to_le_bytes()[..3]);
    body.extend_from_slice(&simple[12..]);
    body.extend_from_slice(b"EXIF");
    body.extend_from_slice(&(tiff.len() as u32).to_le_bytes());
    body.extend_from_slice(tiff);
    [b"RIFF".as_slice(), &(body.len() as u32).to_le_bytes(), &body].concat()
}

/// A line of /proc/self/status in bytes: `VmHWM` (peak RSS), `VmPeak` (peak address space).
fn proc_status_bytes(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// splitmix64: small, fast and good enough to spread damage; deterministic for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// How a length or count field is written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FieldKind {
    U16Be,
    U32Be,
    U32Le,
    /// An EBML variable-size integer (Matroska, WebM); `len` bytes.
    Vint,
    /// A protobuf length (ONNX), a varint of `len` bytes.
    Varint,
    /// A protobuf integer (ONNX: dimensions, counts, types), a varint of `len` bytes.
    Int,
}

#[derive(Debug, Clone, Copy)]
struct SizeField {
    at: usize,
    len: usize,
    kind: FieldKind,
}

#[derive(Debug, Clone)]
enum Mutation {
    BitFlips(Vec<(usize, u8)>),
    Truncate(usize),
    /// Copies `len` bytes from `from` over `to`.
    Splice {
        from: usize,
        to: usize,
        len: usize,
    },
    /// Replaces `len` bytes at `at` with `with` (a size field made huge or tiny).
    Overwrite {
        at: usize,
        len: usize,
        with: Vec<u8>,
        field: Option<FieldKind>,
    },
}

impl fmt::Display for Mutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mutation::BitFlips(flips) => write!(f, "bit flips (offset, mask) {flips:?}"),
            Mutation::Truncate(len) => write!(f, "truncated to {len} bytes"),
            Mutation::Splice { from, to, len } => write!(f, "{len} bytes from {from} copied to {to}"),
            Mutation::Overwrite { at, len, with, field } => {
                write!(f, "{len} bytes at {at} ({}) set to {with:02x?}", field.map_or("random offset".to_string(), |k| format!("{k:?} size field")))
            }
        }
    }
}

impl Mutation {
    /// A random mutation of `data`; byte-level damage lands in the first `hot` bytes three times
    /// in four (`hot == 0`: near a size field instead).
    fn pick(rng: &mut Rng, data: &[u8], fields: &[SizeField], hot: usize) -> Mutation {
        let len = data.len();
        let offset = |rng: &mut Rng| -> usize {
            if rng.below(4) > 0 {
                if hot > 0 {
                    return rng.below(hot.min(len));
                }
                if !fields.is_empty() {
                    let field = rng.pick(fields);
                    return (field.at + rng.below(24)).saturating_sub(8).min(len - 1);
                }
            }
            rng.below(len)
        };
        match rng.below(20) {
            0..=6 => {
                let flips = 1 + rng.below(8);
                Mutation::BitFlips((0..flips).map(|_| (offset(rng), 1u8 << rng.below(8))).collect())
            }
            7..=9 => {
                // Often just before the end (a cut-off upload), otherwise anywhere.
                let at = if rng.below(2) == 0 { len - 1 - rng.below(len.min(4096)) } else { offset(rng) };
                Mutation::Truncate(at)
            }
            10..=12 => {
                let span = 1 + rng.below(4096.min(len / 2));
                Mutation::Splice { from: rng.below(len - span), to: offset(rng).min(len - span), len: span }
            }
            _ if !fields.is_empty() && rng.below(4) > 0 => {
                let field = *rng.pick(fields);
                Mutation::Overwrite { at: field.at, len: field.len, with: inflated(rng, field, len), field: Some(field.kind) }
            }
            _ => {
                let at = offset(rng).min(len - 4);
                let value = *rng.pick(&[u32::MAX, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFF0, (len as u32).saturating_mul(16), 0x0001_0000]);
                let with = if rng.below(2) == 0 { value.to_be_bytes() } else { value.to_le_bytes() };
                Mutation::Overwrite { at, len: 4, with: with.to_vec(), field: None }
            }
        }
    }

    fn apply(&self, data: &[u8]) -> Vec<u8> {
        match self {
            Mutation::BitFlips(flips) => {
                let mut out = data.to_vec();
                for &(at, mask) in flips {
                    out[at] ^= mask;
                }
                out
            }
            Mutation::Truncate(len) => data[..*len].to_vec(),
            Mutation::Splice { from, to, len } => {
                let mut out = data.to_vec();
                out.copy_within(*from..from + len, *to);
                out
            }
            Mutation::Overwrite { at, len, with, .. } => [&data[..*at], with.as_slice(), &data[at + len..]].concat(),
        }
    }
}

/// A value for a size field that a parser must not believe: huge (allocations, offsets past
/// the end), or too small for what follows.
fn inflated(rng: &mut Rng, field: SizeField, file_len: usize) -> Vec<u8> {
    let huge32 = [u32::MAX, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFF8, (file_len as u32).saturating_mul(8), 0, 1, 7];
    match field.kind {
        FieldKind::U16Be => rng.pick(&[0xFFFFu16, 0x8000, 0, 1, 2]).to_be_bytes().to_vec(),
        FieldKind::U32Be => rng.pick(&huge32).to_be_bytes().to_vec(),
        FieldKind::U32Le => rng.pick(&huge32).to_le_bytes().to_vec(),
        FieldKind::Vint => rng
            .pick(&[
                &[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE][..], // 2^56 - 2
                &[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF][..], // "unknown size"
                &[0x01, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF][..], // 4 GiB
                &[0x10, 0xFF, 0xFF, 0xFE][..],                         // 256 MiB
                &[0x80][..],                                           // 0
                &[0xFF][..],                                           // 1-byte "unknown size"
            ])
            .to_vec(),
        FieldKind::Varint => rng
            .pick(&[
                &[0xFF, 0xFF, 0xFF, 0xFF, 0x0F][..],                               // 2^32 - 1
                &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..], // 2^64 - 1
                &[0x80, 0x80, 0x80, 0x80, 0x08][..],                               // 2^31
                &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F][..],       // 2^63 - 1
                &[0x00][..],                                                       // 0
            ])
            .to_vec(),
        FieldKind::Int => rng
            .pick(&[
                &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40][..],       // 2^62
                &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F][..],       // 2^63 - 1
                &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..], // -1
                &[0x80, 0x80, 0x80, 0x80, 0x08][..],                               // 2^31
                &[0x00][..],                                                       // 0
            ])
            .to_vec(),
    }
}

/// The length and count fields of a file, by format (found by a small walker of its structure),
/// where inflated values do the most damage. MPEG-TS has none worth the name: it gets random ones.
fn size_fields(name: &str, data: &[u8]) -> Vec<SizeField> {
    let mut fields = Vec::new();
    match name.rsplit('.').next().unwrap() {
        "mp4" => mp4_fields(data, 0, data.len(), 0, &mut fields),
        "mkv" | "webm" => ebml_fields(data, 0, data.len(), 0, &mut fields),
        "png" => png_fields(data, &mut fields),
        "jpg" => jpeg_fields(data, &mut fields),
        "webp" => webp_fields(data, &mut fields),
        "onnx" => {
            protobuf_fields(data, 0, data.len(), 0, &mut fields);
        }
        _ => {}
    }
    fields
}

fn be32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().unwrap())
}

fn mp4_fields(data: &[u8], start: usize, end: usize, depth: usize, out: &mut Vec<SizeField>) {
    const CONTAINERS: [&[u8; 4]; 12] = [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"dinf", b"edts", b"udta", b"mvex", b"moof", b"traf", b"mfra"];
    // Full boxes whose entry count (after version and flags) sizes an allocation.
    const COUNTED: [&[u8; 4]; 9] = [b"stts", b"stsc", b"stco", b"co64", b"stss", b"ctts", b"elst", b"trun", b"stsd"];
    let mut at = start;
    while at + 8 <= end && depth < 8 {
        let size = be32(data, at) as usize;
        let kind: &[u8; 4] = data[at + 4..at + 8].try_into().unwrap();
        out.push(SizeField { at, len: 4, kind: FieldKind::U32Be });
        let (header, size) = match size {
            0 => (8, end - at),
            1 if at + 16 <= end => {
                out.push(SizeField { at: at + 12, len: 4, kind: FieldKind::U32Be });
                (16, u64::from_be_bytes(data[at + 8..at + 16].try_into().unwrap()) as usize)
            }
            s => (8, s),
        };
        if size < header || size > end - at {
            return;
        }
        let body = at + header;
        if COUNTED.contains(&kind) && body + 8 <= at + size {
            out.push(SizeField { at: body + 4, len: 4, kind: FieldKind::U32Be });
        }
        if kind == b"stsz" && body + 12 <= at + size {
            out.push(SizeField { at: body + 8, len: 4, kind: FieldKind::U32Be });
        }
        if CONTAINERS.contains(&kind) {
            mp4_fields(data, body, at + size, depth + 1, out);
        } else if kind == b"stsd" {
            mp4_fields(data, body + 8, at + size, depth + 1, out);
        } else if matches!(kind, b"avc1" | b"hvc1" | b"hev1" | b"vp09" | b"av01" | b"mp4v" | b"mp4a") {
            // A visual sample entry's fixed fields come before its child boxes (avcC, vpcC...).
            let skip = if kind == b"mp4a" { 28 } else { 78 };
            mp4_fields(data, body + skip, at + size, depth + 1, out);
        }
        at += size;
    }
}

/// An EBML variable-size integer at `at`: its length and value (`None` for the reserved
/// all-ones "unknown" value).
fn ebml_vint(data: &[u8], at: usize) -> Option<(usize, Option<u64>)> {
    let first = *data.get(at)?;
    let len = first.leading_zeros() as usize + 1;
    if len > 8 || at + len > data.len() {
        return None;
    }
    let mut value = u64::from(first) & (0xFF >> len);
    for &b in &data[at + 1..at + len] {
        value = (value << 8) | u64::from(b);
    }
    let all_ones = (1u64 << (7 * len)) - 1;
    Some((len, (value != all_ones).then_some(value)))
}

fn ebml_fields(data: &[u8], start: usize, end: usize, depth: usize, out: &mut Vec<SizeField>) {
    const MASTERS: [u64; 16] = [
        0x1A45_DFA3,
        0x1853_8067,
        0x114D_9B74,
        0x4DBB,
        0x1549_A966,
        0x1654_AE6B,
        0xAE,
        0xE0,
        0x1F43_B675,
        0xA0,
        0x1C53_BB6B,
        0xBB,
        0xB7,
        0x1254_C367,
        0x7373,
        0x6D80,
    ];
    let mut at = start;
    while at < end && depth < 8 {
        let Some((id_len, _)) = ebml_vint(data, at).filter(|(l, _)| *l <= 4) else { return };
        let id = data[at..at + id_len].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let Some((size_len, size)) = ebml_vint(data, at + id_len) else { return };
        out.push(SizeField { at: at + id_len, len: size_len, kind: FieldKind::Vint });
        let body = at + id_len + size_len;
        let body_end = size.map_or(end, |s| body.saturating_add(s as usize)).min(end);
        if MASTERS.contains(&id) {
            ebml_fields(data, body, body_end, depth + 1, out);
        }
        at = body_end;
    }
}

fn png_fields(data: &[u8], out: &mut Vec<SizeField>) {
    let mut at = 8;
    while at + 12 <= data.len() {
        out.push(SizeField { at, len: 4, kind: FieldKind::U32Be });
        if &data[at + 4..at + 8] == b"IHDR" {
            out.push(SizeField { at: at + 8, len: 4, kind: FieldKind::U32Be });
            out.push(SizeField { at: at + 12, len: 4, kind: FieldKind::U32Be });
        }
        at += 12 + be32(data, at) as usize;
    }
}

/// Recomputes the CRC of every whole chunk of a PNG.
fn repair_png_crcs(png: &mut [u8]) {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| std::array::from_fn(|n| (0..8).fold(n as u32, |c, _| if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 })));
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = be32(png, at) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e + 4 <= png.len()) else { return };
        let crc = !png[at + 4..end].iter().fold(!0u32, |c, &b| table[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8));
        png[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

fn jpeg_fields(data: &[u8], out: &mut Vec<SizeField>) {
    let mut at = 2;
    while at + 4 <= data.len() && data[at] == 0xFF {
        let marker = data[at + 1];
        if (0xD0..=0xD9).contains(&marker) || marker == 0x01 {
            at += 2;
            continue;
        }
        out.push(SizeField { at: at + 2, len: 2, kind: FieldKind::U16Be });
        if matches!(marker, 0xC0..=0xC3) && at + 9 <= data.len() {
            // SOF: height and width.
            out.push(SizeField { at: at + 5, len: 2, kind: FieldKind::U16Be });
            out.push(SizeField { at: at + 7, len: 2, kind: FieldKind::U16Be });
        }
        if marker == 0xDA {
            return;
        }
        at += 2 + usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]]));
    }
}

fn webp_fields(data: &[u8], out: &mut Vec<SizeField>) {
    out.push(SizeField { at: 4, len: 4, kind: FieldKind::U32Le });
    let mut at = 12;
    while at + 8 <= data.len() {
        out.push(SizeField { at: at + 4, len: 4, kind: FieldKind::U32Le });
        let size = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
        at += 8 + size + (size & 1);
    }
}

fn protobuf_varint(data: &[u8], at: usize, end: usize) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for i in 0..10 {
        let b = *data.get(at + i).filter(|_| at + i < end)?;
        value |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Walks `data[start..end]` as a protobuf message, recording each integer and the length of each
/// length-delimited field, and those of the fields nested in it that parse as messages themselves. Weights
/// (large byte fields) seldom parse as messages and are skipped. Returns whether the whole range
/// parsed.
fn protobuf_fields(data: &[u8], start: usize, end: usize, depth: usize, out: &mut Vec<SizeField>) -> bool {
    let mut found = Vec::new();
    let mut at = start;
    while at < end {
        let Some((key, n)) = protobuf_varint(data, at, end) else { return false };
        if key >> 3 == 0 {
            return false;
        }
        at += n;
        match key & 7 {
            0 => match protobuf_varint(data, at, end) {
                Some((_, n)) => {
                    // Integers are counts and dimensions too (a tensor's dims, an attribute's ints).
                    found.push(SizeField { at, len: n, kind: FieldKind::Int });
                    at += n;
                }
                None => return false,
            },
            1 => at += 8,
            5 => at += 4,
            2 => {
                let Some((len, n)) = protobuf_varint(data, at, end) else { return false };
                found.push(SizeField { at, len: n, kind: FieldKind::Varint });
                let body = at + n;
                let Some(body_end) = usize::try_from(len).ok().and_then(|l| body.checked_add(l)).filter(|&e| e <= end) else {
                    return false;
                };
                if depth < 12 && len > 0 {
                    let mut nested = Vec::new();
                    if protobuf_fields(data, body, body_end, depth + 1, &mut nested) {
                        found.extend(nested);
                    }
                }
                at = body_end;
            }
            _ => return false,
        }
    }
    if at == end {
        out.extend(found);
    }
    at == end
}
