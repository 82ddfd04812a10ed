//! Following objects across a video's frames: ByteTrack gives each object a track id, and
//! counting lines and zones turn tracks into crossings, entries and exits. A session that tracks
//! runs one [`Tracking`] over its processed frames, in order, while the upload arrives.

mod assignment;
pub mod bytetrack;
pub mod counting;
mod kalman;

use std::collections::HashMap;

use serde::Serialize;

pub use bytetrack::{ByteTracker, EndedTrack, TrackParams};
pub use counting::{ClassCounts, Direction, Line, LineTotals, Zone, ZoneAction, ZoneTotals, parse_lines, parse_zones};

use crate::detect::Detection;
use counting::{Point, anchor, crossing, inside, off_line};

/// What a tracking session asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackingParams {
    pub track: TrackParams,
    pub lines: Vec<Line>,
    pub zones: Vec<Zone>,
}

/// A track's anchor crossed a line (the `crossing` event).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Crossing {
    pub track_id: u64,
    pub class_id: usize,
    #[serde(rename = "class")]
    pub class_name: String,
    pub line: String,
    pub direction: Direction,
    pub pts: f64,
}

/// A track's anchor came into a zone or left it (the `zone` event).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZoneChange {
    pub track_id: u64,
    pub class_id: usize,
    #[serde(rename = "class")]
    pub class_name: String,
    pub zone: String,
    pub action: ZoneAction,
    pub pts: f64,
}

/// What tracking reports besides track ids on the boxes.
#[derive(Debug, Clone, PartialEq)]
pub enum TrackEvent {
    Crossing(Crossing),
    Zone(ZoneChange),
    Ended(EndedTrack),
}

/// The totals `end` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrackingTotals {
    /// Distinct tracks per class.
    pub tracks: ClassCounts,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<LineTotals>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<ZoneTotals>,
}

/// Where a track was, for its next crossing or zone change.
struct Places {
    /// Per line: the last anchor that was off it.
    off_line: Vec<Option<Point>>,
    /// Per zone: whether the anchor is inside.
    in_zone: Vec<bool>,
}

/// One session's tracks, crossings and zone counts.
pub struct Tracking {
    params: TrackParams,
    /// Made when the video's frame rate is known, before its first frame.
    tracker: Option<ByteTracker>,
    lines: Vec<Line>,
    zones: Vec<Zone>,
    places: HashMap<u64, Places>,
    occupancy: Vec<u64>,
    totals: TrackingTotals,
}

impl Tracking {
    pub fn new(params: TrackingParams) -> Tracking {
        let totals = TrackingTotals {
            tracks: ClassCounts::new(),
            lines: params.lines.iter().map(|l| LineTotals { name: l.name.clone(), ..Default::default() }).collect(),
            zones: params.zones.iter().map(|z| ZoneTotals { name: z.name.clone(), ..Default::default() }).collect(),
        };
        Tracking {
            params: params.track,
            tracker: None,
            occupancy: vec![0; params.zones.len()],
            lines: params.lines,
            zones: params.zones,
            places: HashMap::new(),
            totals,
        }
    }

    /// Sets the video's frame rate (its nominal rate), before the first frame.
    pub fn start(&mut self, frame_rate: f64) {
        self.tracker = Some(ByteTracker::new(self.params, frame_rate));
    }

    /// Tracks one processed frame (frames in order of `pts`, seconds): sets each detection's
    /// `track_id`, and returns the crossings and zone changes of this frame, then the tracks
    /// that ended with it.
    pub fn observe(&mut self, pts: f64, detections: &mut [Detection]) -> Vec<TrackEvent> {
        let params = self.params;
        let tracker = self.tracker.get_or_insert_with(|| ByteTracker::new(params, 0.0));
        let frame = tracker.update(pts, detections);
        let mut events = Vec::new();
        for (detection, id) in detections.iter_mut().zip(frame.ids) {
            detection.track_id = id;
            let Some(id) = id else { continue };
            // A track takes only boxes of its class: the box's class is the track's.
            self.move_track(id, detection.class_id, &detection.class_name, anchor(detection.bbox), pts, &mut events);
        }
        for ended in frame.ended {
            self.end_track(ended, &mut events);
        }
        events
    }

