//! Hand-made packets for the tests and the benchmark: crafted TCP SYNs sent through a raw IP
//! socket, raw protocol-253 payloads, and an AF_PACKET capture that parses Ethernet/IPv4/TCP.
//!
//! Create these sockets inside a namespace (see [`crate::netns::run_in`]): they send and
//! capture there for their whole life.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// TCP flag bits (RFC 9293 §3.1).
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// `IPPROTO_TCP` as a byte.
const PROTO_TCP: u8 = 6;

/// MSS 1460 option (kind 2, length 4): what Linux would announce on a 1500-byte link.
const MSS_OPTION: [u8; 4] = [2, 4, 0x05, 0xb4];

/// Ones'-complement sum of 16-bit big-endian words (RFC 1071), not yet folded.
fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a sum into the final checksum.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // Folded above: fits in 16 bits.
    !u16::try_from(sum).expect("folded")
}

/// Internet checksum of a buffer.
pub fn checksum(data: &[u8]) -> u16 {
    fold(ones_sum(data, 0))
}

/// TCP checksum over the IPv4 pseudo-header and `segment` (whose checksum field must be 0).
pub fn tcp_checksum_v4(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = PROTO_TCP;
    let len = u16::try_from(segment.len()).expect("segment under 64 KiB");
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());
    fold(ones_sum(segment, ones_sum(&pseudo, 0)))
}

/// A TCP SYN to craft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syn {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// Initial sequence number.
    pub seq: u32,
    /// Data carried in the SYN (as TCP Fast Open would).
    pub payload: Vec<u8>,
}

impl Syn {
    /// The TCP segment (header with an MSS option, then the payload), checksummed.
    pub fn segment(&self) -> Vec<u8> {
        let hdr_len = 20 + MSS_OPTION.len();
        let mut seg = vec![0u8; hdr_len + self.payload.len()];
        seg[0..2].copy_from_slice(&self.sport.to_be_bytes());
        seg[2..4].copy_from_slice(&self.dport.to_be_bytes());
        seg[4..8].copy_from_slice(&self.seq.to_be_bytes());
        // Data offset in 32-bit words, in the high nibble.
        seg[12] = u8::try_from(hdr_len / 4).expect("small") << 4;
        seg[13] = flags::SYN;
        seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
        seg[20..hdr_len].copy_from_slice(&MSS_OPTION);
        seg[hdr_len..].copy_from_slice(&self.payload);
        let sum = tcp_checksum_v4(self.src, self.dst, &seg);
        seg[16..18].copy_from_slice(&sum.to_be_bytes());
        seg
    }

    /// Gives the SYN the next random source port (1024..=65534) and ISN from `x`, an
    /// xorshift64 state (cheap, and varied enough for a flood); returns the 8 random bytes,
    /// of which bytes 4..8 are not used up by the port and ISN's first half.
    pub fn randomise(&mut self, x: &mut u64) -> [u8; 8] {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let bits = x.to_le_bytes();
        self.sport = 1024 + u16::from_le_bytes([bits[0], bits[1]]) % (65535 - 1024);
        self.seq = u32::from_le_bytes([bits[2], bits[3], bits[4], bits[5]]);
        bits
    }

    /// The whole IPv4 packet, for an `IPPROTO_RAW` socket.
    pub fn ipv4_packet(&self) -> Vec<u8> {
        ipv4_packet(self.src, self.dst, PROTO_TCP, &self.segment())
    }
}

/// An IPv4 header (no options, DF, TTL 64) followed by `payload`.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20 + payload.len()];
    p[0] = 0x45;
    let total = u16::try_from(p.len()).expect("under 64 KiB");
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

fn sockaddr_in(dst: Ipv4Addr) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::sa_family_t::try_from(libc::AF_INET).expect("small");
    sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
    sa
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("small struct")
}

