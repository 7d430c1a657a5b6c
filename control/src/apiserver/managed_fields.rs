//! Field ownership for server-side apply: `metadata.managedFields` with `FieldsV1` sets per
//! manager and operation, conflicts worded as Kubernetes words them, and removal of fields an
//! applier stops setting when nobody else owns them.
//!
//! Sets are trees keyed like `FieldsV1`: `f:<field>` for struct/map fields, `k:{"name":"web"}`
//! for items of lists merged by key (the same keys strategic merge uses), `v:<json>` for items
//! of set-like primitive lists (`finalizers`); every other list is atomic (a leaf). A node is a
//! member when it is a leaf (`{}`) or carries `"."`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::patch::merge_key;
use super::resources::{Resource, Sub};

/// A set of field paths (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSet {
    /// The path ending here is itself a member.
    own: bool,
    children: BTreeMap<String, FieldSet>,
}

/// Metadata fields the server owns; never part of a manager's set (as in Kubernetes).
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

impl FieldSet {
    fn leaf() -> FieldSet {
        FieldSet {
            own: true,
            children: BTreeMap::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        !self.own && self.children.is_empty()
    }

    /// Parses a `fieldsV1` object; anything malformed counts as empty.
    pub(crate) fn from_v1(v: &Value) -> FieldSet {
        let Value::Object(m) = v else {
            return FieldSet::default();
        };
        if m.is_empty() {
            return FieldSet::leaf();
        }
        let mut s = FieldSet::default();
        for (k, c) in m {
            if k == "." {
                s.own = true;
            } else {
                let child = FieldSet::from_v1(c);
                if !child.is_empty() {
                    s.children.insert(k.clone(), child);
                }
            }
        }
        s
    }

    /// The `fieldsV1` form.
    pub(crate) fn to_v1(&self) -> Value {
        let mut m = Map::new();
        if self.own && !self.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &self.children {
            m.insert(k.clone(), c.to_v1());
        }
        Value::Object(m)
    }

    pub(crate) fn union(&mut self, other: &FieldSet) {
        self.own |= other.own;
        for (k, c) in &other.children {
            self.children.entry(k.clone()).or_default().union(c);
        }
    }

    /// Removes every member of `other`.
    pub(crate) fn subtract(&mut self, other: &FieldSet) {
        if other.own {
            self.own = false;
        }
        for (k, c) in &other.children {
            if let Some(mine) = self.children.get_mut(k) {
                mine.subtract(c);
                if mine.is_empty() {
                    self.children.remove(k);
                }
            }
        }
    }

    /// Removes one member path (and prunes empty parents).
    fn remove_path(&mut self, path: &[String]) {
        match path.split_first() {
            None => self.own = false,
            Some((first, rest)) => {
                if let Some(c) = self.children.get_mut(first) {
                    c.remove_path(rest);
                    if c.is_empty() {
                        self.children.remove(first);
                    }
                }
            }
        }
    }

    /// Every member path with whether it is a leaf, parents before children.
    pub(crate) fn members(&self) -> Vec<(Vec<String>, bool)> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, bool)>) {
        if self.own {
            out.push((prefix.clone(), self.children.is_empty()));
        }
        for (k, c) in &self.children {
            prefix.push(k.clone());
            c.collect(prefix, out);
            prefix.pop();
        }
    }

    fn node(&self, path: &[String]) -> Option<&FieldSet> {
        match path.split_first() {
            None => Some(self),
            Some((first, rest)) => self.children.get(first)?.node(rest),
        }
    }

    /// Whether `path` is a member.
    fn has(&self, path: &[String]) -> bool {
        self.node(path).is_some_and(|n| n.own)
    }

    /// Whether `path` or anything below it is a member.
    fn has_under(&self, path: &[String]) -> bool {
        self.node(path).is_some_and(|n| !n.is_empty())
    }
}

