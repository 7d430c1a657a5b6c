//! Kubernetes' protobuf encoding, for request bodies: kubectl's typed clients (`kubectl create
//! deployment`, `run`, `create namespace|configmap|secret`, `expose`, `auth can-i`) send
//! `application/vnd.kubernetes.protobuf` and do not fall back to JSON. Bodies are decoded into
//! the JSON form with the field tables in `schema.rs` (generated from Kubernetes'
//! `generated.proto` files by `gen_schema.py`). Answers stay JSON, which those clients accept.

use base64::Engine as _;
use serde_json::{Map, Value, json};

mod schema;

/// Pointer-typed (`*int32`, `*bool`, ...) fields whose explicit zero / false means something.
const KEEP_ZERO: &[&str] = &[
    "replicas",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "priority",
    "revisionHistoryLimit",
    "progressDeadlineSeconds",
    "deletionGracePeriodSeconds",
    "gracePeriodSeconds",
    "enableServiceLinks",
    "automountServiceAccountToken",
    "immutable",
    "privileged",
    "allowPrivilegeEscalation",
    "runAsNonRoot",
    "runAsUser",
    "runAsGroup",
    "fsGroup",
    "readOnlyRootFilesystem",
    "defaultMode",
    "mode",
    "tolerationSeconds",
    "leaseDurationSeconds",
    "leaseTransitions",
    "shareProcessNamespace",
    "hostUsers",
    "setHostnameAsFQDN",
    "optional",
    "expirationSeconds",
    "allowed",
    "denied",
    "containerPort",
    "port",
];

/// Scalar or message type of a field.
#[derive(Debug, Clone, Copy)]
#[allow(
    dead_code,
    reason = "gen_schema.py emits these for kinds not served yet"
)]
pub(crate) enum Ty {
    Str,
    Bytes,
    I64,
    Bool,
    F64,
    /// `metav1.Time` / `MicroTime`: RFC 3339 text.
    Time,
    /// `metav1.Duration`: Go duration text.
    Duration,
    /// `resource.Quantity`: its string form.
    Quantity,
    /// `intstr.IntOrString`.
    IntStr,
    /// `runtime.RawExtension`: embedded JSON.
    Raw,
    /// Another message, by index into `schema::MSGS`.
    Msg(usize),
}

/// How a field repeats.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Shape {
    One,
    List,
    /// `map<string, V>`.
    Map,
}

/// One field of a message.
#[derive(Debug)]
pub(crate) struct Field {
    pub num: u64,
    pub name: &'static str,
    pub ty: Ty,
    pub shape: Shape,
}

/// One message's fields.
#[derive(Debug)]
pub(crate) struct Msg {
    pub name: &'static str,
    pub fields: &'static [Field],
}

/// Magic prefix of Kubernetes protobuf bodies.
const MAGIC: &[u8] = b"k8s\0";

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// One encoded field: number, wire type, and its varint / fixed value or bytes.
struct RawField<'a> {
    num: u64,
    wire: u64,
    int: u64,
    data: &'a [u8],
}

fn raw_fields(b: &[u8]) -> Option<Vec<RawField<'_>>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (num, wire) = (key >> 3, key & 7);
        let mut f = RawField {
            num,
            wire,
            int: 0,
            data: &[],
        };
        match wire {
            0 => f.int = varint(b, &mut i)?,
            1 => {
                let bytes: [u8; 8] = b.get(i..i + 8)?.try_into().ok()?;
                f.int = u64::from_le_bytes(bytes);
                i += 8;
            }
            5 => {
                let bytes: [u8; 4] = b.get(i..i + 4)?.try_into().ok()?;
                f.int = u64::from(u32::from_le_bytes(bytes));
                i += 4;
            }
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let end = i.checked_add(len)?;
                f.data = b.get(i..end)?;
                i = end;
            }
            _ => return None,
        }
        out.push(f);
    }
    Some(out)
}

#[allow(
    clippy::cast_possible_wrap,
    reason = "protobuf int64/int32 are two's complement varints"
)]
fn as_i64(v: u64) -> i64 {
    v as i64
}

fn time_text(b: &[u8]) -> Option<Value> {
    let (mut secs, mut nanos) = (0i64, 0i64);
    for f in raw_fields(b)? {
        match f.num {
            1 => secs = as_i64(f.int),
            2 => nanos = as_i64(f.int),
            _ => {}
        }
    }
    if secs == 0 && nanos == 0 {
        // A zero Time is `null` in JSON: leave the field out.
        return None;
    }
    let t = chrono::DateTime::from_timestamp(secs, u32::try_from(nanos).unwrap_or(0))?;
    let format = if nanos == 0 {
        chrono::SecondsFormat::Secs
    } else {
        chrono::SecondsFormat::Micros
    };
    Some(json!(t.to_rfc3339_opts(format, true)))
}

