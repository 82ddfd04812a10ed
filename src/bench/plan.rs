//! What a run measures: clip sizes, repetitions and rates for a full, quick or tiny run.

use super::Stage;
use super::media::ClipSpec;

/// Input sizes and repetitions of one kind of run.
pub struct Plan {
    pub name: &'static str,
    pub reps: usize,
    pub buffer_bytes: u64,
    pub decode_clip: ClipSpec,
    pub model_runs: usize,
    pub e2e_clip: ClipSpec,
    pub e2e_stride: u64,
    pub concurrency: Vec<usize>,
    pub concurrency_clip: ClipSpec,
    pub concurrency_stride: u64,
    pub overhead_clip: ClipSpec,
    pub overhead_stride: u64,
    pub memory_source: ClipSpec,
    pub memory_sizes: Vec<u64>,
    /// Seeds of the detections made from MOTChallenge ground truth.
    pub tracking_seeds: Vec<u64>,
}

fn clip(width: u32, height: u32, fps: u32, seconds: f64, bitrate: &'static str) -> ClipSpec {
    ClipSpec { width, height, fps, seconds, bitrate }
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            name: "full",
            reps: 3,
            buffer_bytes: 1 << 30,
            decode_clip: clip(1920, 1080, 30, 10.0, "6M"),
            model_runs: 10,
            e2e_clip: clip(1280, 720, 30, 10.0, "4M"),
            e2e_stride: 5,
            concurrency: vec![1, 2, 4, 8],
            concurrency_clip: clip(1280, 720, 30, 4.0, "4M"),
            concurrency_stride: 10,
            overhead_clip: clip(1280, 720, 30, 4.0, "4M"),
            overhead_stride: 1,
            memory_source: clip(1920, 1080, 25, 6.0, "40M"),
            memory_sizes: vec![256 << 20, 1 << 30],
            tracking_seeds: vec![1, 2, 3, 4, 5],
        }
    }

    pub fn quick() -> Plan {
        Plan {
            name: "quick",
            reps: 1,
            buffer_bytes: 256 << 20,
            decode_clip: clip(1920, 1080, 30, 4.0, "6M"),
            model_runs: 5,
            e2e_clip: clip(1280, 720, 30, 10.0, "4M"),
            e2e_stride: 15,
            concurrency: vec![1, 2, 4, 8],
            concurrency_clip: clip(1280, 720, 30, 2.0, "4M"),
            concurrency_stride: 15,
            overhead_clip: clip(1280, 720, 30, 2.0, "4M"),
            overhead_stride: 2,
            memory_source: clip(1920, 1080, 25, 6.0, "40M"),
            memory_sizes: vec![128 << 20],
            tracking_seeds: vec![1, 2, 3],
        }
    }

    pub fn tiny() -> Plan {
        Plan {
            name: "tiny",
            reps: 1,
            buffer_bytes: 8 << 20,
            decode_clip: clip(640, 360, 30, 1.0, "2M"),
            model_runs: 1,
            e2e_clip: clip(640, 360, 30, 2.0, "2M"),
            e2e_stride: 30,
            concurrency: vec![1, 2],
            concurrency_clip: clip(640, 360, 30, 1.0, "2M"),
            concurrency_stride: 30,
            overhead_clip: clip(640, 360, 30, 1.0, "2M"),
            overhead_stride: 15,
            memory_source: clip(640, 360, 25, 2.0, "8M"),
            memory_sizes: vec![8 << 20],
            tracking_seeds: vec![1],
        }
    }

    pub fn describe(&self, stages: &[Stage]) -> Vec<String> {
        let mut lines = vec![format!("plan: {}; {} repetition(s) of every measurement, peers interleaved with ours", self.name, self.reps)];
        let on = |s: Stage| stages.contains(&s);
        if on(Stage::Buffer) {
            lines.push(format!("buffer: {} MiB", self.buffer_bytes >> 20));
        }
        if on(Stage::Decode) {
            lines.push(format!("decode: {} (photos slideshow)", self.decode_clip.describe()));
        }
        if on(Stage::Model) {
            lines.push(format!("model: {} timed runs per figure, after 3 warm-up runs", self.model_runs));
        }
        if on(Stage::EndToEnd) {
            lines.push(format!("end to end: {}, stride {}", self.e2e_clip.describe(), self.e2e_stride));
        }
        if on(Stage::Overhead) {
            lines.push(format!("pipeline overhead: {}, stride {}", self.overhead_clip.describe(), self.overhead_stride));
        }
        if on(Stage::Concurrency) {
            lines.push(format!("concurrency: {:?} uploads of {}, stride {}", self.concurrency, self.concurrency_clip.describe(), self.concurrency_stride));
        }
        if on(Stage::Memory) {
            let sizes: Vec<String> = self.memory_sizes.iter().map(|b| format!("{} MiB", b >> 20)).collect();
            lines.push(format!("memory: MPEG-TS of {} ({} repeated), processed at fps=0.5", sizes.join(" and "), self.memory_source.describe()));
        }
        if on(Stage::Tracking) {
            lines.push(format!("tracking: TUD-Campus and TUD-Stadtmitte, detection seeds {:?}", self.tracking_seeds));
        }
        lines
    }
}
