//! The uploader of one session: appends body chunks to the buffer, hashes them as they pass
//! (no second read), enforces the size limit, holds the body back while the decoder lags too far
//! behind, and tells the session when the upload is complete.

use std::time::Instant;

use actix::prelude::*;

use super::messages::{AbortUpload, Chunk, Drain, Finish, UploadError, UploadFailed, UploadFinished, UploadReports};
use crate::ErrorCode;
use crate::buffer::BufferWriter;
use sha2::{Digest, Sha256};

/// Where chunks go.
enum Sink {
    /// Into the buffer the decoder reads.
    Buffer(BufferWriter),
    /// Nowhere: the session has what it needs; the rest of the body is read and dropped so the
    /// client sees a complete response instead of a reset.
    Drain,
    /// The upload finished or failed; more chunks are refused.
    Closed,
}

pub struct Uploader {
    sink: Sink,
    hasher: Sha256,
    bytes: u64,
    first_byte: Option<Instant>,
    max_bytes: u64,
    /// Bytes the writer may be ahead of the decoder before chunks are held back.
    max_lag: Option<u64>,
    reports: UploadReports,
}

impl Uploader {
    pub fn new(writer: BufferWriter, max_bytes: u64, max_lag: Option<u64>, reports: UploadReports) -> Self {
        Uploader { sink: Sink::Buffer(writer), hasher: Sha256::new(), bytes: 0, first_byte: None, max_bytes, max_lag, reports }
    }

    /// What arrived so far, as the session reports it.
    fn summary(&self) -> UploadFinished {
        let now = Instant::now();
        UploadFinished {
            bytes: self.bytes,
            sha256: self.hasher.clone().finalize().iter().map(|b| format!("{b:02x}")).collect(),
            first_byte: self.first_byte.unwrap_or(now),
            last_byte: now,
        }
    }
}

impl Actor for Uploader {
    type Context = Context<Self>;
}

impl Handler<Chunk> for Uploader {
    type Result = ResponseFuture<Result<(), UploadError>>;

    fn handle(&mut self, Chunk(data): Chunk, _ctx: &mut Context<Self>) -> Self::Result {
        self.first_byte.get_or_insert_with(Instant::now);
        let over_limit = self.bytes + data.len() as u64 > self.max_bytes;
        let result = match &mut self.sink {
            Sink::Closed => Err(UploadError::Closed),
            _ if over_limit => {
                // Dropping the writer unfinished aborts the buffer: the decoder stops too.
                if matches!(self.sink, Sink::Buffer(_)) {
                    let error = UploadError::TooLarge { limit: self.max_bytes };
                    self.reports.failed.do_send(UploadFailed { code: ErrorCode::TooLarge, message: error.to_string() });
                }
                self.sink = Sink::Closed;
                Err(UploadError::TooLarge { limit: self.max_bytes })
            }
            Sink::Drain => {
                self.bytes += data.len() as u64;
                Ok(())
            }
            Sink::Buffer(writer) => match writer.append(&data) {
                Ok(()) => {
                    self.hasher.update(&data);
                    self.bytes += data.len() as u64;
                    if let Some(max_lag) = self.max_lag {
                        // The reply waits until the decoder catches up, so the caller reads no
                        // more of the body meanwhile.
                        let buffer = writer.buffer().clone();
                        return Box::pin(async move {
                            buffer.wait_lag_at_most(max_lag).await;
                            Ok(())
                        });
                    }
                    Ok(())
                }
                Err(_) => {
                    // The session aborted the buffer (the decoder failed, a cancel).
                    self.sink = Sink::Closed;
                    Err(UploadError::Closed)
                }
            },
        };
        Box::pin(std::future::ready(result))
    }
}

impl Handler<Finish> for Uploader {
    type Result = ();

    fn handle(&mut self, _: Finish, _ctx: &mut Context<Self>) {
        let Sink::Buffer(writer) = std::mem::replace(&mut self.sink, Sink::Closed) else { return };
        writer.finish();
        self.reports.finished.do_send(self.summary());
    }
}

impl Handler<AbortUpload> for Uploader {
    type Result = ();

    fn handle(&mut self, abort: AbortUpload, _ctx: &mut Context<Self>) {
        if let Sink::Buffer(_) = std::mem::replace(&mut self.sink, Sink::Closed) {
            self.reports.failed.do_send(UploadFailed { code: abort.code, message: abort.message });
        }
    }
}

impl Handler<Drain> for Uploader {
    type Result = MessageResult<Drain>;

    fn handle(&mut self, _: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        if let Sink::Buffer(_) = self.sink {
            // The writer drops unfinished: the buffer is abandoned, its file removed once the
            // decoder's reader is gone.
            self.sink = Sink::Drain;
        }
        MessageResult(self.summary())
    }
}
