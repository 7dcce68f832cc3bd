//! Routing: every request goes through one handler that counts it, answers 503 during an
//! outage, and splits the path the way the apiserver does.

use std::{collections::HashMap, sync::Arc, sync::atomic::Ordering};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    Shared, discovery,
    query::{FieldSelector, Filter, LabelSelector},
    resources::{self, ResourceId},
    store::{ObjectKey, StoreError},
    watch::{self, WatchRequest},
};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(params): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let path = uri.path();
    *shared.stats().requests.entry(format!("{method} {path}")).or_default() += 1;
    if !shared.available.load(Ordering::SeqCst) {
        shared.stats().unavailable += 1;
        // Retry-After makes kube's client retry every second instead of backing off
        // exponentially, so recovery after the outage is prompt and the tests stay short.
        let mut refused = status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the fake API server is unavailable (set_available(false))",
        );
        refused.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return refused;
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let found = match (&method, segments.as_slice()) {
        (&Method::GET, ["version"]) => Some(discovery::version()),
        (&Method::GET, ["api"]) => Some(discovery::core_versions(shared.addr)),
        (&Method::GET, ["apis"]) => Some(discovery::groups()),
        (&Method::GET, ["api", version]) => discovery::resources("", version),
        (&Method::GET, ["apis", group, version]) => discovery::resources(group, version),
        (_, ["api", version, rest @ ..]) => {
            return resource_request(&shared, &method, "", version, rest, &params, &body);
        }
        (_, ["apis", group, version, rest @ ..]) => {
            return resource_request(&shared, &method, group, version, rest, &params, &body);
        }
        _ => None,
    };
    match found {
        Some(v) => Json(v).into_response(),
        None => status(StatusCode::NOT_FOUND, "NotFound", format!("the server could not find {path}")),
    }
}

/// A path below `/api/v1` or `/apis/{group}/{version}`, resolved.
struct Target {
    resource: ResourceId,
    namespace: Option<String>,
    name: Option<String>,
}

fn target(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let (plural, namespace, name) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, None, Some(*name)),
        ["namespaces", ns, plural] => (*plural, Some(*ns), None),
        ["namespaces", ns, plural, name] => (*plural, Some(*ns), Some(*name)),
        _ => return None,
    };
    let resource = resources::by_path(group, version, plural)?;
    let namespaced = resources::get(resource).namespaced;
    // Cluster-scoped kinds have no namespaced path; namespaced ones can be listed across all
    // namespaces but not fetched by name without one.
    if (namespace.is_some() && !namespaced) || (namespace.is_none() && name.is_some() && namespaced) {
        return None;
    }
    Some(Target { resource, namespace: namespace.map(str::to_owned), name: name.map(str::to_owned) })
}

fn resource_request(
    shared: &Arc<Shared>,
    method: &Method,
    group: &str,
    version: &str,
    rest: &[&str],
    params: &HashMap<String, String>,
    body: &Bytes,
) -> Response {
    let Some(t) = target(group, version, rest) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no resource at {rest:?} in {group}/{version}"),
        );
    };
    let r = resources::get(t.resource);
    let key = |name: String| ObjectKey {
        resource: t.resource,
        namespace: t.namespace.clone().unwrap_or_default(),
        name,
    };
    match (method, t.name.clone()) {
        (&Method::GET, Some(name)) => match shared.store().get(&key(name.clone())) {
            Some(obj) => Json(obj).into_response(),
            None => not_found(r.plural, &name),
        },
        (&Method::GET, None) => {
            let filter = match filter(t.namespace.clone(), params) {
                Ok(f) => f,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
            };
            let flag = |name: &str| params.get(name).is_some_and(|v| v == "true" || v == "1");
            if flag("watch") {
                match watch_request(t.resource, filter, params, flag) {
                    Ok(req) => watch::serve(shared, req),
                    Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", e),
                }
            } else {
                list(shared, t.resource, &filter)
            }
        }
        (&Method::DELETE, Some(name)) => match shared.store().delete(&key(name.clone())) {
            Some(change) => Json(&change.object).into_response(),
            None => not_found(r.plural, &name),
        },
        (&Method::POST, None) if r.writable => create(shared, t.resource, t.namespace.as_deref(), body),
        (&Method::PATCH, Some(name)) if r.writable => patch(shared, &key(name), body),
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not implemented for {} in the fake API server", r.plural),
        ),
    }
}

fn filter(namespace: Option<String>, params: &HashMap<String, String>) -> Result<Filter, String> {
    let param = |name: &str| params.get(name).map_or("", String::as_str);
    Ok(Filter {
        namespace,
        labels: LabelSelector::parse(param("labelSelector"))?,
        fields: FieldSelector::parse(param("fieldSelector"))?,
    })
}

