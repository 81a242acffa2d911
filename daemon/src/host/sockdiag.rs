//! Counting this node's connections on the VIP with sock_diag (`NETLINK_SOCK_DIAG`).
//!
//! The least-connections policy needs each node's ESTABLISHED count, and the SYN-RECV count
//! tells how many handshakes are in flight. A listener bound to `[::]` accepts IPv4
//! connections as IPv4-mapped IPv6 sockets, so both families are dumped.
//!
//! A new master also lists the remote address and port of every SYN-RECV socket on the VIP
//! ([`SockDiag::syn_recv_peers`]): the handshakes some node holds right now (paper §3.5).

use std::io;
use std::net::IpAddr;

use crate::host::netlink::{Netlink, AF_INET, AF_INET6};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const IPPROTO_TCP: u8 = 6;
const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_RECV: u8 = 3;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub established: u32,
    pub syn_recv: u32,
}

/// `struct inet_diag_req_v2` for TCP sockets of `family` in the given states, no filter.
fn request(family: u8, states: u32) -> Vec<u8> {
    let mut r = vec![family, IPPROTO_TCP, 0, 0];
    r.extend_from_slice(&states.to_ne_bytes());
    r.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: match any
    r
}

/// Does an `inet_diag_msg`'s local address equal the VIP (also as IPv4-mapped IPv6)? Its
/// state if so. Public for the fuzz target `netlink`, which feeds it arbitrary dump replies.
pub fn local_is(msg: &[u8], vip: &IpAddr) -> Option<u8> {
    // inet_diag_msg: family u8, state u8, timer u8, retrans u8, then inet_diag_sockid with
    // sport (2), dport (2), src (16), dst (16), …
    if msg.len() < 4 + 4 + 32 {
        return None;
    }
    let family = msg[0];
    let state = msg[1];
    let src = &msg[8..24];
    let hit = match vip {
        IpAddr::V4(v) if family == AF_INET => src[..4] == v.octets(),
        IpAddr::V4(v) if family == AF_INET6 => {
            src[..10] == [0; 10] && src[10..12] == [0xff, 0xff] && src[12..16] == v.octets()
        }
        IpAddr::V6(v) if family == AF_INET6 => src == v.octets(),
        _ => false,
    };
    hit.then_some(state)
}

/// The remote address and port of an `inet_diag_msg` (IPv4-mapped IPv6 as IPv4). Public for
/// the fuzz target `netlink`.
pub fn remote_of(msg: &[u8]) -> Option<(IpAddr, u16)> {
    if msg.len() < 4 + 4 + 32 {
        return None;
    }
    let port = u16::from_be_bytes([msg[6], msg[7]]);
    let dst = &msg[24..40];
    let addr = match msg[0] {
        AF_INET => IpAddr::from(<[u8; 4]>::try_from(&dst[..4]).ok()?),
        AF_INET6 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(dst).ok()?);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some((addr, port))
}

#[derive(Debug)]
pub struct SockDiag {
    nl: Netlink,
}

/// The address families whose sockets can hold `vip` locally: an IPv4 VIP also shows up on
/// IPv6 sockets (as a v4-mapped address).
fn families(vip: &IpAddr) -> &'static [u8] {
    match vip {
        IpAddr::V4(_) => &[AF_INET, AF_INET6],
        IpAddr::V6(_) => &[AF_INET6],
    }
}

impl SockDiag {
    pub fn open() -> io::Result<Self> {
        Ok(SockDiag {
            nl: Netlink::open(libc::NETLINK_SOCK_DIAG)?,
        })
    }

    pub fn count(&mut self, vip: &IpAddr) -> io::Result<Counts> {
        let states = (1u32 << TCP_ESTABLISHED) | (1u32 << TCP_SYN_RECV);
        let mut c = Counts::default();
        for &fam in families(vip) {
            self.nl.dump(
                SOCK_DIAG_BY_FAMILY,
                &request(fam, states),
                |msg| match local_is(msg, vip) {
                    Some(TCP_ESTABLISHED) => c.established += 1,
                    Some(TCP_SYN_RECV) => c.syn_recv += 1,
                    _ => {}
                },
            )?;
        }
        Ok(c)
    }

    /// Remote address and port of at most `max` SYN-RECV sockets on the VIP, and whether
    /// there were more.
    pub fn syn_recv_peers(
        &mut self,
        vip: &IpAddr,
        max: usize,
    ) -> io::Result<(Vec<(IpAddr, u16)>, bool)> {
        let mut peers = Vec::new();
        let mut truncated = false;
        for &fam in families(vip) {
            self.nl.dump(
                SOCK_DIAG_BY_FAMILY,
                &request(fam, 1u32 << TCP_SYN_RECV),
                |msg| {
                    if local_is(msg, vip) != Some(TCP_SYN_RECV) {
                        return;
                    }
                    match remote_of(msg) {
                        Some(p) if peers.len() < max => peers.push(p),
                        Some(_) => truncated = true,
                        None => {}
                    }
                },
            )?;
        }
        Ok((peers, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_address_and_port_v4_and_mapped() {
        let mut m = msg(2, 3, [0; 16]);
        m[24..28].copy_from_slice(&[192, 0, 2, 101]);
        assert_eq!(
            remote_of(&m),
            Some(("192.0.2.101".parse().unwrap(), 0x9c40))
        );
        let mut m6 = msg(10, 3, [0; 16]);
        m6[34..36].copy_from_slice(&[0xff, 0xff]);
        m6[36..40].copy_from_slice(&[192, 0, 2, 102]);
        assert_eq!(
            remote_of(&m6),
            Some(("192.0.2.102".parse().unwrap(), 0x9c40))
        );
        assert_eq!(remote_of(&[2, 3]), None);
    }

    fn msg(family: u8, state: u8, src: [u8; 16]) -> Vec<u8> {
        let mut m = vec![family, state, 0, 0, 0, 80, 0x9c, 0x40];
        m.extend_from_slice(&src);
        m.extend_from_slice(&[0u8; 16 + 8 + 20]);
        m
    }

    #[test]
    fn matches_v4_and_v4_mapped_local_addresses() {
        let vip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[192, 0, 2, 1]);
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[192, 0, 2, 1]);
        let mut other = v4;
        other[3] = 2;
        assert_eq!(local_is(&msg(2, 1, v4), &vip), Some(1));
        assert_eq!(local_is(&msg(10, 3, mapped), &vip), Some(3));
        assert_eq!(local_is(&msg(2, 1, other), &vip), None);
        assert_eq!(
            local_is(&msg(10, 1, v4), &vip),
            None,
            "not a mapped address"
        );
        assert_eq!(local_is(&[2, 1], &vip), None, "short message");
    }
}
