//! `GET /sessions/{id}/video[?session={id}]`: a session's annotated video (`annotate=1`), once
//! `end` came and for its replay window; then the file is removed.

use std::collections::HashMap;
use std::io::Read;

use actix_web::{HttpResponse, web};
use bytes::Bytes;
use streamdet_actors::ErrorCode;

use super::params::{SESSION_ID_RULE, session_query, valid_session_id};
use super::{AppState, error_response};

/// Bytes read from the file at a time.
const CHUNK: usize = 256 << 10;

pub async fn session_video(id: web::Path<String>, query: web::Query<HashMap<String, String>>, state: web::Data<AppState>) -> HttpResponse {
    if !valid_session_id(&id) {
        return error_response(ErrorCode::BadParameter, SESSION_ID_RULE);
    }
    if let Err(message) = session_query(&query, &id) {
        return error_response(ErrorCode::BadParameter, message);
    }
    let Some(video) = state.sessions.video(&id) else {
        return error_response(
            ErrorCode::NotFound,
            "no annotated video for this session: it was not asked for (annotate=1), has not ended, or its replay window is over",
        );
    };
    let opened = std::fs::File::open(video.path()).and_then(|file| Ok((file.metadata()?.len(), file)));
    let (length, file) = match opened {
        Ok(opened) => opened,
        Err(err) => return error_response(ErrorCode::Internal, format!("cannot read the annotated video: {err}")),
    };
    // The stream holds the file (and, through `video`, its name) until the last byte is sent.
    let chunks = futures_util::stream::unfold(Some((file, video)), |state| async move {
        let (mut file, video) = state?;
        let read = web::block(move || {
            let mut chunk = vec![0u8; CHUNK];
            let n = file.read(&mut chunk)?;
            chunk.truncate(n);
            Ok::<_, std::io::Error>((chunk, file))
        })
        .await;
        match read {
            Ok(Ok((chunk, _))) if chunk.is_empty() => None,
            Ok(Ok((chunk, file))) => Some((Ok::<_, actix_web::Error>(Bytes::from(chunk)), Some((file, video)))),
            Ok(Err(err)) => Some((Err(actix_web::error::ErrorInternalServerError(err)), None)),
            Err(err) => Some((Err(actix_web::error::ErrorInternalServerError(err)), None)),
        }
    });
    HttpResponse::Ok().content_type("video/mp4").insert_header(("Cache-Control", "no-store")).no_chunking(length).streaming(chunks)
}
