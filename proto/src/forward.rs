//! The proto-253 forward header: how the master hands a client's SYN to another node.
//!
//! A forwarded SYN travels as the payload of an IPv4/IPv6 packet with protocol number
//! [`FORWARD_PROTO`] (253, reserved for experimentation by RFC 3692). The outer IP header is
//! written by the kernel (a raw socket without `IP_HDRINCL`); its source is the master's
//! cluster address. The payload is this header followed by the client's TCP segment, byte for
//! byte as the master received it (TCP header, options and any payload such as TCP Fast Open
//! data):
//!
//! ```text
//!  0       1       2       3
//! +-------+-------+-------+-------+
//! |  ver  |  fam  |    hdr_len    |   ver = 1; fam = 4 or 6; hdr_len = bytes before the segment
//! +-------+-------+-------+-------+
//! |          term (u64)           |   election term of the master that dispatched it
//! |                               |
//! +-------+-------+-------+-------+
//! |        origin node id         |   node id of the dispatching master (u32)
//! +-------+-------+-------+-------+
//! |  client address (4 or 16)     |
//! +-------------------------------+
//! |  VIP (4 or 16)                |
//! +-------------------------------+
//! |  TCP segment ...              |
//! ```
//!
//! All integers are big-endian. The codec is sans-IO: [`ForwardHeader::encode_into`] writes
//! into a caller-provided buffer (the master's hot path never allocates) and
//! [`ForwardPacket::decode`] borrows from the received buffer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of forwarded SYNs. RFC 3692 reserves 253 and 254 for experimentation
/// and testing; the TCP-DSC paper (§4.2.1) uses 253.
pub const FORWARD_PROTO: u8 = 253;

/// The only header version this build speaks. A receiver rejects any other.
pub const VERSION: u8 = 1;

/// Fixed part of the header: version, family, length, term, origin.
const FIXED_LEN: usize = 1 + 1 + 2 + 8 + 4;

/// A TCP header is at least 20 bytes (RFC 9293 §3.1).
const TCP_MIN_HEADER: usize = 20;

/// Largest header: the fixed part and two IPv6 addresses.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + 2 * 16;

/// Why a forward packet was refused. Each variant is a separate counter in `tdscctl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {len} bytes is shorter than its header")]
    Truncated { len: usize },
    #[error("unsupported forward header version {version}")]
    BadVersion { version: u8 },
    #[error("unknown address family {family}")]
    BadFamily { family: u8 },
    #[error("header length {hdr_len} does not match family {family}")]
    BadHeaderLength { family: u8, hdr_len: u16 },
    #[error("carried TCP segment of {len} bytes is malformed")]
    BadSegment { len: usize },
    #[error("client and VIP addresses are of different families")]
    MixedFamilies,
}

/// Why a header could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("client and VIP addresses are of different families")]
    MixedFamilies,
    #[error("buffer of {have} bytes cannot hold {need}")]
    BufferTooSmall { have: usize, need: usize },
}

/// The metadata that travels in front of a forwarded segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardHeader {
    /// Election term (or static epoch) of the dispatching master. Reserved for the election:
    /// a receiver can refuse forwards from a deposed master.
    pub term: u64,
    /// Node id of the dispatching master.
    pub origin: u32,
    /// The client's address: the source of the re-injected SYN.
    pub client: IpAddr,
    /// The cluster address the client connected to: the destination of the re-injected SYN.
    pub vip: IpAddr,
}

impl ForwardHeader {
    /// Encoded length of this header.
    pub fn len(&self) -> usize {
        FIXED_LEN + 2 * addr_len(&self.client)
    }

