//! Helpers for Basalt's end-to-end tests: find the test assets, build images
//! with `basalt build`, edit them as plain files (node config on the ESP, disk
//! growth), boot them under QEMU (TCG, OVMF) and read the serial console.
//!
//! Everything here has a hard timeout and kills QEMU when dropped: a test may
//! fail, but it must never hang. Each test works in its own directory under
//! `target/e2e/<test>/` that is kept afterwards, console logs included, so a
//! failure can be read after the fact.

pub mod assets;
pub mod build;
pub mod console;
pub mod disk;
pub mod qemu;
pub mod report;

use std::path::{Path, PathBuf};

/// The repository's top directory (the workspace root).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A fresh, empty work directory for one test: `target/e2e/<name>/`
/// (`CARGO_TARGET_DIR` respected). Left in place afterwards for post-mortems.
pub fn work_dir(name: &str) -> std::io::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let dir = target.join("e2e").join(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Test-only service (file content for a service TOML): eth0 on QEMU's user
/// networking without DHCP (10.0.2.15/24, gateway 10.0.2.2), loading the
/// virtio_net modules from the root. Prints `e2e-net: eth0 <operstate>`.
pub const QEMU_USER_NET_SERVICE: &str = r#"# Test-only (basalt_tests::QEMU_USER_NET_SERVICE): eth0 on QEMU user networking.
exec = ["/bin/sh", "-c", '''
m=/lib/modules/$(uname -r)/kernel
insmod $m/net/core/failover.ko; insmod $m/drivers/net/net_failover.ko; insmod $m/drivers/net/virtio_net.ko
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
echo "e2e-net: eth0 $(cat /sys/class/net/eth0/operstate)"
''']
restart = "never"
"#;
