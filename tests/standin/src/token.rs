//! Join tokens. k3s: the server writes `<data-dir>/server/node-token` as
//! `K10<ca-hash>::server:<secret>` and accepts either that or the bare secret.
//! k0s: a join token is base64 of a kubeconfig naming the server and carrying
//! the secret (real k0s also gzips it; the stand-in does not).

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The full k3s node-token for a secret: `K10` + the sha256 of the
/// stand-in's TLS certificate (src/tls.rs; k3s puts its CA's hash there) +
/// `::server:` + the secret.
pub fn k3s_node_token(secret: &str) -> String {
    format!("K10{}::server:{secret}", crate::tls::cert_hash())
}

/// The certificate hash a k3s token pins, if it is `K10<64 hex>::...`.
pub fn pinned_hash(token: &str) -> Option<String> {
    let rest = token.trim().strip_prefix("K10")?;
    let (hash, _) = rest.split_once("::")?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hash.to_ascii_lowercase())
}

/// Whether `presented` (bare secret or full node-token) matches the server's `secret`.
pub fn k3s_token_matches(presented: &str, secret: &str) -> bool {
    let presented = presented.trim();
    let bare = match presented.split_once("::server:") {
        Some((_, s)) => s,
        None => presented,
    };
    !secret.is_empty() && bare == secret
}

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64, ignoring whitespace; `None` on any other character.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        if c.is_ascii_whitespace() {
            continue;
        }
        if c == b'=' {
            break;
        }
        let v = B64.iter().position(|&x| x == c)? as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

/// A k0s join token: a kubeconfig naming the server, base64-encoded.
pub fn k0s_join_token(server_url: &str, secret: &str, role: &str) -> String {
    let kubeconfig = format!(
        "# k0s join token written by k8s-standin (STAND-IN, not gzipped)\n\
         apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: {server_url}\n  name: k0s\n\
         users:\n- name: {role}\n  user:\n    token: {secret}\n"
    );
    base64_encode(kubeconfig.as_bytes())
}

/// `(server_url, secret)` from a k0s join token (base64 kubeconfig, or the kubeconfig itself).
pub fn parse_k0s_join_token(token: &str) -> Option<(String, String)> {
    let text = match base64_decode(token).and_then(|b| String::from_utf8(b).ok()) {
        Some(t) if t.contains("server:") => t,
        _ => token.to_string(),
    };
    let field = |name: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_string())
            .next()
    };
    Some((field("server:")?, field("token:")?))
}

/// Reads 16 random bytes as hex (a fresh secret when the server was given none).
pub fn random_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&e).unwrap(), s.as_bytes(), "{s}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zm9v\nYmE=").unwrap(), b"fooba");
        assert!(base64_decode("Zm9v!").is_none());
    }

    #[test]
    fn k3s_tokens() {
        let full = k3s_node_token("abc");
        assert!(k3s_token_matches(&full, "abc"));
        assert!(k3s_token_matches("abc\n", "abc"));
        assert!(!k3s_token_matches("abd", "abc"));
        assert!(!k3s_token_matches("", ""));
    }

    #[test]
    fn k0s_tokens() {
        let t = k0s_join_token("https://10.0.0.1:6443", "s3cret", "worker");
        assert_eq!(
            parse_k0s_join_token(&t),
            Some(("https://10.0.0.1:6443".into(), "s3cret".into()))
        );
        assert_eq!(parse_k0s_join_token("garbage"), None);
    }
}
