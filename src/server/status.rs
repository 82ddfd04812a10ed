//! What the service reports about itself: `GET /health` (liveness, what is loaded, the
//! defaults) and `GET /metrics` (Prometheus text).

use std::sync::atomic::Ordering;

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

pub async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let detector = state.pipeline.detector();
    let size = detector.input_size();
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "model": {"name": state.model_name, "input": [size.width, size.height], "classes": detector.class_names().len(), "class_names": detector.class_names()},
        "device": state.config.model.device,
        "sessions_active": state.active_sessions.load(Ordering::Acquire),
        "watchers": state.sessions.watchers(),
        "max_sessions": state.config.server.max_sessions,
        "defaults": {
            // As written in the configuration, not as their nearest f32.
            "conf": (f64::from(state.config.detect.conf) * 1e6).round() / 1e6,
            "iou": (f64::from(state.config.detect.iou) * 1e6).round() / 1e6,
            "stride": state.config.detect.stride,
            "fps": (state.config.detect.fps > 0.0).then_some(state.config.detect.fps),
        },
        "max_upload_bytes": state.config.server.max_upload_bytes,
    }))
}
