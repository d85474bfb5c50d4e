//! rtnetlink requests (`linux/rtnetlink.h`), each one message answered by an
//! ack, as `ip` sends them:
//! - delete a link by name (`RTM_DELLINK` + `IFLA_IFNAME`): at shutdown, the
//!   CNI bridge and flannel links;
//! - add an address to an interface (`RTM_NEWADDR`), `ip addr add`;
//! - add a route (`RTM_NEWROUTE`, main table), `ip route add`:
//!   static network settings of the node config.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// A netlink message under construction: header, fixed part, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Msg {
        let mut b = vec![0u8; 16];
        b[4..6].copy_from_slice(&kind.to_ne_bytes());
        b[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(fixed);
        Msg(b)
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Msg {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let total = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&total.to_ne_bytes());
        self.0
    }
}

/// The request bytes: nlmsghdr (16) + ifinfomsg (16) + IFLA_IFNAME attribute.
fn dellink_request(name: &str, seq: u32) -> Result<Vec<u8>, Errno> {
    let n = name.as_bytes();
    if n.is_empty() || n.len() >= libc::IFNAMSIZ || n.contains(&0) {
        return Err(Errno::EINVAL);
    }
    // ifinfomsg: family AF_UNSPEC, index 0 (look up by name): all zero.
    let mut with_nul = n.to_vec();
    with_nul.push(0);
    Ok(Msg::new(RTM_DELLINK, 0, seq, &[0u8; 16])
        .attr(IFLA_IFNAME, &with_nul)
        .finish())
}

fn family_of(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn bytes_of(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// `RTM_NEWADDR`: ifaddrmsg {family, prefixlen, flags, scope, index} + IFA_LOCAL/IFA_ADDRESS.
fn newaddr_request(index: u32, addr: IpAddr, prefix: u8, seq: u32) -> Vec<u8> {
    let mut fixed = [0u8; 8];
    fixed[0] = family_of(&addr);
    fixed[1] = prefix;
    fixed[3] = RT_SCOPE_UNIVERSE;
    fixed[4..8].copy_from_slice(&index.to_ne_bytes());
    let a = bytes_of(&addr);
    let m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq, &fixed);
    let m = if addr.is_ipv4() {
        m.attr(IFA_LOCAL, &a)
    } else {
        m
    };
    m.attr(IFA_ADDRESS, &a).finish()
}

/// `RTM_NEWROUTE` in the main table: rtmsg + RTA_DST (unless default) +
/// RTA_GATEWAY (when given) + RTA_OIF.
fn newroute_request(
    index: u32,
    dst: Option<(IpAddr, u8)>,
    via: Option<IpAddr>,
    seq: u32,
) -> Result<Vec<u8>, Errno> {
    let family = match (dst, via) {
        (Some((d, _)), _) => family_of(&d),
        (None, Some(v)) => family_of(&v),
        (None, None) => return Err(Errno::EINVAL),
    };
    if let (Some((d, _)), Some(v)) = (dst, via)
        && family_of(&d) != family_of(&v)
    {
        return Err(Errno::EINVAL);
    }
    let mut fixed = [0u8; 12];
    fixed[0] = family;
    fixed[1] = dst.map_or(0, |(_, p)| p);
    fixed[4] = RT_TABLE_MAIN;
    fixed[5] = RTPROT_STATIC;
    // Routes without a gateway reach the link directly.
    fixed[6] = if via.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        253
    };
    fixed[7] = RTN_UNICAST;
    let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq, &fixed);
    if let Some((d, p)) = dst
        && p > 0
    {
        m = m.attr(RTA_DST, &bytes_of(&d));
    }
    if let Some(v) = via {
        m = m.attr(RTA_GATEWAY, &bytes_of(&v));
    }
    Ok(m.attr(RTA_OIF, &index.to_ne_bytes()).finish())
}

