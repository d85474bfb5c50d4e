//! Repositories and the package cache (REFERENCE.md §5.6).
//!
//! A repository is a local directory or an http(s) base URL
//! (`<mirror>/<branch>/<repo>`), laid out as `<base>/<arch>/APKINDEX.tar.gz` and
//! `<base>/<arch>/<name>-<version>.apk`. Network access goes through the small
//! [`Transport`] trait ([`HttpTransport`] = ureq), so tests run on local
//! directories and fakes. Downloaded packages land in a content-addressed cache
//! keyed by their identity checksum (`C:Q1…`), and are verified on every use:
//! a cache hit is never trusted blindly.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::index::{Index, IndexError, PackageInfo, Trust};
use super::keys::KeyRing;
use super::package::{ApkFile, PackageError};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing cache file {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error("{path}: {source}")]
    Verify { path: PathBuf, source: PackageError },
    #[error(
        "package {package}: the index has no identity checksum, so it cannot be cached by content"
    )]
    NoChecksum { package: String },
    #[error("no cache directory: set XDG_CACHE_HOME or HOME")]
    NoCacheDir,
}

/// Largest download accepted (an index, or one package).
pub const MAX_DOWNLOAD: u64 = 1 << 30;

/// How bytes are fetched from a URL. Implemented by [`HttpTransport`]; tests use fakes.
pub trait Transport: Sync {
    fn get(&self, url: &str) -> Result<Vec<u8>, String>;
}

/// HTTP(S) via ureq (rustls, webpki roots).
#[derive(Debug, Clone)]
pub struct HttpTransport {
    agent: ureq::Agent,
}

impl Default for HttpTransport {
    fn default() -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(600)))
            .timeout_connect(Some(Duration::from_secs(30)))
            .user_agent(concat!("basalt/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        HttpTransport { agent }
    }
}

impl Transport for HttpTransport {
    fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut resp = self.agent.get(url).call().map_err(|e| e.to_string())?;
        resp.body_mut()
            .with_config()
            .limit(MAX_DOWNLOAD)
            .read_to_vec()
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir(PathBuf),
    Url(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    pub source: Source,
    /// `@tag`: packages from here only for dependencies pinned with it.
    pub tag: Option<String>,
    pub trust: Trust,
}

impl Repository {
    /// `http(s)://…` is a URL, anything else a local directory. An optional
    /// leading `@tag ` pins it, as in `/etc/apk/repositories`.
    pub fn parse(spec: &str) -> Repository {
        let spec = spec.trim();
        let (tag, loc) = match spec
            .strip_prefix('@')
            .and_then(|r| r.split_once(char::is_whitespace))
        {
            Some((t, l)) => (Some(t.to_string()), l.trim()),
            None => (None, spec),
        };
        let source = if loc.starts_with("http://") || loc.starts_with("https://") {
            Source::Url(loc.trim_end_matches('/').to_string())
        } else {
            Source::Dir(PathBuf::from(loc))
        };
        Repository {
            source,
            tag,
            trust: Trust::Signed,
        }
    }

    pub fn trusted_unsigned(mut self) -> Repository {
        self.trust = Trust::TrustedUnsigned;
        self
    }

    /// Where `<arch>/<file>` lives, for messages.
    pub fn location(&self, arch: &str, file: &str) -> String {
        match &self.source {
            Source::Dir(d) => d.join(arch).join(file).display().to_string(),
            Source::Url(u) => format!("{u}/{arch}/{file}"),
        }
    }

    fn get(&self, arch: &str, file: &str, t: &dyn Transport) -> Result<Vec<u8>, RepoError> {
        match &self.source {
            Source::Dir(d) => {
                let path = d.join(arch).join(file);
                std::fs::read(&path).map_err(|source| RepoError::Read { path, source })
            }
            Source::Url(_) => {
                let url = self.location(arch, file);
                t.get(&url)
                    .map_err(|reason| RepoError::Fetch { url, reason })
            }
        }
    }

    /// Fetch and verify `APKINDEX.tar.gz` for `arch`.
    pub fn fetch_index(
        &self,
        arch: &str,
        keys: &KeyRing,
        t: &dyn Transport,
    ) -> Result<Index, RepoError> {
        let bytes = self.get(arch, "APKINDEX.tar.gz", t)?;
        let what = self.location(arch, "APKINDEX.tar.gz");
        Ok(Index::from_tar_gz(&bytes, keys, self.trust, &what)?)
    }

