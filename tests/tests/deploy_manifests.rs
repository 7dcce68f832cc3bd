//! The Kubernetes manifests under deploy/, rendered the way `kubectl apply -k deploy/` renders
//! them and checked against each other and against the agent: its flags, environment variables
//! and defaults, its configuration parser, the host paths it works in and the API access it needs.
//!
//! No kustomize binary is at hand, so the small subset of kustomize the manifests use is rendered
//! here (resources, namespace, labels, images); any other kustomization field fails the tests
//! until it is taught to the renderer. Needs no cluster, no root and no kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use egress_agent::{k8s::config::DEFAULT_CONFIG_PATH, kernel::bpffs::DEFAULT_PIN_DIR};
use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope, Resource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Probe, Service, ServiceAccount, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

/// `--http-addr`'s default in the agent.
const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:9808";
/// Every host directory the agent may see, and why: pins must outlive the pod (bpffs), and
/// cgroup ids and levels are those of the host's hierarchy.
const HOST_BPFFS: &str = "/sys/fs/bpf";
const HOST_CGROUP: &str = "/sys/fs/cgroup";
const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "egressfw");

// ---------------------------------------------------------------------------------------------
// Rendering: the kustomize subset.

/// What a kustomization may say; anything else fails rather than being silently ignored.
const KUSTOMIZATION_FIELDS: &[&str] = &["apiVersion", "kind", "namespace", "labels", "resources", "images"];
/// Kinds whose pod template kustomize's `labels.includeTemplates` and `images` reach.
const WORKLOAD_KINDS: &[&str] = &["DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"];

/// One rendered object and the file it came from (repository-relative, for messages).
struct Object {
    file: String,
    value: Value,
}

struct Manifests {
    /// `namespace:` of the top-level kustomization.
    namespace: String,
    objects: Vec<Object>,
    /// Every file the kustomization reads, the kustomization files included.
    files: BTreeSet<PathBuf>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn shown(path: &Path) -> String {
    path.strip_prefix(repo_root()).unwrap_or(path).display().to_string()
}

fn manifests() -> Manifests {
    let root = deploy_dir();
    let mut files = BTreeSet::new();
    let (namespace, objects) = render(&root, &root, &mut files).unwrap_or_else(|e| panic!("{e:#}"));
    let namespace =
        namespace.expect("deploy/kustomization.yaml: set `namespace:`, every object belongs in one");
    Manifests { namespace, objects, files }
}

/// Renders the kustomization in `dir` (nested kustomizations included), like `kustomize build`.
fn render(root: &Path, dir: &Path, files: &mut BTreeSet<PathBuf>) -> Result<(Option<String>, Vec<Object>)> {
    let path = dir.join("kustomization.yaml");
    let file = shown(&path);
    files.insert(path.clone());
    let text = fs::read_to_string(&path).with_context(|| format!("reading {file}"))?;
    check_yaml11_booleans(&file, &text)?;
    let k: Map<String, Value> = serde_yaml::from_str(&text).with_context(|| format!("parsing {file}"))?;
    for key in k.keys() {
        ensure!(
            KUSTOMIZATION_FIELDS.contains(&key.as_str()),
            "{file}: field `{key}` is not rendered by tests/tests/deploy_manifests.rs; teach the renderer \
             there (handled: {KUSTOMIZATION_FIELDS:?})"
        );
    }
    ensure!(
        k.get("apiVersion") == Some(&"kustomize.config.k8s.io/v1beta1".into())
            && k.get("kind") == Some(&"Kustomization".into()),
        "{file}: expected apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization"
    );
    let mut objects = Vec::new();
    for entry in k.get("resources").and_then(Value::as_array).into_iter().flatten() {
        let entry = entry.as_str().with_context(|| format!("{file}: resources entries are paths"))?;
        ensure!(!entry.contains("://"), "{file}: remote resource {entry:?} is not rendered here");
        let resource = normalize(&dir.join(entry));
        ensure!(
            resource.starts_with(root),
            "{file}: {entry:?} is outside {} (kustomize refuses that by default)",
            shown(root)
        );
        if resource.is_dir() {
            objects.extend(render(root, &resource, files)?.1);
        } else {
            ensure!(files.insert(resource.clone()), "{file}: {entry:?} is listed twice");
            objects.extend(read_documents(&resource)?);
        }
    }
    if let Some(labels) = k.get("labels") {
        apply_labels(&file, labels, &mut objects)?;
    }
    let namespace = match k.get("namespace") {
        Some(ns) => {
            let ns = ns.as_str().with_context(|| format!("{file}: namespace is a string"))?;
            apply_namespace(ns, &mut objects)?;
            Some(ns.to_owned())
        }
        None => None,
    };
    if let Some(images) = k.get("images") {
        apply_images(&file, images, &mut objects)?;
    }
    Ok((namespace, objects))
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn read_documents(path: &Path) -> Result<Vec<Object>> {
    let file = shown(path);
    let text = fs::read_to_string(path).with_context(|| format!("reading {file}"))?;
    check_yaml11_booleans(&file, &text)?;
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = Value::deserialize(doc).with_context(|| format!("{file}: YAML document {}", i + 1))?;
        match value {
            Value::Null => {}
            Value::Object(_) => objects.push(Object { file: file.clone(), value }),
            _ => bail!("{file}: YAML document {} is not an object", i + 1),
        }
    }
    Ok(objects)
}

/// kubectl reads YAML 1.1, where unquoted yes/no/on/off (and y/n) are booleans, while
/// serde_yaml reads YAML 1.2, where they are strings: `egressfw.io/mode: off` would pass here
/// and be refused by the API server. Block scalars (the embedded agent.yaml) are skipped: their
/// content is a string to both.
fn check_yaml11_booleans(file: &str, text: &str) -> Result<()> {
    const WORDS: &[&str] = &["y", "n", "yes", "no", "on", "off"];
    let mut block_indent: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        if let Some(b) = block_indent {
            if line.trim().is_empty() || indent > b {
                continue;
            }
            block_indent = None;
        }
        let code = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        let code = code.trim_end();
        if code.ends_with(['|', '>']) || code.ends_with("|-") || code.ends_with(">-") {
            block_indent = Some(indent);
            continue;
        }
        let scalar = code.rsplit_once(": ").map_or(code.trim_start().trim_start_matches("- "), |(_, v)| v);
        let values = scalar.trim().trim_start_matches('[').trim_end_matches(']').split(',');
        for v in values.map(str::trim) {
            ensure!(
                !WORDS.contains(&v.to_ascii_lowercase().as_str()),
                "{file}:{}: unquoted `{v}` is a boolean to kubectl (YAML 1.1): quote it",
                n + 1
            );
        }
    }
    Ok(())
}

