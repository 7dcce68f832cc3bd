//! The egress gateway's manifests (deploy/base/gateway/), checked against the gateway itself: its
//! subcommand and configuration parser, the ports it listens on, its admin endpoint, its drain,
//! the privileges it does without and the API access it needs; and against the node agent's
//! configuration, which sends enforced pods to it.

#[allow(clippy::wildcard_imports)]
use super::*;

#[test]
fn gateway_config_maps_parse_with_the_gateway_parser() {
    for m in renderings() {
        let key = Path::new(GATEWAY_DEFAULT_CONFIG_PATH).file_name().unwrap().to_string_lossy().into_owned();
        let mut found = 0;
        for (file, cm) in m.all::<ConfigMap>() {
            let Some(text) = cm.data.as_ref().and_then(|d| d.get(&key)) else { continue };
            found += 1;
            let config = egress_agent::gateway::config::parse(text)
                .unwrap_or_else(|e| panic!("{file}: {key} is not a valid gateway config: {e:?}"));
            assert!(
                config.sources.kubernetes,
                "{file}: {key}: set sources.kubernetes: true; in a cluster the clients are pods, known by their IPs"
            );
        }
        assert!(found > 0, "deploy/: no ConfigMap has a {key} key");
    }
}

#[test]
fn gateway_runs_the_gateway_subcommand_on_its_config_map() {
    for m in renderings() {
        for name in m.gateway_names() {
            let (file, _, pod, c) = m.gateway_deployment_named(&name);
            assert_eq!(
                subcommand(file, &c),
                Some("gateway"),
                "{file}: the container's args should run `egress-agent gateway` (args: {:?})",
                c.args
            );
            let path = gateway_config_path(file, &c);
            let (cm_file, key, text) = config_map_entry(&m, file, &pod, &c, &path);
            if let Err(e) = egress_agent::gateway::config::parse(&text) {
                panic!(
                    "{cm_file}: {key}, which {file} reads as {path}, is not a valid gateway config: {e:?}"
                );
            }
            let threads = value_or(file, &c, "threads", "EGRESSFW_GATEWAY_THREADS", "1");
            assert!(
                threads.parse::<usize>().is_ok_and(|n| n > 0),
                "{file}: --threads/EGRESSFW_GATEWAY_THREADS {threads:?} is not a positive number"
            );
        }
    }
}

#[test]
fn gateway_runs_the_agent_image() {
    for m in renderings() {
        for name in m.gateway_names() {
            let (file, _, _, c) = m.gateway_deployment_named(&name);
            let (agent_file, _, _, agent) = m.agent();
            assert!(c.image.is_some(), "{file}: no image");
            assert_eq!(
                c.image, agent.image,
                "{file}: the gateway runs the node agent's image ({agent_file}): one binary, and one images entry in \
                 deploy/base/kustomization.yaml retags both"
            );
        }
    }
}

