//! configMap and secret volumes, as the kubelet's volume manager sets them up: the agent reads
//! the objects through its API client and writes their keys as files under
//! `<volume_dir>/<pod uid>/<volume>`; the pod then goes to its runtime with a hostPath volume
//! there, mounted read-only into every container that mounts it.
//!
//! The files are written once per pod start; later changes to the objects reach the pod when it
//! restarts (the kubelet's periodic refresh is not implemented).
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use api::pod::{HostPathVolumeSource, KeyToPath, PodSpec};
use base64::Engine as _;
use serde_json::Value;

use super::client::ApiClient;

/// Kubernetes' `defaultMode` of configMap and secret files.
const DEFAULT_MODE: u32 = 0o644;

/// Why a volume could not be set up; the message is what the pod's events show.
#[derive(Debug, thiserror::Error)]
#[error("MountVolume.SetUp failed for volume {volume:?} : {reason}")]
pub(crate) struct VolumeError {
    volume: String,
    reason: String,
}

fn err(volume: &str, reason: impl Into<String>) -> VolumeError {
    VolumeError {
        volume: volume.to_owned(),
        reason: reason.into(),
    }
}

/// The directory of a pod's volumes.
pub(crate) fn pod_dir(volume_dir: &Path, uid: &str) -> PathBuf {
    volume_dir.join(uid.replace(['/', '.'], "_"))
}

/// Whether the spec has volumes this module sets up.
pub(crate) fn needed(spec: &PodSpec) -> bool {
    spec.volumes
        .iter()
        .any(|v| v.config_map.is_some() || v.secret.is_some())
}

/// The keys of an object: `data` (text for ConfigMaps, base64 for Secrets) and `binaryData`
/// (base64).
fn keys(obj: &Value, data_is_base64: bool) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = BTreeMap::new();
    let field = |name: &str| obj.get(name).and_then(Value::as_object).cloned();
    for (k, v) in field("data").unwrap_or_default() {
        let text = v.as_str().unwrap_or_default();
        let bytes = if data_is_base64 {
            b64.decode(text)
                .map_err(|e| format!("key {k:?} is not valid base64: {e}"))?
        } else {
            text.as_bytes().to_vec()
        };
        out.insert(k, bytes);
    }
    for (k, v) in field("binaryData").unwrap_or_default() {
        let bytes = b64
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| format!("key {k:?} is not valid base64: {e}"))?;
        out.insert(k, bytes);
    }
    // Secrets written with stringData and not yet merged by the API server.
    if data_is_base64 {
        for (k, v) in field("stringData").unwrap_or_default() {
            out.entry(k)
                .or_insert_with(|| v.as_str().unwrap_or_default().as_bytes().to_vec());
        }
    }
    Ok(out)
}

/// A relative path without `..`, as Kubernetes validates `items[].path`.
fn safe_relative(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The files of a volume: every key, or only `items`, each with its mode.
fn files(
    volume: &str,
    kind: &str,
    name: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: &[KeyToPath],
    default_mode: u32,
    optional: bool,
) -> Result<Vec<(String, Vec<u8>, u32)>, VolumeError> {
    if items.is_empty() {
        return Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone(), default_mode))
            .collect());
    }
    let mut out = Vec::new();
    for it in items {
        if !safe_relative(&it.path) {
            return Err(err(volume, format!("invalid path {:?}", it.path)));
        }
        match data.get(&it.key) {
            Some(v) => out.push((it.path.clone(), v.clone(), it.mode.unwrap_or(default_mode))),
            None if optional => {}
            None => {
                return Err(err(
                    volume,
                    format!("couldn't find key {} in {kind} {name}", it.key),
                ));
            }
        }
    }
    Ok(out)
}

async fn write_files(dir: &Path, files: &[(String, Vec<u8>, u32)]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::fs::create_dir_all(dir).await?;
    for (path, bytes, mode) in files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::write(&p, bytes).await?;
        tokio::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode & 0o777)).await?;
    }
    Ok(())
}

