//! Following a session's events: the upload's own response (NDJSON or SSE) and
//! `GET /sessions/{id}/events` (SSE, from any point with `Last-Event-ID`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use futures_util::future::Either;
use streamdet_actors::ErrorCode;
use streamdet_actors::actors::Event;

use super::params::{SESSION_ID_RULE, session_query, valid_session_id};
use super::{AppState, error_response};
use crate::sessions::{Refused, SessionLog, WatchSlot};

/// What a response follows: a session's log from one event on.
pub struct Follow {
    pub log: Arc<SessionLog>,
    /// The next event to send.
    pub next: usize,
    pub sse: bool,
    /// Between SSE comment lines on an idle stream: they keep proxies from closing it and
    /// find a client that left (a write to a closed connection fails).
    pub keepalive: Duration,
    /// For `GET /sessions/{id}/events`: the watcher's place, and until when an upload may claim
    /// the id.
    pub watch: Option<(WatchSlot, Instant)>,
    /// The response ends only once this resolves (the upload's body read to its end).
    pub then: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// A response that follows a session's log, as SSE or NDJSON.
pub fn follow(follow: Follow) -> HttpResponse {
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
                        let event = Event::error(ErrorCode::Timeout, "no upload claimed this session id in time (server.watch_wait_s)");
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
    HttpResponse::Ok().content_type(content_type).insert_header(("Cache-Control", "no-cache")).insert_header(("X-Accel-Buffering", "no")).streaming(messages)
}

/// `GET /sessions/{id}/events[?session={id}]`: the session's events as SSE; may come before the
/// upload (it waits `watch_wait_s`) and after it (for the replay window); `Last-Event-ID` resumes
/// after that event.
pub async fn session_events(req: HttpRequest, id: web::Path<String>, query: web::Query<HashMap<String, String>>, state: web::Data<AppState>) -> HttpResponse {
    if !valid_session_id(&id) {
        return error_response(ErrorCode::BadParameter, SESSION_ID_RULE);
    }
    if let Err(message) = session_query(&query, &id) {
        return error_response(ErrorCode::BadParameter, message);
    }
    let from = match req.headers().get("Last-Event-ID").map(|v| v.to_str().map(str::trim)) {
        None => 0,
        // The id of an event we sent: digits, nothing else. Past every event: nothing to replay.
        Some(Ok(last)) if !last.is_empty() && last.len() <= 20 && last.bytes().all(|b| b.is_ascii_digit()) => {
            last.parse::<u64>().ok().and_then(|n| usize::try_from(n).ok()).and_then(|n| n.checked_add(1)).unwrap_or(usize::MAX)
        }
        Some(_) => return error_response(ErrorCode::BadParameter, "Last-Event-ID must be the id of an event (digits)"),
    };
    let slot = match state.sessions.watch(&id) {
        Ok(slot) => slot,
        Err(Refused::Full(what)) => return error_response(ErrorCode::TooManySessions, format!("too many {what}; try again shortly")),
        Err(Refused::InUse) => return error_response(ErrorCode::Conflict, "the session id is in use"),
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
        Event::Track(_) => "track",
        Event::Crossing(_) => "crossing",
        Event::Zone(_) => "zone",
    };
    Bytes::from(format!("event: {kind}\nid: {sequence}\ndata: {data}\n\n"))
}