#[test]
fn every_listener_is_a_container_port_and_a_service_port() {
    for m in renderings() {
        for name in m.gateway_names() {
            let g = m.gateway_named(&name);
            let (file, config_file) = (g.file, g.config_file);
            let (svc_file, svc) = m.gateway_service_named(&name);
            let spec = svc.spec.unwrap_or_else(|| panic!("{svc_file}: no spec"));
            let targets: Vec<(i32, i32)> = spec
                .ports
                .iter()
                .flatten()
                .map(|p| (p.port, target_container_port(svc_file, &g.container, p)))
                .collect();
            let mut listening = BTreeSet::new();
            for (addr, listener) in g.config.listeners.addresses() {
                assert!(
                    !addr.ip().is_loopback(),
                    "{config_file}: the {listener} listener on {addr} cannot be reached from outside the pod"
                );
                let port = i32::from(addr.port());
                listening.insert(port);
                let declared = g.container.ports.iter().flatten().find(|p| p.container_port == port);
                let declared = declared.unwrap_or_else(|| {
                    panic!(
                        "{file}: the {listener} listener's port {port} ({config_file}) is not a containerPort"
                    )
                });
                assert!(
                    declared.protocol.as_deref().is_none_or(|p| p == "TCP"),
                    "{file}: containerPort {port} is {:?}; the gateway's listeners are TCP",
                    declared.protocol
                );
                assert!(
                    targets.iter().any(|(_, t)| *t == port),
                    "{svc_file}: no port of Service {name} sends to the {listener} listener's port {port} ({config_file})"
                );
            }
            for (port, target) in &targets {
                assert!(
                    listening.contains(target),
                    "{svc_file}: Service port {port} sends to container port {target}, where no listener of \
                     {config_file} listens"
                );
            }
            for p in spec.ports.iter().flatten() {
                assert!(
                    p.protocol.as_deref().is_none_or(|p| p == "TCP"),
                    "{svc_file}: Service port {} is {:?}; the gateway's listeners are TCP",
                    p.port,
                    p.protocol
                );
            }

            let selector = spec.selector.unwrap_or_default();
            assert!(
                !selector.is_empty(),
                "{svc_file}: the Service needs a selector (the gateway's pod labels)"
            );
            let labels = g.pod_labels();
            let selects_labels =
                |labels: &BTreeMap<String, String>| selector.iter().all(|(k, v)| labels.get(k) == Some(v));
            assert!(
                selects_labels(&labels),
                "{svc_file}: selector {selector:?} does not select the gateway's pods ({file}, labels {labels:?})"
            );
            let (agent_file, ds, _, _) = m.agent();
            let agent_labels =
                ds.spec.and_then(|s| s.template.metadata).and_then(|md| md.labels).unwrap_or_default();
            assert!(
                !selects_labels(&agent_labels),
                "{svc_file}: selector {selector:?} also selects the agent's pods ({agent_file}): clients would be sent to them"
            );
        }
    }
}

#[test]
fn agent_config_sends_enforced_pods_to_the_gateway_service() {
    for m in renderings() {
        let (cm_file, config) = agent_config(&m);
        let (svc_file, svc) = m.gateway_service();
        let svc_ref = format!("{}/{GATEWAY}", m.namespace);
        let default = &config.default_gateway;
        let gateway = config.gateways.get(default);
        let gateway =
            gateway.unwrap_or_else(|| panic!("{cm_file}: the default gateway {default:?} is not configured"));
        let named: Vec<String> = gateway.services.iter().map(|m| m.service.to_string()).collect();
        assert!(
            named.contains(&svc_ref),
            "{cm_file}: the default gateway {default:?} names Services {named:?}, but the gateway's Service is {svc_ref} ({svc_file})",
        );
        let ports: Vec<u16> = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter_map(|p| u16::try_from(p.port).ok())
            .collect();
        let members =
            config.gateways.iter().flat_map(|(name, gw)| gw.services.iter().map(move |m| (name, m)));
        for (name, gw) in members.filter(|(_, m)| m.service.to_string() == svc_ref) {
            for r in &gw.ports {
                assert!(
                    ports.iter().any(|p| (r.first..=r.last).contains(p)),
                    "{cm_file}: gateways[{name}].ports {}-{} match no port of Service {svc_ref} ({svc_file}: {ports:?})",
                    r.first,
                    r.last
                );
            }
            for p in &ports {
                assert!(
                    gw.ports.is_empty() || gw.ports.iter().any(|r| (r.first..=r.last).contains(p)),
                    "{cm_file}: gateways[{name}].ports leave out port {p} of Service {svc_ref} ({svc_file}): enforced \
                     pods could not reach that listener"
                );
            }
        }
    }
}

