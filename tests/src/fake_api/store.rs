//! Objects, the global resourceVersion counter and the change history watches replay from.
//!
//! Every write bumps one counter, as etcd's revision does, and lands in the history; a watch
//! that resumes from resourceVersion N replays the history after N, then follows live changes
//! from the broadcast channel. Both are fed under the same lock, so a watch that subscribes and
//! reads the history while holding it misses nothing and sees nothing twice.

use std::{collections::BTreeMap, fmt, sync::Arc};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::resources::{self, ResourceId};

/// Where the history starts being dropped on its own, so a long demo run stays bounded; a watch
/// that falls that far behind gets 410 and relists, as it would from a real apiserver.
const HISTORY_LIMIT: usize = 100_000;

/// Live changes buffered per watcher before it is cut off (and must resume from history).
const BROADCAST_CAPACITY: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write. For a delete, `object` is the last state with the delete's resourceVersion.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub resource: ResourceId,
    pub kind: ChangeType,
    pub object: Value,
    /// The state before a modification, so selective watchers see objects leave their view.
    pub previous: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjectKey {
    pub resource: ResourceId,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

#[derive(Debug)]
pub(crate) enum StoreError {
    Invalid(String),
    AlreadyExists(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(m) | Self::AlreadyExists(m) => f.write_str(m),
        }
    }
}

/// A watch may resume from `rv` only if `rv >= oldest`; older ones get 410 Gone.
#[derive(Debug)]
pub(crate) struct Expired {
    pub oldest: u64,
}

pub(crate) struct Store {
    counter: u64,
    /// resourceVersion of the latest object write (compaction bumps `counter` without a write).
    last_write: u64,
    oldest: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<Arc<Change>>,
    /// Events created through the API, in order.
    created_events: Vec<ObjectKey>,
    changes: broadcast::Sender<Arc<Change>>,
}

impl Store {
    pub fn new() -> Self {
        // Not 0: "0" means "any version" to the API, so no real object carries it.
        let start = 1000;
        Self {
            counter: start,
            last_write: start,
            oldest: start,
            objects: BTreeMap::new(),
            history: Vec::new(),
            created_events: Vec::new(),
            changes: broadcast::channel(BROADCAST_CAPACITY).0,
        }
    }

    pub fn current(&self) -> u64 {
        self.counter
    }

    pub fn last_write(&self) -> u64 {
        self.last_write
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// The key `obj` is stored under, after defaulting its namespace (`default`) when the
    /// resource is namespaced and dropping it when it is not.
    pub fn key_of(resource: ResourceId, obj: &mut Value) -> Result<ObjectKey, StoreError> {
        let r = resources::get(resource);
        let metadata = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| StoreError::Invalid(format!("{} without metadata", r.kind)))?;
        let name = metadata
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| StoreError::Invalid(format!("{} without metadata.name", r.kind)))?
            .to_owned();
        let namespace = if r.namespaced {
            let ns = metadata
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_owned();
            metadata.insert("namespace".into(), Value::String(ns.clone()));
            ns
        } else {
            metadata.remove("namespace");
            String::new()
        };
        Ok(ObjectKey { resource, namespace, name })
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Objects of one resource, optionally in one namespace, ordered by namespace and name.
    pub fn list(&self, resource: ResourceId, namespace: Option<&str>) -> impl Iterator<Item = &Value> {
        self.objects
            .iter()
            .filter(move |(k, _)| k.resource == resource && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v)
    }

    /// Create or replace. Keeps the uid and creationTimestamp of the object it replaces.
    pub fn put(&mut self, resource: ResourceId, mut obj: Value) -> Result<Arc<Change>, StoreError> {
        let r = resources::get(resource);
        let key = Self::key_of(resource, &mut obj)?;
        if let Some(map) = obj.as_object_mut() {
            map.insert("apiVersion".into(), Value::String(r.api_version()));
            map.insert("kind".into(), Value::String(r.kind.to_owned()));
        }
        let previous = self.objects.get(&key).cloned();
        self.counter += 1;
        let rv = self.counter;
        let metadata = metadata_mut(&mut obj);
        let inherited = |field: &str| {
            previous.as_ref().and_then(|p| p.get("metadata")).and_then(|m| m.get(field)).cloned()
        };
        for field in ["uid", "creationTimestamp"] {
            if metadata.get(field).is_none_or(Value::is_null) {
                let value = inherited(field).unwrap_or_else(|| match field {
                    "uid" => Value::String(format!("00000000-0000-4000-8000-{rv:012x}")),
                    _ => now(),
                });
                metadata.insert(field.into(), value);
            }
        }
        metadata.insert("resourceVersion".into(), Value::String(rv.to_string()));
        let kind = if previous.is_some() { ChangeType::Modified } else { ChangeType::Added };
        self.objects.insert(key, obj.clone());
        Ok(self.record(Change { rv, resource, kind, object: obj, previous }))
    }

