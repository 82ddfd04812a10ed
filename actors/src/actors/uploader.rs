//! The uploader of one session: appends body chunks to the buffer, hashes them as they pass
//! (no second read), enforces the size limit, and tells the session when the upload is complete.

use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;

use super::session::{Session, UploadFailed, UploadFinished};
use crate::buffer::BufferWriter;
use sha2::{Digest, Sha256};

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
    pub code: &'static str,
    pub message: String,
}

pub struct Uploader {
    writer: Option<BufferWriter>,
    hasher: Sha256,
    bytes: u64,
    first_byte: Option<Instant>,
    max_bytes: u64,
    session: Addr<Session>,
}

impl Uploader {
    pub fn new(writer: BufferWriter, max_bytes: u64, session: Addr<Session>) -> Self {
        Uploader { writer: Some(writer), hasher: Sha256::new(), bytes: 0, first_byte: None, max_bytes, session }
    }
}

impl Actor for Uploader {
    type Context = Context<Self>;
}

impl Handler<Chunk> for Uploader {
    type Result = Result<(), UploadError>;

    fn handle(&mut self, Chunk(data): Chunk, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(writer) = self.writer.as_mut() else { return Err(UploadError::Closed) };
        self.first_byte.get_or_insert_with(Instant::now);
        if self.bytes + data.len() as u64 > self.max_bytes {
            // Dropping the writer unfinished aborts the buffer: the decoder stops too.
            self.writer = None;
            let error = UploadError::TooLarge { limit: self.max_bytes };
            self.session.do_send(UploadFailed { code: "too_large", message: error.to_string() });
            return Err(error);
        }
        if writer.append(&data).is_err() {
            // The session aborted the buffer (the decoder failed, a cancel).
            self.writer = None;
            return Err(UploadError::Closed);
        }
        self.hasher.update(&data);
        self.bytes += data.len() as u64;
        Ok(())
    }
}

impl Handler<Finish> for Uploader {
    type Result = ();

    fn handle(&mut self, _: Finish, _ctx: &mut Context<Self>) {
        let Some(writer) = self.writer.take() else { return };
        writer.finish();
        let now = Instant::now();
        let hasher = std::mem::replace(&mut self.hasher, Sha256::new());
        self.session.do_send(UploadFinished {
            bytes: self.bytes,
            sha256: hasher.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            first_byte: self.first_byte.unwrap_or(now),
            last_byte: now,
        });
    }
}

impl Handler<AbortUpload> for Uploader {
    type Result = ();

    fn handle(&mut self, abort: AbortUpload, _ctx: &mut Context<Self>) {
        if self.writer.take().is_some() {
            self.session.do_send(UploadFailed { code: abort.code, message: abort.message });
        }
    }
}
