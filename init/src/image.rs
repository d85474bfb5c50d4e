//! Image facts (`/etc/basalt/image.toml`): what the builder records about the
//! image it made, read by stage 2 to build the Kubernetes service.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::service::Distribution;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading image facts {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing image facts {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageFacts {
    pub os_version: String,
    pub board: String,
    pub kubernetes: Option<KubernetesFacts>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesFacts {
    pub distribution: Distribution,
    pub binary: String,
}

impl serde::Serialize for Distribution {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl ImageFacts {
    pub fn parse(text: &str, path: &Path) -> Result<ImageFacts, ImageError> {
        crate::tomlfast::from_str(text).map_err(|e| ImageError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    pub fn load(path: &Path) -> Result<ImageFacts, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_example() {
        let f = ImageFacts::parse(
            "os_version = \"0.1.0\"\nboard = \"x86_64\"\n[kubernetes]\ndistribution = \"k3s\"\nbinary = \"/usr/bin/k3s\"\n",
            Path::new("image.toml"),
        )
        .unwrap();
        let k = f.kubernetes.unwrap();
        assert_eq!(k.distribution, Distribution::K3s);
        assert_eq!(k.binary, "/usr/bin/k3s");
        assert!(ImageFacts::parse("os_version = \"1\"\nboard = \"x\"\n[kubernetes]\ndistribution = \"k8s\"\nbinary = \"/b\"", Path::new("i")).is_err());
        assert!(
            ImageFacts::parse("os_version = \"1\"\nboard = \"x\"", Path::new("i"))
                .unwrap()
                .kubernetes
                .is_none()
        );
    }
}
