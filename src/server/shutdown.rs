//! Stopping cleanly on SIGTERM or Ctrl-C.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::web;

use super::AppState;

/// On SIGTERM or Ctrl-C: stop accepting connections, give running sessions the grace period,
/// end the rest (each reports an error event and frees its temp file), then stop.
pub async fn shut_down_on_signal(server: actix_web::dev::ServerHandle, state: web::Data<AppState>) {
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
