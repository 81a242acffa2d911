//! Raw IP sockets: the thin I/O shell around forwarding and re-injection.
//!
//! * [`RawSocket::forward`]: `SOCK_RAW` with protocol 253; the kernel writes the outer IP
//!   header (source = this node's cluster address), we write the forward header + segment.
//! * [`RawSocket::receive_forwards`]: the same protocol, bound to the cluster interface; each
//!   read returns one whole IP packet, outer header included.
//! * [`RawSocket::inject`]: `IPPROTO_RAW` (implies `IP_HDRINCL`); we write the whole packet
//!   and the kernel delivers it locally via `lo`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tdsc_proto::FORWARD_PROTO;

#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
}

fn family(a: &IpAddr) -> libc::c_int {
    match a {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    }
}

/// A `sockaddr_storage` for `addr` (port 0: raw sockets have none) and its length.
fn sockaddr(addr: &IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let sa: socket2_like::SockAddr = SocketAddr::new(*addr, 0).into();
    (sa.storage, sa.len)
}

mod socket2_like {
    //! A minimal `SocketAddr` → `sockaddr_storage` conversion.
    use std::net::SocketAddr;

    pub struct SockAddr {
        pub storage: libc::sockaddr_storage,
        pub len: libc::socklen_t,
    }

    impl From<SocketAddr> for SockAddr {
        fn from(a: SocketAddr) -> Self {
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let len = match a {
                SocketAddr::V4(v4) => {
                    let sin = libc::sockaddr_in {
                        sin_family: libc::sa_family_t::from(crate::host::netlink::AF_INET),
                        sin_port: v4.port().to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(v4.ip().octets()),
                        },
                        sin_zero: [0; 8],
                    };
                    // SAFETY: sockaddr_storage is larger than and suitably aligned for
                    // sockaddr_in; we write one whole sockaddr_in at its start.
                    unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin) };
                    std::mem::size_of::<libc::sockaddr_in>()
                }
                SocketAddr::V6(v6) => {
                    let sin6 = libc::sockaddr_in6 {
                        sin6_family: libc::sa_family_t::from(crate::host::netlink::AF_INET6),
                        sin6_port: v6.port().to_be(),
                        sin6_flowinfo: 0,
                        sin6_addr: libc::in6_addr {
                            s6_addr: v6.ip().octets(),
                        },
                        sin6_scope_id: v6.scope_id(),
                    };
                    // SAFETY: as above, for sockaddr_in6.
                    unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin6) };
                    std::mem::size_of::<libc::sockaddr_in6>()
                }
            };
            SockAddr {
                storage,
                // Both sizes are small constants.
                len: libc::socklen_t::try_from(len).unwrap_or(0),
            }
        }
    }
}

