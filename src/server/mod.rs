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
use std::net::IpAddr;
use std::time::{Duration, Instant};

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
use futures_util::future::Either;
use tokio::sync::Semaphore;
use streamdet_actors::actors::Event;
use streamdet_actors::detect::{self, DetectParams, Detector, ModelFrame};
use streamdet_actors::pipeline::{BodyError, Pipeline, PipelineOptions, SessionParams, UploadPace, new_session_id};

use crate::config::{Config, DetectConfig};
use crate::metrics::Metrics;
use crate::guard::{ClientCounts, ClientSlot, bearer_matches, client_address, forbidden_origin, origin_allowed};
use crate::sessions::{Refused, Registry, RegistryLimits, SessionLog, WatchSlot};

struct AppState {
    pipeline: Pipeline,
    config: Config,
    model_name: String,
    active_sessions: Arc<AtomicUsize>,
    /// Uploads running per client address (`server.max_sessions_per_client`).
    clients: ClientCounts,
    trusted_proxies: Vec<IpAddr>,
    /// `POST /detect` requests being read, decoded or run.
    image_permits: Arc<Semaphore>,
    sessions: Registry,
    metrics: Arc<Metrics>,
}

/// A session slot, released when the session that holds it ends.
struct SessionSlot {
    counter: Arc<AtomicUsize>,
    _client: Option<ClientSlot>,
}

impl SessionSlot {
    /// A slot among `max_sessions`, and among the client's own when that has a bound.
    fn acquire(state: &AppState, client: Option<IpAddr>) -> Result<Self, &'static str> {
        let per_client = state.config.server.max_sessions_per_client;
        let client = match client {
            Some(address) if per_client > 0 => {
                Some(state.clients.acquire(address, per_client).ok_or("this client already runs as many uploads as one client may")?)
            }
            _ => None,
        };
        let counter = &state.active_sessions;
        let max = state.config.server.max_sessions;
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| "the server is busy with other uploads; try again shortly")?;
        Ok(SessionSlot { counter: Arc::clone(counter), _client: client })
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
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

const SESSION_ID_RULE: &str = "session must be 16 to 64 characters of A-Z, a-z, 0-9, - and _ (a UUID fits)";