fn new_socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a fresh fd we own.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_to(fd: &OwnedFd, data: &[u8], dst: Ipv4Addr) -> io::Result<usize> {
    let sa = sockaddr_in(dst);
    // SAFETY: `data` and `sa` are live for the call and their lengths are passed with them.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            0,
            std::ptr::from_ref(&sa).cast(),
            socklen::<libc::sockaddr_in>(),
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A raw socket that sends whole IPv4 packets (`IPPROTO_RAW`, header included).
#[derive(Debug)]
pub struct RawIpSender {
    fd: OwnedFd,
}

impl RawIpSender {
    pub fn new() -> io::Result<Self> {
        Ok(RawIpSender {
            fd: new_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?,
        })
    }

    /// Sends an IPv4 packet; the kernel routes it by `dst` (normally its header's destination).
    pub fn send(&self, packet: &[u8], dst: Ipv4Addr) -> io::Result<usize> {
        send_to(&self.fd, packet, dst)
    }

    /// Sends up to [`MAX_SEND_MANY`] packets to `dst` with one `sendmmsg(2)`; returns how many
    /// the kernel took (it stops at the first it refuses, whose error is returned if it was
    /// the first).
    pub fn send_many(&self, packets: &[Vec<u8>], dst: Ipv4Addr) -> io::Result<usize> {
        let packets = &packets[..packets.len().min(MAX_SEND_MANY)];
        let mut sa = sockaddr_in(dst);
        let name: *mut libc::c_void = std::ptr::from_mut(&mut sa).cast();
        let mut iov: Vec<libc::iovec> = packets
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr().cast_mut().cast(),
                iov_len: p.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
                let mut m: libc::mmsghdr = unsafe { zeroed() };
                m.msg_hdr.msg_name = name;
                m.msg_hdr.msg_namelen = socklen::<libc::sockaddr_in>();
                m.msg_hdr.msg_iov = std::ptr::from_mut(v);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let count = u32::try_from(msgs.len()).expect("at most MAX_SEND_MANY");
        // SAFETY: every mmsghdr points at `sa` and at one iovec of `iov`, whose buffers are
        // the caller's packets; all of them outlive the call, and `count` is `msgs.len()`.
        // The kernel only reads the buffers (and writes each msg_len).
        let n = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), count, 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// Packets per [`RawIpSender::send_many`] call.
pub const MAX_SEND_MANY: usize = 64;

/// A raw socket of one IP protocol; the kernel writes the IP header.
#[derive(Debug)]
pub struct RawProtoSender {
    fd: OwnedFd,
}

impl RawProtoSender {
    pub fn new(proto: u8) -> io::Result<Self> {
        Ok(RawProtoSender {
            fd: new_socket(libc::AF_INET, libc::SOCK_RAW, libc::c_int::from(proto))?,
        })
    }

    pub fn send(&self, payload: &[u8], dst: Ipv4Addr) -> io::Result<usize> {
        send_to(&self.fd, payload, dst)
    }
}

/// A TCP segment seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpFrame {
    /// Ethernet source MAC.
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

impl TcpFrame {
    /// Whether exactly SYN and ACK (of SYN, ACK, RST, FIN) are set.
    pub fn is_syn_ack(&self) -> bool {
        self.flags & (flags::SYN | flags::ACK | flags::RST | flags::FIN) == flags::SYN | flags::ACK
    }
}

/// Formats a MAC address.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses an Ethernet frame carrying IPv4/TCP.
pub fn parse_tcp_frame(frame: &[u8]) -> Option<TcpFrame> {
    const ETH_LEN: usize = 14;
    if frame.len() < ETH_LEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip[9] != PROTO_TCP || ip.len() < ihl + 20 {
        return None;
    }
    let tcp = &ip[ihl..];
    let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some(TcpFrame {
        src_mac: frame[6..12].try_into().ok()?,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: word(&tcp[4..8]),
        ack: word(&tcp[8..12]),
        flags: tcp[13],
    })
}

/// An AF_PACKET capture of the frames an interface *receives* (outgoing ones are skipped).
#[derive(Debug)]
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    /// Opens a capture on `iface` with a receive timeout.
    pub fn open(iface: &str, timeout: Duration) -> io::Result<Self> {
        let eth_p_all = u16::try_from(libc::ETH_P_ALL).expect("0x0003").to_be();
        let fd = new_socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            libc::c_int::from(eth_p_all),
        )?;
        let name = std::ffi::CString::new(iface)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
        // SAFETY: `name` is a valid NUL-terminated string for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).expect("17");
        sll.sll_protocol = eth_p_all;
        sll.sll_ifindex = i32::try_from(ifindex).expect("ifindex fits");
        // SAFETY: `sll` is live and its size is passed with it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                socklen::<libc::sockaddr_ll>(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // SAFETY: `tv` is live and its size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&tv).cast(),
                socklen::<libc::timeval>(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Capture { fd })
    }

    /// Sets the socket's receive buffer to `bytes`, past `rmem_max` (SO_RCVBUFFORCE: root),
    /// so that a capture of a busy interface loses no frames while its reader is descheduled.
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: `v` is live and its size is passed with it; the fd is open.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::from_ref(&v).cast(),
                socklen::<libc::c_int>(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sends `frame` (a whole Ethernet frame) out of the interface the capture is bound to,
    /// as if the host at its other end had received it from the wire.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is live for the call, with its length; the fd is open and bound.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        match usize::try_from(n) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "sent {n} of {} bytes",
                frame.len()
            ))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }

    /// Next received frame into `buf`; `None` on timeout.
    pub fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<Option<&'b [u8]>> {
        loop {
            // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
            let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
            let mut len = socklen::<libc::sockaddr_ll>();
            // SAFETY: `buf`, `sll` and `len` are live for the call, with their sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    std::ptr::from_mut(&mut sll).cast(),
                    &mut len,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            };
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(&buf[..n]));
        }
    }
}

