//! The HTTP service: actix-web routes over the actor pipeline.
//!
//! `POST /detect/video` reads the body as it arrives, answers once the first bytes identify the
//! container (an unsupported upload gets a 415), and streams the session's events back as
//! NDJSON (or SSE with `Accept: text/event-stream`) while the upload is still going (a client
//! must be full-duplex to see them early); `POST /detect` answers for one image; `GET /health`
//! says what is loaded and what the defaults are.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::body::BoxBody;
use actix_web::dev::ServiceRequest;
use actix_web::http::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use actix_web::middleware::Next;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use bytes::Bytes;
use serde_json::json;
use streamdet_actors::actors::inference::BatchPolicy;
use streamdet_actors::buffer::BufferOptions;
use streamdet_actors::decode::{DecodeOptions, FrameSelection};
use futures_util::StreamExt;
use streamdet_actors::actors::Event;
use streamdet_actors::detect::{self, DetectParams, Detector, ModelFrame};
use streamdet_actors::pipeline::{Pipeline, PipelineOptions, SessionParams, new_session_id};

use crate::config::{Config, DetectConfig};
use crate::metrics::Metrics;
use crate::sessions::{Registry, SessionLog};

struct AppState {
    pipeline: Pipeline,
    config: Config,
    model_name: String,
    active_sessions: Arc<AtomicUsize>,
    sessions: Registry,
    metrics: Arc<Metrics>,
}

/// A session slot, released when the response stream that holds it is dropped.
struct SessionSlot(Arc<AtomicUsize>);

impl SessionSlot {
    fn acquire(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(SessionSlot(Arc::clone(counter)))
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({"code": code, "message": message.into()}))
}

