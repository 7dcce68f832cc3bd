//! Allow rules, in two steps: may this namespace ask for this name (or address) on this port,
//! and then, once the gateway itself has resolved the name, which of the addresses may it dial.
//! Default deny. Non-public addresses pass only when the matching rule names them in `cidrs`.

use std::{fmt, net::IpAddr, sync::Arc};

pub use super::target::Target;

mod index;

use index::{Hit, RuleIndex};

use ipnet::IpNet;

use super::{
    config::Rule,
    ip_literal,
    ranges::{self, Blocked},
    target::TargetError,
};

/// Why a request was refused. The names are stable: they are log fields and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Deny {
    /// The client's address maps to no namespace.
    UnknownSource,
    /// No rule allows this namespace, destination and port.
    NotAllowed,
    /// A policy resource's Deny rule decided (the record names the rule).
    DeniedByPolicy,
    /// Every address the name resolved to (or the literal) is non-public and not named by a rule.
    Blocked(Blocked),
    /// The name does not resolve.
    ResolveFailed,
    /// Unparseable target, request or ClientHello.
    BadTarget,
    BadRequest,
    /// Content-Length with Transfer-Encoding, or several Content-Length headers.
    AmbiguousFraming,
    /// CONNECT target, SNI and Host disagree (domain fronting).
    TargetMismatch,
    /// A ClientHello without a server name, on the TLS listener or in a CONNECT tunnel to a name.
    NoServerName,
    /// HTTP/2 with prior knowledge in a CONNECT tunnel to a name, and no rule allows it.
    H2PriorKnowledge,
    /// The origination listener was asked for a host it does not originate to.
    NotOriginated,
    /// The request head or ClientHello did not arrive in time, or was too large.
    HeaderTimeout,
    HeaderTooLarge,
    /// The connection cap was reached.
    TooManyConnections,
    /// The cap for one client address was reached.
    SourceLimit,
    /// The gateway is draining (SIGTERM).
    Draining,
}

impl Deny {
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownSource => "unknown_source",
            Self::NotAllowed => "not_allowed",
            Self::DeniedByPolicy => "denied_by_policy",
            Self::Blocked(b) => match b {
                Blocked::Metadata => "blocked_metadata",
                Blocked::Loopback => "blocked_loopback",
                Blocked::Private => "blocked_private",
                Blocked::LinkLocal => "blocked_link_local",
                Blocked::Cgnat => "blocked_cgnat",
                Blocked::Multicast => "blocked_multicast",
                Blocked::Unspecified => "blocked_unspecified",
                Blocked::Reserved => "blocked_reserved",
                Blocked::Configured => "blocked_configured",
            },
            Self::ResolveFailed => "resolve_failed",
            Self::BadTarget => "bad_target",
            Self::BadRequest => "bad_request",
            Self::AmbiguousFraming => "ambiguous_framing",
            Self::TargetMismatch => "target_mismatch",
            Self::NoServerName => "no_server_name",
            Self::H2PriorKnowledge => "h2_prior_knowledge",
            Self::NotOriginated => "not_originated",
            Self::HeaderTimeout => "header_timeout",
            Self::HeaderTooLarge => "header_too_large",
            Self::TooManyConnections => "too_many_connections",
            Self::SourceLimit => "source_connection_limit",
            Self::Draining => "draining",
        }
    }
}

impl From<TargetError> for Deny {
    fn from(e: TargetError) -> Self {
        match e {
            TargetError::BadTarget => Self::BadTarget,
            TargetError::BadRequest => Self::BadRequest,
            TargetError::AmbiguousFraming => Self::AmbiguousFraming,
            TargetError::TargetMismatch => Self::TargetMismatch,
        }
    }
}

impl fmt::Display for Deny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A first-step yes: which rule said so, and which non-public ranges those rules open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The pattern or CIDR that matched, as written: a bounded label for metrics, shared with
    /// the policy (no copy per request).
    pub matched: Arc<str>,
    exceptions: Vec<IpNet>,
    /// One of the granting rules allows HTTP/2 with prior knowledge inside a tunnel.
    pub allow_h2_prior_knowledge: bool,
}

