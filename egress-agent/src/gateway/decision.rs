//! One decision from both sources of rules. The gateway file's rules come first, as if they
//! were the first Admin policy: what they allow is allowed, whatever the resources say (the
//! platform team wrote both, and the file is what worked before any resource existed). What
//! they do not allow goes to the policy resources in their order (see `tiers`); what nothing
//! decides is denied.

use std::sync::Arc;

use super::{
    http_proxy::Mode,
    policy::{Deny, Grant, Policy, Target},
    tcp_forward,
    tiers::{Client, Tiers, Verdict, Via},
    tls_passthrough,
};

/// A refusal, and the resource rule that made it (a Deny), for the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub deny: Deny,
    pub by: Option<Arc<str>>,
}

impl From<Deny> for Refused {
    fn from(deny: Deny) -> Self {
        Self { deny, by: None }
    }
}

/// Who decided, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The gateway file's rules: an allow, or a refusal no resource may overturn (an
    /// unidentified client, or no policy resources at all).
    File(Result<Grant, Deny>),
    /// The file's rules did not allow it; the policy resources decided this.
    Resources(Verdict),
}

impl Outcome {
    pub fn into_result(self) -> Result<Grant, Refused> {
        match self {
            Self::File(decided) => decided.map_err(Refused::from),
            Self::Resources(Verdict::Accept { by, exceptions, .. }) => {
                Ok(Grant::by_resource(by.label, exceptions))
            }
            Self::Resources(Verdict::Deny { by }) => {
                Err(Refused { deny: Deny::DeniedByPolicy, by: Some(by.label) })
            }
            Self::Resources(Verdict::Undecided { .. }) => Err(Deny::NotAllowed.into()),
        }
    }
}

/// May `client` (`None`: its address names no namespace) reach `target:port`, having come
/// `via`? `client` needs its namespace labels only when `tiers` is not empty.
pub fn authorize(
    file: &Policy,
    tiers: &Tiers,
    client: Option<&Client>,
    target: &Target,
    port: u16,
    via: Via,
) -> Result<Grant, Refused> {
    decide(file, tiers, client, target, port, via).into_result()
}

/// [`authorize`], saying which source of rules decided (for `egress-agent explain`).
pub fn decide(
    file: &Policy,
    tiers: &Tiers,
    client: Option<&Client>,
    target: &Target,
    port: u16,
    via: Via,
) -> Outcome {
    match (file.authorize(client.map(|c| c.namespace), target, port), client) {
        (Err(Deny::NotAllowed), Some(client)) if !tiers.is_empty() => {
            Outcome::Resources(tiers.decide(client, target, port, via))
        }
        (decided, _) => Outcome::File(decided),
    }
}

