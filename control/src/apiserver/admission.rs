//! Admission: unknown-field handling, defaulting (as Kubernetes does it), validation with field
//! paths, and the pod QoS class.

use serde_json::{Map, Value, json};

use super::resources::Resource;
use super::status::Cause;

// ---------------------------------------------------------------------------------------------
// Unknown fields

const META: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

const POD_SPEC: &[&str] = &[
    "volumes",
    "initContainers",
    "containers",
    "ephemeralContainers",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "dnsPolicy",
    "nodeSelector",
    "serviceAccountName",
    "serviceAccount",
    "automountServiceAccountToken",
    "nodeName",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "shareProcessNamespace",
    "securityContext",
    "imagePullSecrets",
    "hostname",
    "subdomain",
    "affinity",
    "schedulerName",
    "tolerations",
    "hostAliases",
    "priorityClassName",
    "priority",
    "dnsConfig",
    "readinessGates",
    "runtimeClassName",
    "enableServiceLinks",
    "preemptionPolicy",
    "overhead",
    "topologySpreadConstraints",
    "setHostnameAsFQDN",
    "os",
    "hostUsers",
    "schedulingGates",
    "resourceClaims",
    "resources",
    "hostnameOverride",
];

const CONTAINER: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "workingDir",
    "ports",
    "envFrom",
    "env",
    "resources",
    "resizePolicy",
    "restartPolicy",
    "restartPolicyRules",
    "volumeMounts",
    "volumeDevices",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "securityContext",
    "stdin",
    "stdinOnce",
    "tty",
];

const WORKLOAD_SPEC: &[&str] = &[
    "replicas",
    "selector",
    "template",
    "strategy",
    "minReadySeconds",
    "revisionHistoryLimit",
    "paused",
    "progressDeadlineSeconds",
];

fn top_level(kind: &str) -> &'static [&'static str] {
    match kind {
        "ConfigMap" => &["data", "binaryData", "immutable"],
        "Secret" => &["data", "stringData", "type", "immutable"],
        "Endpoints" => &["subsets"],
        "Event" => &[
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "series",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
        ],
        "RuntimeClass" => &["handler", "overhead", "scheduling"],
        "LimitRange" | "Lease" => &["spec"],
        _ => &["spec", "status"],
    }
}

fn check_keys(v: &mut Value, allowed: &[&str], path: &str, strip: bool, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        let unknown: Vec<String> = m
            .keys()
            // `$patch`, `$setElementOrder/…`: strategic-merge directives, not fields.
            .filter(|k| !k.starts_with('$') && !allowed.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in unknown {
            out.push(if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            });
            if strip {
                m.remove(&k);
            }
        }
    }
}

fn check_pod_spec(spec: &mut Value, path: &str, strip: bool, out: &mut Vec<String>) {
    check_keys(spec, POD_SPEC, path, strip, out);
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = spec.get_mut(list) {
            for (i, c) in cs.iter_mut().enumerate() {
                check_keys(c, CONTAINER, &format!("{path}.{list}[{i}]"), strip, out);
            }
        }
    }
}

/// Finds (and with `strip` removes) fields the served types do not have. Returns their paths.
pub(crate) fn unknown_fields(obj: &mut Value, kind: &str, strip: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut allowed: Vec<&str> = vec!["apiVersion", "kind", "metadata"];
    allowed.extend_from_slice(top_level(kind));
    check_keys(obj, &allowed, "", strip, &mut out);
    if let Some(m) = obj.get_mut("metadata") {
        check_keys(m, META, "metadata", strip, &mut out);
    }
    match kind {
        "Pod" => {
            if let Some(s) = obj.get_mut("spec") {
                check_pod_spec(s, "spec", strip, &mut out);
            }
        }
        "Deployment" | "ReplicaSet" => {
            if let Some(s) = obj.get_mut("spec") {
                check_keys(s, WORKLOAD_SPEC, "spec", strip, &mut out);
                if let Some(t) = s.get_mut("template") {
                    check_keys(t, &["metadata", "spec"], "spec.template", strip, &mut out);
                    if let Some(m) = t.get_mut("metadata") {
                        check_keys(m, META, "spec.template.metadata", strip, &mut out);
                    }
                    if let Some(ps) = t.get_mut("spec") {
                        check_pod_spec(ps, "spec.template.spec", strip, &mut out);
                    }
                }
            }
        }
        _ => {}
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Defaulting

fn set_default(m: &mut Map<String, Value>, key: &str, v: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), v);
    }
}

