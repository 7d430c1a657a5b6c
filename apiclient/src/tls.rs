//! TLS client configurations for peers that are not checked against a CA: a node agent's
//! self-signed serving certificate, pinned by its SHA-256 (the API server calling the agent),
//! and any certificate at all (HTTPS probes, which the kubelet does not verify either).
//! Handshake signatures are verified in both cases.
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCheck {
    /// Exactly the certificate whose DER has this SHA-256.
    Pinned(Vec<u8>),
    /// Any certificate.
    Any,
}

/// A client configuration (ring provider, safe protocol versions, no client certificate)
/// checking the server with `check`.
pub fn client_config(check: ServerCheck) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier { check, provider }))
            .with_no_client_auth(),
    )
}

#[derive(Debug)]
struct Verifier {
    check: ServerCheck,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ServerCheck::Pinned(pin) = &self.check else {
            return Ok(ServerCertVerified::assertion());
        };
        use sha2::Digest as _;
        let got = sha2::Sha256::digest(end_entity.as_ref());
        // Constant time, though the pin is no secret.
        let same = got.len() == pin.len()
            && got.iter().zip(pin).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        if same {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the node's serving certificate does not match the one it published".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
