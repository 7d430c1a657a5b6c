//! Just enough of Kubernetes' protobuf encoding to read the one body kubectl only sends as
//! protobuf: `SelfSubjectAccessReview` (`kubectl auth can-i`). Answers are JSON, which
//! kubectl's `Accept` also allows.

use serde_json::{Map, Value, json};

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

/// Decodes a protobuf `SelfSubjectAccessReview` into its JSON form.
pub(crate) fn self_subject_access_review(body: &[u8]) -> Option<Value> {
    let unknown = body.strip_prefix(MAGIC)?;
    let raw = field(unknown, 2)?;
    let spec = field(raw, 2)?;
    let mut out = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                         "metadata": {}, "spec": {}});
    if let Some(ra) = field(spec, 1) {
        let names = [
            "namespace",
            "verb",
            "group",
            "version",
            "resource",
            "subresource",
            "name",
        ];
        let mut m = Map::new();
        for (f, v) in fields(ra)? {
            if let Some(name) = usize::try_from(f)
                .ok()
                .and_then(|f| names.get(f.wrapping_sub(1)))
            {
                m.insert((*name).to_string(), json!(String::from_utf8_lossy(v)));
            }
        }
        out["spec"]["resourceAttributes"] = Value::Object(m);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u8, data: &[u8]) -> Vec<u8> {
        let mut v = vec![(field << 3) | 2, u8::try_from(data.len()).expect("short")];
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn decodes_resource_attributes() {
        let ra = [ld(1, b"default"), ld(2, b"create"), ld(5, b"pods")].concat();
        let raw = ld(2, &ld(1, &ra));
        let unknown = [ld(1, &ld(1, b"authorization.k8s.io/v1")), ld(2, &raw)].concat();
        let body = [MAGIC.to_vec(), unknown].concat();
        let v = self_subject_access_review(&body).expect("decode");
        assert_eq!(
            v["spec"]["resourceAttributes"],
            json!({"namespace": "default", "verb": "create", "resource": "pods"})
        );
        assert!(self_subject_access_review(b"{}").is_none());
    }
}
