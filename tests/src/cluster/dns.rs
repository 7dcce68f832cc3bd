//! The test cluster's DNS: dnsmasq (Debian's dnsmasq-base, the host's binary in a client pod)
//! behind the `kube-system/kube-dns` Service at the address the kubelet gives pods
//! ([`super::node::CLUSTER_DNS`]), as a cluster's DNS sits. It answers the outside's names from
//! a fixed list and NXDOMAIN for everything under `cluster.local` (Services are reached by
//! ClusterIP in the tests), and asks nobody else.

use std::net::Ipv4Addr;

use super::{images::CLIENT_IMAGE, node::CLUSTER_DNS};

/// The Service and the pod, for `kubectl apply -f -`; `records` are (name, address) pairs.
pub fn manifests(records: &[(&str, Ipv4Addr)]) -> String {
    let mut args = vec![
        "/usr/sbin/dnsmasq".to_owned(),
        "--keep-in-foreground".into(),
        "--log-facility=-".into(),
        "--log-queries".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--user=root".into(),
        "--pid-file=/tmp/dnsmasq.pid".into(),
        "--local=/cluster.local/".into(),
    ];
    args.extend(records.iter().map(|(name, addr)| format!("--address=/{name}/{addr}")));
    let command: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  clusterIP: {CLUSTER_DNS}
  selector:
    k8s-app: kube-dns
  ports:
    - name: dns
      port: 53
      protocol: UDP
    - name: dns-tcp
      port: 53
      protocol: TCP
---
apiVersion: v1
kind: Pod
metadata:
  name: dnsmasq
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: dnsmasq
      image: {CLIENT_IMAGE}
      imagePullPolicy: Never
      command: [{command}]
      readinessProbe:
        tcpSocket:
          port: 53
        periodSeconds: 2
      volumeMounts:
        - name: usr
          mountPath: /usr
          readOnly: true
  volumes:
    - name: usr
      hostPath:
        path: /usr
"#,
        command = command.join(", ")
    )
}
