//! A host actix-web service that embeds streamdet's actors: one route that takes a video upload
//! and streams detections back as NDJSON while the upload is still arriving.
//!
//! ```sh
//! cargo run --release --example embed -- models/yolov12n.onnx 127.0.0.1:8090
//! curl -sN -X POST -T fixtures/photos.mp4 -H 'Transfer-Encoding: chunked' http://127.0.0.1:8090/video
//! ```
//!
//! Everything a host needs is in `streamdet_actors`: load a `Detector`, start a `Pipeline` once
//! (its inference actor batches across all sessions), and per request open a session, feed it
//! the body, and forward its events.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use bytes::Bytes;
use candle_core::Device;
use futures_util::StreamExt;
use streamdet_actors::detect::{Detector, LineAligned};
use streamdet_actors::pipeline::{Pipeline, PipelineOptions, SessionParams, UploadPace};

/// Tensors start on a cache line, as in the `streamdet` binary (optional; the engine's vector
/// loads read one line instead of two).
#[global_allocator]
static ALLOCATOR: LineAligned = LineAligned;

async fn video(body: web::Payload, pipeline: web::Data<Pipeline>) -> HttpResponse {
    let session = match pipeline.session(SessionParams::default()) {
        Ok(session) => session,
        Err(err) => return HttpResponse::InternalServerError().body(err.to_string()),
    };
    let (upload, events) = session.split();
    // Read the body in its own task so the response can stream while the upload goes on.
    // A client that pauses 30 s, or sends under 16 KiB/s over 30 s, loses its session.
    let pace = UploadPace { idle: Some(Duration::from_secs(30)), min_rate: Some((16 << 10, Duration::from_secs(30))) };
    actix_web::rt::spawn(upload.feed_all(body.map(|chunk| chunk.map_err(|e| e.to_string())), pace));
    let lines = futures_util::stream::unfold(events, |mut events| async move {
        let event = events.recv().await?;
        let line = format!("{}\n", serde_json::to_string(&event).ok()?);
        Some((Ok::<_, actix_web::Error>(Bytes::from(line)), events))
    });
    HttpResponse::Ok().content_type("application/x-ndjson").streaming(lines)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().unwrap_or_else(|| "models/yolov12n.onnx".into()));
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8090".into());
    let detector = Detector::load(&model, Device::Cpu).map_err(std::io::Error::other)?;
    let pipeline = web::Data::new(Pipeline::start(Arc::new(detector), PipelineOptions::default()));
    eprintln!("listening on {listen}");
    HttpServer::new(move || App::new().app_data(pipeline.clone()).route("/video", web::post().to(video))).bind(listen)?.run().await
}
