//! The boot benchmark's floor (`benches/boot.sh`, variant `floor`): a PID 1
//! that makes only the kernel calls the boot path needs, in the same order as
//! Basalt's stage 1 and stage 2 and the busybox script, with nothing else in
//! between: no settings file parsed, no slot logic, no dm-verity, no node
//! config, no update bookkeeping, no re-exec after `switch_root`, no fsync.
//! Its time from start to the Kubernetes exec is the kernel's share of the
//! boot on this machine: no init doing these steps can be faster.
//!
//! Modules load as Basalt's stage 1 loads them: in order on one CPU; on
//! more, on up to 4 threads, each after the ones it needs (the same
//! `module_deps` from the image's `initramfs.toml`), so that on a multi-CPU
//! VM the floor stays a floor.
//!
//! Input: `/floor.conf` in the initramfs, one `<key> <value>` per line
//! (`module <path>` in load order, `after <path> <path it needs>...`,
//! `exec <argv...>`), written by `benches/boot.sh`. Output: `floor: start <ms>` and `floor: k8s-exec <ms>`
//! on the console (CLOCK_BOOTTIME, the clock Basalt's ready line uses).
//! Not part of any image Basalt builds.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(src: &str, target: &str, fs: Option<&str>, flags: libc::c_ulong, data: Option<&str>) {
    let (s, t) = (c(src), c(target));
    let f = fs.map(c);
    let d = data.map(c);
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            d.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>()),
        )
    };
    if r != 0 {
        say(&format!(
            "mount {src} {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn say(msg: &str) {
    let _ = writeln!(std::io::stdout(), "floor: {msg}");
}

fn load_module(path: &str) {
    match fs::File::open(path) {
        Ok(f) => {
            use std::os::fd::AsRawFd;
            let empty = c("");
            // SAFETY: an open fd and a NUL-terminated empty parameter string.
            let r =
                unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
            let e = std::io::Error::last_os_error();
            if r != 0 && e.raw_os_error() != Some(libc::EEXIST) {
                say(&format!("finit_module {path}: {e}"));
            }
        }
        Err(e) => say(&format!("open {path}: {e}")),
    }
}

/// Load `modules` (in order), each after the ones `after` names for it; on
/// up to 4 threads when this process may run on more than one CPU.
fn load_modules(modules: &[String], after: &[(String, Vec<String>)]) {
    // SAFETY: a zeroed set and its size.
    let cpus = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            libc::CPU_COUNT(&set) as usize
        } else {
            1
        }
    };
    let workers = cpus.clamp(1, 4);
    if workers == 1 || after.is_empty() {
        modules.iter().for_each(|m| load_module(m));
        return;
    }
    let needs: Vec<Vec<usize>> = modules
        .iter()
        .map(|m| {
            let deps = after
                .iter()
                .find(|(x, _)| x == m)
                .map(|(_, d)| d.as_slice());
            deps.unwrap_or_default()
                .iter()
                .filter_map(|d| modules.iter().position(|x| x == d))
                .collect()
        })
        .collect();
    // 0 waiting, 1 loading, 2 done.
    let state = std::sync::Mutex::new(vec![0u8; modules.len()]);
    let changed = std::sync::Condvar::new();
    let work = || {
        let mut st = state.lock().unwrap();
        loop {
            let ready =
                (0..modules.len()).find(|&i| st[i] == 0 && needs[i].iter().all(|&d| st[d] == 2));
            match ready {
                Some(i) => {
                    st[i] = 1;
                    drop(st);
                    load_module(&modules[i]);
                    st = state.lock().unwrap();
                    st[i] = 2;
                    changed.notify_all();
                }
                None if st.iter().all(|&x| x != 0) => return,
                None => st = changed.wait(st).unwrap(),
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn_scoped(s, work)
                .unwrap();
        }
        work();
    });
}

/// `/dev/<name>` of the partition whose uevent says `PARTNAME=<partname>`.
fn find_part(partname: &str) -> Option<String> {
    for entry in fs::read_dir("/sys/class/block").ok()?.flatten() {
        let Ok(text) = fs::read_to_string(entry.path().join("uevent")) else {
            continue;
        };
        if text
            .lines()
            .any(|l| l.strip_prefix("PARTNAME=") == Some(partname))
        {
            let dev = text.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
            return Some(format!("/dev/{dev}"));
        }
    }
    None
}

fn wait_part(partname: &str) -> String {
    for _ in 0..5000 {
        if let Some(d) = find_part(partname) {
            return d;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    say(&format!("no partition {partname}"));
    String::new()
}

/// `cp -a from/. to/` for a tree of directories, files and symlinks.
fn copy_tree(from: &Path, to: &Path) {
    let Ok(rd) = fs::read_dir(from) else { return };
    for entry in rd.flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let Ok(meta) = fs::symlink_metadata(&src) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            if let Ok(t) = fs::read_link(&src) {
                let _ = std::os::unix::fs::symlink(t, &dst);
            }
        } else if meta.is_dir() {
            let _ = fs::DirBuilder::new().mode(meta.mode()).create(&dst);
            copy_tree(&src, &dst);
        } else if fs::copy(&src, &dst).is_ok() {
            let _ = fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode()));
        }
    }
}

