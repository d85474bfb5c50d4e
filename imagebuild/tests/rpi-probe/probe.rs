//! A STAND-IN for init, used only by imagebuild/tests/qemu_rpi.rs until the real
//! init has MBR support: PID 1 in the image's initramfs that loads the modules the
//! builder listed in `etc/basalt/initramfs.toml`, waits for the SD card's
//! partitions, prints what it found and powers off. It proves that the kernel,
//! DTB and initramfs taken from the image's slot boot partition start and that
//! the image's modules bring up the SD card with the builder's MBR; nothing more.
//!
//! No dependencies: built with plain `rustc` for the board's target; the libc
//! functions are musl's, which std links statically.

use std::ffi::{CString, c_char, c_long, c_ulong};
use std::time::{Duration, Instant};

unsafe extern "C" {
    fn mount(
        src: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const u8,
    ) -> i32;
    fn syscall(n: c_long, ...) -> c_long;
    fn reboot(cmd: i32) -> i32;
    fn sync();
}

#[cfg(target_arch = "aarch64")]
const SYS_FINIT_MODULE: c_long = 273;
#[cfg(target_arch = "arm")]
const SYS_FINIT_MODULE: c_long = 379;
const RB_POWER_OFF: i32 = 0x4321_fedc_u32 as i32;

fn say(s: &str) {
    println!("probe: {s}");
}

fn mnt(fstype: &str, target: &str) {
    let (f, t) = (CString::new(fstype).unwrap(), CString::new(target).unwrap());
    let _ = std::fs::create_dir_all(target);
    // SAFETY: valid NUL-terminated strings, null data.
    let r = unsafe { mount(f.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        say(&format!(
            "mount {target} failed: {}",
            std::io::Error::last_os_error()
        ));
    }
}

/// Mount `dev` read-only at `target`; say what happened and one fact from inside.
fn mount_ro(dev: &str, target: &str, fstype: &str, look: &str) {
    let _ = std::fs::create_dir_all(target);
    let (d, t, f) = (
        CString::new(dev).unwrap(),
        CString::new(target).unwrap(),
        CString::new(fstype).unwrap(),
    );
    // SAFETY: valid NUL-terminated strings; MS_RDONLY; null data.
    let r = unsafe { mount(d.as_ptr(), t.as_ptr(), f.as_ptr(), 1, std::ptr::null()) };
    if r != 0 {
        say(&format!(
            "mount {dev} {fstype} failed: {}",
            std::io::Error::last_os_error()
        ));
        return;
    }
    let path = format!("{target}/{look}");
    match std::fs::metadata(&path) {
        Ok(m) => say(&format!("mounted {dev} {fstype}: {look} {} bytes", m.len())),
        Err(e) => say(&format!("mounted {dev} {fstype}: {look}: {e}")),
    }
}

fn quoted(line: &str) -> Vec<String> {
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn main() {
    mnt("proc", "/proc");
    mnt("sysfs", "/sys");
    mnt("devtmpfs", "/dev");
    say("start");
    let settings = std::fs::read_to_string("/etc/basalt/initramfs.toml").unwrap_or_default();
    let mut kver = String::new();
    let mut modules = Vec::new();
    let mut in_modules = false;
    for line in settings.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("kernel_version") {
            kver = quoted(v).into_iter().next().unwrap_or_default();
        }
        if l.starts_with("modules") {
            in_modules = true;
        }
        if in_modules {
            modules.extend(quoted(l));
            if l.ends_with(']') {
                in_modules = false;
            }
        }
    }
    say(&format!(
        "settings board={:?} modules={}",
        settings
            .lines()
            .find(|l| l.starts_with("board"))
            .unwrap_or(""),
        modules.len()
    ));
    let mut loaded = 0;
    for m in &modules {
        let path = format!("/lib/modules/{kver}/{m}");
        match std::fs::File::open(&path) {
            Ok(f) => {
                use std::os::fd::AsRawFd;
                let empty = CString::new("").unwrap();
                // SAFETY: finit_module(fd, params, flags) with a valid fd and string.
                let r = unsafe {
                    syscall(
                        SYS_FINIT_MODULE,
                        f.as_raw_fd() as c_long,
                        empty.as_ptr(),
                        0 as c_long,
                    )
                };
                let err = std::io::Error::last_os_error();
                if r == 0 || err.raw_os_error() == Some(17) {
                    loaded += 1;
                } else {
                    say(&format!("module {m}: {err}"));
                }
            }
            Err(e) => say(&format!("module {m}: {e}")),
        }
    }
    say(&format!("modules loaded {loaded}/{}", modules.len()));
    let start = Instant::now();
    let mut names = Vec::new();
    while start.elapsed() < Duration::from_secs(20) {
        names = std::fs::read_dir("/sys/class/block")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        if names.iter().any(|n| n.ends_with("p7")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    say(&format!("block {}", names.join(" ")));
    for n in &names {
        let ue =
            std::fs::read_to_string(format!("/sys/class/block/{n}/uevent")).unwrap_or_default();
        let partn = ue
            .lines()
            .find_map(|l| l.strip_prefix("PARTN="))
            .unwrap_or("-");
        let size =
            std::fs::read_to_string(format!("/sys/class/block/{n}/size")).unwrap_or_default();
        say(&format!("part {n} partn={partn} sectors={}", size.trim()));
    }
    let disk = names
        .iter()
        .find(|n| n.ends_with("p7"))
        .map(|n| format!("/dev/{}", &n[..n.len() - 2]))
        .unwrap_or_default();
    mount_ro(&format!("{disk}p1"), "/mnt/config", "vfat", "autoboot.txt");
    if let Ok(t) = std::fs::read_to_string("/mnt/config/autoboot.txt") {
        say(&format!("autoboot.txt {:?}", t));
    }
    mount_ro(&format!("{disk}p2"), "/mnt/boot", "vfat", "cmdline.txt");
    mount_ro(
        &format!("{disk}p5"),
        "/mnt/root",
        "squashfs",
        "usr/lib/basalt/init",
    );
    mount_ro(&format!("{disk}p7"), "/mnt/data", "ext4", "lost+found");
    say(&format!(
        "cmdline {}",
        std::fs::read_to_string("/proc/cmdline")
            .unwrap_or_default()
            .trim()
    ));
    say("poweroff");
    // SAFETY: plain syscalls; PID 1 powering the machine off.
    unsafe {
        sync();
        reboot(RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
