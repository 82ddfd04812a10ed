//! Tracking: streamdet's ByteTrack against a Python ByteTrack (supervision's, the peer) on
//! ground truth that nobody here wrote: the two MOTChallenge sequences the `motmetrics` package
//! ships, made into realistic detections by `scripts/mot_eval.py` (boxes jittered, some dropped,
//! false positives added, per-box confidences, all from fixed seeds) and scored by motmetrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Deserialize;
use streamdet_actors::detect::Detection;
use streamdet_actors::track::{ByteTracker, TrackParams};

use super::Bench;
use super::report::{MotScore, TrackingRow};

const SCRIPT: &str = "scripts/mot_eval.py";

/// supervision's ByteTrack defaults, in our terms (its `track_activation_threshold` is the high
/// threshold, and new tracks need 0.1 more; a 30-frame buffer at 30 fps): the comparison of the
/// two trackers runs both with the same settings, so that it measures the trackers and not
/// the choice of thresholds. Ours also runs with config.toml's `[track]` (the paper's).
const PEER_SETTINGS: TrackParams =
    TrackParams { high_threshold: 0.25, low_threshold: 0.1, new_track_threshold: 0.35, match_threshold: 0.8, lost_track_seconds: 1.0 };
/// Our tracker's runs in the work directory's file names: with the peer's settings, with ours.
const SAME_SETTINGS: &str = "streamdet";
const CONFIGURED: &str = "streamdet-config";

/// One line of `mot_eval.py run` or `score-runs`.
#[derive(Debug, Deserialize)]
struct Scored {
    seq: String,
    seed: u64,
    mota: f64,
    idf1: f64,
    idsw: u64,
}

/// What `mot_eval.py info` says of a sequence.
#[derive(Debug, Deserialize)]
struct SequenceInfo {
    frames: u64,
    fps: f64,
}

impl Bench {
    pub(super) fn tracking(&mut self) -> anyhow::Result<()> {
        if let Some(why) = self.peers.mot_missing() {
            self.skip(format!("tracking against MOTChallenge ground truth: {why}"));
            return Ok(());
        }
        let work = self.media_dir.join("mot");
        let seeds: Vec<String> = self.plan.tracking_seeds.iter().map(u64::to_string).collect();
        // The peer's run, each of the two sequences, our two scorings.
        let mut progress = self.progress.stage("tracking", 5);
        let peer: Vec<Scored> = json_lines(self.mot(&["run", "--seeds"], &seeds, &work))?;
        progress.step("detections made, the peer run and scored");
        let mut sequences: Vec<String> = peer.iter().map(|p| p.seq.clone()).collect();
        sequences.dedup();
        let mut micros = BTreeMap::new();
        for sequence in &sequences {
            let info: SequenceInfo = json_lines(self.mot(&["info", sequence], &[], &work))?.pop().context("mot_eval.py info printed nothing")?;
            let mut seconds = 0.0;
            for seed in &self.plan.tracking_seeds {
                let stem = format!("{sequence}.seed{seed}");
                let detections = work.join(format!("{stem}.dets.csv"));
                seconds += track_file(&detections, &work.join(format!("{stem}.{SAME_SETTINGS}.csv")), &info, PEER_SETTINGS)?;
                track_file(&detections, &work.join(format!("{stem}.{CONFIGURED}.csv")), &info, self.config.track.params())?;
            }
            micros.insert(sequence.clone(), seconds * 1e6 / (info.frames * self.plan.tracking_seeds.len() as u64) as f64);
            progress.step(sequence);
        }
        let ours: Vec<Scored> = json_lines(self.mot(&["score-runs", SAME_SETTINGS, "--seeds"], &seeds, &work))?;
        progress.step("ours scored");
        let configured: Vec<Scored> = json_lines(self.mot(&["score-runs", CONFIGURED, "--seeds"], &seeds, &work))?;
        progress.step("ours with config.toml's settings scored");
        progress.finish();
        for sequence in sequences {
            let row = TrackingRow {
                ours: mean(&ours, &sequence),
                peer: mean(&peer, &sequence),
                ours_configured: mean(&configured, &sequence),
                ours_us_per_frame: micros[&sequence],
                sequence,
            };
            self.results.tracking.push(row);
        }
        Ok(())
    }

    /// Runs `mot_eval.py` with `args` and `more` (the work directory goes to the subcommands
    /// that take one).
    fn mot(&self, args: &[&str], more: &[String], work: &Path) -> Command {
        let mut command = Command::new(&self.peers.python);
        command.arg(SCRIPT).args(args).args(more);
        if args[0] != "info" {
            command.arg("--workdir").arg(work);
        }
        command
    }
}

/// The JSON lines a command prints.
fn json_lines<T: serde::de::DeserializeOwned>(mut command: Command) -> anyhow::Result<Vec<T>> {
    let out = command.output().with_context(|| format!("running {SCRIPT}"))?;
    if !out.status.success() {
        bail!("{SCRIPT} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).lines().map(|line| serde_json::from_str(line).with_context(|| format!("{SCRIPT} printed {line:?}"))).collect()
}

fn mean(runs: &[Scored], sequence: &str) -> MotScore {
    let runs: Vec<&Scored> = runs.iter().filter(|r| r.seq == sequence).collect();
    let n = runs.len().max(1) as f64;
    MotScore {
        mota: runs.iter().map(|r| r.mota).sum::<f64>() / n,
        idf1: runs.iter().map(|r| r.idf1).sum::<f64>() / n,
        idsw: runs.iter().map(|r| r.idsw as f64).sum::<f64>() / n,
        seeds: runs.iter().map(|r| r.seed).collect(),
    }
}

/// Runs our tracker over a detections file (`frame,x1,y1,x2,y2,conf,pts`, frames from 1), one
/// update per frame of the sequence, and writes its tracks (`frame,id,x1,y1,x2,y2`). Returns the
/// seconds the updates took.
fn track_file(detections: &Path, tracks: &Path, info: &SequenceInfo, params: TrackParams) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(detections).with_context(|| format!("reading {}", detections.display()))?;
    let mut frames: BTreeMap<u64, Vec<Detection>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let fields: Vec<f64> = line.split(',').map(str::parse).collect::<Result<_, _>>().with_context(|| format!("a detections row: {line:?}"))?;
        let [frame, x1, y1, x2, y2, conf, ..] = fields[..] else { bail!("a detections row: {line:?}") };
        let bbox = [x1, y1, x2, y2].map(|v| v as f32);
        let detection = Detection { class_id: 0, class_name: "person".into(), confidence: conf as f32, bbox, track_id: None };
        frames.entry(frame as u64).or_default().push(detection);
    }
    let mut tracker = ByteTracker::new(params, info.fps);
    let mut out = String::from("frame,id,x1,y1,x2,y2\n");
    let mut spent = 0.0;
    for frame in 1..=info.frames {
        let boxes = frames.remove(&frame).unwrap_or_default();
        let started = Instant::now();
        let update = tracker.update((frame - 1) as f64 / info.fps, &boxes);
        spent += started.elapsed().as_secs_f64();
        for (detection, id) in boxes.iter().zip(update.ids) {
            if let Some(id) = id {
                let [x1, y1, x2, y2] = detection.bbox;
                let _ = writeln!(out, "{frame},{id},{x1:.2},{y1:.2},{x2:.2},{y2:.2}");
            }
        }
    }
    std::fs::write(tracks, out).with_context(|| format!("writing {}", tracks.display()))?;
    Ok(spent)
}
