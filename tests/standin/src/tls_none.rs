//! No TLS on this architecture (see src/tls.rs): the stand-in serves plain
//! HTTP on 6443 and speaks plain HTTP also to `https://` URLs; its k3s
//! node-token names no certificate (`K10standin::...`).

use std::io::{self, Read, Write};
use std::net::TcpStream;

pub use crate::token::pinned_hash;

/// TLS is not built into this stand-in.
pub const AVAILABLE: bool = false;

/// The "CA hash" of the node-token: there is no certificate.
pub fn cert_hash() -> String {
    "standin".to_string()
}

#[derive(Debug)]
pub enum TlsError {
    Io(io::Error),
    Tls(String),
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[derive(Clone)]
pub struct Server;

impl Server {
    pub fn new() -> Result<Option<Server>, String> {
        Ok(None)
    }

    pub fn serve(
        &self,
        _stream: TcpStream,
        _f: &mut dyn FnMut(&mut dyn ReadWrite) -> io::Result<()>,
    ) -> io::Result<()> {
        Err(io::Error::other("TLS is not built into this stand-in"))
    }
}

pub fn exchange(
    _stream: TcpStream,
    _host: &str,
    _request: &[u8],
    _pin: Option<String>,
) -> Result<(Vec<u8>, Option<String>), TlsError> {
    Err(TlsError::Tls("TLS is not built into this stand-in".into()))
}
