//! Rendering: `kustomize build` of deploy/ and its examples (the real tool), and the kinds the
//! manifests may hold.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The examples under deploy/examples/, each a kustomization of its own (an overlay of the base).
pub(crate) const EXAMPLES_DIR: &str = "examples";
/// The kustomize the tests render with: built from its Go module by `cargo xtask test` (which
/// exports its path here), the same engine as `kubectl kustomize`.
const KUSTOMIZE_ENV: &str = "EGRESSFW_KUSTOMIZE";
const KUSTOMIZE_VERSION: &str = "v5.8.1";
/// Where kustomize writes each object's source file when asked to (`buildMetadata`).
const ORIGIN_ANNOTATION: &str = "config.kubernetes.io/origin";

/// One rendered object and the file it came from (repository-relative, for messages).
pub(crate) struct Object {
    pub(crate) file: String,
    pub(crate) value: Value,
}

pub(crate) struct Manifests {
    /// `namespace:` of the top-level kustomization (or of the base it points at).
    pub(crate) namespace: String,
    pub(crate) objects: Vec<Object>,
    /// Every file the kustomization reads, the kustomization files included.
    pub(crate) files: BTreeSet<PathBuf>,
}

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

pub(crate) fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

pub(crate) fn shown(path: &Path) -> String {
    path.strip_prefix(repo_root()).unwrap_or(path).display().to_string()
}

pub(crate) fn manifests() -> Manifests {
    rendering(&deploy_dir())
}

/// The kustomization in `dir` (under deploy/), rendered by `kustomize build`.
pub(crate) fn rendering(dir: &Path) -> Manifests {
    let mut files = BTreeSet::new();
    reached_files(dir, &mut files).unwrap_or_else(|e| panic!("{e:#}"));
    for file in &files {
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", shown(file)));
        check_yaml11_booleans(&shown(file), &text).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let objects = kustomize_build(dir).unwrap_or_else(|e| panic!("{e:#}"));
    let namespace = declared_namespace(dir).unwrap_or_else(|| {
        panic!("{}: set `namespace:`, every object belongs in one", shown(&dir.join("kustomization.yaml")))
    });
    for o in &objects {
        if o.value["kind"].as_str().is_some_and(|k| k.ends_with("RoleBinding")) {
            for s in o.value["subjects"].as_array().into_iter().flatten() {
                assert!(
                    s["kind"] != "ServiceAccount" || s["namespace"] == namespace.as_str(),
                    "{}: ServiceAccount subject {} is not in namespace {namespace}",
                    o.file,
                    s["name"]
                );
            }
        }
    }
    Manifests { namespace, objects, files }
}

/// The base and every example that deploys egressfw: what `kubectl apply -k` is pointed at.
/// Each is checked the same way.
pub(crate) fn renderings() -> Vec<Manifests> {
    let mut dirs = vec![deploy_dir()];
    dirs.extend(examples().into_iter().filter(|d| !is_policy_example(d)));
    dirs.iter().map(|d| rendering(d)).collect()
}

/// Every example's directory, sorted.
pub(crate) fn examples() -> Vec<PathBuf> {
    let examples = deploy_dir().join(EXAMPLES_DIR);
    let mut found: Vec<PathBuf> = fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("listing {}: {e}", shown(&examples)))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    found
}

/// An example of policy resources, applied after deploy/: it builds on no other kustomization
/// (the deployment examples build on the base) and sets no namespace, since its objects live in
/// several (and the ClusterEgressPolicy in none).
pub(crate) fn is_policy_example(dir: &Path) -> bool {
    let k = kustomization(dir).unwrap_or_else(|e| panic!("{e:#}"));
    !string_list(&k, "resources").any(|r| dir.join(r).is_dir())
}

/// A policy example rendered by `kustomize build`, and the files it reaches.
pub(crate) fn policy_rendering(dir: &Path) -> (Vec<Object>, BTreeSet<PathBuf>) {
    let mut files = BTreeSet::new();
    reached_files(dir, &mut files).unwrap_or_else(|e| panic!("{e:#}"));
    let objects = kustomize_build(dir).unwrap_or_else(|e| panic!("{e:#}"));
    (objects, files)
}

