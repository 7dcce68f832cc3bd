use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use proptest::prelude::*;

use super::{
    reference::{self, Asked},
    *,
};
use crate::crd::{
    ClusterEgressPolicy, ClusterEgressPolicySpec, EgressPolicy, EgressPolicySpec,
    cluster_egress_policy::{ClusterAction, ClusterRule, Subject, Tier},
    destination::{BoundedString, Destination, PortSpec, Protocol},
    egress_policy::{NamespaceAction, NamespaceRule},
};

fn cluster(yaml: &str) -> ClusterEgressPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

fn namespaced(yaml: &str) -> EgressPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn t(s: &str) -> Target {
    Target::parse(s).unwrap()
}

/// The platform: delegates `*.github.com` to every namespace labelled `egress=self-service`,
/// denies paste sites to everyone, and accepts the package mirror for everyone.
fn platform() -> Vec<ClusterEgressPolicy> {
    vec![
        cluster(
            r"
apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: delegate-github}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {matchLabels: {egress: self-service}}}
  egress:
    - {name: github, action: Pass, to: [{domainNames: ['*.github.com']}], ports: [{port: 443}]}
    - {name: corp, action: Pass, to: [{domainNames: ['git.corp.example']}, {networks: [10.20.0.0/16]}]}
",
        ),
        cluster(
            r"
apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: no-paste}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - {name: paste, action: Deny, to: [{domainNames: [pastebin.com, gist.github.com]}]}
",
        ),
        cluster(
            r"
apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: mirror}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {}}
  egress:
    - {name: mirror, action: Accept, to: [{domainNames: [deb.debian.org, api.github.com]}]}
    - {name: no-telemetry, action: Deny, to: [{domainNames: ['*.telemetry.example']}]}
",
        ),
    ]
}

fn team_a() -> Vec<EgressPolicy> {
    vec![
        namespaced(
            r"
apiVersion: egressfw.io/v1alpha1
kind: EgressPolicy
metadata: {name: ci, namespace: team-a}
spec:
  podSelector: {matchLabels: {app: ci}}
  egress:
    - {name: github, action: Accept, to: [{domainNames: [api.github.com, gist.github.com, codeload.github.com]}]}
    - {name: paste, action: Accept, to: [{domainNames: [pastebin.com]}]}
    - {name: corp, action: Accept, via: TlsPassthrough, to: [{domainNames: [git.corp.example]}, {networks: [10.20.1.0/24, 10.99.0.0/16]}]}
",
        ),
        namespaced(
            r"
apiVersion: egressfw.io/v1alpha1
kind: EgressPolicy
metadata: {name: ci, namespace: team-b}
spec:
  podSelector: {}
  egress:
    - {name: github, action: Accept, to: [{domainNames: [api.github.com]}]}
",
        ),
    ]
}

struct Who {
    namespace: &'static str,
    namespace_labels: Labels,
    pod_labels: Labels,
}

impl Who {
    fn new(namespace: &'static str, ns: &[(&str, &str)], pod: &[(&str, &str)]) -> Self {
        let mut namespace_labels = labels(ns);
        namespace_labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
        Self { namespace, namespace_labels, pod_labels: labels(pod) }
    }

    fn client(&self) -> Client<'_> {
        Client {
            namespace: self.namespace,
            namespace_labels: &self.namespace_labels,
            pod_labels: &self.pod_labels,
        }
    }
}

fn by(v: &Verdict) -> String {
    match v {
        Verdict::Accept { by, .. } => format!("accept {by}"),
        Verdict::Deny { by } => format!("deny {by}"),
        Verdict::Undecided { passed: Some(p) } => format!("undecided after {p}"),
        Verdict::Undecided { passed: None } => "undecided".into(),
    }
}

