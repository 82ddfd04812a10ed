//! The in-process stages: the buffer, decoding, the model, and the pipeline's overhead over the
//! detector alone.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use streamdet_actors::annotate::AnnotatedVideo;
use streamdet_actors::buffer::{self, BufferOptions};
use streamdet_actors::decode::{DecodeOptions, Decoder, FrameSelection};
use streamdet_actors::detect::{DetectParams, Detector, Size};
use streamdet_actors::pipeline::{Pipeline, PipelineOptions, SessionParams, UploadPace};

use super::Bench;
use super::media::{self, Container};
use super::peers::{self, ModelPeer};
use super::report::*;
use super::stats::{MIB, letterboxed_size, median, median_opt};
use crate::config::Config;

impl Bench {
    pub(super) fn buffer(&mut self) -> anyhow::Result<()> {
        let mut progress = self.progress.stage("buffer", self.plan.reps as u64);
        peers::reset_own_peak_rss();
        let mut rates = Vec::new();
        for _ in 0..self.plan.reps {
            let seconds = stream_through_buffer(self.plan.buffer_bytes)?;
            rates.push(self.plan.buffer_bytes as f64 / seconds / (1u64 << 30) as f64);
            progress.step("append + mapped read");
        }
        let peak = peers::peak_rss_of("/proc/self/status").unwrap_or(0) as f64 / MIB;
        self.results.buffer = Some(BufferResult { bytes: self.plan.buffer_bytes, gib_per_s: median(rates), peak_rss_mib: peak });
        progress.finish();
        Ok(())
    }

    pub(super) fn decode(&mut self) -> anyhow::Result<()> {
        let mut progress = self.progress.stage("decode", 1 + 2 * self.plan.reps as u64);
        let spec = self.plan.decode_clip.clone();
        let clip = self.remuxed(&self.master("decode", &spec)?, Container::Faststart)?;
        progress.step("clip made");
        let (w, h) = letterboxed_size(spec.width, spec.height, 640);
        let (mut ours, mut theirs, mut frames) = (Vec::new(), Vec::new(), 0);
        for _ in 0..self.plan.reps {
            let (seconds, n) = decode_all(&clip)?;
            frames = n;
            ours.push(n as f64 / seconds);
            progress.step("streamdet");
            let start = Instant::now();
            media::ffmpeg_decode_scale(&clip, w, h)?;
            theirs.push(n as f64 / start.elapsed().as_secs_f64());
            progress.step("ffmpeg CLI");
        }
        self.results.decode = Some(DecodeResult { clip: spec.describe(), frames, ours_fps: median(ours), ffmpeg_fps: Some(median(theirs)) });
        progress.finish();
        Ok(())
    }

    pub(super) fn model(&mut self) -> anyhow::Result<()> {
        let mut cases = vec![(self.model.clone(), 1)];
        match &self.batch_model {
            Some(batch_model) => cases.extend([(batch_model.clone(), 1), (batch_model.clone(), 4)]),
            None => self.skip("model latency of the dynamic-batch export: --batch-model not found".into()),
        }
        // The peers that can run, each timed right after ours, repetition by repetition.
        let mut peers = Vec::new();
        for (peer, missing, name) in
            [(ModelPeer::OnnxRuntime, self.peers.ort_missing(), "ONNX Runtime"), (ModelPeer::OpenVino, self.peers.openvino_missing(), "OpenVINO")]
        {
            match missing {
                Some(why) => self.skip(format!("{name}: {why}")),
                None => peers.push(peer),
            }
        }
        let mut progress = self.progress.stage("model", (cases.len() * self.plan.reps) as u64);
        for (model, batch) in cases {
            let (mut ours, mut ort, mut openvino) = (Vec::new(), Vec::new(), Vec::new());
            let name = model.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned());
            for _ in 0..self.plan.reps {
                ours.push(peers::our_model_ms(&model, batch, self.threads, self.plan.model_runs)?);
                for &peer in &peers {
                    let ms = peers::peer_model_ms(&self.peers, peer, &model, batch, self.threads, self.plan.model_runs)?;
                    match peer {
                        ModelPeer::OnnxRuntime => ort.push(Some(ms)),
                        ModelPeer::OpenVino => openvino.push(Some(ms)),
                    }
                }
                progress.step(&format!("{name} batch {batch}"));
            }
            self.results.model.push(ModelRow { model: name, batch, ours_ms: median(ours), ort_ms: median_opt(ort), openvino_ms: median_opt(openvino) });
        }
        progress.finish();
        Ok(())
    }

    pub(super) fn overhead(&mut self) -> anyhow::Result<()> {
        let mut progress = self.progress.stage("overhead", 1 + 3 * self.plan.reps as u64);
        let spec = self.plan.overhead_clip.clone();
        let clip = self.remuxed(&self.master("overhead", &spec)?, Container::Faststart)?;
        let detector = Arc::new(Detector::load_with_threads(&self.model, candle_core::Device::Cpu, self.threads).context("loading the model")?);
        let selection = FrameSelection::Stride(self.plan.overhead_stride);
        let frames = decode_selected(&clip, selection, detector.input_size())?;
        progress.step("frames decoded");
        let params = DetectParams::default();
        detector.detect(&frames[..1], &params)?; // warm-up
        let (mut alone, mut pipeline, mut annotated, mut annotate_ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.plan.reps {
            let start = Instant::now();
            for frame in &frames {
                detector.detect(std::slice::from_ref(frame), &params)?;
            }
            alone.push(frames.len() as f64 / start.elapsed().as_secs_f64());
            progress.step("detector alone");
            let (processed, seconds, _) = run_pipeline(Arc::clone(&detector), &clip, selection, &self.config, false)?;
            if processed != frames.len() as u64 {
                bail!("the pipeline processed {processed} frames, the decoder selected {}", frames.len());
            }
            pipeline.push(processed as f64 / seconds);
            progress.step("pipeline");
            let (processed, seconds, busy) = run_pipeline(Arc::clone(&detector), &clip, selection, &self.config, true)?;
            annotated.push(processed as f64 / seconds);
            annotate_ms.push(busy * 1e3 / processed.max(1) as f64);
            progress.step("pipeline writing the annotated video");
        }
        self.results.overhead = Some(OverheadResult {
            frames: frames.len() as u64,
            detector_fps: median(alone),
            pipeline_fps: median(pipeline),
            annotated_fps: median(annotated),
            annotate_ms_per_frame: median(annotate_ms),
        });
        progress.finish();
        Ok(())
    }
}