fn decode_value(ty: Ty, f: &RawField<'_>) -> Result<Option<Value>, String> {
    let text = |d: &[u8]| {
        String::from_utf8(d.to_vec()).map_err(|_| "invalid UTF-8 in a string field".to_string())
    };
    Ok(match ty {
        Ty::Str => {
            let s = text(f.data)?;
            // Go's protobuf writes empty strings that JSON would omit.
            (!s.is_empty()).then(|| json!(s))
        }
        Ty::Bytes => Some(json!(
            base64::engine::general_purpose::STANDARD.encode(f.data)
        )),
        Ty::I64 => Some(json!(as_i64(f.int))),
        Ty::Bool => Some(json!(f.int != 0)),
        Ty::F64 => Some(json!(f64::from_bits(f.int))),
        Ty::Time => time_text(f.data),
        Ty::Duration => {
            let ns = raw_fields(f.data)
                .and_then(|fs| fs.into_iter().find(|x| x.num == 1))
                .map_or(0, |x| as_i64(x.int));
            Some(json!(format!("{}s", ns / 1_000_000_000)))
        }
        Ty::Quantity => {
            let fs = raw_fields(f.data).ok_or("malformed quantity")?;
            let s = fs
                .iter()
                .find(|x| x.num == 1)
                .map(|x| text(x.data))
                .transpose()?;
            Some(json!(s.unwrap_or_else(|| "0".into())))
        }
        Ty::IntStr => {
            let fs = raw_fields(f.data).ok_or("malformed int-or-string")?;
            let get = |n| fs.iter().find(|x| x.num == n);
            if get(1).is_some_and(|x| x.int == 1) {
                Some(json!(
                    get(3)
                        .map(|x| text(x.data))
                        .transpose()?
                        .unwrap_or_default()
                ))
            } else {
                Some(json!(get(2).map_or(0, |x| as_i64(x.int))))
            }
        }
        Ty::Raw => {
            let fs = raw_fields(f.data).ok_or("malformed raw extension")?;
            match fs.iter().find(|x| x.num == 1) {
                Some(x) => Some(
                    serde_json::from_slice(x.data).map_err(|e| format!("embedded object: {e}"))?,
                ),
                None => None,
            }
        }
        Ty::Msg(i) => Some(decode_msg(f.data, i)?),
    })
}

fn decode_msg(b: &[u8], idx: usize) -> Result<Value, String> {
    let msg = schema::MSGS.get(idx).ok_or("schema index out of range")?;
    let fields = raw_fields(b).ok_or_else(|| format!("malformed protobuf in {}", msg.name))?;
    let mut out = Map::new();
    for f in &fields {
        let Some(def) = msg.fields.iter().find(|d| d.num == f.num) else {
            continue;
        };
        match def.shape {
            Shape::One => {
                let Some(v) = decode_value(def.ty, f)? else {
                    continue;
                };
                // Go writes non-pointer scalars even when zero, where JSON would leave them
                // out; only pointer fields carry an explicit zero.
                let zero = v == json!(0) || v == json!(false);
                if zero && !KEEP_ZERO.contains(&def.name) {
                    continue;
                }
                out.insert(def.name.to_string(), v);
            }
            Shape::List => {
                let list = out.entry(def.name.to_string()).or_insert_with(|| json!([]));
                let Value::Array(items) = list else { continue };
                if f.wire == 2 && matches!(def.ty, Ty::I64 | Ty::Bool) {
                    // Packed scalars.
                    let mut i = 0;
                    while i < f.data.len() {
                        let v = varint(f.data, &mut i).ok_or("malformed packed field")?;
                        items.push(if matches!(def.ty, Ty::Bool) {
                            json!(v != 0)
                        } else {
                            json!(as_i64(v))
                        });
                    }
                } else {
                    // Empty strings are real list items.
                    let v = match def.ty {
                        Ty::Str => Some(json!(String::from_utf8_lossy(f.data))),
                        ty => decode_value(ty, f)?,
                    };
                    items.push(v.unwrap_or(Value::Null));
                }
            }
            Shape::Map => {
                let entry = raw_fields(f.data).ok_or("malformed map entry")?;
                let key = entry
                    .iter()
                    .find(|x| x.num == 1)
                    .map(|x| String::from_utf8_lossy(x.data).into_owned())
                    .unwrap_or_default();
                let value = match entry.iter().find(|x| x.num == 2) {
                    Some(x) => match def.ty {
                        Ty::Str => json!(String::from_utf8_lossy(x.data)),
                        ty => decode_value(ty, x)?.unwrap_or(Value::Null),
                    },
                    None => match def.ty {
                        Ty::Str => json!(""),
                        _ => Value::Null,
                    },
                };
                let map = out.entry(def.name.to_string()).or_insert_with(|| json!({}));
                if let Value::Object(m) = map {
                    m.insert(key, value);
                }
            }
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body (`k8s\0` + `runtime.Unknown`) into the object's JSON form.
pub(crate) fn decode_object(body: &[u8]) -> Result<Value, String> {
    let unknown = body
        .strip_prefix(MAGIC)
        .ok_or("protobuf body without the k8s magic prefix")?;
    let type_meta = field(unknown, 1).unwrap_or_default();
    let api_version = field(type_meta, 1)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let kind = field(type_meta, 2)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let raw = field(unknown, 2).unwrap_or_default();
    let root = schema::ROOTS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, i)| *i)
        .ok_or_else(|| format!("protobuf bodies of kind {kind:?} are not supported; send JSON"))?;
    let mut v = decode_msg(raw, root)?;
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    Ok(v)
}

/// Length-delimited fields of one message: (field number, bytes). Other wire types are skipped.
fn fields(b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(b, &mut i)?;
            }
            1 => i += 8,
            5 => i += 4,
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let end = i.checked_add(len)?;
                out.push((field, b.get(i..end)?));
                i = end;
            }
            _ => return None,
        }
    }
    Some(out)
}

