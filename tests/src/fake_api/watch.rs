//! Watch streams: newline-delimited JSON events, replayed from the history and then live, with
//! the apiserver's rules for selectors, bookmarks, timeouts and expired resourceVersions.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

use super::{
    Shared,
    query::Filter,
    resources::{self, ResourceId},
    store::{Change, ChangeType},
};

/// Without `timeoutSeconds` the real apiserver picks 30 to 60 minutes.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub(crate) struct WatchRequest {
    pub resource: ResourceId,
    pub filter: Filter,
    /// `None` (no resourceVersion, or "0"): start with the current state as ADDED events.
    pub since: Option<u64>,
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: the streaming list; current state, then a bookmark marking
    /// its end, then changes.
    pub initial_events: bool,
    pub timeout: Option<Duration>,
}

pub(crate) fn serve(shared: &Arc<Shared>, req: WatchRequest) -> Response {
    let mut first = Vec::new();
    // Subscribing, reading the history and noting the position all under the store lock: a
    // write lands either in what is replayed here or in the live channel, never both.
    let (live, position) = {
        let store = shared.store();
        let live = (store.subscribe(), shared.kill.subscribe());
        match req.since.filter(|_| !req.initial_events) {
            Some(rv) => match store.since(rv) {
                Ok(changes) => {
                    first.extend(changes.iter().filter_map(|c| event_for(c, req.resource, &req.filter)));
                    (live, rv.max(store.last_write()))
                }
                Err(expired) => {
                    drop(store);
                    shared.stats().gone += 1;
                    let message = format!("too old resource version: {rv} ({})", expired.oldest);
                    let status = json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": message, "reason": "Expired", "code": 410,
                    });
                    return stream_response(vec![line("ERROR", &status)], None);
                }
            },
            None => {
                first.extend(
                    store
                        .list(req.resource, req.filter.namespace.as_deref())
                        .filter(|o| req.filter.matches(o))
                        .map(|o| line("ADDED", o)),
                );
                let position = store.current();
                if req.initial_events {
                    first.push(line("BOOKMARK", &bookmark(req.resource, position, true)));
                }
                (live, position)
            }
        }
    };
    shared.stats().watches += 1;
    let (tx, rx) = mpsc::channel(64);
    let streaming = Streaming { shared: Arc::clone(shared), req, tx, position };
    tokio::spawn(streaming.run(first, live));
    stream_response(Vec::new(), Some(rx))
}

/// A response body made of `first` and then whatever arrives on `rest`.
fn stream_response(first: Vec<Bytes>, rest: Option<mpsc::Receiver<Bytes>>) -> Response {
    let head = futures_util::stream::iter(first);
    let tail = futures_util::stream::unfold(rest, |rx| async move {
        let mut rx = rx?;
        let next = rx.recv().await?;
        Some((next, Some(rx)))
    });
    let body = futures_util::StreamExt::map(futures_util::StreamExt::chain(head, tail), Ok::<_, Infallible>);
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], Body::from_stream(body)).into_response()
}

struct Streaming {
    shared: Arc<Shared>,
    req: WatchRequest,
    tx: mpsc::Sender<Bytes>,
    /// The resourceVersion this watcher has reached; what its bookmarks carry.
    position: u64,
}

impl Streaming {
    /// `live` carries the changes after the replayed ones and the signal that ends every watch.
    async fn run(
        mut self,
        first: Vec<Bytes>,
        live: (broadcast::Receiver<Arc<Change>>, watch::Receiver<u64>),
    ) {
        let (mut live, mut killed) = live;
        for l in first {
            if self.tx.send(l).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(self.req.timeout.unwrap_or(DEFAULT_TIMEOUT));
        tokio::pin!(deadline);
        let period = self.shared.bookmark_interval;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            // Biased, ending first: a write made after `drop_watches` or `set_available(false)`
            // returned must not slip out on a stream that is being ended, or the client would
            // resume past it and a test of "changes made while the watch was down" would race.
            tokio::select! {
                biased;
                _ = killed.changed() => return,
                () = self.tx.closed() => return,
                () = &mut deadline => return,
                _ = ticks.tick(), if self.req.bookmarks => {
                    let mark = line("BOOKMARK", &bookmark(self.req.resource, self.position, false));
                    if self.tx.send(mark).await.is_err() {
                        return;
                    }
                    self.shared.stats().bookmarks += 1;
                }
                change = live.recv() => {
                    // Lagged: this watcher fell too far behind; ending the stream makes the
                    // client resume from its last resourceVersion, out of the history.
                    let Ok(change) = change else { return };
                    self.position = change.rv;
                    if let Some(l) = event_for(&change, self.req.resource, &self.req.filter)
                        && self.tx.send(l).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
}

/// What a watcher with `filter` sees of `change`: objects entering its view are ADDED, those
/// leaving it are DELETED (with their previous content and the new resourceVersion, as the
/// apiserver's watch cache does), the rest pass through or are skipped.
fn event_for(change: &Change, resource: ResourceId, filter: &Filter) -> Option<Bytes> {
    if change.resource != resource {
        return None;
    }
    let was = match change.kind {
        ChangeType::Added => false,
        ChangeType::Modified => change.previous.as_ref().is_some_and(|p| filter.matches(p)),
        ChangeType::Deleted => filter.matches(&change.object),
    };
    let is = change.kind != ChangeType::Deleted && filter.matches(&change.object);
    match (was, is) {
        (true, true) => Some(line("MODIFIED", &change.object)),
        (false, true) => Some(line("ADDED", &change.object)),
        (true, false) if change.kind == ChangeType::Deleted => Some(line("DELETED", &change.object)),
        (true, false) => {
            let mut left = change.previous.clone().unwrap_or(Value::Null);
            left["metadata"]["resourceVersion"] = Value::String(change.rv.to_string());
            Some(line("DELETED", &left))
        }
        (false, false) => None,
    }
}

fn bookmark(resource: ResourceId, rv: u64, initial_events_end: bool) -> Value {
    let r = resources::get(resource);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"apiVersion": r.api_version(), "kind": r.kind, "metadata": metadata})
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut out =
        serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON values serialize");
    out.push(b'\n');
    Bytes::from(out)
}