/// How a list field merges, which decides its path segments.
enum ListKind {
    /// Items identified by this key field (`k:{"name":"web"}`).
    Keyed(&'static str),
    /// Set of primitives (`v:"x"`).
    Set,
    /// Replaced as a whole: one leaf.
    Atomic,
}

fn list_kind(field: &str, items: &[Value]) -> ListKind {
    if field == "finalizers" && items.iter().all(|v| !v.is_object() && !v.is_array()) {
        return ListKind::Set;
    }
    match merge_key(field, items.iter().find(|v| v.is_object())) {
        Some(k) if items.iter().all(|i| i.get(k).is_some()) => ListKind::Keyed(k),
        _ => ListKind::Atomic,
    }
}

fn key_segment(key: &str, item: &Value) -> String {
    let mut m = Map::new();
    m.insert(
        key.to_string(),
        item.get(key).cloned().unwrap_or(Value::Null),
    );
    format!("k:{}", Value::Object(m))
}

/// Every field set in `v` (the value of field `field`); `null`s set nothing.
fn fields_of(v: &Value, field: &str) -> FieldSet {
    match v {
        Value::Object(m) if !m.is_empty() => FieldSet {
            own: false,
            children: m
                .iter()
                .filter(|(_, c)| !c.is_null())
                .map(|(k, c)| (format!("f:{k}"), fields_of(c, k)))
                .collect(),
        },
        Value::Array(a) if !a.is_empty() => match list_kind(field, a) {
            ListKind::Keyed(key) => FieldSet {
                own: false,
                children: a
                    .iter()
                    .map(|e| {
                        (
                            key_segment(key, e),
                            FieldSet {
                                own: true,
                                children: fields_of(e, field).children,
                            },
                        )
                    })
                    .collect(),
            },
            ListKind::Set => FieldSet {
                own: false,
                children: a
                    .iter()
                    .map(|e| (format!("v:{e}"), FieldSet::leaf()))
                    .collect(),
            },
            ListKind::Atomic => FieldSet::leaf(),
        },
        _ => FieldSet::leaf(),
    }
}

/// The fields of `new` that differ from `old` (added or changed).
fn changed_fields(old: Option<&Value>, new: &Value, field: &str) -> FieldSet {
    if old == Some(new) || new.is_null() {
        return FieldSet::default();
    }
    match (old, new) {
        (Some(Value::Object(o)), Value::Object(n)) if !n.is_empty() => FieldSet {
            own: false,
            children: n
                .iter()
                .map(|(k, c)| (format!("f:{k}"), changed_fields(o.get(k), c, k)))
                .filter(|(_, s)| !s.is_empty())
                .collect(),
        },
        (Some(Value::Array(o)), Value::Array(n)) if !n.is_empty() => match list_kind(field, n) {
            ListKind::Keyed(key) if o.iter().all(|e| e.get(key).is_some()) => FieldSet {
                own: false,
                children: n
                    .iter()
                    .filter_map(|e| {
                        let seg = key_segment(key, e);
                        let s = match o.iter().find(|x| x.get(key) == e.get(key)) {
                            Some(oe) => FieldSet {
                                own: false,
                                children: changed_fields(Some(oe), e, field).children,
                            },
                            None => FieldSet {
                                own: true,
                                children: fields_of(e, field).children,
                            },
                        };
                        (!s.is_empty()).then_some((seg, s))
                    })
                    .collect(),
            },
            ListKind::Set => FieldSet {
                own: false,
                children: n
                    .iter()
                    .filter(|e| !o.contains(e))
                    .map(|e| (format!("v:{e}"), FieldSet::leaf()))
                    .collect(),
            },
            _ => FieldSet::leaf(),
        },
        _ => fields_of(new, field),
    }
}

/// Keeps what a manager can own for a write to `sub` of `res`: never apiVersion, kind or the
/// server's metadata; status only through the status subresource (when there is one).
fn scoped(mut s: FieldSet, res: &Resource, sub: Option<Sub>) -> FieldSet {
    s.children.remove("f:apiVersion");
    s.children.remove("f:kind");
    if let Some(meta) = s.children.get_mut("f:metadata") {
        for f in SERVER_METADATA {
            meta.children.remove(&format!("f:{f}"));
        }
        if meta.is_empty() {
            s.children.remove("f:metadata");
        }
    }
    if res.has(Sub::Status) {
        if sub == Some(Sub::Status) {
            s.children.retain(|k, _| k == "f:status");
        } else {
            s.children.remove("f:status");
        }
    }
    s.own = false;
    s
}

fn parse_key(seg: &str) -> Option<Map<String, Value>> {
    serde_json::from_str(seg).ok()
}

fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let Some((first, rest)) = path.split_first() else {
        return Some(v);
    };
    let next = if let Some(f) = first.strip_prefix("f:") {
        v.get(f)?
    } else if let Some(k) = first.strip_prefix("k:") {
        let key = parse_key(k)?;
        v.as_array()?
            .iter()
            .find(|e| key.iter().all(|(kk, kv)| e.get(kk) == Some(kv)))?
    } else if let Some(x) = first.strip_prefix("v:") {
        let x: Value = serde_json::from_str(x).ok()?;
        v.as_array()?.iter().find(|e| **e == x)?
    } else {
        return None;
    };
    value_at(next, rest)
}