#[test]
fn the_order_of_evaluation_on_a_worked_example() {
    let (tiers, rejected) = Tiers::build(&platform(), &team_a());
    assert_eq!(rejected, []);
    let ci = Who::new("team-a", &[("egress", "self-service")], &[("app", "ci")]);
    let web = Who::new("team-a", &[("egress", "self-service")], &[("app", "web")]);
    let outsider = Who::new("team-c", &[], &[("app", "ci")]);
    // team-b's namespace is not labelled for self-service: its policy is outside the bounds.
    let team_b = Who::new("team-b", &[], &[]);
    let cases: &[(&Who, &str, u16, Via, &str)] = &[
        // Delegated and taken up by the pod's policy.
        (&ci, "codeload.github.com", 443, Via::Connect, "accept EgressPolicy/team-a/ci#github"),
        // Delegated on 443 only.
        (&ci, "codeload.github.com", 80, Via::Connect, "undecided"),
        // Delegated, but the pod's labels are not selected: nothing took it up.
        (
            &web,
            "codeload.github.com",
            443,
            Via::Connect,
            "undecided after ClusterEgressPolicy/delegate-github#github",
        ),
        // Admin Deny wins over the team's Accept, at a lower priority number.
        (&ci, "gist.github.com", 443, Via::Connect, "deny ClusterEgressPolicy/no-paste#paste"),
        (&ci, "pastebin.com", 443, Via::Connect, "deny ClusterEgressPolicy/no-paste#paste"),
        // Baseline applies where nothing above decided...
        (&outsider, "deb.debian.org", 80, Via::Connect, "accept ClusterEgressPolicy/mirror#mirror"),
        (&outsider, "x.telemetry.example", 443, Via::Connect, "deny ClusterEgressPolicy/mirror#no-telemetry"),
        // ...and after a Pass nothing in the namespace took up.
        (&team_b, "api.github.com", 443, Via::Connect, "accept ClusterEgressPolicy/mirror#mirror"),
        (&web, "api.github.com", 443, Via::Connect, "accept ClusterEgressPolicy/mirror#mirror"),
        // A team policy counts only for what was passed to it.
        (&team_b, "codeload.github.com", 443, Via::Connect, "undecided"),
        // `via` narrows the team's rule.
        (&ci, "git.corp.example", 443, Via::TlsPassthrough, "accept EgressPolicy/team-a/ci#corp"),
        (
            &ci,
            "git.corp.example",
            443,
            Via::Connect,
            "undecided after ClusterEgressPolicy/delegate-github#corp",
        ),
        // Address targets meet networks only.
        (&ci, "10.20.1.7", 22, Via::TlsPassthrough, "accept EgressPolicy/team-a/ci#corp"),
        (&ci, "10.99.0.1", 22, Via::TlsPassthrough, "undecided"),
        (&outsider, "github.com", 443, Via::Connect, "undecided"),
    ];
    for (who, target, port, via, want) in cases {
        let got = tiers.decide(&who.client(), &t(target), *port, *via);
        assert_eq!(by(&got), *want, "{} {target}:{port} {via:?}", who.namespace);
    }
}

#[test]
fn a_namespace_rule_opens_only_the_ranges_its_pass_names() {
    let (tiers, _) = Tiers::build(&platform(), &team_a());
    let ci = Who::new("team-a", &[("egress", "self-service")], &[("app", "ci")]);
    let Verdict::Accept { exceptions, passed, .. } =
        tiers.decide(&ci.client(), &t("git.corp.example"), 443, Via::TlsPassthrough)
    else {
        panic!("the corp rule accepts")
    };
    // 10.99.0.0/16 was never delegated.
    assert_eq!(exceptions, ["10.20.1.0/24".parse::<IpNet>().unwrap()]);
    assert_eq!(passed.unwrap().to_string(), "ClusterEgressPolicy/delegate-github#corp");
}

#[test]
fn objects_the_api_server_could_not_check_are_refused_with_the_value() {
    let bad_selector = cluster(
        r"
metadata: {name: bad-selector}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchExpressions: [{key: team, operator: Near}]}}
  egress: [{name: x, action: Deny, to: [{domainNames: [a.example.com]}]}]
