//! Wiring: one call builds a session out of the actors; a handle feeds it and reads its events.
//!
//! ```no_run
//! # async fn run(detector: streamdet_actors::detect::Detector) {
//! use std::sync::Arc;
//! use streamdet_actors::pipeline::{Pipeline, PipelineOptions, SessionParams};
//!
//! // Inside an actix system (an actix-web handler, `actix_rt::System::new().block_on`):
//! let pipeline = Pipeline::start(Arc::new(detector), PipelineOptions::default());
//! let session = pipeline.session(SessionParams::default()).unwrap();
//! let (upload, mut events) = session.split();
//! upload.feed(bytes::Bytes::from_static(b"...video bytes...")).await.ok();
//! upload.finish();
//! while let Some(event) = events.recv().await {
//!     println!("{}", serde_json::to_string(&event).unwrap());
//! }
//! # }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::ErrorCode;
use crate::actors::decoder::DecoderActor;
use crate::actors::inference::{BatchPolicy, Inference, InferenceObserver};
use crate::actors::messages::{AbortUpload, Chunk, DecoderReports, Fail, Finish, UploadError, UploadReports};
use crate::actors::session::{Session, SessionParts};
use crate::actors::uploader::Uploader;
use crate::actors::{Event, ModelSummary};
use crate::annotate::AnnotateOptions;
use crate::buffer::{self, BufferOptions};
use crate::decode::{DecodeOptions, FrameSelection};
use crate::detect::{DetectParams, Detector};
use crate::track::{Tracking, TrackingParams};

/// Settings shared by every session of a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// The model's name in `start` events.
    pub model_name: String,
    pub buffer: BufferOptions,
    /// Decoder limits and threads (the target size and selection are set per session).
    pub decode: DecodeOptions,
    pub batch: BatchPolicy,
    /// Frames a session may have in flight between decoder and inference.
    pub credits: usize,
    pub max_upload_bytes: u64,
    /// How far (bytes) the upload may run ahead of the decoder before the body is read no
    /// further, so a slow decoder pushes back on the client; `None`: the disk absorbs it all.
    pub max_lag_bytes: Option<u64>,
    /// Keep each complete upload as `<media_dir>/<sha256>.<ext>`; `None`: uploads are deleted.
    pub media_dir: Option<PathBuf>,
    /// Receives batch timings and queue depths, for metrics.
    pub observer: Option<Arc<dyn InferenceObserver>>,
    /// A session still running after this long ends with a `timeout` error.
    pub max_session_duration: Option<Duration>,
}

impl std::fmt::Debug for dyn InferenceObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InferenceObserver")
    }
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            model_name: "model".into(),
            buffer: BufferOptions::default(),
            decode: DecodeOptions::default(),
            batch: BatchPolicy { batch_size: 1, batch_timeout: Duration::from_millis(5) },
            credits: 4,
            max_upload_bytes: 4 << 30,
            max_lag_bytes: None,
            media_dir: None,
            observer: None,
            max_session_duration: None,
        }
    }
}

/// What one session asks for.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// A client-chosen id; a random one when `None`.
    pub id: Option<String>,
    pub selection: FrameSelection,
    pub detect: DetectParams,
    /// The input is unbounded (a pipe): free consumed bytes when the container allows.
    pub live: bool,
    /// Stop after this many processed frames: `end` comes then, and the rest of the upload is
    /// read and dropped.
    pub max_frames: Option<u64>,
    /// Track objects (and count them at lines and in zones).
    pub tracking: Option<TrackingParams>,
    /// Write an annotated video.
    pub annotate: Option<AnnotateOptions>,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            id: None,
            selection: FrameSelection::All,
            detect: DetectParams::default(),
            live: false,
            max_frames: None,
            tracking: None,
            annotate: None,
        }
    }
}

/// The shared part: the inference actor and the settings. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    inference: Addr<Inference>,
    detector: Arc<Detector>,
    options: Arc<PipelineOptions>,
    next_key: Arc<AtomicU64>,
}

