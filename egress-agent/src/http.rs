//! `/healthz`, `/readyz` and `/metrics` for the kubelet's probes and Prometheus.

/// Where `run` serves /healthz, /readyz and /metrics unless told otherwise.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:9808";

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, routing::get};

/// Renders the metrics page (the node agent reads kernel maps, so this may block).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The agent loop must come round at least this often (it ticks every few seconds), or the
/// liveness probe fails and the kubelet restarts the agent (enforcement stays pinned meanwhile).
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// What the probes report; written by the agent loop.
pub struct Health {
    state: Mutex<HealthState>,
}

struct HealthState {
    heartbeat: Instant,
    /// `None` when ready; otherwise why not.
    not_ready: Option<String>,
}

impl Health {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(HealthState {
                heartbeat: Instant::now(),
                not_ready: Some("starting: caches not synced yet".into()),
            }),
        }
    }

    pub fn beat(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.heartbeat = Instant::now();
        }
    }

    pub fn set_ready(&self, not_ready: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            s.not_ready = not_ready;
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    render: Render,
}

/// Serves the probes and metrics on `addr`, with the routes of `more` besides.
pub async fn serve(addr: SocketAddr, health: Arc<Health>, render: Render, more: Router) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the health/metrics endpoint on {addr}"))?;
    serve_on(listener, health, render, more).await
}

/// Like [`serve`], on a listener the caller bound (so binding errors surface at start), with
/// the routes of `more` besides.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    render: Render,
    more: Router,
) -> Result<()> {
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { health, render })
        .merge(more);
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    // With the client's address, for the routes that answer only some clients.
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .await
        .context("health/metrics server")
}

async fn healthz(State(s): State<AppState>) -> (StatusCode, String) {
    let since = s.health.state.lock().map(|h| h.heartbeat.elapsed()).unwrap_or(Duration::MAX);
    if since > STALL_LIMIT {
        (StatusCode::SERVICE_UNAVAILABLE, format!("agent loop stalled for {}s\n", since.as_secs()))
    } else {
        (StatusCode::OK, "ok\n".into())
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.state.lock().map(|h| h.not_ready.clone()) {
        Ok(None) => (StatusCode::OK, "ready\n".into()),
        Ok(Some(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "health state poisoned\n".into()),
    }
}

async fn metrics_text(State(s): State<AppState>) -> ([(&'static str, &'static str); 1], String) {
    let render = s.render.clone();
    let body = tokio::task::spawn_blocking(move || render()).await.unwrap_or_default();
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}