fn field(b: &[u8], n: u64) -> Option<&[u8]> {
    fields(b)?
        .into_iter()
        .find(|(f, _)| *f == n)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u8, data: &[u8]) -> Vec<u8> {
        let mut v = vec![(field << 3) | 2, u8::try_from(data.len()).expect("short")];
        v.extend_from_slice(data);
        v
    }

    fn envelope(api_version: &[u8], kind: &[u8], raw: &[u8]) -> Vec<u8> {
        let type_meta = [ld(1, api_version), ld(2, kind)].concat();
        [MAGIC.to_vec(), ld(1, &type_meta), ld(2, raw)].concat()
    }

    #[test]
    fn decodes_resource_attributes() {
        let ra = [ld(1, b"default"), ld(2, b"create"), ld(5, b"pods")].concat();
        let raw = ld(2, &ld(1, &ra));
        let body = envelope(b"authorization.k8s.io/v1", b"SelfSubjectAccessReview", &raw);
        let v = decode_object(&body).expect("decode");
        assert_eq!(
            v["spec"]["resourceAttributes"],
            json!({"namespace": "default", "verb": "create", "resource": "pods"})
        );
        assert_eq!(v["kind"], "SelfSubjectAccessReview");
        assert!(decode_object(b"{}").is_err());
    }

    #[test]
    fn decodes_a_deployment() {
        // metadata{name=1, labels=11 map}, spec{replicas=1, selector=2{matchLabels=1},
        // template=3{metadata, spec{containers=2[{name=1, image=2, ports=6[{containerPort=3}]}]}}}
        let labels = ld(11, &[ld(1, b"app"), ld(2, b"web")].concat());
        let meta = [ld(1, b"web"), ld(2, b""), labels.clone()].concat();
        let port = [vec![3 << 3, 80]].concat();
        let container = [ld(1, b"nginx"), ld(2, b"nginx:1.25"), ld(6, &port)].concat();
        let pod_spec = ld(2, &container);
        let template = [
            ld(1, &ld(11, &[ld(1, b"app"), ld(2, b"web")].concat())),
            ld(2, &pod_spec),
        ]
        .concat();
        let selector = ld(1, &[ld(1, b"app"), ld(2, b"web")].concat());
        let spec = [vec![1 << 3, 0], ld(2, &selector), ld(3, &template)].concat();
        let raw = [ld(1, &meta), ld(2, &spec)].concat();
        let v = decode_object(&envelope(b"apps/v1", b"Deployment", &raw)).expect("decode");
        assert_eq!(
            v["metadata"],
            json!({"name": "web", "labels": {"app": "web"}}),
            "empty strings dropped"
        );
        assert_eq!(v["spec"]["replicas"], 0, "explicit zero kept");
        assert_eq!(v["spec"]["selector"]["matchLabels"]["app"], "web");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            (c["name"].as_str(), c["image"].as_str()),
            (Some("nginx"), Some("nginx:1.25"))
        );
        assert_eq!(c["ports"][0]["containerPort"], 80);
        assert!(decode_object(&envelope(b"v1", b"Widget", b"")).is_err());
    }
}