#[test]
fn gateway_probes_use_the_admin_endpoint() {
    for m in renderings() {
        for name in m.gateway_names() {
            let g = m.gateway_named(&name);
            let (file, config_file, c) = (g.file, g.config_file, &g.container);
            let admin = g.config.admin.unwrap_or_else(|| {
                panic!("{config_file}: set admin: the probes in {file} need /healthz and /readyz")
            });
            assert!(
                !admin.ip().is_loopback(),
                "{config_file}: admin {admin}: the kubelet's probes and Prometheus come from outside the pod"
            );
            let port = i32::from(admin.port());
            let annotations = g
                .deployment
                .spec
                .and_then(|s| s.template.metadata)
                .and_then(|md| md.annotations)
                .unwrap_or_default();
            assert_health_endpoints(file, c, &annotations, port, &format!("the admin port ({config_file})"));
        }
    }
}

#[test]
fn gateway_is_replicated_and_spread_over_nodes() {
    for m in renderings() {
        for name in m.gateway_names() {
            let (file, d, pod, _) = m.gateway_deployment_named(&name);
            let spec = d.spec.unwrap_or_else(|| panic!("{file}: no spec"));
            let replicas = spec.replicas.unwrap_or(1);
            assert!(
                replicas >= 2,
                "{file}: replicas {replicas}: the gateway is every enforced pod's way out; one replica is one outage away"
            );
            let labels = spec.template.metadata.and_then(|md| md.labels).unwrap_or_default();
            assert!(
                spec.selector.match_labels.as_ref().is_some_and(|l| !l.is_empty()),
                "{file}: the selector needs matchLabels"
            );
            assert!(
                selects(&spec.selector, &labels),
                "{file}: selector {:?} does not match template labels {labels:?}",
                spec.selector
            );
            let (agent_file, ds, _, _) = m.agent();
            let agent_labels =
                ds.spec.and_then(|s| s.template.metadata).and_then(|md| md.labels).unwrap_or_default();
            assert!(
                !selects(&spec.selector, &agent_labels),
                "{file}: the Deployment's selector also matches the agent's pods ({agent_file})"
            );
            let spread = pod
                .topology_spread_constraints
                .iter()
                .flatten()
                .find(|t| t.topology_key == "kubernetes.io/hostname")
                .unwrap_or_else(|| {
                    panic!("{file}: no topologySpreadConstraint over kubernetes.io/hostname: the replicas could share a node")
                });
            assert!(
                spread.label_selector.as_ref().is_some_and(|s| selects(s, &labels)),
                "{file}: the hostname spread constraint's labelSelector does not select the gateway's pods ({labels:?})"
            );
            assert!(
                spread.max_skew < replicas,
                "{file}: maxSkew {} lets all {replicas} replicas share a node",
                spread.max_skew
            );
        }
    }
}

#[test]
fn disruption_budget_keeps_a_gateway_serving() {
    for m in renderings() {
        for name in m.gateway_names() {
            let (file, d, _, _) = m.gateway_deployment_named(&name);
            let spec = d.spec.unwrap_or_else(|| panic!("{file}: no spec"));
            let replicas = spec.replicas.unwrap_or(1);
            let labels = spec.template.metadata.and_then(|md| md.labels).unwrap_or_default();
            let all = m.all::<PodDisruptionBudget>();
            let budgets: Vec<_> = all
                .iter()
                .filter(|(_, b)| {
                    b.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| selects(s, &labels))
                })
                .collect();
            // The eviction API refuses to evict a pod that more than one budget selects.
            assert_eq!(
                budgets.len(),
                1,
                "{file}: expected one PodDisruptionBudget selecting the gateway's pods ({labels:?}), found {:?}",
                budgets.iter().map(|(f, _)| f).collect::<Vec<_>>()
            );
            let (pdb_file, pdb) = budgets[0];
            let spec = pdb.spec.clone().unwrap_or_default();
            let selector = spec.selector.unwrap_or_default();
            assert!(
                selector.match_labels.as_ref().is_some_and(|l| !l.is_empty()),
                "{pdb_file}: the selector needs matchLabels (an empty one selects every pod in the namespace)"
            );
            let (agent_file, ds, _, _) = m.agent();
            let agent_labels =
                ds.spec.and_then(|s| s.template.metadata).and_then(|md| md.labels).unwrap_or_default();
            assert!(
                !selects(&selector, &agent_labels),
                "{pdb_file}: the selector also matches the agent's pods ({agent_file})"
            );
            // Percentages round up, for both fields (as the disruption controller does).
            let scaled = |v: &IntOrString| match v {
                IntOrString::Int(n) => *n,
                IntOrString::String(s) => {
                    let pct: i32 = s
                        .strip_suffix('%')
                        .and_then(|p| p.parse().ok())
                        .unwrap_or_else(|| panic!("{pdb_file}: {s:?} is neither a number nor a percentage"));
                    (replicas * pct + 99) / 100
                }
            };
            let available = match (&spec.min_available, &spec.max_unavailable) {
                (Some(min), None) => scaled(min),
                (None, Some(max)) => replicas - scaled(max),
                _ => panic!("{pdb_file}: set exactly one of minAvailable and maxUnavailable"),
            };
            assert!(
                available >= 1,
                "{pdb_file}: keeps {available} of the {replicas} gateway pods ({file}) during disruptions: enforced pods \
                 would lose their way out"
            );
            assert!(
                available < replicas,
                "{pdb_file}: keeps all {replicas} gateway pods ({file}): no eviction is ever allowed, and node drains hang"
            );
        }
    }
}

