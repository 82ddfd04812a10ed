//! `POST /detect/video`: a session per upload. The body (raw, or the file part of a form) is
//! fed to the session as it arrives; the response answers once the first bytes identify the
//! container and then follows the session's events.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use futures_util::StreamExt;
use streamdet_actors::ErrorCode;
use streamdet_actors::actors::Event;
use streamdet_actors::pipeline::{BodyError, UploadPace, new_session_id};

use super::events::{Follow, follow};
use super::guard::{ClientSlot, client_address};
use super::params::video_params;
use super::{AppState, error_response};
use crate::config::Config;
use crate::sessions::Refused;

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

pub async fn detect_video(req: HttpRequest, query: web::Query<HashMap<String, String>>, payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    if let Some(refusal) = state.refuse_while_closing() {
        return refusal;
    }
    let mut params = match video_params(&query, state.pipeline.detector(), &state.config) {
        Ok(params) => params,
        Err(message) => return error_response(ErrorCode::BadParameter, message),
    };
    let id = match params.id.clone() {
        Some(id) => id,
        None => match new_session_id() {
            Ok(id) => id,
            Err(err) => return error_response(ErrorCode::Internal, format!("cannot make a session id: {err}")),
        },
    };
    params.id = Some(id.clone());
    if let Some(annotate) = &mut params.annotate {
        // The id in the query too, for proxies that hash on `?session=` alone.
        annotate.url = Some(format!("/sessions/{id}/video?session={id}"));
    }
    let limit = state.config.server.max_upload_bytes;
    if declared_length(&req).is_some_and(|len| len > limit) {
        return error_response(ErrorCode::TooLarge, format!("the upload is larger than the limit of {limit} bytes"));
    }
    let slot = match SessionSlot::acquire(&state, client_address(&req, &state.trusted_proxies)) {
        Ok(slot) => slot,
        Err(message) => return error_response(ErrorCode::TooManySessions, message),
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
            return error_response(ErrorCode::Conflict, format!("the session id {id:?} is in use or was used recently"));
        }
        Err(Refused::Full(what)) => {
            return error_response(ErrorCode::TooManySessions, format!("the server tracks too many {what}; try again shortly"));
        }
    };
    let session = match state.pipeline.session(params) {
        Ok(session) => session,
        Err(err) => {
            log.close(ErrorCode::Internal, "the session could not start");
            return error_response(ErrorCode::Internal, format!("cannot start a session: {err}"));
        }
    };
    let (upload, mut events) = session.split();
    let canceller = upload.clone();
    log.set_cancel(move || canceller.cancel(ErrorCode::Internal, "the server is shutting down"));
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
        pump_log.close(ErrorCode::Internal, "the session stopped");
        metrics.sessions_active.dec();
    });
    // The status line waits for the first event: `start` once the container is identified
    // (a few KiB into the upload), or an error that a plain HTTP status says better.
    if let Some((_, Event::Error { code, message })) = log.next(0).await
        && code.refuses_upload()
    {
        return error_response(code, message);
    }
    let sse = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    // After `max_frames`, `end` comes while the client is still sending: the response stays
    // open until the rest of the body has been read (and dropped), or the connection would
    // close under the client's feet.
    let keepalive = Duration::from_secs(state.config.server.sse_keepalive_s);
    follow(Follow { log, next: 0, sse, keepalive, watch: None, then: Some(body_done) })
}

/// A request's `Content-Length`, when it states one.
pub fn declared_length(req: &HttpRequest) -> Option<u64> {
    req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok())
}

/// The pace an upload must keep (`idle_upload_timeout_s`, `min_upload_rate`).
pub fn upload_pace(config: &Config) -> UploadPace {
    let server = &config.server;
    UploadPace {
        idle: Some(Duration::from_secs(server.idle_upload_timeout_s)),
        min_rate: (server.min_upload_rate > 0).then(|| (server.min_upload_rate, Duration::from_secs(server.min_upload_rate_window_s))),
    }
}

fn is_multipart(req: &HttpRequest) -> bool {
    req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

type BodyStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, BodyError>>>>;

/// The bytes of the first file part (a part with a file name, or one named `file`) of a
/// `multipart/form-data` body, as they arrive. The parts before it are read and dropped here,
/// their bytes counted against `limit`; a body that is not a valid form, or has no file part,
/// is a 400 response.
async fn multipart_file(req: &HttpRequest, payload: web::Payload, limit: u64, idle: Option<Duration>) -> Result<BodyStream, HttpResponse> {
    use actix_multipart::{Field, Multipart};
    let bad = |message: String| error_response(ErrorCode::BadParameter, message);
    let mut multipart = Multipart::new(req.headers(), payload);
    let mut preamble: u64 = 0;
    let idle = idle.unwrap_or(Duration::from_secs(30));
    let file = loop {
        let part = match actix_web::rt::time::timeout(idle, multipart.next()).await {
            Err(_) => return Err(error_response(ErrorCode::Timeout, "the form's first parts did not arrive in time")),
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
                Err(_) => return Err(error_response(ErrorCode::Timeout, "the form's first parts did not arrive in time")),
                Ok(None) => break,
                Ok(Some(Err(err))) => return Err(bad(format!("bad multipart body: {err}"))),
                Ok(Some(Ok(bytes))) => {
                    preamble += bytes.len() as u64;
                    if preamble > limit {
                        return Err(error_response(ErrorCode::TooLarge, format!("the upload is larger than the limit of {limit} bytes")));
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
                    return Some((Err(BodyError { code: ErrorCode::TooLarge, message }), None));
                }
                Some((Ok(bytes), Some((multipart, file, read))))
            }
            Some(Err(err)) => Some((Err(BodyError::from(format!("bad multipart body: {err}"))), None)),
            None => None,
        }
    });
    Ok(Box::pin(chunks))
}
