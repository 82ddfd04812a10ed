//! The one inference actor that every session shares.
//!
//! It queues frames per session and forms batches round-robin across sessions, up to
//! `batch_size` frames, waiting at most `batch_timeout` for a batch to fill. The model runs on a
//! dedicated worker thread, one batch at a time, so the actor's mailbox stays responsive. A panic
//! inside a batch fails that batch's frames; every other session goes on.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use actix::prelude::*;

use crate::detect::{DetectError, DetectParams, Detection, Detector};
use crate::frame::ModelFrame;

/// A frame of one session, to be detected.
pub struct FrameJob {
    pub session: u64,
    pub index: u64,
    pub pts: f64,
    pub frame: ModelFrame,
    pub params: Arc<DetectParams>,
    /// Where the result goes.
    pub reply: Recipient<FrameDone>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Infer(pub FrameJob);

/// Drops the queued frames of a session that ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forget(pub u64);

/// The result for one frame.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct FrameDone {
    pub index: u64,
    pub pts: f64,
    pub result: Result<Vec<Detection>, InferenceError>,
    /// The frame itself, back to the session (which draws on it when it annotates). `None`
    /// when the frame never reached the model.
    pub frame: Option<ModelFrame>,
}

/// Why a frame has no detections. One batch's failure is every frame's in it, hence the `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    #[error(transparent)]
    Model(Arc<DetectError>),
    #[error("the model panicked on this batch")]
    Panicked,
    #[error("the inference worker stopped")]
    WorkerStopped,
}

#[derive(Message)]
#[rtype(result = "()")]
struct BatchDone {
    frames: usize,
}

/// How frames are batched.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub batch_size: usize,
    pub batch_timeout: Duration,
}

/// Receives the inference actor's measurements (a host service turns them into metrics).
pub trait InferenceObserver: Send + Sync {
    /// A batch of `frames` frames ran in `seconds`.
    fn batch_done(&self, frames: usize, seconds: f64);
    /// Frames waiting for the model, after a change.
    fn queue_depth(&self, frames: usize);
}

pub struct Inference {
    detector: Arc<Detector>,
    policy: BatchPolicy,
    /// One queue per session with frames waiting, in round-robin order.
    queues: VecDeque<(u64, VecDeque<FrameJob>)>,
    in_flight: bool,
    timer: Option<SpawnHandle>,
    worker: Option<std_mpsc::Sender<(Vec<FrameJob>, Addr<Inference>)>>,
    observer: Option<Arc<dyn InferenceObserver>>,
    /// Frames processed and batches run, for metrics.
    pub frames: u64,
    pub batches: u64,
}

impl Inference {
    pub fn new(detector: Arc<Detector>, policy: BatchPolicy, observer: Option<Arc<dyn InferenceObserver>>) -> Self {
        let policy = BatchPolicy { batch_size: policy.batch_size.max(1), ..policy };
        Inference { detector, policy, queues: VecDeque::new(), in_flight: false, timer: None, worker: None, observer, frames: 0, batches: 0 }
    }

    fn report_queue(&self) {
        if let Some(observer) = &self.observer {
            observer.queue_depth(self.queued());
        }
    }

    fn queued(&self) -> usize {
        self.queues.iter().map(|(_, q)| q.len()).sum()
    }

    fn maybe_dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.queues.is_empty() {
            return;
        }
        if self.queued() >= self.policy.batch_size || self.policy.batch_timeout.is_zero() {
            self.dispatch(ctx);
        } else if self.timer.is_none() {
            self.timer = Some(ctx.run_later(self.policy.batch_timeout, |act, ctx| {
                act.timer = None;
                if !act.in_flight {
                    act.dispatch(ctx);
                }
            }));
        }
    }

    /// Takes one frame per session in turn until the batch is full, and hands it to the worker.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        let mut batch = Vec::with_capacity(self.policy.batch_size);
        while batch.len() < self.policy.batch_size {
            let Some((session, mut queue)) = self.queues.pop_front() else { break };
            if let Some(job) = queue.pop_front() {
                batch.push(job);
            }
            if !queue.is_empty() {
                self.queues.push_back((session, queue));
            }
        }
        if batch.is_empty() {
            return;
        }
        let Some(worker) = &self.worker else { return };
        self.in_flight = true;
        if let Err(std_mpsc::SendError((batch, _))) = worker.send((batch, ctx.address())) {
            // The worker thread is gone: fail these frames rather than hold them forever.
            self.in_flight = false;
            for job in batch {
                job.reply.do_send(FrameDone { index: job.index, pts: job.pts, result: Err(InferenceError::WorkerStopped), frame: None });
            }
        }
    }
}

