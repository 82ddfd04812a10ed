//! `streamdet detect FILE|-`: the streaming pipeline run locally — the same actors as the
//! service — printing its events as NDJSON. `-` reads stdin as it arrives, so
//! `ffmpeg ... -f mpegts - | streamdet detect -` works on a live encode.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use streamdet_actors::actors::Event;
use streamdet_actors::actors::inference::BatchPolicy;
use streamdet_actors::annotate::{AnnotateOptions, AnnotatedVideo};
use streamdet_actors::pipeline::{Pipeline, PipelineOptions, SessionParams, UploadPace};

use super::Failure;
use super::{DetectArgs, ModelArgs, SelectionArgs};
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A video file, or `-` to read standard input as it arrives.
    input: String,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    selection: SelectionArgs,
    #[command(flatten)]
    detect: DetectArgs,
    /// Stop after N processed frames.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_frames: Option<u64>,
    /// Track objects across frames (ByteTrack, `[track]` in config.toml): each box gets a
    /// `track_id`, a `track` event reports each track when it ends, `end` counts them per class.
    #[arg(long)]
    track: bool,
    /// Counting lines, `[name:]x1,y1,x2,y2` separated by `;`, in pixels of the frame as
    /// displayed: a `crossing` event each time a track's bottom centre crosses one. Implies
    /// --track.
    #[arg(long, value_name = "LINES")]
    lines: Option<String>,
    /// Zones, `[name:]x1,y1,x2,y2,x3,y3[,...]` separated by `;`: `zone` events when a track
    /// enters or leaves one. Implies --track.
    #[arg(long, value_name = "ZONES")]
    zones: Option<String>,
    /// Write an annotated H.264 MP4 of the processed frames here: boxes, classes, confidences,
    /// track ids, lines and zones with their counts.
    #[arg(long, value_name = "OUT.mp4")]
    annotate: Option<std::path::PathBuf>,
}

/// Reads `source` in chunks into a bounded channel (so a fast file waits for the pipeline).
fn read_chunks(mut source: impl Read + Send + 'static) -> tokio::sync::mpsc::Receiver<std::io::Result<Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let item = match source.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => Ok(Bytes::copy_from_slice(&chunk[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    rx
}

pub fn run(args: Args, config: &Config) -> Result<ExitCode, Failure> {
    let selection = args.selection.selection(config)?;
    args.detect.validate()?;
    let live = args.input == "-";
    let source: Box<dyn Read + Send> = if live {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(&args.input).map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot open {}: {e}", args.input)))?)
    };
    let detector = args.model.load(config)?;
    let detect = args.detect.params(&detector, config)?;
    let model_path = args.model.path(config);
    let options = PipelineOptions {
        // One local session: no batching across sessions to wait for, no upload limits.
        batch: BatchPolicy { batch_size: 1, batch_timeout: Duration::ZERO },
        max_upload_bytes: u64::MAX,
        media_dir: None,
        max_session_duration: None,
        // (max_lag_bytes stays: reading a pipe no faster than the decoder keeps a live encode
        // from filling the disk.)
        ..config.pipeline_options(model_path.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned()))
    };
    let tracking = config.track.request(args.track.then_some("bytetrack"), args.lines.as_deref(), args.zones.as_deref()).map_err(Failure::Usage)?;
    // Written in the temp directory, where `streamdet serve` sweeps what a crash leaves, then
    // moved to its destination.
    let annotate = args.annotate.as_ref().map(|_| AnnotateOptions { max_bytes: u64::MAX, ..config.annotate_options() });
    let params = SessionParams { id: None, selection, detect, live, max_frames: args.max_frames, tracking, annotate };
    let system = actix_rt::System::new();
    let code = system.block_on(async move {
        let pipeline = Pipeline::start(Arc::new(detector), options);
        let session = pipeline.session(params)?;
        let (upload, mut events) = session.split();
        let chunks = read_chunks(source);
        let chunks = futures_util::stream::unfold(chunks, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        actix_rt::spawn(upload.feed_all(Box::pin(chunks), UploadPace::default()));
        let stdout = std::io::stdout();
        let mut code = ExitCode::SUCCESS;
        while let Some(event) = events.recv().await {
            if let Event::Error { message, .. } = &event {
                eprintln!("streamdet: {message}");
                code = ExitCode::from(1);
            }
            match (&event, &args.annotate) {
                (Event::End { video: Some(AnnotatedVideo::Written { file, .. }), .. }, Some(out)) => {
                    // The temp file is private to us (0600); the video is the user's, made as
                    // `touch` would make it.
                    let moved = std::fs::rename(file.path(), out).or_else(|_| std::fs::copy(file.path(), out).map(drop));
                    if let Err(err) = moved.and_then(|()| std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o644))) {
                        eprintln!("streamdet: cannot write {}: {err}", out.display());
                        code = ExitCode::from(1);
                    }
                }
                (Event::End { video: Some(AnnotatedVideo::Failed { error }), .. }, _) => {
                    eprintln!("streamdet: no annotated video: {error}");
                    code = ExitCode::from(1);
                }
                _ => {}
            }
            let line = serde_json::to_string(&event)?;
            if writeln!(stdout.lock(), "{line}").is_err() || event.is_last() {
                break;
            }
        }
        Ok::<_, anyhow::Error>(code)
    })?;
    Ok(code)
}
