//! Rendering: the kustomize subset the manifests use, and the kinds they may hold.

#[allow(clippy::wildcard_imports)]
use super::*;

/// What a kustomization may say; anything else fails rather than being silently ignored.
pub(crate) const KUSTOMIZATION_FIELDS: &[&str] =
    &["apiVersion", "kind", "namespace", "labels", "resources", "patches", "images"];
/// Lists that a strategic merge patch merges element by element, by a key (Kubernetes'
/// `patchMergeKey`), rather than replacing them. Any other list is replaced.
const MERGED_LISTS: &[(&str, &str)] = &[
    ("containers", "name"),
    ("initContainers", "name"),
    ("volumes", "name"),
    ("volumeMounts", "mountPath"),
    ("env", "name"),
    ("imagePullSecrets", "name"),
    ("ports", "containerPort"),
];
/// The examples under deploy/examples/, each a kustomization of its own (an overlay of the base).
pub(crate) const EXAMPLES_DIR: &str = "examples";
/// Kinds whose pod template kustomize's `labels.includeTemplates` and `images` reach.
pub(crate) const WORKLOAD_KINDS: &[&str] = &["DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"];

/// One rendered object and the file it came from (repository-relative, for messages).
pub(crate) struct Object {
    pub(crate) file: String,
    pub(crate) value: Value,
}

pub(crate) struct Manifests {
    /// `namespace:` of the top-level kustomization.
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

/// The kustomization in `dir` (under deploy/), rendered.
pub(crate) fn rendering(dir: &Path) -> Manifests {
    let root = deploy_dir();
    let mut files = BTreeSet::new();
    let (namespace, objects) = render(&root, dir, &mut files).unwrap_or_else(|e| panic!("{e:#}"));
    let namespace = namespace.unwrap_or_else(|| {
        panic!("{}: set `namespace:`, every object belongs in one", shown(&dir.join("kustomization.yaml")))
    });
    Manifests { namespace, objects, files }
}

/// The base and every example: what `kubectl apply -k` is pointed at. Each is checked the same
/// way.
pub(crate) fn renderings() -> Vec<Manifests> {
    let mut dirs = vec![deploy_dir()];
    let examples = deploy_dir().join(EXAMPLES_DIR);
    let mut found: Vec<PathBuf> = fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("listing {}: {e}", shown(&examples)))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    dirs.extend(found);
    dirs.iter().map(|d| rendering(d)).collect()
}

