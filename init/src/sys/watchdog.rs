//! `/dev/watchdog` (`linux/watchdog.h`): set the timeout, pet it. Closing
//! without the magic `V` leaves it armed, so a PID 1 that stops petting (or
//! a shutdown that hangs) resets the machine.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;

// WDIOC_SETTIMEOUT is `_IOWR('W', 6, int)`, WDIOC_GETTIMEOUT `_IOR('W', 7, int)`.
nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);
nix::ioctl_read!(wdioc_gettimeout, b'W', 7, libc::c_int);

#[derive(Debug)]
pub struct Watchdog {
    file: File,
    /// The timeout the driver accepted, in seconds.
    pub timeout_secs: u32,
}

impl Watchdog {
    /// Open (which arms it) and ask for `timeout_secs`; the driver may round
    /// it, or refuse it (above its maximum: 15 s for a Pi's bcm2835_wdt) and
    /// keep its own, which is then read back.
    pub fn open(path: &Path, timeout_secs: u32) -> Result<Watchdog, Errno> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let mut t = timeout_secs.min(i32::MAX as u32) as libc::c_int;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one int through the
        // pointer, which points at `t`, alive across the call.
        let accepted = match unsafe { wdioc_settimeout(file.as_raw_fd(), &mut t) } {
            Ok(_) => t.max(1) as u32,
            Err(_) => {
                let mut now: libc::c_int = 0;
                // SAFETY: WDIOC_GETTIMEOUT writes one int through the
                // pointer, which points at `now`, alive across the call.
                match unsafe { wdioc_gettimeout(file.as_raw_fd(), &mut now) } {
                    Ok(_) if now > 0 => now as u32,
                    // No timeout to read either: the watchdog core's default.
                    _ => 60,
                }
            }
        };
        Ok(Watchdog {
            file,
            timeout_secs: accepted,
        })
    }

    /// Restart the countdown.
    pub fn pet(&mut self) -> Result<(), Errno> {
        self.file
            .write_all(b"\0")
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    }
}
