//! The node join token: what `flotilla server` writes to `DATA_DIR/node-token` and
//! `flotilla agent --token-file` reads.
//!
//! File format (one file to copy to a new node):
//!
//! ```text
//! flotilla-node-token:v1 <node secret>
//! -----BEGIN CERTIFICATE-----
//! <the cluster CA>
//! -----END CERTIFICATE-----
//! ```
//!
//! An agent derives its own bearer token `node.<name>.<mac>` from the secret, the same derivation
//! the API server uses to authenticate node tokens (`sha256(secret ‖ 0 ‖ name)`, first 20 bytes,
//! hex), so joining needs no extra round trip and each node only gets its own node's rights. A
//! file holding a ready token (`node.<name>.<mac>`) on its first line is accepted too.
use sha2::Digest as _;

/// First word of a join token file.
pub const JOIN_TOKEN_HEADER: &str = "flotilla-node-token:v1";

/// A parsed join token.
#[derive(Clone)]
pub struct JoinToken {
    secret: Option<String>,
    ready_token: Option<String>,
    /// PEM of the cluster CA, if the file carries it.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken").finish_non_exhaustive()
    }
}

impl JoinToken {
    /// Parses the file's contents; `None` if the first line is neither a join secret nor a node
    /// token.
    pub fn parse(text: &str) -> Option<JoinToken> {
        let mut lines = text.lines();
        let first = lines.next()?.trim();
        let ca = text
            .find("-----BEGIN CERTIFICATE-----")
            .map(|i| text[i..].to_string());
        if let Some(secret) = first.strip_prefix(JOIN_TOKEN_HEADER) {
            let secret = secret.trim();
            if secret.is_empty() {
                return None;
            }
            return Some(JoinToken {
                secret: Some(secret.to_string()),
                ready_token: None,
                ca_pem: ca,
            });
        }
        if first.starts_with("node.") {
            return Some(JoinToken {
                secret: None,
                ready_token: Some(first.to_string()),
                ca_pem: ca,
            });
        }
        None
    }

    /// Renders the file for `secret` and `ca_pem`.
    pub fn render(secret: &str, ca_pem: &str) -> String {
        format!("{JOIN_TOKEN_HEADER} {secret}\n{ca_pem}")
    }

    /// The bearer token of node `name`.
    pub fn node_token(&self, name: &str) -> String {
        match (&self.ready_token, &self.secret) {
            (Some(t), _) => t.clone(),
            (None, Some(secret)) => derive_node_token(secret, name),
            (None, None) => String::new(),
        }
    }
}

/// `node.<name>.<hex(sha256(secret ‖ 0 ‖ name)[..20])>`.
pub fn derive_node_token(secret: &str, name: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(secret.as_bytes());
    h.update([0u8]);
    h.update(name.as_bytes());
    format!("node.{name}.{}", hex::encode(&h.finalize()[..20]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rendered_token_and_derives_per_node() {
        let text = JoinToken::render(
            "s3cret",
            "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n",
        );
        let t = JoinToken::parse(&text).expect("parses");
        assert!(t.ca_pem.as_deref().is_some_and(|c| c.contains("AAA")));
        let a = t.node_token("a");
        assert!(a.starts_with("node.a."));
        assert_ne!(a, t.node_token("b"));
        assert_eq!(a, derive_node_token("s3cret", "a"));
        assert!(JoinToken::parse("garbage").is_none());
        let ready = JoinToken::parse("node.x.abc\n").expect("ready token");
        assert_eq!(ready.node_token("ignored"), "node.x.abc");
    }
}
