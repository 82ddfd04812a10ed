//! The actors of one streaming detection: an [`uploader::Uploader`] appends the upload to a
//! buffer, a [`decoder::DecoderActor`] decodes it on its own thread while it grows, the shared
//! [`inference::Inference`] actor batches frames across sessions, and a [`session::Session`]
//! turns it all into [`Event`]s. Back-pressure is by credits: the decoder sends a frame only
//! against a credit, and each processed frame returns one. The actors talk only through the
//! messages of [`messages`]: the session addresses the decoder and the uploader, and they report
//! back through the `Recipient`s they were given, so no actor imports another's module.

pub mod decoder;
pub mod events;
pub mod inference;
pub mod messages;
pub mod session;
pub mod uploader;

pub use events::{Event, ModelSummary};