    /// A header is never empty; provided for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the header to the front of `buf` and returns its length. The caller copies the
    /// TCP segment right after it.
    pub fn encode_into(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        let family = match (self.client, self.vip) {
            (IpAddr::V4(_), IpAddr::V4(_)) => 4,
            (IpAddr::V6(_), IpAddr::V6(_)) => 6,
            _ => return Err(EncodeError::MixedFamilies),
        };
        let need = self.len();
        if buf.len() < need {
            return Err(EncodeError::BufferTooSmall {
                have: buf.len(),
                need,
            });
        }
        buf[0] = VERSION;
        buf[1] = family;
        // `need` is at most MAX_HEADER_LEN (48), so it fits in a u16.
        let need16 = u16::try_from(need).expect("header length fits in u16");
        buf[2..4].copy_from_slice(&need16.to_be_bytes());
        buf[4..12].copy_from_slice(&self.term.to_be_bytes());
        buf[12..16].copy_from_slice(&self.origin.to_be_bytes());
        let mut at = FIXED_LEN;
        for addr in [self.client, self.vip] {
            match addr {
                IpAddr::V4(a) => {
                    buf[at..at + 4].copy_from_slice(&a.octets());
                    at += 4;
                }
                IpAddr::V6(a) => {
                    buf[at..at + 16].copy_from_slice(&a.octets());
                    at += 16;
                }
            }
        }
        Ok(need)
    }

    /// Encodes header and segment into `buf`, returning the number of bytes to send.
    pub fn encode_packet(&self, segment: &[u8], buf: &mut [u8]) -> Result<usize, EncodeError> {
        let hdr = self.encode_into(buf)?;
        let need = hdr + segment.len();
        if buf.len() < need {
            return Err(EncodeError::BufferTooSmall {
                have: buf.len(),
                need,
            });
        }
        buf[hdr..need].copy_from_slice(segment);
        Ok(need)
    }
}

/// A decoded forward packet, borrowing the carried segment from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardPacket<'a> {
    pub header: ForwardHeader,
    /// The client's TCP segment (header, options, payload). Its checksum is *not* trusted: the
    /// master may have captured it with only a partial checksum (CHECKSUM_PARTIAL on veth).
    pub segment: &'a [u8],
}

impl<'a> ForwardPacket<'a> {
    /// Decodes the payload of a protocol-253 packet (the outer IP header already removed).
    /// Checks that the segment is at least a well-formed TCP header; whether it is a SYN for
    /// this node's VIP is the receiver's policy, not the codec's.
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() < FIXED_LEN {
            return Err(DecodeError::Truncated { len: buf.len() });
        }
        if buf[0] != VERSION {
            return Err(DecodeError::BadVersion { version: buf[0] });
        }
        let family = buf[1];
        let alen = match family {
            4 => 4,
            6 => 16,
            _ => return Err(DecodeError::BadFamily { family }),
        };
        let hdr_len = u16::from_be_bytes([buf[2], buf[3]]);
        if usize::from(hdr_len) != FIXED_LEN + 2 * alen {
            return Err(DecodeError::BadHeaderLength { family, hdr_len });
        }
        let hdr_len = usize::from(hdr_len);
        if buf.len() < hdr_len {
            return Err(DecodeError::Truncated { len: buf.len() });
        }
        let term = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
        let origin = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
        let (client, vip) = if alen == 4 {
            (
                IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&buf[16..20]).expect("4"),
                )),
                IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&buf[20..24]).expect("4"),
                )),
            )
        } else {
            (
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&buf[16..32]).expect("16"),
                )),
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&buf[32..48]).expect("16"),
                )),
            )
        };
        let segment = &buf[hdr_len..];
        check_tcp(segment)?;
        Ok(ForwardPacket {
            header: ForwardHeader {
                term,
                origin,
                client,
                vip,
            },
            segment,
        })
    }
}

/// A TCP segment must hold a full header whose data offset lies within the segment.
fn check_tcp(seg: &[u8]) -> Result<(), DecodeError> {
    if seg.len() < TCP_MIN_HEADER {
        return Err(DecodeError::BadSegment { len: seg.len() });
    }
    let data_offset = usize::from(seg[12] >> 4) * 4;
    if data_offset < TCP_MIN_HEADER || data_offset > seg.len() {
        return Err(DecodeError::BadSegment { len: seg.len() });
    }
    Ok(())
}

