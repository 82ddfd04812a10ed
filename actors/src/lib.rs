//! streamdet's actors: everything a host service embeds to run object detection on a video while
//! it is being uploaded.
//!
//! - [`buffer`]: the growing temp file the upload is appended to and the decoder reads from.
//! - [`decode`]: FFmpeg demuxing and decoding over a growing buffer, frames letterboxed for the model.
//! - [`detect`]: ultralytics ONNX detection models on candle, letterboxing and post-processing.

pub mod buffer;
pub mod decode;
pub mod detect;
