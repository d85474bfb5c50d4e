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
//!
//! Built on x86_64 only (src/tls_none.rs elsewhere: plain HTTP, also to
//! `https://` URLs): ring needs a C compiler for the target, and the test
//! hosts have none for aarch64/armv7 musl.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

pub use crate::token::pinned_hash;

/// TLS is built into this stand-in.
pub const AVAILABLE: bool = true;

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

#[derive(Debug)]
pub enum TlsError {
    Io(io::Error),
    Tls(String),
}

/// A stream the HTTP code reads a request from and writes the answer to.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The server side: the stand-in's certificate.
#[derive(Clone)]
pub struct Server(Arc<ServerConfig>);

impl Server {
    pub fn new() -> Result<Option<Server>, String> {
        server_config()
            .map(|c| Some(Server(c)))
            .map_err(|e| e.to_string())
    }

    /// Run `f` on the decrypted stream, then close the TLS session.
    pub fn serve(
        &self,
        stream: TcpStream,
        f: &mut dyn FnMut(&mut dyn ReadWrite) -> io::Result<()>,
    ) -> io::Result<()> {
        let conn = rustls::ServerConnection::new(self.0.clone()).map_err(io::Error::other)?;
        let mut s = rustls::StreamOwned::new(conn, stream);
        f(&mut s)?;
        s.conn.send_close_notify();
        s.flush()
    }
}

/// Send `request` over TLS on `stream` to `host`, read the whole answer.
/// Returns it and the sha256 of the server's certificate.
pub fn exchange(
    stream: TcpStream,
    host: &str,
    request: &[u8],
    pin: Option<String>,
) -> Result<(Vec<u8>, Option<String>), TlsError> {
    let tls = |e: &dyn std::fmt::Display| TlsError::Tls(e.to_string());
    let cfg = client_config(pin).map_err(|e| tls(&e))?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| tls(&e))?;
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| tls(&e))?;
    let mut s = rustls::StreamOwned::new(conn, stream);
    s.write_all(request).map_err(TlsError::Io)?;
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that closes without close_notify: keep what came.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(TlsError::Io(e)),
    }
    let cert = s
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| sha256_hex(c.as_ref()));
    Ok((raw, cert))
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
