//! ByteTrack (Zhang et al., ECCV 2022): boxes of one frame are matched to tracks in two rounds,
//! the confident ones first and then the weak ones, so that an object keeps its track while a
//! detector is unsure of it (occlusion, motion blur). Tracks move by a Kalman filter in video
//! time, so skipped frames (`stride`, `fps`) are followed. Unlike the reference code, a track
//! takes only boxes of its own class: with 80 classes, a person's track must not become the
//! cat that appears where the person was.

use super::assignment::assign;
use super::kalman::{KalmanState, measurement};
use crate::detect::Detection;
use crate::detect::postprocess::{iou, one_decimal_each};
use serde::Serialize;

/// ByteTrack's settings (`[track]` in the service's config.toml); the defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackParams {
    /// Detections at least this confident are matched first (the paper's τ_high, 0.6).
    pub high_threshold: f32,
    /// Detections above this, and under `high_threshold`, are matched second, to the tracks the
    /// first round left (τ_low, 0.1). Weaker ones are not tracked.
    pub low_threshold: f32,
    /// A confident detection that matches no track starts one when at least this confident
    /// (ε, 0.7).
    pub new_track_threshold: f32,
    /// The most a first-round pair may cost, the cost being 1 − IoU × confidence (0.8).
    pub match_threshold: f32,
    /// How long a track that lost its object waits to find it again, in seconds of video
    /// (the paper's 30 frames at 30 fps).
    pub lost_track_seconds: f64,
}

impl Default for TrackParams {
    fn default() -> Self {
        TrackParams { high_threshold: 0.6, low_threshold: 0.1, new_track_threshold: 0.7, match_threshold: 0.8, lost_track_seconds: 1.0 }
    }
}

/// The most the second round (weak detections) and the confirmation of new tracks may cost, as
/// in ByteTrack's reference code.
const SECOND_MATCH_THRESHOLD: f64 = 0.5;
const CONFIRM_MATCH_THRESHOLD: f64 = 0.7;
/// A lost track and a tracked one overlapping more than this are one object twice.
const DUPLICATE_IOU: f32 = 0.85;
/// Lost tracks kept at most, the longest lost ending first. Time ends them normally, but a
/// video whose timestamps stand still (or run back) would otherwise keep every object it ever
/// showed, and matching would grow with them.
pub const MAX_LOST_TRACKS: usize = 256;

/// A track as it ended: what a `track` event reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndedTrack {
    #[serde(rename = "track_id")]
    pub id: u64,
    pub class_id: usize,
    #[serde(rename = "class")]
    pub class_name: String,
    pub first_pts: f64,
    pub last_pts: f64,
    /// Processed frames in which the track had a box.
    pub frames: u64,
    #[serde(serialize_with = "one_decimal_each")]
    pub first_box: [f32; 4],
    #[serde(serialize_with = "one_decimal_each")]
    pub last_box: [f32; 4],
}

/// What one frame did to the tracks.
#[derive(Debug, Default)]
pub struct FrameTracks {
    /// The track of each detection, in the order given; `None` for a detection no confirmed
    /// track took.
    pub ids: Vec<Option<u64>>,
    /// Tracks that ended with this frame (lost for longer than `lost_track_seconds`).
    pub ended: Vec<EndedTrack>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Seen once, not yet confirmed by a second frame; it has no id.
    Tentative,
    Tracked,
    Lost,
}

#[derive(Debug)]
struct Track {
    id: Option<u64>,
    state: State,
    kalman: KalmanState,
    class_id: usize,
    class_name: String,
    first_pts: f64,
    last_pts: f64,
    frames: u64,
    first_box: [f32; 4],
    last_box: [f32; 4],
}

impl Track {
    fn new(detection: &Detection, pts: f64) -> Track {
        Track {
            id: None,
            state: State::Tentative,
            kalman: KalmanState::new(measurement(detection.bbox)),
            class_id: detection.class_id,
            class_name: detection.class_name.clone(),
            first_pts: pts,
            last_pts: pts,
            frames: 1,
            first_box: detection.bbox,
            last_box: detection.bbox,
        }
    }

    fn take(&mut self, detection: &Detection, pts: f64) {
        self.kalman.update(measurement(detection.bbox));
        self.state = State::Tracked;
        self.last_pts = pts;
        self.last_box = detection.bbox;
        self.frames += 1;
    }