impl Grant {
    /// A grant by a policy resource's rule (`label`: the rule, as logs name it), opening the
    /// non-public ranges in `exceptions`. Resources never allow HTTP/2 with prior knowledge.
    pub fn by_resource(label: Arc<str>, exceptions: Vec<IpNet>) -> Self {
        Self { matched: label, exceptions, allow_h2_prior_knowledge: false }
    }

    /// Whether the granting rules open this non-public address. Metadata services, loopback and
    /// the unspecified address open only to a CIDR inside their own range (see
    /// `ranges::narrow_range`): a broad `cidrs: [0.0.0.0/0]` must neither hand out cloud
    /// credentials nor reach services listening on the gateway pod's own loopback.
    fn exempts(&self, class: Blocked, ip: &IpAddr) -> bool {
        let narrow = match class {
            Blocked::Metadata | Blocked::Loopback | Blocked::Unspecified => ranges::narrow_range(*ip),
            _ => None,
        };
        self.exceptions.iter().any(|c| c.contains(ip) && narrow.is_none_or(|range| range.contains(c)))
    }
}

#[derive(Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    index: RuleIndex,
    /// `blockedCidrs`: public on the wire, not in the operator's world.
    blocked: Vec<IpNet>,
}

impl Policy {
    pub fn new(rules: Vec<Rule>, blocked: Vec<IpNet>) -> Self {
        Self { index: RuleIndex::new(&rules), rules, blocked }
    }

    /// The rules and blocked ranges of a gateway config file (for the tools that decide as the
    /// gateway would: `explain`, `diff`).
    pub fn from_config_file(path: &std::path::Path) -> Result<Self, super::config::GatewayConfigError> {
        let config = super::config::load(path)?;
        Ok(Self::new(config.rules, config.blocked_cidrs))
    }

    /// The class of a non-public address: the built-in ranges first (so metadata keeps its
    /// stricter exemption), then the configured ones.
    fn classify(&self, ip: IpAddr) -> Option<Blocked> {
        ranges::classify(ip)
            .or_else(|| self.blocked.iter().any(|c| c.contains(&ip)).then_some(Blocked::Configured))
    }

    /// May `namespace` (`None`: unidentified client) reach `target` on `port`? Looks only at the
    /// namespace's rules that name this host or contain this address (see `index`).
    pub fn authorize(&self, namespace: Option<&str>, target: &Target, port: u16) -> Result<Grant, Deny> {
        let ns = namespace.ok_or(Deny::UnknownSource)?;
        match target {
            Target::Name(h) => self.grant(self.index.host_hits(ns, h), port),
            Target::Ip(ip) => self.grant(self.index.address_hits(ns, &self.rules, *ip), port),
        }
    }

    /// The grant of the hits whose rule allows `port`: named by the first hit in configuration
    /// order, with the CIDRs and HTTP/2 permission of every matching rule.
    fn grant(&self, hits: impl Iterator<Item = Hit>, port: u16) -> Result<Grant, Deny> {
        let mut first: Option<Hit> = None;
        let mut exceptions = Vec::new();
        let mut allow_h2_prior_knowledge = false;
        for hit in hits {
            let rule = &self.rules[hit.rule as usize];
            if !on_port(rule, port) {
                continue;
            }
            if first.is_none_or(|f| hit < f) {
                first = Some(hit);
            }
            exceptions.extend(rule.cidrs.iter().copied());
            allow_h2_prior_knowledge |= rule.allow_h2_prior_knowledge;
        }
        let first = first.ok_or(Deny::NotAllowed)?;
        // A rule with several matching patterns was counted once per pattern.
        exceptions.sort_unstable();
        exceptions.dedup();
        Ok(Grant { matched: self.index.label(first).clone(), exceptions, allow_h2_prior_knowledge })
    }

    /// The addresses the gateway may dial for a granted target, in resolver order: public ones,
    /// and non-public ones the granting rules name. An IP literal was granted by a CIDR, which is
    /// its explicit permission. Addresses are normalised (IPv4-mapped -> IPv4) before dialing.
    pub fn dialable(&self, grant: &Grant, target: &Target, resolved: &[IpAddr]) -> Result<Vec<IpAddr>, Deny> {
        if let Target::Ip(ip) = target {
            let ip = ip_literal::normalize(*ip);
            return match self.classify(ip) {
                Some(class) if !grant.exempts(class, &ip) => Err(Deny::Blocked(class)),
                _ => Ok(vec![ip]),
            };
        }
        let mut first_blocked = None;
        let ok: Vec<IpAddr> = resolved
            .iter()
            .map(|ip| ip_literal::normalize(*ip))
            .filter(|ip| match self.classify(*ip) {
                None => true,
                Some(class) if grant.exempts(class, ip) => true,
                Some(class) => {
                    first_blocked.get_or_insert(class);
                    false
                }
            })
            .collect();
        match (ok.is_empty(), first_blocked) {
            (false, _) => Ok(ok),
            (true, Some(class)) => Err(Deny::Blocked(class)),
            (true, None) => Err(Deny::ResolveFailed),
        }
    }
}

