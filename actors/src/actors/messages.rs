//! The messages between the actors of one session, in one place so that no actor needs another
//! actor's module to talk to it. The decoder and the uploader report to whoever gave them the
//! [`Recipient`]s in [`DecoderReports`] and [`UploadReports`] (the session, in this crate).

use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;

use super::inference::FrameDone;
use crate::ErrorCode;
use crate::decode::{DecodeError, DecodeStats, MediaInfo};

// --- To the session ---------------------------------------------------------------------------

#[derive(Message)]
#[rtype(result = "()")]
pub struct DecoderOpened(pub MediaInfo);

#[derive(Message)]
#[rtype(result = "()")]
pub struct DecodeFinished {
    pub stats: DecodeStats,
    /// Frames sent to inference (all selected frames, unless it stopped early).
    pub sent: u64,
    /// It stopped because the session's `max_frames` were sent.
    pub limit_reached: bool,
    pub error: Option<DecodeError>,
}

/// The whole upload arrived (or, after a [`Drain`], the part the session used).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UploadFinished {
    pub bytes: u64,
    pub sha256: String,
    /// When the first byte arrived.
    pub first_byte: Instant,
    pub last_byte: Instant,
}

/// The upload failed or was abandoned.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UploadFailed {
    pub code: ErrorCode,
    pub message: String,
}

/// Ends the session with an error event (a timeout, a shutdown, a cancel).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fail {
    pub code: ErrorCode,
    pub message: String,
}

// --- To the decoder ---------------------------------------------------------------------------

/// More frames may be sent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Credit(pub usize);

/// Stop decoding now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abort;

// --- To the uploader --------------------------------------------------------------------------

/// Why a chunk was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    #[error("the upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the session has ended")]
    Closed,
}

#[derive(Message)]
#[rtype(result = "Result<(), UploadError>")]
pub struct Chunk(pub Bytes);

/// The last chunk was sent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Finish;

/// The upload cannot complete (the client went away, a timeout).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AbortUpload {
    pub code: ErrorCode,
    pub message: String,
}

/// The session needs no more bytes (it processed all the frames it was asked for): stop writing,
/// accept and drop the rest of the body, and report what arrived so far.
#[derive(Message)]
#[rtype(result = "UploadFinished")]
pub struct Drain;

// --- Who hears from whom ----------------------------------------------------------------------

/// Where a decoder reports: the container it opened, the end of decoding, and each processed
/// frame (through the inference actor).
#[derive(Clone)]
pub struct DecoderReports {
    pub opened: Recipient<DecoderOpened>,
    pub finished: Recipient<DecodeFinished>,
    pub frames: Recipient<FrameDone>,
}

/// Where an uploader reports: the upload complete, or failed.
#[derive(Clone)]
pub struct UploadReports {
    pub finished: Recipient<UploadFinished>,
    pub failed: Recipient<UploadFailed>,
}
