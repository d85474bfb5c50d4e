//! TLS on the API port, as real k3s/k0s serve it — with the STAND-IN's own
//! fixed test certificate (`tls/cert.der`, `tls/key.der`: a self-signed
//! P-256 certificate made for these tests; the key is public, never use it
//! outside them).
//!
//! Server: a connection whose first byte is a TLS handshake record (0x16)
//! gets TLS, anything else plain HTTP (init's readiness check and the host
//! tests speak plain HTTP to 127.0.0.1).
//! Client (`https://` URLs): like a k3s agent, it trusts the server
//! certificate whose sha256 the join token names (`K10<sha256>::server:...`),
//! and without such a token (a bare secret) any certificate — real k3s
//! agents given a bare token do not verify the CA either.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

pub const CERT_DER: &[u8] = include_bytes!("../tls/cert.der");
const KEY_DER: &[u8] = include_bytes!("../tls/key.der");

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// sha256 of a certificate, lower-case hex (the "CA hash" of a k3s token).
pub fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The hash the stand-in's server puts into its node-token.
pub fn cert_hash() -> String {
    sha256_hex(CERT_DER)
}

pub fn server_config() -> Result<Arc<ServerConfig>, rustls::Error> {
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(CERT_DER.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(KEY_DER.to_vec())),
        )?;
    Ok(Arc::new(cfg))
}

/// The certificate hash a k3s token pins, if it is `K10<64 hex>::...`.
pub fn pinned_hash(token: &str) -> Option<String> {
    let rest = token.trim().strip_prefix("K10")?;
    let (hash, _) = rest.split_once("::")?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hash.to_ascii_lowercase())
}

#[derive(Debug)]
struct Pin {
    want: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.want {
            Some(h) if *h != sha256_hex(end_entity.as_ref()) => {
                Err(rustls::Error::General(format!(
                    "server certificate sha256 {} is not the {h} the join token names",
                    sha256_hex(end_entity.as_ref())
                )))
            }
            _ => Ok(ServerCertVerified::assertion()),
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

/// A client that trusts the certificate with sha256 `pin`, or any when `None`.
pub fn client_config(pin: Option<String>) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = provider();
    let cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pin {
            want: pin,
            provider,
        }))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_from_tokens() {
        let h = cert_hash();
        assert_eq!(h.len(), 64);
        assert_eq!(pinned_hash(&format!("K10{h}::server:abc")), Some(h.clone()));
        assert_eq!(pinned_hash("abc"), None);
        assert_eq!(pinned_hash("K10standin::server:abc"), None);
        assert!(server_config().is_ok());
        assert!(client_config(Some(h)).is_ok());
    }
}