    fn ended(&self) -> Option<EndedTrack> {
        Some(EndedTrack {
            id: self.id?,
            class_id: self.class_id,
            class_name: self.class_name.clone(),
            first_pts: self.first_pts,
            last_pts: self.last_pts,
            frames: self.frames,
            first_box: self.first_box,
            last_box: self.last_box,
        })
    }
}

/// The frame rate assumed when a video does not say (or says something absurd).
const USUAL_FRAME_RATE: f64 = 30.0;

/// The tracks of one video.
#[derive(Debug)]
pub struct ByteTracker {
    params: TrackParams,
    /// Seconds between two frames of the source video: the motion model's step.
    frame_seconds: f64,
    tracks: Vec<Track>,
    next_id: u64,
    last_pts: Option<f64>,
}

impl ByteTracker {
    /// A tracker for a video of `frame_rate` frames per second (its nominal rate, whatever
    /// frames are processed).
    pub fn new(params: TrackParams, frame_rate: f64) -> ByteTracker {
        let frame_rate = if (1.0..=1000.0).contains(&frame_rate) { frame_rate } else { USUAL_FRAME_RATE };
        ByteTracker { params, frame_seconds: 1.0 / frame_rate, tracks: Vec::new(), next_id: 1, last_pts: None }
    }

    /// Matches one processed frame's detections (at `pts` seconds, after the previous frame's)
    /// to the tracks.
    pub fn update(&mut self, pts: f64, detections: &[Detection]) -> FrameTracks {
        let first_frame = self.last_pts.is_none();
        let steps = self.last_pts.map_or(0.0, |last| ((pts - last) / self.frame_seconds).clamp(0.0, 1e4));
        self.last_pts = Some(pts);
        for track in &mut self.tracks {
            if track.state != State::Tracked {
                // A box that is not seen does not keep growing or shrinking.
                track.kalman.stop_resizing();
            }
            track.kalman.predict(steps);
        }
        let p = self.params;
        let high: Vec<usize> = (0..detections.len()).filter(|&i| detections[i].confidence >= p.high_threshold).collect();
        let low: Vec<usize> =
            (0..detections.len()).filter(|&i| detections[i].confidence > p.low_threshold && detections[i].confidence < p.high_threshold).collect();
        let mut ids = vec![None; detections.len()];

        // Round one: confirmed tracks, found or lost, against the confident boxes.
        let pool: Vec<usize> = (0..self.tracks.len()).filter(|&t| self.tracks[t].state != State::Tentative).collect();
        let first = self.match_round(&pool, &high, detections, true, f64::from(p.match_threshold));
        // Round two: tracks found in the last frame that round one left, against the weak boxes.
        let left: Vec<usize> = pool.iter().copied().filter(|t| !first.iter().any(|(m, _)| m == t) && self.tracks[*t].state == State::Tracked).collect();
        let second = self.match_round(&left, &low, detections, false, SECOND_MATCH_THRESHOLD);
        for &(t, d) in first.iter().chain(&second) {
            self.tracks[t].take(&detections[d], pts);
            ids[d] = self.tracks[t].id;
        }
        for &t in &left {
            if !second.iter().any(|(m, _)| *m == t) {
                self.tracks[t].state = State::Lost;
            }
        }
        // Round three: tracks seen once, against the confident boxes left; a match confirms one.
        let unused: Vec<usize> = high.iter().copied().filter(|d| !first.iter().any(|(_, m)| m == d)).collect();
        let tentative: Vec<usize> = (0..self.tracks.len()).filter(|&t| self.tracks[t].state == State::Tentative).collect();
        let confirmed = self.match_round(&tentative, &unused, detections, true, CONFIRM_MATCH_THRESHOLD);
        for &(t, d) in &confirmed {
            self.tracks[t].take(&detections[d], pts);
            ids[d] = Some(self.confirm(t));
        }
        let unconfirmed: Vec<usize> = tentative.iter().copied().filter(|t| !confirmed.iter().any(|(m, _)| m == t)).collect();
        // New tracks from the confident boxes nobody took; on the first frame they are
        // confirmed at once, as there was nothing before to match them to.
        let new_tracks: Vec<(usize, Track)> = unused
            .into_iter()
            .filter(|d| !confirmed.iter().any(|(_, m)| m == d) && detections[*d].confidence >= p.new_track_threshold)
            .map(|d| (d, Track::new(&detections[d], pts)))
            .collect();
        let mut keep = vec![true; self.tracks.len()];
        for t in unconfirmed {
            keep[t] = false;
        }
        for (t, track) in self.tracks.iter().enumerate() {
            if track.state == State::Lost && pts - track.last_pts > p.lost_track_seconds {
                keep[t] = false;
            }
        }
        self.mark_duplicates(&mut keep);
        let mut lost: Vec<usize> = (0..self.tracks.len()).filter(|&t| keep[t] && self.tracks[t].state == State::Lost).collect();
        if lost.len() > MAX_LOST_TRACKS {
            lost.sort_by(|&a, &b| self.tracks[a].last_pts.total_cmp(&self.tracks[b].last_pts));
            for &t in &lost[..lost.len() - MAX_LOST_TRACKS] {
                keep[t] = false;
            }
        }
        let mut ended = Vec::new();
        let mut kept = keep.into_iter();
        self.tracks.retain(|track| {
            let keep = kept.next().unwrap_or(true);
            if !keep {
                ended.extend(track.ended());
            }
            keep
        });
        for (d, track) in new_tracks {
            self.tracks.push(track);
            if first_frame {
                ids[d] = Some(self.confirm(self.tracks.len() - 1));
            }
        }
        FrameTracks { ids, ended }
    }

