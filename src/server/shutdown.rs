//! Stopping cleanly on SIGTERM or Ctrl-C, in a way load balancers can follow.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use actix_web::body::BoxBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::ConnectionType;
use actix_web::middleware::Next;
use actix_web::web;

use super::AppState;

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// After SIGTERM: everything is served as before, but `/ready` answers 503, so that load
    /// balancers with health checks (HAProxy, Kubernetes) stop sending new work.
    Draining,
    /// No new connections: proxies without health checks (nginx) find the port closed and send
    /// new work elsewhere. A new upload on a connection that was already open gets 503.
    Closing,
}

/// A [`Phase`] shared between the signal handler and the routes.
#[derive(Debug, Default)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Closing,
        }
    }

    fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Release);
    }
}

/// On SIGTERM or Ctrl-C: drain for `drain_delay_s` (see [`Phase::Draining`]), then stop
/// accepting connections; give running sessions `shutdown_grace_s` from the signal, end the rest
/// (each reports an error event and frees its temp file), then stop. With no session running,
/// it stops at once: a closed port tells every proxy to go elsewhere.
pub async fn shut_down_on_signal(server: actix_web::dev::ServerHandle, state: web::Data<AppState>) {
    let Ok(mut terminate) = actix_web::rt::signal::unix::signal(actix_web::rt::signal::unix::SignalKind::terminate()) else {
        tracing::warn!("cannot listen for SIGTERM; stop the server with SIGKILL");
        return;
    };
    first_of(terminate.recv(), actix_web::rt::signal::ctrl_c()).await;
    let server_config = &state.config.server;
    let grace = Instant::now() + Duration::from_secs(server_config.shutdown_grace_s);
    let drained = (Instant::now() + Duration::from_secs(server_config.drain_delay_s)).min(grace);
    tracing::info!("shutting down: draining");
    state.phase.set(Phase::Draining);
    wait_for_sessions(&state, drained).await;
    state.phase.set(Phase::Closing);
    server.pause().await;
    wait_for_sessions(&state, grace).await;
    state.sessions.cancel_live();
    // Let the error events reach their listeners and the sessions release their files.
    wait_for_sessions(&state, Instant::now() + Duration::from_secs(2)).await;
    actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    server.stop(true).await;
}

/// Middleware: once SIGTERM came, every response closes its connection, so that no idle
/// keep-alive connection (a proxy's pool) is left to bring new work once the port is closed.
/// Idle connections opened before the signal close on their own after the keep-alive timeout,
/// which `drain_delay_s` outlasts by default.
pub async fn close_connections_after_signal(req: ServiceRequest, next: Next<BoxBody>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let mut response = next.call(req).await?;
    if state.is_some_and(|state| state.phase.get() != Phase::Serving) {
        response.response_mut().head_mut().set_connection_type(ConnectionType::Close);
    }
    Ok(response)
}

/// Waits until no session runs, or `deadline` has passed.
async fn wait_for_sessions(state: &AppState, deadline: Instant) {
    while state.active_sessions.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
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

    #[test]
    fn a_phase_reads_back_as_set() {
        let cell = PhaseCell::default();
        assert_eq!(cell.get(), Phase::Serving);
        for phase in [Phase::Draining, Phase::Closing, Phase::Serving] {
            cell.set(phase);
            assert_eq!(cell.get(), phase);
        }
    }
}