fn apply_labels(file: &str, labels: &Value, objects: &mut [Object]) -> Result<()> {
    for entry in labels.as_array().with_context(|| format!("{file}: labels is a list"))? {
        let entry = entry.as_object().with_context(|| format!("{file}: labels entries are maps"))?;
        for key in entry.keys() {
            ensure!(
                ["pairs", "includeSelectors", "includeTemplates"].contains(&key.as_str()),
                "{file}: labels field `{key}` is not rendered by tests/tests/deploy_manifests.rs"
            );
        }
        ensure!(
            entry.get("includeSelectors").is_none_or(|v| v == &Value::Bool(false)),
            "{file}: labels.includeSelectors: true is not rendered here, and would change the DaemonSet's \
             selector, which is immutable: upgrades would fail"
        );
        let templates = entry.get("includeTemplates") == Some(&Value::Bool(true));
        let pairs = entry.get("pairs").and_then(Value::as_object).context("labels entry without pairs")?;
        ensure!(pairs.values().all(Value::is_string), "{file}: label values must be strings: {pairs:?}");
        for o in objects.iter_mut() {
            set_labels(&mut o.value["metadata"], pairs);
            let kind = o.value["kind"].as_str().unwrap_or_default();
            if templates && WORKLOAD_KINDS.contains(&kind) {
                set_labels(&mut o.value["spec"]["template"]["metadata"], pairs);
            }
        }
    }
    Ok(())
}

fn set_labels(metadata: &mut Value, pairs: &Map<String, Value>) {
    for (k, v) in pairs {
        metadata["labels"][k] = v.clone();
    }
}

fn apply_namespace(namespace: &str, objects: &mut [Object]) -> Result<()> {
    for o in objects.iter_mut() {
        let kind = kind_of(o)?;
        if !kind.cluster_scoped {
            o.value["metadata"]["namespace"] = namespace.into();
        }
        if kind.kind.ends_with("RoleBinding") {
            // kustomize rewrites only some subjects' namespaces, and which ones differs between
            // its versions: require them written out.
            for s in o.value["subjects"].as_array().into_iter().flatten() {
                ensure!(
                    s["kind"] != "ServiceAccount" || s["namespace"].as_str().is_some_and(|n| !n.is_empty()),
                    "{}: ServiceAccount subject {} needs an explicit namespace",
                    o.file,
                    s["name"]
                );
            }
        }
    }
    Ok(())
}