",
    );
    let host_bits = cluster(
        r"
metadata: {name: host-bits}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {}}
  egress: [{name: lan, action: Deny, to: [{networks: [10.1.2.3/8]}]}]
",
    );
    let pass_in_baseline = cluster(
        r"
metadata: {name: pass-late}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {}}
  egress: [{name: late, action: Pass, to: [{domainNames: [a.example.com]}]}]
",
    );
    let long_label = namespaced(&format!(
        "metadata: {{name: long, namespace: team-a}}\nspec:\n  podSelector: {{}}\n  egress: [{{name: l, action: Accept, to: [{{domainNames: [{}.example.com]}}]}}]\n",
        "a".repeat(64)
    ));
    let (tiers, rejected) =
        Tiers::build(&[bad_selector, host_bits, pass_in_baseline, platform().remove(1)], &[long_label]);
    let reasons: Vec<String> = rejected.iter().map(|r| format!("{}: {}", r.object, r.reason)).collect();
    let want = [
        "ClusterEgressPolicy/bad-selector: subject.namespaces: Invalid expression operator",
        "ClusterEgressPolicy/host-bits: rule \"lan\" networks: \"10.1.2.3/8\" has host bits set; did you mean 10.0.0.0/8?",
        "ClusterEgressPolicy/pass-late: rule \"late\": Pass exists only in the Admin tier",
    ];
    for (got, want) in reasons.iter().zip(want) {
        assert_eq!(got, want);
    }
    assert!(
        reasons[3].starts_with("EgressPolicy/team-a/long: rule \"l\" domainNames: host"),
        "{}",
        reasons[3]
    );
    assert_eq!(reasons.len(), 4);
    // The good object still applies.
    let anyone = Who::new("team-z", &[], &[]);
    assert_eq!(
        by(&tiers.decide(&anyone.client(), &t("pastebin.com"), 443, Via::Connect)),
        "deny ClusterEgressPolicy/no-paste#paste"
    );
}

#[test]
fn mapped_networks_match_the_ipv4_they_carry() {
    let deny = cluster(
        r"
metadata: {name: lan}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress: [{name: lan, action: Deny, to: [{networks: ['::ffff:10.0.0.0/104']}]}]
",
    );
    let (tiers, rejected) = Tiers::build(&[deny], &[]);
    assert_eq!(rejected, []);
    let anyone = Who::new("team-z", &[], &[]);
    for target in ["10.1.2.3", "[::ffff:10.1.2.3]"] {
        assert_eq!(
            by(&tiers.decide(&anyone.client(), &t(target), 443, Via::Connect)),
            "deny ClusterEgressPolicy/lan#lan"
        );
    }
}

#[test]
fn udp_only_ports_never_match_at_the_gateway() {
    let p = cluster(
        r"
metadata: {name: dns}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress: [{name: dns, action: Accept, to: [{domainNames: [dns.example.com]}], ports: [{protocol: UDP, port: 53}]}]
",
    );
    let (tiers, _) = Tiers::build(&[p], &[]);
    let anyone = Who::new("team-z", &[], &[]);
    assert_eq!(by(&tiers.decide(&anyone.client(), &t("dns.example.com"), 53, Via::Connect)), "undecided");
}

// ---- Property tests: `decide` against the reference, over random policies. ----

const NAMES: &[&str] =
    &["a.example.com", "b.a.example.com", "example.com", "api.github.com", "gist.github.com", "x.org"];