fn remove_at(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if let Some(f) = first.strip_prefix("f:") {
        let Some(m) = v.as_object_mut() else { return };
        if rest.is_empty() {
            m.remove(f);
        } else if let Some(c) = m.get_mut(f) {
            remove_at(c, rest);
            // A map or list emptied by the removal goes too (`labels: {}` after the last label).
            if c.as_object().is_some_and(Map::is_empty) || c.as_array().is_some_and(Vec::is_empty) {
                m.remove(f);
            }
        }
        return;
    }
    let Some(items) = v.as_array_mut() else {
        return;
    };
    let matches: Box<dyn Fn(&Value) -> bool> = if let Some(k) = first.strip_prefix("k:") {
        let Some(key) = parse_key(k) else { return };
        Box::new(move |e: &Value| key.iter().all(|(kk, kv)| e.get(kk) == Some(kv)))
    } else if let Some(x) = first.strip_prefix("v:") {
        let Ok(x) = serde_json::from_str::<Value>(x) else {
            return;
        };
        Box::new(move |e: &Value| *e == x)
    } else {
        return;
    };
    if rest.is_empty() {
        items.retain(|e| !matches(e));
    } else if let Some(e) = items.iter_mut().find(|e| matches(e)) {
        remove_at(e, rest);
    }
}

/// A path as Kubernetes prints it in conflicts: `.spec.containers[name="web"].image`.
pub(crate) fn path_string(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if let Some(f) = seg.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = seg.strip_prefix("k:") {
            let parts: Vec<String> = parse_key(k)
                .unwrap_or_default()
                .iter()
                .map(|(kk, kv)| format!("{kk}={kv}"))
                .collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(x) = seg.strip_prefix("v:") {
            out.push_str(&format!("[={x}]"));
        }
    }
    out
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: Option<String>,
    fields: FieldSet,
}

impl Entry {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager, "operation": self.operation,
            "apiVersion": self.api_version, "time": self.time,
            "fieldsType": "FieldsV1", "fieldsV1": self.fields.to_v1(),
        });
        if let Some(s) = &self.subresource {
            v["subresource"] = json!(s);
        }
        v
    }

    /// How conflicts name the manager (Kubernetes' `printManager`).
    fn display(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            s.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }
}

fn entries_of(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
            Some(Entry {
                manager: s("manager").unwrap_or_default(),
                operation: s("operation")?,
                api_version: s("apiVersion").unwrap_or_default(),
                time: s("time").unwrap_or_default(),
                subresource: s("subresource").filter(|x| !x.is_empty()),
                fields: FieldSet::from_v1(e.get("fieldsV1").unwrap_or(&Value::Null)),
            })
        })
        .collect()
}

fn write_entries(obj: &mut Value, entries: &[Entry]) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_json)
        .collect();
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Records a non-apply write (create, update, patch, status) by `manager`: it takes the fields
/// it changed from everyone else, and fields the write removed leave every set.
pub(crate) fn record_update(
    res: &Resource,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    sub: Option<Sub>,
) {
    let mut entries = old.map(entries_of).unwrap_or_default();
    let changed = scoped(changed_fields(old, new, ""), res, sub);
    let mut removed = old
        .map(|o| scoped(fields_of(o, ""), res, sub))
        .unwrap_or_default();
    removed.subtract(&scoped(fields_of(new, ""), res, sub));
    let subresource = sub.map(|s| s.name().to_string());
    for e in &mut entries {
        e.fields.subtract(&removed);
        if !(e.manager == manager && e.operation == "Update" && e.subresource == subresource) {
            e.fields.subtract(&changed);
        }
    }
    if !changed.is_empty() {
        match entries.iter_mut().find(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource == subresource
        }) {
            Some(e) => {
                e.fields.union(&changed);
                e.time = now();
                e.api_version = res.api_version();
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: res.api_version(),
                time: now(),
                subresource,
                fields: changed,
            }),
        }
    }
    write_entries(new, &entries);
}

/// A field another manager owns with a different value than the apply sets.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Conflict {
    /// The manager as Kubernetes prints it (`"kubectl" using apps/v1`).
    pub manager: String,
    /// The path as Kubernetes prints it (`.spec.replicas`).
    pub field: String,
}