fn image_pull_policy(image: &str) -> &'static str {
    // The tag is after the last ':' that follows the last '/'; digests pin an image too.
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_container(c: &mut Value) {
    let Value::Object(m) = c else { return };
    let image = m
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !image.is_empty() {
        set_default(m, "imagePullPolicy", json!(image_pull_policy(&image)));
    }
    set_default(m, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(m, "terminationMessagePolicy", json!("File"));
    set_default(m, "resources", json!({}));
    if let Some(Value::Array(ports)) = m.get_mut("ports") {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
        }
    }
    // Requests default to limits when only limits are given.
    if let Some(Value::Object(res)) = m.get_mut("resources")
        && let Some(Value::Object(limits)) = res.get("limits").cloned()
    {
        let req = res.entry("requests").or_insert_with(|| json!({}));
        if let Value::Object(req) = req {
            for (k, v) in limits {
                req.entry(k).or_insert(v);
            }
        }
    }
}

/// Pod spec defaults, as the Kubernetes v1 defaulting functions set them.
pub(crate) fn default_pod_spec(spec: &mut Value) {
    let Value::Object(m) = spec else { return };
    set_default(m, "restartPolicy", json!("Always"));
    set_default(m, "terminationGracePeriodSeconds", json!(30));
    set_default(m, "dnsPolicy", json!("ClusterFirst"));
    set_default(m, "schedulerName", json!("default-scheduler"));
    set_default(m, "securityContext", json!({}));
    set_default(m, "enableServiceLinks", json!(true));
    set_default(m, "priority", json!(0));
    set_default(m, "preemptionPolicy", json!("PreemptLowerPriority"));
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = m.get_mut(list) {
            cs.iter_mut().for_each(default_container);
        }
    }
}