fn addr_len(a: &IpAddr) -> usize {
    match a {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal SYN: ports 40000 → 80, seq 1, data offset 5, flags SYN.
    fn syn() -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[4..8].copy_from_slice(&1u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02;
        t
    }

    fn v4() -> ForwardHeader {
        ForwardHeader {
            term: 7,
            origin: 1,
            client: "192.0.2.101".parse().unwrap(),
            vip: "192.0.2.1".parse().unwrap(),
        }
    }

    fn v6() -> ForwardHeader {
        ForwardHeader {
            term: u64::MAX,
            origin: u32::MAX,
            client: "2001:db8::65".parse().unwrap(),
            vip: "2001:db8::1".parse().unwrap(),
        }
    }

    #[test]
    fn round_trip_v4_and_v6_with_payload() {
        for h in [v4(), v6()] {
            let mut seg = syn();
            seg.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n"); // TFO data rides along
            let mut buf = [0u8; 256];
            let n = h.encode_packet(&seg, &mut buf).unwrap();
            assert_eq!(n, h.len() + seg.len());
            let p = ForwardPacket::decode(&buf[..n]).unwrap();
            assert_eq!(p.header, h);
            assert_eq!(p.segment, &seg[..]);
        }
    }

    #[test]
    fn decode_then_encode_is_identity() {
        let mut wire = vec![1u8, 4, 0, 24];
        wire.extend_from_slice(&42u64.to_be_bytes());
        wire.extend_from_slice(&3u32.to_be_bytes());
        wire.extend_from_slice(&[192, 0, 2, 101, 192, 0, 2, 1]);
        wire.extend_from_slice(&syn());
        let p = ForwardPacket::decode(&wire).unwrap();
        assert_eq!(p.header.term, 42);
        assert_eq!(p.header.origin, 3);
        let mut again = [0u8; 64];
        let n = p.header.encode_packet(p.segment, &mut again).unwrap();
        assert_eq!(&again[..n], &wire[..]);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let mut buf = [0u8; 128];
        let n = v6().encode_packet(&syn(), &mut buf).unwrap();
        for cut in 0..n {
            assert!(
                ForwardPacket::decode(&buf[..cut]).is_err(),
                "accepted a packet cut to {cut} of {n} bytes"
            );
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        let mut buf = [0u8; 64];
        let n = v4().encode_packet(&syn(), &mut buf).unwrap();
        let good = buf[..n].to_vec();

        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadVersion { version: 2 })
        );
        let mut bad = good.clone();
        bad[1] = 5;
        assert_eq!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadFamily { family: 5 })
        );
        let mut bad = good.clone();
        bad[3] = 48; // claims IPv6 length on an IPv4 header
        assert!(matches!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadHeaderLength { .. })
        ));
        let mut bad = good.clone();
        bad[24 + 12] = 15 << 4; // data offset 60 beyond a 20-byte segment
        assert!(matches!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadSegment { .. })
        ));
        let mut bad = good;
        bad[24 + 12] = 2 << 4; // data offset 8 < 20
        assert!(matches!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadSegment { .. })
        ));
        // Pseudo-random garbage never panics.
        let mut x: u32 = 0x1234_5678;
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x.to_be_bytes()[0]
                })
                .collect();
            let _ = ForwardPacket::decode(&junk);
        }
    }

    #[test]
    fn encode_refuses_mixed_families_and_small_buffers() {
        let mut h = v4();
        h.vip = "2001:db8::1".parse().unwrap();
        assert_eq!(
            h.encode_into(&mut [0u8; 64]),
            Err(EncodeError::MixedFamilies)
        );
        assert_eq!(
            v4().encode_into(&mut [0u8; 10]),
            Err(EncodeError::BufferTooSmall { have: 10, need: 24 })
        );
    }
}
