//! One session: gathers what the uploader, the decoder and the inference actor report and turns
//! it into [`Event`]s, in order. `end` comes once the upload is complete, the decoder is done and
//! every frame it sent has come back — never before the last `frame`.

use std::path::PathBuf;

use actix::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use super::decoder::DecoderActor;
use super::events::{Event, ModelSummary};
use super::inference::{Forget, FrameDone, Inference};
use super::messages::{Abort, Credit, DecodeFinished, DecoderOpened, Drain, Fail, UploadFailed, UploadFinished};
use super::uploader::Uploader;
use crate::ErrorCode;
use crate::annotate::{AnnotateOptions, AnnotatedVideo, AnnotationDone, Annotator, Picture};
use crate::buffer::Buffer;
use crate::decode::{DecodeError, DecodeStats, MediaInfo};
use crate::track::Tracking;

/// Whether and where a finished upload is kept.
enum Storage {
    Off,
    /// Keep it in this directory as `<sha256>.<ext>`, once the upload and its container are known.
    Wanted(PathBuf),
    /// The file is being moved.
    Moving,
    Stored(PathBuf),
}

/// Where the session's annotated video is.
enum Annotation {
    Off,
    /// Asked for; the annotator starts once the video's frame rate is known.
    Wanted(AnnotateOptions),
    Running(Annotator),
    /// Every frame is drawn; the annotator completes the file.
    Finishing,
    Done(AnnotatedVideo),
}

/// The actors and the buffer a session talks to.
pub struct SessionParts {
    pub inference: Addr<Inference>,
    pub decoder: Addr<DecoderActor>,
    pub uploader: Addr<Uploader>,
    pub buffer: Buffer,
    /// Keep finished uploads in this directory.
    pub media_dir: Option<PathBuf>,
}

pub struct Session {
    pub id: String,
    pub key: u64,
    events: UnboundedSender<Event>,
    model: ModelSummary,
    decoder: Option<Addr<DecoderActor>>,
    inference: Addr<Inference>,
    uploader: Addr<Uploader>,
    buffer: Buffer,
    media: Option<MediaInfo>,
    storage: Storage,
    upload: Option<UploadFinished>,
    /// The decoder stopped at `max_frames`; the rest of the upload is not needed.
    limit_reached: bool,
    /// The uploader was asked to drop the rest of the upload.
    draining: bool,
    decoded: Option<DecodeStats>,
    /// Frames the decoder sent to inference, known once it finished.
    sent: u64,
    /// Why decoding stopped early; reported once the frames sent before it are back.
    decode_error: Option<DecodeError>,
    processed: u64,
    finished: bool,
    /// The session's tracks, and the confidence a box needs to be shown without a track.
    tracking: Option<(Tracking, f32)>,
    annotation: Annotation,
}

impl Session {
    pub fn new(id: String, key: u64, events: UnboundedSender<Event>, model: ModelSummary, parts: SessionParts) -> Self {
        Session {
            id,
            key,
            events,
            model,
            decoder: Some(parts.decoder),
            inference: parts.inference,
            uploader: parts.uploader,
            buffer: parts.buffer,
            media: None,
            storage: parts.media_dir.map_or(Storage::Off, Storage::Wanted),
            upload: None,
            limit_reached: false,
            draining: false,
            decoded: None,
            sent: 0,
            decode_error: None,
            processed: 0,
            finished: false,
            tracking: None,
            annotation: Annotation::Off,
        }
    }

    /// Writes an annotated video (see [`crate::annotate`]).
    pub fn annotate(mut self, options: Option<AnnotateOptions>) -> Self {
        self.annotation = options.map_or(Annotation::Off, Annotation::Wanted);
        self
    }

    /// Starts the annotator, now that the frame rate is known. Its credits go straight back to
    /// the decoder, once each picture is encoded.
    fn start_annotator(&mut self, frame_rate: f64, ctx: &mut Context<Self>) {
        let Annotation::Wanted(options) = std::mem::replace(&mut self.annotation, Annotation::Off) else { return };
        let (Some(decoder), overlay) = (self.decoder.clone(), self.tracking.as_ref().map(|(t, _)| t.overlay()).unwrap_or_default()) else { return };
        let encoded = Box::new(move || decoder.do_send(Credit(1)));
        self.annotation = match Annotator::start(options, overlay, frame_rate, encoded, ctx.address().recipient()) {
            Ok(annotator) => Annotation::Running(annotator),
            Err(err) => Annotation::Done(AnnotatedVideo::Failed { error: format!("cannot start annotating: {err}") }),
        };
    }