/// The kustomize binary; a clear failure when it is not built.
fn kustomize() -> PathBuf {
    if let Some(path) = std::env::var_os(KUSTOMIZE_ENV) {
        return path.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let cached = Path::new(&home).join(format!(".cache/egressfw/kustomize-{KUSTOMIZE_VERSION}/kustomize"));
    assert!(
        cached.is_file(),
        "no kustomize at {} and {KUSTOMIZE_ENV} is not set: `cargo xtask test` builds it (go install \
         sigs.k8s.io/kustomize/kustomize/v5@{KUSTOMIZE_VERSION}), or point {KUSTOMIZE_ENV} at one",
        cached.display()
    );
    cached
}

/// `kustomize build` of `dir`, through a wrapper kustomization that asks kustomize to note each
/// object's source file (`buildMetadata: [originAnnotations]`); the note is read into
/// `Object::file` and taken off again, so the objects are what `kubectl apply -k dir` applies.
fn kustomize_build(dir: &Path) -> Result<Vec<Object>> {
    // Tests run in parallel, several on the same directory: a wrapper of its own for each call.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let wrapper =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kustomize-{}-{call}", std::process::id()));
    fs::create_dir_all(&wrapper).with_context(|| format!("creating {}", wrapper.display()))?;
    let relative = relative_path(&wrapper, dir);
    fs::write(
        wrapper.join("kustomization.yaml"),
        format!("resources:\n  - {}\nbuildMetadata: [originAnnotations]\n", relative.display()),
    )?;
    let out = std::process::Command::new(kustomize())
        .args(["build", "--load-restrictor", "LoadRestrictionsNone"])
        .arg(&wrapper)
        .output()
        .context("running kustomize")?;
    let _ = fs::remove_dir_all(&wrapper);
    ensure!(
        out.status.success(),
        "kustomize build {} failed: {}",
        shown(dir),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout).context("kustomize's output is UTF-8")?;
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let mut value =
            Value::deserialize(doc).with_context(|| format!("kustomize output, document {}", i + 1))?;
        let annotations = value["metadata"]["annotations"].as_object_mut().context("no origin annotation")?;
        let origin = annotations.remove(ORIGIN_ANNOTATION).context("no origin annotation")?;
        if annotations.is_empty() {
            value["metadata"].as_object_mut().expect("metadata").remove("annotations");
        }
        let path = origin
            .as_str()
            // A generated object (a ConfigMap from files) names the kustomization that made it.
            .and_then(|o| {
                o.lines().find_map(|l| l.strip_prefix("path: ").or_else(|| l.strip_prefix("configuredIn: ")))
            })
            .with_context(|| format!("origin annotation without a path: {origin}"))?;
        objects.push(Object { file: shown(&normalize(&wrapper.join(path))), value });
    }
    Ok(objects)
}

/// `to` relative to `from` (both absolute).
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let (from, to): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out: PathBuf = from[common..].iter().map(|_| Component::ParentDir).collect();
    out.extend(&to[common..]);
    out
}

/// `namespace:` of the kustomization in `dir`, or of the one it builds on when it sets none and
/// has exactly one directory resource (deploy/ itself points at base/).
fn declared_namespace(dir: &Path) -> Option<String> {
    let k = kustomization(dir).ok()?;
    if let Some(ns) = k.get("namespace").and_then(Value::as_str) {
        return Some(ns.to_owned());
    }
    let dirs: Vec<PathBuf> =
        string_list(&k, "resources").map(|r| normalize(&dir.join(r))).filter(|p| p.is_dir()).collect();
    match dirs.as_slice() {
        [only] => declared_namespace(only),
        _ => None,
    }
}

fn kustomization(dir: &Path) -> Result<Map<String, Value>> {
    let path = dir.join("kustomization.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", shown(&path)))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", shown(&path)))
}

fn string_list<'a>(k: &'a Map<String, Value>, field: &str) -> impl Iterator<Item = &'a str> {
    k.get(field).and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
}

/// Every file the kustomization in `dir` names, directly or through the kustomizations it names
/// (resources, patch files), the kustomization files included: which files `kubectl apply -k`
/// reads. kustomize itself fails on a named file that is missing; this finds files on disk that
/// nothing names.
fn reached_files(dir: &Path, files: &mut BTreeSet<PathBuf>) -> Result<()> {
    files.insert(dir.join("kustomization.yaml"));
    let k = kustomization(dir)?;
    let patches = k.get("patches").and_then(Value::as_array).into_iter().flatten();
    let patch_paths = patches.filter_map(|p| p.get("path").and_then(Value::as_str));
    for entry in string_list(&k, "resources").chain(patch_paths) {
        let path = normalize(&dir.join(entry));
        if path.is_dir() {
            reached_files(&path, files)?;
        } else {
            files.insert(path);
        }
    }
    Ok(())
}

