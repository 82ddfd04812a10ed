//! `POST /detect`: the detections of one image.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;

use super::params::detect_params;
use super::video::{declared_length, upload_pace};
use super::{AppState, error_response};
use crate::image_detections::{self, ImageFailure};
use streamdet_actors::ErrorCode;
use streamdet_actors::pipeline::RateWindow;

/// `POST /detect`: one image (JPEG, PNG, WebP) in the body, EXIF orientation applied. At most
/// `max_image_requests` run at once, each reads at most `max_image_bytes`, and an image over
/// `limits.max_image_pixels` is refused from its header, before any pixel is decoded.
pub async fn detect_image(req: HttpRequest, query: web::Query<HashMap<String, String>>, mut payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    if let Some(refusal) = state.refuse_while_closing() {
        return refusal;
    }
    if let Some(unknown) = query.keys().find(|k| !["conf", "iou", "classes"].contains(&k.as_str())) {
        return error_response(ErrorCode::BadParameter, format!("unknown parameter {unknown:?} (known: conf, iou, classes)"));
    }
    let detector = Arc::clone(state.pipeline.detector());
    let params = match detect_params(&query, &detector, &state.config.detect) {
        Ok(params) => params,
        Err(message) => return error_response(ErrorCode::BadParameter, message),
    };
    let limit = state.config.server.max_image_bytes;
    let too_large = || error_response(ErrorCode::TooLarge, format!("the image is larger than the limit of {limit} bytes"));
    if declared_length(&req).is_some_and(|len| len > limit) {
        return too_large();
    }
    // Taken before the body is read: the permits bound the memory of bodies as well as the
    // decoding and model work.
    let Ok(_permit) = Arc::clone(&state.image_permits).try_acquire_owned() else {
        return error_response(ErrorCode::TooManySessions, "the server is busy with other images; try again shortly");
    };
    // The body is read at the pace an upload must keep, so that a trickling client cannot hold
    // a permit for long.
    let pace = upload_pace(&state.config);
    let idle = pace.idle.unwrap_or(Duration::from_secs(30));
    let mut rate = pace.min_rate.map(RateWindow::new);
    let mut body = Vec::new();
    loop {
        let waited = Instant::now();
        let next = actix_web::rt::time::timeout(idle, payload.next()).await;
        if let (Some(window), Ok(Some(Ok(bytes)))) = (rate.as_mut(), &next)
            && let Err(message) = window.record(waited.elapsed(), bytes.len() as u64)
        {
            return error_response(ErrorCode::Timeout, message);
        }
        match next {
            Err(_) => return error_response(ErrorCode::Timeout, format!("no image data arrived for {} s", idle.as_secs())),
            Ok(None) => break,
            Ok(Some(Ok(bytes))) if (body.len() + bytes.len()) as u64 <= limit => body.extend_from_slice(&bytes),
            Ok(Some(Ok(_))) => return too_large(),
            Ok(Some(Err(err))) => return error_response(ErrorCode::Truncated, format!("the upload broke off: {err}")),
        }
    }
    let max_pixels = state.config.limits.max_image_pixels;
    // Decoding and the model block: run them off the server's threads.
    let result = web::block(move || image_detections::detect_image(&detector, body, &params, max_pixels)).await;
    match result {
        Ok(Ok(found)) => HttpResponse::Ok().json(found),
        Ok(Err(ImageFailure { code, message })) => error_response(code, message),
        Err(err) => error_response(ErrorCode::Internal, err.to_string()),
    }
}