/// SYN/ACKs a client received, by (client port, acknowledged ISN + 1): the source MACs of the
/// nodes that sent one.
pub type SynAcksSeen = std::collections::BTreeMap<(u16, u32), std::collections::BTreeSet<String>>;

/// Records every SYN/ACK from `vip` that namespace `ns` receives on eth0 until `stop` is set.
/// The capture sees frames before the input hook, so SYN/ACKs a drop rule discards count too.
pub fn capture_synacks(
    ns: &str,
    vip: Ipv4Addr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Result<io::Result<SynAcksSeen>, crate::netns::NetnsError>> {
    crate::netns::spawn_in(ns, move || {
        let cap = Capture::open("eth0", Duration::from_millis(50))?;
        let mut seen = SynAcksSeen::new();
        let mut buf = vec![0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(f) = cap.recv(&mut buf)?.and_then(parse_tcp_frame) {
                if f.is_syn_ack() && f.src == vip {
                    seen.entry((f.dport, f.ack))
                        .or_default()
                        .insert(mac_string(&f.src_mac));
                }
            }
        }
        Ok(seen)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let syn = Syn {
            src: Ipv4Addr::new(192, 0, 2, 101),
            dst: Ipv4Addr::new(192, 0, 2, 1),
            sport: 40000,
            dport: 80,
            seq: 0x0102_0304,
            payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        };
        let pkt = syn.ipv4_packet();
        // A correct checksum sums (with the field in place) to zero.
        assert_eq!(checksum(&pkt[..20]), 0);
        assert_eq!(tcp_checksum_v4(syn.src, syn.dst, &pkt[20..]), 0);
        assert_eq!(pkt[20 + 13], flags::SYN);
        assert_eq!(pkt[20 + 12] >> 4, 6);
    }

    #[test]
    fn parses_a_syn_ack_frame() {
        let mut frame = vec![0u8; 14];
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut seg = Syn {
            src: Ipv4Addr::new(192, 0, 2, 1),
            dst: Ipv4Addr::new(192, 0, 2, 101),
            sport: 80,
            dport: 40000,
            seq: 7,
            payload: vec![],
        }
        .segment();
        seg[13] = flags::SYN | flags::ACK;
        frame.extend(ipv4_packet(
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(192, 0, 2, 101),
            PROTO_TCP,
            &seg,
        ));
        let f = parse_tcp_frame(&frame).unwrap();
        assert!(f.is_syn_ack());
        assert_eq!((f.sport, f.dport, f.seq), (80, 40000, 7));
        assert_eq!(mac_string(&f.src_mac), "02:00:00:00:00:02");
    }
}