fn apply_images(file: &str, images: &Value, objects: &mut [Object]) -> Result<()> {
    for entry in images.as_array().with_context(|| format!("{file}: images is a list"))? {
        let entry: BTreeMap<String, String> = serde_json::from_value(entry.clone())
            .with_context(|| format!("{file}: images entries map names to strings"))?;
        for key in entry.keys() {
            ensure!(
                ["name", "newName", "newTag", "digest"].contains(&key.as_str()),
                "{file}: images field `{key}` is not rendered by tests/tests/deploy_manifests.rs"
            );
        }
        let name = entry.get("name").with_context(|| format!("{file}: images entry without a name"))?;
        let mut matched = false;
        for o in objects.iter_mut() {
            if !WORKLOAD_KINDS.contains(&o.value["kind"].as_str().unwrap_or_default()) {
                continue;
            }
            for list in ["containers", "initContainers"] {
                let containers = o.value.pointer_mut(&format!("/spec/template/spec/{list}"));
                for c in containers.and_then(Value::as_array_mut).into_iter().flatten() {
                    let image = c["image"].as_str().unwrap_or_default();
                    let (image_name, tag, digest) = split_image(image);
                    if image_name != name {
                        continue;
                    }
                    matched = true;
                    let new_name = entry.get("newName").map_or(image_name, String::as_str);
                    let new = match (entry.get("digest"), entry.get("newTag").map(String::as_str).or(tag)) {
                        (Some(d), _) => format!("{new_name}@{d}"),
                        (None, Some(t)) => format!("{new_name}:{t}"),
                        (None, None) => {
                            digest.map_or_else(|| new_name.to_owned(), |d| format!("{new_name}@{d}"))
                        }
                    };
                    c["image"] = new.into();
                }
            }
        }
        // kustomize ignores an entry that matches nothing; a typo there would leave the
        // workload on an image nobody meant.
        ensure!(matched, "{file}: images entry {name:?} matches no container image");
    }
    Ok(())
}

/// `registry:5000/a/b:tag@sha256:..` into name, tag and digest.
fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = image.split_once('@').map_or((image, None), |(r, d)| (r, Some(d)));
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..]), digest),
        None => (rest, None, digest),
    }
}

// ---------------------------------------------------------------------------------------------
// The kinds the manifests may hold, with their scope from k8s-openapi itself.

trait Scope {
    const CLUSTER: bool;
}
impl Scope for ClusterResourceScope {
    const CLUSTER: bool = true;
}
impl Scope for NamespaceResourceScope {
    const CLUSTER: bool = false;
}

struct Kind {
    api_version: &'static str,
    kind: &'static str,
    cluster_scoped: bool,
    round_trip: fn(&Value) -> serde_json::Result<Value>,
}

fn kind<K>() -> Kind
where
    K: Resource + DeserializeOwned + Serialize,
    K::Scope: Scope,
{
    Kind {
        api_version: K::API_VERSION,
        kind: K::KIND,
        cluster_scoped: <K::Scope as Scope>::CLUSTER,
        round_trip: |v| serde_json::to_value(serde_json::from_value::<K>(v.clone())?),
    }
}

fn kind_of(o: &Object) -> Result<Kind> {
    let (api_version, k) = (o.value["apiVersion"].as_str(), o.value["kind"].as_str());
    [
        kind::<Namespace>(),
        kind::<ServiceAccount>(),
        kind::<ConfigMap>(),
        kind::<Service>(),
        kind::<ClusterRole>(),
        kind::<ClusterRoleBinding>(),
        kind::<Role>(),
        kind::<RoleBinding>(),
        kind::<DaemonSet>(),
        kind::<Deployment>(),
    ]
    .into_iter()
    .find(|known| Some(known.api_version) == api_version && Some(known.kind) == k)
    .with_context(|| {
        format!(
            "{}: {api_version:?} {k:?} is not a kind tests/tests/deploy_manifests.rs knows; add it to kind_of()",
            o.file
        )
    })
}

/// Where `original` has something `typed` (the same object after a trip through the API types)
/// lost: a misspelt or misplaced field, which the API server would drop or refuse.
fn lost_in_round_trip(original: &Value, typed: &Value, at: &str) -> Option<String> {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            Some(w) => lost_in_round_trip(v, w, &format!("{at}.{k}")),
            None => Some(format!("{at}.{k}")),
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| lost_in_round_trip(v, w, &format!("{at}[{i}]"))),
        _ if original == typed => None,
        _ => Some(format!("{at} ({original} became {typed})")),
    }
}

impl Manifests {
    /// Every object of kind `K`, typed, with its file.
    fn all<K: Resource + DeserializeOwned>(&self) -> Vec<(&str, K)> {
        self.objects
            .iter()
            .filter(|o| o.value["apiVersion"] == K::API_VERSION && o.value["kind"] == K::KIND)
            .map(|o| {
                let typed = serde_json::from_value(o.value.clone())
                    .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", o.file, K::KIND));
                (o.file.as_str(), typed)
            })
            .collect()
    }

    fn one<K: Resource + DeserializeOwned>(&self) -> (&str, K) {
        let mut all = self.all::<K>();
        assert_eq!(all.len(), 1, "expected exactly one {} in deploy/, found {}", K::KIND, all.len());
        all.remove(0)
    }

