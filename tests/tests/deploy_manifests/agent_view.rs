//! What the agent reads: flags win over environment variables (clap), defaults last.

#[allow(clippy::wildcard_imports)]
use super::*;

#[derive(Debug, PartialEq)]
pub(crate) enum Setting {
    Value(String),
    FieldRef(String),
}

pub(crate) fn setting(file: &str, c: &Container, flag: &str, env: &str) -> Option<Setting> {
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

pub(crate) fn value_or(file: &str, c: &Container, flag: &str, env: &str, default: &str) -> String {
    match setting(file, c, flag, env) {
        None => default.to_owned(),
        Some(Setting::Value(v)) => v,
        Some(other) => panic!("{file}: --{flag}/{env} should be a plain value, is {other:?}"),
    }
}

/// The volume mount that holds `path` in the container (the longest mount path containing it).
pub(crate) fn mount_holding<'a>(c: &'a Container, path: &Path) -> Option<&'a VolumeMount> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
}

/// The host directory mounted exactly at `path`, with its mount; it must exist on the node.
pub(crate) fn host_dir_at<'a>(
    file: &str,
    pod: &PodSpec,
    c: &'a Container,
    path: &str,
) -> (String, &'a VolumeMount) {
    host_dir_of_type(file, pod, c, path, &["Directory"])
}

/// Like `host_dir_at`, for a hostPath of one of `types` (DirectoryOrCreate where the node may
/// not have the directory yet).
pub(crate) fn host_dir_of_type<'a>(
    file: &str,
    pod: &PodSpec,
    c: &'a Container,
    path: &str,
    types: &[&str],
) -> (String, &'a VolumeMount) {
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
    assert!(
        host.type_.as_deref().is_some_and(|t| types.contains(&t)),
        "{file}: hostPath {} needs type {types:?}, has {:?}",
        host.path,
        host.type_
    );
    (host.path.clone(), m)
}

pub(crate) fn http_port(file: &str, c: &Container) -> u16 {
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
pub(crate) fn probe_target(file: &str, c: &Container, probe: Option<&Probe>, which: &str) -> (String, i32) {
    let get = probe.and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{file}: no httpGet {which}"));
    assert!(get.scheme.as_deref().is_none_or(|s| s == "HTTP"), "{file}: {which} uses {:?}", get.scheme);
    let port = container_port(c, &get.port).unwrap_or_else(|| {
        panic!("{file}: {which} targets port {:?}, which the container does not declare", get.port)
    });
    (get.path.clone().unwrap_or_default(), port.container_port)
}

/// The probes GET /healthz and /readyz on `port`, and prometheus.io annotations on the pod
/// template (if any) point at that port and /metrics. `what` names the port in messages.
pub(crate) fn assert_health_endpoints(
    file: &str,
    c: &Container,
    annotations: &BTreeMap<String, String>,
    port: i32,
    what: &str,
) {
    for (probe, which, path) in [
        (c.liveness_probe.as_ref(), "livenessProbe", "/healthz"),
        (c.readiness_probe.as_ref(), "readinessProbe", "/readyz"),
    ] {
        let target = probe_target(file, c, probe, which);
        assert_eq!(target, (path.to_owned(), port), "{file}: {which} should GET {path} on {what} {port}");
    }
    if let Some(p) = annotations.get("prometheus.io/port") {
        assert_eq!(*p, port.to_string(), "{file}: prometheus.io/port is not {what}");
    }
    if let Some(p) = annotations.get("prometheus.io/path") {
        assert_eq!(p, "/metrics", "{file}: metrics are served at /metrics");
    }
}

/// The container port a name or number refers to (probes, a Service's targetPort).
pub(crate) fn container_port<'a>(c: &'a Container, port: &IntOrString) -> Option<&'a ContainerPort> {
    let mut ports = c.ports.iter().flatten();
    match port {
        IntOrString::String(name) => ports.find(|p| p.name.as_deref() == Some(name.as_str())),
        IntOrString::Int(n) => ports.find(|p| p.container_port == *n),
    }
}

/// The ConfigMap entry a container sees at `path`: the mount holding it, a configMap volume
/// behind that mount, the key (through the volume's items, if any), and the text under it.
/// Returns the ConfigMap's file, the key and the text.
pub(crate) fn config_map_entry<'a>(
    m: &'a Manifests,
    file: &str,
    pod: &PodSpec,
    c: &Container,
    path: &str,
) -> (&'a str, String, String) {
    let mount = mount_holding(c, Path::new(path))
        .unwrap_or_else(|| panic!("{file}: nothing is mounted at {path}, where the config is read"));
    assert!(
        mount.sub_path.is_none(),
        "{file}: the config is mounted with subPath: the kubelet never updates such a file when the ConfigMap changes"
    );
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name);
    let source = volume
        .and_then(|v| v.config_map.as_ref())
        .unwrap_or_else(|| panic!("{file}: {path} is not on a configMap volume"));
    let within = Path::new(path).strip_prefix(&mount.mount_path).unwrap().to_string_lossy().into_owned();
    let key = match &source.items {
        Some(items) => items.iter().find(|i| i.path == within).map(|i| i.key.clone()),
        None => Some(within.clone()),
    }
    .unwrap_or_else(|| panic!("{file}: the configMap volume's items do not provide {within}"));
    let namespace = m.namespace.as_str();
    let (cm_file, cm) = m
        .all::<ConfigMap>()
        .into_iter()
        .find(|(_, cm)| {
            cm.metadata.name.as_deref() == Some(source.name.as_str())
                && cm.metadata.namespace.as_deref() == Some(namespace)
        })
        .unwrap_or_else(|| panic!("{file}: ConfigMap {namespace}/{} is not in deploy/", source.name));
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(&key))
        .unwrap_or_else(|| panic!("{cm_file}: no key {key:?}, which {file} reads as {path}"))
        .clone();
    (cm_file, key, text)
}

pub(crate) fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
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

/// The node agent's configuration as its DaemonSet reads it, parsed, and the file it is in.
pub(crate) fn agent_config(m: &Manifests) -> (&str, egress_agent::k8s::config::AgentConfig) {
    let (agent_file, _, pod, c) = m.agent();
    let path = value_or(agent_file, &c, "config", "EGRESSFW_CONFIG", DEFAULT_CONFIG_PATH);
    let (cm_file, key, text) = config_map_entry(m, agent_file, &pod, &c, &path);
    let config = egress_agent::k8s::config::parse(&text)
        .unwrap_or_else(|e| panic!("{cm_file}: {key} is not a valid agent config: {e:?}"));
    (cm_file, config)
}