/// Applies the defaults of `res` to a new or updated object.
pub(crate) fn default_object(res: &Resource, obj: &mut Value) {
    match res.kind {
        "Pod" => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
            }
            let qos = qos_class(obj);
            if let Value::Object(m) = obj {
                let status = m.entry("status").or_insert_with(|| json!({}));
                if let Value::Object(s) = status {
                    set_default(s, "phase", json!("Pending"));
                    s.insert("qosClass".into(), json!(qos));
                }
            }
        }
        "Deployment" | "ReplicaSet" => {
            if let Some(Value::Object(spec)) = obj.get_mut("spec") {
                set_default(spec, "replicas", json!(1));
                if res.kind == "Deployment" {
                    set_default(spec, "revisionHistoryLimit", json!(10));
                    set_default(spec, "progressDeadlineSeconds", json!(600));
                    let strategy = spec.entry("strategy").or_insert_with(|| json!({}));
                    if let Value::Object(st) = strategy {
                        set_default(st, "type", json!("RollingUpdate"));
                        if st.get("type") == Some(&json!("RollingUpdate")) {
                            let ru = st.entry("rollingUpdate").or_insert_with(|| json!({}));
                            if let Value::Object(ru) = ru {
                                set_default(ru, "maxUnavailable", json!("25%"));
                                set_default(ru, "maxSurge", json!("25%"));
                            }
                        }
                    }
                }
                if let Some(ps) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
                    default_pod_spec(ps);
                }
            }
        }
        "Service" => {
            if let Some(Value::Object(spec)) = obj.get_mut("spec") {
                set_default(spec, "type", json!("ClusterIP"));
                set_default(spec, "sessionAffinity", json!("None"));
                if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        set_default(p, "protocol", json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            set_default(p, "targetPort", port);
                        }
                    }
                }
            }
        }
        "Secret" => {
            if let Value::Object(m) = obj {
                set_default(m, "type", json!("Opaque"));
                if let Some(Value::Object(sd)) = m.remove("stringData") {
                    use base64::Engine as _;
                    let data = m.entry("data").or_insert_with(|| json!({}));
                    if let Value::Object(d) = data {
                        for (k, v) in sd {
                            let text = v.as_str().unwrap_or_default().to_string();
                            d.insert(
                                k,
                                json!(base64::engine::general_purpose::STANDARD.encode(text)),
                            );
                        }
                    }
                }
            }
        }
        "Namespace" => {
            if let Value::Object(m) = obj {
                let spec = m.entry("spec").or_insert_with(|| json!({}));
                if let Value::Object(s) = spec {
                    set_default(s, "finalizers", json!(["kubernetes"]));
                }
                let status = m.entry("status").or_insert_with(|| json!({}));
                if let Value::Object(s) = status {
                    set_default(s, "phase", json!("Active"));
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// QoS

/// Parses a Kubernetes quantity (`100m`, `1Gi`, `2`, `1e3`) into a number of base units.
pub(crate) fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let suffixes: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (s, mul) in suffixes {
        if let Some(num) = q.strip_suffix(s) {
            return num
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .map(|n| n * mul);
        }
    }
    q.parse::<f64>().ok().filter(|n| n.is_finite())
}

fn quantity_of(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => parse_quantity(s),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

/// The pod QoS class: `Guaranteed`, `Burstable` or `BestEffort`.
pub(crate) fn qos_class(pod: &Value) -> &'static str {
    let mut containers: Vec<&Value> = Vec::new();
    for list in ["containers", "initContainers"] {
        if let Some(cs) = pod
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
        {
            containers.extend(cs.iter());
        }
    }
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in containers {
        let req = c.pointer("/resources/requests").and_then(Value::as_object);
        let lim = c.pointer("/resources/limits").and_then(Value::as_object);
        let nonzero = |m: Option<&Map<String, Value>>, k: &str| {
            m.and_then(|m| m.get(k))
                .and_then(quantity_of)
                .is_some_and(|q| q > 0.0)
        };
        for k in ["cpu", "memory"] {
            if nonzero(req, k) || nonzero(lim, k) {
                any = true;
            }
            let l = lim.and_then(|m| m.get(k)).and_then(quantity_of);
            let r = req.and_then(|m| m.get(k)).and_then(quantity_of).or(l);
            match (l, r) {
                (Some(l), Some(r)) if l > 0.0 && (l - r).abs() < 1e-9 => {}
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

/// RFC 1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric, ≤ 63.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, ≤ 253.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn label_key_ok(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns_subdomain)
        && !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn label_value_ok(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn validate_labels(labels: Option<&Value>, path: &str, out: &mut Vec<Cause>) {
    let Some(labels) = labels else { return };
    let Some(m) = labels.as_object() else {
        out.push(Cause::invalid(path, labels, "must be a map of strings"));
        return;
    };
    for (k, v) in m {
        if !label_key_ok(k) {
            out.push(Cause::invalid(
                path,
                &json!(k),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
        match v.as_str() {
            Some(s) if label_value_ok(s) => {}
            _ => out.push(Cause::invalid(
                format!("{path}.{k}"),
                v,
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            )),
        }
    }
}

/// Validates metadata shared by every kind.
fn validate_meta(res: &Resource, obj: &Value, out: &mut Vec<Cause>) {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let label_only = matches!(res.kind, "Namespace" | "Service");
    if name.is_empty() {
        out.push(Cause::required("metadata.name"));
    } else if label_only && !is_dns_label(name) {
        out.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        ));
    } else if !label_only && !is_dns_subdomain(name) && res.kind != "Event" {
        out.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ));
    }
    validate_labels(obj.pointer("/metadata/labels"), "metadata.labels", out);
    if let Some(a) = obj.pointer("/metadata/annotations") {
        match a.as_object() {
            Some(m) if m.values().all(Value::is_string) => {
                let size: usize = m
                    .iter()
                    .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                    .sum();
                if size > 256 * 1024 {
                    out.push(Cause::invalid(
                        "metadata.annotations",
                        &json!("<omitted>"),
                        "Too long: must have at most 262144 bytes",
                    ));
                }
            }
            _ => out.push(Cause::invalid(
                "metadata.annotations",
                a,
                "must be a map of strings",
            )),
        }
    }
}

fn validate_container(c: &Value, path: &str, names: &mut Vec<String>, out: &mut Vec<Cause>) {
    match c.get("name").and_then(Value::as_str) {
        None | Some("") => out.push(Cause::required(format!("{path}.name"))),
        Some(n) if !is_dns_label(n) => out.push(Cause::invalid(
            format!("{path}.name"),
            &json!(n),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        )),
        Some(n) if names.iter().any(|x| x == n) => {
            out.push(Cause::duplicate(format!("{path}.name"), &json!(n)));
        }
        Some(n) => names.push(n.to_string()),
    }
    if c.get("image")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        out.push(Cause::required(format!("{path}.image")));
    }
    if let Some(p) = c.get("imagePullPolicy")
        && !matches!(p.as_str(), Some("Always" | "IfNotPresent" | "Never"))
    {
        out.push(Cause::not_supported(
            format!("{path}.imagePullPolicy"),
            p,
            &["Always", "IfNotPresent", "Never"],
        ));
    }
    if let Some(ports) = c.get("ports").and_then(Value::as_array) {
        for (i, p) in ports.iter().enumerate() {
            let cp = p.get("containerPort");
            match cp.and_then(Value::as_i64) {
                Some(n) if (1..=65535).contains(&n) => {}
                Some(_) => out.push(Cause::invalid(
                    format!("{path}.ports[{i}].containerPort"),
                    cp.unwrap_or(&Value::Null),
                    "must be between 1 and 65535, inclusive",
                )),
                None => out.push(Cause::required(format!("{path}.ports[{i}].containerPort"))),
            }
            if let Some(proto) = p.get("protocol")
                && !matches!(proto.as_str(), Some("TCP" | "UDP" | "SCTP"))
            {
                out.push(Cause::not_supported(
                    format!("{path}.ports[{i}].protocol"),
                    proto,
                    &["SCTP", "TCP", "UDP"],
                ));
            }
        }
    }
    for kind in ["requests", "limits"] {
        if let Some(m) = c
            .pointer(&format!("/resources/{kind}"))
            .and_then(Value::as_object)
        {
            for (k, v) in m {
                match quantity_of(v) {
                    Some(q) if q >= 0.0 => {}
                    Some(_) => out.push(Cause::invalid(
                        format!("{path}.resources.{kind}[{k}]"),
                        v,
                        "must be greater than or equal to 0",
                    )),
                    None => out.push(Cause::invalid(
                        format!("{path}.resources.{kind}[{k}]"),
                        v,
                        "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                    )),
                }
            }
        }
    }
    if let (Some(req), Some(lim)) = (
        c.pointer("/resources/requests").and_then(Value::as_object),
        c.pointer("/resources/limits").and_then(Value::as_object),
    ) {
        for (k, r) in req {
            if let (Some(rq), Some(lq)) = (quantity_of(r), lim.get(k).and_then(quantity_of))
                && rq > lq
            {
                out.push(Cause::invalid(
                    format!("{path}.resources.requests"),
                    r,
                    &format!(
                        "must be less than or equal to {k} limit of {}",
                        lim.get(k).map(value_str).unwrap_or_default()
                    ),
                ));
            }
        }
    }
}

fn value_str(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Validates a pod spec at `path`.
pub(crate) fn validate_pod_spec(spec: Option<&Value>, path: &str, out: &mut Vec<Cause>) {
    let Some(spec) = spec.filter(|s| s.is_object()) else {
        out.push(Cause::required(format!("{path}.containers")));
        return;
    };
    let mut names = Vec::new();
    match spec.get("containers").and_then(Value::as_array) {
        Some(cs) if !cs.is_empty() => {
            for (i, c) in cs.iter().enumerate() {
                validate_container(c, &format!("{path}.containers[{i}]"), &mut names, out);
            }
        }
        _ => out.push(Cause::required(format!("{path}.containers"))),
    }
    if let Some(cs) = spec.get("initContainers").and_then(Value::as_array) {
        for (i, c) in cs.iter().enumerate() {
            validate_container(c, &format!("{path}.initContainers[{i}]"), &mut names, out);
        }
    }
    let check = |field: &str, allowed: &[&str], out: &mut Vec<Cause>| {
        if let Some(v) = spec.get(field)
            && !v.as_str().is_some_and(|s| allowed.contains(&s))
        {
            out.push(Cause::not_supported(format!("{path}.{field}"), v, allowed));
        }
    };
    check("restartPolicy", &["Always", "OnFailure", "Never"], out);
    check(
        "dnsPolicy",
        &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
        out,
    );
    if let Some(g) = spec.get("terminationGracePeriodSeconds")
        && g.as_i64().is_none_or(|g| g < 0)
    {
        out.push(Cause::invalid(
            format!("{path}.terminationGracePeriodSeconds"),
            g,
            "must be greater than or equal to 0",
        ));
    }
    if let Some(ns) = spec.get("nodeName").and_then(Value::as_str)
        && !ns.is_empty()
        && !is_dns_subdomain(ns)
    {
        out.push(Cause::invalid(
            format!("{path}.nodeName"),
            &json!(ns),
            "a lowercase RFC 1123 subdomain",
        ));
    }
    if let Some(vols) = spec.get("volumes").and_then(Value::as_array) {
        let mut seen = Vec::new();
        for (i, v) in vols.iter().enumerate() {
            match v.get("name").and_then(Value::as_str) {
                None | Some("") => out.push(Cause::required(format!("{path}.volumes[{i}].name"))),
                Some(n) if seen.contains(&n) => {
                    out.push(Cause::duplicate(
                        format!("{path}.volumes[{i}].name"),
                        &json!(n),
                    ));
                }
                Some(n) => seen.push(n),
            }
        }
    }
}

fn validate_workload(obj: &Value, out: &mut Vec<Cause>) {
    let spec = obj.get("spec");
    if let Some(r) = spec.and_then(|s| s.get("replicas"))
        && r.as_i64().is_none_or(|r| r < 0)
    {
        out.push(Cause::invalid(
            "spec.replicas",
            r,
            "must be greater than or equal to 0",
        ));
    }
    let selector = spec.and_then(|s| s.get("selector"));
    let template_labels = obj.pointer("/spec/template/metadata/labels");
    match selector {
        None => out.push(Cause::required("spec.selector")),
        Some(sel) => match super::selector::LabelSelector::from_label_selector_object(sel) {
            Ok(s) if s.is_empty() => out.push(Cause::invalid(
                "spec.selector",
                sel,
                "empty selector is invalid for deployment",
            )),
            Ok(s) => {
                if !s.matches(template_labels.and_then(Value::as_object)) {
                    out.push(Cause::invalid(
                        "spec.template.metadata.labels",
                        template_labels.unwrap_or(&Value::Null),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
            Err(e) => out.push(Cause::invalid("spec.selector", sel, &e)),
        },
    }
    validate_labels(template_labels, "spec.template.metadata.labels", out);
    let tspec = obj.pointer("/spec/template/spec");
    validate_pod_spec(tspec, "spec.template.spec", out);
    if let Some(rp) = tspec.and_then(|s| s.get("restartPolicy"))
        && rp.as_str() != Some("Always")
    {
        out.push(Cause::not_supported(
            "spec.template.spec.restartPolicy",
            rp,
            &["Always"],
        ));
    }
}

fn validate_service(obj: &Value, out: &mut Vec<Cause>) {
    let ty = obj
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        out.push(Cause::not_supported(
            "spec.type",
            &json!(ty),
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        ));
    }
    let ports = obj.pointer("/spec/ports").and_then(Value::as_array);
    let headless = obj.pointer("/spec/clusterIP").and_then(Value::as_str) == Some("None");
    if ports.is_none_or(Vec::is_empty) && ty != "ExternalName" && !headless {
        out.push(Cause::required("spec.ports"));
    }
    for (i, p) in ports.into_iter().flatten().enumerate() {
        let port = p.get("port");
        if !port
            .and_then(Value::as_i64)
            .is_some_and(|n| (1..=65535).contains(&n))
        {
            out.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                port.unwrap_or(&Value::Null),
                "must be between 1 and 65535, inclusive",
            ));
        }
        if ports.is_some_and(|ps| ps.len() > 1)
            && p.get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            out.push(Cause::required(format!("spec.ports[{i}].name")));
        }
    }
}

fn validate_data_keys(obj: &Value, out: &mut Vec<Cause>) {
    for field in ["data", "binaryData", "stringData"] {
        if let Some(m) = obj.get(field).and_then(Value::as_object) {
            for k in m.keys() {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    out.push(Cause::invalid(
                        format!("{field}[{k}]"),
                        &json!(k),
                        "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                    ));
                }
            }
        }
    }
}

/// Validates an object of kind `res`; returns every cause found.
pub(crate) fn validate(res: &Resource, obj: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    validate_meta(res, obj, &mut out);
    match res.kind {
        "Pod" => validate_pod_spec(obj.get("spec"), "spec", &mut out),
        "Deployment" | "ReplicaSet" => validate_workload(obj, &mut out),
        "Service" => validate_service(obj, &mut out),
        "ConfigMap" | "Secret" => validate_data_keys(obj, &mut out),
        "RuntimeClass" => match obj.get("handler").and_then(Value::as_str) {
            Some(h) if is_dns_label(h) => {}
            Some(h) => out.push(Cause::invalid(
                "handler",
                &json!(h),
                "a lowercase RFC 1123 label",
            )),
            None => out.push(Cause::required("handler")),
        },
        "Event" if obj.pointer("/involvedObject").is_none() => {
            out.push(Cause::required("involvedObject"));
        }
        _ => {}
    }
    out
}

/// Pod spec fields an update may change; everything else is immutable.
const POD_MUTABLE: &[&str] = &[
    "activeDeadlineSeconds",
    "tolerations",
    "terminationGracePeriodSeconds",
    "schedulingGates",
];

/// Rules that compare an update with the stored object.
pub(crate) fn validate_update(res: &Resource, old: &Value, new: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    if res.kind == "Pod" {
        let strip = |spec: Option<&Value>| {
            let mut s = spec.cloned().unwrap_or(Value::Null);
            if let Value::Object(m) = &mut s {
                for f in POD_MUTABLE {
                    m.remove(*f);
                }
                for list in ["containers", "initContainers"] {
                    if let Some(Value::Array(cs)) = m.get_mut(list) {
                        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                            c.remove("image");
                        }
                    }
                }
            }
            s
        };
        if strip(old.get("spec")) != strip(new.get("spec")) {
            out.push(Cause::forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            ));
        }
    }
    if matches!(res.kind, "Deployment" | "ReplicaSet")
        && old.pointer("/spec/selector") != new.pointer("/spec/selector")
    {
        out.push(Cause::invalid(
            "spec.selector",
            new.pointer("/spec/selector").unwrap_or(&Value::Null),
            "field is immutable",
        ));
    }
    if res.kind == "Service" {
        let ip = |o: &Value| {
            o.pointer("/spec/clusterIP")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        if !ip(new).is_empty() && ip(old) != ip(new) {
            out.push(Cause::invalid(
                "spec.clusterIPs[0]",
                &json!(ip(new)),
                "may not change once set",
            ));
        }
    }
    if matches!(res.kind, "ConfigMap" | "Secret")
        && old.get("immutable") == Some(&json!(true))
        && (old.get("data") != new.get("data") || old.get("binaryData") != new.get("binaryData"))
    {
        out.push(Cause::forbidden(
            "data",
            "field is immutable when `immutable` is set",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::find;

    fn pod(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec})
    }

    #[test]
    fn pod_defaults() {
        let res = find("", "v1", "pods").expect("pods");
        let mut p = pod(json!({"containers": [
            {"name": "a", "image": "nginx", "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "nginx:1.25"},
            {"name": "c", "image": "reg:5000/x:latest"}
        ]}));
        default_object(res, &mut p);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(p["spec"]["dnsPolicy"], "ClusterFirst");
        assert_eq!(p["spec"]["schedulerName"], "default-scheduler");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(
            p["spec"]["containers"][1]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(p["spec"]["containers"][2]["imagePullPolicy"], "Always");
        assert_eq!(p["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(
            p["spec"]["containers"][0]["terminationMessagePath"],
            "/dev/termination-log"
        );
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["status"]["qosClass"], "BestEffort");
        // Explicit values are kept.
        let mut p = pod(
            json!({"restartPolicy": "Never", "containers": [{"name": "a", "image": "x", "imagePullPolicy": "Never"}]}),
        );
        default_object(res, &mut p);
        assert_eq!(p["spec"]["restartPolicy"], "Never");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Never");
    }

    #[test]
    fn qos() {
        let c =
            |r: Value| pod(json!({"containers": [{"name": "a", "image": "x", "resources": r}]}));
        assert_eq!(qos_class(&c(json!({}))), "BestEffort");
        assert_eq!(
            qos_class(&c(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed",
            "requests default to limits"
        );
        assert_eq!(
            qos_class(&c(
                json!({"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
            )),
            "Burstable"
        );
        assert_eq!(
            qos_class(&c(json!({"requests": {"cpu": "100m"}}))),
            "Burstable"
        );
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("1Ki"), Some(1024.0));
        assert_eq!(parse_quantity("abc"), None);
    }

    #[test]
    fn validation_lists_every_cause() {
        let res = find("", "v1", "pods").expect("pods");
        let p = json!({"metadata": {"name": "Bad_Name", "labels": {"ok": "bad value"}},
                       "spec": {"restartPolicy": "Sometimes", "containers": [
                           {"name": "a", "ports": [{"containerPort": 70000}]},
                           {"name": "a", "image": "x", "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}]}});
        let causes = validate(res, &p);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        for want in [
            "metadata.name",
            "metadata.labels.ok",
            "spec.containers[0].image",
            "spec.containers[0].ports[0].containerPort",
            "spec.containers[1].name",
            "spec.containers[1].resources.requests",
            "spec.restartPolicy",
        ] {
            assert!(
                fields.contains(&want),
                "missing cause for {want}: {fields:?}"
            );
        }
    }

    #[test]
    fn deployment_selector_must_match() {
        let res = find("apps", "v1", "deployments").expect("deployments");
        let d = json!({"metadata": {"name": "d"}, "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "y"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let causes = validate(res, &d);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn unknown_fields_found_and_stripped() {
        let mut d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "bogus": 1,
            "metadata": {"name": "d", "nam": "x"},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagee": "j"}]}}}});
        let found = unknown_fields(&mut d, "Deployment", true);
        assert_eq!(
            found,
            vec![
                "bogus",
                "metadata.nam",
                "spec.template.spec.containers[0].imagee"
            ]
        );
        assert!(d.get("bogus").is_none());
        assert!(unknown_fields(&mut d, "Deployment", false).is_empty());
    }

    #[test]
    fn pod_update_immutability() {
        let res = find("", "v1", "pods").expect("pods");
        let old = pod(json!({"containers": [{"name": "a", "image": "x"}]}));
        let mut new = old.clone();
        new["spec"]["containers"][0]["image"] = json!("y");
        assert!(validate_update(res, &old, &new).is_empty());
        new["spec"]["restartPolicy"] = json!("Never");
        assert_eq!(validate_update(res, &old, &new).len(), 1);
    }
}