    /// The node agent's DaemonSet, its pod spec and its one container.
    fn agent(&self) -> (&str, DaemonSet, PodSpec, Container) {
        let (file, ds) = self.one::<DaemonSet>();
        let pod =
            ds.spec.clone().and_then(|s| s.template.spec).unwrap_or_else(|| panic!("{file}: no pod spec"));
        assert_eq!(pod.containers.len(), 1, "{file}: the agent pod has one container");
        let container = pod.containers[0].clone();
        (file, ds, pod, container)
    }
}

// ---------------------------------------------------------------------------------------------
// What the agent reads: flags win over environment variables (clap), defaults last.

#[derive(Debug, PartialEq)]
enum Setting {
    Value(String),
    FieldRef(String),
}

fn setting(file: &str, c: &Container, flag: &str, env: &str) -> Option<Setting> {
    assert!(c.command.is_none(), "{file}: `command` replaces the image's egress-agent entrypoint; use args");
    assert!(c.env_from.is_none(), "{file}: envFrom hides which settings the agent gets; use env");
    let args = c.args.as_deref().unwrap_or_default();
    if let Some(short) = args.iter().find(|a| a.starts_with('-') && !a.starts_with("--")) {
        panic!("{file}: use long flags in args ({short:?}): this test resolves only those");
    }
    let long = format!("--{flag}");
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix(&format!("{long}=")) {
            return Some(Setting::Value(v.to_owned()));
        }
        if *a == long {
            let v = args.get(i + 1).unwrap_or_else(|| panic!("{file}: {long} without a value"));
            return Some(Setting::Value(v.clone()));
        }
    }
    let var = c.env.as_deref().unwrap_or_default().iter().find(|e| e.name == env)?;
    let found = match (&var.value, var.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
        (Some(v), None) => Setting::Value(v.clone()),
        (None, Some(f)) => Setting::FieldRef(f.field_path.clone()),
        _ => panic!("{file}: env {env} is neither a plain value nor a fieldRef"),
    };
    if let Setting::Value(v) = &found {
        assert!(!v.contains("$("), "{file}: {env}={v:?}: variable references are not resolved by this test");
    }
    Some(found)
}

fn value_or(file: &str, c: &Container, flag: &str, env: &str, default: &str) -> String {
    match setting(file, c, flag, env) {
        None => default.to_owned(),
        Some(Setting::Value(v)) => v,
        Some(other) => panic!("{file}: --{flag}/{env} should be a plain value, is {other:?}"),
    }
}

/// The volume mount that holds `path` in the container (the longest mount path containing it).
fn mount_holding<'a>(c: &'a Container, path: &Path) -> Option<&'a VolumeMount> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
}

/// The host directory mounted exactly at `path`, with its mount.
fn host_dir_at<'a>(file: &str, pod: &PodSpec, c: &'a Container, path: &str) -> (String, &'a VolumeMount) {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == Path::new(path))
        .unwrap_or_else(|| panic!("{file}: nothing is mounted at {path}"));
    let volume = pod.volumes.iter().flatten().find(|v| v.name == m.name);
    let host = volume.and_then(|v| v.host_path.as_ref()).unwrap_or_else(|| {
        panic!("{file}: the volume {:?} mounted at {path} is not a hostPath volume", m.name)
    });
    assert_eq!(
        host.type_.as_deref(),
        Some("Directory"),
        "{file}: hostPath {} needs type Directory",
        host.path
    );
    (host.path.clone(), m)
}

fn http_port(file: &str, c: &Container) -> u16 {
    let addr = value_or(file, c, "http-addr", "EGRESSFW_HTTP_ADDR", DEFAULT_HTTP_ADDR);
    let addr: SocketAddr =
        addr.parse().unwrap_or_else(|e| panic!("{file}: --http-addr/EGRESSFW_HTTP_ADDR {addr:?}: {e}"));
    assert!(
        !addr.ip().is_loopback(),
        "{file}: the agent listens on {addr}: the kubelet's probes and Prometheus come from outside the pod"
    );
    addr.port()
}

/// The container port a probe's httpGet targets, resolved through the port's name.
fn probe_target(file: &str, c: &Container, probe: Option<&Probe>, which: &str) -> (String, i32) {
    let get = probe.and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{file}: no httpGet {which}"));
    assert!(get.scheme.as_deref().is_none_or(|s| s == "HTTP"), "{file}: {which} uses {:?}", get.scheme);
    let ports = c.ports.as_deref().unwrap_or_default();
    let port = match &get.port {
        IntOrString::String(name) => {
            ports.iter().find(|p| p.name.as_deref() == Some(name.as_str())).unwrap_or_else(|| {
                panic!("{file}: {which} targets port {name:?}, which the container does not declare")
            })
        }
        IntOrString::Int(n) => ports.iter().find(|p| p.container_port == *n).unwrap_or_else(|| {
            panic!("{file}: {which} targets port {n}, which the container does not declare")
        }),
    };
    (get.path.clone().unwrap_or_default(), port.container_port)
}

fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            other => panic!("unknown label selector operator {other:?}"),
        }
    });
    by_labels && by_expressions
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn kustomization_reaches_every_manifest_file() {
    let m = manifests();
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                assert!(
                    m.files.contains(&path),
                    "{} is not reached from deploy/kustomization.yaml: `kubectl apply -k deploy/` would skip it",
                    shown(&path)
                );
            }
        }
    }
}

#[test]
fn every_object_is_a_kubernetes_object_with_standard_labels() {
    let m = manifests();
    assert!(!m.objects.is_empty(), "deploy/kustomization.yaml renders nothing");
    let mut names = BTreeSet::new();
    for o in &m.objects {
        let kind = kind_of(o).unwrap_or_else(|e| panic!("{e:#}"));
        let typed = (kind.round_trip)(&o.value)
            .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", o.file, kind.kind));
        if let Some(at) = lost_in_round_trip(&o.value, &typed, kind.kind) {
            panic!("{}: {at} is not part of the Kubernetes API (misspelt or misplaced?)", o.file);
        }
        let name =
            o.value["metadata"]["name"].as_str().unwrap_or_else(|| panic!("{}: no metadata.name", o.file));
        let namespace = o.value["metadata"]["namespace"].as_str();
        assert_eq!(
            namespace.is_none(),
            kind.cluster_scoped,
            "{}: {} {name}: namespace {namespace:?} (the kustomization's namespace: {})",
            o.file,
            kind.kind,
            m.namespace
        );
        assert!(
            names.insert((kind.kind, namespace, name)),
            "{}: {} {name} is defined twice",
            o.file,
            kind.kind
        );
        let labels = &o.value["metadata"]["labels"];
        assert!(
            labels["app.kubernetes.io/name"].is_string(),
            "{}: {name} has no app.kubernetes.io/name label",
            o.file
        );
        assert_eq!(
            labels[PART_OF.0], PART_OF.1,
            "{}: {name} is not labelled {}={}",
            o.file, PART_OF.0, PART_OF.1
        );
    }
    let (file, ns) = m.one::<Namespace>();
    assert_eq!(
        ns.metadata.name.as_deref(),
        Some(m.namespace.as_str()),
        "{file}: the Namespace object is not the kustomization's namespace"
    );
}

#[test]
fn daemonset_selector_matches_its_pods_and_only_them() {
    let m = manifests();
    let (file, ds, _, _) = m.agent();
    let spec = ds.spec.as_ref().unwrap();
    let labels = spec.template.metadata.as_ref().and_then(|md| md.labels.clone()).unwrap_or_default();
    assert!(
        spec.selector.match_labels.as_ref().is_some_and(|l| !l.is_empty()),
        "{file}: the selector needs matchLabels"
    );
    assert!(
        selects(&spec.selector, &labels),
        "{file}: selector {:?} does not match template labels {labels:?}",
        spec.selector
    );
    for key in ["app.kubernetes.io/name", "app.kubernetes.io/component", PART_OF.0] {
        assert!(labels.contains_key(key), "{file}: pod template has no {key} label");
    }
    // The gateway's Deployment joins later: neither may adopt the other's pods.
    for (other_file, d) in m.all::<Deployment>() {
        let other =
            d.spec.as_ref().and_then(|s| s.template.metadata.as_ref()).and_then(|md| md.labels.clone());
        assert!(
            !selects(&spec.selector, &other.unwrap_or_default()),
            "{file}: the DaemonSet's selector also matches the pods of {other_file}"
        );
    }
}

#[test]
fn probes_and_metrics_use_the_port_the_agent_listens_on() {
    let m = manifests();
    let (file, ds, _, c) = m.agent();
    let port = i32::from(http_port(file, &c));
    let live = probe_target(file, &c, c.liveness_probe.as_ref(), "livenessProbe");
    assert_eq!(
        live,
        ("/healthz".to_owned(), port),
        "{file}: livenessProbe should GET /healthz on port {port}"
    );
    let ready = probe_target(file, &c, c.readiness_probe.as_ref(), "readinessProbe");
    assert_eq!(
        ready,
        ("/readyz".to_owned(), port),
        "{file}: readinessProbe should GET /readyz on port {port}"
    );
    let annotations =
        ds.spec.and_then(|s| s.template.metadata).and_then(|md| md.annotations).unwrap_or_default();
    if let Some(p) = annotations.get("prometheus.io/port") {
        assert_eq!(*p, port.to_string(), "{file}: prometheus.io/port is not the agent's HTTP port");
    }
    if let Some(p) = annotations.get("prometheus.io/path") {
        assert_eq!(p, "/metrics", "{file}: the agent serves metrics at /metrics");
    }
}