/// Renders the kustomization in `dir` (nested kustomizations included), like `kustomize build`.
pub(crate) fn render(
    root: &Path,
    dir: &Path,
    files: &mut BTreeSet<PathBuf>,
) -> Result<(Option<String>, Vec<Object>)> {
    let path = dir.join("kustomization.yaml");
    let file = shown(&path);
    files.insert(path.clone());
    let text = fs::read_to_string(&path).with_context(|| format!("reading {file}"))?;
    check_yaml11_booleans(&file, &text)?;
    let k: Map<String, Value> = serde_yaml::from_str(&text).with_context(|| format!("parsing {file}"))?;
    for key in k.keys() {
        ensure!(
            KUSTOMIZATION_FIELDS.contains(&key.as_str()),
            "{file}: field `{key}` is not rendered by tests/tests/deploy_manifests/render.rs; teach the renderer \
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
    for entry in k.get("patches").and_then(Value::as_array).into_iter().flatten() {
        apply_patch(root, dir, &file, entry, &mut objects, files)?;
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

/// A strategic-merge patch from a file (`patches: [{path: ...}]`), applied to the object of the
/// same kind and name: maps merge, scalars are replaced, the lists in [`MERGED_LISTS`] merge by
/// their key and other lists are replaced, as kustomize does. `$patch` directives are refused.
fn apply_patch(
    root: &Path,
    dir: &Path,
    file: &str,
    entry: &Value,
    objects: &mut [Object],
    files: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let entry = entry.as_object().with_context(|| format!("{file}: patches entries are maps"))?;
    ensure!(
        entry.keys().all(|k| k == "path"),
        "{file}: only `patches: [{{path: ...}}]` (strategic merge from a file) is rendered here, not {:?}",
        entry.keys().collect::<Vec<_>>()
    );
    let rel =
        entry.get("path").and_then(Value::as_str).with_context(|| format!("{file}: patch without path"))?;
    let path = normalize(&dir.join(rel));
    ensure!(path.starts_with(root), "{file}: patch {rel:?} is outside {}", shown(root));
    ensure!(files.insert(path.clone()), "{file}: {rel:?} is listed twice");
    let patches = read_documents(&path)?;
    ensure!(patches.len() == 1, "{}: a patch file holds one object", shown(&path));
    let patch = &patches[0].value;
    let (kind, name) = (patch["kind"].as_str(), patch["metadata"]["name"].as_str());
    ensure!(
        kind.is_some() && name.is_some(),
        "{}: a patch names its target's kind and metadata.name",
        shown(&path)
    );
    check_patch_lists(&shown(&path), patch, "")?;
    let target = objects
        .iter_mut()
        .find(|o| o.value["kind"].as_str() == kind && o.value["metadata"]["name"].as_str() == name)
        .with_context(|| {
            format!("{}: no {} {} to patch", shown(&path), kind.unwrap_or(""), name.unwrap_or(""))
        })?;
    merge(&mut target.value, patch);
    Ok(())
}

fn check_patch_lists(file: &str, v: &Value, at: &str) -> Result<()> {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                ensure!(
                    !k.starts_with("$patch"),
                    "{file}: {at}.{k}: `$patch` directives are not rendered here"
                );
                if let (Some((_, key)), Value::Array(items)) =
                    (MERGED_LISTS.iter().find(|(l, _)| l == k), child)
                {
                    ensure!(
                        items.iter().all(|i| i.get(key).is_some()),
                        "{file}: {at}.{k}: every element needs its merge key `{key}`"
                    );
                }
                check_patch_lists(file, child, &format!("{at}.{k}"))?;
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_patch_lists(file, item, &format!("{at}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                match (MERGED_LISTS.iter().find(|(l, _)| l == k), slot, v) {
                    (Some((_, key)), Value::Array(have), Value::Array(add)) => merge_by_key(have, add, key),
                    (_, slot, v) => merge(slot, v),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Elements with the same key merge; the others are appended.
fn merge_by_key(have: &mut Vec<Value>, add: &[Value], key: &str) {
    for item in add {
        match have.iter_mut().find(|h| h.get(key).is_some() && h.get(key) == item.get(key)) {
            Some(existing) => merge(existing, item),
            None => have.push(item.clone()),
        }
    }
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

pub(crate) fn read_documents(path: &Path) -> Result<Vec<Object>> {
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

pub(crate) fn apply_labels(file: &str, labels: &Value, objects: &mut [Object]) -> Result<()> {
    for entry in labels.as_array().with_context(|| format!("{file}: labels is a list"))? {
        let entry = entry.as_object().with_context(|| format!("{file}: labels entries are maps"))?;
        for key in entry.keys() {
            ensure!(
                ["pairs", "includeSelectors", "includeTemplates"].contains(&key.as_str()),
                "{file}: labels field `{key}` is not rendered by tests/tests/deploy_manifests/render.rs"
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

pub(crate) fn set_labels(metadata: &mut Value, pairs: &Map<String, Value>) {
    for (k, v) in pairs {
        metadata["labels"][k] = v.clone();
    }
}

pub(crate) fn apply_namespace(namespace: &str, objects: &mut [Object]) -> Result<()> {
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

pub(crate) fn apply_images(file: &str, images: &Value, objects: &mut [Object]) -> Result<()> {
    for entry in images.as_array().with_context(|| format!("{file}: images is a list"))? {
        let entry: BTreeMap<String, String> = serde_json::from_value(entry.clone())
            .with_context(|| format!("{file}: images entries map names to strings"))?;
        for key in entry.keys() {
            ensure!(
                ["name", "newName", "newTag", "digest"].contains(&key.as_str()),
                "{file}: images field `{key}` is not rendered by tests/tests/deploy_manifests/render.rs"
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