/// How a connection that came in on `listener` reached the gateway, as `EgressPolicy` rules
/// name it (`via`). Plain HTTP (proxied, or steered to the transparent listener) counts as
/// `Connect`: it came through the proxy port's protocol.
pub fn via_of(listener: &str) -> Via {
    match listener {
        tls_passthrough::LISTENER => Via::TlsPassthrough,
        tcp_forward::LISTENER => Via::TcpForward,
        l if l == Mode::Originate.listener() => Via::TlsOrigination,
        _ => Via::Connect,
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::tiers::{Labels, RuleRef, Stage},
        *,
    };
    use crate::crd::{ClusterEgressPolicy, EgressPolicy};

    fn file() -> Policy {
        let c = super::super::config::parse(
            r#"
listeners: {httpProxy: {listen: "0.0.0.0:3128"}}
sources: {kubernetes: true}
rules:
  - {namespaces: [team-a], hosts: [pastebin.com]}
"#,
        )
        .unwrap();
        Policy::new(c.rules, c.blocked_cidrs)
    }

    fn tiers() -> Tiers {
        let cluster: ClusterEgressPolicy = serde_yaml::from_str(
            r"
apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: platform}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - {name: paste, action: Deny, to: [{domainNames: [pastebin.com, gist.github.com]}]}
    - {name: github, action: Pass, to: [{domainNames: ['*.github.com']}, {networks: [10.20.0.0/16]}]}
",
        )
        .unwrap();
        let team: EgressPolicy = serde_yaml::from_str(
            r"
apiVersion: egressfw.io/v1alpha1
kind: EgressPolicy
metadata: {name: ci, namespace: team-a}
spec:
  podSelector: {}
  egress:
    - {name: api, action: Accept, to: [{domainNames: [api.github.com]}, {networks: [10.20.1.0/24]}]}
",
        )
        .unwrap();
        let (tiers, rejected) = Tiers::build(&[cluster], &[team]);
        assert!(rejected.is_empty(), "{rejected:?}");
        tiers
    }

    fn decide(tiers: &Tiers, namespace: Option<&str>, target: &str) -> Result<Grant, Refused> {
        let labels: Labels = namespace
            .map(|ns| [("kubernetes.io/metadata.name".to_owned(), ns.to_owned())].into())
            .unwrap_or_default();
        let none = Labels::new();
        let client =
            namespace.map(|namespace| Client { namespace, namespace_labels: &labels, pod_labels: &none });
        let target = Target::parse(target).unwrap();
        authorize(&file(), tiers, client.as_ref(), &target, 443, Via::Connect)
    }

    fn label(stage: Stage, policy: &str, rule: &str) -> Arc<str> {
        RuleRef::new(stage, policy, rule).label
    }

    #[test]
    fn the_file_decides_first_then_the_resources() {
        let tiers = tiers();
        // The file's Accept is final: the Admin Deny does not take it back.
        assert_eq!(decide(&tiers, Some("team-a"), "pastebin.com").unwrap().matched.as_ref(), "pastebin.com");
        // What the file does not allow, the resources decide.
        let denied =
            Refused { deny: Deny::DeniedByPolicy, by: Some(label(Stage::Admin, "platform", "paste")) };
        assert_eq!(decide(&tiers, Some("team-a"), "gist.github.com"), Err(denied));
        let accepted = decide(&tiers, Some("team-a"), "api.github.com").unwrap();
        assert_eq!(accepted.matched, label(Stage::Namespace, "team-a/ci", "api"));
        assert!(!accepted.allow_h2_prior_knowledge);
        // Passed, but team-b accepts nothing: nothing decided.
        assert_eq!(decide(&tiers, Some("team-b"), "api.github.com"), Err(Deny::NotAllowed.into()));
        assert_eq!(decide(&tiers, None, "api.github.com"), Err(Deny::UnknownSource.into()));
        // No resources at all: the file alone, as before.
        assert_eq!(decide(&Tiers::default(), Some("team-a"), "api.github.com"), Err(Deny::NotAllowed.into()));
    }

    #[test]
    fn a_resource_grant_opens_only_the_ranges_its_rules_name() {
        let tiers = tiers();
        let file = file();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let target = Target::parse("10.20.1.7").unwrap();
        let grant = decide(&tiers, Some("team-a"), "10.20.1.7").unwrap();
        assert_eq!(file.dialable(&grant, &target, &[]), Ok(vec![ip("10.20.1.7")]));
        let name = Target::parse("api.github.com").unwrap();
        let grant = decide(&tiers, Some("team-a"), "api.github.com").unwrap();
        assert_eq!(file.dialable(&grant, &name, &[ip("10.20.1.9")]), Ok(vec![ip("10.20.1.9")]));
        assert!(file.dialable(&grant, &name, &[ip("10.20.2.9")]).is_err(), "outside the team's /24");
    }

    #[test]
    fn listeners_name_the_way_in() {
        for (listener, via) in [
            ("http_proxy", Via::Connect),
            ("http_transparent", Via::Connect),
            ("tls_passthrough", Via::TlsPassthrough),
            ("tls_origination", Via::TlsOrigination),
            ("tcp_forward", Via::TcpForward),
        ] {
            assert_eq!(via_of(listener), via, "{listener}");
        }
    }
}
