//! The HTTP service: actix-web routes over the actor pipeline, one module per concern.
//!
//! `POST /detect/video` reads the body as it arrives, answers once the first bytes identify the
//! container (an unsupported upload gets a 415), and streams the session's events back as
//! NDJSON (or SSE with `Accept: text/event-stream`) while the upload is still going (a client
//! must be full-duplex to see them early); `POST /detect` answers for one image; `GET /health`
//! says what is loaded and what the defaults are.

mod annotated;
mod assets;
mod events;
pub mod guard;
mod images;
mod params;
mod shutdown;
mod status;
mod video;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderName};
use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;
use streamdet_actors::ErrorCode;
use streamdet_actors::detect::Detector;
use streamdet_actors::pipeline::{Pipeline, PipelineOptions};
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::sessions::{Registry, RegistryLimits};
use guard::{Access, ClientCounts};

pub struct AppState {
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
    /// Serving, or on its way out after SIGTERM.
    phase: shutdown::PhaseCell,
}

impl AppState {
    /// The answer to new work once the replica no longer accepts connections (the work came on
    /// a connection opened before).
    fn refuse_while_closing(&self) -> Option<HttpResponse> {
        (self.phase.get() == shutdown::Phase::Closing)
            .then(|| error_response(ErrorCode::Unavailable, "this replica is shutting down; send the request again (a load balancer picks another replica)"))
    }
}

fn error_response(code: ErrorCode, message: impl Into<String>) -> HttpResponse {
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).json(json!({"code": code, "message": message.into()}))
}

/// The response header that names the replica which answered (load-balancer affinity can be
/// checked from outside).
pub const REPLICA_HEADER: &str = "X-Streamdet-Replica";

/// Every route of the service.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/detect/video", web::post().to(video::detect_video))
        .route("/detect", web::post().to(images::detect_image))
        .route("/sessions/{id}/events", web::get().to(events::session_events))
        .route("/sessions/{id}/video", web::get().to(annotated::session_video))
        .route("/health", web::get().to(status::health))
        .route("/ready", web::get().to(status::ready))
        .route("/metrics", web::get().to(status::metrics_text))
        .route("/openapi.json", web::get().to(assets::openapi));
    for (path, _, _) in assets::PAGE_ASSETS {
        cfg.route(path, web::get().to(assets::page_asset));
    }
}

/// Runs the service until it is stopped. Prints `{"type":"listening","addr":…}` once bound.
pub async fn serve(config: Config, listen: String, detector: Detector) -> anyhow::Result<()> {
    let model_name = config.model.path.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let metrics = Arc::new(Metrics::new());
    let options = PipelineOptions {
        observer: Some(Arc::clone(&metrics) as Arc<dyn streamdet_actors::actors::inference::InferenceObserver>),
        ..config.pipeline_options(model_name.clone())
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
        phase: shutdown::PhaseCell::default(),
    });
    // Finished sessions' logs and files go when their replay window ends, even with no traffic
    // to notice it.
    let sweeper = state.clone();
    actix_web::rt::spawn(async move {
        loop {
            actix_web::rt::time::sleep(Duration::from_secs(10)).await;
            sweeper.sessions.expire_now();
        }
    });
    let shutdown_state = state.clone();
    let origins = state.config.cors_origins();
    let access = web::Data::new(Access { token: state.config.server.auth_token.clone(), origins: origins.clone() });
    let replica = state.config.replica_name();
    tracing::info!(%replica, "replica name");
    let server = HttpServer::new(move || {
        let cors = origins
            .iter()
            .fold(actix_cors::Cors::default(), |cors, origin| cors.allowed_origin(origin))
            .allowed_methods(["GET", "POST"])
            .allowed_headers([AUTHORIZATION, CONTENT_TYPE, ACCEPT, HeaderName::from_static("last-event-id")])
            .max_age(3600);
        App::new()
            .app_data(state.clone())
            .app_data(access.clone())
            .wrap(actix_web::middleware::from_fn(guard::require_token))
            // A page of another site may not make a browser spend this server's sessions, even
            // with requests whose answer it cannot read. (Inside the CORS layer, which answers
            // preflights.)
            .wrap(actix_web::middleware::from_fn(guard::require_known_origin))
            .wrap(actix_web::middleware::from_fn(shutdown::close_connections_after_signal))
            .wrap(cors)
            // Outermost, so that every answer names its replica, refusals included.
            .wrap(actix_web::middleware::DefaultHeaders::new().add((REPLICA_HEADER, replica.clone())))
            .configure(routes)
    })
    .disable_signals()
    // Idle connections close after this; server.drain_delay_s (5 s by default) outlasts it, so
    // none is left open into a replica that has stopped accepting.
    .keep_alive(Duration::from_secs(5))
    .shutdown_timeout(1)
    .bind(&listen)?;
    for addr in server.addrs() {
        println!("{}", json!({"type": "listening", "addr": addr.to_string()}));
    }
    let running = server.run();
    actix_web::rt::spawn(shutdown::shut_down_on_signal(running.handle(), shutdown_state));
    running.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every API route `serve` registers, as (method, path) in OpenAPI's spelling (the page's
    /// files are not API); the HTTP test checks the other direction (every documented route
    /// answers).
    const ROUTES: [(&str, &str); 8] = [
        ("post", "/detect/video"),
        ("get", "/sessions/{id}/events"),
        ("get", "/sessions/{id}/video"),
        ("post", "/detect"),
        ("get", "/health"),
        ("get", "/ready"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let spec: serde_json::Value = serde_json::from_str(assets::OPENAPI).expect("valid JSON");
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
