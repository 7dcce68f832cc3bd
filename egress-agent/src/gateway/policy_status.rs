//! The status the gateway writes on each policy object, so its author sees what became of it
//! with `kubectl get` / `kubectl describe`:
//!
//! - `Accepted`: `True` when the gateway applies this generation; `False`, reason `Invalid`,
//!   with what is wrong (and whether an earlier generation stays in force);
//! - `Programmed`: how many of the gateway's serving replicas apply this generation. `True`,
//!   reason `Programmed`, when all do; `False`, reason `Pending`, naming the replicas that do
//!   not yet; `False`, reason `Invalid`, while the generation is refused (naming what the
//!   replicas apply instead). Only a gateway that knows its replicas (it runs in a pod) reports
//!   it; the node agents take no part (they enforce namespaces' labels, not these objects).
//! - `PartiallyEffective` (`EgressPolicy` only, once accepted): `True`, reason
//!   `OutsideAdminBounds`, naming each rule and destination the Admin tier keeps from taking
//!   effect and why (see `tiers::bounds`); `False`, reason `WithinAdminBounds`, otherwise.
//!
//! Every replica computes the same conditions from the same objects and writes them with
//! server-side apply under one field manager, and only when they differ from what the object
//! carries, so replicas agree rather than fight. Each replica also writes, under a field
//! manager of its own, the generation it applies (`status.replicas`, one entry each), which is
//! what `Programmed` counts. A condition keeps its `lastTransitionTime` while its status stays
//! the same.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::crd::status::PolicyStatus;

/// The field manager of the conditions the gateway writes.
pub const FIELD_MANAGER: &str = "egressfw-gateway";

/// The field manager of one replica's own entry in `status.replicas`.
pub fn replica_field_manager(pod: &str) -> String {
    format!("{FIELD_MANAGER}/{pod}")
}

/// What the gateway found about one object's current generation.
pub struct Finding<'a> {
    pub generation: i64,
    /// Why the gateway refuses this generation, if it does.
    pub refused: Option<&'a str>,
    /// For an `EgressPolicy`: what keeps its rules from taking effect (empty: nothing).
    pub outside_bounds: Option<&'a [String]>,
    /// The gateway's serving replicas, each with the generation of this object it applies
    /// (`None`: none that it has reported); `None` when the gateway does not know its replicas.
    pub replicas: Option<&'a [(String, Option<i64>)]>,
}

/// The status `finding` calls for, given the object's `current` one.
pub fn wanted(finding: &Finding, current: Option<&PolicyStatus>, now: &Timestamp) -> PolicyStatus {
    let generation = finding.generation;
    let mut conditions = vec![match finding.refused {
        None => condition("Accepted", true, "Accepted", "the gateway applies this generation".into()),
        Some(reason) => condition("Accepted", false, "Invalid", reason.to_owned()),
    }];
    if let Some(replicas) = finding.replicas {
        conditions.push(programmed(generation, finding.refused.is_some(), replicas));
    }
    if let (None, Some(outside)) = (finding.refused, finding.outside_bounds) {
        conditions.push(if outside.is_empty() {
            condition(
                "PartiallyEffective",
                false,
                "WithinAdminBounds",
                "every rule is within what the Admin tier delegates to this namespace".into(),
            )
        } else {
            condition("PartiallyEffective", true, "OutsideAdminBounds", bounded(&outside.join("; ")))
        });
    }
    for c in &mut conditions {
        c.observed_generation = Some(generation);
        let earlier = current.and_then(|s| s.conditions.iter().find(|e| e.type_ == c.type_));
        c.last_transition_time = match earlier {
            Some(e) if e.status == c.status => e.last_transition_time.clone(),
            _ => Time(*now),
        };
    }
    PolicyStatus { observed_generation: Some(generation), conditions, replicas: Vec::new() }
}

/// Whether `current` already says what `wanted` does (the replicas' entries aside: each
/// replica keeps its own).
pub fn same_conditions(current: Option<&PolicyStatus>, wanted: &PolicyStatus) -> bool {
    current.is_some_and(|c| {
        c.observed_generation == wanted.observed_generation && c.conditions == wanted.conditions
    })
}

/// `Programmed`: how many of `replicas` apply `generation`.
fn programmed(generation: i64, refused: bool, replicas: &[(String, Option<i64>)]) -> Condition {
    let lagging: Vec<String> = replicas
        .iter()
        .filter(|(_, applied)| *applied != Some(generation))
        .map(|(name, applied)| match applied {
            Some(g) => format!("{name} applies generation {g}"),
            None if refused => format!("{name} applies none"),
            None => format!("{name} has not reported"),
        })
        .collect();
    let total = replicas.len();
    let applying = total - lagging.len();
    if refused {
        let message = format!("generation {generation} is refused; {}", lagging.join(", "));
        return condition("Programmed", false, "Invalid", bounded(&message));
    }
    if lagging.is_empty() {
        let message = match total {
            1 => format!("the gateway's one replica applies generation {generation}"),
            _ => format!("all {total} gateway replicas apply generation {generation}"),
        };
        return condition("Programmed", true, "Programmed", message);
    }
    let message = format!(
        "{applying} of {total} gateway replicas apply generation {generation}; {}",
        lagging.join(", ")
    );
    condition("Programmed", false, "Pending", bounded(&message))
}

