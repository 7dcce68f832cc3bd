//! Label and field selectors, parsed from the query string and matched against stored objects.

use serde_json::Value;

/// One label requirement, as `kubectl get -l` understands it.
#[derive(Debug, PartialEq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// `a=b,c!=d,e,!f,g in (h,i),j notin (k)`; every requirement must hold.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if !part.is_empty() {
                out.push(parse_requirement(part)?);
            }
        }
        Ok(Self(out))
    }

    /// `labels` is the object's `metadata.labels`, if any.
    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            // As in Kubernetes, a missing label satisfies `!=` and `notin`.
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        })
    }
}

/// Splits on the commas that separate requirements, not those inside `in (a,b)`.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_requirement(r: &str) -> Result<Requirement, String> {
    if let Some(key) = r.strip_prefix('!') {
        return Ok(Requirement::NotExists(key_of(key.trim(), r)?));
    }
    if let Some((k, v)) = r.split_once("!=") {
        return Ok(Requirement::NotEquals(key_of(k.trim(), r)?, value_of(v.trim(), r)?));
    }
    if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
        return Ok(Requirement::Equals(key_of(k.trim(), r)?, value_of(v.trim(), r)?));
    }
    if let Some((head, tail)) = r.split_once('(') {
        let values = tail
            .strip_suffix(')')
            .ok_or_else(|| format!("label selector {r:?}: missing ')'"))?
            .split(',')
            .map(|v| value_of(v.trim(), r))
            .collect::<Result<Vec<_>, _>>()?;
        let mut words = head.split_whitespace();
        let (key, op) = (words.next().unwrap_or_default(), words.next());
        if words.next().is_some() {
            return Err(format!("label selector {r:?}: expected `key in (...)`"));
        }
        let key = key_of(key, r)?;
        return match op {
            Some("in") => Ok(Requirement::In(key, values)),
            Some("notin") => Ok(Requirement::NotIn(key, values)),
            _ => Err(format!("label selector {r:?}: expected `in` or `notin`")),
        };
    }
    Ok(Requirement::Exists(key_of(r, r)?))
}

/// Label keys: an optional DNS prefix and `/`, then a name.
fn key_of(key: &str, whole: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok { Ok(key.to_owned()) } else { Err(format!("label selector {whole:?}: invalid key {key:?}")) }
}

/// Label values may be empty.
fn value_of(value: &str, whole: &str) -> Result<String, String> {
    if value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        Ok(value.to_owned())
    } else {
        Err(format!("label selector {whole:?}: invalid value {value:?}"))
    }
}

/// `metadata.name=x,spec.nodeName!=y`. Any dotted path into the object is accepted (the real
/// API allows only a few per kind); a missing field reads as the empty string, which is how
/// `spec.nodeName=` finds unscheduled pods.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (p, true, v)
            } else {
                return Err(format!("field selector {part:?}: expected `field=value` or `field!=value`"));
            };
            out.push((path.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| (field(obj, path) == *value) == *equal)
    }
}

fn field(obj: &Value, path: &str) -> String {
    let found = path.split('.').try_fold(obj, |v, segment| v.get(segment));
    match found {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// What one list or watch asks for: a namespace (from the path) and the two selectors.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        let metadata = obj.get("metadata");
        let in_namespace = self
            .namespace
            .as_deref()
            .is_none_or(|ns| metadata.and_then(|m| m.get("namespace")).and_then(Value::as_str) == Some(ns));
        let labels = metadata.and_then(|m| m.get("labels")).and_then(Value::as_object);
        in_namespace && self.labels.matches(labels) && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(labels: &Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "node-a"}})
    }

    fn labels_match(selector: &str, labels: &Value) -> bool {
        let sel = LabelSelector::parse(selector).unwrap();
        sel.matches(pod(labels)["metadata"]["labels"].as_object())
    }

    #[test]
    fn equality_and_existence() {
        let l = json!({"app": "web", "tier": "front"});
        assert!(labels_match("app=web", &l));
        assert!(labels_match("app==web,tier", &l));
        assert!(!labels_match("app=web,tier!=front", &l));
        assert!(labels_match("app!=db,!missing", &l));
        assert!(!labels_match("!app", &l));
        assert!(!labels_match("missing", &l));
        assert!(labels_match("", &l));
        assert!(labels_match("app!=web", &json!(null)));
    }

    #[test]
    fn set_based() {
        let l = json!({"app": "web"});
        assert!(labels_match("app in (db, web),tier notin (back)", &l));
        assert!(!labels_match("app notin (web)", &l));
        assert!(!labels_match("app in (db)", &l));
        assert!(LabelSelector::parse("app in (web").is_err());
        assert!(LabelSelector::parse("app within (web)").is_err());
        assert!(LabelSelector::parse("a=b c").is_err());
    }

    #[test]
    fn fields() {
        let p = pod(&json!({}));
        let sel = |s: &str| FieldSelector::parse(s).unwrap().matches(&p);
        assert!(sel("spec.nodeName=node-a,metadata.namespace==ns"));
        assert!(!sel("spec.nodeName!=node-a"));
        assert!(sel("metadata.name!=q"));
        assert!(sel("status.podIP="));
        assert!(FieldSelector::parse("spec.nodeName").is_err());
    }

    #[test]
    fn filter_checks_namespace() {
        let f = Filter { namespace: Some("other".into()), ..Filter::default() };
        assert!(!f.matches(&pod(&json!({}))));
        assert!(Filter::default().matches(&pod(&json!({}))));
    }
}