    /// Every confirmed track, ended: the video is over.
    pub fn finish(&mut self) -> Vec<EndedTrack> {
        self.tracks.drain(..).filter_map(|t| t.ended()).collect()
    }

    fn confirm(&mut self, t: usize) -> u64 {
        let track = &mut self.tracks[t];
        track.state = State::Tracked;
        *track.id.get_or_insert_with(|| {
            let id = self.next_id;
            self.next_id += 1;
            id
        })
    }

    /// The pairs of one matching round: (track, detection) positions into `self.tracks` and
    /// `detections`.
    fn match_round(&self, tracks: &[usize], candidates: &[usize], detections: &[Detection], fuse_score: bool, limit: f64) -> Vec<(usize, usize)> {
        let mut cost = Vec::with_capacity(tracks.len() * candidates.len());
        for &t in tracks {
            let track = &self.tracks[t];
            let predicted = track.kalman.xyxy();
            for &d in candidates {
                let detection = &detections[d];
                let overlap = if detection.class_id == track.class_id { f64::from(iou(&predicted, &detection.bbox)) } else { 0.0 };
                let similarity = if fuse_score { overlap * f64::from(detection.confidence) } else { overlap };
                cost.push(1.0 - similarity);
            }
        }
        assign(&cost, tracks.len(), candidates.len(), limit).into_iter().map(|(t, d)| (tracks[t], candidates[d])).collect()
    }

