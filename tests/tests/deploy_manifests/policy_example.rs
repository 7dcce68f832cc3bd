//! The policy example (deploy/examples/self-service-egress/), rendered by the real kustomize and
//! read the way the gateway reads the objects: every object is a policy resource or a
//! Namespace, nothing is refused, and the team's rules fall inside and outside the platform's
//! bounds as the comments say. (`k8s_policy_crds` applies it to a real API server.)

#[allow(clippy::wildcard_imports)]
use super::*;
use egress_agent::{
    crd::{ClusterEgressPolicy, EgressPolicy},
    gateway::{
        decision,
        policy::{Policy, Target},
        tiers::{Client, Labels, Tiers, Via},
    },
};

const EXAMPLE: &str = "self-service-egress";

#[test]
fn the_self_service_example_shows_rules_inside_and_outside_the_platforms_bounds() {
    let dir = deploy_dir().join(EXAMPLES_DIR).join(EXAMPLE);
    assert!(is_policy_example(&dir), "{EXAMPLE} builds on another kustomization: it holds policies only");
    let (objects, _) = policy_rendering(&dir);
    let (mut cluster, mut namespaced) = (Vec::new(), Vec::new());
    for o in &objects {
        match o.value["kind"].as_str() {
            Some("ClusterEgressPolicy") => cluster.push(parse::<ClusterEgressPolicy>(o)),
            Some("EgressPolicy") => namespaced.push(parse::<EgressPolicy>(o)),
            Some("Namespace") => {
                parse::<Namespace>(o);
            }
            other => panic!("{}: {other:?} in a policy example", o.file),
        }
    }
    assert_eq!((cluster.len(), namespaced.len()), (1, 1), "the platform's policy and the team's");
    let (tiers, rejected) = Tiers::build(&cluster, &namespaced);
    assert!(rejected.is_empty(), "the gateway would refuse: {rejected:?}");

    let labels: Labels = [("kubernetes.io/metadata.name".to_owned(), "team-a".to_owned())].into();
    assert_eq!(
        tiers.outside_bounds("team-a", &labels, "ci"),
        [
            "rule \"release-downloads\": objects.githubusercontent.com is not delegated to namespace team-a by any Admin Pass",
            "rule \"paste\": pastebin.com is decided first by ClusterEgressPolicy/platform#no-paste-sites (Deny)",
        ]
    );
    let ci: Labels = [("app".to_owned(), "ci".to_owned())].into();
    let client = Client { namespace: "team-a", namespace_labels: &labels, pod_labels: &ci };
    let decide = |host: &str| {
        let target = Target::parse(host).unwrap();
        decision::authorize(&Policy::default(), &tiers, Some(&client), &target, 443, Via::Connect)
            .map(|g| g.matched.to_string())
            .map_err(|r| r.deny.name())
    };
    assert_eq!(decide("api.github.com"), Ok("EgressPolicy/team-a/ci#github-api".to_owned()));
    assert_eq!(decide("objects.githubusercontent.com"), Err("not_allowed"));
    assert_eq!(decide("pastebin.com"), Err("denied_by_policy"));
}

fn parse<T: DeserializeOwned>(o: &Object) -> T {
    serde_json::from_value(o.value.clone()).unwrap_or_else(|e| panic!("{}: {e}", o.file))
}
