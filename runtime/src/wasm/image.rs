//! Wasm images: parse references, fetch once into a content-addressed cache, verify pins.
//!
//! References: `/abs/path.wasm`, `relative/path.wasm`, `file:///abs/path.wasm`,
//! `http://host[:port]/path.wasm` or `https://host[:port]/path.wasm` (an HTTP/1.0 GET, over
//! rustls for https, trusting the system CA bundle plus an optional extra one), each optionally
//! followed by `@sha256:<64 hex>`, which is verified. Files are stored as
//! `<root>/sha256/<hex>.wasm`.
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::pod_runtime::RuntimeError;

/// Where the bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    File(PathBuf),
    Http {
        tls: bool,
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
    } else if let Some((tls, rest)) = loc
        .strip_prefix("http://")
        .map(|r| (false, r))
        .or_else(|| loc.strip_prefix("https://").map(|r| (true, r)))
    {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        // `[v6]:port` or `host:port`; the port defaults by scheme.
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => {
                (h, p.parse().map_err(|_| refused("bad port in URL"))?)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(refused("URL has no host"));
        }
        Location::Http {
            tls,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        }
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

/// An unpinned local image file and its identity when it was hashed.
type LocalFile = (Arc<Path>, Stamp);

/// The node's image cache.
pub(crate) struct ImageStore {
    dir: PathBuf,
    max_bytes: u64,
    /// Extra trusted CA certificates (PEM) for https images.
    extra_ca: Option<PathBuf>,
    /// Built on the first https pull.
    tls: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
    /// Image reference → (file stamp for unpinned local files, digest), so a warm start costs
    /// one `stat` instead of re-hashing the module.
    resolved: Mutex<HashMap<String, (Option<LocalFile>, String)>>,
}

impl ImageStore {
    pub(crate) fn new(
        dir: PathBuf,
        max_bytes: u64,
        extra_ca: Option<PathBuf>,
    ) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            RuntimeError::Config(format!("cannot create image cache {}: {e}", dir.display()))
        })?;
        if let Some(ca) = &extra_ca {
            // Fail at node start, not at the first https pod.
            tls_config(Some(ca)).map_err(RuntimeError::Config)?;
        }
        Ok(ImageStore {
            dir,
            max_bytes,
            extra_ca,
            tls: std::sync::OnceLock::new(),
            resolved: Mutex::new(HashMap::new()),
        })
    }

    fn cas_path(&self, hex: &str) -> PathBuf {
        self.dir.join(format!("{hex}.wasm"))
    }

    /// The digest of `image` if it was pulled before and is unchanged; cheap (one `stat` for
    /// unpinned local files, nothing otherwise).
    pub(crate) fn cached(&self, image: &str) -> Option<String> {
        // On every warm start: one lookup and, for unpinned local files, one `stat`.
        let guard = self
            .resolved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (file, hex) = guard.get(image)?.clone();
        // No syscall under the lock.
        drop(guard);
        if let Some((path, st)) = file
            && stamp(&path).ok()? != st
        {
            return None;
        }
        Some(hex)
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
                let file = r.pinned.is_none().then(|| (Arc::from(p.as_path()), st));
                (bytes, file)
            }
            Location::Http {
                tls,
                host,
                port,
                path,
            } => (
                self.http_get(*tls, host, *port, path)
                    .map_err(|e| match e {
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

    fn remember(&self, image: &str, st: Option<LocalFile>, hex: &str) {
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

impl ImageStore {
    /// A minimal HTTP/1.0 GET, over TLS for https: enough for a registry or file server.
    fn http_get(&self, tls: bool, host: &str, port: u16, path: &str) -> Result<Vec<u8>, HttpError> {
        let other = |m: String| HttpError::Other(m);
        let tcp = std::net::TcpStream::connect((host, port))
            .map_err(|e| other(format!("connect {host}:{port}: {e}")))?;
        let timeout = Some(Duration::from_secs(30));
        let _ = tcp.set_read_timeout(timeout);
        let _ = tcp.set_write_timeout(timeout);
        if !tls {
            return fetch(tcp, host, path, self.max_bytes);
        }
        let config = self
            .tls
            .get_or_init(|| tls_config(self.extra_ca.as_deref()))
            .clone()
            .map_err(other)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| other(format!("bad TLS server name {host:?}: {e}")))?;
        let conn = rustls::ClientConnection::new(config, name)
            .map_err(|e| other(format!("TLS setup: {e}")))?;
        fetch(
            rustls::StreamOwned::new(conn, tcp),
            host,
            path,
            self.max_bytes,
        )
    }
}

/// Trusted roots: the system CA bundle (`SSL_CERT_FILE`, else the usual Debian / Red Hat
/// paths), plus `extra` if given (which must hold at least one certificate).
fn tls_config(extra: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.exists());
    if let Some(p) = system
        && let Ok(certs) = CertificateDer::pem_file_iter(&p)
    {
        // A bad entry in the system bundle should not take the others down with it.
        let _ = roots.add_parsable_certificates(certs.flatten());
    }
    if let Some(p) = extra {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
            .map_err(|e| format!("extra CA bundle {}: {e}", p.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("extra CA bundle {}: {e}", p.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "extra CA bundle {} holds no usable certificate",
                p.display()
            ));
        }
    }
    if roots.is_empty() {
        return Err("no trusted CA certificates (no system bundle and no extra CA bundle)".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends the request on `stream` and reads the response body, up to `max_bytes`.
fn fetch<S: Read + Write>(
    mut stream: S,
    host: &str,
    path: &str,
    max_bytes: u64,
) -> Result<Vec<u8>, HttpError> {
    let other = |m: String| HttpError::Other(m);
    // One write: a server may act on the first segment it reads.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| other(format!("send request: {e}")))?;
    let mut buf = Vec::new();
    let limit = max_bytes + 64 * 1024;
    // A TLS peer that closes without close_notify reads as UnexpectedEof: accepted below only
    // when Content-Length proves the body complete.
    let mut clean_end = true;
    match stream.take(limit + 1).read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => clean_end = false,
        Err(e) => return Err(other(format!("read response: {e}"))),
    }
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
    let content_length = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<u64>().ok())
            .flatten()
    });
    let body = buf.split_off(head_end + 4);
    if body.len() as u64 > max_bytes {
        return Err(HttpError::TooLarge(body.len() as u64));
    }
    match content_length {
        Some(n) if n != body.len() as u64 => Err(other(format!(
            "response body is {} bytes but Content-Length says {n}",
            body.len()
        ))),
        None if !clean_end => Err(other(
            "TLS connection closed without close_notify and no Content-Length: the body may be \
             truncated"
                .into(),
        )),
        _ => Ok(body),
    }
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
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/m.wasm".into()
            }
        );
        let r = parse("https://example.org/x/m.wasm").expect("parse");
        assert_eq!(
            r.location,
            Location::Http {
                tls: true,
                host: "example.org".into(),
                port: 443,
                path: "/x/m.wasm".into()
            }
        );
        let r = parse("https://[::1]:8443/m.wasm").expect("parse");
        assert!(
            matches!(r.location, Location::Http { tls: true, ref host, port: 8443, .. } if host == "::1")
        );
        assert!(parse("https:///m.wasm").is_err());
        assert!(parse("/a.wasm@sha256:123").is_err());
        assert!(parse("ftp://x/a.wasm").is_err());
        assert!(parse("file://rel.wasm").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn pulls_verifies_and_caches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::new(dir.path().join("cas"), 1024, None).expect("store");
        let wasm = dir.path().join("m.wasm");
        std::fs::write(&wasm, b"\0asm\x01\0\0\0").expect("write");
        let image = wasm.display().to_string();
        assert!(store.cached(&image).is_none());
        let (hex, path) = store.pull(&image).expect("pull");
        assert_eq!(std::fs::read(&path).expect("cas file"), b"\0asm\x01\0\0\0");
        assert_eq!(store.cached(&image), Some(hex.clone()));
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