    /// Ends every track: the video is over.
    pub fn finish(&mut self) -> Vec<TrackEvent> {
        let mut events = Vec::new();
        for ended in self.tracker.as_mut().map(ByteTracker::finish).unwrap_or_default() {
            self.end_track(ended, &mut events);
        }
        events
    }

    pub fn totals(&self) -> &TrackingTotals {
        &self.totals
    }

    /// The lines and zones counted, to draw.
    pub fn overlay(&self) -> (Vec<Line>, Vec<Zone>) {
        (self.lines.clone(), self.zones.clone())
    }

    /// The running counts in words, one line per counting line and zone.
    pub fn counts_text(&self) -> Vec<String> {
        let sum = |counts: &ClassCounts| counts.values().sum::<u64>();
        let lines = self.totals.lines.iter().map(|l| format!("{}: in {}, out {}", l.name, sum(&l.into), sum(&l.out)));
        let zones = self.totals.zones.iter().zip(&self.occupancy).map(|(z, now)| format!("{}: {} now, {} entered", z.name, now, sum(&z.entries)));
        lines.chain(zones).collect()
    }

    fn move_track(&mut self, id: u64, class_id: usize, class_name: &str, to: Point, pts: f64, events: &mut Vec<TrackEvent>) {
        let (lines, zones) = (self.lines.len(), self.zones.len());
        let places = self.places.entry(id).or_insert_with(|| Places { off_line: vec![None; lines], in_zone: vec![false; zones] });
        for (l, line) in self.lines.iter().enumerate() {
            if let Some(direction) = places.off_line[l].and_then(|from| crossing(line, from, to)) {
                let totals = &mut self.totals.lines[l];
                let counts = if direction == Direction::In { &mut totals.into } else { &mut totals.out };
                *counts.entry(class_name.to_string()).or_default() += 1;
                let crossing = Crossing { track_id: id, class_id, class_name: class_name.to_string(), line: line.name.clone(), direction, pts };
                events.push(TrackEvent::Crossing(crossing));
            }
            if off_line(line, to) {
                places.off_line[l] = Some(to);
            }
        }
        for (z, zone) in self.zones.iter().enumerate() {
            let now = inside(&zone.points, to);
            if now == places.in_zone[z] {
                continue;
            }
            places.in_zone[z] = now;
            let action = if now {
                self.occupancy[z] += 1;
                let totals = &mut self.totals.zones[z];
                totals.max_occupancy = totals.max_occupancy.max(self.occupancy[z]);
                *totals.entries.entry(class_name.to_string()).or_default() += 1;
                ZoneAction::Enter
            } else {
                self.occupancy[z] -= 1;
                ZoneAction::Exit
            };
            events.push(TrackEvent::Zone(ZoneChange { track_id: id, class_id, class_name: class_name.to_string(), zone: zone.name.clone(), action, pts }));
        }
    }

    /// A track that ends leaves the zones it was in, at the last time it was seen.
    fn end_track(&mut self, ended: EndedTrack, events: &mut Vec<TrackEvent>) {
        if let Some(places) = self.places.remove(&ended.id) {
            for (z, was_inside) in places.in_zone.into_iter().enumerate() {
                if was_inside {
                    self.occupancy[z] -= 1;
                    let change = ZoneChange {
                        track_id: ended.id,
                        class_id: ended.class_id,
                        class_name: ended.class_name.clone(),
                        zone: self.zones[z].name.clone(),
                        action: ZoneAction::Exit,
                        pts: ended.last_pts,
                    };
                    events.push(TrackEvent::Zone(change));
                }
            }
        }
        *self.totals.tracks.entry(ended.class_name.clone()).or_default() += 1;
        events.push(TrackEvent::Ended(ended));
    }
}