/// Send one request and wait for its ack.
fn transact(req: &[u8]) -> Result<(), Errno> {
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

/// Delete the link `name` in this network namespace. `ENODEV` when it does not exist.
pub fn delete_link(name: &str) -> Result<(), Errno> {
    transact(&dellink_request(name, 1)?)
}

/// The index of interface `name` (`if_nametoindex(3)`).
pub fn link_index(name: &str) -> Result<u32, Errno> {
    let c = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 { Err(Errno::last()) } else { Ok(i) }
}

/// Add `addr/prefix` to interface `name`. `EEXIST` when it is there already.
pub fn add_address(name: &str, addr: IpAddr, prefix: u8) -> Result<(), Errno> {
    let index = link_index(name)?;
    transact(&newaddr_request(index, addr, prefix, 1))
}

/// Add a route through interface `name`: to `dst` (`None`: default route),
/// via gateway `via` (`None`: on-link). `EEXIST` when it is there already.
pub fn add_route(name: &str, dst: Option<(IpAddr, u8)>, via: Option<IpAddr>) -> Result<(), Errno> {
    let index = link_index(name)?;
    transact(&newroute_request(index, dst, via, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_ne_bytes([b[i], b[i + 1]])
    }

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

    #[test]
    fn newaddr_layout_v4_and_v6() {
        let b = newaddr_request(3, "10.1.2.3".parse().unwrap(), 24, 9);
        // header 16 + ifaddrmsg 8 + IFA_LOCAL 8 + IFA_ADDRESS 8
        assert_eq!(b.len(), 40);
        assert_eq!(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]), 40);
        assert_eq!(u16_at(&b, 4), RTM_NEWADDR);
        assert_eq!(
            u16_at(&b, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(b[16], libc::AF_INET as u8);
        assert_eq!(b[17], 24);
        assert_eq!(u32::from_ne_bytes([b[20], b[21], b[22], b[23]]), 3);
        assert_eq!((u16_at(&b, 24), u16_at(&b, 26)), (8, IFA_LOCAL));
        assert_eq!(&b[28..32], &[10, 1, 2, 3]);
        assert_eq!((u16_at(&b, 32), u16_at(&b, 34)), (8, IFA_ADDRESS));
        let b = newaddr_request(3, "fd00::10".parse().unwrap(), 64, 9);
        assert_eq!(b.len(), 16 + 8 + 20);
        assert_eq!(b[16], libc::AF_INET6 as u8);
        assert_eq!((u16_at(&b, 24), u16_at(&b, 26)), (20, IFA_ADDRESS));
    }

    #[test]
    fn newroute_layout() {
        let gw: IpAddr = "192.168.1.1".parse().unwrap();
        let b = newroute_request(2, None, Some(gw), 1).unwrap();
        // header 16 + rtmsg 12 + RTA_GATEWAY 8 + RTA_OIF 8
        assert_eq!(b.len(), 44);
        assert_eq!(u16_at(&b, 4), RTM_NEWROUTE);
        assert_eq!(b[16], libc::AF_INET as u8);
        assert_eq!(b[17], 0, "default route: prefix 0");
        assert_eq!(b[20], RT_TABLE_MAIN);
        assert_eq!((u16_at(&b, 28), u16_at(&b, 30)), (8, RTA_GATEWAY));
        assert_eq!(&b[32..36], &[192, 168, 1, 1]);
        assert_eq!((u16_at(&b, 36), u16_at(&b, 38)), (8, RTA_OIF));
        let b = newroute_request(2, Some(("10.20.0.0".parse().unwrap(), 16)), Some(gw), 1).unwrap();
        assert_eq!(b[17], 16);
        assert_eq!((u16_at(&b, 28), u16_at(&b, 30)), (8, RTA_DST));
        assert_eq!(&b[32..36], &[10, 20, 0, 0]);
        assert!(
            newroute_request(2, Some(("fd00::".parse().unwrap(), 8)), Some(gw), 1).is_err(),
            "mixed families"
        );
        assert!(newroute_request(2, None, None, 1).is_err());
    }
}