    /// Tracks objects over the frames (see [`Tracking`]).
    pub fn tracking(mut self, tracking: Option<(Tracking, f32)>) -> Self {
        self.tracking = tracking;
        self
    }

    fn emit(&mut self, event: Event) {
        if self.finished {
            return;
        }
        self.finished = event.is_last();
        // A receiver that went away (client disconnected) just stops listening.
        let _ = self.events.send(event);
    }

    fn fail(&mut self, ctx: &mut Context<Self>, code: ErrorCode, message: String) {
        self.emit(Event::error(code, message));
        ctx.stop();
    }

    fn maybe_end(&mut self, ctx: &mut Context<Self>) {
        let Some(frames_decoded) = self.decoded.as_ref().map(|decoded| decoded.frames) else { return };
        if self.processed < self.sent {
            return; // frames are still in flight
        }
        if let Some(error) = self.decode_error.take() {
            let code = match error {
                DecodeError::Cancelled => ErrorCode::Truncated,
                _ => error.code(),
            };
            let message = match error {
                DecodeError::Cancelled => "the upload ended before the video was complete".to_string(),
                other => other.to_string(),
            };
            return self.fail(ctx, code, message);
        }
        let Some(upload) = &self.upload else {
            if self.limit_reached && !self.draining {
                self.drain_upload(ctx);
            }
            return;
        };
        if matches!(self.storage, Storage::Moving) {
            return; // `end` names the stored file
        }
        match std::mem::replace(&mut self.annotation, Annotation::Finishing) {
            Annotation::Running(annotator) => return annotator.finish(), // `end` names the video
            Annotation::Finishing => return,
            other => self.annotation = other,
        }
        let media_file = match &self.storage {
            // The name under `media_dir`: where the server keeps files is not the client's
            // business.
            Storage::Stored(path) => path.file_name().map(|name| name.to_string_lossy().into_owned()),
            _ => None,
        };
        let seconds = upload.first_byte.elapsed().as_secs_f64();
        let upload_seconds = round3((upload.last_byte - upload.first_byte).as_secs_f64());
        let (bytes, sha256) = (upload.bytes, upload.sha256.clone());
        // The tracks still open end with the video.
        let tracking = self.tracking.as_mut().map(|(tracking, _)| (tracking.finish(), tracking.totals().clone()));
        let tracking = tracking.map(|(events, totals)| {
            for event in events {
                self.emit(event.into());
            }
            totals
        });
        let video = match std::mem::replace(&mut self.annotation, Annotation::Off) {
            Annotation::Done(video) => Some(video),
            _ => None,
        };
        let event = Event::End {
            frames_decoded,
            frames_processed: self.processed,
            bytes,
            sha256,
            upload_seconds,
            seconds: round3(seconds),
            media_file,
            tracking,
            video,
        };
        self.emit(event);
        ctx.stop();
    }

    /// Every frame asked for is done: the rest of the upload is read and dropped, and `end`
    /// reports the part that arrived so far.
    fn drain_upload(&mut self, ctx: &mut Context<Self>) {
        self.draining = true;
        self.storage = Storage::Off; // only complete uploads are kept
        let drained = self.uploader.send(Drain).into_actor(self).map(|result, session, ctx| match result {
            Ok(upload) => {
                session.upload = Some(upload);
                session.maybe_end(ctx);
            }
            Err(_) => session.fail(ctx, ErrorCode::Internal, "the uploader stopped".into()),
        });
        ctx.spawn(drained);
    }