    /// Make `info`'s package available and verified: from a local repository in
    /// place, from a URL through the cache. Returns the path of the verified file.
    pub fn fetch_package(
        &self,
        arch: &str,
        info: &PackageInfo,
        keys: &KeyRing,
        cache: &Cache,
        t: &dyn Transport,
    ) -> Result<PathBuf, RepoError> {
        let file = info.file_name();
        let path = match &self.source {
            Source::Dir(d) => d.join(arch).join(&file),
            Source::Url(_) => {
                let sum = info
                    .checksum
                    .as_ref()
                    .ok_or_else(|| RepoError::NoChecksum { package: info.id() })?;
                let cached = cache.package_path(&sum.hex());
                if cached.exists() {
                    match load_verified(&cached, info, keys, self.trust) {
                        Ok(_) => return Ok(cached),
                        // A corrupt cache entry is replaced, not trusted.
                        Err(_) => {
                            let _ = std::fs::remove_file(&cached);
                        }
                    }
                }
                let bytes = self.get(arch, &file, t)?;
                let url = self.location(arch, &file);
                let verr = |source| RepoError::Verify {
                    path: PathBuf::from(&url),
                    source,
                };
                ApkFile::parse(&bytes, &info.id())
                    .map_err(verr)?
                    .verify(info, keys, self.trust)
                    .map_err(verr)?;
                cache.store(&cached, &bytes)?;
                return Ok(cached);
            }
        };
        load_verified(&path, info, keys, self.trust)?;
        Ok(path)
    }
}

/// Read, parse and verify a package file against its index record.
pub fn load_verified(
    path: &Path,
    info: &PackageInfo,
    keys: &KeyRing,
    trust: Trust,
) -> Result<ApkFile, RepoError> {
    let bytes = std::fs::read(path).map_err(|source| RepoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let verr = |source| RepoError::Verify {
        path: path.to_path_buf(),
        source,
    };
    let apk = ApkFile::parse(&bytes, &info.id()).map_err(verr)?;
    apk.verify(info, keys, trust).map_err(verr)?;
    Ok(apk)
}

/// Content-addressed package cache: `<root>/apk/<sha1 of control member>.apk`.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// `$XDG_CACHE_HOME/basalt`, else `$HOME/.cache/basalt`.
    pub fn default_location() -> Result<Cache, RepoError> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .ok_or(RepoError::NoCacheDir)?;
        Ok(Cache::new(base.join("basalt")))
    }

    pub fn package_path(&self, hex: &str) -> PathBuf {
        self.root.join("apk").join(format!("{hex}.apk"))
    }

    /// Write-new-then-rename, so a crash never leaves a truncated cache entry
    /// under its final name.
    fn store(&self, path: &Path, bytes: &[u8]) -> Result<(), RepoError> {
        let cerr = |source| RepoError::Cache {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(cerr)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(cerr)?;
        std::fs::rename(&tmp, path).map_err(cerr)
    }
}

/// One package to fetch.
#[derive(Debug, Clone, Copy)]
pub struct FetchJob<'a> {
    pub repo: &'a Repository,
    pub info: &'a PackageInfo,
}

/// Fetch and verify `jobs` with `threads` workers; `progress(done, total)` is
/// called after each package. Paths come back in job order; the first failure
/// (in job order) is returned.
pub fn fetch_all(
    jobs: &[FetchJob<'_>],
    arch: &str,
    keys: &KeyRing,
    cache: &Cache,
    t: &dyn Transport,
    threads: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<PathBuf>, RepoError> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<PathBuf, RepoError>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, 16) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    let r = job.repo.fetch_package(arch, job.info, keys, cache, t);
                    if let Ok(mut res) = results.lock() {
                        res[i] = Some(r);
                    }
                    progress(done.fetch_add(1, Ordering::SeqCst) + 1, jobs.len());
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    let mut out = Vec::with_capacity(jobs.len());
    for (r, job) in results.into_iter().zip(jobs) {
        match r {
            Some(r) => out.push(r?),
            None => {
                return Err(RepoError::Fetch {
                    url: job.repo.location(arch, &job.info.file_name()),
                    reason: "worker did not finish".to_string(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fake {
        files: HashMap<String, Vec<u8>>,
        hits: Mutex<Vec<String>>,
    }

    impl Transport for Fake {
        fn get(&self, url: &str) -> Result<Vec<u8>, String> {
            self.hits.lock().unwrap().push(url.to_string());
            self.files
                .get(url)
                .cloned()
                .ok_or_else(|| "404".to_string())
        }
    }

    #[test]
    fn parse_specs() {
        let r = Repository::parse("@edge https://dl-cdn.alpinelinux.org/alpine/edge/main/");
        assert_eq!(r.tag.as_deref(), Some("edge"));
        assert_eq!(
            r.location("x86_64", "APKINDEX.tar.gz"),
            "https://dl-cdn.alpinelinux.org/alpine/edge/main/x86_64/APKINDEX.tar.gz"
        );
        let r = Repository::parse("/srv/repo");
        assert_eq!(r.source, Source::Dir("/srv/repo".into()));
        assert_eq!(r.trust, Trust::Signed);
    }

    #[test]
    fn url_index_through_transport() {
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/alpine/v3.17-main-aarch64-APKINDEX.tar.gz"),
        )
        .unwrap();
        let url = "https://mirror.invalid/alpine/v3.17/main/aarch64/APKINDEX.tar.gz";
        let fake = Fake {
            files: HashMap::from([(url.to_string(), bytes)]),
            hits: Mutex::new(Vec::new()),
        };
        let repo = Repository::parse("https://mirror.invalid/alpine/v3.17/main");
        let idx = repo
            .fetch_index("aarch64", &KeyRing::alpine().unwrap(), &fake)
            .unwrap();
        assert_eq!(idx.packages.len(), 5004);
        let err = repo
            .fetch_index("x86_64", &KeyRing::alpine().unwrap(), &fake)
            .unwrap_err();
        assert!(
            err.to_string().contains("x86_64/APKINDEX.tar.gz: 404"),
            "{err}"
        );
    }

    #[test]
    fn cache_location_follows_xdg() {
        let c = Cache::new("/c");
        assert_eq!(c.package_path("ab"), PathBuf::from("/c/apk/ab.apk"));
    }
}