#[test]
fn config_map_is_a_valid_agent_config_at_the_config_path() {
    let m = manifests();
    let (file, _, pod, c) = m.agent();
    let path = value_or(file, &c, "config", "EGRESSFW_CONFIG", DEFAULT_CONFIG_PATH);
    let mount = mount_holding(&c, Path::new(&path))
        .unwrap_or_else(|| panic!("{file}: nothing is mounted where the agent reads its config ({path})"));
    assert!(
        mount.sub_path.is_none(),
        "{file}: the config is mounted with subPath: the kubelet never updates such a file when the ConfigMap changes"
    );
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name);
    let source = volume
        .and_then(|v| v.config_map.as_ref())
        .unwrap_or_else(|| panic!("{file}: {path} is not on a configMap volume"));
    let within = Path::new(&path).strip_prefix(&mount.mount_path).unwrap().to_string_lossy().into_owned();
    let key = match &source.items {
        Some(items) => items.iter().find(|i| i.path == within).map(|i| i.key.clone()),
        None => Some(within.clone()),
    }
    .unwrap_or_else(|| panic!("{file}: the configMap volume's items do not provide {within}"));
    let (cm_file, cm) = m
        .all::<ConfigMap>()
        .into_iter()
        .find(|(_, cm)| cm.metadata.name.as_deref() == Some(source.name.as_str()))
        .unwrap_or_else(|| panic!("{file}: ConfigMap {:?} is not in deploy/", source.name));
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(&key))
        .unwrap_or_else(|| panic!("{cm_file}: no key {key:?}, which the agent reads as {path}"));
    let config = egress_agent::k8s::config::parse(text)
        .unwrap_or_else(|e| panic!("{cm_file}: {key} is not a valid agent config: {e:?}"));
    assert!(
        config.gateways.contains_key(&config.default_gateway),
        "{cm_file}: the default gateway {:?} is not configured",
        config.default_gateway
    );
}

#[test]
fn node_name_comes_from_the_downward_api() {
    let m = manifests();
    let (file, _, _, c) = m.agent();
    assert_eq!(
        setting(file, &c, "node-name", "NODE_NAME"),
        Some(Setting::FieldRef("spec.nodeName".into())),
        "{file}: the agent's node name (env NODE_NAME) must come from fieldRef spec.nodeName"
    );
}

#[test]
fn cgroup_root_and_pin_dir_are_the_hosts() {
    let m = manifests();
    let (file, _, pod, c) = m.agent();

    let Some(Setting::Value(cgroup_root)) = setting(file, &c, "cgroup-root", "EGRESSFW_CGROUP_ROOT") else {
        panic!(
            "{file}: set EGRESSFW_CGROUP_ROOT: found from /proc/mounts it would be the container's cgroup namespace"
        )
    };
    let (host, mount) = host_dir_at(file, &pod, &c, &cgroup_root);
    assert_eq!(
        host, HOST_CGROUP,
        "{file}: EGRESSFW_CGROUP_ROOT {cgroup_root} is not the host's {HOST_CGROUP}"
    );
    assert_eq!(
        mount.read_only,
        Some(true),
        "{file}: mount the host cgroupfs read-only: the agent only opens directories"
    );

    let pin_dir = value_or(file, &c, "pin-dir", "EGRESSFW_PIN_DIR", DEFAULT_PIN_DIR);
    let parent =
        Path::new(&pin_dir).parent().unwrap_or_else(|| panic!("{file}: pin dir {pin_dir} has no parent"));
    let (host, mount) = host_dir_at(file, &pod, &c, &parent.to_string_lossy());
    assert_eq!(host, HOST_BPFFS, "{file}: the pin dir's parent {} is not the host's bpffs", parent.display());
    assert_ne!(
        mount.read_only,
        Some(true),
        "{file}: the agent pins into {}: it cannot be read-only",
        parent.display()
    );
    assert!(
        matches!(mount.mount_propagation.as_deref(), Some("HostToContainer" | "Bidirectional")),
        "{file}: mount {HOST_BPFFS} with mountPropagation HostToContainer, so a bpffs the host mounts later is seen"
    );

    for v in pod.volumes.iter().flatten() {
        if let Some(h) = &v.host_path {
            assert!(
                [HOST_BPFFS, HOST_CGROUP].contains(&h.path.as_str()),
                "{file}: hostPath {} is more of the host than the agent needs",
                h.path
            );
        }
    }
    for mount in c.volume_mounts.iter().flatten() {
        assert!(
            pod.volumes.iter().flatten().any(|v| v.name == mount.name),
            "{file}: volumeMount {:?} has no volume",
            mount.name
        );
    }
}

