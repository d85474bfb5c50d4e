//! One rtnetlink request: delete a network link by name (`RTM_DELLINK` with
//! `IFLA_IFNAME`, `linux/rtnetlink.h`), as `ip link delete <name>` does.
//! Used at shutdown to remove the CNI bridge and flannel links.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

const RTM_DELLINK: u16 = 17;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const IFLA_IFNAME: u16 = 3;

/// The request bytes: nlmsghdr (16) + ifinfomsg (16) + IFLA_IFNAME attribute.
fn dellink_request(name: &str, seq: u32) -> Result<Vec<u8>, Errno> {
    let n = name.as_bytes();
    if n.is_empty() || n.len() >= libc::IFNAMSIZ || n.contains(&0) {
        return Err(Errno::EINVAL);
    }
    let attr_len = 4 + n.len() + 1;
    let total = 16 + 16 + attr_len.next_multiple_of(4);
    let mut b = vec![0u8; total];
    b[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&RTM_DELLINK.to_ne_bytes());
    b[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // ifinfomsg: family AF_UNSPEC, index 0 (look up by name): all zero.
    b[32..34].copy_from_slice(&(attr_len as u16).to_ne_bytes());
    b[34..36].copy_from_slice(&IFLA_IFNAME.to_ne_bytes());
    b[36..36 + n.len()].copy_from_slice(n);
    Ok(b)
}

/// Delete the link `name` in this network namespace. `ENODEV` when it does not exist.
pub fn delete_link(name: &str) -> Result<(), Errno> {
    let req = dellink_request(name, 1)?;
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain old data; zero is valid (pid 0 = the kernel).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `req` and `addr` are live for the call and their lengths are passed.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(Errno::last());
    }
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: `buf` is writable for its full length during the call.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n < 20 {
            return Err(Errno::EIO);
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if kind != NLMSG_ERROR {
            continue;
        }
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return if code == 0 {
            Ok(())
        } else {
            Err(Errno::from_raw(-code))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let b = dellink_request("cni0", 7).unwrap();
        assert_eq!(b.len(), 16 + 16 + 12);
        assert_eq!(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]), 44);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), RTM_DELLINK);
        assert_eq!(u16::from_ne_bytes([b[32], b[33]]), 9);
        assert_eq!(&b[36..41], b"cni0\0");
        assert!(dellink_request("", 1).is_err());
        assert!(dellink_request(&"x".repeat(16), 1).is_err());
    }
}
