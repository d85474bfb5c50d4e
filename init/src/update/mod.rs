//! A/B updates on the device (docs/updates.md): install a signed bundle
//! into the inactive slot, boot it once as a trial, run the health gate,
//! commit or roll back.
//!
//! PID 1 only runs `after_services` (small file work at boot: reading
//! slots.toml and the loader entries, adding the gate service on a trial
//! boot) right after it started the services (Kubernetes first), under the
//! update lock it took before starting them.
//! Installing (`basaltctl update`), the gate (`basaltctl gate`) and
//! `basaltctl rollback` run in ordinary processes: PID 1 carries no TLS,
//! streams no bundles and waits on nothing.

pub mod boottar;
pub mod cli;
pub mod device;
pub mod entry;
pub mod gate;
pub mod install;
pub mod state;
pub mod version;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bundle::BundleError;
use crate::service::{Backoff, Restart, ServiceDef};

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("bundle refused: {0}")]
    Rejected(String),
    #[error(transparent)]
    BootPayload(boottar::BootTarError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("slot partition: {0}")]
    Partition(String),
    #[error("another update is running (lock {0})")]
    Locked(PathBuf),
    #[error("fetching {url}: {message}")]
    Fetch { url: String, message: String },
}

/// Name of the health gate's service on a trial boot.
pub const GATE_SERVICE: &str = "update-health-gate";

/// The service that runs the health gate (`basaltctl gate`) on a trial boot.
pub fn gate_service() -> ServiceDef {
    ServiceDef {
        name: GATE_SERVICE.to_string(),
        exec: vec!["/usr/bin/basaltctl".into(), "gate".into()],
        env: Default::default(),
        after: Vec::new(),
        // A crashed gate runs again; its deadline counts from boot, so it does not move.
        restart: Restart::OnFailure,
        stop_timeout: Duration::from_secs(5),
        ready: None,
        backoff: Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(60),
        },
    }
}

/// The update lock, held by an open file (`flock`, not inherited by
/// children: the file is close-on-exec).
pub type UpdateLock = nix::fcntl::Flock<std::fs::File>;

/// PID 1, before it starts the services: take the update lock, so that no
/// `basaltctl update` a service starts can run before the boot's
/// bookkeeping ([`after_services`], which releases it).
pub fn lock_for_boot() -> Result<UpdateLock, UpdateError> {
    // The path alone: building the whole `Device` is code PID 1 would
    // otherwise run (and QEMU translate) on the path to Kubernetes.
    cli::lock_waiting_for(Path::new(device::LOCK_PATH), 1, Duration::ZERO)
}

/// PID 1 right after the first round of service starts (stage 2's
/// after-first-start hook; none of it is on the path to Kubernetes): check
/// what the last boot left (a trial that fell back, an interrupted commit,
/// the loader entries) holding `_lock`, the update lock [`lock_for_boot`]
/// took before the services started (`None` when it could not: reported
/// then, and this goes on as it did before there was a lock). Returns the
/// health gate's service on a trial boot, for the supervisor to add.
pub fn after_services(
    booted: &str,
    running_version: &str,
    _lock: Option<UpdateLock>,
) -> Result<Option<ServiceDef>, UpdateError> {
    let Some(booted) = crate::slot::Slot::parse(booted) else {
        return Err(UpdateError::Config {
            path: PathBuf::from("/run/basalt/stage1.toml"),
            message: format!("booted slot {booted:?} is neither a nor b"),
        });
    };
    let dev = device::Device::system();
    match gate::boot_check(&dev, booted, running_version)? {
        gate::BootCheck::Trial { slot, version } => {
            crate::say!(
                "update trial boot of slot {} version {version}: health gate {:?} within {} s of boot",
                slot.name(),
                dev.config().health_gate.checks,
                dev.config().health_gate.timeout_seconds
            );
            Ok(Some(gate_service()))
        }
        gate::BootCheck::TrialFailed { slot, reason } => {
            crate::say!("update rolled back slot {}: {reason}", slot.name());
            Ok(None)
        }
        gate::BootCheck::Normal => Ok(None),
    }
}