    /// Create only; for POST.
    pub fn create(&mut self, resource: ResourceId, mut obj: Value) -> Result<Arc<Change>, StoreError> {
        let key = Self::key_of(resource, &mut obj)?;
        if self.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists(format!(
                "{} {:?} already exists",
                resources::get(resource).kind,
                key.name
            )));
        }
        let change = self.put(resource, obj)?;
        if resources::get(resource).kind == "Event" {
            self.created_events.push(key);
        }
        Ok(change)
    }

    pub fn delete(&mut self, key: &ObjectKey) -> Option<Arc<Change>> {
        let mut object = self.objects.remove(key)?;
        self.counter += 1;
        let rv = self.counter;
        metadata_mut(&mut object).insert("resourceVersion".into(), Value::String(rv.to_string()));
        Some(self.record(Change {
            rv,
            resource: key.resource,
            kind: ChangeType::Deleted,
            object,
            previous: None,
        }))
    }

    fn record(&mut self, change: Change) -> Arc<Change> {
        let change = Arc::new(change);
        self.last_write = change.rv;
        self.history.push(Arc::clone(&change));
        if self.history.len() > HISTORY_LIMIT {
            let cut = self.history.len() - HISTORY_LIMIT / 2;
            self.oldest = self.history[cut - 1].rv;
            self.history.drain(..cut);
        }
        // No receiver just means no watch is open.
        let _ = self.changes.send(Arc::clone(&change));
        change
    }

    /// Forgets the history: every resourceVersion handed out so far becomes too old to resume
    /// a watch from. The compaction consumes a resourceVersion of its own so that this holds
    /// even for a watcher that has seen the latest write.
    pub fn compact(&mut self) {
        self.counter += 1;
        self.oldest = self.counter;
        self.history.clear();
    }

    /// The changes after `rv`, or `Expired` if some of them are no longer in the history.
    pub fn since(&self, rv: u64) -> Result<Vec<Arc<Change>>, Expired> {
        if rv < self.oldest {
            return Err(Expired { oldest: self.oldest });
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history[start..].to_vec())
    }

    /// Events created through the API, in creation order, as they are now (a PATCH that adds a
    /// series shows); deleted ones are left out.
    pub fn created_events(&self) -> Vec<Value> {
        self.created_events.iter().filter_map(|k| self.objects.get(k).cloned()).collect()
    }
}

fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    let Some(map) = obj.as_object_mut() else {
        unreachable!("key_of accepted only objects with metadata");
    };
    map.entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("metadata checked to be an object by key_of")
}

fn now() -> Value {
    // Whole seconds, as the apiserver stores them (jiff's clock needs its `std` feature).
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let timestamp = k8s_openapi::jiff::Timestamp::from_second(seconds)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(timestamp);
    serde_json::to_value(time).expect("a timestamp serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_api::resources;

    fn pods() -> ResourceId {
        resources::by_path("", "v1", "pods").unwrap()
    }

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name}})
    }

    #[test]
    fn writes_bump_the_counter_and_keep_identity() {
        let mut s = Store::new();
        let first = s.put(pods(), pod("a")).unwrap();
        assert_eq!(first.kind, ChangeType::Added);
        assert_eq!(first.object["metadata"]["namespace"], "default");
        assert_eq!(first.object["kind"], "Pod");
        let uid = first.object["metadata"]["uid"].clone();
        let second = s.put(pods(), pod("a")).unwrap();
        assert_eq!(second.kind, ChangeType::Modified);
        assert_eq!(second.rv, first.rv + 1);
        assert_eq!(second.object["metadata"]["uid"], uid);
        assert_eq!(second.object["metadata"]["resourceVersion"], second.rv.to_string());
        assert!(second.previous.is_some());
    }

    #[test]
    fn history_and_compaction() {
        let mut s = Store::new();
        let start = s.current();
        s.put(pods(), pod("a")).unwrap();
        s.put(pods(), pod("b")).unwrap();
        let mut key = pod("a");
        let key = Store::key_of(pods(), &mut key).unwrap();
        let deleted = s.delete(&key).unwrap();
        assert_eq!(deleted.kind, ChangeType::Deleted);
        assert_eq!(s.since(start).unwrap().len(), 3);
        assert_eq!(s.since(start + 2).unwrap().len(), 1);
        let latest = s.current();
        s.compact();
        assert!(s.since(latest).is_err());
        assert!(s.since(s.current()).unwrap().is_empty());
        assert_eq!(s.list(pods(), None).count(), 1);
    }

    #[test]
    fn create_refuses_duplicates() {
        let mut s = Store::new();
        s.create(pods(), pod("a")).unwrap();
        assert!(matches!(s.create(pods(), pod("a")), Err(StoreError::AlreadyExists(_))));
    }
}