#[test]
fn termination_grace_covers_the_prestop_sleep_and_the_drain() {
    for m in renderings() {
        for name in m.gateway_names() {
            let g = m.gateway_named(&name);
            let (file, config_file) = (g.file, g.config_file);
            // The kubelet's default when the field is absent.
            let grace = g.pod.termination_grace_period_seconds.unwrap_or(30);
            let pre_stop = g.container.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).unwrap_or_else(|| {
                panic!(
                    "{file}: no preStop hook: the gateway would stop accepting while kube-proxy still sends it new connections"
                )
            });
            assert!(
                pre_stop.exec.is_none(),
                "{file}: preStop exec: the image is distroless (no shell, no sleep binary); use lifecycle.preStop.sleep"
            );
            let sleep = pre_stop
                .sleep
                .as_ref()
                .unwrap_or_else(|| {
                    panic!("{file}: preStop should be a sleep (lifecycle.preStop.sleep.seconds)")
                })
                .seconds;
            assert!(
                sleep > 0,
                "{file}: preStop sleeps {sleep}s: kube-proxy needs a moment to drop the endpoint"
            );
            let drain = g.config.drain_timeout;
            // After the drain deadline the gateway gives cut connections a second to log.
            let needed = Duration::from_secs(u64::try_from(sleep).unwrap()) + drain + Duration::from_secs(1);
            assert!(
                Duration::from_secs(u64::try_from(grace).unwrap_or(0)) >= needed,
                "{file}: terminationGracePeriodSeconds {grace} does not cover the preStop sleep ({sleep}s), drainTimeout \
                 ({drain:?}, {config_file}) and a second to log: the kubelet would kill the gateway mid-drain"
            );
        }
    }
}