#[test]
fn service_account_binding_and_role_agree() {
    let m = manifests();
    let (file, ds, pod, _) = m.agent();
    let sa_name = pod.service_account_name.unwrap_or_else(|| panic!("{file}: set serviceAccountName"));
    let sa_namespace = ds.metadata.namespace.unwrap();
    let (sa_file, _) = m
        .all::<ServiceAccount>()
        .into_iter()
        .find(|(_, sa)| {
            sa.metadata.name.as_ref() == Some(&sa_name)
                && sa.metadata.namespace.as_ref() == Some(&sa_namespace)
        })
        .unwrap_or_else(|| panic!("{file}: ServiceAccount {sa_namespace}/{sa_name} is not in deploy/"));

    let for_agent = |subjects: Option<&Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.into_iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == sa_name
                && s.namespace.as_deref() == Some(sa_namespace.as_str())
        })
    };
    let all_bindings = m.all::<ClusterRoleBinding>();
    let bindings: Vec<_> = all_bindings.iter().filter(|(_, b)| for_agent(b.subjects.as_ref())).collect();
    assert_eq!(
        bindings.len(),
        1,
        "expected one ClusterRoleBinding for the agent's ServiceAccount {sa_namespace}/{sa_name} ({sa_file}); \
         subjects of the bindings in deploy/: {:?}",
        all_bindings.iter().map(|(f, b)| (f, &b.subjects)).collect::<Vec<_>>()
    );
    assert!(
        !m.all::<RoleBinding>().iter().any(|(_, b)| for_agent(b.subjects.as_ref())),
        "a RoleBinding grants the agent more than its ClusterRole"
    );
    let (binding_file, binding) = &bindings[0];
    let role_ref = &binding.role_ref;
    assert_eq!(
        (role_ref.api_group.as_str(), role_ref.kind.as_str()),
        ("rbac.authorization.k8s.io", "ClusterRole"),
        "{binding_file}: roleRef"
    );
    assert!(
        m.all::<ClusterRole>().iter().any(|(_, r)| r.metadata.name.as_ref() == Some(&role_ref.name)),
        "{binding_file}: ClusterRole {:?} is not in deploy/",
        role_ref.name
    );
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_uses() {
    let watch = ["get", "list", "watch"];
    let record = ["create", "patch"];
    let expected: BTreeSet<(&str, &str, &str)> = [("", "namespaces"), ("", "pods"), ("", "services")]
        .into_iter()
        .chain([("discovery.k8s.io", "endpointslices")])
        .flat_map(|(g, r)| watch.map(|v| (g, r, v)))
        .chain(
            [("", "events"), ("events.k8s.io", "events")]
                .into_iter()
                .flat_map(|(g, r)| record.map(|v| (g, r, v))),
        )
        .collect();

    let m = manifests();
    let (file, role) = m.one::<ClusterRole>();
    assert!(role.aggregation_rule.is_none(), "{file}: an aggregated role's rules are not reviewable here");
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        assert!(rule.non_resource_urls.is_none(), "{file}: rule {i} grants non-resource URLs");
        assert!(
            rule.resource_names.is_none(),
            "{file}: rule {i}: resourceNames is not something the agent uses"
        );
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        for word in groups.iter().chain(resources).chain(&rule.verbs) {
            assert!(!word.contains('*'), "{file}: rule {i} has a wildcard ({word:?})");
        }
        for g in groups {
            for r in resources {
                for v in &rule.verbs {
                    granted.insert((g.as_str(), r.as_str(), v.as_str()));
                }
            }
        }
    }
    let extra: Vec<_> = granted.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(extra.is_empty(), "{file}: grants (apiGroup, resource, verb) the agent does not use: {extra:?}");
    assert!(missing.is_empty(), "{file}: lacks (apiGroup, resource, verb) the agent needs: {missing:?}");
}