/// Client-chosen ids are long enough that nobody guesses another client's.
fn valid_session_id(id: &str) -> bool {
    (16..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
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
    let id = match params.id.clone() {
        Some(id) => id,
        None => match new_session_id() {
            Ok(id) => id,
            Err(err) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("cannot make a session id: {err}")),
        },
    };
    params.id = Some(id.clone());
    let limit = state.config.server.max_upload_bytes;
    if declared_length(&req).is_some_and(|len| len > limit) {
        return error_response(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the upload is larger than the limit of {limit} bytes"));
    }
    let slot = match SessionSlot::acquire(&state, client_address(&req, &state.trusted_proxies)) {
        Ok(slot) => slot,
        Err(message) => return error_response(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", message),
    };
    let pace = upload_pace(&state.config);
    // A form's parts before the file are read now, so that a body with no file part gets its
    // 400 before any stream starts.
    let chunks = if is_multipart(&req) {
        match multipart_file(&req, payload, limit, pace.idle).await {
            Ok(chunks) => chunks,
            Err(response) => return response,
        }
    } else {
        Box::pin(payload.map(|c| c.map_err(|e| BodyError::from(e.to_string())))) as BodyStream
    };
    let log = match state.sessions.start(&id) {
        Ok(log) => log,
        Err(Refused::InUse) => {
            return error_response(StatusCode::CONFLICT, "conflict", format!("the session id {id:?} is in use or was used recently"));
        }
        Err(Refused::Full(what)) => {
            return error_response(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", format!("the server tracks too many {what}; try again shortly"));
        }
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
    let (body_read, body_done) = tokio::sync::oneshot::channel::<()>();
    actix_web::rt::spawn(async move {
        upload.feed_all(chunks, pace).await;
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
    if let Some((_, Event::Error { code, message })) = log.next(0).await {
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
    let keepalive = Duration::from_secs(state.config.server.sse_keepalive_s);
    follow(Follow { log, next: 0, sse, keepalive, watch: None, then: Some(body_done) })
}

/// A request's `Content-Length`, when it states one.
fn declared_length(req: &HttpRequest) -> Option<u64> {
    req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok())
}

/// The pace an upload must keep (`idle_upload_timeout_s`, `min_upload_rate`).
fn upload_pace(config: &Config) -> UploadPace {
    let server = &config.server;
    UploadPace {
        idle: Some(Duration::from_secs(server.idle_upload_timeout_s)),
        min_rate: (server.min_upload_rate > 0).then(|| (server.min_upload_rate, Duration::from_secs(server.min_upload_rate_window_s))),
    }
}

fn is_multipart(req: &HttpRequest) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

type BodyStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, BodyError>>>>;

/// The bytes of the first file part (a part with a file name, or one named `file`) of a
/// `multipart/form-data` body, as they arrive. The parts before it are read and dropped here,
/// their bytes counted against `limit`; a body that is not a valid form, or has no file part,
/// is a 400 response.
async fn multipart_file(req: &HttpRequest, payload: web::Payload, limit: u64, idle: Option<Duration>) -> Result<BodyStream, HttpResponse> {
    use actix_multipart::{Field, Multipart};
    let bad = |message: String| error_response(StatusCode::BAD_REQUEST, "bad_parameter", message);
    let mut multipart = Multipart::new(req.headers(), payload);
    let mut preamble: u64 = 0;
    let idle = idle.unwrap_or(Duration::from_secs(30));
    let file = loop {
        let part = match actix_web::rt::time::timeout(idle, multipart.next()).await {
            Err(_) => return Err(error_response(StatusCode::REQUEST_TIMEOUT, "timeout", "the form's first parts did not arrive in time")),
            Ok(None) => return Err(bad("the multipart body has no file part".into())),
            Ok(Some(Err(err))) => return Err(bad(format!("bad multipart body: {err}"))),
            Ok(Some(Ok(part))) => part,
        };
        let is_file = part.content_disposition().and_then(|d| d.get_filename()).is_some();
        if is_file || part.name() == Some("file") {
            break part;
        }
        // A text field before the file: read past it.
        let mut part = part;
        loop {
            match actix_web::rt::time::timeout(idle, part.next()).await {
                Err(_) => return Err(error_response(StatusCode::REQUEST_TIMEOUT, "timeout", "the form's first parts did not arrive in time")),
                Ok(None) => break,
                Ok(Some(Err(err))) => return Err(bad(format!("bad multipart body: {err}"))),
                Ok(Some(Ok(bytes))) => {
                    preamble += bytes.len() as u64;
                    if preamble > limit {
                        return Err(error_response(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the upload is larger than the limit of {limit} bytes")));
                    }
                }
            }
        }
    };
    // The multipart reader must outlive the part: the part reads through it.
    let chunks = futures_util::stream::unfold(Some((multipart, file, preamble)), move |state: Option<(Multipart, Field, u64)>| async move {
        let (multipart, mut file, read) = state?;
        match file.next().await {
            Some(Ok(bytes)) => {
                let read = read + bytes.len() as u64;
                if read > limit {
                    let message = format!("the upload is larger than the limit of {limit} bytes");
                    return Some((Err(BodyError { code: "too_large", message }), None));
                }
                Some((Ok(bytes), Some((multipart, file, read))))
            }
            Some(Err(err)) => Some((Err(BodyError::from(format!("bad multipart body: {err}"))), None)),
            None => None,
        }
    });
    Ok(Box::pin(chunks))
}

/// What a response follows: a session's log from one event on.
struct Follow {
    log: Arc<SessionLog>,
    /// The next event to send.
    next: usize,
    sse: bool,
    /// Between SSE comment lines on an idle stream: they keep proxies from closing it and
    /// find a client that left (a write to a closed connection fails).
    keepalive: Duration,
    /// For `GET /sessions/{id}/events`: the watcher's place, and until when an upload may claim
    /// the id.
    watch: Option<(WatchSlot, Instant)>,
    /// The response ends only once this resolves (the upload's body read to its end).
    then: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// A response that follows a session's log, as SSE or NDJSON.
fn follow(follow: Follow) -> HttpResponse {
    let sse = follow.sse;
    let messages = futures_util::stream::unfold(Some(follow), |state| async move {
        let mut state = state?;
        loop {
            let deadline = state.watch.as_ref().map(|(_, until)| *until).filter(|_| !state.log.claimed());
            let tick = deadline.map_or(state.keepalive, |until| until.saturating_duration_since(Instant::now()).min(state.keepalive));
            let woke = {
                let next = std::pin::pin!(state.log.next(state.next));
                let timer = std::pin::pin!(actix_web::rt::time::sleep(tick));
                match futures_util::future::select(next, timer).await {
                    Either::Left((event, _)) => Either::Left(event),
                    Either::Right(_) => Either::Right(()),
                }
            };
            match woke {
                Either::Left(Some((index, event))) => {
                    let bytes = if state.sse { sse_message(&event, index as u64) } else { ndjson_line(&event) };
                    state.next = index + 1;
                    return Some((Ok::<_, actix_web::Error>(bytes), Some(state)));
                }
                Either::Left(None) => {
                    if let Some(then) = state.then.take() {
                        let _ = then.await;
                    }
                    return None;
                }
                Either::Right(_) => {
                    if deadline.is_some_and(|until| Instant::now() >= until) && !state.log.claimed() {
                        let event = Event::error("timeout", "no upload claimed this session id in time (server.watch_wait_s)");
                        let bytes = if state.sse { sse_message(&event, state.next as u64) } else { ndjson_line(&event) };
                        return Some((Ok(bytes), None));
                    }
                    if state.sse {
                        return Some((Ok(Bytes::from_static(b": keepalive\n\n")), Some(state)));
                    }
                }
            }
        }
    });
    let content_type = if sse { "text/event-stream" } else { "application/x-ndjson" };
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(messages)
}

/// `GET /sessions/{id}/events`: the session's events as SSE; may come before the upload (it
/// waits `watch_wait_s`) and after it (for the replay window); `Last-Event-ID` resumes after
/// that event.
async fn session_events(req: HttpRequest, id: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    if !valid_session_id(&id) {
        return error_response(StatusCode::BAD_REQUEST, "bad_parameter", SESSION_ID_RULE);
    }
    let from = match req.headers().get("Last-Event-ID").map(|v| v.to_str().map(str::trim)) {
        None => 0,
        // The id of an event we sent: digits, nothing else. Past every event: nothing to replay.
        Some(Ok(last)) if !last.is_empty() && last.len() <= 20 && last.bytes().all(|b| b.is_ascii_digit()) => {
            last.parse::<u64>().ok().and_then(|n| usize::try_from(n).ok()).and_then(|n| n.checked_add(1)).unwrap_or(usize::MAX)
        }
        Some(_) => return error_response(StatusCode::BAD_REQUEST, "bad_parameter", "Last-Event-ID must be the id of an event (digits)"),
    };
    let slot = match state.sessions.watch(&id) {
        Ok(slot) => slot,
        Err(Refused::Full(what)) => return error_response(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", format!("too many {what}; try again shortly")),
        Err(Refused::InUse) => return error_response(StatusCode::CONFLICT, "conflict", "the session id is in use"),
    };
    let log = Arc::clone(slot.log());
    let until = Instant::now() + state.sessions.watch_wait();
    let keepalive = Duration::from_secs(state.config.server.sse_keepalive_s);
    follow(Follow { log, next: from, sse: true, keepalive, watch: Some((slot, until)), then: None })
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

/// `POST /detect`: one image (JPEG, PNG, WebP) in the body, EXIF orientation applied. At most
/// `max_image_requests` run at once, each reads at most `max_image_bytes`, and an image over
/// `limits.max_image_pixels` is refused from its header, before any pixel is decoded.
async fn detect_image(req: HttpRequest, query: web::Query<HashMap<String, String>>, mut payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    if let Some(unknown) = query.keys().find(|k| !["conf", "iou", "classes"].contains(&k.as_str())) {
        return error_response(StatusCode::BAD_REQUEST, "bad_parameter", format!("unknown parameter {unknown:?} (known: conf, iou, classes)"));
    }
    let detector = Arc::clone(state.pipeline.detector());
    let params = match detect_params(&query, &detector, &state.config.detect) {
        Ok(params) => params,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, "bad_parameter", message),
    };
    let limit = state.config.server.max_image_bytes;
    let too_large = || error_response(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the image is larger than the limit of {limit} bytes"));
    if declared_length(&req).is_some_and(|len| len > limit) {
        return too_large();
    }
    // Taken before the body is read: the permits bound the memory of bodies as well as the
    // decoding and model work.
    let Ok(_permit) = Arc::clone(&state.image_permits).try_acquire_owned() else {
        return error_response(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", "the server is busy with other images; try again shortly");
    };
    let idle = Duration::from_secs(state.config.server.idle_upload_timeout_s);
    let mut body = Vec::new();
    loop {
        match actix_web::rt::time::timeout(idle, payload.next()).await {
            Err(_) => return error_response(StatusCode::REQUEST_TIMEOUT, "timeout", format!("no image data arrived for {} s", idle.as_secs())),
            Ok(None) => break,
            Ok(Some(Ok(bytes))) if (body.len() + bytes.len()) as u64 <= limit => body.extend_from_slice(&bytes),
            Ok(Some(Ok(_))) => return too_large(),
            Ok(Some(Err(err))) => return error_response(StatusCode::BAD_REQUEST, "truncated", format!("the upload broke off: {err}")),
        }
    }
    let max_pixels = state.config.limits.max_image_pixels;
    // Decoding and the model block: run them off the server's threads.
    let result = web::block(move || -> Result<serde_json::Value, (StatusCode, &'static str, String)> {
        let (rgb, width, height) = detect::decode_image(&body, max_pixels).map_err(|e| {
            let status = if e.code() == "too_large" { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::UNSUPPORTED_MEDIA_TYPE };
            (status, e.code(), e.to_string())
        })?;
        drop(body);
        let (model_rgb, letterbox) = detect::letterbox_rgb(&rgb, width, height, detector.input_size());
        drop(rgb);
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
        "watchers": state.sessions.watchers(),
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
    let server_config = &config.server;
    let registry = Registry::new(RegistryLimits {
        max_entries: server_config.max_registry_entries,
        max_watchers_per_session: server_config.max_watchers_per_session,
        max_watchers: server_config.max_watchers,
        watch_wait: Duration::from_secs(server_config.watch_wait_s),
        retention: Duration::from_secs(server_config.replay_seconds),
        max_log_bytes: server_config.replay_max_bytes,
    });
    let state = web::Data::new(AppState {
        pipeline,
        active_sessions: Arc::new(AtomicUsize::new(0)),
        clients: ClientCounts::default(),
        trusted_proxies: config.trusted_proxies()?,
        image_permits: Arc::new(Semaphore::new(server_config.max_image_requests)),
        sessions: registry,
        metrics,
        config,
        model_name,
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
        let origins = origins.clone();
        App::new()
            .app_data(state.clone())
            .wrap(actix_web::middleware::from_fn(move |req: ServiceRequest, next: Next<BoxBody>| {
                // The page's own files carry no secret; its API calls need the token like any other.
                let allowed = token.is_empty()
                    || req.path() == "/health"
                    || req.path() == "/openapi.json"
                    || PAGE_ASSETS.iter().any(|(path, _, _)| *path == req.path())
                    || req.method() == actix_web::http::Method::OPTIONS
                    || bearer_matches(req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()), &token);
                async move {
                    if allowed {
                        next.call(req).await
                    } else {
                        let response = error_response(StatusCode::UNAUTHORIZED, "unauthorized", "this server requires a bearer token");
                        Ok(req.into_response(response))
                    }
                }
            }))
            // A page of another site may not make a browser spend this server's sessions, even
            // with requests whose answer it cannot read. (Inside the CORS layer, which answers
            // preflights.)
            .wrap(actix_web::middleware::from_fn(move |req: ServiceRequest, next: Next<BoxBody>| {
                let allowed = origin_allowed(req.request(), &origins);
                async move {
                    if allowed { next.call(req).await } else { Ok(req.into_response(forbidden_origin())) }
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
