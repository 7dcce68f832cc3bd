//! An in-process fake Kubernetes API server, for running the agent's Kubernetes code against
//! something that behaves like an apiserver without a cluster.
//!
//! It serves namespaces, nodes, pods, services, endpoint slices and both kinds of Events over
//! plain HTTP on 127.0.0.1, with the semantics `kube::runtime::watcher` relies on: one global
//! resourceVersion, LIST with label and field selectors, WATCH replayed from a history and then
//! live, bookmarks, `410 Gone` for compacted resourceVersions, selective watchers told DELETED
//! when an object leaves their selector. Tests drive it synchronously (`apply`, `delete`,
//! `compact`, `drop_watches`, `set_available`) and read back what clients did (`events`,
//! `stats`). Only Events can be written through the API; everything else is the test's to set.
//!
//! ```no_run
//! use egress_tests::fake_api::{FakeApi, fixtures};
//!
//! let api = FakeApi::start()?;
//! api.apply(&fixtures::pod("default", "web", "uid-1", "node-a", "Burstable", Some("10.0.0.5")));
//! api.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"))?;
//! # anyhow::Ok(())
//! ```

mod discovery;
pub mod fixtures;
mod http;
mod kubeconfig;
mod query;
mod resources;
mod store;
mod watch;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use serde_json::Value;

use self::store::{ObjectKey, Store};

/// How to start a [`FakeApi`].
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Where to listen; port 0 picks a free one.
    pub bind: SocketAddr,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), bookmark_interval: Duration::from_secs(1) }
    }
}

/// What clients have done so far.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// LIST requests answered.
    pub lists: u64,
    /// Watch streams opened, not counting those refused with 410.
    pub watches: u64,
    /// Watches refused with `410 Gone` (an ERROR event with reason Expired).
    pub gone: u64,
    /// BOOKMARK events sent (the streaming list's end marker not included).
    pub bookmarks: u64,
    /// Requests answered 503 because of [`FakeApi::set_available`].
    pub unavailable: u64,
    /// Events created with POST.
    pub events_posted: u64,
    /// Every request, keyed by `METHOD /path` (no query string).
    pub requests: BTreeMap<String, u64>,
}

/// State shared by the handlers and the test-facing handle.
pub(crate) struct Shared {
    addr: SocketAddr,
    store: Mutex<Store>,
    stats: Mutex<Stats>,
    available: AtomicBool,
    /// Bumped to end every open watch stream.
    kill: tokio::sync::watch::Sender<u64>,
    bookmark_interval: Duration,
}

impl Shared {
    // A test that panicked while holding a lock has failed already; the next one still gets a
    // usable server rather than a cascade of poison errors.
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn end_watches(&self) {
        self.kill.send_modify(|generation| *generation += 1);
    }
}

/// A running fake API server. Dropping it stops the server and ends every connection.
pub struct FakeApi {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApi {
    /// Starts on 127.0.0.1 on a free port, with bookmarks every second.
    pub fn start() -> anyhow::Result<FakeApi> {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> anyhow::Result<FakeApi> {
        let listener = TcpListener::bind(options.bind)
            .with_context(|| format!("binding the fake API server to {}", options.bind))?;
        listener.set_nonblocking(true).context("making the listener non-blocking")?;
        let addr = listener.local_addr().context("reading the listener's address")?;
        let shared = Arc::new(Shared {
            addr,
            store: Mutex::new(Store::new()),
            stats: Mutex::default(),
            available: AtomicBool::new(true),
            kill: tokio::sync::watch::Sender::new(0),
            bookmark_interval: options.bookmark_interval,
        });
        // One worker thread of its own, so the server runs whether or not (and whichever way)
        // the test drives a runtime.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-api")
            .enable_all()
            .build()
            .context("building the fake API server's runtime")?;
        let router = http::router(Arc::clone(&shared));
        runtime.spawn(async move {
            let served = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => axum::serve(listener, router).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                eprintln!("fake API server on {addr} stopped: {e}");
            }
        });
        Ok(FakeApi { shared, runtime: Some(runtime) })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Writes a kubeconfig whose current context points at this server, namespace `default`,
    /// without credentials.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        kubeconfig::write(&self.url(), path)
    }

    /// Creates or replaces `obj` (keyed by kind, namespace and name) and returns its new
    /// resourceVersion. Watchers see ADDED or MODIFIED.
    pub fn apply<K: serde::Serialize + k8s_openapi::Resource>(&self, obj: &K) -> String {
        let mut value = serde_json::to_value(obj)
            .unwrap_or_else(|e| panic!("{} {}: does not serialize: {e}", K::API_VERSION, K::KIND));
        value["apiVersion"] = Value::String(K::API_VERSION.to_owned());
        value["kind"] = Value::String(K::KIND.to_owned());
        self.apply_json(value)
    }

    /// [`apply`](Self::apply) for an object given as JSON, which must carry `apiVersion`, `kind`
    /// and `metadata.name`. Panics on a kind this server does not serve.
    pub fn apply_json(&self, obj: Value) -> String {
        let resource = resource_of(&obj);
        match self.shared.store().put(resource, obj) {
            Ok(change) => change.rv.to_string(),
            Err(e) => panic!("fake API apply: {e}"),
        }
    }

    /// Deletes an object; watchers see DELETED with a new resourceVersion. False if it did not
    /// exist. `namespace` is ignored for cluster-scoped kinds.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: Option<&str>, name: &str) -> bool {
        let key = key::<K>(namespace, name);
        self.shared.store().delete(&key).is_some()
    }

    /// The stored object, as a client would read it.
    pub fn get<K: k8s_openapi::Resource + serde::de::DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let key = key::<K>(namespace, name);
        let value = self.shared.store().get(&key).cloned()?;
        Some(
            serde_json::from_value(value)
                .unwrap_or_else(|e| panic!("stored {} {name:?} does not deserialize: {e}", K::KIND)),
        )
    }

    /// Compacts the history: every resourceVersion handed out so far, including the latest one
    /// a watcher has seen, becomes too old, so a watch resuming from it gets `410 Gone` and
    /// the client has to relist. Open watches carry on until they end.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Ends every open watch stream; clients must watch again.
    pub fn drop_watches(&self) {
        self.shared.end_watches();
    }

    /// `false`: an outage. Every request is answered 503 and open watches end. `true` ends it.
    pub fn set_available(&self, up: bool) {
        self.shared.available.store(up, Ordering::SeqCst);
        if !up {
            self.shared.end_watches();
        }
    }

    /// The Events (core/v1 and events.k8s.io/v1) created through the API, in creation order,
    /// each in its current state (so a PATCHed series shows).
    pub fn events(&self) -> Vec<Value> {
        self.shared.store().created_events()
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats().clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // Not a blocking shutdown: the handle may be dropped inside the test's own runtime,
        // where waiting would panic. Dropping the tasks closes the listener and every stream.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn resource_of(obj: &Value) -> resources::ResourceId {
    let field = |name: &str| obj.get(name).and_then(Value::as_str).unwrap_or_default();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    resources::by_type(api_version, kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve {api_version:?} {kind:?}"))
}

fn key<K: k8s_openapi::Resource>(namespace: Option<&str>, name: &str) -> ObjectKey {
    let resource = resources::by_type(K::API_VERSION, K::KIND)
        .unwrap_or_else(|| panic!("the fake API server does not serve {} {}", K::API_VERSION, K::KIND));
    let namespaced = resources::get(resource).namespaced;
    ObjectKey {
        resource,
        namespace: if namespaced { namespace.unwrap_or("default").to_owned() } else { String::new() },
        name: name.to_owned(),
    }
}