/// `switch_root`'s deletion of the initramfs: everything on its device.
fn delete_same_device(dir: &Path, dev: u64) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for entry in rd.flatten() {
        let p = entry.path();
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            delete_same_device(&p, dev);
            let _ = fs::remove_dir(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

fn interface_up(name: &str) {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a socket for the ioctls, closed below; `req` outlives both calls.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req) == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS as _, &mut req);
        }
        libc::close(s);
    }
}

fn main() {
    let start = boottime_ms();
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", Some("proc"), nosuid, None);
    say(&format!("start {start}"));
    let conf = fs::read_to_string("/floor.conf").unwrap_or_default();
    mount("sysfs", "/sys", Some("sysfs"), nosuid, None);
    mount(
        "devtmpfs",
        "/dev",
        Some("devtmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755"),
    );
    let mut exec: Vec<String> = Vec::new();
    let mut efivarfs = None;
    let (mut modules, mut after) = (Vec::new(), Vec::new());
    for line in conf.lines() {
        match line.split_once(' ') {
            Some(("module", path)) => modules.push(path.to_string()),
            Some(("after", list)) => {
                let mut it = list.split(' ').map(str::to_string);
                if let Some(m) = it.next() {
                    after.push((m, it.collect()));
                }
            }
            Some(("exec", argv)) => exec = argv.split(' ').map(str::to_string).collect(),
            Some(("efivarfs", path)) => efivarfs = Some(path.to_string()),
            _ => {}
        }
    }
    load_modules(&modules, &after);
    let (root, data, esp) = (wait_part("root-a"), wait_part("data"), wait_part("esp"));
    // Which disk the firmware started, as stage 1 asks it on UEFI: efivarfs
    // loaded and mounted, systemd-boot's LoaderDevicePartUUID read, unmounted.
    let efivars = "/sys/firmware/efi/efivars";
    if Path::new(efivars).is_dir() {
        if let Some(m) = &efivarfs {
            load_module(m);
        }
        let ro = nosuid | libc::MS_RDONLY;
        mount("efivarfs", efivars, Some("efivarfs"), ro, None);
        let var = format!("{efivars}/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f");
        if let Err(e) = fs::read(&var) {
            say(&format!("{var}: {e}"));
        }
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(c(efivars).as_ptr(), libc::MNT_DETACH) };
    }
    mount(&root, "/newroot", Some("squashfs"), libc::MS_RDONLY, None);
    mount(&data, "/newroot/var", Some("ext4"), libc::MS_NOATIME, None);
    let _ = fs::create_dir("/newetc");
    mount("tmpfs", "/newetc", Some("tmpfs"), 0, Some("mode=0755"));
    copy_tree(Path::new("/newroot/etc"), Path::new("/newetc"));
    mount("/newetc", "/newroot/etc", None, libc::MS_MOVE, None);
    mount(
        &esp,
        "/newroot/boot",
        Some("vfat"),
        nosuid,
        Some("umask=0077"),
    );
    mount(
        "tmpfs",
        "/newroot/run",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    );
    for api in ["dev", "proc", "sys"] {
        mount(
            &format!("/{api}"),
            &format!("/newroot/{api}"),
            None,
            libc::MS_MOVE,
            None,
        );
    }
    let _ = std::env::set_current_dir("/newroot");
    if let Ok(meta) = fs::metadata("/") {
        delete_same_device(Path::new("/"), meta.dev());
    }
    mount(".", "/", None, libc::MS_MOVE, None);
    // SAFETY: a NUL-terminated path.
    unsafe { libc::chroot(c(".").as_ptr()) };
    let _ = std::env::set_current_dir("/");

    // Stage 2's kernel steps.
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        Some("cgroup2"),
        nosuid,
        Some("nsdelegate"),
    );
    let _ = fs::create_dir("/sys/fs/cgroup/init");
    let _ = fs::write(
        "/sys/fs/cgroup/init/cgroup.procs",
        std::process::id().to_string(),
    );
    let available = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    for ctl in available.split_whitespace() {
        let _ = fs::write("/sys/fs/cgroup/cgroup.subtree_control", format!("+{ctl}"));
    }
    let _ = fs::DirBuilder::new().mode(0o755).create("/dev/pts");
    let _ = fs::DirBuilder::new().mode(0o1777).create("/dev/shm");
    mount(
        "devpts",
        "/dev/pts",
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    );
    mount(
        "shm",
        "/dev/shm",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    );
    mount(
        "tmpfs",
        "/tmp",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    );
    let id_path = Path::new("/var/lib/basalt/machine-id");
    let id = match fs::read_to_string(id_path) {
        Ok(id) if id.trim().len() == 32 => id,
        _ => {
            let mut b = [0u8; 16];
            // SAFETY: a valid buffer of that length.
            unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
            let id: String = b.iter().map(|x| format!("{x:02x}")).collect::<String>() + "\n";
            let _ = fs::create_dir_all("/var/lib/basalt");
            let _ = fs::write(id_path, &id);
            id
        }
    };
    let _ = fs::write("/etc/machine-id", id);
    // SAFETY: a valid buffer and length.
    unsafe { libc::sethostname(b"basalt".as_ptr().cast(), 6) };
    interface_up("lo");
    say(&format!("k8s-exec {}", boottime_ms()));
    if let Some((prog, args)) = exec.split_first() {
        let e = std::process::Command::new(prog).args(args).exec();
        say(&format!("exec {prog}: {e}"));
    }
    loop {
        // PID 1 must not exit.
        std::thread::sleep(Duration::from_secs(3600));
    }
}
