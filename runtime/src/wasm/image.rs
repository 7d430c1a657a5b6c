//! Wasm images: parse references, fetch once into a content-addressed cache, verify pins.
//!
//! References: `/abs/path.wasm`, `relative/path.wasm`, `file:///abs/path.wasm`, or
//! `http://host[:port]/path.wasm` (plain HTTP/1.0; TLS is not built in), each optionally followed
//! by `@sha256:<64 hex>`, which is verified. Files are stored as `<root>/sha256/<hex>.wasm`.
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::pod_runtime::RuntimeError;

/// Where the bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    File(PathBuf),
    Http {
        host: String,
        port: u16,
        path: String,
    },
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageRef {
    pub(crate) location: Location,
    /// Lower-case hex sha256 the content must have.
    pub(crate) pinned: Option<String>,
}

pub(crate) fn parse(image: &str) -> Result<ImageRef, RuntimeError> {
    let refused = |reason: &str| RuntimeError::ImageRefused {
        image: image.to_owned(),
        reason: reason.to_owned(),
    };
    let (loc, pinned) = match image.rsplit_once("@sha256:") {
        Some((loc, hex)) => {
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(refused("digest must be @sha256: followed by 64 hex digits"));
            }
            (loc, Some(hex.to_ascii_lowercase()))
        }
        None => (image, None),
    };
    if loc.is_empty() {
        return Err(refused("empty image reference"));
    }
    let location = if let Some(rest) = loc.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(refused("file:// URLs must hold an absolute path"));
        }
        Location::File(PathBuf::from(rest))
    } else if let Some(rest) = loc.strip_prefix("http://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| refused("bad port in URL"))?),
            None => (authority, 80),
        };
        Location::Http {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        }
    } else if loc.starts_with("https://") {
        return Err(refused(
            "https images are not supported (no TLS client in the node)",
        ));
    } else if loc.contains("://") {
        return Err(refused("unsupported URL scheme"));
    } else {
        Location::File(PathBuf::from(loc))
    };
    Ok(ImageRef { location, pinned })
}

/// Identity of a local file at the time it was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// The node's image cache.
pub(crate) struct ImageStore {
    dir: PathBuf,
    max_bytes: u64,
    /// Image reference → (file stamp for unpinned local files, digest), so a warm start costs
    /// one `stat` instead of re-hashing the module.
    resolved: Mutex<HashMap<String, (Option<Stamp>, String)>>,
}

impl ImageStore {
    pub(crate) fn new(dir: PathBuf, max_bytes: u64) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            RuntimeError::Config(format!("cannot create image cache {}: {e}", dir.display()))
        })?;
        Ok(ImageStore {
            dir,
            max_bytes,
            resolved: Mutex::new(HashMap::new()),
        })
    }

    fn cas_path(&self, hex: &str) -> PathBuf {
        self.dir.join(format!("{hex}.wasm"))
    }

    /// The digest of `image` if it was pulled before and is unchanged; cheap (one `stat` for
    /// unpinned local files, nothing otherwise).
    pub(crate) fn cached(&self, image: &str) -> Option<(String, PathBuf)> {
        let guard = self
            .resolved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (st, hex) = guard.get(image)?.clone();
        drop(guard);
        if let Some(st) = st {
            let ImageRef {
                location: Location::File(p),
                ..
            } = parse(image).ok()?
            else {
                return None;
            };
            if stamp(&p).ok()? != st {
                return None;
            }
        }
        let path = self.cas_path(&hex);
        Some((hex, path))
    }

    /// Fetches `image` into the cache (blocking IO: call from a blocking thread).
    pub(crate) fn pull(&self, image: &str) -> Result<(String, PathBuf), RuntimeError> {
        let r = parse(image)?;
        let not_found = |reason: String| RuntimeError::ImageNotFound {
            image: image.to_owned(),
            reason,
        };
        let refused = |reason: String| RuntimeError::ImageRefused {
            image: image.to_owned(),
            reason,
        };
        if let Some(hex) = &r.pinned {
            let path = self.cas_path(hex);
            if path.exists() {
                self.remember(image, None, hex);
                return Ok((hex.clone(), path));
            }
        }
        let (bytes, st) = match &r.location {
            Location::File(p) => {
                let st = stamp(p).map_err(|e| not_found(format!("{}: {e}", p.display())))?;
                if st.size > self.max_bytes {
                    return Err(refused(format!(
                        "module is {} bytes, over the node's limit of {} bytes",
                        st.size, self.max_bytes
                    )));
                }
                let bytes =
                    std::fs::read(p).map_err(|e| not_found(format!("{}: {e}", p.display())))?;
                (bytes, if r.pinned.is_none() { Some(st) } else { None })
            }
            Location::Http { host, port, path } => (
                http_get(host, *port, path, self.max_bytes).map_err(|e| match e {
                    HttpError::TooLarge(n) => refused(format!(
                        "module is at least {n} bytes, over the node's limit of {} bytes",
                        self.max_bytes
                    )),
                    HttpError::Other(m) => not_found(m),
                })?,
                None,
            ),
        };
        if bytes.len() as u64 > self.max_bytes {
            return Err(refused(format!(
                "module is {} bytes, over the node's limit of {} bytes",
                bytes.len(),
                self.max_bytes
            )));
        }
        let hex = hex::encode(Sha256::digest(&bytes));
        if let Some(pin) = &r.pinned
            && *pin != hex
        {
            return Err(refused(format!(
                "content digest sha256:{hex} does not match the pinned digest"
            )));
        }
        let path = self.cas_path(&hex);
        if !path.exists() {
            let tmp = self.dir.join(format!(".{hex}.{}", super::temp_suffix()));
            std::fs::write(&tmp, &bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| RuntimeError::Internal(format!("cannot store image: {e}")))?;
        }
        self.remember(image, st, &hex);
        Ok((hex, path))
    }

    fn remember(&self, image: &str, st: Option<Stamp>, hex: &str) {
        self.resolved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(image.to_owned(), (st, hex.to_owned()));
    }
}

