use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::*;
use crate::k8s::config;

fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: ns.map(str::to_owned),
        name: Some(name.to_owned()),
        labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
        ..ObjectMeta::default()
    }
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace { metadata: meta(None, name, labels), ..Namespace::default() }
}

fn pod(ns: &str, name: &str, uid: &str, phase: &str) -> Pod {
    let mut m = meta(Some(ns), name, &[]);
    m.uid = Some(uid.to_owned());
    Pod {
        metadata: m,
        spec: Some(PodSpec { node_name: Some("node-a".into()), ..PodSpec::default() }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            qos_class: Some("BestEffort".into()),
            ..PodStatus::default()
        }),
    }
}

fn service(ns: &str, name: &str, ip: &str, ports: &[(&str, i32)]) -> Service {
    Service {
        metadata: meta(Some(ns), name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort { name: Some((*n).into()), port: *p, ..ServicePort::default() })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(ns: &str, svc: &str, ips: &[&str], ports: &[(&str, i32)]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(ns),
            &format!("{svc}-abcde"),
            &[
                ("kubernetes.io/service-name", svc),
                ("endpointslice.kubernetes.io/managed-by", "endpointslice-controller.k8s.io"),
            ],
        ),
        address_type: "IPv4".into(),
        endpoints: ips
            .iter()
            .map(|ip| Endpoint { addresses: vec![(*ip).into()], ..Endpoint::default() })
            .collect(),
        ports: Some(
            ports
                .iter()
                .map(|(n, p)| EndpointPort {
                    name: Some((*n).into()),
                    port: Some(*p),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    }
}

fn cfg() -> AgentConfig {
    config::parse(
        "gateways:\n  - {name: main, service: egress/gw, ports: [3128]}\n  - {name: eu, service: egress/gw-eu, allowedNamespaces: {names: [eu-team]}}\ndefaultGateway: main\n",
    )
    .unwrap()
}

fn port(n: u16) -> PortRange {
    PortRange { first: n, last: n }
}

struct Fixture {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            namespaces: vec![
                namespace("shop", &[(LABEL_MODE, "enforce")]),
                namespace("eu-team", &[(LABEL_MODE, "audit"), (LABEL_GATEWAY, "eu")]),
                namespace("free", &[]),
            ],
            pods: vec![
                pod("shop", "web", "u-web", "Running"),
                pod("eu-team", "api", "u-api", "Pending"),
                pod("free", "batch", "u-batch", "Running"),
                pod("shop", "done", "u-done", "Succeeded"),
            ],
            services: vec![
                service("egress", "gw", "10.96.0.10", &[("proxy", 3128), ("admin", 9000)]),
                service("egress", "gw-eu", "10.96.0.11", &[("proxy", 3128)]),
                service("kube-system", "kube-dns", "10.96.0.53", &[("dns", 53), ("dns-tcp", 53)]),
            ],
            slices: vec![
                slice("egress", "gw", &["10.244.1.5", "10.244.2.6"], &[("proxy", 8080), ("admin", 9000)]),
                slice("egress", "gw-eu", &["10.244.3.7"], &[("proxy", 8080)]),
                slice("kube-system", "kube-dns", &["10.244.0.2"], &[("dns", 53), ("dns-tcp", 53)]),
            ],
        }
    }

    fn policies(&self, config: &AgentConfig) -> BTreeMap<String, PodPolicy> {
        let world = World {
            namespaces: self.namespaces.iter().collect(),
            pods: self.pods.iter().collect(),
            services: self.services.iter().collect(),
            slices: self.slices.iter().collect(),
        };
        pod_policies(&world, config)
    }
}

#[test]
fn labels_choose_mode_and_gateway() {
    let p = Fixture::new().policies(&cfg());
    assert_eq!(p["u-web"].mode, Mode::Enforce);
    assert_eq!(p["u-web"].gateway, "main");
    assert_eq!(p["u-api"].mode, Mode::Audit);
    assert_eq!(p["u-api"].gateway, "eu");
    assert_eq!(p["u-batch"].mode, Mode::Pass);
    assert_eq!(*p["u-batch"].allowed, Allowed::default());
    assert!(!p.contains_key("u-done"), "finished pods hold no policy");
}

/// The gateway label is on the namespace, which its owner may be able to edit: a gateway the
/// agent configuration does not admit the namespace to is not used, the default gateway is.
#[test]
fn a_namespace_that_selects_a_gateway_that_does_not_admit_it_gets_the_default_gateway() {
    let c = config::parse(
        "gateways:\n  - {name: main, service: egress/gw, ports: [3128]}\n  - name: eu\n    service: egress/gw-eu\n    allowedNamespaces: {names: [finance], selector: {matchLabels: {egressfw.io/eu: allowed}}}\ndefaultGateway: main\n",
    )
    .unwrap();
    let mut f = Fixture::new();
    let p = f.policies(&c);
    assert_eq!(p["u-api"].gateway, "main", "eu-team is not admitted to eu");
    assert_eq!(p["u-api"].refused_gateway.as_deref(), Some("eu"));
    assert_eq!(p["u-api"].allowed, p["u-web"].allowed, "it gets exactly the default gateway's rules");
    assert!(
        p["u-api"].problems.iter().any(|m| m.contains("namespace eu-team selects gateway \"eu\"")
            && m.contains("does not admit it")
            && m.contains("default gateway \"main\"")),
        "{:?}",
        p["u-api"].problems
    );
    assert_eq!(p["u-web"].refused_gateway, None, "no label: the default gateway, nothing refused");

    // Admitted by a label (one that deploy/base/admission keeps its owner from setting).
    f.namespaces[1] =
        namespace("eu-team", &[(LABEL_MODE, "audit"), (LABEL_GATEWAY, "eu"), ("egressfw.io/eu", "allowed")]);
    let p = f.policies(&c);
    assert_eq!((p["u-api"].gateway.as_str(), p["u-api"].refused_gateway.as_deref()), ("eu", None));
}

#[test]
fn cluster_ips_on_service_ports_and_backends_on_target_ports() {
    let p = Fixture::new().policies(&cfg());
    let web = &p["u-web"].allowed;
    // Only the configured port 3128 ("proxy"), not "admin": front 3128, backends 8080.
    assert_eq!(
        web.gateways,
        vec![
            ("10.96.0.10".parse().unwrap(), vec![port(3128)]),
            ("10.244.1.5".parse().unwrap(), vec![port(8080)]),
            ("10.244.2.6".parse().unwrap(), vec![port(8080)]),
        ]
    );
    assert_eq!(web.dns, vec!["10.96.0.53".parse::<IpAddr>().unwrap(), "10.244.0.2".parse().unwrap()]);
    assert!(p["u-web"].problems.is_empty(), "{:?}", p["u-web"].problems);
    // No ports configured: every port of the Service.
    let api = &p["u-api"].allowed;
    assert_eq!(api.gateways[0], ("10.96.0.11".parse().unwrap(), vec![port(3128)]));
}

/// Whoever may create EndpointSlices in the gateway's namespace can label one with the
/// gateway's service-name; only the EndpointSlice controller's slices say where the Service's
/// pods are.
#[test]
fn only_the_endpointslice_controllers_slices_name_a_gateways_backends() {
    let mut f = Fixture::new();
    let mut forged = slice("egress", "gw", &["10.244.9.9"], &[("proxy", 8080)]);
    forged.metadata.name = Some("gw-forged".into());
    forged.metadata.labels.as_mut().unwrap().remove("endpointslice.kubernetes.io/managed-by");
    let mut mirrored = slice("egress", "gw", &["10.244.9.10"], &[("proxy", 8080)]);
    mirrored.metadata.name = Some("gw-by-hand".into());
    mirrored
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("endpointslice.kubernetes.io/managed-by".into(), "someone.example.com".into());
    f.slices.extend([forged, mirrored]);
    let p = f.policies(&cfg());
    let web = &p["u-web"];
    for ip in ["10.244.9.9", "10.244.9.10"] {
        assert!(
            !web.allowed.gateways.iter().any(|(a, _)| *a == ip.parse::<IpAddr>().unwrap()),
            "{ip} is not allowed: {:?}",
            web.allowed.gateways
        );
    }
    assert!(
        web.allowed.gateways.iter().any(|(a, _)| *a == "10.244.1.5".parse::<IpAddr>().unwrap()),
        "the controller's slice still is"
    );
    let problems = web.problems.join("\n");
    assert!(
        problems.contains(
            "EndpointSlice egress/gw-forged names Service egress/gw but is managed by nobody named"
        ) && problems
            .contains("egress/gw-by-hand names Service egress/gw but is managed by \"someone.example.com\""),
        "{problems}"
    );
}

#[test]
fn typo_in_mode_label_enforces() {
    let mut f = Fixture::new();
    f.namespaces[2] = namespace("free", &[(LABEL_MODE, "enforced")]);
    let p = f.policies(&cfg());
    assert_eq!(p["u-batch"].mode, Mode::Enforce);
    assert!(p["u-batch"].problems[0].contains("\"enforced\""), "{:?}", p["u-batch"].problems);
}

#[test]
fn unknown_gateway_or_missing_service_narrows_to_dns() {
    let mut f = Fixture::new();
    f.namespaces[0] = namespace("shop", &[(LABEL_MODE, "enforce"), (LABEL_GATEWAY, "nope")]);
    f.services.remove(1);
    let p = f.policies(&cfg());
    assert!(p["u-web"].allowed.gateways.is_empty());
    assert!(!p["u-web"].allowed.dns.is_empty());
    assert!(p["u-web"].problems[0].contains("\"nope\""), "{:?}", p["u-web"].problems);
    assert!(p["u-api"].allowed.gateways.is_empty());
    assert!(p["u-api"].problems[0].contains("egress/gw-eu not found"), "{:?}", p["u-api"].problems);
}

#[test]
fn dns_backend_on_another_port_and_node_local() {
    let mut f = Fixture::new();
    f.slices[2] = slice("kube-system", "kube-dns", &["10.244.0.2"], &[("dns", 5353), ("dns-tcp", 5353)]);
    let mut c = cfg();
    c.dns.node_local = Some("169.254.20.10".parse().unwrap());
    let p = f.policies(&c);
    let web = &p["u-web"].allowed;
    assert_eq!(web.dns, vec!["10.96.0.53".parse::<IpAddr>().unwrap(), "169.254.20.10".parse().unwrap()]);
    assert_eq!(web.extra.len(), 2);
    assert!(web.extra.iter().all(|e| e.ports == vec![port(5353)] && e.cidr.to_string() == "10.244.0.2/32"));
}

#[test]
fn static_pods_use_the_config_hash() {
    let mut f = Fixture::new();
    f.pods[0].metadata.annotations =
        Some([("kubernetes.io/config.hash".to_owned(), "6d8e1e2c".to_owned())].into_iter().collect());
    let p = f.policies(&cfg());
    assert_eq!(p["6d8e1e2c"].name, "web");
    assert!(!p.contains_key("u-web"));
}

#[test]
fn steering_goes_to_the_gateway_service_and_a_label_turns_it_off() {
    let config = config::parse(
        "gateways:\n  - {name: main, service: egress/gw, ports: [3128, 8443], steer: [{port: 443, to: 8443}, {port: 80, to: 9999}]}\n",
    );
    assert!(
        config
            .as_ref()
            .is_err_and(|e| format!("{e:?}").contains("port 9999 is not one of this gateway's ports")),
        "{config:?}"
    );
    let config = config::parse(
        "gateways:\n  - {name: main, service: egress/gw, steer: [{port: 443, to: 8443}, {port: 80, to: 8080}]}\n",
    )
    .unwrap();
    let mut f = Fixture::new();
    f.services[0] = service("egress", "gw", "10.96.0.10", &[("proxy", 3128), ("tls", 8443)]);
    f.namespaces.push(namespace("quiet", &[(LABEL_MODE, "enforce"), (LABEL_STEERING, "off")]));
    f.pods.push(pod("quiet", "svc", "u-quiet", "Running"));
    let p = f.policies(&config);
    let web = &p["u-web"];
    assert!(web.steering);
    let steer = &web.allowed.steer;
    assert_eq!(steer.keys().copied().collect::<Vec<_>>(), [443], "the Service has no port 8080: {steer:?}");
    assert_eq!(
        steer[&443],
        SteerSpec { address: Some("10.96.0.10".parse().unwrap()), address6: None, port: 8443 }
    );
    assert!(web.problems.iter().any(|m| m.contains("port 80 is not steered")), "{:?}", web.problems);
    let quiet = &p["u-quiet"];
    assert!(!quiet.steering && quiet.allowed.steer.is_empty(), "labelled off: {quiet:?}");
    assert_eq!(quiet.allowed.gateways, web.allowed.gateways, "the gateway itself stays allowed");
}

#[test]
fn a_dual_stack_gateway_service_steers_each_family_to_its_own_cluster_ip() {
    let config =
        config::parse("gateways:\n  - {name: main, service: egress/gw, steer: [{port: 443, to: 8443}]}\n")
            .unwrap();
    let mut f = Fixture::new();
    let mut svc = service("egress", "gw", "10.96.0.10", &[("tls", 8443)]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.cluster_ips = Some(vec!["10.96.0.10".into(), "fd00:96::10".into()]);
    }
    f.services[0] = svc;
    let p = f.policies(&config);
    let target = p["u-web"].allowed.steer[&443];
    assert_eq!(target.address, Some("10.96.0.10".parse().unwrap()));
    assert_eq!(target.address6, Some("fd00:96::10".parse().unwrap()));
    // Both are gateway addresses the pod may reach on that port: a steered connect is gateway
    // traffic to every later check.
    for ip in ["10.96.0.10", "fd00:96::10"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(
            p["u-web"].allowed.gateways.iter().any(|(a, ports)| *a == ip && ports.contains(&port(8443))),
            "{ip} on 8443 is allowed: {:?}",
            p["u-web"].allowed.gateways
        );
    }
}

#[test]
fn a_gateway_group_allows_every_member_and_an_address_gateway_its_ports() {
    let c = config::parse(
        "gateways:\n  - name: main\n    services:\n      - {service: egress/gw, ports: [3128]}\n      - {service: egress/gw-eu}\n    addresses:\n      - {address: 192.0.2.10, ports: [3128]}\n  - name: corporate\n    addresses: [{address: \"2001:db8::5\", ports: [8080]}]\n    allowedNamespaces: {names: [eu-team]}\ndefaultGateway: main\n",
    )
    .unwrap();
    let mut f = Fixture::new();
    f.namespaces[1] = namespace("eu-team", &[(LABEL_MODE, "enforce"), (LABEL_GATEWAY, "corporate")]);
    let p = f.policies(&c);
    let web = &p["u-web"].allowed;
    assert_eq!(
        web.gateways,
        vec![
            ("10.96.0.10".parse().unwrap(), vec![port(3128)]),
            ("10.244.1.5".parse().unwrap(), vec![port(8080)]),
            ("10.244.2.6".parse().unwrap(), vec![port(8080)]),
            ("10.96.0.11".parse().unwrap(), vec![port(3128)]),
            ("10.244.3.7".parse().unwrap(), vec![port(8080)]),
            ("192.0.2.10".parse().unwrap(), vec![port(3128)]),
        ]
    );
    assert!(p["u-web"].problems.is_empty(), "{:?}", p["u-web"].problems);
    // The address gateway: that address and port, and DNS; no Service of any other gateway.
    let api = &p["u-api"].allowed;
    assert_eq!(api.gateways, vec![("2001:db8::5".parse().unwrap(), vec![port(8080)])]);
    assert!(!api.dns.is_empty());

    // A member whose Service is missing is reported; the other members stay reachable.
    f.services.remove(1);
    let p = f.policies(&c);
    let web = &p["u-web"].allowed;
    assert_eq!(web.gateways.len(), 4, "{:?}", web.gateways);
    assert!(web.gateways.iter().all(|(ip, _)| ip.to_string() != "10.96.0.11"));
    assert!(
        p["u-web"].problems.iter().any(|m| m.contains("egress/gw-eu not found")),
        "{:?}",
        p["u-web"].problems
    );
}

#[test]
fn a_pod_whose_namespace_is_not_known_yet_is_held_never_passed() {
    // The pod watch has the pod, the namespace watch not yet its Namespace (a relist, a lag).
    let mut f = Fixture::new();
    f.pods.push(pod("new-team", "app", "u-new", "Pending"));
    let p = f.policies(&cfg());
    let held = &p["u-new"];
    assert_eq!(held.mode, Mode::Enforce, "an unknown namespace holds its pods, as the CNI plugin does");
    assert_eq!(*held.allowed, Allowed::default(), "nothing but loopback until the namespace is known");
    assert!(held.problems.iter().any(|m| m.contains("new-team")), "{:?}", held.problems);
}
