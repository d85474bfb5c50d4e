//! Block-device and ext4 ioctls: disk size, sector size, in-kernel partition
//! resize (`BLKPG_RESIZE_PARTITION`) and online ext4 growth
//! (`EXT4_IOC_RESIZE_FS`). Numbers and layouts are the kernel's UAPI
//! (`linux/fs.h`, `linux/blkpg.h`, `fs/ext4/ext4.h`).

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

// BLKGETSIZE64 is `_IOR(0x12, 114, size_t)`: the size in the request code is
// size_t (4 bytes on 32-bit ARM) although the kernel writes a u64.
nix::ioctl_read_bad!(
    blkgetsize64,
    nix::request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
    u64
);
// BLKSSZGET is `_IO(0x12, 104)`, writes an int.
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
// BLKPG is `_IO(0x12, 105)` taking a `struct blkpg_ioctl_arg *`.
nix::ioctl_write_ptr_bad!(blkpg, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);
// EXT4_IOC_RESIZE_FS is `_IOW('f', 16, __u64)`.
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
const BLKPG_DEVNAMELTH: usize = 64;
const BLKPG_VOLNAMELTH: usize = 64;

/// `struct blkpg_ioctl_arg` from `linux/blkpg.h`.
#[repr(C)]
pub struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// `struct blkpg_partition` from `linux/blkpg.h`.
#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; BLKPG_DEVNAMELTH],
    volname: [libc::c_char; BLKPG_VOLNAMELTH],
}

/// Size of the block device `disk` in bytes.
pub fn size_bytes(disk: &File) -> Result<u64, Errno> {
    let mut size: u64 = 0;
    // SAFETY: `disk` is an open fd; BLKGETSIZE64 writes one u64 to the
    // pointer, which points at a live, aligned u64.
    unsafe { blkgetsize64(disk.as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// Logical sector size of the block device `disk` in bytes.
pub fn logical_sector_size(disk: &File) -> Result<u32, Errno> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer to a live c_int.
    unsafe { blksszget(disk.as_raw_fd(), &mut size) }?;
    u32::try_from(size).map_err(|_| Errno::EINVAL)
}

/// Tell the kernel that partition `partno` of `disk` now spans
/// `length_bytes` from `start_bytes` (the on-disk table must already say so).
pub fn resize_partition(
    disk: &File,
    partno: u32,
    start_bytes: u64,
    length_bytes: u64,
) -> Result<(), Errno> {
    let mut part = BlkpgPartition {
        start: i64::try_from(start_bytes).map_err(|_| Errno::EINVAL)?,
        length: i64::try_from(length_bytes).map_err(|_| Errno::EINVAL)?,
        pno: libc::c_int::try_from(partno).map_err(|_| Errno::EINVAL)?,
        devname: [0; BLKPG_DEVNAMELTH],
        volname: [0; BLKPG_VOLNAMELTH],
    };
    let arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&raw mut part).cast(),
    };
    // SAFETY: `arg` and the `part` it points to are live, correctly laid out
    // (`repr(C)` copies of the UAPI structs) for the duration of the call;
    // the kernel only reads them.
    unsafe { blkpg(disk.as_raw_fd(), &arg) }?;
    Ok(())
}

/// Grow the ext4 filesystem whose mount point (or any file on it) is `mounted`
/// to `blocks` filesystem blocks, online. A no-op when already that size.
pub fn resize_ext4(mounted: &File, blocks: u64) -> Result<(), Errno> {
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 from the pointer, which points
    // at a live u64; `mounted` is an open fd on the filesystem.
    unsafe { ext4_resize_fs(mounted.as_raw_fd(), &blocks) }?;
    Ok(())
}