/// Server-side apply of `config` by `manager` onto `live` (`None`: the object is created).
/// Returns the merged object carrying the new `managedFields`, or the conflicts when another
/// manager owns a field the apply changes and `force` is off (with `force` the applier takes
/// those fields over).
pub(crate) fn apply(
    res: &Resource,
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let mut config = config.clone();
    if let Some(m) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    let applied = scoped(fields_of(&config, ""), res, None);
    let mine = |e: &Entry| e.manager == manager && e.operation == "Apply";
    let Some(live) = live else {
        let mut obj = config;
        let entry = Entry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version: res.api_version(),
            time: now(),
            subresource: None,
            fields: applied,
        };
        write_entries(&mut obj, &[entry]);
        return Ok(obj);
    };
    let mut entries = entries_of(live);
    let members = applied.members();
    let mut conflicts = Vec::new();
    let mut taken: Vec<(usize, Vec<String>)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.manager == manager {
            continue;
        }
        for (path, leaf) in &members {
            if *leaf && e.fields.has(path) && value_at(live, path) != value_at(&config, path) {
                conflicts.push(Conflict {
                    manager: e.display(),
                    field: path_string(path),
                });
                taken.push((i, path.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for (i, path) in taken {
        if let Some(e) = entries.get_mut(i) {
            e.fields.remove_path(&path);
        }
    }
    // Fields this manager applied before and no longer does go away unless someone else
    // still owns them. Parents first: a list item removed whole takes its fields with it.
    let mut obj = live.clone();
    if let Some(prev) = entries.iter().find(|e| mine(e)) {
        let mut dropped = prev.fields.clone();
        dropped.subtract(&applied);
        let mut gone: Vec<Vec<String>> = Vec::new();
        for (path, _) in dropped.members() {
            if gone.iter().any(|g| path.starts_with(g)) {
                continue;
            }
            let owned_elsewhere = entries
                .iter()
                .any(|e| !mine(e) && e.fields.has_under(&path));
            if !owned_elsewhere && !applied.has_under(&path) {
                remove_at(&mut obj, &path);
                gone.push(path);
            }
        }
    }
    let mut merged = super::patch::strategic_merge(&obj, &config).map_err(|e| {
        vec![Conflict {
            manager: String::new(),
            field: e,
        }]
    })?;
    match entries.iter_mut().find(|e| mine(e)) {
        Some(e) => {
            e.fields = applied;
            e.time = now();
            e.api_version = res.api_version();
        }
        None => entries.push(Entry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version: res.api_version(),
            time: now(),
            subresource: None,
            fields: applied,
        }),
    }
    write_entries(&mut merged, &entries);
    Ok(merged)
}

/// The 409 Kubernetes answers for apply conflicts (`NewApplyConflict`).
pub(crate) fn conflict_error(conflicts: &[Conflict]) -> super::status::ApiError {
    let message = if let [c] = conflicts {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            c.manager, c.field
        )
    } else {
        let mut by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for c in conflicts {
            by.entry(c.manager.as_str())
                .or_default()
                .push(c.field.as_str());
        }
        let mut lines = Vec::new();
        for (m, fields) in by {
            lines.push(format!("conflicts with {m}:"));
            lines.extend(fields.iter().map(|f| format!("- {f}")));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            json!({"reason": "FieldManagerConflict", "message": format!("conflict with {}", c.manager),
                   "field": c.field})
        })
        .collect();
    let mut e = super::status::ApiError::new(409, "Conflict", message);
    e.details = Some(json!({ "causes": causes }));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployments() -> &'static Resource {
        super::super::resources::find("apps", "v1", "deployments").expect("registered")
    }

    fn entry<'a>(obj: &'a Value, manager: &str) -> Option<&'a Value> {
        obj.pointer("/metadata/managedFields")?
            .as_array()?
            .iter()
            .find(|e| e["manager"] == manager)
    }

    #[test]
    fn fields_v1_round_trip_and_set_algebra() {
        let v1 = json!({"f:metadata": {"f:labels": {"f:app": {}}},
                        "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}}}});
        let s = FieldSet::from_v1(&v1);
        assert_eq!(s.to_v1(), v1);
        let members: Vec<String> = s.members().iter().map(|(p, _)| path_string(p)).collect();
        assert_eq!(
            members,
            vec![
                ".metadata.labels.app",
                ".spec.containers[name=\"web\"]",
                ".spec.containers[name=\"web\"].image",
                ".spec.containers[name=\"web\"].name",
            ]
        );
        let mut t = s.clone();
        t.subtract(&FieldSet::from_v1(
            &json!({"f:metadata": {"f:labels": {"f:app": {}}}}),
        ));
        assert!(
            !t.children.contains_key("f:metadata"),
            "emptied parents pruned"
        );
        t.union(&s);
        assert_eq!(t, s);
    }

    #[test]
    fn update_takes_changed_fields_and_drops_removed_ones() {
        let res = deployments();
        let old = json!({"metadata": {"name": "d", "labels": {"a": "1", "b": "2"}}, "spec": {"replicas": 1}});
        let mut created = old.clone();
        record_update(res, None, &mut created, "creator", None);
        let c = entry(&created, "creator").expect("entry");
        assert_eq!(c["operation"], "Update");
        assert_eq!(
            c["fieldsV1"],
            json!({"f:metadata": {"f:labels": {"f:a": {}, "f:b": {}}}, "f:spec": {"f:replicas": {}}})
        );
        let mut new = created.clone();
        new["spec"]["replicas"] = json!(2);
        new["metadata"]["labels"] = json!({"a": "1"});
        record_update(res, Some(&created), &mut new, "scaler", None);
        assert_eq!(
            entry(&new, "creator").expect("kept")["fieldsV1"],
            json!({"f:metadata": {"f:labels": {"f:a": {}}}}),
            "replicas moved to the scaler, the removed label left every set"
        );
        assert_eq!(
            entry(&new, "scaler").expect("added")["fieldsV1"],
            json!({"f:spec": {"f:replicas": {}}})
        );
    }

    #[test]
    fn apply_conflicts_force_and_removal() {
        let res = deployments();
        let cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"x": "1"}},
                         "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c", "image": "i:1", "env": [{"name": "E", "value": "v"}]}]}}}});
        let live = apply(res, None, &cfg, "a", false).expect("create");
        assert_eq!(entry(&live, "a").expect("a")["operation"], "Apply");

        // Same value from another applier: shared, no conflict.
        let same = json!({"metadata": {"name": "d"}, "spec": {"replicas": 1}});
        let live = apply(res, Some(&live), &same, "b", false).expect("shared");
        // A different value conflicts, naming the field and the manager.
        let three = json!({"metadata": {"name": "d"}, "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "c", "image": "i:2"}]}}}});
        let err = apply(res, Some(&live), &three, "b", false).expect_err("conflict");
        let c = |f: &str| Conflict {
            manager: "\"a\"".into(),
            field: f.into(),
        };
        assert_eq!(
            err,
            vec![
                c(".spec.replicas"),
                c(".spec.template.spec.containers[name=\"c\"].image")
            ]
        );
        let e = conflict_error(&err[1..]);
        assert_eq!(e.code, 409);
        assert_eq!(
            e.message,
            "Apply failed with 1 conflict: conflict with \"a\": .spec.template.spec.containers[name=\"c\"].image"
        );
        // Unchanged fields stay out of it: the label is only `a`'s and `b` does not set it.
        let labels = json!({"metadata": {"name": "d", "labels": {"y": "2"}}});
        apply(res, Some(&live), &labels, "b", false).expect("no conflict");
        let forced = apply(res, Some(&live), &three, "b", true).expect("forced");
        assert_eq!(forced["spec"]["replicas"], 3);
        let a = entry(&forced, "a").expect("a");
        assert!(
            a.pointer("/fieldsV1/f:spec/f:template/f:spec/f:containers/k:{\"name\":\"c\"}/f:image")
                .is_none(),
            "{a}"
        );
        assert!(a.pointer("/fieldsV1/f:spec/f:replicas").is_none(), "{a}");
        assert!(
            a.pointer("/fieldsV1/f:metadata/f:labels/f:x").is_some(),
            "{a}"
        );

        // `a` stops applying the label and env: both go (only `a` owned them); replicas,
        // also owned by `b`, stays.
        let less = json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i:2"}]}}}});
        let out = apply(res, Some(&forced), &less, "a", false).expect("re-apply");
        assert!(out.pointer("/metadata/labels/x").is_none(), "{out}");
        assert!(
            out.pointer("/spec/template/spec/containers/0/env")
                .is_none(),
            "{out}"
        );
        assert_eq!(out["spec"]["replicas"], 3);
    }

    #[test]
    fn conflict_message_with_several_managers() {
        let e = conflict_error(&[
            Conflict {
                manager: "\"m2\" using apps/v1".into(),
                field: ".spec.replicas".into(),
            },
            Conflict {
                manager: "\"m1\"".into(),
                field: ".metadata.labels.a".into(),
            },
        ]);
        assert_eq!(
            e.message,
            "Apply failed with 2 conflicts: conflicts with \"m1\":\n- .metadata.labels.a\nconflicts with \"m2\" using apps/v1:\n- .spec.replicas"
        );
        assert_eq!(
            e.details.expect("details")["causes"][0],
            json!({"reason": "FieldManagerConflict", "message": "conflict with \"m2\" using apps/v1", "field": ".spec.replicas"})
        );
    }
}