    /// Of a found track and a lost one that overlap almost entirely, the younger is dropped.
    fn mark_duplicates(&self, keep: &mut [bool]) {
        for (a, found) in self.tracks.iter().enumerate() {
            if found.state != State::Tracked || !keep[a] {
                continue;
            }
            for (b, lost) in self.tracks.iter().enumerate() {
                if lost.state != State::Lost || !keep[b] || lost.class_id != found.class_id || iou(&found.kalman.xyxy(), &lost.kalman.xyxy()) <= DUPLICATE_IOU {
                    continue;
                }
                let (found_age, lost_age) = (found.last_pts - found.first_pts, lost.last_pts - lost.first_pts);
                if found_age > lost_age {
                    keep[b] = false;
                } else {
                    keep[a] = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(confidence: f32, x: f32) -> Detection {
        Detection { class_id: 0, class_name: "person".into(), confidence, bbox: [x, 100.0, x + 60.0, 260.0], track_id: None }
    }

    #[test]
    fn objects_keep_their_ids_through_weak_and_missing_boxes() {
        let mut tracker = ByteTracker::new(TrackParams::default(), 25.0);
        let mut ids = Vec::new();
        for frame in 0..60u32 {
            let pts = f64::from(frame) / 25.0;
            let x = 2.0 * frame as f32;
            // Object A walks right; it is weak (0.3) for frames 10-14 and missing for 20-29.
            // Object B stands still far away.
            let mut boxes = vec![person(0.9, 400.0)];
            match frame {
                10..15 => boxes.push(person(0.3, x)),
                20..30 => {}
                _ => boxes.push(person(0.9, x)),
            }
            let update = tracker.update(pts, &boxes);
            assert!(update.ended.is_empty(), "frame {frame}: {:?}", update.ended);
            ids.push(update.ids);
        }
        assert!(ids.iter().all(|f| f[0] == Some(1)), "the still object keeps id 1");
        assert!(ids.iter().filter(|f| f.len() == 2).all(|f| f[1] == Some(2)), "the walker keeps id 2 through weak and missing frames");
        let ended = tracker.finish();
        assert_eq!(ended.iter().map(|t| (t.id, t.frames)).collect::<Vec<_>>(), [(1, 60), (2, 50)]);
        assert_eq!((ended[1].first_pts, ended[1].last_pts), (0.0, 59.0 / 25.0));
    }

    #[test]
    fn weak_boxes_start_no_track_and_a_lost_track_ends_after_the_buffer() {
        let mut tracker = ByteTracker::new(TrackParams::default(), 25.0);
        assert_eq!(tracker.update(0.0, &[person(0.3, 0.0)]).ids, [None], "too weak to start a track");
        assert_eq!(tracker.update(0.04, &[person(0.9, 200.0)]).ids, [None], "a new track waits for a second frame");
        assert_eq!(tracker.update(0.08, &[person(0.9, 200.0)]).ids, [Some(1)]);
        assert!(tracker.update(1.0, &[]).ended.is_empty(), "lost, but within lost_track_seconds");
        let ended = tracker.update(1.2, &[]).ended;
        assert_eq!(ended.len(), 1, "lost for longer than lost_track_seconds");
        assert_eq!(ended[0].last_box, person(0.9, 200.0).bbox);
        assert_eq!(tracker.update(1.24, &[person(0.9, 200.0)]).ids, [None], "what comes back later is a new object");
    }

    #[test]
    fn timestamps_that_stand_still_keep_the_lost_tracks_bounded() {
        // A thousand objects, each seen in two frames and never again, all at pts 0: time never
        // ends their tracks.
        let mut tracker = ByteTracker::new(TrackParams::default(), 25.0);
        let mut ended = 0;
        for frame in 0..2000u32 {
            let k = frame / 2;
            let at = |v: u32| v as f32;
            let object = Detection { bbox: [at(k % 500 * 120), at(k / 500 * 300), at(k % 500 * 120 + 60), at(k / 500 * 300 + 160)], ..person(0.9, 0.0) };
            ended += tracker.update(0.0, &[object]).ended.len();
        }
        assert!(tracker.tracks.len() <= MAX_LOST_TRACKS + 1, "{} tracks", tracker.tracks.len());
        assert_eq!(ended + tracker.finish().len(), 1000, "every object's track ends once");
    }

    #[test]
    fn a_track_takes_only_boxes_of_its_class() {
        let mut tracker = ByteTracker::new(TrackParams::default(), 25.0);
        assert_eq!(tracker.update(0.0, &[person(0.9, 0.0)]).ids, [Some(1)]);
        let cat = Detection { class_id: 15, class_name: "cat".into(), ..person(0.9, 0.0) };
        assert_eq!(tracker.update(0.04, std::slice::from_ref(&cat)).ids, [None], "a cat where the person was starts its own track");
        assert_eq!(tracker.update(0.08, &[cat]).ids, [Some(2)]);
    }

    #[test]
    fn skipped_frames_are_followed_by_the_motion_model() {
        // 8 px per frame, seen every 4th frame of a 30 fps video (stride 4): 32 px between
        // processed frames.
        let mut tracker = ByteTracker::new(TrackParams::default(), 30.0);
        for step in 0..30u32 {
            let frame = step * 4;
            let update = tracker.update(f64::from(frame) / 30.0, &[person(0.9, 8.0 * frame as f32)]);
            assert_eq!(update.ids, [Some(1)], "processed frame {step}");
        }
        let predicted = tracker.tracks[0].kalman.xyxy();
        assert!((predicted[0] - 8.0 * 116.0).abs() < 2.0, "the filter knows the speed: {predicted:?}");
    }
}