fn on_port(rule: &Rule, port: u16) -> bool {
    rule.ports.is_empty() || rule.ports.iter().any(|r| (r.first..=r.last).contains(&port))
}

#[cfg(test)]
mod tests {
    use super::{
        super::{config::Namespaces, host::HostPattern},
        *,
    };

    fn policy() -> Policy {
        let c = super::super::config::parse(
            r#"
listeners: {httpProxy: {listen: "0.0.0.0:3128"}}
sources: {kubernetes: true}
rules:
  - namespaces: [team-a]
    hosts: ["api.example.com", "*.example.org"]
    ports: [443]
  - namespaces: [team-a]
    hosts: ["internal.example.com"]
    cidrs: [10.1.0.0/16]
  - namespaces: ["*"]
    hosts: ["public.example.net"]
  - namespaces: [ops]
    cidrs: [0.0.0.0/0]
  - namespaces: [cloud]
    cidrs: [169.254.169.254/32]
  - namespaces: [local]
    cidrs: [127.0.0.1/32]
  - namespaces: [team-a]
    hosts: ["pods.example.com"]
    cidrs: [34.118.0.0/24]
    allowH2PriorKnowledge: true
blockedCidrs: [34.118.0.0/16]
"#,
        )
        .unwrap();
        Policy::new(c.rules, c.blocked_cidrs)
    }

    fn t(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_step_table() {
        let p = policy();
        type Case<'a> = (Option<&'a str>, &'a str, u16, Result<&'a str, Deny>);
        let cases: &[Case] = &[
            (Some("team-a"), "api.example.com", 443, Ok("api.example.com")),
            (Some("team-a"), "API.Example.COM.", 443, Ok("api.example.com")),
            (Some("team-a"), "api.example.com", 80, Err(Deny::NotAllowed)),
            (Some("team-b"), "api.example.com", 443, Err(Deny::NotAllowed)),
            (None, "api.example.com", 443, Err(Deny::UnknownSource)),
            (Some("team-a"), "a.b.example.org", 443, Ok("*.example.org")),
            (Some("team-a"), "example.org", 443, Err(Deny::NotAllowed)),
            (Some("team-a"), "evilexample.org", 443, Err(Deny::NotAllowed)),
            (Some("team-b"), "public.example.net", 8080, Ok("public.example.net")),
            (Some("team-a"), "10.1.2.3", 22, Ok("10.1.0.0/16")),
            (Some("team-a"), "0x0a.0x01.515", 22, Ok("10.1.0.0/16")),
            (Some("team-a"), "[::ffff:10.1.2.3]", 22, Ok("10.1.0.0/16")),
            (Some("team-a"), "10.2.0.1", 22, Err(Deny::NotAllowed)),
            (Some("team-a"), "93.184.216.34", 443, Err(Deny::NotAllowed)),
        ];
        for (ns, target, port, want) in cases {
            let got = p.authorize(*ns, &t(target), *port).map(|g| g.matched);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{ns:?} {target} {port}");
        }
    }

