//! What a session reports, in order: `start`, then `frame`s, then one `end` — or an `error`,
//! after which nothing follows. A session that tracks also reports `crossing` and `zone` events
//! after the frame they happened in, and a `track` event when a track ends (the last ones just
//! before `end`).

use serde::Serialize;

use crate::ErrorCode;
use crate::annotate::AnnotatedVideo;
use crate::decode::MediaInfo;
use crate::detect::Detection;
use crate::track::{Crossing, EndedTrack, TrackEvent, TrackingTotals, ZoneChange};

/// The model a session runs, as the `start` event shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelSummary {
    pub name: String,
    /// Input width and height.
    pub input: [usize; 2],
    pub classes: usize,
}

/// One line of a session's NDJSON (or one SSE message).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Start {
        session: String,
        media: MediaInfo,
        model: ModelSummary,
    },
    Frame {
        index: u64,
        pts: f64,
        detections: Vec<Detection>,
    },
    End {
        frames_decoded: u64,
        frames_processed: u64,
        bytes: u64,
        sha256: String,
        upload_seconds: f64,
        seconds: f64,
        /// The file name (under the service's `media_dir`) the upload was kept as, when the
        /// service stores uploads.
        #[serde(skip_serializing_if = "Option::is_none")]
        media_file: Option<String>,
        /// When the session tracked: distinct tracks per class, and the lines' and zones' totals.
        #[serde(flatten)]
        tracking: Option<TrackingTotals>,
        /// When the session annotated: the video's size and where to fetch it, or why it failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        video: Option<AnnotatedVideo>,
    },
    /// A track ended (lost for longer than the tracker waits, or the video ended).
    Track(EndedTrack),
    /// A track's anchor crossed a counting line.
    Crossing(Crossing),
    /// A track's anchor came into a zone or left it.
    Zone(ZoneChange),
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl From<TrackEvent> for Event {
    fn from(event: TrackEvent) -> Event {
        match event {
            TrackEvent::Crossing(crossing) => Event::Crossing(crossing),
            TrackEvent::Zone(change) => Event::Zone(change),
            TrackEvent::Ended(track) => Event::Track(track),
        }
    }
}

impl Event {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Event {
        Event::Error { code, message: message.into() }
    }

    /// Whether nothing follows this event.
    pub fn is_last(&self) -> bool {
        matches!(self, Event::End { .. } | Event::Error { .. })
    }
}