/// What a job needs once its frame went into the model.
struct Reply {
    index: u64,
    pts: f64,
    params: Arc<DetectParams>,
    to: Recipient<FrameDone>,
}

/// Runs batches until the actor goes away.
fn worker_loop(detector: Arc<Detector>, observer: Option<Arc<dyn InferenceObserver>>, batches: std_mpsc::Receiver<(Vec<FrameJob>, Addr<Inference>)>) {
    while let Ok((jobs, actor)) = batches.recv() {
        let started = std::time::Instant::now();
        // The frames move into the model's input; the rest of each job stays for the reply.
        let (frames, jobs): (Vec<ModelFrame>, Vec<Reply>) =
            jobs.into_iter().map(|j| (j.frame, Reply { index: j.index, pts: j.pts, params: j.params, to: j.reply })).unzip();
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Vec<Detection>>, DetectError> {
            let input = detector.input_tensor(&frames)?;
            let output = detector.run_raw(&input)?;
            jobs.iter()
                .enumerate()
                .map(|(i, job)| {
                    let one = output.narrow(0, i, 1).map_err(DetectError::Tensor)?;
                    let mut found = detector.detections(&one, &frames[i..i + 1], &job.params)?;
                    Ok(found.pop().unwrap_or_default())
                })
                .collect()
        }));
        let results: Vec<Result<Vec<Detection>, InferenceError>> = match outcome {
            Ok(Ok(all)) => all.into_iter().map(Ok).collect(),
            Ok(Err(error)) => vec![Err(InferenceError::Model(Arc::new(error))); jobs.len()],
            Err(_) => vec![Err(InferenceError::Panicked); jobs.len()],
        };
        let count = jobs.len();
        let seconds = started.elapsed().as_secs_f64();
        // Measured before the results go out, so that whoever sees a result sees its batch counted.
        if let Some(observer) = &observer {
            observer.batch_done(count, seconds);
        }
        for ((job, result), frame) in jobs.into_iter().zip(results).zip(frames) {
            job.to.do_send(FrameDone { index: job.index, pts: job.pts, result, frame: Some(frame) });
        }
        actor.do_send(BatchDone { frames: count });
    }
}

impl Actor for Inference {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        let (tx, rx) = std_mpsc::channel();
        let (detector, observer) = (Arc::clone(&self.detector), self.observer.clone());
        let spawned = std::thread::Builder::new().name("streamdet-inference".into()).spawn(move || worker_loop(detector, observer, rx));
        match spawned {
            Ok(_) => self.worker = Some(tx),
            Err(err) => tracing::error!(%err, "cannot start the inference worker thread"),
        }
    }
}

impl Handler<Infer> for Inference {
    type Result = ();

    fn handle(&mut self, Infer(job): Infer, ctx: &mut Context<Self>) {
        match self.queues.iter_mut().find(|(s, _)| *s == job.session) {
            Some((_, queue)) => queue.push_back(job),
            None => self.queues.push_back((job.session, VecDeque::from([job]))),
        }
        self.maybe_dispatch(ctx);
        self.report_queue();
    }
}

impl Handler<Forget> for Inference {
    type Result = ();

    fn handle(&mut self, Forget(session): Forget, _ctx: &mut Context<Self>) {
        self.queues.retain(|(s, _)| *s != session);
        self.report_queue();
    }
}

impl Handler<BatchDone> for Inference {
    type Result = ();

    fn handle(&mut self, done: BatchDone, ctx: &mut Context<Self>) {
        self.in_flight = false;
        self.frames += done.frames as u64;
        self.batches += 1;
        self.maybe_dispatch(ctx);
        self.report_queue();
    }
}
