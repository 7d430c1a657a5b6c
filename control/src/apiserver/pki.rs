//! First-start security material under the data dir: a cluster CA, the serving certificate,
//! the admin and read-only bearer tokens, the node-token secret, and the admin kubeconfig.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Failures while creating or loading certificates, tokens and kubeconfigs.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed")]
    Cert(#[from] rcgen::Error),
    /// A stored PEM file is not valid.
    #[error("invalid PEM in {path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls rejected the key or certificate.
    #[error("TLS configuration rejected")]
    Tls(#[from] rustls::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` with mode 0600 (secrets, kubeconfigs).
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    hex::encode(bytes)
}

/// Security material of one API server, created on first start and reused afterwards.
#[derive(Clone)]
pub struct Pki {
    /// PEM of the cluster CA certificate (goes into kubeconfigs).
    pub ca_pem: String,
    /// Serving certificate chain (server certificate, then CA).
    cert_chain: Vec<CertificateDer<'static>>,
    /// Serving key, PKCS#8 DER.
    key_der: Vec<u8>,
    /// Full-rights bearer token.
    pub admin_token: String,
    /// Read-only (dashboard) bearer token.
    pub readonly_token: String,
    /// Secret from which node tokens are derived.
    node_secret: String,
    /// Secret of the server join token (`--join`).
    server_secret: String,
    /// PEM of the CA key, handed to joining servers; absent in data dirs created before join.
    ca_key_pem: Option<String>,
}

/// The cluster CA's parameters; deterministic, so a server that received the CA key can sign
/// certificates naming the same issuer.
fn ca_params() -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "flotilla-ca");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    Ok(ca_params)
}

/// Hex SHA-256 of the DER of the first certificate in `pem` (the cluster CA): what a server
/// join token pins.
pub fn ca_hash(pem: &str) -> Result<String, String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| "no certificate in the CA PEM".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(ca_hash_der(&der))
}

/// Hex SHA-256 of one DER certificate.
pub fn ca_hash_der(der: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(der))
}

/// A server join token, k3s-style: `K10<sha256 of the CA certificate>::server:<secret>`. The
/// hash lets a joining server trust the first server's CA before it has a copy of it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerToken {
    /// Hex SHA-256 of the CA certificate (DER).
    pub ca_hash: String,
    /// The shared secret that authorizes joining.
    pub secret: String,
}

impl std::fmt::Debug for ServerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerToken")
            .field("ca_hash", &self.ca_hash)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for ServerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "K10{}::server:{}", self.ca_hash, self.secret)
    }
}

impl ServerToken {
    /// Parses `K10<64 hex>::server:<secret>` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<ServerToken, String> {
        const WANT: &str =
            "want K10<ca-hash>::server:<secret>, as in a server's DATA_DIR/server-token";
        let text = text.trim();
        if text.starts_with("flotilla-node-token:") {
            return Err(format!(
                "this is a node join token (DATA_DIR/node-token, for agents), not a server token; {WANT}"
            ));
        }
        let rest = text
            .strip_prefix("K10")
            .ok_or_else(|| format!("not a server join token; {WANT}"))?;
        let (hash, secret) = rest
            .split_once("::server:")
            .ok_or_else(|| format!("not a server join token; {WANT}"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("the CA hash of the token is malformed; {WANT}"));
        }
        if secret.is_empty() || secret.contains(char::is_whitespace) {
            return Err(format!("the secret of the token is malformed; {WANT}"));
        }
        Ok(ServerToken {
            ca_hash: hash.to_ascii_lowercase(),
            secret: secret.to_string(),
        })
    }
}

/// The shared credentials a joining server receives from `POST /v1-flotilla/join`.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinBundle {
    /// Cluster CA certificate (PEM).
    pub ca_cert: String,
    /// Cluster CA key (PEM).
    pub ca_key: String,
    /// Admin bearer token (every server accepts the same kubeconfig).
    pub admin_token: String,
    /// Read-only bearer token.
    pub readonly_token: String,
    /// Node-token secret (every server accepts the same node tokens).
    pub node_secret: String,
    /// Server join token secret (any server can admit the next one).
    pub server_secret: String,
}

impl std::fmt::Debug for JoinBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinBundle").finish_non_exhaustive()
    }
}