/// A libc return value as a result: negative means `errno`.
pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl RawSocket {
    fn open(domain: libc::c_int, protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd =
            cvt(unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) })?;
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RawSocket { fd })
    }

    /// A socket for sending forwarded SYNs to nodes of `peer_family`'s address family.
    pub fn forward(peer: &IpAddr) -> io::Result<Self> {
        Self::open(family(peer), libc::c_int::from(FORWARD_PROTO))
    }

    /// A socket receiving every protocol-253 packet that arrives on `ifname`.
    pub fn receive_forwards(
        self_addr: &IpAddr,
        ifname: &str,
        timeout: Duration,
    ) -> io::Result<Self> {
        let s = Self::open(family(self_addr), libc::c_int::from(FORWARD_PROTO))?;
        s.bind_device(ifname)?;
        s.set_timeout(timeout)?;
        Ok(s)
    }

    /// A socket that writes whole IP packets (header included) for local delivery.
    pub fn inject(vip: &IpAddr) -> io::Result<Self> {
        Self::open(family(vip), libc::IPPROTO_RAW)
    }

    fn bind_device(&self, ifname: &str) -> io::Result<()> {
        let name = ifname.as_bytes();
        // SAFETY: the pointer and length describe `name`, which outlives the call.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                name.as_ptr().cast(),
                libc::socklen_t::try_from(name.len()).unwrap_or(0),
            )
        })?;
        Ok(())
    }

    fn set_timeout(&self, t: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(t.subsec_micros()),
        };
        // SAFETY: tv is a valid timeval for the duration of the call.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(0),
            )
        })?;
        Ok(())
    }

    /// Sends `buf` to `to` (a prepared address, see [`Dest`]).
    pub fn send_to(&self, buf: &[u8], to: &Dest) -> io::Result<usize> {
        // SAFETY: buf and the address are valid for the call; the kernel only reads them.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of!(to.storage).cast(),
                to.len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs())
    }

    /// Sends several packets, each to its own destination, in as few `sendmmsg` calls as the
    /// kernel allows: one when every send succeeds. A packet the kernel refuses is skipped and
    /// the rest are still sent. Returns how many were sent and the last error, if any. At most
    /// [`MAX_SEND_BATCH`] packets per call; the rest of `items` is left unsent and not
    /// counted, so callers flush before a batch outgrows it.
    pub fn send_many<'a, I>(&self, items: I) -> SendMany
    where
        I: IntoIterator<Item = (&'a [u8], &'a Dest)>,
    {
        // SAFETY: iovec and mmsghdr are plain old data; zero is a valid (empty) value of each.
        let mut iov: [libc::iovec; MAX_SEND_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdr: [libc::mmsghdr; MAX_SEND_BATCH] = unsafe { std::mem::zeroed() };
        let mut n = 0;
        for (buf, to) in items.into_iter().take(MAX_SEND_BATCH) {
            iov[n] = libc::iovec {
                iov_base: buf.as_ptr().cast_mut().cast(),
                iov_len: buf.len(),
            };
            hdr[n].msg_hdr.msg_name = std::ptr::addr_of!(to.storage).cast_mut().cast();
            hdr[n].msg_hdr.msg_namelen = to.len;
            hdr[n].msg_hdr.msg_iov = std::ptr::addr_of_mut!(iov[n]);
            hdr[n].msg_hdr.msg_iovlen = 1;
            n += 1;
        }
        let mut out = SendMany::default();
        let mut at = 0;
        while at < n {
            let left = u32::try_from(n - at).unwrap_or(0);
            // SAFETY: hdr[at..n] point at iovecs and addresses that the borrowed items and
            // the arrays above keep alive for the call; the kernel only reads the buffers
            // and writes msg_len.
            let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), hdr[at..].as_mut_ptr(), left, 0) };
            match usize::try_from(r) {
                Ok(sent) if sent > 0 => {
                    out.sent += sent;
                    at += sent;
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // The packet at `at` was refused: skip it, send the rest.
                    out.failed += 1;
                    out.last_error = Some(e);
                    at += 1;
                }
            }
        }
        out
    }

    /// Receives one packet and its source address; `Ok(None)` on timeout. An IPv4 raw socket
    /// returns the IP header too; an IPv6 one does not.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<Option<(usize, IpAddr)>> {
        // SAFETY: sockaddr_storage is plain old data.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len =
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_storage>()).unwrap_or(0);
        // SAFETY: buf is valid for writes of buf.len() bytes; from/len describe a
        // sockaddr_storage that outlives the call.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(from).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let addr = match i32::from(from.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in for an AF_INET socket.
                let sin: libc::sockaddr_in =
                    unsafe { std::ptr::read(std::ptr::addr_of!(from).cast()) };
                IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: the kernel wrote a sockaddr_in6 for an AF_INET6 socket.
                let sin6: libc::sockaddr_in6 =
                    unsafe { std::ptr::read(std::ptr::addr_of!(from).cast()) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unknown address family",
                ))
            }
        };
        Ok(Some((n.unsigned_abs(), addr)))
    }

    /// Receives one packet; `Ok(None)` on timeout.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n.unsigned_abs()))
    }
}

/// Packets per [`RawSocket::send_many`] call.
pub const MAX_SEND_BATCH: usize = 64;

/// What [`RawSocket::send_many`] did.
#[derive(Debug, Default)]
pub struct SendMany {
    pub sent: usize,
    pub failed: usize,
    pub last_error: Option<io::Error>,
}

/// A destination address converted once, up front, so the hot path does no conversion.
#[derive(Clone, Copy)]
pub struct Dest {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl std::fmt::Debug for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dest").field("len", &self.len).finish()
    }
}

impl Dest {
    pub fn new(addr: &IpAddr) -> Self {
        let (storage, len) = sockaddr(addr);
        Dest { storage, len }
    }
}
