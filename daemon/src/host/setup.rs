//! Host setup: the VIP, the cluster MAC and the sysctls a node needs. Everything changed is
//! remembered in [`HostSetup`] and put back by [`HostSetup::undo`]; nothing else is touched.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::config::{format_mac, Config};
use crate::host::netlink::{put_attr, Netlink, AF_INET, AF_INET6, NLM_F_CREATE, NLM_F_EXCL};

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// Every node holds the same address: IPv6 duplicate address detection must not run, or
/// each node would find the others and disable the VIP.
const IFA_F_NODAD: u8 = 0x02;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("interface {name} does not exist")]
    NoInterface { name: String },
    #[error("cannot add {addr} to {ifname}")]
    AddAddress {
        addr: IpAddr,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set MAC {mac} on {ifname}")]
    SetMac {
        mac: String,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set sysctl {path}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("netlink")]
    Netlink(#[source] io::Error),
    #[error("{} errors while undoing host setup: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Undo(Vec<HostError>),
}

pub fn ifindex(name: &str) -> Result<u32, HostError> {
    let c =
        std::ffi::CString::new(name).map_err(|_| HostError::NoInterface { name: name.into() })?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(HostError::NoInterface { name: name.into() });
    }
    Ok(idx)
}

fn addr_msg(ifindex: u32, addr: &IpAddr, prefix: u8) -> Vec<u8> {
    let (family, flags, bytes) = match addr {
        IpAddr::V4(a) => (AF_INET, 0, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, IFA_F_NODAD, a.octets().to_vec()),
    };
    let mut m = vec![family, prefix, flags, 0];
    m.extend_from_slice(&ifindex.to_ne_bytes());
    put_attr(&mut m, IFA_LOCAL, &bytes);
    put_attr(&mut m, IFA_ADDRESS, &bytes);
    m
}