impl JoinBundle {
    /// Writes the material under `dir` (`pki/ca.*`, `auth/*`, mode 0600) so that
    /// [`Pki::load_or_create`] then issues this server's own serving certificate from the CA.
    pub fn install(&self, dir: &Path) -> Result<(), PkiError> {
        let (pki, auth) = (dir.join("pki"), dir.join("auth"));
        for stale in ["server.crt", "server.key", "server.sans"] {
            let _ = std::fs::remove_file(pki.join(stale));
        }
        write_private(&pki.join("ca.key"), self.ca_key.as_bytes())?;
        write_private(&pki.join("ca.crt"), self.ca_cert.as_bytes())?;
        write_private(&auth.join("admin.token"), self.admin_token.as_bytes())?;
        write_private(&auth.join("readonly.token"), self.readonly_token.as_bytes())?;
        write_private(&auth.join("node.secret"), self.node_secret.as_bytes())?;
        write_private(&auth.join("server.secret"), self.server_secret.as_bytes())
    }
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads the material from `dir`, creating what is missing (CA and serving certificate for
    /// `localhost`, `127.0.0.1`, `::1` and `extra_sans`).
    pub fn load_or_create(dir: &Path, extra_sans: &[String]) -> Result<Pki, PkiError> {
        let pki = dir.join("pki");
        let (ca_crt, ca_key, srv_crt, srv_key, srv_sans) = (
            pki.join("ca.crt"),
            pki.join("ca.key"),
            pki.join("server.crt"),
            pki.join("server.key"),
            pki.join("server.sans"),
        );
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        for s in extra_sans {
            if !sans.contains(s) {
                sans.push(s.clone());
            }
        }
        let sans_text = sans.join("\n");
        let have_ca = ca_crt.exists() && ca_key.exists();
        let have_serving = srv_crt.exists() && srv_key.exists();
        // A data dir from before the CA key was kept: CA and serving certificate, no key.
        let keyless = ca_crt.exists() && have_serving;
        if !(have_ca || keyless) {
            // First start: a new cluster CA (its key is kept so that servers joining with
            // `--join` receive it and sign their own serving certificates).
            let key = rcgen::KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            write_private(&ca_key, key.serialize_pem().as_bytes())?;
            write_private(&ca_crt, cert.pem().as_bytes())?;
            let _ = std::fs::remove_file(&srv_crt);
        }
        // A serving certificate for this server's names, issued when missing (first start, or a
        // server that joined and received only the CA) or when the names changed.
        let stale = std::fs::read_to_string(&srv_sans).map_or(true, |t| t != sans_text);
        if ca_key.exists() && (!srv_crt.exists() || !srv_key.exists() || stale) {
            let read = |p: &Path| std::fs::read_to_string(p).map_err(io(p));
            let ca_key_pem = read(&ca_key)?;
            let issuer = rcgen::Issuer::new(ca_params()?, rcgen::KeyPair::from_pem(&ca_key_pem)?);
            let mut params = rcgen::CertificateParams::new(sans)?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "flotilla-apiserver");
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            params.not_after = rcgen::date_time_ymd(2035, 1, 1);
            let key = rcgen::KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            write_private(&srv_key, key.serialize_pem().as_bytes())?;
            write_private(&srv_crt, cert.pem().as_bytes())?;
            write_private(&srv_sans, sans_text.as_bytes())?;
        }
        let read = |p: &Path| std::fs::read(p).map_err(io(p));
        let ca_pem = String::from_utf8_lossy(&read(&ca_crt)?).into_owned();
        let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| PkiError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut cert_chain = Vec::new();
        for c in CertificateDer::pem_slice_iter(&read(&srv_crt)?) {
            cert_chain.push(c.map_err(|e| pem_err(&srv_crt, e))?);
        }
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            cert_chain.push(c.map_err(|e| pem_err(&ca_crt, e))?);
        }
        let key =
            PrivateKeyDer::from_pem_slice(&read(&srv_key)?).map_err(|e| pem_err(&srv_key, e))?;
        let key_der = key.secret_der().to_vec();

