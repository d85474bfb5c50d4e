//! The apply steps' seam to the kernel: one trait, the real implementation
//! (`KernelSystem`), and in tests a recorder. Files are not behind it: the
//! steps write them under a [`super::Root`], which tests point at a temp dir.

use std::net::IpAddr;
use std::path::Path;

use crate::modules::{KernelModules, LoadError, ModuleLoader};
use crate::sys::Errno;

pub trait System {
    fn set_hostname(&mut self, name: &str) -> Result<(), Errno>;
    fn link_up(&mut self, name: &str) -> Result<(), Errno>;
    fn add_address(&mut self, link: &str, addr: IpAddr, prefix: u8) -> Result<(), Errno>;
    /// `dst` `None` is the default route; `via` `None` is on-link.
    fn add_route(
        &mut self,
        link: &str,
        dst: Option<(IpAddr, u8)>,
        via: Option<IpAddr>,
    ) -> Result<(), Errno>;
    fn load_module(&mut self, path: &Path) -> Result<(), LoadError>;
    /// Seconds since the epoch on the realtime clock.
    fn now(&self) -> i64;
    fn set_clock(&mut self, secs: i64) -> Result<(), Errno>;
    fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> std::io::Result<()>;
    /// The running kernel's release (`uname -r`).
    fn kernel_release(&self) -> String;
}

/// The running kernel.
#[derive(Debug, Default)]
pub struct KernelSystem;

impl System for KernelSystem {
    fn set_hostname(&mut self, name: &str) -> Result<(), Errno> {
        crate::sys::sethostname(name)
    }

    fn link_up(&mut self, name: &str) -> Result<(), Errno> {
        crate::sys::interface_up(name)
    }

    fn add_address(&mut self, link: &str, addr: IpAddr, prefix: u8) -> Result<(), Errno> {
        crate::sys::netlink::add_address(link, addr, prefix)
    }

    fn add_route(
        &mut self,
        link: &str,
        dst: Option<(IpAddr, u8)>,
        via: Option<IpAddr>,
    ) -> Result<(), Errno> {
        crate::sys::netlink::add_route(link, dst, via)
    }

    fn load_module(&mut self, path: &Path) -> Result<(), LoadError> {
        KernelModules.load(path)
    }

    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    fn set_clock(&mut self, secs: i64) -> Result<(), Errno> {
        // time_t is 32 bits on some 32-bit targets (armv7 musl in Rust's libc):
        // a time it cannot hold is refused, never wrapped.
        #[allow(clippy::useless_conversion)] // i64 → time_t is a no-op on 64-bit targets
        let secs = secs.try_into().map_err(|_| Errno::EOVERFLOW)?;
        let ts = nix::sys::time::TimeSpec::new(secs, 0);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
    }

    fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    fn kernel_release(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }
}

#[cfg(test)]
pub mod fake {
    //! A `System` that records every call and can be told to fail.
    use super::*;

    #[derive(Debug, Default)]
    pub struct Recorder {
        pub calls: Vec<String>,
        pub clock: i64,
        pub release: String,
        pub fail: Vec<String>,
    }

    impl Recorder {
        fn rec(&mut self, call: String) -> Result<(), Errno> {
            let failing = self.fail.iter().any(|f| call.starts_with(f.as_str()));
            self.calls.push(call);
            if failing { Err(Errno::EIO) } else { Ok(()) }
        }
    }

    impl System for Recorder {
        fn set_hostname(&mut self, name: &str) -> Result<(), Errno> {
            self.rec(format!("hostname {name}"))
        }
        fn link_up(&mut self, name: &str) -> Result<(), Errno> {
            self.rec(format!("up {name}"))
        }
        fn add_address(&mut self, link: &str, addr: IpAddr, prefix: u8) -> Result<(), Errno> {
            self.rec(format!("addr {link} {addr}/{prefix}"))
        }
        fn add_route(
            &mut self,
            link: &str,
            dst: Option<(IpAddr, u8)>,
            via: Option<IpAddr>,
        ) -> Result<(), Errno> {
            let d = dst.map_or("default".to_string(), |(a, p)| format!("{a}/{p}"));
            let v = via.map_or("link".to_string(), |v| v.to_string());
            self.rec(format!("route {link} {d} via {v}"))
        }
        fn load_module(&mut self, path: &Path) -> Result<(), LoadError> {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            self.rec(format!("module {name}"))
                .map_err(|e| LoadError::Kernel(path.to_path_buf(), e))
        }
        fn now(&self) -> i64 {
            self.clock
        }
        fn set_clock(&mut self, secs: i64) -> Result<(), Errno> {
            self.clock = secs;
            self.rec(format!("clock {secs}"))
        }
        fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
            // Really chown when we can (tests run as root here), so modes and
            // owners are checked on disk; record either way.
            let _ = std::os::unix::fs::lchown(path, Some(uid), Some(gid));
            let _ = self.rec(format!("chown {} {uid}:{gid}", path.display()));
            Ok(())
        }
        fn kernel_release(&self) -> String {
            self.release.clone()
        }
    }
}