fn condition(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: None,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// A condition's message may hold 32,768 bytes; a longer one is cut at a character boundary.
fn bounded(message: &str) -> String {
    const MAX: usize = 32_768;
    const MORE: &str = " (and more)";
    if message.len() <= MAX {
        return message.to_owned();
    }
    let mut end = MAX - MORE.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn summary(s: &PolicyStatus) -> Vec<String> {
        s.conditions
            .iter()
            .map(|c| {
                format!(
                    "{} {} {} g{} t{}",
                    c.type_,
                    c.status,
                    c.reason,
                    c.observed_generation.unwrap(),
                    c.last_transition_time.0.as_second()
                )
            })
            .collect()
    }

    #[test]
    fn conditions_follow_the_finding_and_keep_their_transition_time() {
        let outside = vec!["rule \"a\": x.example is not delegated".to_owned()];
        let within: Vec<String> = Vec::new();
        let first = wanted(
            &Finding { generation: 1, refused: None, outside_bounds: Some(&within), replicas: None },
            None,
            &at(10),
        );
        assert_eq!(
            summary(&first),
            ["Accepted True Accepted g1 t10", "PartiallyEffective False WithinAdminBounds g1 t10"]
        );

        // Generation 2 goes outside the bounds: only that condition changes its time.
        let second = wanted(
            &Finding { generation: 2, refused: None, outside_bounds: Some(&outside), replicas: None },
            Some(&first),
            &at(20),
        );
        assert_eq!(
            summary(&second),
            ["Accepted True Accepted g2 t10", "PartiallyEffective True OutsideAdminBounds g2 t20"]
        );
        assert_eq!(second.conditions[1].message, outside[0]);

        // Generation 3 is refused: no PartiallyEffective about a generation that is not applied.
        let third = wanted(
            &Finding {
                generation: 3,
                refused: Some("bad selector"),
                outside_bounds: Some(&outside),
                replicas: None,
            },
            Some(&second),
            &at(30),
        );
        assert_eq!(summary(&third), ["Accepted False Invalid g3 t30"]);
        assert_eq!(third.conditions[0].message, "bad selector");
        // Nothing new: the same status, which the writer then leaves alone.
        let again = wanted(
            &Finding {
                generation: 3,
                refused: Some("bad selector"),
                outside_bounds: Some(&outside),
                replicas: None,
            },
            Some(&third),
            &at(40),
        );
        assert_eq!(again, third);
        // A ClusterEgressPolicy has no bounds to be outside of.
        let cluster = wanted(
            &Finding { generation: 1, refused: None, outside_bounds: None, replicas: None },
            None,
            &at(50),
        );
        assert_eq!(summary(&cluster), ["Accepted True Accepted g1 t50"]);
    }

    #[test]
    fn programmed_counts_the_replicas_that_apply_the_generation() {
        let replicas = |states: &[Option<i64>]| -> Vec<(String, Option<i64>)> {
            states.iter().enumerate().map(|(i, g)| (format!("gw-{i}"), *g)).collect()
        };
        let programmed = |generation, refused, states: &[Option<i64>]| {
            let replicas = replicas(states);
            let finding = Finding { generation, refused, outside_bounds: None, replicas: Some(&replicas) };
            let status = wanted(&finding, None, &at(1));
            let c = status.conditions.iter().find(|c| c.type_ == "Programmed").unwrap().clone();
            format!("{} {}: {}", c.status, c.reason, c.message)
        };
        assert_eq!(
            programmed(3, None, &[Some(3), Some(3)]),
            "True Programmed: all 2 gateway replicas apply generation 3"
        );
        assert_eq!(
            programmed(1, None, &[Some(1)]),
            "True Programmed: the gateway's one replica applies generation 1"
        );
        assert_eq!(
            programmed(3, None, &[Some(3), Some(2), None]),
            "False Pending: 1 of 3 gateway replicas apply generation 3; gw-1 applies generation 2, gw-2 has not reported"
        );
        assert_eq!(
            programmed(3, Some("bad"), &[Some(2), Some(2)]),
            "False Invalid: generation 3 is refused; gw-0 applies generation 2, gw-1 applies generation 2"
        );
        assert_eq!(
            programmed(1, Some("bad"), &[None]),
            "False Invalid: generation 1 is refused; gw-0 applies none"
        );
        // The order the conditions come in, whatever else holds.
        let replicas = replicas(&[Some(1)]);
        let within: Vec<String> = Vec::new();
        let all = wanted(
            &Finding {
                generation: 1,
                refused: None,
                outside_bounds: Some(&within),
                replicas: Some(&replicas),
            },
            None,
            &at(1),
        );
        let types: Vec<&str> = all.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Accepted", "Programmed", "PartiallyEffective"]);
        // Only the conditions count as a difference to write.
        let mut carried = all.clone();
        carried
            .replicas
            .push(crate::crd::status::ReplicaStatus { name: "gw-0".into(), applied_generation: 1 });
        assert!(same_conditions(Some(&carried), &all));
        assert!(!same_conditions(None, &all));
    }

    #[test]
    fn long_messages_are_cut_to_what_the_api_server_takes() {
        let long = "é".repeat(20_000);
        let cut = bounded(&long);
        assert!(cut.len() <= 32_768 && cut.ends_with(" (and more)"), "{}", cut.len());
        assert_eq!(bounded("short"), "short");
    }
}