        let auth = dir.join("auth");
        let token = |name: &str| -> Result<String, PkiError> {
            let p = auth.join(name);
            match std::fs::read_to_string(&p) {
                Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
                _ => {
                    let t = random_token();
                    write_private(&p, t.as_bytes())?;
                    Ok(t)
                }
            }
        };
        Ok(Pki {
            ca_pem,
            cert_chain,
            key_der,
            admin_token: token("admin.token")?,
            readonly_token: token("readonly.token")?,
            node_secret: token("node.secret")?,
            server_secret: token("server.secret")?,
            ca_key_pem: std::fs::read_to_string(&ca_key).ok(),
        })
    }

    /// The server join token (`K10<ca-hash>::server:<secret>`) that `flotilla server --join`
    /// presents to join this cluster.
    pub fn server_token(&self) -> Result<ServerToken, PkiError> {
        Ok(ServerToken {
            ca_hash: ca_hash(&self.ca_pem).map_err(|message| PkiError::Pem {
                path: PathBuf::from("pki/ca.crt"),
                message,
            })?,
            secret: self.server_secret.clone(),
        })
    }

    /// Writes `DATA_DIR/server-token` (mode 0600) unless it already holds this token; returns
    /// its path.
    pub fn write_server_token(&self, dir: &Path) -> Result<PathBuf, PkiError> {
        let path = dir.join("server-token");
        let text = format!("{}\n", self.server_token()?);
        if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
            return Ok(path);
        }
        write_private(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Whether `token` (the whole server token or its secret) is this cluster's server token.
    pub(crate) fn is_server_token(&self, token: &str) -> bool {
        let secret = match ServerToken::parse(token) {
            Ok(t) => t.secret,
            Err(_) => token.to_string(),
        };
        ct_eq(&secret, &self.server_secret)
    }

    /// What a joining server needs to accept the same credentials as this one: the CA with its
    /// key and every token secret. `None` when the CA key is not on disk (a data dir created
    /// before servers could join).
    pub fn join_bundle(&self) -> Option<JoinBundle> {
        Some(JoinBundle {
            ca_cert: self.ca_pem.clone(),
            ca_key: self.ca_key_pem.clone()?,
            admin_token: self.admin_token.clone(),
            readonly_token: self.readonly_token.clone(),
            node_secret: self.node_secret.clone(),
            server_secret: self.server_secret.clone(),
        })
    }

    /// The bearer token of node `name`: `node.<name>.<mac>`, derived from the node secret so
    /// the server needs no token table. Give it to that node's agent.
    pub fn node_token(&self, name: &str) -> String {
        format!("node.{name}.{}", self.node_mac(name))
    }

    fn node_mac(&self, name: &str) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(self.node_secret.as_bytes());
        h.update([0u8]);
        h.update(name.as_bytes());
        hex::encode(&h.finalize()[..20])
    }

    /// Maps a bearer token to its identity.
    pub(crate) fn authenticate(&self, token: &str) -> Option<super::auth::Identity> {
        use super::auth::Identity;
        if ct_eq(token, &self.admin_token) {
            return Some(Identity::Admin);
        }
        if ct_eq(token, &self.readonly_token) {
            return Some(Identity::ReadOnly);
        }
        let rest = token.strip_prefix("node.")?;
        let (name, mac) = rest.rsplit_once('.')?;
        ct_eq(mac, &self.node_mac(name)).then(|| Identity::Node(name.to_string()))
    }

    /// rustls server config offering HTTP/2 and HTTP/1.1.
    pub(crate) fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::try_from(self.key_der.clone()).map_err(|e| PkiError::Pem {
            path: PathBuf::from("server.key"),
            message: e.to_string(),
        })?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.cert_chain.clone(), key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A kubeconfig for `server` (an `https://` URL) authenticating with `token`.
    pub fn kubeconfig(&self, server: &str, user: &str, token: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: flotilla\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: flotilla\n  context:\n    cluster: flotilla\n    user: {user}\n    namespace: default\ncurrent-context: flotilla\n"
        )
    }

    /// Writes `DATA_DIR/kubeconfig.yaml` (admin) and `DATA_DIR/readonly-kubeconfig.yaml`, mode 0600.
    pub fn write_kubeconfigs(&self, dir: &Path, server: &str) -> Result<PathBuf, PkiError> {
        let admin = dir.join("kubeconfig.yaml");
        write_private(
            &admin,
            self.kubeconfig(server, "admin", &self.admin_token)
                .as_bytes(),
        )?;
        write_private(
            &dir.join("readonly-kubeconfig.yaml"),
            self.kubeconfig(server, "viewer", &self.readonly_token)
                .as_bytes(),
        )?;
        Ok(admin)
    }
}

/// Comparison whose time does not depend on where the strings differ.
fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::auth::Identity;

    #[test]
    fn created_once_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Pki::load_or_create(dir.path(), &[]).expect("create");
        let b = Pki::load_or_create(dir.path(), &[]).expect("reload");
        assert_eq!(a.admin_token, b.admin_token);
        assert_eq!(a.ca_pem, b.ca_pem);
        assert!(a.server_config().is_ok());
        assert_eq!(a.authenticate(&a.admin_token), Some(Identity::Admin));
        assert_eq!(a.authenticate(&a.readonly_token), Some(Identity::ReadOnly));
        let nt = a.node_token("n1");
        assert_eq!(b.authenticate(&nt), Some(Identity::Node("n1".into())));
        assert_eq!(a.authenticate(&nt.replace("n1", "n2")), None);
        assert_eq!(a.authenticate("garbage"), None);
        let path = a
            .write_kubeconfigs(dir.path(), "https://127.0.0.1:1")
            .expect("kubeconfig");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn serving_certificate_follows_its_names_and_keyless_dirs_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let read = |p: &str| std::fs::read(dir.path().join(p)).expect("read");
        let a = Pki::load_or_create(dir.path(), &[]).expect("create");
        let (ca, crt) = (read("pki/ca.crt"), read("pki/server.crt"));
        Pki::load_or_create(dir.path(), &[]).expect("reload");
        assert_eq!(read("pki/server.crt"), crt, "same names: same certificate");
        let b = Pki::load_or_create(dir.path(), &["10.1.2.3".into()]).expect("new name");
        assert_ne!(
            read("pki/server.crt"),
            crt,
            "a new name re-issues the certificate"
        );
        assert_eq!(read("pki/ca.crt"), ca, "from the same CA");
        assert_eq!(a.server_token().expect("a"), b.server_token().expect("b"));
        assert!(b.server_config().is_ok());
        // A data dir from before the CA key was kept: loads as it is, cannot admit servers.
        std::fs::remove_file(dir.path().join("pki/ca.key")).expect("rm");
        let c = Pki::load_or_create(dir.path(), &["10.9.9.9".into()]).expect("keyless");
        assert_eq!(read("pki/ca.crt"), ca);
        assert!(c.join_bundle().is_none());
        assert!(b.join_bundle().is_some());
    }
}