#[test]
fn gateway_runs_without_privileges() {
    for m in renderings() {
        for name in m.gateway_names() {
            let g = m.gateway_named(&name);
            let (file, config_file, pod, c) = (g.file, g.config_file, &g.pod, &g.container);
            for (what, on) in
                [("hostNetwork", pod.host_network), ("hostPID", pod.host_pid), ("hostIPC", pod.host_ipc)]
            {
                assert_ne!(on, Some(true), "{file}: {what} is not needed by the gateway");
            }
            for v in pod.volumes.iter().flatten() {
                assert!(
                    v.host_path.is_none(),
                    "{file}: hostPath volume {:?}: the gateway needs nothing of the host",
                    v.name
                );
            }
            for p in c.ports.iter().flatten() {
                assert!(
                    p.host_port.is_none(),
                    "{file}: hostPort {:?}: clients reach the gateway through its Service",
                    p.host_port
                );
            }
            let (addresses, admin) = (g.config.listeners.addresses(), g.config.admin.map(|a| (a, "admin")));
            for (addr, listener) in addresses.into_iter().chain(admin) {
                assert!(
                    addr.port() >= 1024,
                    "{config_file}: the {listener} listener on {addr}: ports below 1024 need CAP_NET_BIND_SERVICE"
                );
            }

            let sc = c
                .security_context
                .clone()
                .unwrap_or_else(|| panic!("{file}: the container needs a securityContext"));
            let pod_sc = pod.security_context.clone().unwrap_or_default();
            let caps = sc.capabilities.clone().unwrap_or_default();
            assert!(
                caps.add.as_ref().is_none_or(Vec::is_empty),
                "{file}: capabilities added ({:?}): the gateway needs none",
                caps.add
            );
            assert!(caps.drop.iter().flatten().any(|d| d == "ALL"), "{file}: drop ALL capabilities");
            assert_ne!(sc.privileged, Some(true), "{file}: the gateway must not be privileged");
            assert_eq!(
                sc.allow_privilege_escalation,
                Some(false),
                "{file}: set allowPrivilegeEscalation: false (no setuid gains)"
            );
            assert_eq!(
                sc.run_as_non_root.or(pod_sc.run_as_non_root),
                Some(true),
                "{file}: set runAsNonRoot: true"
            );
            let uid = sc.run_as_user.or(pod_sc.run_as_user);
            assert!(
                uid.is_some_and(|u| u != 0),
                "{file}: runAsUser {uid:?}: the image's user is root, so runAsNonRoot alone keeps the container from \
                 starting; set a fixed non-zero runAsUser"
            );
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{file}: set readOnlyRootFilesystem: true");
            let seccomp = sc.seccomp_profile.or(pod_sc.seccomp_profile).map(|p| p.type_);
            assert!(
                matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")),
                "{file}: seccomp {seccomp:?}: the gateway needs no unusual syscalls; use RuntimeDefault"
            );
        }
    }
}

#[test]
fn gateway_may_only_read_pods_namespaces_and_policies_and_write_their_status() {
    // What it watches: pods (sources.kubernetes), namespaces' labels and the policy resources
    // (policyResources), whose status it writes. Each one it needs, and nothing more.
    let needed = [
        ("", "pods"),
        ("", "namespaces"),
        ("egressfw.io", "clusteregresspolicies"),
        ("egressfw.io", "egresspolicies"),
    ];
    for m in renderings() {
        for name in m.gateway_names() {
            let (file, d, pod, _) = m.gateway_deployment_named(&name);
            let namespace = d.metadata.namespace.unwrap();
            let (role_file, role) = bound_cluster_role(&m, file, "the gateway", &namespace, &pod);
            let granted = grants(role_file, &role);
            for (group, resource) in needed {
                for verb in ["list", "watch"] {
                    assert!(
                        granted.contains(&(group.into(), resource.into(), verb.into())),
                        "{role_file}: the gateway needs `{verb}` on {resource} (its cluster-wide watch)"
                    );
                }
            }
            let status = ["clusteregresspolicies/status", "egresspolicies/status"];
            for resource in status {
                assert!(
                    granted.contains(&("egressfw.io".into(), resource.into(), "patch".into())),
                    "{role_file}: the gateway needs `patch` on {resource} (it writes the policies' status)"
                );
            }
            let extra: Vec<_> = granted
                .iter()
                .filter(|(g, r, v)| {
                    let read = needed.contains(&(g.as_str(), r.as_str()))
                        && ["get", "list", "watch"].contains(&v.as_str());
                    let status_write = g == "egressfw.io" && status.contains(&r.as_str()) && v == "patch";
                    !(read || status_write)
                })
                .collect();
            assert!(
                extra.is_empty(),
                "{role_file}: grants the gateway more than reading what it watches and writing its status: {extra:?}"
            );

            let sa_name = pod.service_account_name.clone().unwrap_or_default();
            let (sa_file, sa) = m
                .all::<ServiceAccount>()
                .into_iter()
                .find(|(_, sa)| sa.metadata.name.as_ref() == Some(&sa_name))
                .unwrap();
            let automount = pod.automount_service_account_token.or(sa.automount_service_account_token);
            assert_ne!(
                automount,
                Some(false),
                "{file} / {sa_file}: the service account token is not mounted; the pod watch needs it"
            );
        }
    }
}