/// Writes the pod's configMap and secret volumes under `volume_dir` and rewrites them in
/// `spec` as read-only hostPath volumes.
pub(crate) async fn materialise(
    client: &ApiClient,
    volume_dir: &Path,
    namespace: &str,
    uid: &str,
    spec: &mut PodSpec,
) -> Result<(), VolumeError> {
    use std::os::unix::fs::PermissionsExt as _;
    let root = pod_dir(volume_dir, uid);
    // Other host users stay out; the containers see each volume directory through its bind
    // mount, whose own mode is what counts there.
    let prepared = async {
        tokio::fs::create_dir_all(&root).await?;
        tokio::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).await
    };
    prepared
        .await
        .map_err(|e| err("(all)", format!("creating {}: {e}", root.display())))?;
    let mut rewritten = Vec::new();
    for vol in &mut spec.volumes {
        let (kind, resource, name, items, mode, optional, base64) =
            match (&vol.config_map, &vol.secret) {
                (Some(cm), _) => (
                    "ConfigMap",
                    "configmaps",
                    cm.name.clone(),
                    cm.items.clone(),
                    cm.default_mode,
                    cm.optional == Some(true),
                    false,
                ),
                (None, Some(sec)) => (
                    "Secret",
                    "secrets",
                    sec.secret_name.clone(),
                    sec.items.clone(),
                    sec.default_mode,
                    sec.optional == Some(true),
                    true,
                ),
                (None, None) => continue,
            };
        let path = format!("/api/v1/namespaces/{namespace}/{resource}/{name}");
        let obj = match client.get(&path).await {
            Ok(Some(o)) => Some(o),
            Ok(None) if optional => None,
            Ok(None) => {
                return Err(err(
                    &vol.name,
                    format!("{} {name:?} not found", kind.to_lowercase()),
                ));
            }
            Err(e) => return Err(err(&vol.name, format!("reading {kind} {name}: {e}"))),
        };
        let data = match &obj {
            Some(o) => keys(o, base64).map_err(|e| err(&vol.name, e))?,
            None => BTreeMap::new(),
        };
        let files = files(
            &vol.name,
            kind,
            &name,
            &data,
            &items,
            mode.unwrap_or(DEFAULT_MODE),
            optional,
        )?;
        let dir = root.join(&vol.name);
        write_files(&dir, &files)
            .await
            .map_err(|e| err(&vol.name, format!("writing {}: {e}", dir.display())))?;
        vol.config_map = None;
        vol.secret = None;
        vol.host_path = Some(HostPathVolumeSource {
            path: dir.display().to_string(),
            type_: Some("Directory".into()),
        });
        rewritten.push(vol.name.clone());
    }
    for c in spec.containers.iter_mut().chain(&mut spec.init_containers) {
        for m in &mut c.volume_mounts {
            if rewritten.contains(&m.name) {
                m.read_only = Some(true);
            }
        }
    }
    Ok(())
}

/// Removes a pod's volume files.
pub(crate) async fn remove(volume_dir: &Path, uid: &str) {
    let dir = pod_dir(volume_dir, uid);
    match tokio::fs::remove_dir_all(&dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "pod volumes not removed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_data_and_binary_data() {
        let cm = serde_json::json!({"data": {"a.conf": "x=1\n"}, "binaryData": {"b": "AAE="}});
        let k = keys(&cm, false).unwrap();
        assert_eq!(k["a.conf"], b"x=1\n");
        assert_eq!(k["b"], [0, 1]);
        let secret = serde_json::json!({"data": {"password": "aHVudGVyMg=="}});
        assert_eq!(keys(&secret, true).unwrap()["password"], b"hunter2");
        let bad = serde_json::json!({"data": {"p": "***"}});
        assert!(keys(&bad, true).is_err());
    }

    #[test]
    fn items_select_keys_and_paths() {
        let data = BTreeMap::from([
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
        ]);
        let all = files("v", "ConfigMap", "cm", &data, &[], 0o644, false).unwrap();
        assert_eq!(all.len(), 2);
        let items = [KeyToPath {
            key: "b".into(),
            path: "dir/b.txt".into(),
            mode: Some(0o400),
        }];
        let some = files("v", "ConfigMap", "cm", &data, &items, 0o644, false).unwrap();
        assert_eq!(some, [("dir/b.txt".to_owned(), b"2".to_vec(), 0o400)]);
        let missing = [KeyToPath {
            key: "c".into(),
            path: "c".into(),
            mode: None,
        }];
        let e = files("v", "ConfigMap", "cm", &data, &missing, 0o644, false).unwrap_err();
        assert!(e.to_string().contains("couldn't find key c"), "{e}");
        assert!(
            files("v", "ConfigMap", "cm", &data, &missing, 0o644, true)
                .unwrap()
                .is_empty()
        );
        let escape = [KeyToPath {
            key: "a".into(),
            path: "../etc/passwd".into(),
            mode: None,
        }];
        assert!(files("v", "ConfigMap", "cm", &data, &escape, 0o644, false).is_err());
    }

    #[tokio::test]
    async fn written_files_have_their_modes() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vol");
        write_files(&target, &[("k/v".into(), b"x".to_vec(), 0o400)])
            .await
            .unwrap();
        let meta = std::fs::metadata(target.join("k/v")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        // Written again (a restart): the old files go.
        write_files(&target, &[("w".into(), b"y".to_vec(), 0o644)])
            .await
            .unwrap();
        assert!(!target.join("k/v").exists());
        assert_eq!(std::fs::read(target.join("w")).unwrap(), b"y");
    }
}
