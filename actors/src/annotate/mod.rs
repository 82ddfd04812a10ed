//! A session's annotated video: its processed frames with boxes, classes, confidences and track
//! ids drawn on (each track in a colour of its own), and its lines and zones with their running
//! counts, encoded as H.264 MP4 while the frames come, in a thread of its own.
//!
//! The picture is the frame as the model saw it (the letterbox without its padding), so drawing
//! costs no second decode or scale. Back-pressure is the decoder's credits: a frame's credit
//! goes back once its picture is encoded, so a slow encoder slows decoding and at most
//! `credits` pictures wait.

mod draw;
mod encoder;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

use actix::Recipient;
use serde::Serialize;

use crate::detect::Detection;
use crate::frame::ModelFrame;
use crate::track::{Line, Zone};
use draw::{Canvas, Rgb, label_height, track_color};
use encoder::Mp4Writer;

/// What a session's annotation needs to know.
#[derive(Debug, Clone)]
pub struct AnnotateOptions {
    /// Where the file is written while the session runs (the service's temp directory).
    pub dir: PathBuf,
    /// The most bytes the video may take; past it, annotation stops and `end` says why.
    pub max_bytes: u64,
    /// Where clients fetch the file once `end` came, named in `end` (the service's
    /// `/sessions/{id}/video`); `None` for a local run.
    pub url: Option<String>,
}

/// The finished file. It is removed when the last holder lets go of it (for the service: when
/// the session's replay window ends).
#[derive(Clone)]
pub struct VideoFile(Arc<tempfile::NamedTempFile>);

impl VideoFile {
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl std::fmt::Debug for VideoFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VideoFile({})", self.path().display())
    }
}

impl PartialEq for VideoFile {
    fn eq(&self, other: &Self) -> bool {
        self.path() == other.path()
    }
}

/// How annotation went, as `end` reports it under `video`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AnnotatedVideo {
    Written {
        #[serde(skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        /// The file's size.
        bytes: u64,
        frames: u64,
        #[serde(skip)]
        file: VideoFile,
        /// Seconds the annotator spent drawing and encoding (its thread's cost).
        #[serde(skip)]
        busy_seconds: f64,
    },
    Failed {
        error: String,
    },
}

/// The annotator's answer once the file is complete (or annotation failed).
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct AnnotationDone(pub AnnotatedVideo);

/// One processed frame to draw and encode.
pub struct Picture {
    pub frame: ModelFrame,
    pub pts: f64,
    pub detections: Vec<Detection>,
    /// The running counts, one line of text each.
    pub counts: Vec<String>,
}

enum Work {
    Draw(Box<Picture>),
    Finish,
}

/// The sending side of a session's annotator thread.
pub struct Annotator {
    work: mpsc::Sender<Work>,
}

impl Annotator {
    /// Starts the thread. `encoded` runs after each picture is encoded (or dropped, once
    /// annotation failed): the session's credit back to its decoder. `done` gets the outcome
    /// after [`finish`](Self::finish).
    pub fn start(
        options: AnnotateOptions,
        overlay: (Vec<Line>, Vec<Zone>),
        frame_rate: f64,
        encoded: Box<dyn Fn() + Send>,
        done: Recipient<AnnotationDone>,
    ) -> std::io::Result<Annotator> {
        let file = crate::buffer::locked_temp_file(&options.dir, ".mp4")?;
        let (work, jobs) = mpsc::channel();
        std::thread::Builder::new().name("streamdet-annotate".into()).spawn(move || {
            let outcome = run(&options, file, &overlay, frame_rate, &jobs, &*encoded);
            done.do_send(AnnotationDone(outcome));
        })?;
        Ok(Annotator { work })
    }

    pub fn draw(&self, picture: Picture) {
        let _ = self.work.send(Work::Draw(Box::new(picture)));
    }

    /// No more pictures: complete the file.
    pub fn finish(&self) {
        let _ = self.work.send(Work::Finish);
    }
}