/// Reads or writes an interface's hardware address through SIOC[GS]IFHWADDR.
// `c_char` is `i8` here: bytes are reinterpreted, never truncated.
#[allow(
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "c_char is i8: bytes are reinterpreted, never truncated"
)]
fn hwaddr(ifname: &str, set: Option<[u8; 6]>) -> io::Result<[u8; 6]> {
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here only.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: ifreq is plain old data; zero is a valid initial value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let read = |req: &mut libc::ifreq| -> io::Result<[u8; 6]> {
        // SAFETY: SIOCGIFHWADDR fills the ifreq we pass, which lives across the call.
        if unsafe { libc::ioctl(raw, libc::SIOCGIFHWADDR, req as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: after SIOCGIFHWADDR the union holds ifru_hwaddr.
        let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *d = *s as u8;
        }
        Ok(mac)
    };
    let old = read(&mut req)?;
    if let Some(mac) = set {
        if mac != old {
            // SAFETY: writing the hwaddr member of the union before SIOCSIFHWADDR.
            unsafe {
                req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
                for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
                    *d = s as libc::c_char;
                }
            }
            // SAFETY: req is a valid ifreq for the call.
            if unsafe { libc::ioctl(raw, libc::SIOCSIFHWADDR, std::ptr::addr_of_mut!(req)) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(old)
}

/// What this daemon changed on the host, so that exit restores exactly that.
#[derive(Debug, Default)]
pub struct HostSetup {
    vip: Option<(u32, IpAddr, u8)>,
    mac: Option<(String, [u8; 6])>,
    sysctls: Vec<(PathBuf, String)>,
}

/// The sysctls a node needs, and why.
fn wanted_sysctls() -> [(&'static str, &'static str); 2] {
    [
        // A segment with no conntrack entry is another node's connection; with loose
        // pick-up off it is INVALID, and the ruleset drops it before TCP can answer with RST.
        ("net/netfilter/nf_conntrack_tcp_loose", "0"),
        // Window tracking must never make us drop segments of our own connections; the
        // ruleset relies on conntrack only for "is there an entry at all".
        ("net/netfilter/nf_conntrack_tcp_be_liberal", "1"),
    ]
}

impl HostSetup {
    /// Applies sysctls, cluster MAC and VIP, in that order. On error, what was done so far is
    /// undone before returning.
    pub fn apply(cfg: &Config) -> Result<HostSetup, HostError> {
        let mut done = HostSetup::default();
        match done.apply_inner(cfg) {
            Ok(()) => Ok(done),
            Err(e) => {
                if let Err(u) = done.undo() {
                    tracing::warn!(error = %u, "partial host setup not fully undone");
                }
                Err(e)
            }
        }
    }

    fn apply_inner(&mut self, cfg: &Config) -> Result<(), HostError> {
        for (key, value) in wanted_sysctls() {
            let path = PathBuf::from("/proc/sys").join(key);
            let old = std::fs::read_to_string(&path).map_err(|source| HostError::Sysctl {
                path: path.clone(),
                source,
            })?;
            let old = old.trim().to_string();
            if old != value {
                std::fs::write(&path, value).map_err(|source| HostError::Sysctl {
                    path: path.clone(),
                    source,
                })?;
                self.sysctls.push((path, old));
            }
        }
        let idx = ifindex(&cfg.client_interface)?;
        ifindex(&cfg.cluster_interface)?;
        if let Some(mac) = cfg.cluster_mac {
            let old =
                hwaddr(&cfg.client_interface, Some(mac)).map_err(|source| HostError::SetMac {
                    mac: format_mac(&mac),
                    ifname: cfg.client_interface.clone(),
                    source,
                })?;
            if old != mac {
                self.mac = Some((cfg.client_interface.clone(), old));
            }
        }
        let mut nl = Netlink::open(libc::NETLINK_ROUTE).map_err(HostError::Netlink)?;
        match nl.request_ack(
            RTM_NEWADDR,
            NLM_F_CREATE | NLM_F_EXCL,
            &addr_msg(idx, &cfg.vip, cfg.vip_prefix_len),
        ) {
            Ok(()) => self.vip = Some((idx, cfg.vip, cfg.vip_prefix_len)),
            // Already there (configured by the operator): use it, but it is not ours to remove.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                tracing::info!(vip = %cfg.vip, "VIP already present on {}; leaving it in place at exit", cfg.client_interface);
            }
            Err(source) => {
                return Err(HostError::AddAddress {
                    addr: cfg.vip,
                    ifname: cfg.client_interface.clone(),
                    source,
                })
            }
        }
        Ok(())
    }

    /// Puts back everything [`HostSetup::apply`] changed, in reverse order, collecting errors.
    pub fn undo(&mut self) -> Result<(), HostError> {
        let mut errors = Vec::new();
        if let Some((idx, addr, prefix)) = self.vip.take() {
            let r = Netlink::open(libc::NETLINK_ROUTE)
                .and_then(|mut nl| nl.request_ack(RTM_DELADDR, 0, &addr_msg(idx, &addr, prefix)));
            match r {
                Ok(()) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                        || e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => errors.push(HostError::Netlink(e)),
            }
        }
        if let Some((ifname, old)) = self.mac.take() {
            if let Err(source) = hwaddr(&ifname, Some(old)) {
                errors.push(HostError::SetMac {
                    mac: format_mac(&old),
                    ifname,
                    source,
                });
            }
        }
        for (path, old) in self.sysctls.drain(..).rev() {
            if let Err(source) = std::fs::write(&path, &old) {
                errors.push(HostError::Sysctl { path, source });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(HostError::Undo(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_message_layout() {
        let m = addr_msg(7, &"192.0.2.1".parse().unwrap(), 24);
        assert_eq!(&m[..4], &[AF_INET, 24, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[4..8].try_into().unwrap()), 7);
        assert_eq!(m.len(), 8 + 8 + 8, "two 4-byte-payload attributes");
        assert_eq!(&m[12..16], &[192, 0, 2, 1]);
        let m6 = addr_msg(7, &"2001:db8::1".parse().unwrap(), 64);
        assert_eq!(m6[2], IFA_F_NODAD, "no DAD: every node holds the address");
        assert_eq!(m6.len(), 8 + 20 + 20);
    }
}
