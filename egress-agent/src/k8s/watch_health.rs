//! Whether the agent's watches are working. A reflector whose watch keeps failing still holds
//! the state of its last successful list, so it looks synced while it goes stale: with `list`
//! allowed and `watch` refused (a ClusterRole missing one verb), or an API server that drops
//! every watch, a namespace switched to `enforce` would never reach the kernel. Readiness says
//! so instead: a watch that failed within the last [`REMEMBERED`] keeps the agent not ready.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How long a watch error keeps the agent not ready. Longer than kube-runtime's largest
/// backoff between retries (30 s), so a watch that fails on every retry never reads as healthy
/// between two failures; a watch that recovered reads healthy again after this long.
pub const REMEMBERED: Duration = Duration::from_secs(60);

/// The last error of each watch (by what it watches), shared by the reflectors and the loop.
#[derive(Clone, Default)]
pub struct WatchHealth {
    errors: Arc<Mutex<BTreeMap<String, (Instant, String)>>>,
}

impl WatchHealth {
    pub fn failed(&self, watch: &str, error: &str) {
        if let Ok(mut errors) = self.errors.lock() {
            errors.insert(watch.to_owned(), (Instant::now(), error.to_owned()));
        }
    }

    /// The watches that failed within [`REMEMBERED`] before `now`, described for `/readyz`.
    pub fn problem(&self, now: Instant) -> Option<String> {
        let errors = self.errors.lock().ok()?;
        let recent: Vec<String> = errors
            .iter()
            .filter(|(_, (at, _))| now.saturating_duration_since(*at) < REMEMBERED)
            .map(|(watch, (at, error))| {
                format!("{watch} failed {} s ago: {error}", now.saturating_duration_since(*at).as_secs())
            })
            .collect();
        (!recent.is_empty()).then(|| format!("watch failing: {}", recent.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_watch_is_a_problem_until_it_has_not_failed_for_a_while() {
        let health = WatchHealth::default();
        let start = Instant::now();
        assert_eq!(health.problem(start), None);
        health.failed("EndpointSlice in kube-system", "403 Forbidden");
        let problem = health.problem(Instant::now()).expect("a problem");
        assert!(problem.contains("EndpointSlice in kube-system") && problem.contains("403"), "{problem}");
        assert_eq!(health.problem(Instant::now() + REMEMBERED + Duration::from_secs(1)), None);
    }
}
