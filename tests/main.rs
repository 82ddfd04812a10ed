//! End-to-end tests of the `streamdet` binary and its actors, one test crate with a module per
//! concern (one binary keeps link times down).

mod support;

mod annotate;
mod bench;
mod cli;
mod decode;
mod deploy;
mod engine;
mod hardening;
mod mutation;
mod page;
mod pipeline;
mod server;
mod tracking;