/// A fresh session id: 128 bits from the operating system's random generator, as 32 hex
/// digits, so that nobody can guess another client's id.
pub fn new_session_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Pipeline {
    /// Starts the inference actor. Must run inside an actix system.
    pub fn start(detector: Arc<Detector>, options: PipelineOptions) -> Self {
        let inference = Inference::new(Arc::clone(&detector), options.batch, options.observer.clone()).start();
        Pipeline { inference, detector, options: Arc::new(options), next_key: Arc::new(AtomicU64::new(1)) }
    }

    pub fn detector(&self) -> &Arc<Detector> {
        &self.detector
    }

    /// Starts a session: a buffer, its uploader, decoder and session actors.
    pub fn session(&self, params: SessionParams) -> std::io::Result<SessionHandle> {
        let writer = buffer::create(&self.options.buffer)?;
        let reader = writer.buffer().reader();
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let id = match params.id.clone() {
            Some(id) => id,
            None => new_session_id()?,
        };
        let (tx, rx) = unbounded_channel();
        let size = self.detector.input_size();
        let model = ModelSummary { name: self.options.model_name.clone(), input: [size.width, size.height], classes: self.detector.class_names().len() };
        let decode =
            DecodeOptions { target: size, selection: params.selection, live: params.live, max_frames: params.max_frames, ..self.options.decode.clone() };
        // A tracking session detects down to the tracker's low threshold, for ByteTrack's second
        // round; boxes under the asked confidence are shown only when a track takes them.
        let shown_confidence = params.detect.conf;
        let mut detect = params.detect;
        if let Some(tracking) = &params.tracking {
            detect.conf = detect.conf.min(tracking.track.low_threshold);
        }
        let detect = Arc::new(detect);
        let tracking = params.tracking.map(|tracking| (Tracking::new(tracking), shown_confidence));
        let annotate = params.annotate;
        let (inference, credits) = (self.inference.clone(), self.options.credits);
        let session_id = id.clone();
        let max_duration = self.options.max_session_duration;
        // The uploader and the session address each other: make the uploader's mailbox first.
        let uploader_context = Context::<Uploader>::new();
        let uploader = uploader_context.address();
        let buffer = writer.buffer().clone();
        let media_dir = self.options.media_dir.clone();
        let session_uploader = uploader.clone();
        let session = Session::create(move |ctx| {
            let session = ctx.address();
            let reports = DecoderReports { opened: session.clone().recipient(), finished: session.clone().recipient(), frames: session.recipient() };
            let decoder = DecoderActor::new(key, reader, decode, detect, credits, reports, inference.clone()).start();
            if let Some(limit) = max_duration {
                ctx.notify_later(Fail { code: ErrorCode::Timeout, message: format!("the session ran longer than {} s", limit.as_secs_f64()) }, limit);
            }
            let parts = SessionParts { inference, decoder, uploader: session_uploader, buffer, media_dir };
            Session::new(session_id, key, tx, model, parts).tracking(tracking).annotate(annotate)
        });
        let reports = UploadReports { finished: session.clone().recipient(), failed: session.clone().recipient() };
        uploader_context.run(Uploader::new(writer, self.options.max_upload_bytes, self.options.max_lag_bytes, reports));
        Ok(SessionHandle { id, upload: UploadHandle { uploader, session }, events: rx })
    }
}

/// A running session: feed it, read its events.
pub struct SessionHandle {
    pub id: String,
    upload: UploadHandle,
    events: UnboundedReceiver<Event>,
}

impl SessionHandle {
    /// Separates the feeding side from the events, for a task each.
    pub fn split(self) -> (UploadHandle, UnboundedReceiver<Event>) {
        (self.upload, self.events)
    }
}

/// The feeding side of a session. Dropping it before [`finish`](Self::finish) abandons the
/// upload.
#[derive(Clone)]
pub struct UploadHandle {
    uploader: Addr<Uploader>,
    session: Addr<Session>,
}

impl UploadHandle {
    /// Appends a chunk; resolves once it is in the buffer.
    pub async fn feed(&self, chunk: Bytes) -> Result<(), UploadError> {
        match self.uploader.send(Chunk(chunk)).await {
            Ok(result) => result,
            Err(_) => Err(UploadError::Closed),
        }
    }

