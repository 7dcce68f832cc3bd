//! The Kubernetes manifests under deploy/, rendered the way `kubectl apply -k deploy/` renders
//! them and checked against each other and against the agent: its flags, environment variables
//! and defaults, its configuration parser, the host paths it works in and the API access it needs.
//! The egress gateway's manifests are checked the same way (gateway.rs).
//!
//! Rendered by the real kustomize (`kustomize build`, v5.8.1, built from its Go module by
//! `cargo xtask test`; the engine of `kubectl kustomize`): deploy/ and every example under
//! deploy/examples/. Needs no cluster, no root and no kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use egress_agent::{
    cni::{
        install::{DEFAULT_BIN_DIR, DEFAULT_CONF_DIR},
        state::DEFAULT_STATE_DIR,
    },
    gateway::config::{DEFAULT_CONFIG_PATH as GATEWAY_DEFAULT_CONFIG_PATH, GatewayConfig},
    http::DEFAULT_HTTP_ADDR,
    k8s::config::DEFAULT_CONFIG_PATH,
    kernel::bpffs::DEFAULT_PIN_DIR,
};
use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope, Resource,
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, ContainerPort, Namespace, PodSpec, Probe, Secret, Service, ServiceAccount,
            ServicePort, VolumeMount,
        },
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

/// Every host directory the agent may see, and why: pins must outlive the pod (bpffs), and
/// cgroup ids and levels are those of the host's hierarchy.
const HOST_BPFFS: &str = "/sys/fs/bpf";
const HOST_CGROUP: &str = "/sys/fs/cgroup";
/// The CNI plugin's places on the node: the runtime's bin and configuration directories.
const HOST_CNI_BIN: &str = "/opt/cni/bin";
const HOST_CNI_CONF: &str = "/etc/cni/net.d";
const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "egressfw");

mod agent_view;
mod gateway;
mod gateway_view;
mod policy_example;
mod rbac;
mod render;

use agent_view::*;
use gateway_view::*;
use rbac::*;
use render::*;

#[test]
fn kustomization_reaches_every_manifest_file() {
    let base = manifests();
    let examples = deploy_dir().join(EXAMPLES_DIR);
    assert!(
        !base.files.iter().any(|f| f.starts_with(&examples)),
        "deploy/kustomization.yaml reaches into deploy/{EXAMPLES_DIR}/: the examples are applied on their own"
    );
    let monitoring = deploy_dir().join("monitoring");
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                // deploy/monitoring/ is applied on its own; its Prometheus files (rules and their
                // unit test) are no Kubernetes objects.
                if path.starts_with(&monitoring) {
                    let text = fs::read_to_string(&path).unwrap();
                    let object = text.lines().any(|l| l.starts_with("kind: "));
                    if object {
                        assert!(
                            rendering(&monitoring).files.contains(&path),
                            "{} is not reached from deploy/monitoring/kustomization.yaml",
                            shown(&path)
                        );
                    }
                    continue;
                }
                // An example's files are reached from its own kustomization, the rest from the base.
                let example = path.strip_prefix(&examples).ok().and_then(|rel| rel.components().next());
                let (reached, from) = match example {
                    Some(name) => {
                        let dir = examples.join(name);
                        let files = if is_policy_example(&dir) {
                            policy_rendering(&dir).1
                        } else {
                            rendering(&dir).files
                        };
                        (files, shown(&dir.join("kustomization.yaml")))
                    }
                    None => (base.files.clone(), "deploy/kustomization.yaml".to_owned()),
                };
                assert!(
                    reached.contains(&path),
                    "{} is not reached from {from}: `kubectl apply -k` would skip it",
                    shown(&path)
                );
            }
        }
    }
}