#[test]
fn gateway_namespace_is_never_enforced() {
    for m in renderings() {
        for name in m.gateway_names() {
            let (file, d, _, _) = m.gateway_deployment_named(&name);
            let ns = d.metadata.namespace.unwrap();
            let (ns_file, namespace) = m
                .all::<Namespace>()
                .into_iter()
                .find(|(_, n)| n.metadata.name.as_ref() == Some(&ns))
                .unwrap_or_else(|| panic!("{file}: the gateway's namespace {ns} is not in deploy/"));
            let labels = namespace.metadata.labels.unwrap_or_default();
            let mode = labels.get("egressfw.io/mode").map(String::as_str);
            assert!(
                mode.is_none_or(|m| m == "off"),
                "{ns_file}: egressfw.io/mode={mode:?} on the gateway's namespace ({file}): the gateway's own egress must \
                 never be enforced, or it cannot reach the destinations it allows"
            );
        }
    }
}

/// deploy/examples/dedicated-egress-nodes: the gateway runs only on egress nodes, tolerates
/// their taint, one replica per node, and the disruption budget still covers its pods.
#[test]
fn the_dedicated_egress_nodes_example_pins_the_gateway_to_those_nodes() {
    const EGRESS_NODE: &str = "egressfw.io/egress-node";
    let m = rendering(&deploy_dir().join(EXAMPLES_DIR).join("dedicated-egress-nodes"));
    let gw = m.gateway();
    let file = gw.file;
    let selector = gw.pod.node_selector.clone().unwrap_or_default();
    assert_eq!(selector.get(EGRESS_NODE).map(String::as_str), Some("true"), "{file}: {selector:?}");
    assert_eq!(
        selector.get("kubernetes.io/os").map(String::as_str),
        Some("linux"),
        "the base's selector is kept"
    );
    let tolerates = gw.pod.tolerations.iter().flatten().any(|t| {
        t.key.as_deref() == Some(EGRESS_NODE)
            && t.operator.as_deref() == Some("Exists")
            && t.effect.as_deref() == Some("NoSchedule")
    });
    assert!(tolerates, "{file}: the gateway tolerates the egress nodes' taint: {:?}", gw.pod.tolerations);
    let anti = gw
        .pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.clone())
        .unwrap_or_default();
    let labels = gw.pod_labels();
    assert!(
        anti.iter().any(|t| {
            t.topology_key == "kubernetes.io/hostname"
                && t.label_selector.as_ref().is_some_and(|s| selects(s, &labels))
        }),
        "{file}: one replica per node, required: {anti:?}"
    );
    let (pdb_file, pdb) = m.one::<PodDisruptionBudget>();
    let pdb_selector = pdb.spec.and_then(|s| s.selector).unwrap_or_default();
    assert!(selects(&pdb_selector, &labels), "{pdb_file}: the budget selects the pinned gateway pods");
}

/// Every Service a gateway of the agent's configuration names in the rendering's namespace is
/// a gateway of the rendering, and its configured ports are ports of that Service.
#[test]
fn every_gateway_service_the_agent_names_is_rendered_with_those_ports() {
    for m in renderings() {
        let (cm_file, config) = agent_config(&m);
        let gateways = m.gateway_names();
        for (gw, member) in config.gateways.iter().flat_map(|(gw, g)| g.services.iter().map(move |s| (gw, s)))
        {
            if member.service.namespace != m.namespace {
                continue;
            }
            let name = &member.service.name;
            assert!(
                gateways.contains(name),
                "{cm_file}: gateway {gw:?} names Service {}, which is no gateway here",
                member.service
            );
            let (svc_file, svc) = m.gateway_service_named(name);
            let ports: Vec<u16> = svc
                .spec
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect();
            for r in &member.ports {
                assert!(
                    ports.iter().any(|p| (r.first..=r.last).contains(p)),
                    "{cm_file}: gateway {gw:?}: ports {}-{} of {} match no port of {svc_file} ({ports:?})",
                    r.first,
                    r.last,
                    member.service
                );
            }
        }
    }
}

