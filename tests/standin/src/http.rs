//! Plain HTTP/1.1 on std::net, just enough for the endpoints the stand-in
//! serves and the requests its kubectl and agent make. Real k3s/k0s serve
//! HTTPS on 6443; the stand-in serves plain HTTP until the agent-join test
//! needs TLS (see docs/standin.md).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;
use thiserror::Error;

/// Largest request head the server reads.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("bad URL {url:?}: {what}")]
    Url { url: String, what: &'static str },
    #[error("resolving {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("talking to {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("malformed response from {addr}")]
    Response { addr: String },
    #[error("TLS with {addr}: {what}")]
    Tls { addr: String, what: String },
}

/// `http(s)://host[:port][/path]` split into parts. `https` is accepted and
/// spoken as plain HTTP (the stand-in has no TLS yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
    /// `https://`: TLS (src/tls.rs).
    pub tls: bool,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, HttpError> {
        let bad = |what| HttpError::Url {
            url: url.to_string(),
            what,
        };
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| bad("expected http:// or https://"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| bad("unterminated ["))?;
            (h, p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => 6443,
        };
        Ok(Url {
            host: host.to_string(),
            port,
            path: path.to_string(),
            tls: url.starts_with("https://"),
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A response as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// sha256 of the server's certificate, over TLS.
    pub server_cert: Option<String>,
}

/// `GET` `path` from `base` (whose own path is ignored), with optional bearer token.
pub fn get(
    base: &Url,
    path: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let addr = base.addr();
    let sock = addr
        .to_socket_addrs()
        .map_err(|source| HttpError::Resolve {
            addr: addr.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| HttpError::Resolve {
            addr: addr.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address"),
        })?;
    let mut stream =
        TcpStream::connect_timeout(&sock, timeout).map_err(|source| HttpError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let io_err = |source| HttpError::Io {
        addr: addr.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: k8s-standin\r\n{auth}Connection: close\r\n\r\n"
    );
    let mut raw = Vec::new();
    let mut server_cert = None;
    if base.tls && crate::tls::AVAILABLE {
        // A k3s token `K10<sha256>::...` pins the server's certificate.
        let pin = bearer.and_then(crate::tls::pinned_hash);
        let (data, cert) = crate::tls::exchange(stream, &base.host, request.as_bytes(), pin)
            .map_err(|e| match e {
                crate::tls::TlsError::Io(source) => HttpError::Io {
                    addr: addr.clone(),
                    source,
                },
                crate::tls::TlsError::Tls(what) => HttpError::Tls {
                    addr: addr.clone(),
                    what,
                },
            })?;
        raw = data;
        server_cert = cert;
    } else {
        stream.write_all(request.as_bytes()).map_err(io_err)?;
        stream.read_to_end(&mut raw).map_err(io_err)?;
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| HttpError::Response { addr: addr.clone() })?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Response { addr: addr.clone() })?;
    Ok(Response {
        status,
        body: body.to_string(),
        server_cert,
    })
}

/// A request as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The bearer token from `Authorization: Bearer`, if any.
    pub bearer: Option<String>,
}

/// Serves `listener` forever, one thread per connection, answering with `handler`.
pub fn serve<H>(listener: TcpListener, handler: H) -> io::Error
where
    H: Fn(&Request) -> (u16, String, &'static str) + Send + Sync + 'static,
{
    let handler = std::sync::Arc::new(handler);
    let tls = match crate::tls::Server::new() {
        Ok(t) => t,
        Err(e) => {
            println!("k8s-standin: error TLS setup: {e} (plain HTTP only)");
            None
        }
    };
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return e,
        };
        let handler = handler.clone();
        let tls = tls.clone();
        std::thread::spawn(move || {
            let _ = handle(stream, tls, &*handler);
        });
    }
}

/// One connection: TLS when it starts with a handshake record, else plain.
fn handle<H>(stream: TcpStream, tls: Option<crate::tls::Server>, handler: &H) -> io::Result<()>
where
    H: Fn(&Request) -> (u16, String, &'static str),
{
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut first = [0u8; 1];
    let handshake = matches!(stream.peek(&mut first), Ok(1)) && first[0] == 0x16;
    match tls.filter(|_| handshake) {
        Some(t) => t.serve(stream, &mut |s| exchange(s, handler)),
        None => {
            let mut s = stream;
            exchange(&mut s, handler)
        }
    }
}

/// Read one request head from `stream`, answer it.
fn exchange<S, H>(stream: &mut S, handler: &H) -> io::Result<()>
where
    S: Read + Write + ?Sized,
    H: Fn(&Request) -> (u16, String, &'static str),
{
    let mut reader = BufReader::new(&mut *stream).take(MAX_HEAD as u64);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut bearer = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("authorization")
            && let Some(t) = v.trim().strip_prefix("Bearer ")
        {
            bearer = Some(t.trim().to_string());
        }
    }
    drop(reader);
    let req = Request {
        method,
        path,
        bearer,
    };
    let (status, body, content_type) = if req.method.is_empty() || req.path.is_empty() {
        (400, "bad request\n".to_string(), "text/plain")
    } else {
        handler(&req)
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Unknown",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = Url::parse("https://10.0.2.15:6443").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("10.0.2.15", 6443, "/")
        );
        let u = Url::parse("http://server/readyz").unwrap();
        assert_eq!((u.port, u.path.as_str()), (6443, "/readyz"));
        let u = Url::parse("http://[::1]:7000/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7000));
        assert!(Url::parse("ftp://x").is_err());
        assert!(Url::parse("http://:80").is_err());
        assert!(Url::parse("http://x:port").is_err());
    }

    #[test]
    fn round_trip() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            serve(listener, |r: &Request| {
                (
                    200,
                    format!("{} {} {:?}", r.method, r.path, r.bearer),
                    "text/plain",
                )
            })
        });
        let base = Url::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let r = get(&base, "/x?y", Some("tok"), Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "GET /x?y Some(\"tok\")");
        assert_eq!(r.server_cert, None);

        if !crate::tls::AVAILABLE {
            return;
        }
        // The same port over TLS; a token naming the certificate's hash pins it.
        let tls = Url::parse(&format!("https://127.0.0.1:{port}")).unwrap();
        let r = get(&tls, "/y", Some("abc"), Duration::from_secs(5)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "GET /y Some(\"abc\")"));
        assert_eq!(
            r.server_cert.as_deref(),
            Some(crate::tls::cert_hash().as_str())
        );
        let pinned = format!("K10{}::server:abc", crate::tls::cert_hash());
        assert_eq!(
            get(&tls, "/z", Some(&pinned), Duration::from_secs(5))
                .unwrap()
                .status,
            200
        );
        let wrong = format!("K10{}::server:abc", "0".repeat(64));
        assert!(matches!(
            get(&tls, "/z", Some(&wrong), Duration::from_secs(5)),
            Err(HttpError::Io { .. } | HttpError::Tls { .. })
        ));
    }
}