const PATTERNS: &[&str] = &[
    "a.example.com",
    "*.example.com",
    "*.a.example.com",
    "example.com",
    "*.github.com",
    "api.github.com",
    "*.org",
    "x.org",
];
const NETWORKS: &[&str] =
    &["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "93.184.0.0/16", "0.0.0.0/0", "2001:db8::/32"];
const ADDRESSES: &[&str] = &["10.1.2.3", "10.2.0.1", "93.184.1.1", "8.8.8.8", "2001:db8::1"];
const PORTS: &[u16] = &[80, 443, 8443];
/// ns1 twice: most clients are in a namespace that has policies, so namespace Accepts are common.
const NAMESPACES: &[&str] = &["ns1", "ns1", "ns2", "ns3"];
const VIAS: &[Via] = &[Via::Connect, Via::TlsPassthrough, Via::TlsOrigination, Via::TcpForward];

fn pick<T: Clone + fmt::Debug + 'static>(pool: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(pool)
}

fn label_map() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(pick(&["team", "env"]), pick(&["a", "b"]), 0..=2)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
}

fn requirement() -> impl Strategy<Value = LabelSelectorRequirement> {
    (
        pick(&["team", "env"]),
        pick(&["In", "NotIn", "Exists", "DoesNotExist"]),
        proptest::collection::vec(pick(&["a", "b"]), 1..=2),
    )
        .prop_map(|(key, op, values)| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: matches!(op, "In" | "NotIn").then(|| values.into_iter().map(Into::into).collect()),
        })
}

fn label_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        2 => Just(LabelSelector::default()),
        1 => label_map().prop_map(|m| LabelSelector { match_labels: Some(m), ..Default::default() }),
        1 => proptest::collection::vec(requirement(), 1..=2)
            .prop_map(|e| LabelSelector { match_expressions: Some(e), ..Default::default() }),
    ]
}

fn destinations() -> impl Strategy<Value = Vec<Destination>> {
    let one = prop_oneof![
        proptest::collection::vec(pick(PATTERNS), 1..=3).prop_map(|n| Destination {
            domain_names: Some(n.into_iter().map(|s| BoundedString(s.into())).collect()),
            networks: None,
        }),
        proptest::collection::vec(pick(NETWORKS), 1..=2).prop_map(|n| Destination {
            domain_names: None,
            networks: Some(n.into_iter().map(|s| BoundedString(s.into())).collect()),
        }),
    ];
    proptest::collection::vec(one, 1..=2)
}

fn ports() -> impl Strategy<Value = Option<Vec<PortSpec>>> {
    let spec = (pick(PORTS), any::<bool>(), any::<bool>()).prop_map(|(port, udp, range)| PortSpec {
        protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
        port,
        end_port: range.then_some(8443),
    });
    proptest::option::of(proptest::collection::vec(spec, 1..=2))
}

fn cluster_policies() -> impl Strategy<Value = Vec<ClusterEgressPolicy>> {
    // Pass twice: a namespace Accept needs one, first among the rules that match.
    let rule = (
        pick(&[ClusterAction::Accept, ClusterAction::Deny, ClusterAction::Pass, ClusterAction::Pass]),
        destinations(),
        ports(),
    );
    let policy = (
        any::<bool>(),
        0..3u16,
        label_selector(),
        proptest::option::of(label_selector()),
        proptest::collection::vec(rule, 1..=3),
    );
    proptest::collection::vec(policy, 0..=5).prop_map(|policies| {
        policies
            .into_iter()
            .enumerate()
            .map(|(i, (admin, priority, namespaces, pods, rules))| {
                let tier = if admin { Tier::Admin } else { Tier::Baseline };
                let egress = rules
                    .into_iter()
                    .enumerate()
                    .map(|(j, (action, to, ports))| ClusterRule {
                        name: format!("r{j}"),
                        // Pass exists only in the Admin tier (the CRD refuses it elsewhere).
                        action: if tier == Tier::Baseline && action == ClusterAction::Pass {
                            ClusterAction::Accept
                        } else {
                            action
                        },
                        to,
                        ports,
                    })
                    .collect();
                ClusterEgressPolicy::new(
                    // Names out of input order: ties in priority are broken by name.
                    &format!("c{}-{i}", (i * 7) % 10),
                    ClusterEgressPolicySpec { tier, priority, subject: Subject { namespaces, pods }, egress },
                )
            })
            .collect()
    })
}