/// deploy/examples/gateway-per-upstream: a group reaches both per-upstream gateways, and each
/// of them is ready only while its upstream answers.
#[test]
fn the_gateway_per_upstream_example_groups_its_gateways_and_follows_their_upstreams() {
    let m = rendering(&deploy_dir().join(EXAMPLES_DIR).join("gateway-per-upstream"));
    let (cm_file, config) = agent_config(&m);
    let group =
        config.gateways.get("partners").unwrap_or_else(|| panic!("{cm_file}: no gateway group `partners`"));
    let mut named: Vec<String> = group.services.iter().map(|s| s.service.name.clone()).collect();
    named.sort();
    let mut own: Vec<String> = m.gateway_names().into_iter().filter(|n| n != GATEWAY).collect();
    own.sort();
    assert_eq!(named, own, "{cm_file}: the group lists exactly the example's gateways");
    for name in own {
        let g = m.gateway_named(&name);
        let readiness = g.config.readiness.as_ref();
        assert!(
            readiness.is_some_and(|r| !r.upstreams.is_empty()),
            "{}: gateway {name} should be ready only while its upstream answers (readiness)",
            g.config_file
        );
    }
}

/// deploy/examples/corporate-proxy: the corporate proxy is a gateway by address for the agent,
/// and the gateway chains to it with credentials that a mounted Secret provides (each file the
/// configuration names is a key of a Secret mounted at that directory).
#[test]
fn the_corporate_proxy_example_mounts_the_credentials_its_gateway_reads() {
    let m = rendering(&deploy_dir().join(EXAMPLES_DIR).join("corporate-proxy"));
    let (cm_file, agent) = agent_config(&m);
    let corporate =
        agent.gateways.get("corporate").unwrap_or_else(|| panic!("{cm_file}: no gateway `corporate`"));
    assert!(
        corporate.services.is_empty() && !corporate.addresses.is_empty(),
        "{cm_file}: `corporate` is by address"
    );

    let g = m.gateway();
    let parent =
        g.config.upstream_proxy.as_ref().unwrap_or_else(|| panic!("{}: no upstreamProxy", g.config_file));
    assert_eq!(
        parent.address.host,
        corporate.addresses[0].address.to_string(),
        "{}: the gateway chains to the same proxy the agent names",
        g.config_file
    );
    let auth = parent.auth.as_ref().unwrap_or_else(|| panic!("{}: no upstreamProxy.auth", g.config_file));
    let secrets = m.all::<Secret>();
    for file in [&auth.username_file, &auth.password_file] {
        let (dir, key) = (file.parent().unwrap(), file.file_name().unwrap().to_string_lossy());
        let mount = g
            .container
            .volume_mounts
            .iter()
            .flatten()
            .find(|vm| Path::new(&vm.mount_path) == dir)
            .unwrap_or_else(|| {
                panic!("{}: nothing is mounted at {} for {}", g.file, dir.display(), file.display())
            });
        let volume =
            g.pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("the mount's volume");
        let secret_name = volume
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.clone())
            .unwrap_or_else(|| panic!("{}: volume {} is not a Secret", g.file, mount.name));
        let (secret_file, secret) = secrets
            .iter()
            .find(|(_, s)| s.metadata.name.as_deref() == Some(secret_name.as_str()))
            .unwrap_or_else(|| panic!("{}: Secret {secret_name} is not in the example", g.file));
        let has_key = secret.string_data.as_ref().is_some_and(|d| d.contains_key(key.as_ref()))
            || secret.data.as_ref().is_some_and(|d| d.contains_key(key.as_ref()));
        assert!(has_key, "{secret_file}: no key {key} for {}", file.display());
    }
}