    #[test]
    fn resolved_addresses_are_checked() {
        let p = policy();
        let api = t("api.example.com");
        let g = p.authorize(Some("team-a"), &api, 443).unwrap();
        let dial = |addrs: &[&str]| p.dialable(&g, &api, &addrs.iter().map(|a| ip(a)).collect::<Vec<_>>());
        assert_eq!(dial(&["93.184.216.34"]), Ok(vec![ip("93.184.216.34")]));
        assert_eq!(dial(&["169.254.169.254"]), Err(Deny::Blocked(Blocked::Metadata)));
        assert_eq!(dial(&["::ffff:127.0.0.1"]), Err(Deny::Blocked(Blocked::Loopback)));
        assert_eq!(dial(&["10.1.0.1", "93.184.216.34"]), Ok(vec![ip("93.184.216.34")]));
        assert_eq!(dial(&["::ffff:93.184.216.34"]), Ok(vec![ip("93.184.216.34")]));
        assert_eq!(dial(&[]), Err(Deny::ResolveFailed));
        // The rule for internal.example.com opens 10.1.0.0/16 for that name only.
        let internal = t("internal.example.com");
        let gi = p.authorize(Some("team-a"), &internal, 443).unwrap();
        assert_eq!(p.dialable(&gi, &internal, &[ip("10.1.9.9")]), Ok(vec![ip("10.1.9.9")]));
        assert_eq!(p.dialable(&gi, &internal, &[ip("10.2.9.9")]), Err(Deny::Blocked(Blocked::Private)));
    }

    #[test]
    fn metadata_needs_a_rule_naming_exactly_it() {
        let p = policy();
        let md = t("169.254.169.254");
        let wide = p.authorize(Some("ops"), &md, 80).unwrap();
        assert_eq!(p.dialable(&wide, &md, &[]), Err(Deny::Blocked(Blocked::Metadata)));
        let other_private = t("10.9.9.9");
        let g = p.authorize(Some("ops"), &other_private, 80).unwrap();
        assert_eq!(p.dialable(&g, &other_private, &[]), Ok(vec![ip("10.9.9.9")]));
        let exact = p.authorize(Some("cloud"), &md, 80).unwrap();
        assert_eq!(p.dialable(&exact, &md, &[]), Ok(vec![ip("169.254.169.254")]));
    }

    #[test]
    fn loopback_and_unspecified_need_a_rule_inside_their_range() {
        let p = policy();
        // ops' 0.0.0.0/0 covers them but must not reach the gateway's own pod.
        for literal in ["127.0.0.1", "127.9.9.9", "0.0.0.0"] {
            let target = t(literal);
            let wide = p.authorize(Some("ops"), &target, 80).unwrap();
            assert!(p.dialable(&wide, &target, &[]).is_err(), "{literal}");
        }
        let lo = t("127.0.0.1");
        let named = p.authorize(Some("local"), &lo, 80).unwrap();
        assert_eq!(p.dialable(&named, &lo, &[]), Ok(vec![ip("127.0.0.1")]));
    }

    #[test]
    fn blocked_cidrs_are_refused_unless_a_rule_names_them() {
        let p = policy();
        let api = t("api.example.com");
        let g = p.authorize(Some("team-a"), &api, 443).unwrap();
        assert!(!g.allow_h2_prior_knowledge);
        assert_eq!(p.dialable(&g, &api, &[ip("34.118.1.1")]), Err(Deny::Blocked(Blocked::Configured)));
        assert_eq!(Deny::Blocked(Blocked::Configured).name(), "blocked_configured");
        // The rule for pods.example.com names part of the range: that part opens, for that name.
        let pods = t("pods.example.com");
        let gp = p.authorize(Some("team-a"), &pods, 80).unwrap();
        assert!(gp.allow_h2_prior_knowledge);
        assert_eq!(p.dialable(&gp, &pods, &[ip("34.118.0.9")]), Ok(vec![ip("34.118.0.9")]));
        assert_eq!(p.dialable(&gp, &pods, &[ip("34.118.1.9")]), Err(Deny::Blocked(Blocked::Configured)));
        // ops' 0.0.0.0/0 opens configured ranges too (only metadata, loopback and unspecified need
        // a CIDR inside their own range).
        let literal = t("34.118.1.1");
        let wide = p.authorize(Some("ops"), &literal, 80).unwrap();
        assert_eq!(p.dialable(&wide, &literal, &[]), Ok(vec![ip("34.118.1.1")]));
        // Azure's WireServer is a metadata service, public address or not.
        let wire = t("168.63.129.16");
        let wide = p.authorize(Some("ops"), &wire, 80).unwrap();
        assert_eq!(p.dialable(&wide, &wire, &[]), Err(Deny::Blocked(Blocked::Metadata)));
    }

