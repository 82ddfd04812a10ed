//! What the service reports about itself: `GET /health` (liveness, what is loaded, the
//! defaults), `GET /ready` (whether a load balancer should send it new work) and `GET /metrics`
//! (Prometheus text).

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

/// `GET /ready`: 200 while this replica takes new uploads; 503 once SIGTERM came (it drains) or
/// while every session slot is taken, so that a load balancer's health check sends new work
/// elsewhere. (`/health` is liveness: it stays 200 in both cases.)
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let active = state.active_sessions.load(Ordering::Acquire);
    let max = state.config.server.max_sessions;
    let (ready, status) = if state.phase.get() != super::shutdown::Phase::Serving {
        (false, "draining")
    } else if active >= max {
        (false, "full")
    } else {
        (true, "ready")
    };
    let body = json!({"status": status, "sessions_active": active, "max_sessions": max});
    let mut response = if ready { HttpResponse::Ok() } else { HttpResponse::ServiceUnavailable() };
    response.insert_header(("Cache-Control", "no-store")).json(body)
}
