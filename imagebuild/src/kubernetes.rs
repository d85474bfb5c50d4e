//! The Kubernetes binary (k3s or k0s): the official release for the board's
//! arch, verified against the sha256 pinned in `basalt.lock` and kept in the
//! content-addressed cache (`<cache>/blobs/sha256/<hex>`). `kubernetes.source`
//! (a local file) overrides all of it and works offline.

use std::path::{Path, PathBuf};

use basalt_rootfs::apk::Cache;
use basalt_rootfs::apk::repo::Transport;
use sha2::{Digest, Sha256};

use crate::imagedef::Distribution;

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("{distribution} publishes no release binary for the {arch} architecture")]
    NoArch {
        distribution: &'static str,
        arch: String,
    },
    #[error(
        "cannot download {what} from {url}: {reason}. To build offline, download it elsewhere and set kubernetes.source = \"<path>\" in the image definition, or put it in the cache as {cache_hint}"
    )]
    Download {
        what: String,
        url: String,
        reason: String,
        cache_hint: String,
    },
    #[error("{what} from {url} has sha256 {got}, but basalt.lock pins {want}")]
    Mismatch {
        what: String,
        url: String,
        got: String,
        want: String,
    },
    #[error("cache file {path}: {err}")]
    Cache { path: PathBuf, err: std::io::Error },
}

/// The release URL of `distribution` `version` for apk arch `alpine_arch`.
pub fn release_url(
    distribution: Distribution,
    version: &str,
    alpine_arch: &str,
) -> Result<String, KubernetesError> {
    let no = || KubernetesError::NoArch {
        distribution: distribution.name(),
        arch: alpine_arch.to_string(),
    };
    Ok(match distribution {
        Distribution::K3s => {
            let file = match alpine_arch {
                "x86_64" => "k3s",
                "aarch64" => "k3s-arm64",
                "armv7" | "armhf" => "k3s-armhf",
                _ => return Err(no()),
            };
            format!("https://github.com/k3s-io/k3s/releases/download/{version}/{file}")
        }
        Distribution::K0s => {
            let a = match alpine_arch {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                "armv7" | "armhf" => "arm",
                _ => return Err(no()),
            };
            format!(
                "https://github.com/k0sproject/k0s/releases/download/{version}/k0s-{version}-{a}"
            )
        }
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where a blob with this sha256 lives in the cache.
pub fn blob_path(cache: &Cache, sha256: &str) -> PathBuf {
    cache.root.join("blobs").join("sha256").join(sha256)
}

fn cached(path: &Path, sha256: &str) -> bool {
    std::fs::read(path).is_ok_and(|b| sha256_hex(&b) == sha256)
}

/// The file for `url`: from the cache when `sha256` is known and cached
/// (no network), else downloaded, hashed, checked against `sha256` when given,
/// and stored. Returns the cache path and the sha256.
pub fn fetch(
    what: &str,
    url: &str,
    sha256: Option<&str>,
    cache: &Cache,
    t: &dyn Transport,
) -> Result<(PathBuf, String), KubernetesError> {
    if let Some(want) = sha256 {
        let p = blob_path(cache, want);
        if cached(&p, want) {
            return Ok((p, want.to_string()));
        }
    }
    let bytes = t.get(url).map_err(|reason| KubernetesError::Download {
        what: what.to_string(),
        url: url.to_string(),
        reason,
        cache_hint: blob_path(cache, sha256.unwrap_or("<sha256>"))
            .display()
            .to_string(),
    })?;
    let got = sha256_hex(&bytes);
    if let Some(want) = sha256
        && want != got
    {
        return Err(KubernetesError::Mismatch {
            what: what.to_string(),
            url: url.to_string(),
            got,
            want: want.to_string(),
        });
    }
    let p = blob_path(cache, &got);
    let cerr = |err| KubernetesError::Cache {
        path: p.clone(),
        err,
    };
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(cerr)?;
    }
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes).map_err(cerr)?;
    std::fs::rename(&tmp, &p).map_err(cerr)?;
    Ok((p, got))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn official_urls() {
        let v = "v1.31.4+k3s1";
        assert_eq!(
            release_url(Distribution::K3s, v, "x86_64").unwrap(),
            "https://github.com/k3s-io/k3s/releases/download/v1.31.4+k3s1/k3s"
        );
        assert!(
            release_url(Distribution::K3s, v, "aarch64")
                .unwrap()
                .ends_with("/k3s-arm64")
        );
        assert!(
            release_url(Distribution::K3s, v, "armv7")
                .unwrap()
                .ends_with("/k3s-armhf")
        );
        assert_eq!(
            release_url(Distribution::K0s, "v1.31.3+k0s.0", "aarch64").unwrap(),
            "https://github.com/k0sproject/k0s/releases/download/v1.31.3+k0s.0/k0s-v1.31.3+k0s.0-arm64"
        );
        assert!(
            release_url(Distribution::K0s, "v1", "armhf")
                .unwrap()
                .ends_with("k0s-v1-arm")
        );
        assert!(release_url(Distribution::K3s, v, "s390x").is_err());
    }

    struct Fake {
        body: Option<Vec<u8>>,
        calls: AtomicUsize,
    }
    impl Transport for Fake {
        fn get(&self, _url: &str) -> Result<Vec<u8>, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.body
                .clone()
                .ok_or_else(|| "network unreachable".into())
        }
    }

    #[test]
    fn pinned_download_is_cached_then_served_offline() {
        let dir = std::env::temp_dir().join(format!("basalt-k8s-test-{}", std::process::id()));
        let cache = Cache::new(&dir);
        let t = Fake {
            body: Some(b"binary".to_vec()),
            calls: AtomicUsize::new(0),
        };
        let sha = sha256_hex(b"binary");
        let (p, got) = fetch("k3s", "https://x/k3s", Some(&sha), &cache, &t).unwrap();
        assert_eq!(got, sha);
        assert_eq!(std::fs::read(&p).unwrap(), b"binary");
        let offline = Fake {
            body: None,
            calls: AtomicUsize::new(0),
        };
        fetch("k3s", "https://x/k3s", Some(&sha), &cache, &offline).unwrap();
        assert_eq!(offline.calls.load(Ordering::SeqCst), 0);

        let e = fetch("k3s", "https://x/k3s", Some(&"0".repeat(64)), &cache, &t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("https://x/k3s") && e.contains("pins"), "{e}");
        let e = fetch(
            "k3s",
            "https://x/k3s",
            Some(&"0".repeat(64)),
            &cache,
            &offline,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("https://x/k3s") && e.contains("kubernetes.source"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
