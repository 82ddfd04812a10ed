//! From the model's raw output to detections: confidence threshold, class filter, per-class
//! non-maximum suppression, a top-k cap, and boxes mapped back to frame pixels.

use serde::{Serialize, Serializer};

use crate::frame::Letterbox;

/// One detected object, in pixels of the frame as displayed. Serialised the same way wherever
/// it goes (events, `POST /detect`, the CLI): confidence with three decimals, box with one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub class_id: usize,
    #[serde(rename = "class")]
    pub class_name: String,
    #[serde(serialize_with = "three_decimals")]
    pub confidence: f32,
    /// `[x1, y1, x2, y2]`, clamped to the frame, one decimal.
    #[serde(rename = "box", serialize_with = "one_decimal_each")]
    pub bbox: [f32; 4],
    /// The object's track across frames, when the session tracks (`track=bytetrack`) and a
    /// confirmed track took this box.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_id: Option<u64>,
}

/// An `f32` as the nearest `f64` with `places` decimals: what the value means, not its binary
/// neighbour (`0.882`, not `0.8820000290870667`, once a JSON value holds it as `f64`).
fn decimals(v: f32, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (f64::from(v) * scale).round() / scale
}

fn three_decimals<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(decimals(*v, 3))
}

pub(crate) fn one_decimal_each<S: Serializer>(b: &[f32; 4], s: S) -> Result<S::Ok, S::Error> {
    b.map(|v| decimals(v, 1)).serialize(s)
}

/// Thresholds and filters for turning raw output into detections.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectParams {
    /// Minimum class score (0.25 by default).
    pub conf: f32,
    /// IoU above which the weaker of two same-class boxes is dropped (0.45 by default).
    pub iou: f32,
    /// Only these class ids, when set.
    pub classes: Option<Vec<usize>>,
    /// At most this many detections per frame, best first.
    pub max_detections: usize,
}

impl Default for DetectParams {
    fn default() -> Self {
        DetectParams { conf: 0.25, iou: 0.45, classes: None, max_detections: 300 }
    }
}

/// A candidate in model-input pixels.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    class_id: usize,
    score: f32,
    bbox: [f32; 4],
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes.
pub(crate) fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

fn round1(v: f32) -> f32 {
    (v * 10.0).round() / 10.0
}

/// Decodes one image's output, laid out `[4 + classes][anchors]` (cx, cy, w, h, then one score
/// per class), into detections in frame pixels.
pub fn detections(output: &[f32], anchors: usize, class_names: &[String], letterbox: &Letterbox, params: &DetectParams) -> Vec<Detection> {
    let classes = output.len() / anchors.max(1) - 4;
    let row = |r: usize| &output[r * anchors..(r + 1) * anchors];
    // Best class per anchor, as ultralytics' NMS does (one label per box).
    let mut best_score = vec![f32::NEG_INFINITY; anchors];
    let mut best_class = vec![0usize; anchors];
    for c in 0..classes {
        for (a, &s) in row(4 + c).iter().enumerate() {
            if s > best_score[a] {
                best_score[a] = s;
                best_class[a] = c;
            }
        }
    }
    let (cx, cy, w, h) = (row(0), row(1), row(2), row(3));
    let mut candidates: Vec<Candidate> = (0..anchors)
        .filter(|&a| best_score[a] > params.conf)
        .filter(|&a| params.classes.as_ref().is_none_or(|keep| keep.contains(&best_class[a])))
        .map(|a| Candidate {
            class_id: best_class[a],
            score: best_score[a],
            bbox: [cx[a] - w[a] / 2.0, cy[a] - h[a] / 2.0, cx[a] + w[a] / 2.0, cy[a] + h[a] / 2.0],
        })
        .collect();
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Candidate> = Vec::new();
    for c in candidates {
        if kept.len() >= params.max_detections {
            break;
        }
        if kept.iter().all(|k| k.class_id != c.class_id || iou(&k.bbox, &c.bbox) <= params.iou) {
            kept.push(c);
        }
    }
    kept.into_iter()
        .map(|c| Detection {
            class_id: c.class_id,
            class_name: class_names.get(c.class_id).cloned().unwrap_or_else(|| c.class_id.to_string()),
            confidence: (c.score * 1000.0).round() / 1000.0,
            bbox: letterbox.to_source(c.bbox).map(round1),
            track_id: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detections_serialise_with_their_decimals_through_a_json_value() {
        let d = Detection { class_id: 0, class_name: "person".into(), confidence: 0.882, bbox: [0.9, 10.2, 33.3, 640.0], track_id: None };
        let text = serde_json::to_value(&d).unwrap().to_string();
        assert_eq!(text, r#"{"box":[0.9,10.2,33.3,640.0],"class":"person","class_id":0,"confidence":0.882}"#);
    }

    fn output(boxes: &[([f32; 4], usize, f32)], classes: usize) -> (Vec<f32>, usize) {
        let anchors = boxes.len();
        let mut out = vec![0.0; (4 + classes) * anchors];
        for (a, (b, class, score)) in boxes.iter().enumerate() {
            for (r, v) in b.iter().enumerate() {
                out[r * anchors + a] = *v;
            }
            out[(4 + class) * anchors + a] = *score;
        }
        (out, anchors)
    }

    #[test]
    fn thresholds_suppresses_and_maps_back() {
        let names: Vec<String> = ["person", "cat"].iter().map(|s| s.to_string()).collect();
        let (out, anchors) = output(
            &[
                ([100.0, 100.0, 50.0, 50.0], 0, 0.9),
                ([102.0, 101.0, 50.0, 50.0], 0, 0.8), // overlaps the first: suppressed
                ([102.0, 101.0, 50.0, 50.0], 1, 0.7), // same place, other class: kept
                ([300.0, 300.0, 20.0, 20.0], 0, 0.2), // below conf
            ],
            2,
        );
        let lb = Letterbox::new((640, 640), (640, 640));
        let dets = detections(&out, anchors, &names, &lb, &DetectParams::default());
        assert_eq!(dets.len(), 2);
        assert_eq!((dets[0].class_name.as_str(), dets[0].confidence), ("person", 0.9));
        assert_eq!(dets[0].bbox, [75.0, 75.0, 125.0, 125.0]);
        assert_eq!(dets[1].class_name, "cat");
        let only_cats = DetectParams { classes: Some(vec![1]), ..Default::default() };
        assert_eq!(detections(&out, anchors, &names, &lb, &only_cats).len(), 1);
    }
}