fn namespace_policies() -> impl Strategy<Value = Vec<EgressPolicy>> {
    let rule = (destinations(), ports(), proptest::option::of(pick(VIAS)));
    let policy = (pick(NAMESPACES), label_selector(), proptest::collection::vec(rule, 1..=3));
    proptest::collection::vec(policy, 0..=6).prop_map(|policies| {
        policies
            .into_iter()
            .enumerate()
            .map(|(i, (namespace, pod_selector, rules))| {
                let egress = rules
                    .into_iter()
                    .enumerate()
                    .map(|(j, (to, ports, via))| NamespaceRule {
                        name: format!("r{j}"),
                        action: NamespaceAction::Accept,
                        to,
                        ports,
                        via,
                    })
                    .collect();
                let mut p = EgressPolicy::new(
                    &format!("p{}-{i}", (i * 3) % 5),
                    EgressPolicySpec { pod_selector, egress },
                );
                p.metadata.namespace = Some(namespace.into());
                p
            })
            .collect()
    })
}

fn asked() -> impl Strategy<Value = Asked> {
    prop_oneof![
        pick(NAMES).prop_map(|n| Asked::Name(n.into())),
        pick(ADDRESSES).prop_map(|a| Asked::Ip(a.parse::<IpAddr>().unwrap())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn decide_agrees_with_the_reference(
        cluster in cluster_policies(),
        namespaced in namespace_policies(),
        namespace in pick(NAMESPACES),
        ns_labels in label_map(),
        pod_labels in label_map(),
        asked in asked(),
        port in pick(PORTS),
        via in pick(VIAS),
    ) {
        let mut namespace_labels: Labels = ns_labels;
        namespace_labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
        let client = Client { namespace, namespace_labels: &namespace_labels, pod_labels: &pod_labels };
        let (tiers, rejected) = Tiers::build(&cluster, &namespaced);
        prop_assert_eq!(rejected, vec![]);
        let target = match &asked {
            Asked::Name(n) => t(n),
            Asked::Ip(ip) => Target::Ip(*ip),
        };
        let want = reference::decide(&cluster, &namespaced, &client, &asked, port, via);
        prop_assert_eq!(tiers.decide(&client, &target, port, via), want);
    }
}

/// The generator reaches every outcome often enough for the property to mean something.
#[test]
fn the_generator_reaches_every_stage() {
    use proptest::{strategy::ValueTree as _, test_runner::TestRunner};
    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let inputs = (
        cluster_policies(),
        namespace_policies(),
        pick(NAMESPACES),
        label_map(),
        label_map(),
        asked(),
        pick(PORTS),
        pick(VIAS),
    );
    for _ in 0..3000 {
        let (cluster, namespaced, namespace, mut ns_labels, pod_labels, asked, port, via) =
            inputs.new_tree(&mut runner).unwrap().current();
        ns_labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
        let client = Client { namespace, namespace_labels: &ns_labels, pod_labels: &pod_labels };
        let kind = match reference::decide(&cluster, &namespaced, &client, &asked, port, via) {
            Verdict::Accept { by, .. } if by.stage == Stage::Namespace => "namespace accept",
            Verdict::Accept { by, .. } if by.stage == Stage::Admin => "admin accept",
            Verdict::Accept { .. } => "baseline accept",
            Verdict::Deny { by } if by.stage == Stage::Admin => "admin deny",
            Verdict::Deny { .. } => "baseline deny",
            Verdict::Undecided { passed: Some(_) } => "passed, undecided",
            Verdict::Undecided { passed: None } => "undecided",
        };
        *seen.entry(kind).or_default() += 1;
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert!(seen.values().all(|n| *n >= 30), "{seen:?}");
}
