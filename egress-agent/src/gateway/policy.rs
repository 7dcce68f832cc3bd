//! Allow rules, in two steps: may this namespace ask for this name (or address) on this port,
//! and then, once the gateway itself has resolved the name, which of the addresses may it dial.
//! Default deny. Non-public addresses pass only when the matching rule names them in `cidrs`.

use std::{fmt, net::IpAddr};

pub use super::target::Target;

use ipnet::IpNet;

use super::{
    config::{Namespaces, Rule},
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
    /// The pattern or CIDR that matched, as written: a bounded label for metrics.
    pub matched: String,
    exceptions: Vec<IpNet>,
    /// One of the granting rules allows HTTP/2 with prior knowledge inside a tunnel.
    pub allow_h2_prior_knowledge: bool,
}

impl Grant {
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
    /// `blockedCidrs`: public on the wire, not in the operator's world.
    blocked: Vec<IpNet>,
}

impl Policy {
    pub fn new(rules: Vec<Rule>, blocked: Vec<IpNet>) -> Self {
        Self { rules, blocked }
    }

    /// The class of a non-public address: the built-in ranges first (so metadata keeps its
    /// stricter exemption), then the configured ones.
    fn classify(&self, ip: IpAddr) -> Option<Blocked> {
        ranges::classify(ip)
            .or_else(|| self.blocked.iter().any(|c| c.contains(&ip)).then_some(Blocked::Configured))
    }

    /// May `namespace` (`None`: unidentified client) reach `target` on `port`?
    pub fn authorize(&self, namespace: Option<&str>, target: &Target, port: u16) -> Result<Grant, Deny> {
        let ns = namespace.ok_or(Deny::UnknownSource)?;
        let mut grant: Option<Grant> = None;
        for rule in self.rules.iter().filter(|r| applies(r, ns, port)) {
            let matched = match target {
                Target::Name(h) => rule.hosts.iter().find(|p| p.matches(h)).map(pattern_text),
                Target::Ip(ip) => rule.cidrs.iter().find(|c| c.contains(ip)).map(ToString::to_string),
            };
            if let Some(matched) = matched {
                let g = grant.get_or_insert_with(|| Grant {
                    matched,
                    exceptions: Vec::new(),
                    allow_h2_prior_knowledge: false,
                });
                g.exceptions.extend(rule.cidrs.iter().copied());
                g.allow_h2_prior_knowledge |= rule.allow_h2_prior_knowledge;
            }
        }
        grant.ok_or(Deny::NotAllowed)
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

fn applies(rule: &Rule, ns: &str, port: u16) -> bool {
    let ns_ok = match &rule.namespaces {
        Namespaces::Any => true,
        Namespaces::Named(set) => set.contains(ns),
    };
    ns_ok && (rule.ports.is_empty() || rule.ports.iter().any(|r| (r.first..=r.last).contains(&port)))
}

fn pattern_text(p: &super::host::HostPattern) -> String {
    match p {
        super::host::HostPattern::Exact(h) => h.to_string(),
        super::host::HostPattern::Subdomains(h) => format!("*.{h}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn bad_targets() {
        assert_eq!(Target::parse("exa mple.com"), Err(TargetError::BadTarget));
        assert_eq!(Target::parse(""), Err(TargetError::BadTarget));
        assert_eq!(Target::parse("2130706433"), Ok(Target::Ip(ip("127.0.0.1"))));
    }
}