#[test]
fn privileges_are_explicit_capabilities_not_privileged_mode() {
    let m = manifests();
    let (file, _, pod, c) = m.agent();
    for (what, on) in
        [("hostNetwork", pod.host_network), ("hostPID", pod.host_pid), ("hostIPC", pod.host_ipc)]
    {
        assert_ne!(on, Some(true), "{file}: {what} is not needed by the agent");
    }
    let sc = c.security_context.unwrap_or_else(|| panic!("{file}: the container needs a securityContext"));
    assert_ne!(sc.privileged, Some(true), "{file}: use the explicit capabilities, not privileged: true");
    let caps = sc.capabilities.clone().unwrap_or_default();
    assert!(
        caps.drop.iter().flatten().any(|d| d == "ALL"),
        "{file}: drop ALL capabilities, then add back the ones the agent needs"
    );
    let added: BTreeSet<&str> =
        caps.add.iter().flatten().map(|a| a.strip_prefix("CAP_").unwrap_or(a)).collect();
    let expected = BTreeSet::from(["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]);
    assert_eq!(added, expected, "{file}: capabilities added");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{file}: set readOnlyRootFilesystem: true");
    let pod_sc = pod.security_context.unwrap_or_default();
    assert_eq!(
        sc.run_as_user.or(pod_sc.run_as_user),
        Some(0),
        "{file}: added capabilities take effect only for uid 0: set runAsUser: 0"
    );
    let seccomp = sc.seccomp_profile.or(pod_sc.seccomp_profile).map(|p| p.type_);
    assert!(
        matches!(seccomp.as_deref(), Some("Unconfined" | "Localhost")),
        "{file}: seccomp {seccomp:?}: RuntimeDefault profiles may refuse bpf(); choose Unconfined or a Localhost profile"
    );
    let apparmor = sc.app_armor_profile.or(pod_sc.app_armor_profile).map(|p| p.type_);
    assert!(
        matches!(apparmor.as_deref(), Some("Unconfined" | "Localhost")),
        "{file}: AppArmor {apparmor:?}: the runtime default profile denies writes to /sys/fs/bpf"
    );
}

#[test]
fn daemonset_runs_on_every_node_and_updates_one_node_at_a_time() {
    let m = manifests();
    let (file, ds, pod, c) = m.agent();
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "{file}: add a toleration `operator: Exists` with no key and no effect: it tolerates every taint"
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"), "{file}: priorityClassName");
    assert!(pod.termination_grace_period_seconds.is_some(), "{file}: set terminationGracePeriodSeconds");
    let resources = c.resources.unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    for r in ["cpu", "memory"] {
        assert!(requests.contains_key(r), "{file}: no {r} request");
    }
    assert!(
        resources.limits.unwrap_or_default().contains_key("memory"),
        "{file}: set a memory limit (the agent's maps are charged to it)"
    );
    let strategy = ds.spec.and_then(|s| s.update_strategy).unwrap_or_default();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "{file}: updateStrategy.type");
    let rolling = strategy.rolling_update.unwrap_or_default();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)), "{file}: rollingUpdate.maxUnavailable");
    assert_eq!(
        rolling.max_surge,
        Some(IntOrString::Int(0)),
        "{file}: rollingUpdate.maxSurge must be 0: two agents on a node would both write its pinned maps"
    );
}

#[test]
fn image_and_dockerfile_agree_with_the_container() {
    let m = manifests();
    let (file, _, _, c) = m.agent();
    let image = c.image.clone().unwrap_or_else(|| panic!("{file}: no image"));
    let (_, tag, digest) = split_image(&image);
    assert!(
        digest.is_some() || tag == Some(env!("CARGO_PKG_VERSION")),
        "{file}: image {image:?}: tag it with the workspace version {} (images: in deploy/kustomization.yaml) or pin a digest",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        c.args.as_deref().and_then(<[String]>::first).map(String::as_str),
        Some("run"),
        "{file}: the agent's arguments start with the `run` subcommand"
    );

    let dockerfile = deploy_dir().join("Dockerfile");
    let text = fs::read_to_string(&dockerfile).expect("reading deploy/Dockerfile");
    let entrypoint = text
        .lines()
        .filter_map(|l| l.strip_prefix("ENTRYPOINT "))
        .next_back()
        .expect("deploy/Dockerfile: no ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint)
        .expect("deploy/Dockerfile: ENTRYPOINT in exec form, so arguments reach the agent unchanged");
    assert!(
        entrypoint.len() == 1 && Path::new(&entrypoint[0]).ends_with("egress-agent"),
        "deploy/Dockerfile: ENTRYPOINT {entrypoint:?} should be the egress-agent binary alone"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("COPY --from=") && l.trim_end().ends_with(&format!(" {}", entrypoint[0]))),
        "deploy/Dockerfile: nothing is copied to the ENTRYPOINT path {}",
        entrypoint[0]
    );
    assert!(
        text.contains("--package egress-agent"),
        "deploy/Dockerfile: does not build the egress-agent package"
    );
}

#[test]
fn own_namespace_admits_the_agent_and_is_never_enforced() {
    let m = manifests();
    let (file, ns) = m.one::<Namespace>();
    let labels = ns.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("pod-security.kubernetes.io/enforce").map(String::as_str),
        Some("privileged"),
        "{file}: the agent's host mounts, capabilities and unconfined seccomp need Pod Security level \
         `privileged`; without the label the cluster's default level applies"
    );
    let mode = labels.get("egressfw.io/mode").map(String::as_str);
    assert!(
        mode.is_none_or(|m| m == "off"),
        "{file}: egressfw.io/mode={mode:?} on egressfw's own namespace would cut the agent off the API server"
    );
}