fn watch_request(
    resource: ResourceId,
    filter: Filter,
    params: &HashMap<String, String>,
    flag: impl Fn(&str) -> bool,
) -> Result<WatchRequest, String> {
    let since = match params.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => Some(rv.parse::<u64>().map_err(|_| format!("invalid resourceVersion {rv:?}"))?),
    };
    let timeout = params
        .get("timeoutSeconds")
        .map(|t| t.parse::<u64>().map_err(|_| format!("invalid timeoutSeconds {t:?}")))
        .transpose()?
        .map(std::time::Duration::from_secs);
    Ok(WatchRequest {
        resource,
        filter,
        since,
        bookmarks: flag("allowWatchBookmarks"),
        initial_events: flag("sendInitialEvents"),
        timeout,
    })
}

/// Everything at once: `limit` is ignored and no `continue` token is ever returned, and any
/// `resourceVersion`/`resourceVersionMatch` is served from the current state.
fn list(shared: &Shared, resource: ResourceId, filter: &Filter) -> Response {
    let r = resources::get(resource);
    let store = shared.store();
    let items: Vec<&Value> =
        store.list(resource, filter.namespace.as_deref()).filter(|o| filter.matches(o)).collect();
    let body = json!({
        "apiVersion": r.api_version(),
        "kind": r.list_kind(),
        "metadata": {"resourceVersion": store.current().to_string()},
        "items": items,
    });
    drop(store);
    shared.stats().lists += 1;
    Json(body).into_response()
}

fn create(shared: &Shared, resource: ResourceId, namespace: Option<&str>, body: &Bytes) -> Response {
    let r = resources::get(resource);
    let mut obj: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not a JSON object"),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", format!("the body is not JSON: {e}")),
    };
    if let Some(found) = obj.get("kind").and_then(Value::as_str)
        && found != r.kind
    {
        return status(StatusCode::BAD_REQUEST, "BadRequest", format!("kind {found} posted to {}", r.plural));
    }
    let metadata = &mut obj["metadata"];
    if let Some(ns) = namespace {
        match metadata.get("namespace").and_then(Value::as_str) {
            Some(found) if found != ns => {
                let message = format!("the namespace of the object ({found}) does not match the path ({ns})");
                return status(StatusCode::BAD_REQUEST, "BadRequest", message);
            }
            _ => metadata["namespace"] = Value::String(ns.to_owned()),
        }
    }
    if metadata.get("name").is_none_or(Value::is_null)
        && let Some(prefix) = metadata.get("generateName").and_then(Value::as_str)
    {
        let suffix = shared.store().current();
        metadata["name"] = Value::String(format!("{prefix}{suffix:x}"));
    }
    let created = shared.store().create(resource, obj);
    match created {
        Ok(change) => {
            shared.stats().events_posted += 1;
            (StatusCode::CREATED, Json(&change.object)).into_response()
        }
        Err(e) => store_error(&e),
    }
}

/// A JSON merge patch (RFC 7386), whatever the content type says; enough for the event
/// recorder, which patches the series of a repeated Event.
fn patch(shared: &Shared, key: &ObjectKey, body: &Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return status(StatusCode::BAD_REQUEST, "BadRequest", format!("the patch is not JSON: {e}"));
        }
    };
    let mut store = shared.store();
    let Some(mut obj) = store.get(key).cloned() else {
        return not_found(resources::get(key.resource).plural, &key.name);
    };
    merge(&mut obj, &patch);
    // The identity comes from the path, whatever the patch says.
    obj["metadata"]["name"] = Value::String(key.name.clone());
    obj["metadata"]["namespace"] = Value::String(key.namespace.clone());
    match store.put(key.resource, obj) {
        Ok(change) => Json(&change.object).into_response(),
        Err(e) => store_error(&e),
    }
}

fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(target) = target else { unreachable!("just made an object") };
    for (k, v) in fields {
        if v.is_null() {
            target.remove(k);
        } else {
            merge(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn store_error(e: &StoreError) -> Response {
    match e {
        StoreError::Invalid(m) => status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m.clone()),
        StoreError::AlreadyExists(m) => status(StatusCode::CONFLICT, "AlreadyExists", m.clone()),
    }
}

fn not_found(plural: &str, name: &str) -> Response {
    status(StatusCode::NOT_FOUND, "NotFound", format!("{plural} {name:?} not found"))
}

/// A `metav1.Status` failure, which kube turns into `Error::Api` with this code and reason.
pub(crate) fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch() {
        let mut obj = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut obj, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(obj, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    #[test]
    fn paths() {
        let t = target("", "v1", &["namespaces", "kube-system"]).unwrap();
        assert_eq!(resources::get(t.resource).kind, "Namespace");
        assert_eq!(t.name.as_deref(), Some("kube-system"));
        let t = target("discovery.k8s.io", "v1", &["namespaces", "ns", "endpointslices"]).unwrap();
        assert_eq!(t.namespace.as_deref(), Some("ns"));
        assert!(target("", "v1", &["pods"]).unwrap().namespace.is_none());
        assert!(target("", "v1", &["pods", "p"]).is_none());
        assert!(target("", "v1", &["namespaces", "ns", "nodes"]).is_none());
        assert!(target("", "v1", &["deployments"]).is_none());
    }
}
