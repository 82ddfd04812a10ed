//! The decoder actor of one session. FFmpeg blocks, so decoding runs on a thread the actor owns;
//! the actor turns its messages into wake-ups of that thread: a `Credit` lets it send more
//! frames, an `Abort` aborts the buffer (waking a read blocked in FFmpeg's I/O callback) and the
//! credit wait.

use std::sync::{Arc, Condvar, Mutex};

use actix::prelude::*;

use super::inference::{FrameJob, Infer, Inference};
use super::messages::{Abort, Credit, DecodeFinished, DecoderOpened, DecoderReports};
use crate::buffer::{Buffer, BufferReader};
use crate::decode::{DecodeError, DecodeOptions, Decoder};
use crate::detect::DetectParams;

/// Frames the decoder may still send, and whether it must stop.
#[derive(Default)]
struct Credits {
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Credits {
    fn add(&self, n: usize) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 += n;
        self.changed.notify_all();
    }

    fn cancel(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.changed.notify_all();
    }

    /// Takes one credit, waiting for it; `false` once cancelled.
    fn take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *state {
                (_, true) => return false,
                (0, false) => state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                (ref mut n, false) => {
                    *n -= 1;
                    return true;
                }
            }
        }
    }
}

pub struct DecoderActor {
    session_key: u64,
    buffer: Buffer,
    reader: Option<BufferReader>,
    options: DecodeOptions,
    params: Arc<DetectParams>,
    credits: Arc<Credits>,
    initial_credits: usize,
    reports: DecoderReports,
    inference: Addr<Inference>,
}

impl DecoderActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        session_key: u64,
        reader: BufferReader,
        options: DecodeOptions,
        params: Arc<DetectParams>,
        credits: usize,
        reports: DecoderReports,
        inference: Addr<Inference>,
    ) -> Self {
        DecoderActor {
            session_key,
            buffer: reader.buffer(),
            reader: Some(reader),
            options,
            params,
            credits: Arc::new(Credits::default()),
            initial_credits: credits.max(1),
            reports,
            inference,
        }
    }
}

impl Actor for DecoderActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        let Some(reader) = self.reader.take() else { return };
        self.credits.add(self.initial_credits);
        let credits = Arc::clone(&self.credits);
        let (options, params, key) = (self.options.clone(), Arc::clone(&self.params), self.session_key);
        let (reports, inference) = (self.reports.clone(), self.inference.clone());
        let spawned = std::thread::Builder::new().name(format!("streamdet-decode-{key}")).spawn(move || {
            let max_frames = options.max_frames.unwrap_or(u64::MAX);
            let mut decoder = match Decoder::open(reader, options) {
                Ok(decoder) => decoder,
                Err(error) => {
                    reports.finished.do_send(DecodeFinished { stats: Default::default(), sent: 0, limit_reached: false, error: Some(error) });
                    return;
                }
            };
            reports.opened.do_send(DecoderOpened(decoder.media().clone()));
            let mut sent = 0;
            let error = loop {
                if sent >= max_frames {
                    break None;
                }
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        if !credits.take() {
                            break Some(DecodeError::Cancelled);
                        }
                        let job = FrameJob {
                            session: key,
                            index: frame.index,
                            pts: frame.pts,
                            frame: frame.model_frame,
                            params: Arc::clone(&params),
                            reply: reports.frames.clone(),
                        };
                        inference.do_send(Infer(job));
                        sent += 1;
                    }
                    Ok(None) => break None,
                    Err(error) => break Some(error),
                }
            };
            let stats = decoder.stats();
            // Dropping the decoder drops its reader: the uploader is no longer held back by it.
            drop(decoder);
            reports.finished.do_send(DecodeFinished { stats, sent, limit_reached: sent >= max_frames, error });
        });
        if let Err(err) = spawned {
            self.reports.finished.do_send(DecodeFinished {
                stats: Default::default(),
                sent: 0,
                limit_reached: false,
                error: Some(DecodeError::Internal(format!("cannot start a decoder thread: {err}"))),
            });
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Whatever ended the session, the thread must not stay blocked.
        self.credits.cancel();
        self.buffer.abort();
    }
}

impl Handler<Credit> for DecoderActor {
    type Result = ();

    fn handle(&mut self, Credit(n): Credit, _ctx: &mut Context<Self>) {
        self.credits.add(n);
    }
}

impl Handler<Abort> for DecoderActor {
    type Result = ();

    fn handle(&mut self, _: Abort, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
