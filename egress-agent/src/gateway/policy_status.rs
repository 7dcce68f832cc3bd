//! The status the gateway writes on each policy object, so its author sees what became of it
//! with `kubectl get` / `kubectl describe`:
//!
//! - `Accepted`: `True` when the gateway applies this generation; `False`, reason `Invalid`,
//!   with what is wrong (and whether an earlier generation stays in force);
//! - `PartiallyEffective` (`EgressPolicy` only, once accepted): `True`, reason
//!   `OutsideAdminBounds`, naming each rule and destination the Admin tier keeps from taking
//!   effect and why (see `tiers::bounds`); `False`, reason `WithinAdminBounds`, otherwise.
//!
//! Every replica computes the same status from the same objects and writes it with server-side
//! apply under one field manager, and only when it differs from what the object carries, so
//! replicas agree rather than fight. A condition keeps its `lastTransitionTime` while its
//! status stays the same.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::crd::status::PolicyStatus;

/// The field manager of the status the gateway writes.
pub const FIELD_MANAGER: &str = "egressfw-gateway";

/// What the gateway found about one object's current generation.
pub struct Finding<'a> {
    pub generation: i64,
    /// Why the gateway refuses this generation, if it does.
    pub refused: Option<&'a str>,
    /// For an `EgressPolicy`: what keeps its rules from taking effect (empty: nothing).
    pub outside_bounds: Option<&'a [String]>,
}

/// The status `finding` calls for, given the object's `current` one.
pub fn wanted(finding: &Finding, current: Option<&PolicyStatus>, now: &Timestamp) -> PolicyStatus {
    let generation = finding.generation;
    let mut conditions = vec![match finding.refused {
        None => condition("Accepted", true, "Accepted", "the gateway applies this generation".into()),
        Some(reason) => condition("Accepted", false, "Invalid", reason.to_owned()),
    }];
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
    PolicyStatus { observed_generation: Some(generation), conditions }
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
        let first =
            wanted(&Finding { generation: 1, refused: None, outside_bounds: Some(&within) }, None, &at(10));
        assert_eq!(
            summary(&first),
            ["Accepted True Accepted g1 t10", "PartiallyEffective False WithinAdminBounds g1 t10"]
        );

        // Generation 2 goes outside the bounds: only that condition changes its time.
        let second = wanted(
            &Finding { generation: 2, refused: None, outside_bounds: Some(&outside) },
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
            &Finding { generation: 3, refused: Some("bad selector"), outside_bounds: Some(&outside) },
            Some(&second),
            &at(30),
        );
        assert_eq!(summary(&third), ["Accepted False Invalid g3 t30"]);
        assert_eq!(third.conditions[0].message, "bad selector");
        // Nothing new: the same status, which the writer then leaves alone.
        let again = wanted(
            &Finding { generation: 3, refused: Some("bad selector"), outside_bounds: Some(&outside) },
            Some(&third),
            &at(40),
        );
        assert_eq!(again, third);
        // A ClusterEgressPolicy has no bounds to be outside of.
        let cluster = wanted(&Finding { generation: 1, refused: None, outside_bounds: None }, None, &at(50));
        assert_eq!(summary(&cluster), ["Accepted True Accepted g1 t50"]);
    }

    #[test]
    fn long_messages_are_cut_to_what_the_api_server_takes() {
        let long = "é".repeat(20_000);
        let cut = bounded(&long);
        assert!(cut.len() <= 32_768 && cut.ends_with(" (and more)"), "{}", cut.len());
        assert_eq!(bounded("short"), "short");
    }
}