    /// Moves a complete upload to the media directory, once its hash and container are known.
    /// The decoder may still be reading it: it holds the open file, not the name.
    fn store_upload(&mut self, ctx: &mut Context<Self>) {
        let (Storage::Wanted(dir), Some(upload), Some(media)) = (&self.storage, &self.upload, &self.media) else { return };
        if self.draining {
            return;
        }
        let target = dir.join(format!("{}.{}", upload.sha256, media.file_extension()));
        let (buffer, dir) = (self.buffer.clone(), dir.clone());
        self.storage = Storage::Moving;
        // Renaming is instant, but a copy to another filesystem is not: keep it off the actor's
        // thread.
        let moving = tokio::task::spawn_blocking(move || std::fs::create_dir_all(&dir).and_then(|()| buffer.persist(&target)).map(|()| target));
        let stored = async move { moving.await.unwrap_or_else(|err| Err(std::io::Error::other(err))) }.into_actor(self).map(|result, session, ctx| {
            session.storage = match result {
                Ok(path) => {
                    tracing::info!(session = %session.id, path = %path.display(), "upload stored");
                    Storage::Stored(path)
                }
                Err(err) => {
                    // The detections are what the client came for; a storage problem is the
                    // operator's to see.
                    tracing::error!(session = %session.id, %err, "could not store the upload");
                    Storage::Off
                }
            };
            session.maybe_end(ctx);
        });
        ctx.spawn(stored);
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl Actor for Session {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if !self.finished {
            self.emit(Event::error(ErrorCode::Internal, "the session stopped"));
        }
        if let Some(decoder) = self.decoder.take() {
            decoder.do_send(Abort);
        }
        self.inference.do_send(Forget(self.key));
    }
}

impl Handler<DecoderOpened> for Session {
    type Result = ();

    fn handle(&mut self, DecoderOpened(media): DecoderOpened, ctx: &mut Context<Self>) {
        if let Some((tracking, _)) = &mut self.tracking {
            tracking.start(media.fps);
        }
        self.start_annotator(media.fps, ctx);
        self.media = Some(media.clone());
        let event = Event::Start { session: self.id.clone(), media, model: self.model.clone() };
        self.emit(event);
        self.store_upload(ctx);
    }
}

impl Handler<FrameDone> for Session {
    type Result = ();

    fn handle(&mut self, done: FrameDone, ctx: &mut Context<Self>) {
        match done.result {
            Ok(mut detections) => {
                self.processed += 1;
                let tracked = self.tracking.as_mut().map(|(tracking, shown)| {
                    let events = tracking.observe(done.pts, &mut detections);
                    let shown = *shown;
                    detections.retain(|d| d.confidence >= shown || d.track_id.is_some());
                    events
                });
                match (&self.annotation, done.frame) {
                    // The annotator gives the frame's credit back once it is encoded.
                    (Annotation::Running(annotator), Some(frame)) => {
                        let counts = self.tracking.as_ref().map(|(tracking, _)| tracking.counts_text()).unwrap_or_default();
                        annotator.draw(Picture { frame, pts: done.pts, detections: detections.clone(), counts });
                    }
                    _ => {
                        if let Some(decoder) = &self.decoder {
                            decoder.do_send(Credit(1));
                        }
                    }
                }
                self.emit(Event::Frame { index: done.index, pts: done.pts, detections });
                for event in tracked.into_iter().flatten() {
                    self.emit(event.into());
                }
                self.maybe_end(ctx);
            }
            Err(error) => self.fail(ctx, ErrorCode::Internal, error.to_string()),
        }
    }
}

impl Handler<AnnotationDone> for Session {
    type Result = ();

    fn handle(&mut self, AnnotationDone(video): AnnotationDone, ctx: &mut Context<Self>) {
        self.annotation = Annotation::Done(video);
        self.maybe_end(ctx);
    }
}

impl Handler<DecodeFinished> for Session {
    type Result = ();

    fn handle(&mut self, finished: DecodeFinished, ctx: &mut Context<Self>) {
        if self.finished {
            // An upload failure already ended the session; the decoder merely stopped after it.
            ctx.stop();
            return;
        }
        self.decoded = Some(finished.stats);
        self.sent = finished.sent;
        self.limit_reached = finished.limit_reached;
        self.decode_error = finished.error;
        self.maybe_end(ctx);
    }
}

impl Handler<UploadFinished> for Session {
    type Result = ();

    fn handle(&mut self, upload: UploadFinished, ctx: &mut Context<Self>) {
        self.upload = Some(upload);
        self.store_upload(ctx);
        self.maybe_end(ctx);
    }
}

impl Handler<UploadFailed> for Session {
    type Result = ();

    fn handle(&mut self, failed: UploadFailed, ctx: &mut Context<Self>) {
        self.fail(ctx, failed.code, failed.message);
    }
}

impl Handler<Fail> for Session {
    type Result = ();

    fn handle(&mut self, failed: Fail, ctx: &mut Context<Self>) {
        self.fail(ctx, failed.code, failed.message);
    }
}
