//! Builders for the objects the agent watches, filled in the way a real cluster fills them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            Container, Namespace, NamespaceStatus, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort,
            ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

fn meta(namespace: Option<&str>, name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: (!labels.is_empty()).then_some(labels),
        ..ObjectMeta::default()
    }
}

fn family(ip: &str) -> &'static str {
    if ip.contains(':') { "IPv6" } else { "IPv4" }
}

/// An active namespace with `labels`, plus the `kubernetes.io/metadata.name` label the API
/// server adds to every namespace.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut all: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    all.insert("kubernetes.io/metadata.name".into(), name.to_owned());
    Namespace {
        metadata: meta(None, name, all),
        spec: None,
        status: Some(NamespaceStatus { phase: Some("Active".into()), ..NamespaceStatus::default() }),
    }
}

/// A running pod with one container on `node`. `qos_class` is `Guaranteed`, `Burstable` or
/// `BestEffort`; without `pod_ip` the pod has no address yet (status.podIP(s) unset).
pub fn pod(ns: &str, name: &str, uid: &str, node: &str, qos_class: &str, pod_ip: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta { uid: Some(uid.to_owned()), ..meta(Some(ns), name, BTreeMap::new()) },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            containers: vec![Container {
                name: "main".into(),
                image: Some("registry.k8s.io/pause:3.10".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            qos_class: Some(qos_class.to_owned()),
            pod_ip: pod_ip.map(str::to_owned),
            pod_ips: pod_ip.map(|ip| vec![PodIP { ip: ip.to_owned() }]),
            ..PodStatus::default()
        }),
    }
}

/// A ClusterIP service with one TCP port per entry of `ports` (named `p<port>`, targeting the
/// same port number).
pub fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[u16]) -> Service {
    Service {
        metadata: meta(Some(ns), name, BTreeMap::new()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.to_owned()),
            cluster_ips: Some(vec![cluster_ip.to_owned()]),
            ip_families: Some(vec![family(cluster_ip).to_owned()]),
            ports: Some(
                ports
                    .iter()
                    .map(|&port| ServicePort {
                        name: Some(format!("p{port}")),
                        port: i32::from(port),
                        target_port: Some(IntOrString::Int(i32::from(port))),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The slice the endpoint-slice controller would publish for `service_name`: one ready endpoint
/// per address, one TCP port (named `p<port>`) per entry of `ports`. The address type follows
/// the first address (IPv4 when there is none).
pub fn endpoint_slice(
    ns: &str,
    name: &str,
    service_name: &str,
    addresses: &[&str],
    ports: &[u16],
) -> EndpointSlice {
    // As the EndpointSlice controller labels what it makes (the agent trusts nothing else).
    let labels = BTreeMap::from([
        ("kubernetes.io/service-name".to_owned(), service_name.to_owned()),
        ("endpointslice.kubernetes.io/managed-by".to_owned(), "endpointslice-controller.k8s.io".to_owned()),
    ]);
    EndpointSlice {
        metadata: meta(Some(ns), name, labels),
        address_type: family(addresses.first().copied().unwrap_or_default()).to_owned(),
        endpoints: addresses
            .iter()
            .map(|&address| Endpoint {
                addresses: vec![address.to_owned()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(
            ports
                .iter()
                .map(|&port| EndpointPort {
                    name: Some(format!("p{port}")),
                    port: Some(i32::from(port)),
                    protocol: Some("TCP".into()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    }
}
