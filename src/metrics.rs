//! `GET /metrics`: Prometheus text exposition, through the `prometheus` crate.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};
use streamdet_actors::actors::Event;
use streamdet_actors::actors::inference::InferenceObserver;

pub struct Metrics {
    registry: Registry,
    pub sessions_total: IntCounter,
    pub sessions_active: IntGauge,
    frames_decoded: IntCounter,
    frames_inferred: IntCounter,
    bytes_received: IntCounter,
    errors: IntCounter,
    inference_seconds: Histogram,
    batch_frames: Histogram,
    queue_depth: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<T>) -> T {
    let metric = metric.expect("metric definitions are valid");
    registry.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("streamdet".into()), None).expect("valid prefix");
        Metrics {
            sessions_total: register(&r, IntCounter::new("sessions_total", "Video sessions started")),
            sessions_active: register(&r, IntGauge::new("sessions_active", "Video sessions running")),
            frames_decoded: register(&r, IntCounter::new("frames_decoded_total", "Frames decoded by finished sessions")),
            frames_inferred: register(&r, IntCounter::new("frames_inferred_total", "Frames that went through the model")),
            bytes_received: register(&r, IntCounter::new("bytes_received_total", "Upload bytes of finished sessions")),
            errors: register(&r, IntCounter::new("session_errors_total", "Sessions that ended with an error event")),
            inference_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("inference_batch_seconds", "Time the model took per batch")
                        .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]),
                ),
            ),
            batch_frames: register(
                &r,
                Histogram::with_opts(HistogramOpts::new("inference_batch_frames", "Frames per batch").buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0])),
            ),
            queue_depth: register(&r, IntGauge::new("inference_queue_frames", "Frames waiting for the model")),
            registry: r,
        }
    }

    /// Counts what a session event says.
    pub fn observe_event(&self, event: &Event) {
        match event {
            Event::Frame { .. } => self.frames_inferred.inc(),
            Event::End { frames_decoded, bytes, .. } => {
                self.frames_decoded.inc_by(*frames_decoded);
                self.bytes_received.inc_by(*bytes);
            }
            Event::Error { .. } => self.errors.inc(),
            Event::Start { .. } | Event::Track(_) | Event::Crossing(_) | Event::Zone(_) => {}
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl InferenceObserver for Metrics {
    fn batch_done(&self, frames: usize, seconds: f64) {
        self.inference_seconds.observe(seconds);
        self.batch_frames.observe(frames as f64);
    }

    fn queue_depth(&self, frames: usize) {
        self.queue_depth.set(frames as i64);
    }
}