enum HttpError {
    TooLarge(u64),
    Other(String),
}

/// A minimal HTTP/1.0 GET: enough for a local registry or file server.
fn http_get(host: &str, port: u16, path: &str, max_bytes: u64) -> Result<Vec<u8>, HttpError> {
    let other = |m: String| HttpError::Other(m);
    let mut s = std::net::TcpStream::connect((host, port))
        .map_err(|e| other(format!("connect {host}:{port}: {e}")))?;
    let timeout = Some(Duration::from_secs(30));
    let _ = s.set_read_timeout(timeout);
    let _ = s.set_write_timeout(timeout);
    // One write: a server may act on the first segment it reads.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .map_err(|e| other(format!("send request: {e}")))?;
    let mut buf = Vec::new();
    let limit = max_bytes + 64 * 1024;
    s.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| other(format!("read response: {e}")))?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| other("malformed HTTP response".into()))?;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if status != "200" {
        return Err(other(format!("HTTP status {status:?} for {path}")));
    }
    let body = buf.split_off(head_end + 4);
    if body.len() as u64 > max_bytes {
        return Err(HttpError::TooLarge(body.len() as u64));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let pin = "ab".repeat(32);
        let r = parse(&format!("file:///x/y.wasm@sha256:{pin}")).expect("parse");
        assert_eq!(r.location, Location::File("/x/y.wasm".into()));
        assert_eq!(r.pinned.as_deref(), Some(pin.as_str()));
        assert_eq!(
            parse("rel/a.wasm").expect("parse").location,
            Location::File("rel/a.wasm".into())
        );
        let r = parse("http://127.0.0.1:8080/m.wasm").expect("parse");
        assert_eq!(
            r.location,
            Location::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/m.wasm".into()
            }
        );
        assert!(parse("/a.wasm@sha256:123").is_err());
        assert!(parse("ftp://x/a.wasm").is_err());
        assert!(parse("file://rel.wasm").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn pulls_verifies_and_caches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::new(dir.path().join("cas"), 1024).expect("store");
        let wasm = dir.path().join("m.wasm");
        std::fs::write(&wasm, b"\0asm\x01\0\0\0").expect("write");
        let image = wasm.display().to_string();
        assert!(store.cached(&image).is_none());
        let (hex, path) = store.pull(&image).expect("pull");
        assert_eq!(std::fs::read(&path).expect("cas file"), b"\0asm\x01\0\0\0");
        assert_eq!(store.cached(&image).map(|c| c.0), Some(hex.clone()));
        // Pinned: good digest accepted, bad digest refused.
        store
            .pull(&format!("{image}@sha256:{hex}"))
            .expect("pinned pull");
        let bad = format!("{image}@sha256:{}", "0".repeat(64));
        assert!(matches!(
            store.pull(&bad),
            Err(RuntimeError::ImageRefused { .. })
        ));
        // Changing the file invalidates the fast path.
        std::fs::write(&wasm, b"\0asm\x01\0\0\0\0").expect("rewrite");
        assert!(store.cached(&image).is_none());
        // Size limit.
        std::fs::write(&wasm, vec![0u8; 2048]).expect("big");
        let err = store.pull(&image).expect_err("too big");
        assert!(err.to_string().contains("over the node's limit"), "{err}");
        // Missing file.
        assert!(matches!(
            store.pull("/no/such.wasm"),
            Err(RuntimeError::ImageNotFound { .. })
        ));
    }
}