/// Appends `total` bytes in 64 KiB chunks while a reader thread reads them through the map;
/// seconds from the first append to the reader's last byte.
fn stream_through_buffer(total: u64) -> anyhow::Result<f64> {
    const CHUNK: usize = 64 << 10;
    let mut writer = buffer::create(&BufferOptions::default())?;
    let mut reader = writer.buffer().reader();
    let start = Instant::now();
    let reading = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut chunk = vec![0u8; CHUNK];
        let mut seen = 0;
        loop {
            match reader.read(&mut chunk)? {
                0 => return Ok(seen),
                n => seen += n as u64,
            }
        }
    });
    let chunk: Vec<u8> = (0..CHUNK).map(|i| i as u8).collect();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        writer.append(&chunk[..n])?;
        sent += n as u64;
    }
    writer.finish();
    let seen = reading.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    if seen != total {
        bail!("the reader saw {seen} of {total} bytes");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// A whole file in a finished buffer.
fn buffered(path: &Path) -> anyhow::Result<streamdet_actors::buffer::Buffer> {
    let mut writer = buffer::create(&BufferOptions::default())?;
    writer.append(&std::fs::read(path)?)?;
    Ok(writer.finish())
}

/// Decodes every frame to the model's 640x640 letterbox: (seconds, frames).
fn decode_all(path: &Path) -> anyhow::Result<(f64, u64)> {
    let buffer = buffered(path)?;
    let start = Instant::now();
    let mut decoder = Decoder::open(buffer.reader(), DecodeOptions::default())?;
    while decoder.next_frame()?.is_some() {}
    Ok((start.elapsed().as_secs_f64(), decoder.stats().selected))
}

/// The selected frames of a file, converted for the model.
fn decode_selected(path: &Path, selection: FrameSelection, target: Size) -> anyhow::Result<Vec<streamdet_actors::detect::ModelFrame>> {
    let buffer = buffered(path)?;
    let mut decoder = Decoder::open(buffer.reader(), DecodeOptions { target, selection, ..Default::default() })?;
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame()? {
        frames.push(frame.model_frame);
    }
    Ok(frames)
}

/// The whole pipeline in this process, fed the file at full speed, writing an annotated video
/// or not: (frames processed, seconds, seconds the annotator spent drawing and encoding).
fn run_pipeline(detector: Arc<Detector>, path: &Path, selection: FrameSelection, config: &Config, annotate: bool) -> anyhow::Result<(u64, f64, f64)> {
    let bytes = bytes::Bytes::from(std::fs::read(path)?);
    let options = PipelineOptions { max_session_duration: None, ..config.pipeline_options("model".into()) };
    actix_rt::System::new().block_on(async move {
        let start = Instant::now();
        let pipeline = Pipeline::start(detector, options);
        let annotate = annotate.then(|| config.annotate_options());
        let session = pipeline.session(SessionParams { selection, annotate, ..Default::default() })?;
        let (upload, mut events) = session.split();
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
            (0..bytes.len()).step_by(64 << 10).map(|at| Ok(bytes.slice(at..(at + (64 << 10)).min(bytes.len())))).collect();
        actix_rt::spawn(upload.feed_all(futures_util::stream::iter(chunks), UploadPace { idle: Some(Duration::from_secs(60)), min_rate: None }));
        while let Some(event) = events.recv().await {
            match event {
                streamdet_actors::actors::Event::End { frames_processed, video, .. } => {
                    let busy = match video {
                        Some(AnnotatedVideo::Written { busy_seconds, .. }) => busy_seconds,
                        Some(AnnotatedVideo::Failed { error }) => bail!("annotating failed: {error}"),
                        None => 0.0,
                    };
                    return Ok((frames_processed, start.elapsed().as_secs_f64(), busy));
                }
                streamdet_actors::actors::Event::Error { message, .. } => bail!("the pipeline failed: {message}"),
                _ => {}
            }
        }
        bail!("the pipeline ended without an end event")
    })
}
