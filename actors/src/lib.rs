//! streamdet's actors: everything a host service embeds to run object detection on a video while
//! it is being uploaded.
//!
//! - [`buffer`]: the growing temp file the upload is appended to and the decoder reads from.
//! - [`decode`]: FFmpeg demuxing and decoding over a growing buffer, frames letterboxed for the model.
//! - [`frame`]: a frame letterboxed for the model, what decoding gives and detection takes.
//! - [`detect`]: ultralytics ONNX detection models on candle, and post-processing.
//! - [`actors`]: the uploader, decoder, inference and session actors and their messages.
//! - [`annotate`]: a session's annotated video, drawn and encoded while the frames come.
//! - [`track`]: ByteTrack over a session's frames, and counting lines and zones.
//! - [`pipeline`]: one call builds a session out of the actors; a handle feeds it and reads events.

pub mod actors;
pub mod annotate;
pub mod buffer;
pub mod decode;
pub mod detect;
pub mod error_code;
pub mod frame;
pub mod pipeline;
pub mod track;

pub use error_code::ErrorCode;