/// The thread: draws and encodes pictures until `Finish`, or until the session drops its
/// sender (it failed: the file goes with `file`).
fn run(
    options: &AnnotateOptions,
    file: tempfile::NamedTempFile,
    overlay: &(Vec<Line>, Vec<Zone>),
    frame_rate: f64,
    jobs: &mpsc::Receiver<Work>,
    encoded: &dyn Fn(),
) -> AnnotatedVideo {
    let mut writer: Option<Mp4Writer> = None;
    let mut failure: Option<String> = None;
    let mut frames = 0;
    let mut busy = std::time::Duration::ZERO;
    let finished = loop {
        match jobs.recv() {
            Ok(Work::Draw(picture)) => {
                if failure.is_none() {
                    let started = std::time::Instant::now();
                    // A bug here must not leave the decoder waiting for credits that never come.
                    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| draw_and_encode(&mut writer, &file, *picture, overlay, frame_rate)))
                        .unwrap_or_else(|_| Err("the annotator panicked".into()));
                    busy += started.elapsed();
                    if let Err(err) = drawn {
                        failure = Some(format!("annotating failed: {err}"));
                    } else if writer.as_ref().is_some_and(|w| w.bytes() > options.max_bytes) {
                        failure = Some(format!("the annotated video grew past its limit of {} bytes", options.max_bytes));
                    } else {
                        frames += 1;
                    }
                }
                encoded();
            }
            Ok(Work::Finish) => break true,
            Err(_) => break false,
        }
    };
    if let Some(error) = failure {
        return AnnotatedVideo::Failed { error };
    }
    if !finished {
        return AnnotatedVideo::Failed { error: "the session ended".into() };
    }
    let Some(writer) = writer else { return AnnotatedVideo::Failed { error: "no frame was processed".into() } };
    let started = std::time::Instant::now();
    let written = writer.finish().map_err(|e| e.to_string()).and_then(|_| std::fs::metadata(file.path()).map_err(|e| e.to_string()));
    busy += started.elapsed();
    match written {
        Ok(metadata) => AnnotatedVideo::Written {
            url: options.url.clone(),
            bytes: metadata.len(),
            frames,
            file: VideoFile(Arc::new(file)),
            busy_seconds: busy.as_secs_f64(),
        },
        Err(err) => AnnotatedVideo::Failed { error: format!("annotating failed: {err}") },
    }
}

const BOX_WITHOUT_TRACK: Rgb = [255, 255, 255];
const LINE_COLOR: Rgb = [255, 48, 48];
const ZONE_COLOR: Rgb = [255, 214, 0];
const INK: Rgb = [0, 0, 0];

/// Draws on the frame's picture (the letterbox without padding) and encodes it.
fn draw_and_encode(
    writer: &mut Option<Mp4Writer>,
    file: &tempfile::NamedTempFile,
    picture: Picture,
    overlay: &(Vec<Line>, Vec<Zone>),
    frame_rate: f64,
) -> Result<(), String> {
    let letterbox = picture.frame.letterbox;
    let (width, height) = letterbox.scaled;
    let (left, top) = letterbox.pad;
    let row = letterbox.target.0 * 3;
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in top..top + height {
        pixels.extend_from_slice(&picture.frame.rgb[y * row + left * 3..y * row + (left + width) * 3]);
    }
    // Source pixels to picture pixels.
    let scale = letterbox.scale;
    let at = |p: (f32, f32)| (p.0 * scale, p.1 * scale);
    let text_size = (height as f32 / 28.0).clamp(11.0, 22.0);
    // At least 3 pixels: with chroma at half resolution, thinner lines lose their colour.
    let thickness = ((height as f32 / 160.0).round() as i64).max(3);
    let mut canvas = Canvas::new(&mut pixels, width, height);
    let (lines, zones) = overlay;
    for zone in zones {
        let points: Vec<(f32, f32)> = zone.points.iter().map(|&p| at(p)).collect();
        canvas.polygon(&points, thickness, ZONE_COLOR);
        canvas.label(points[0].0, points[0].1, text_size, &zone.name, ZONE_COLOR, INK);
    }
    for line in lines {
        let (a, b) = (at(line.a), at(line.b));
        canvas.line(a, b, thickness, LINE_COLOR);
        canvas.label((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0, text_size, &line.name, LINE_COLOR, INK);
    }
    for detection in &picture.detections {
        let color = detection.track_id.map_or(BOX_WITHOUT_TRACK, track_color);
        let bbox = detection.bbox.map(|v| v * scale);
        canvas.outline(bbox, thickness, color);
        let text = match detection.track_id {
            Some(id) => format!("{} #{id} {:.2}", detection.class_name, detection.confidence),
            None => format!("{} {:.2}", detection.class_name, detection.confidence),
        };
        // Above the box, or inside its top when the box touches the picture's top.
        canvas.label(bbox[0], bbox[1] - label_height(text_size), text_size, &text, color, INK);
    }
    let mut y = 2.0;
    for count in &picture.counts {
        canvas.label(2.0, y, text_size, count, INK, [255, 255, 255]);
        y += text_size + 6.0;
    }
    let writer = match writer {
        Some(writer) => writer,
        None => writer.insert(Mp4Writer::create(file.path(), width, height, frame_rate).map_err(|e| e.to_string())?),
    };
    writer.write(&pixels, width, height, picture.pts).map_err(|e| e.to_string())
}