    /// Feeds every chunk of `chunks` as it arrives, then finishes the upload. An error item
    /// abandons it (the session ends with the error's code, `truncated` for a plain message),
    /// and so does a client slower than `pace` allows (a `timeout` error). Stops early if the
    /// session ends.
    pub async fn feed_all<S, E>(self, mut chunks: S, pace: UploadPace)
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
        E: Into<BodyError>,
    {
        use futures_util::StreamExt;
        let mut rate = pace.min_rate.map(RateWindow::new);
        loop {
            let waited = std::time::Instant::now();
            let next = match pace.idle {
                Some(limit) => match actix::clock::timeout(limit, chunks.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.abort(ErrorCode::Timeout, format!("no upload data arrived for {} s", limit.as_secs_f64()));
                        return;
                    }
                },
                None => chunks.next().await,
            };
            let bytes = match next {
                None => break,
                Some(Ok(bytes)) => bytes,
                Some(Err(err)) => {
                    let err = err.into();
                    self.abort(err.code, err.message);
                    return;
                }
            };
            // Only the time spent waiting for the client counts: while `feed` holds the body
            // back for a lagging decoder, the slowness is ours.
            if let Some(Err(message)) = rate.as_mut().map(|window| window.record(waited.elapsed(), bytes.len() as u64)) {
                self.abort(ErrorCode::Timeout, message);
                return;
            }
            if self.feed(bytes).await.is_err() {
                return; // the session ended; its events say why
            }
        }
        self.finish();
    }

    /// The upload is complete.
    pub fn finish(&self) {
        self.uploader.do_send(Finish);
    }

    /// The upload cannot complete: the session ends with this error.
    pub fn abort(&self, code: ErrorCode, message: impl Into<String>) {
        self.uploader.do_send(AbortUpload { code, message: message.into() });
    }

    /// Ends the session now with an error event.
    pub fn cancel(&self, code: ErrorCode, message: impl Into<String>) {
        self.session.do_send(Fail { code, message: message.into() });
    }
}

/// Why a request body could not be read to its end, as the session's error event says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    /// The event's error code (`truncated`, `too_large`, `bad_parameter`, ...).
    pub code: ErrorCode,
    pub message: String,
}

impl From<String> for BodyError {
    /// A body that broke off.
    fn from(message: String) -> Self {
        BodyError { code: ErrorCode::Truncated, message: format!("the upload broke off: {message}") }
    }
}

impl From<std::io::Error> for BodyError {
    /// A source that failed to read.
    fn from(err: std::io::Error) -> Self {
        BodyError::from(err.to_string())
    }
}

impl From<std::convert::Infallible> for BodyError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// How slow an upload may be before the session gives up on it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UploadPace {
    /// The longest pause between two chunks.
    pub idle: Option<Duration>,
    /// The least data per window: `(bytes per second, window)`, so that a client trickling a
    /// byte at a time cannot hold a session for long.
    pub min_rate: Option<(u64, Duration)>,
}

/// Bytes received over windows of client time.
pub struct RateWindow {
    bytes_per_second: u64,
    window: Duration,
    elapsed: Duration,
    bytes: u64,
}

impl RateWindow {
    pub fn new((bytes_per_second, window): (u64, Duration)) -> Self {
        RateWindow { bytes_per_second, window, elapsed: Duration::ZERO, bytes: 0 }
    }

    /// Counts a chunk that took `waited` to arrive; an error once a whole window stayed under
    /// the rate.
    pub fn record(&mut self, waited: Duration, bytes: u64) -> Result<(), String> {
        self.elapsed += waited;
        self.bytes += bytes;
        if self.elapsed < self.window {
            return Ok(());
        }
        let rate = self.bytes as f64 / self.elapsed.as_secs_f64();
        if rate < self.bytes_per_second as f64 {
            return Err(format!(
                "the upload arrived at {rate:.0} bytes/s over {:.0} s, under the minimum of {} bytes/s",
                self.elapsed.as_secs_f64(),
                self.bytes_per_second
            ));
        }
        *self = RateWindow::new((self.bytes_per_second, self.window));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_random_and_long() {
        let a = new_session_id().unwrap();
        let b = new_session_id().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_trickle_fails_the_rate_window_and_a_steady_upload_passes() {
        let mut window = RateWindow::new((1000, Duration::from_secs(30)));
        for _ in 0..29 {
            assert!(window.record(Duration::from_secs(1), 1).is_ok(), "judged only after a whole window");
        }
        assert!(window.record(Duration::from_secs(1), 1).is_err(), "one byte a second");
        let mut window = RateWindow::new((1000, Duration::from_secs(30)));
        for _ in 0..100 {
            assert!(window.record(Duration::from_secs(1), 2000).is_ok());
        }
    }
}
