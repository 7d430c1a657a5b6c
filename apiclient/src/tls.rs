//! TLS client configurations for peers that are not checked against a CA: a node agent's
//! self-signed serving certificate, pinned by its SHA-256 (the API server calling the agent),
//! and any certificate at all (HTTPS probes, which the kubelet does not verify either; and the
//! first handshake of a joining server, which records the chain to check it against its token).
//! Handshake signatures are verified in every case.
use std::sync::{Arc, Mutex};

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
    config(check, None)
}

/// The certificate chains a [`capturing_client_config`] was shown, in handshake order.
pub type CapturedChain = Arc<Mutex<Vec<CertificateDer<'static>>>>;

/// A client configuration that accepts any certificate and records every chain it is shown,
/// for a caller that checks the chain itself before sending anything over the connection.
pub fn capturing_client_config() -> Result<(rustls::ClientConfig, CapturedChain), rustls::Error> {
    let chain = CapturedChain::default();
    Ok((config(ServerCheck::Any, Some(chain.clone()))?, chain))
}

fn config(
    check: ServerCheck,
    capture: Option<CapturedChain>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Verifier {
        check,
        capture,
        provider: provider.clone(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

#[derive(Debug)]
struct Verifier {
    check: ServerCheck,
    capture: Option<CapturedChain>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(capture) = &self.capture {
            let mut chain = capture.lock().unwrap_or_else(|p| p.into_inner());
            chain.push(end_entity.clone().into_owned());
            chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        }
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