/// Query parameters of the detect routes, checked with messages a user understands.
fn detect_params(query: &HashMap<String, String>, detector: &Detector, defaults: &DetectConfig) -> Result<DetectParams, String> {
    let unit = |name: &str, default: f32| -> Result<f32, String> {
        match query.get(name) {
            None => Ok(default),
            Some(v) => v.parse::<f32>().ok().filter(|x| (0.0..=1.0).contains(x)).ok_or(format!("{name} must be a number between 0 and 1")),
        }
    };
    let classes = match query.get("classes").filter(|s| !s.is_empty()) {
        None => None,
        Some(list) => Some(
            list.split(',')
                .map(|name| {
                    detector.class_names().iter().position(|c| c == name.trim()).ok_or(format!("the model has no class {name:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(DetectParams { conf: unit("conf", defaults.conf)?, iou: unit("iou", defaults.iou)?, classes, ..Default::default() })
}

const SESSION_ID_RULE: &str = "session must be 8 to 64 characters of A-Z, a-z, 0-9, - and _";

fn valid_session_id(id: &str) -> bool {
    (8..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn video_params(query: &HashMap<String, String>, detector: &Detector, defaults: &DetectConfig) -> Result<SessionParams, String> {
    const KNOWN: [&str; 7] = ["conf", "iou", "classes", "stride", "fps", "max_frames", "session"];
    if let Some(unknown) = query.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown parameter {unknown:?} (known: {})", KNOWN.join(", ")));
    }
    let selection = match (query.get("stride"), query.get("fps")) {
        (Some(_), Some(_)) => return Err("give at most one of stride and fps".into()),
        (Some(s), None) => FrameSelection::Stride(s.parse().ok().filter(|&n: &u64| n > 0).ok_or("stride must be a positive integer")?),
        (None, Some(f)) => FrameSelection::Fps(f.parse().ok().filter(|&x: &f64| x > 0.0 && x.is_finite()).ok_or("fps must be a positive number")?),
        (None, None) if defaults.fps > 0.0 => FrameSelection::Fps(defaults.fps),
        (None, None) if defaults.stride > 1 => FrameSelection::Stride(defaults.stride),
        (None, None) => FrameSelection::All,
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
    Ok(SessionParams { id, selection, detect: detect_params(query, detector, defaults)?, live: false, max_frames })
}

async fn detect_video(
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let mut params = match video_params(&query, state.pipeline.detector(), &state.config.detect) {
        Ok(params) => params,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, "bad_parameter", message),
    };
    let id = params.id.get_or_insert_with(new_session_id).clone();
    let limit = state.config.server.max_upload_bytes;
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return error_response(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the upload is larger than the limit of {limit} bytes"));
    }
    let Some(slot) = SessionSlot::acquire(&state.active_sessions, state.config.server.max_sessions) else {
        return error_response(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", "the server is busy with other uploads; try again shortly");
    };
    let Ok(log) = state.sessions.start(&id) else {
        return error_response(StatusCode::CONFLICT, "conflict", format!("a session with id {id:?} is already running"));
    };
    let session = match state.pipeline.session(params) {
        Ok(session) => session,
        Err(err) => {
            log.close("internal", "the session could not start");
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("cannot start a session: {err}"));
        }
    };
    let (upload, mut events) = session.split();
    let canceller = upload.clone();
    log.set_cancel(move || canceller.cancel("internal", "the server is shutting down"));
    // The body is read in its own task, so the response streams while the upload goes on.
    let idle = Some(Duration::from_secs(state.config.server.idle_upload_timeout_s));
    let (body_read, body_done) = tokio::sync::oneshot::channel::<()>();
    let chunks = if is_multipart(&req) { multipart_file(&req, payload) } else { Box::pin(payload.map(|c| c.map_err(|e| e.to_string()))) };
    actix_web::rt::spawn(async move {
        upload.feed_all(chunks, idle).await;
        let _ = body_read.send(());
    });
    // The session's events go to its log, which every listener follows; the slot is held
    // until the session ends, whoever listens.
    let pump_log = Arc::clone(&log);
    let metrics = Arc::clone(&state.metrics);
    metrics.sessions_total.inc();
    metrics.sessions_active.inc();
    actix_web::rt::spawn(async move {
        let _slot = slot;
        while let Some(event) = events.recv().await {
            metrics.observe_event(&event);
            pump_log.push(event);
        }
        pump_log.close("internal", "the session stopped");
        metrics.sessions_active.dec();
    });
    // The status line waits for the first event: `start` once the container is identified
    // (a few KiB into the upload), or an error that a plain HTTP status says better.
    if let Some(Event::Error { code, message }) = log.next(0).await {
        let status = match code.as_str() {
            "unsupported_media" | "no_video_stream" | "unsupported_codec" => Some(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            "too_large" => Some(StatusCode::PAYLOAD_TOO_LARGE),
            _ => None,
        };
        if let Some(status) = status {
            return error_response(status, &code, message);
        }
    }
    let sse = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    // After `max_frames`, `end` comes while the client is still sending: the response stays
    // open until the rest of the body has been read (and dropped), or the connection would
    // close under the client's feet.
    follow(log, 0, sse, Some(body_done))
}

fn is_multipart(req: &HttpRequest) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// The bytes of the first file part (a part with a file name; else the first part) of a
/// `multipart/form-data` body, as they arrive. Parts before it are skipped.
fn multipart_file(req: &HttpRequest, payload: web::Payload) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, String>>>> {
    use actix_multipart::{Field, Multipart};
    // The multipart reader must outlive the part: the part reads through it.
    type State = (Multipart, Option<Field>);
    let multipart = Multipart::new(req.headers(), payload);
    let chunks = futures_util::stream::unfold(Some((multipart, None)), |state: Option<State>| async move {
        let (mut multipart, mut field) = state?;
        loop {
            if let Some(part) = field.as_mut() {
                return match part.next().await {
                    Some(Ok(bytes)) => Some((Ok(bytes), Some((multipart, field)))),
                    Some(Err(err)) => Some((Err(format!("bad multipart body: {err}")), None)),
                    None => None,
                };
            }
            match multipart.next().await {
                Some(Ok(mut part)) => {
                    let is_file = part.content_disposition().and_then(|d| d.get_filename()).is_some();
                    if is_file || part.name() == Some("file") {
                        field = Some(part);
                    } else {
                        // A text field before the file: read past it.
                        while let Some(Ok(_)) = part.next().await {}
                    }
                }
                Some(Err(err)) => return Some((Err(format!("bad multipart body: {err}")), None)),
                None => return Some((Err("the multipart body has no file part".to_string()), None)),
            }
        }
    });
    Box::pin(chunks)
}

/// A response that follows `log` from event `from`, as SSE or NDJSON.
/// The response ends after the last event and, when given, once `then` resolves.
fn follow(log: Arc<SessionLog>, from: usize, sse: bool, then: Option<tokio::sync::oneshot::Receiver<()>>) -> HttpResponse {
    let messages = futures_util::stream::unfold((log, from, then), move |(log, index, then)| async move {
        let Some(event) = log.next(index).await else {
            if let Some(then) = then {
                let _ = then.await;
            }
            return None;
        };
        let bytes = if sse { sse_message(&event, index as u64) } else { ndjson_line(&event) };
        Some((Ok::<_, actix_web::Error>(bytes), (log, index + 1, then)))
    });
    let content_type = if sse { "text/event-stream" } else { "application/x-ndjson" };
    HttpResponse::Ok().content_type(content_type).insert_header(("Cache-Control", "no-cache")).streaming(messages)
}

/// `GET /sessions/{id}/events`: the session's events as SSE; may come before the upload (it
/// waits) and after it (for a while); `Last-Event-ID` resumes after that event.
async fn session_events(req: HttpRequest, id: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    if !valid_session_id(&id) {
        return error_response(StatusCode::BAD_REQUEST, "bad_parameter", SESSION_ID_RULE);
    }
    let from = req.headers().get("Last-Event-ID").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<usize>().ok()).map_or(0, |last| last + 1);
    follow(state.sessions.watch(&id), from, true, None)
}

fn ndjson_line(event: &Event) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// `event: <type>`, `id: <sequence>`, `data: <json>`.
fn sse_message(event: &Event, sequence: u64) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_default();
    let kind = match event {
        Event::Start { .. } => "start",
        Event::Frame { .. } => "frame",
        Event::End { .. } => "end",
        Event::Error { .. } => "error",
    };
    Bytes::from(format!("event: {kind}\nid: {sequence}\ndata: {data}\n\n"))
}

/// `POST /detect`: one image (JPEG, PNG, WebP) in the body, EXIF orientation applied.
async fn detect_image(query: web::Query<HashMap<String, String>>, mut payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    if let Some(unknown) = query.keys().find(|k| !["conf", "iou", "classes"].contains(&k.as_str())) {
        return error_response(StatusCode::BAD_REQUEST, "bad_parameter", format!("unknown parameter {unknown:?} (known: conf, iou, classes)"));
    }
    let detector = Arc::clone(state.pipeline.detector());
    let params = match detect_params(&query, &detector, &state.config.detect) {
        Ok(params) => params,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, "bad_parameter", message),
    };
    let limit = state.config.server.max_upload_bytes;
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        match chunk {
            Ok(bytes) if (body.len() + bytes.len()) as u64 <= limit => body.extend_from_slice(&bytes),
            Ok(_) => return error_response(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the image is larger than the limit of {limit} bytes")),
            Err(err) => return error_response(StatusCode::BAD_REQUEST, "truncated", format!("the upload broke off: {err}")),
        }
    }
    // Decoding and the model block: run them off the server's threads.
    let result = web::block(move || -> Result<serde_json::Value, (StatusCode, &'static str, String)> {
        let (rgb, width, height) = detect::decode_image(&body).map_err(|e| (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media", e))?;
        let (model_rgb, letterbox) = detect::letterbox_rgb(&rgb, width, height, detector.input_size());
        let frame = ModelFrame { rgb: model_rgb, letterbox };
        let mut found = detector
            .detect(std::slice::from_ref(&frame), &params)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        Ok(json!({"detections": found.pop().unwrap_or_default(), "width": width, "height": height}))
    })
    .await;
    match result {
        Ok(Ok(body)) => HttpResponse::Ok().json(body),
        Ok(Err((status, code, message))) => error_response(status, code, message),
        Err(err) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", err.to_string()),
    }
}

/// The API description, served as written (a test keeps it and the routes in step).
pub const OPENAPI: &str = include_str!("web/openapi.json");

/// The page at `/` (watch detections arrive during an upload), built into the binary.
const PAGE_ASSETS: [(&str, &str, &str); 3] = [
    ("/", "text/html; charset=utf-8", include_str!("web/index.html")),
    ("/app.js", "text/javascript; charset=utf-8", include_str!("web/app.js")),
    ("/style.css", "text/css; charset=utf-8", include_str!("web/style.css")),
];

async fn page_asset(req: HttpRequest) -> HttpResponse {
    let Some((_, content_type, body)) = PAGE_ASSETS.iter().find(|(path, _, _)| *path == req.path()) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such page");
    };
    HttpResponse::Ok()
        .content_type(*content_type)
        // The page talks to this server only; videos and images are shown from local blobs.
        .insert_header(("Content-Security-Policy", "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(*body)
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(OPENAPI)
}

async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let detector = state.pipeline.detector();
    let (w, h) = detector.input_size();
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "model": {"name": state.model_name, "input": [w, h], "classes": detector.class_names().len(), "class_names": detector.class_names()},
        "device": state.config.model.device,
        "sessions_active": state.active_sessions.load(Ordering::Acquire),
        "max_sessions": state.config.server.max_sessions,
        "defaults": {
            "conf": state.config.detect.conf,
            "iou": state.config.detect.iou,
            "stride": state.config.detect.stride,
            "fps": (state.config.detect.fps > 0.0).then_some(state.config.detect.fps),
        },
        "max_upload_bytes": state.config.server.max_upload_bytes,
    }))
}

/// Runs the service until it is stopped. Prints `{"type":"listening","addr":…}` once bound.
pub async fn serve(config: Config, listen: String, detector: Detector) -> anyhow::Result<()> {
    let model_name = config.model.path.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let metrics = Arc::new(Metrics::new());
    let options = PipelineOptions {
        model_name: model_name.clone(),
        buffer: BufferOptions { dir: config.temp_dir(), window_bytes: config.storage.window_bytes },
        decode: DecodeOptions {
            max_dimensions: (config.limits.max_width, config.limits.max_height),
            threads: config.decode.threads,
            ..Default::default()
        },
        batch: BatchPolicy { batch_size: config.server.batch_size, batch_timeout: Duration::from_millis(config.server.batch_timeout_ms) },
        credits: config.server.credits,
        max_upload_bytes: config.server.max_upload_bytes,
        max_lag_bytes: (config.server.max_lag_bytes > 0).then_some(config.server.max_lag_bytes),
        media_dir: config.storage.persist_media.then(|| config.storage.media_dir.clone()),
        observer: Some(Arc::clone(&metrics) as Arc<dyn streamdet_actors::actors::inference::InferenceObserver>),
        max_session_duration: Some(Duration::from_secs(config.server.max_session_seconds)),
    };
    let temp_dir = config.temp_dir();
    match streamdet_actors::buffer::sweep_stale(&temp_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, dir = %temp_dir.display(), "removed upload files left by an earlier run"),
        Err(err) => tracing::warn!(%err, dir = %temp_dir.display(), "could not sweep the temp directory"),
    }
    let pipeline = Pipeline::start(Arc::new(detector), options);
    let state = web::Data::new(AppState {
        pipeline,
        config,
        model_name,
        active_sessions: Arc::new(AtomicUsize::new(0)),
        sessions: Registry::default(),
        metrics,
    });
    let shutdown_state = state.clone();
    let token = state.config.server.auth_token.clone();
    let origins = state.config.cors_origins();
    let server = HttpServer::new(move || {
        let cors = origins.iter().fold(actix_cors::Cors::default(), |cors, origin| cors.allowed_origin(origin))
            .allowed_methods(["GET", "POST"])
            .allowed_headers([AUTHORIZATION, CONTENT_TYPE, ACCEPT, HeaderName::from_static("last-event-id")])
            .max_age(3600);
        let token = token.clone();
        App::new()
            .app_data(state.clone())
            .wrap(actix_web::middleware::from_fn(move |req: ServiceRequest, next: Next<BoxBody>| {
                // The page's own files carry no secret; its API calls need the token like any other.
                let allowed = token.is_empty()
                    || req.path() == "/health"
                    || req.path() == "/openapi.json"
                    || PAGE_ASSETS.iter().any(|(path, _, _)| *path == req.path())
                    || req.method() == actix_web::http::Method::OPTIONS
                    || req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(format!("Bearer {token}").as_str());
                async move {
                    if allowed {
                        next.call(req).await
                    } else {
                        let response = error_response(StatusCode::UNAUTHORIZED, "unauthorized", "this server requires a bearer token");
                        Ok(req.into_response(response))
                    }
                }
            }))
            .wrap(cors)
            .route("/detect/video", web::post().to(detect_video))
            .route("/detect", web::post().to(detect_image))
            .route("/sessions/{id}/events", web::get().to(session_events))
            .route("/health", web::get().to(health))
            .route("/metrics", web::get().to(metrics_text))
            .route("/openapi.json", web::get().to(openapi))
            .route("/", web::get().to(page_asset))
            .route("/app.js", web::get().to(page_asset))
            .route("/style.css", web::get().to(page_asset))
    })
    .disable_signals()
    .shutdown_timeout(1)
    .bind(&listen)?;
    for addr in server.addrs() {
        println!("{}", json!({"type": "listening", "addr": addr.to_string()}));
    }
    let running = server.run();
    actix_web::rt::spawn(shut_down_on_signal(running.handle(), shutdown_state));
    running.await?;
    Ok(())
}

/// On SIGTERM or Ctrl-C: stop accepting connections, give running sessions the grace period,
/// end the rest (each reports an error event and frees its temp file), then stop.
async fn shut_down_on_signal(server: actix_web::dev::ServerHandle, state: web::Data<AppState>) {
    let Ok(mut terminate) = actix_web::rt::signal::unix::signal(actix_web::rt::signal::unix::SignalKind::terminate()) else {
        tracing::warn!("cannot listen for SIGTERM; stop the server with SIGKILL");
        return;
    };
    first_of(terminate.recv(), actix_web::rt::signal::ctrl_c()).await;
    tracing::info!("shutting down");
    server.pause().await;
    wait_for_sessions(&state, Duration::from_secs(state.config.server.shutdown_grace_s)).await;
    state.sessions.cancel_live();
    // Let the error events reach their listeners and the sessions release their files.
    wait_for_sessions(&state, Duration::from_secs(2)).await;
    actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    server.stop(true).await;
}

/// Waits until no session runs, or `limit` has passed.
async fn wait_for_sessions(state: &AppState, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while state.active_sessions.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for whichever of two futures finishes first.
async fn first_of<A: std::future::Future, B: std::future::Future>(a: A, b: B) {
    futures_util::future::select(std::pin::pin!(a), std::pin::pin!(b)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every API route `serve` registers, as (method, path) in OpenAPI's spelling (the page's
    /// files are not API); the HTTP test checks the other direction (every documented route
    /// answers).
    const ROUTES: [(&str, &str); 6] = [
        ("post", "/detect/video"),
        ("get", "/sessions/{id}/events"),
        ("post", "/detect"),
        ("get", "/health"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        let mut documented: Vec<(String, String)> = spec["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, ops)| ops.as_object().expect("operations").keys().map(move |m| (m.clone(), path.clone())))
            .collect();
        documented.sort();
        let mut served: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        served.sort();
        assert_eq!(documented, served);
    }
}
