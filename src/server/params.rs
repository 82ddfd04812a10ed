//! The query parameters of the detect routes, checked with messages a user understands.

use std::collections::HashMap;

use streamdet_actors::decode::FrameSelection;
use streamdet_actors::detect::{DetectParams, Detector};
use streamdet_actors::pipeline::SessionParams;

use crate::config::{Config, DetectConfig};

/// Query parameters of the detect routes, checked with messages a user understands.
pub fn detect_params(query: &HashMap<String, String>, detector: &Detector, defaults: &DetectConfig) -> Result<DetectParams, String> {
    let unit = |name: &str, default: f32| -> Result<f32, String> {
        match query.get(name) {
            None => Ok(default),
            Some(v) => v.parse::<f32>().ok().filter(|x| (0.0..=1.0).contains(x)).ok_or(format!("{name} must be a number between 0 and 1")),
        }
    };
    let classes = match query.get("classes").filter(|s| !s.is_empty()) {
        None => None,
        Some(list) => Some(detector.class_ids(list.split(','))?),
    };
    Ok(DetectParams { conf: unit("conf", defaults.conf)?, iou: unit("iou", defaults.iou)?, classes, ..Default::default() })
}

pub const SESSION_ID_RULE: &str = "session must be 16 to 64 characters of A-Z, a-z, 0-9, - and _ (a UUID fits)";

/// Client-chosen ids are long enough that nobody guesses another client's.
pub fn valid_session_id(id: &str) -> bool {
    (16..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The query of the routes under `/sessions/{id}/`: nothing, or `session` repeating the path's
/// id (for proxies that hash on the query alone, such as ingress-nginx's `upstream-hash-by`).
pub fn session_query(query: &HashMap<String, String>, id: &str) -> Result<(), String> {
    if let Some(unknown) = query.keys().find(|k| k.as_str() != "session") {
        return Err(format!("unknown parameter {unknown:?} (known: session)"));
    }
    if query.get("session").is_some_and(|repeated| repeated != id) {
        return Err("?session= must repeat the id of the path".into());
    }
    Ok(())
}

pub fn video_params(query: &HashMap<String, String>, detector: &Detector, config: &Config) -> Result<SessionParams, String> {
    let (defaults, track) = (&config.detect, &config.track);
    const KNOWN: [&str; 11] = ["conf", "iou", "classes", "stride", "fps", "max_frames", "session", "track", "lines", "zones", "annotate"];
    if let Some(unknown) = query.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown parameter {unknown:?} (known: {})", KNOWN.join(", ")));
    }
    let selection = match (query.get("stride"), query.get("fps")) {
        (Some(_), Some(_)) => return Err("give at most one of stride and fps".into()),
        (Some(s), None) => FrameSelection::Stride(s.parse().ok().filter(|&n: &u64| n > 0).ok_or("stride must be a positive integer")?),
        (None, Some(f)) => FrameSelection::Fps(f.parse().ok().filter(|&x: &f64| x > 0.0 && x.is_finite()).ok_or("fps must be a positive number")?),
        (None, None) => defaults.default_selection(),
    };
    let max_frames = match query.get("max_frames") {
        None => None,
        Some(n) => Some(n.parse().ok().filter(|&n: &u64| n > 0).ok_or("max_frames must be a positive integer")?),
    };
    let id = match query.get("session") {
        None => None,
        Some(id) if valid_session_id(id) => Some(id.clone()),
        Some(_) => return Err(SESSION_ID_RULE.into()),
    };
    let tracking = track.request(query.get("track").map(String::as_str), query.get("lines").map(String::as_str), query.get("zones").map(String::as_str))?;
    let annotate = match query.get("annotate").map(String::as_str) {
        None | Some("0") | Some("false") => None,
        Some("1") | Some("true") => Some(config.annotate_options()),
        Some(_) => return Err("annotate must be 1 or 0".into()),
    };
    Ok(SessionParams { id, selection, detect: detect_params(query, detector, defaults)?, live: false, max_frames, tracking, annotate })
}
