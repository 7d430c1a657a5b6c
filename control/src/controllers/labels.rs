//! `metav1.LabelSelector` matching and owner references: what controllers use to find the
//! objects they own.
use serde_json::{Map, Value};

/// Whether `labels` satisfy a `LabelSelector` (`matchLabels` and `matchExpressions` with `In`,
/// `NotIn`, `Exists`, `DoesNotExist`). An empty selector matches everything, as in Kubernetes;
/// a missing one matches nothing.
pub fn selector_matches(selector: Option<&Value>, labels: Option<&Map<String, Value>>) -> bool {
    let Some(sel) = selector.filter(|s| s.is_object()) else {
        return false;
    };
    let empty = Map::new();
    let labels = labels.unwrap_or(&empty);
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in ml {
            if labels.get(k) != Some(v) {
                return false;
            }
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let have = labels.get(key).and_then(Value::as_str);
            let ok = match e
                .get("operator")
                .and_then(Value::as_str)
                .unwrap_or_default()
            {
                "In" => have.is_some_and(|h| values.contains(&h)),
                "NotIn" => have.is_none_or(|h| !values.contains(&h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

/// The object's labels.
pub fn labels_of(obj: &Value) -> Option<&Map<String, Value>> {
    obj.pointer("/metadata/labels").and_then(Value::as_object)
}

/// The object's `metadata.uid`.
pub fn uid_of(obj: &Value) -> &str {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The object's `metadata.name`.
pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The object's `metadata.namespace`.
pub fn namespace_of(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The managing owner reference (`controller: true`), if any.
pub fn controller_of(obj: &Value) -> Option<&Value> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
}

/// The pod informer's index: the managing controller's uid, or [`orphans_in`] of the
/// namespace for objects without any owner (the ones a controller may adopt).
pub fn owner_index(obj: &Value) -> Option<String> {
    match controller_of(obj)
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
    {
        Some(uid) => Some(uid.to_string()),
        None if obj.pointer("/metadata/ownerReferences").is_none() => {
            Some(orphans_in(namespace_of(obj)))
        }
        None => None,
    }
}

/// The [`owner_index`] value of the objects in `ns` that have no owner.
pub fn orphans_in(ns: &str) -> String {
    format!("orphans/{ns}")
}

/// An owner reference to `owner` marking it as the managing controller.
pub fn controller_ref(owner: &Value, api_version: &str, kind: &str) -> Value {
    serde_json::json!({
        "apiVersion": api_version,
        "kind": kind,
        "name": name_of(owner),
        "uid": uid_of(owner),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Whether the object is being deleted.
pub fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors() {
        let labels = json!({"app": "web", "tier": "front"});
        let l = labels.as_object();
        assert!(selector_matches(
            Some(&json!({"matchLabels": {"app": "web"}})),
            l
        ));
        assert!(!selector_matches(
            Some(&json!({"matchLabels": {"app": "db"}})),
            l
        ));
        assert!(selector_matches(Some(&json!({})), l));
        assert!(!selector_matches(None, l));
        let e = json!({"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["front", "back"]},
            {"key": "env", "operator": "DoesNotExist"},
        ]});
        assert!(selector_matches(Some(&e), l));
        let e =
            json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]});
        assert!(!selector_matches(Some(&e), l));
    }
}