#[test]
fn every_object_is_a_kubernetes_object_with_standard_labels() {
    for m in renderings() {
        assert!(!m.objects.is_empty(), "deploy/kustomization.yaml renders nothing");
        let mut names = BTreeSet::new();
        for o in &m.objects {
            let kind = kind_of(o).unwrap_or_else(|e| panic!("{e:#}"));
            let typed = (kind.round_trip)(&o.value)
                .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", o.file, kind.kind));
            if let Some(at) = lost_in_round_trip(&o.value, &typed, kind.kind) {
                panic!("{}: {at} is not part of the Kubernetes API (misspelt or misplaced?)", o.file);
            }
            let name = o.value["metadata"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no metadata.name", o.file));
            // kustomize v5.8.1 knows the scope of the kinds in its built-in schema only; it puts
            // ValidatingAdmissionPolicy (and its binding) in the namespace too, which the API
            // server clears from a cluster-scoped object. Anything else is a mistake.
            let mut namespace = o.value["metadata"]["namespace"].as_str();
            if kind.cluster_scoped && namespace == Some(m.namespace.as_str()) {
                namespace = None;
            }
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
}

#[test]
fn daemonset_selector_matches_its_pods_and_only_them() {
    for m in renderings() {
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
        // Neither the DaemonSet nor the gateway's Deployment may adopt the other's pods.
        for (other_file, d) in m.all::<Deployment>() {
            let other =
                d.spec.as_ref().and_then(|s| s.template.metadata.as_ref()).and_then(|md| md.labels.clone());
            assert!(
                !selects(&spec.selector, &other.unwrap_or_default()),
                "{file}: the DaemonSet's selector also matches the pods of {other_file}"
            );
        }
    }
}

#[test]
fn probes_and_metrics_use_the_port_the_agent_listens_on() {
    for m in renderings() {
        let (file, ds, _, c) = m.agent();
        let port = i32::from(http_port(file, &c));
        let annotations =
            ds.spec.and_then(|s| s.template.metadata).and_then(|md| md.annotations).unwrap_or_default();
        assert_health_endpoints(file, &c, &annotations, port, "the agent's HTTP port");
    }
}

#[test]
fn config_map_is_a_valid_agent_config_at_the_config_path() {
    for m in renderings() {
        let (cm_file, config) = agent_config(&m);
        assert!(
            config.gateways.contains_key(&config.default_gateway),
            "{cm_file}: the default gateway {:?} is not configured",
            config.default_gateway
        );
    }
}

#[test]
fn node_name_comes_from_the_downward_api() {
    for m in renderings() {
        let (file, _, _, c) = m.agent();
        assert_eq!(
            setting(file, &c, "node-name", "NODE_NAME"),
            Some(Setting::FieldRef("spec.nodeName".into())),
            "{file}: the agent's node name (env NODE_NAME) must come from fieldRef spec.nodeName"
        );
    }
}

#[test]
fn cgroup_root_and_pin_dir_are_the_hosts() {
    for m in renderings() {
        let (file, _, pod, c) = m.agent();

        let Some(Setting::Value(cgroup_root)) = setting(file, &c, "cgroup-root", "EGRESSFW_CGROUP_ROOT")
        else {
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
        assert_eq!(
            host,
            HOST_BPFFS,
            "{file}: the pin dir's parent {} is not the host's bpffs",
            parent.display()
        );
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
                    [HOST_BPFFS, HOST_CGROUP, HOST_CNI_BIN, HOST_CNI_CONF, DEFAULT_STATE_DIR]
                        .contains(&h.path.as_str()),
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
}

#[test]
fn the_cni_plugin_is_installed_on_the_node_and_shares_the_agents_directories() {
    for m in renderings() {
        let (file, ds, pod, agent) = m.agent();
        let _ = ds;
        let init = pod
            .init_containers
            .iter()
            .flatten()
            .find(|c| {
                c.args.as_deref().unwrap_or_default().first().map(String::as_str) == Some("cni-install")
            })
            .unwrap_or_else(|| {
                panic!("{file}: an init container must run `cni-install` (the tc layer's pod-start gate)")
            });
        assert_eq!(init.image, agent.image, "{file}: the plugin is the agent's own binary");
        let bin_dir = value_or(file, init, "bin-dir", "", DEFAULT_BIN_DIR);
        let conf_dir = value_or(file, init, "conf-dir", "", DEFAULT_CONF_DIR);
        let types = ["Directory", "DirectoryOrCreate"];
        assert_eq!(host_dir_of_type(file, &pod, init, &bin_dir, &types).0, HOST_CNI_BIN, "{file}: --bin-dir");
        assert_eq!(
            host_dir_of_type(file, &pod, init, &conf_dir, &types).0,
            HOST_CNI_CONF,
            "{file}: --conf-dir"
        );

        // The plugin runs on the node and finds the pins and the shared state at the paths written
        // into the conflist (the defaults of cni-install): the agent must use the same paths on the
        // node.
        let state_default = value_or(file, init, "state-dir", "EGRESSFW_CNI_STATE_DIR", DEFAULT_STATE_DIR);
        let state = value_or(file, &agent, "cni-state-dir", "EGRESSFW_CNI_STATE_DIR", DEFAULT_STATE_DIR);
        assert_eq!(state, state_default, "{file}: the agent and the plugin share one state directory");
        let (host, mount) = host_dir_of_type(file, &pod, &agent, &state, &["DirectoryOrCreate"]);
        assert_eq!(host, state, "{file}: the state directory is mounted at its own path on the node");
        assert_ne!(mount.read_only, Some(true), "{file}: the agent writes the namespaces' modes there");
        let pin_dir = value_or(file, &agent, "pin-dir", "EGRESSFW_PIN_DIR", DEFAULT_PIN_DIR);
        let node_pin_dir = value_or(file, init, "node-pin-dir", "", DEFAULT_PIN_DIR);
        assert_eq!(pin_dir, node_pin_dir, "{file}: the plugin looks for the agent's pins at {node_pin_dir}");

        // The agent keeps the entry in the conflist the runtime reads.
        let Some(Setting::Value(conf)) = setting(file, &agent, "cni-conf-dir", "EGRESSFW_CNI_CONF_DIR")
        else {
            panic!(
                "{file}: set EGRESSFW_CNI_CONF_DIR so the agent puts the plugin back when a network plugin rewrites its conflist"
            )
        };
        assert_eq!(
            host_dir_of_type(file, &pod, &agent, &conf, &types).0,
            HOST_CNI_CONF,
            "{file}: EGRESSFW_CNI_CONF_DIR"
        );
    }
}

#[test]
fn service_account_binding_and_role_agree() {
    for m in renderings() {
        let (file, ds, pod, _) = m.agent();
        bound_cluster_role(&m, file, "the agent", ds.metadata.namespace.as_deref().unwrap(), &pod);
    }
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_uses() {
    let watch = ["get", "list", "watch"];
    let record = ["create", "patch"];
    let expected: BTreeSet<Grant> = [("", "namespaces"), ("", "pods"), ("", "services")]
        .into_iter()
        .chain([("discovery.k8s.io", "endpointslices")])
        .flat_map(|(g, r)| watch.map(|v| (g, r, v)))
        .chain(
            [("", "events"), ("events.k8s.io", "events")]
                .into_iter()
                .flat_map(|(g, r)| record.map(|v| (g, r, v))),
        )
        .map(|(g, r, v)| (g.to_owned(), r.to_owned(), v.to_owned()))
        .collect();

    let m = manifests();
    let (ds_file, ds, pod, _) = m.agent();
    let (file, role) =
        bound_cluster_role(&m, ds_file, "the agent", ds.metadata.namespace.as_deref().unwrap(), &pod);
    let granted = grants(file, &role);
    let extra: Vec<_> = granted.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(extra.is_empty(), "{file}: grants (apiGroup, resource, verb) the agent does not use: {extra:?}");
    assert!(missing.is_empty(), "{file}: lacks (apiGroup, resource, verb) the agent needs: {missing:?}");
}

#[test]
fn privileges_are_explicit_capabilities_not_privileged_mode() {
    for m in renderings() {
        let (file, _, pod, c) = m.agent();
        for (what, on) in [("hostPID", pod.host_pid), ("hostIPC", pod.host_ipc)] {
            assert_ne!(on, Some(true), "{file}: {what} is not needed by the agent");
        }
        assert_eq!(
            pod.host_network,
            Some(true),
            "{file}: the agent needs the node's network namespace: the pods' veths and the routes to them are there"
        );
        assert_eq!(
            pod.dns_policy.as_deref(),
            Some("ClusterFirstWithHostNet"),
            "{file}: with hostNetwork, dnsPolicy ClusterFirstWithHostNet keeps cluster DNS"
        );
        let sc =
            c.security_context.unwrap_or_else(|| panic!("{file}: the container needs a securityContext"));
        assert_ne!(sc.privileged, Some(true), "{file}: use the explicit capabilities, not privileged: true");
        let caps = sc.capabilities.clone().unwrap_or_default();
        assert!(
            caps.drop.iter().flatten().any(|d| d == "ALL"),
            "{file}: drop ALL capabilities, then add back the ones the agent needs"
        );
        let added: BTreeSet<&str> =
            caps.add.iter().flatten().map(|a| a.strip_prefix("CAP_").unwrap_or(a)).collect();
        let expected = BTreeSet::from(["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"]);
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
}

#[test]
fn daemonset_runs_on_every_node_and_updates_one_node_at_a_time() {
    for m in renderings() {
        let (file, ds, pod, c) = m.agent();
        assert!(
            pod.tolerations
                .iter()
                .flatten()
                .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
            "{file}: add a toleration `operator: Exists` with no key and no effect: it tolerates every taint"
        );
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical"),
            "{file}: priorityClassName"
        );
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
        assert_eq!(
            rolling.max_unavailable,
            Some(IntOrString::Int(1)),
            "{file}: rollingUpdate.maxUnavailable"
        );
        assert_eq!(
            rolling.max_surge,
            Some(IntOrString::Int(0)),
            "{file}: rollingUpdate.maxSurge must be 0: two agents on a node would both write its pinned maps"
        );
    }
}

#[test]
fn image_and_dockerfile_agree_with_the_container() {
    for m in renderings() {
        let (file, _, _, c) = m.agent();
        let image = c.image.clone().unwrap_or_else(|| panic!("{file}: no image"));
        let (_, tag, digest) = split_image(&image);
        assert!(
            digest.is_some() || tag == Some(env!("CARGO_PKG_VERSION")),
            "{file}: image {image:?}: tag it with the workspace version {} (images: in deploy/base/kustomization.yaml) or pin a digest",
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
                .any(|l| l.starts_with("COPY --from=")
                    && l.trim_end().ends_with(&format!(" {}", entrypoint[0]))),
            "deploy/Dockerfile: nothing is copied to the ENTRYPOINT path {}",
            entrypoint[0]
        );
        assert!(
            text.contains("--package egress-agent"),
            "deploy/Dockerfile: does not build the egress-agent package"
        );
    }
}

#[test]
fn own_namespace_admits_the_agent_and_is_never_enforced() {
    for m in renderings() {
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
}

/// Every shipped admission policy is bound once. The checks on policy objects only warn and
/// never block an edit when they cannot be evaluated: what they point at can change after the
/// object exists. (What they say, the real API server shows in k8s_policy_crds.)
#[test]
fn every_admission_policy_is_bound_and_the_policy_checks_only_warn() {
    let m = manifests();
    let bindings = m.all::<ValidatingAdmissionPolicyBinding>();
    for (file, policy) in m.all::<ValidatingAdmissionPolicy>() {
        let name = policy.metadata.name.clone().unwrap_or_default();
        let bound: Vec<_> = bindings
            .iter()
            .filter(|(_, b)| b.spec.as_ref().is_some_and(|s| s.policy_name.as_deref() == Some(name.as_str())))
            .collect();
        assert_eq!(bound.len(), 1, "{file}: {name} is bound exactly once");
        let spec = policy.spec.as_ref().expect("a spec");
        let rules =
            spec.match_constraints.as_ref().and_then(|c| c.resource_rules.clone()).unwrap_or_default();
        let on_policies =
            rules.iter().any(|r| r.api_groups.as_deref() == Some(&["egressfw.io".to_string()][..]));
        if on_policies {
            assert_eq!(spec.failure_policy.as_deref(), Some("Ignore"), "{file}: {name} never blocks an edit");
            let actions = bound[0].1.spec.as_ref().and_then(|s| s.validation_actions.clone());
            assert_eq!(actions, Some(vec!["Warn".to_string()]), "{file}: {name} warns only");
        }
    }
    for kind in ["egresspolicies", "clusteregresspolicies"] {
        assert!(
            m.all::<ValidatingAdmissionPolicy>().iter().any(|(_, p)| {
                let rules =
                    p.spec.as_ref().and_then(|s| s.match_constraints.clone()).and_then(|c| c.resource_rules);
                rules
                    .unwrap_or_default()
                    .iter()
                    .any(|r| r.resources.as_deref() == Some(&[kind.to_string()][..]))
            }),
            "no admission check on {kind}"
        );
    }
}

/// The namespace labels decide who is enforced and through which gateway; the shipped
/// ValidatingAdmissionPolicy keeps them in the platform team's hands. Checked here: it is bound
/// and denies, it guards the prefix of every label the agent reads, and the permission its
/// authorizer check asks for is the one the shipped ClusterRole grants. (That the API server
/// enforces it is for a real API server to show.)
#[test]
fn namespace_labels_are_guarded_by_the_shipped_admission_policy() {
    use egress_agent::k8s::desired::{LABEL_GATEWAY, LABEL_MODE, LABEL_STEERING};
    const PREFIX: &str = "egressfw.io/";
    let m = manifests();
    let (file, policy) = m.named::<ValidatingAdmissionPolicy>("egressfw-namespace-labels");
    let spec = policy.spec.as_ref().expect("a spec");
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"), "{file}: fails closed");
    let rules = spec.match_constraints.as_ref().and_then(|c| c.resource_rules.clone()).unwrap_or_default();
    assert!(
        rules.iter().any(|r| r.resources.as_deref() == Some(&["namespaces".to_string()][..])
            && r.operations
                .as_deref()
                .is_some_and(|o| o.contains(&"CREATE".into()) && o.contains(&"UPDATE".into()))),
        "{file}: matches namespace CREATE and UPDATE: {rules:?}"
    );
    for label in [LABEL_MODE, LABEL_GATEWAY, LABEL_STEERING] {
        assert!(
            label.starts_with(PREFIX),
            "the agent reads {label}, which the policy's prefix {PREFIX} does not guard"
        );
    }
    let validations = spec.validations.as_deref().unwrap_or_default();
    assert!(
        validations.len() == 2
            && validations.iter().all(|v| v.expression.contains(&format!("startsWith('{PREFIX}')"))),
        "{file}: setting, changing and removing {PREFIX} labels are checked"
    );
    let (binding_file, binding) = m.named::<ValidatingAdmissionPolicyBinding>("egressfw-namespace-labels");
    let bspec = binding.spec.as_ref().expect("a spec");
    assert_eq!(bspec.policy_name, policy.metadata.name, "{binding_file}: binds the policy");
    assert_eq!(
        bspec.validation_actions.as_deref(),
        Some(&["Deny".to_string()][..]),
        "{binding_file}: denies"
    );
    let conditions = spec.match_conditions.as_deref().unwrap_or_default();
    let check = &conditions.first().unwrap_or_else(|| panic!("{file}: no authorizer check")).expression;
    let (role_file, role) = m
        .all::<ClusterRole>()
        .into_iter()
        .find(|(_, r)| r.metadata.name.as_deref() == Some("egressfw-namespace-labeller"))
        .expect("the ClusterRole egressfw-namespace-labeller is shipped");
    let granted = grants(role_file, &role);
    let expected: BTreeSet<Grant> =
        [("egressfw.io".to_string(), "namespaces/labels".to_string(), "update".to_string())].into();
    assert_eq!(granted, expected, "{role_file}");
    assert!(
        check.contains("authorizer.group('egressfw.io').resource('namespaces').subresource('labels').check('update').allowed()")
            && check.trim_start().starts_with('!'),
        "{file}: the policy skips exactly those the ClusterRole's permission is granted to: {check}"
    );
}
