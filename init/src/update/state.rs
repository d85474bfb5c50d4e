//! Slot state (`/var/lib/basalt/slots.toml`): per slot its version, state
//! and the reason for it; which slot is primary; the last update's result.
//! Plain data: read it, change it in memory, write it back in one step
//! (temp file, fsync, rename, fsync the directory: a power cut leaves the old
//! or the new file, never a mix).
//!
//! The file is the update agent's *intent*; the loader entries on the ESP
//! are made to match it (at install, commit, rollback, and at every boot).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::slot::Slot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Holds a committed OS that booted healthy.
    Good,
    /// Failed its trial or was rolled back from; not booted again.
    Bad,
    /// Installed; boots once through a counted entry, then the health gate decides.
    Trial,
    /// No bootable content (fresh image, or an install that did not finish).
    #[default]
    Empty,
}

impl SlotState {
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Good => "good",
            SlotState::Bad => "bad",
            SlotState::Trial => "trial",
            SlotState::Empty => "empty",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotInfo {
    pub state: SlotState,
    pub version: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LastUpdate {
    pub version: String,
    /// `installing`, `installed` (trial pending), `committed`, `rolled-back`,
    /// `failed` (install did not finish), `rejected` (nothing written).
    pub result: String,
    pub reason: String,
    pub slot: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotsState {
    pub primary: String,
    pub a: SlotInfo,
    pub b: SlotInfo,
    pub last_update: LastUpdate,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("slot state {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("slot state {path}: {message}")]
    Parse {
        path: std::path::PathBuf,
        message: String,
    },
}

impl SlotsState {
    /// What a node knows with no state file: the booted slot is good and primary.
    pub fn fresh(booted: Slot, version: &str) -> SlotsState {
        let mut s = SlotsState {
            primary: booted.name().to_string(),
            ..SlotsState::default()
        };
        *s.slot_mut(booted) = SlotInfo {
            state: SlotState::Good,
            version: version.to_string(),
            reason: String::new(),
        };
        s
    }

    pub fn slot(&self, slot: Slot) -> &SlotInfo {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    pub fn slot_mut(&mut self, slot: Slot) -> &mut SlotInfo {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }

    pub fn primary(&self) -> Option<Slot> {
        Slot::parse(&self.primary)
    }

    /// The slot in trial, if any.
    pub fn trial(&self) -> Option<Slot> {
        [Slot::A, Slot::B]
            .into_iter()
            .find(|s| self.slot(*s).state == SlotState::Trial)
    }

    /// Read the file; `Ok(None)` when it does not exist yet.
    pub fn load(path: &Path) -> Result<Option<SlotsState>, StateError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| StateError::Parse {
                    path: path.to_path_buf(),
                    message: e.message().to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The file, or `fresh` state when there is none.
    pub fn load_or_fresh(
        path: &Path,
        booted: Slot,
        version: &str,
    ) -> Result<SlotsState, StateError> {
        Ok(Self::load(path)?.unwrap_or_else(|| Self::fresh(booted, version)))
    }

    /// Write atomically (new file, fsync, rename, fsync directory).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let text = toml::to_string(self).map_err(|e| StateError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        write_atomic(path, text.as_bytes())
    }
}

/// Write `data` to `path` so a power cut leaves the old or the new content.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        // vfat may refuse fsync on a directory; the rename is then flushed by sync(2).
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fresh() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lib/basalt/slots.toml");
        assert_eq!(SlotsState::load(&p).unwrap(), None);
        let mut s = SlotsState::load_or_fresh(&p, Slot::A, "0.1.0").unwrap();
        assert_eq!(s.primary(), Some(Slot::A));
        assert_eq!(s.a.state, SlotState::Good);
        assert_eq!(s.b.state, SlotState::Empty);
        s.b.state = SlotState::Trial;
        s.b.version = "0.2.0".into();
        s.save(&p).unwrap();
        let back = SlotsState::load(&p).unwrap().unwrap();
        assert_eq!(back, s);
        assert_eq!(back.trial(), Some(Slot::B));
        assert!(
            std::fs::read_to_string(&p)
                .unwrap()
                .contains("state = \"trial\"")
        );
        std::fs::write(&p, "primary = 3").unwrap();
        assert!(SlotsState::load(&p).is_err());
    }
}