pub(crate) fn normalize(path: &Path) -> PathBuf {
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

pub(crate) fn check_yaml11_booleans(file: &str, text: &str) -> Result<()> {
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

/// `registry:5000/a/b:tag@sha256:..` into name, tag and digest.
pub(crate) fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = image.split_once('@').map_or((image, None), |(r, d)| (r, Some(d)));
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..]), digest),
        None => (rest, None, digest),
    }
}

// ---------------------------------------------------------------------------------------------
// The kinds the manifests may hold, with their scope from k8s-openapi itself.

pub(crate) trait Scope {
    const CLUSTER: bool;
}
impl Scope for ClusterResourceScope {
    const CLUSTER: bool = true;
}
impl Scope for NamespaceResourceScope {
    const CLUSTER: bool = false;
}

pub(crate) struct Kind {
    pub(crate) api_version: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) cluster_scoped: bool,
    pub(crate) round_trip: fn(&Value) -> serde_json::Result<Value>,
}

pub(crate) fn kind<K>() -> Kind
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

pub(crate) fn kind_of(o: &Object) -> Result<Kind> {
    let (api_version, k) = (o.value["apiVersion"].as_str(), o.value["kind"].as_str());
    [
        kind::<Namespace>(),
        kind::<ServiceAccount>(),
        kind::<ConfigMap>(),
        kind::<Secret>(),
        kind::<Service>(),
        kind::<ClusterRole>(),
        kind::<ClusterRoleBinding>(),
        kind::<Role>(),
        kind::<RoleBinding>(),
        kind::<DaemonSet>(),
        kind::<Deployment>(),
        kind::<PodDisruptionBudget>(),
        kind::<ValidatingAdmissionPolicy>(),
        kind::<ValidatingAdmissionPolicyBinding>(),
        kind::<CustomResourceDefinition>(),
    ]
    .into_iter()
    .find(|known| Some(known.api_version) == api_version && Some(known.kind) == k)
    .with_context(|| {
        format!(
            "{}: {api_version:?} {k:?} is not a kind tests/tests/deploy_manifests/render.rs knows; add it to kind_of()",
            o.file
        )
    })
}

/// Where `original` has something `typed` (the same object after a trip through the API types)
/// lost: a misspelt or misplaced field, which the API server would drop or refuse.
pub(crate) fn lost_in_round_trip(original: &Value, typed: &Value, at: &str) -> Option<String> {
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
        // The API types hold some numbers as floats (a schema's `maximum`): 65535 is 65535.0.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        _ => Some(format!("{at} ({original} became {typed})")),
    }
}

impl Manifests {
    /// Every object of kind `K`, typed, with its file.
    pub(crate) fn all<K: Resource + DeserializeOwned>(&self) -> Vec<(&str, K)> {
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

    pub(crate) fn one<K: Resource + DeserializeOwned>(&self) -> (&str, K) {
        let mut all = self.all::<K>();
        assert_eq!(all.len(), 1, "expected exactly one {} in deploy/, found {}", K::KIND, all.len());
        all.remove(0)
    }

    /// The object of kind `K` named `name`.
    pub(crate) fn named<K: Resource + DeserializeOwned + kube::ResourceExt>(&self, name: &str) -> (&str, K) {
        self.all::<K>()
            .into_iter()
            .find(|(_, o)| o.meta().name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no {} {name} in deploy/", K::KIND))
    }

    /// The node agent's DaemonSet, its pod spec and its one container.
    pub(crate) fn agent(&self) -> (&str, DaemonSet, PodSpec, Container) {
        let (file, ds) = self.one::<DaemonSet>();
        let pod =
            ds.spec.clone().and_then(|s| s.template.spec).unwrap_or_else(|| panic!("{file}: no pod spec"));
        assert_eq!(pod.containers.len(), 1, "{file}: the agent pod has one container");
        let container = pod.containers[0].clone();
        (file, ds, pod, container)
    }
}
