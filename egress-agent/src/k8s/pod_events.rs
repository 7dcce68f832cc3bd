//! Optional Kubernetes Events on pods for denied traffic (`podEvents: true`), so a namespace
//! owner sees "EgressDenied" in `kubectl describe pod` without access to node logs. At most one
//! Event per pod per minute; the rest only reach the agent's log.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;

const PER_POD_INTERVAL: Duration = Duration::from_secs(60);
/// Events waiting to be published; beyond this they are dropped (the log has them).
pub const QUEUE: usize = 256;

pub struct Denial {
    pub namespace: String,
    pub pod: String,
    pub note: String,
}

pub async fn run(client: Client, node_name: String, mut rx: mpsc::Receiver<Denial>) {
    let reporter = Reporter { controller: "egressfw-agent".into(), instance: Some(node_name) };
    let recorder = Recorder::new(client, reporter);
    let mut last: HashMap<(String, String), Instant> = HashMap::new();
    while let Some(d) = rx.recv().await {
        let key = (d.namespace.clone(), d.pod.clone());
        if last.get(&key).is_some_and(|t| t.elapsed() < PER_POD_INTERVAL) {
            continue;
        }
        last.insert(key, Instant::now());
        last.retain(|_, t| t.elapsed() < PER_POD_INTERVAL);
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(d.namespace.clone()),
            name: Some(d.pod.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "EgressDenied".into(),
            note: Some(d.note),
            action: "Enforce".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(namespace = d.namespace, pod = d.pod, error = %e, "could not record a pod Event");
        }
    }
}
