//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and Kubernetes strategic
//! merge patch (lists merged by their merge keys, `$patch`, `$setElementOrder`, `$retainKeys`,
//! `$deleteFromPrimitiveList` directives).

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` deletes, everything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Decodes one RFC 6901 pointer segment.
fn unescape(seg: &str) -> String {
    seg.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, segs: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for s in segs {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(s)
                .ok_or_else(|| format!("missing path segment {s:?}"))?,
            Value::Array(a) => {
                let i: usize = s
                    .parse()
                    .map_err(|_| format!("invalid array index {s:?}"))?;
                a.get_mut(i)
                    .ok_or_else(|| format!("array index {i} out of bounds"))?
            }
            _ => return Err(format!("cannot traverse into a scalar at {s:?}")),
        };
    }
    Ok(cur)
}

fn add_at(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let segs = split_pointer(path)?;
    let Some((last, parents)) = segs.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parents)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if i > a.len() {
                return Err(format!("array index {i} out of bounds"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("cannot add to a scalar at {path:?}")),
    }
}

fn remove_at(doc: &mut Value, path: &str) -> Result<Value, String> {
    let segs = split_pointer(path)?;
    let (last, parents) = segs
        .split_last()
        .ok_or_else(|| "cannot remove the whole document".to_string())?;
    match parent_mut(doc, parents)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| format!("unable to remove nonexistent key: {last}: missing value")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("array index {i} out of bounds"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("cannot remove from a scalar at {path:?}")),
    }
}

fn get_at<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    doc.pointer(path)
}

/// RFC 6902 JSON patch; all operations or none.
pub(crate) fn json_patch(doc: &Value, patch: &Value) -> Result<Value, String> {
    let ops = patch
        .as_array()
        .ok_or_else(|| "json patch must be an array of operations".to_string())?;
    let mut out = doc.clone();
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("operation has no \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("operation has no \"path\"")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("{kind} operation has no \"value\""))
        };
        match kind {
            "add" => add_at(&mut out, path, value()?)?,
            "remove" => {
                remove_at(&mut out, path)?;
            }
            "replace" => {
                if get_at(&out, path).is_none() {
                    return Err(format!(
                        "replace operation does not apply: doc is missing path: {path}"
                    ));
                }
                let v = value()?;
                if path.is_empty() {
                    out = v;
                } else {
                    remove_at(&mut out, path)?;
                    add_at(&mut out, path, v)?;
                }
            }
            "move" | "copy" => {
                let from = op
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or("operation has no \"from\"")?;
                let v = if kind == "move" {
                    remove_at(&mut out, from)?
                } else {
                    get_at(&out, from)
                        .cloned()
                        .ok_or_else(|| format!("missing from path {from}"))?
                };
                add_at(&mut out, path, v)?;
            }
            "test" => {
                if get_at(&out, path) != Some(&value()?) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("unexpected kind: {other}")),
        }
    }
    Ok(out)
}

/// Merge key of a list field, by field name and (for `ports`) by element shape, as the
/// Kubernetes types declare them with `patchMergeKey`. `None` = atomic list (replaced).
pub(crate) fn merge_key(field: &str, sample: Option<&Value>) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "topologySpreadConstraints" => "topologyKey",
        "ports" => {
            // Container ports merge by containerPort, Service ports by port.
            if sample.is_some_and(|s| s.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        _ => return None,
    })
}

/// Primitive lists with `patchStrategy: merge` (union instead of replace).
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

/// Applies a strategic merge patch to `target`.
pub(crate) fn strategic_merge(target: &Value, patch: &Value) -> Result<Value, String> {
    let mut out = target.clone();
    sm_map(&mut out, patch)?;
    Ok(out)
}

fn sm_map(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut clean = patch.clone();
        strip_directives(&mut clean);
        *target = clean;
        return Ok(());
    }
    if p.get("$patch").and_then(Value::as_str) == Some("delete") {
        *target = Value::Object(Map::new());
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match v {
            Value::Object(_) => sm_map(t.entry(k.clone()).or_insert(Value::Null), v)?,
            Value::Array(items) => {
                let cur = t.remove(k).unwrap_or(Value::Array(Vec::new()));
                let merged = sm_list(k, cur, items)?;
                t.insert(k.clone(), merged);
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
    if let Some(Value::Array(order)) = p
        .iter()
        .find(|(k, _)| k.as_str() == "$retainKeys")
        .map(|(_, v)| v)
    {
        let keep: Vec<&str> = order.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if let (Some(field), Value::Array(order)) = (k.strip_prefix("$setElementOrder/"), v)
            && let Some(Value::Array(list)) = t.get_mut(field)
        {
            reorder(field, list, order);
        }
    }
    Ok(())
}

fn key_of<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key)
}

fn sm_list(field: &str, current: Value, patch: &[Value]) -> Result<Value, String> {
    let mut cur = match current {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    // `[{"$patch": "replace"}, ...]` replaces the whole list.
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        let mut items: Vec<Value> = patch
            .iter()
            .filter(|p| p.get("$patch").is_none())
            .cloned()
            .collect();
        items.iter_mut().for_each(strip_directives);
        return Ok(Value::Array(items));
    }
    if merges_primitives(field) && patch.iter().all(|p| !p.is_object()) {
        for p in patch {
            if !cur.contains(p) {
                cur.push(p.clone());
            }
        }
        return Ok(Value::Array(cur));
    }
    let sample = patch.iter().chain(cur.iter()).find(|v| v.is_object());
    let Some(key) = merge_key(field, sample) else {
        let mut items = patch.to_vec();
        items.iter_mut().for_each(strip_directives);
        return Ok(Value::Array(items));
    };
    for p in patch {
        let Some(pk) = key_of(p, key).cloned() else {
            return Err(format!(
                "map: {p} does not contain declared merge key: {key}"
            ));
        };
        let pos = cur.iter().position(|c| key_of(c, key) == Some(&pk));
        if p.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = pos {
                cur.remove(i);
            }
            continue;
        }
        match pos {
            Some(i) => sm_map(&mut cur[i], p)?,
            None => {
                let mut fresh = Value::Object(Map::new());
                sm_map(&mut fresh, p)?;
                cur.push(fresh);
            }
        }
    }
    Ok(Value::Array(cur))
}

/// Orders `list` as `$setElementOrder` says; elements it does not name keep their place at the end.
fn reorder(field: &str, list: &mut Vec<Value>, order: &[Value]) {
    let sample = list.first();
    let Some(key) = merge_key(field, sample) else {
        return;
    };
    let mut rest = std::mem::take(list);
    for o in order {
        let Some(k) = key_of(o, key) else { continue };
        if let Some(i) = rest.iter().position(|c| key_of(c, key) == Some(k)) {
            list.push(rest.remove(i));
        }
    }
    list.extend(rest);
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let doc = json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2, 3]});
        let out = json_patch(
            &doc,
            &json!([
                {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                {"op": "replace", "path": "/metadata/labels/a", "value": "x"},
                {"op": "remove", "path": "/list/0"},
                {"op": "add", "path": "/list/-", "value": 9},
                {"op": "copy", "from": "/list/0", "path": "/first"},
                {"op": "move", "from": "/first", "path": "/moved"},
                {"op": "test", "path": "/moved", "value": 2}
            ]),
        )
        .expect("patch");
        assert_eq!(
            out,
            json!({"metadata": {"labels": {"a": "x", "b/c": "2"}}, "list": [2, 3, 9], "moved": 2})
        );
        assert!(
            json_patch(
                &doc,
                &json!([{"op": "test", "path": "/list/0", "value": 5}])
            )
            .is_err()
        );
        assert!(
            json_patch(
                &doc,
                &json!([{"op": "replace", "path": "/nope", "value": 5}])
            )
            .is_err()
        );
        assert!(json_patch(&doc, &json!({"op": "add"})).is_err());
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        let dep = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1.25", "ports": [{"containerPort": 80}],
             "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "side", "image": "busybox"}
        ]}}}});
        let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "side"}, {"name": "web"}],
        "containers": [
            {"name": "web", "image": "nginx:1.26", "env": [{"name": "B", "$patch": "delete"}, {"name": "C", "value": "3"}]}
        ]}}}});
        let out = strategic_merge(&dep, &patch).expect("patch");
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["name"], "side");
        assert_eq!(cs[1]["image"], "nginx:1.26");
        assert_eq!(cs[1]["ports"], json!([{"containerPort": 80}]), "ports kept");
        assert_eq!(
            cs[1]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "C", "value": "3"}])
        );
    }

    #[test]
    fn strategic_directives() {
        let obj = json!({"metadata": {"finalizers": ["a", "b"]},
                         "spec": {"tolerations": [{"key": "x"}], "m": {"a": 1, "b": 2}}});
        let out = strategic_merge(
            &obj,
            &json!({"metadata": {"finalizers": ["c"], "$deleteFromPrimitiveList/finalizers": ["a"]},
                    "spec": {"tolerations": [{"key": "y"}], "m": {"$patch": "replace", "c": 3}}}),
        )
        .expect("patch");
        assert_eq!(out["metadata"]["finalizers"], json!(["b", "c"]));
        assert_eq!(
            out["spec"]["tolerations"],
            json!([{"key": "y"}]),
            "atomic list replaced"
        );
        assert_eq!(out["spec"]["m"], json!({"c": 3}));
        let svc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443}]}});
        let out = strategic_merge(
            &svc,
            &json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}),
        )
        .expect("patch");
        assert_eq!(out["spec"]["ports"].as_array().map(Vec::len), Some(2));
        assert_eq!(out["spec"]["ports"][0]["targetPort"], 8080);
        assert!(strategic_merge(&svc, &json!({"spec": {"ports": [{"name": "x"}]}})).is_err());
        let out = strategic_merge(
            &svc,
            &json!({"spec": {"$retainKeys": ["other"], "other": 1}}),
        )
        .expect("patch");
        assert_eq!(out["spec"], json!({"other": 1}));
    }
}