    /// The decision as it was made before the index: every rule scanned in order.
    fn authorize_by_scan(p: &Policy, ns: &str, target: &Target, port: u16) -> Result<Grant, Deny> {
        let mut grant: Option<Grant> = None;
        for rule in &p.rules {
            let ns_ok = match &rule.namespaces {
                Namespaces::Any => true,
                Namespaces::Named(set) => set.contains(ns),
            };
            if !ns_ok || !on_port(rule, port) {
                continue;
            }
            let matched = match target {
                Target::Name(h) => rule.hosts.iter().find(|p| p.matches(h)).map(|p| match p {
                    HostPattern::Exact(h) => h.to_string(),
                    HostPattern::Subdomains(h) => format!("*.{h}"),
                }),
                Target::Ip(ip) => rule.cidrs.iter().find(|c| c.contains(ip)).map(ToString::to_string),
            };
            if let Some(matched) = matched {
                let g = grant.get_or_insert_with(|| Grant {
                    matched: matched.into(),
                    exceptions: Vec::new(),
                    allow_h2_prior_knowledge: false,
                });
                g.exceptions.extend(rule.cidrs.iter().copied());
                g.allow_h2_prior_knowledge |= rule.allow_h2_prior_knowledge;
            }
        }
        grant
            .map(|mut g| {
                g.exceptions.sort_unstable();
                g.exceptions.dedup();
                g
            })
            .ok_or(Deny::NotAllowed)
    }

    /// The index decides exactly as a scan of every rule would, on a configuration built to
    /// overlap: exact names and wildcards at several depths, the same host in several rules and
    /// namespaces, rules for every namespace, CIDRs inside and around each other, port ranges.
    #[test]
    fn the_index_decides_as_a_scan_of_every_rule() {
        let mut yaml = String::from(
            "listeners: {httpProxy: {listen: \"0.0.0.0:3128\"}}\nsources: {kubernetes: true}\nrules:\n",
        );
        let hosts =
            ["a.example.com", "*.example.com", "b.a.example.com", "*.a.example.com", "*.com", "example.com"];
        let cidrs =
            ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "11.0.0.0/8", "::ffff:0:0/96", "2001:db8::/32"];
        let namespaces = ["n0", "n1", "n2", "*"];
        for i in 0..60usize {
            let ns = namespaces[i % namespaces.len()];
            let h1 = hosts[i % hosts.len()];
            let h2 = hosts[(i * 7 + 3) % hosts.len()];
            let c = cidrs[(i * 5 + 1) % cidrs.len()];
            let mut extra = Vec::new();
            match i % 3 {
                0 => {}
                1 => extra.push("ports: [443]".to_owned()),
                _ => extra.push("ports: [\"80-443\", 8443]".to_owned()),
            }
            if i % 4 != 1 {
                extra.push(format!("cidrs: [\"{c}\"]"));
            }
            if i % 5 == 0 {
                extra.push("allowH2PriorKnowledge: true".to_owned());
            }
            let tail: String = extra.iter().map(|e| format!(", {e}")).collect();
            yaml.push_str(&format!("  - {{namespaces: [\"{ns}\"], hosts: [\"{h1}\", \"{h2}\"]{tail}}}\n"));
        }
        let c = super::super::config::parse(&yaml).unwrap();
        let p = Policy::new(c.rules, c.blocked_cidrs);
        let targets = [
            "example.com",
            "a.example.com",
            "b.a.example.com",
            "c.b.a.example.com",
            "x.example.com",
            "other.com",
            "com",
            "example.org",
            "10.1.2.3",
            "10.1.9.9",
            "10.9.9.9",
            "11.1.1.1",
            "12.0.0.1",
            "[2001:db8::1]",
            "[::ffff:10.1.2.3]",
        ];
        let mut granted = 0;
        for ns in ["n0", "n1", "n2", "n3"] {
            for target in targets {
                for port in [22, 80, 443, 8443] {
                    let want = authorize_by_scan(&p, ns, &t(target), port);
                    granted += usize::from(want.is_ok());
                    assert_eq!(p.authorize(Some(ns), &t(target), port), want, "{ns} {target} {port}");
                }
            }
        }
        assert!(granted > 50, "the configuration must grant a good share of the cases, granted {granted}");
    }

    #[test]
    fn bad_targets() {
        assert_eq!(Target::parse("exa mple.com"), Err(TargetError::BadTarget));
        assert_eq!(Target::parse(""), Err(TargetError::BadTarget));
        assert_eq!(Target::parse("2130706433"), Ok(Target::Ip(ip("127.0.0.1"))));
    }
}
