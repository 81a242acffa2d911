//! The proto-253 forward: how the master hands a client's SYN to another node.
//!
//! A forwarded SYN travels as the payload of an IPv4/IPv6 packet with protocol number
//! [`FORWARD_PROTO`] (253, reserved for experimentation by RFC 3692). The outer IP header is
//! written by the kernel (a raw socket without `IP_HDRINCL`); its source is the master's
//! cluster address. The payload is this header, then the client's TCP segment, byte for
//! byte as the master received it (TCP header, options and any payload such as TCP Fast Open
//! data), then a 16-byte tag:
//!
//! ```text
//!  0       1       2       3
//! +-------+-------+-------+-------+
//! |  ver  |  fam  |    hdr_len    |   ver = 2; fam = 4 or 6; hdr_len = bytes before the segment
//! +-------+-------+-------+-------+
//! |          term (u64)           |   election term of the master that dispatched it
//! |                               |
//! +-------+-------+-------+-------+
//! |        origin node id         |   node id of the dispatching master (u32)
//! +-------+-------+-------+-------+
//! |     counter (u64, per origin) |   the origin's forward counter: never repeats
//! |                               |
//! +-------+-------+-------+-------+
//! | keyid |     zero (3 bytes)    |   the keyring key the tag was made with
//! +-------+-------+-------+-------+
//! |  client address (4 or 16)     |
//! +-------------------------------+
//! |  VIP (4 or 16)                |
//! +-------------------------------+
//! |  TCP segment ...              |
//! +-------------------------------+
//! |  tag (16)                     |   GMAC over everything above, under the forward key
//! +-------------------------------+
//! ```
//!
//! All integers are big-endian. The tag is [`Keyring::forward_tag`] (AES-256-GCM with an empty
//! plaintext, nonce `origin ‖ counter`, under a key derived from the cluster key for forwards
//! only): it binds the term, the origin, the counter, both addresses and the whole segment, so a
//! host on the cluster network without the key can neither forge a forward nor alter one, and a
//! receiver that keeps a replay window per origin (see `tdscd::datapath::receive`) refuses a
//! captured one sent again.
//!
//! The codec is sans-IO: [`ForwardHeader::encode_packet`] writes into a caller-provided buffer
//! (the master's hot path never allocates) and [`ForwardPacket::decode`] borrows from the
//! received buffer. Decoding does not verify the tag; [`ForwardPacket::verify`] does, and a
//! receiver trusts no field but the origin's claimed id (to pick the peer) before it has.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::seal::{Keyring, Reject, TAG_LEN};

/// IP protocol number of forwarded SYNs. RFC 3692 reserves 253 and 254 for experimentation
/// and testing; the TCP-DSC paper (§4.2.1) uses 253.
pub const FORWARD_PROTO: u8 = 253;

/// The only header version this build speaks. A receiver rejects any other. (Version 1 had
/// no counter, key id or tag.)
pub const VERSION: u8 = 2;

/// Fixed part of the header: version, family, length, term, origin, counter, key id, zeros.
const FIXED_LEN: usize = 1 + 1 + 2 + 8 + 4 + 8 + 1 + 3;

/// A TCP header is at least 20 bytes (RFC 9293 §3.1).
const TCP_MIN_HEADER: usize = 20;

/// Largest header: the fixed part and two IPv6 addresses.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + 2 * 16;

/// What a forward adds to the segment at most: the largest header and the tag. A buffer for
/// forwards holds this plus the largest segment.
pub const MAX_OVERHEAD: usize = MAX_HEADER_LEN + TAG_LEN;

/// Why a forward packet was refused. Each variant is a separate counter in `tdscctl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {len} bytes is shorter than its header and tag")]
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
    #[error("reserved header bytes are not zero")]
    Reserved,
}

/// Why a forward could not be written.
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
    /// Election term (or static epoch) of the dispatching master: a receiver refuses forwards
    /// from a deposed master, and keeps its replay window per origin and term.
    pub term: u64,
    /// Node id of the dispatching master.
    pub origin: u32,
    /// The origin's forward counter: the tag's nonce, so it never repeats under one key (the
    /// master's counter starts at the wall clock, see `tdsc_proto::seal::SendCounter`), and
    /// the receiver's replay window refuses a value seen before.
    pub counter: u64,
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

    /// Writes the header, naming key `key_id`, to the front of `buf` and returns its length.
    /// The caller copies the TCP segment right after it.
    pub fn encode_into(&self, key_id: u8, buf: &mut [u8]) -> Result<usize, EncodeError> {
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
        // `need` is at most MAX_HEADER_LEN (60), so it fits in a u16.
        let need16 = u16::try_from(need).expect("header length fits in u16");
        buf[2..4].copy_from_slice(&need16.to_be_bytes());
        buf[4..12].copy_from_slice(&self.term.to_be_bytes());
        buf[12..16].copy_from_slice(&self.origin.to_be_bytes());
        buf[16..24].copy_from_slice(&self.counter.to_be_bytes());
        buf[24] = key_id;
        buf[25..28].fill(0);
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

    /// Writes header and segment, without the tag, into `buf`; returns their length. This is
    /// the part the tag covers; [`Self::encode_packet`] is this and the tag. (Public for the
    /// benchmark that measures what the tag costs, and for tests that craft bad tags.)
    pub fn encode_untagged(
        &self,
        key_id: u8,
        segment: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let hdr = self.encode_into(key_id, buf)?;
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

    /// Encodes header, segment and the tag made with `ring`'s sending key into `buf`,
    /// returning the number of bytes to send. Does not allocate.
    pub fn encode_packet(
        &self,
        segment: &[u8],
        ring: &Keyring,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let body = self.encode_untagged(ring.send_id(), segment, buf)?;
        let need = body + TAG_LEN;
        if buf.len() < need {
            return Err(EncodeError::BufferTooSmall {
                have: buf.len(),
                need,
            });
        }
        let (key_id, tag) = ring.forward_tag(self.origin, self.counter, &buf[..body]);
        debug_assert_eq!(key_id, ring.send_id(), "the header names the sending key");
        buf[body..need].copy_from_slice(&tag);
        Ok(need)
    }
}

/// A decoded forward packet, borrowing the carried segment from the receive buffer. Not yet
/// authentic: call [`ForwardPacket::verify`] before trusting any field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardPacket<'a> {
    pub header: ForwardHeader,
    /// The keyring key the tag claims to be made with.
    pub key_id: u8,
    /// The client's TCP segment (header, options, payload). Its checksum is *not* trusted: the
    /// master may have captured it with only a partial checksum (CHECKSUM_PARTIAL on veth).
    pub segment: &'a [u8],
    /// Header and segment: what the tag covers.
    authenticated: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

impl<'a> ForwardPacket<'a> {
    /// Decodes the payload of a protocol-253 packet (the outer IP header already removed).
    /// Checks that the segment is at least a well-formed TCP header; whether it is a SYN for
    /// this node's VIP is the receiver's policy, not the codec's. Does not check the tag.
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() < FIXED_LEN + TAG_LEN {
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
        if buf.len() < hdr_len + TAG_LEN {
            return Err(DecodeError::Truncated { len: buf.len() });
        }
        if buf[25..28] != [0, 0, 0] {
            return Err(DecodeError::Reserved);
        }
        let term = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
        let origin = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
        let counter = u64::from_be_bytes(buf[16..24].try_into().expect("8 bytes"));
        let key_id = buf[24];
        let a = FIXED_LEN;
        let (client, vip) = if alen == 4 {
            (
                IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&buf[a..a + 4]).expect("4"),
                )),
                IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&buf[a + 4..a + 8]).expect("4"),
                )),
            )
        } else {
            (
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&buf[a..a + 16]).expect("16"),
                )),
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&buf[a + 16..a + 32]).expect("16"),
                )),
            )
        };
        let (authenticated, tag) = buf.split_at(buf.len() - TAG_LEN);
        let tag: &[u8; TAG_LEN] = tag.try_into().expect("TAG_LEN bytes");
        let segment = &authenticated[hdr_len..];
        check_tcp(segment)?;
        Ok(ForwardPacket {
            header: ForwardHeader {
                term,
                origin,
                counter,
                client,
                vip,
            },
            key_id,
            segment,
            authenticated,
            tag,
        })
    }

    /// Verifies the tag with `ring` (in constant time): the forward was made by a holder of
    /// the cluster key and not altered. Whether its counter is new is the caller's replay
    /// window's to say.
    pub fn verify(&self, ring: &Keyring) -> Result<(), Reject> {
        ring.verify_forward(
            self.key_id,
            self.header.origin,
            self.header.counter,
            self.authenticated,
            self.tag,
        )
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
    use crate::seal::KEY_LEN;

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

    fn ring() -> Keyring {
        Keyring::new(&[(3, [9; KEY_LEN])], None).unwrap()
    }

    fn v4() -> ForwardHeader {
        ForwardHeader {
            term: 7,
            origin: 1,
            counter: 1_000,
            client: "192.0.2.101".parse().unwrap(),
            vip: "192.0.2.1".parse().unwrap(),
        }
    }

    fn v6() -> ForwardHeader {
        ForwardHeader {
            term: u64::MAX,
            origin: u32::MAX,
            counter: u64::MAX,
            client: "2001:db8::65".parse().unwrap(),
            vip: "2001:db8::1".parse().unwrap(),
        }
    }

    #[test]
    fn round_trip_v4_and_v6_with_payload_and_tag() {
        let r = ring();
        for h in [v4(), v6()] {
            let mut seg = syn();
            seg.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n"); // TFO data rides along
            let mut buf = [0u8; 256];
            let n = h.encode_packet(&seg, &r, &mut buf).unwrap();
            assert_eq!(n, h.len() + seg.len() + TAG_LEN);
            let p = ForwardPacket::decode(&buf[..n]).unwrap();
            assert_eq!(p.header, h);
            assert_eq!(p.key_id, 3);
            assert_eq!(p.segment, &seg[..]);
            assert_eq!(p.verify(&r), Ok(()));
        }
    }

    #[test]
    fn decode_then_encode_is_identity() {
        let r = ring();
        let mut wire = vec![2u8, 4, 0, 36];
        wire.extend_from_slice(&42u64.to_be_bytes());
        wire.extend_from_slice(&3u32.to_be_bytes());
        wire.extend_from_slice(&77u64.to_be_bytes());
        wire.extend_from_slice(&[3, 0, 0, 0]);
        wire.extend_from_slice(&[192, 0, 2, 101, 192, 0, 2, 1]);
        wire.extend_from_slice(&syn());
        let (_, tag) = r.forward_tag(3, 77, &wire);
        wire.extend_from_slice(&tag);
        let p = ForwardPacket::decode(&wire).unwrap();
        assert_eq!(
            (p.header.term, p.header.origin, p.header.counter),
            (42, 3, 77)
        );
        assert_eq!(p.verify(&r), Ok(()));
        let mut again = [0u8; 128];
        let n = p.header.encode_packet(p.segment, &r, &mut again).unwrap();
        assert_eq!(&again[..n], &wire[..]);
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let r = ring();
        for h in [v4(), v6()] {
            let mut buf = [0u8; 256];
            let n = h.encode_packet(&syn(), &r, &mut buf).unwrap();
            let good = buf[..n].to_vec();
            for i in 0..n {
                for bit in 0..8 {
                    let mut w = good.clone();
                    w[i] ^= 1 << bit;
                    // Either the codec refuses it, or the tag does; never both pass.
                    let authentic = ForwardPacket::decode(&w).map(|p| p.verify(&r));
                    assert!(
                        !matches!(authentic, Ok(Ok(()))),
                        "{h:?}: byte {i} bit {bit} flipped and still accepted"
                    );
                }
            }
        }
    }

    #[test]
    fn tags_bind_the_key() {
        let mut buf = [0u8; 256];
        let n = v4().encode_packet(&syn(), &ring(), &mut buf).unwrap();
        let p = ForwardPacket::decode(&buf[..n]).unwrap();
        // Another key under the same id: a forger's key.
        let forger = Keyring::new(&[(3, [8; KEY_LEN])], None).unwrap();
        assert_eq!(p.verify(&forger), Err(Reject::BadTag));
        // A keyring without that id.
        let other = Keyring::new(&[(4, [9; KEY_LEN])], None).unwrap();
        assert_eq!(p.verify(&other), Err(Reject::UnknownKey));
        // An untagged forward with a zero tag appended is refused.
        let mut forged = [0u8; 256];
        let m = v4().encode_untagged(3, &syn(), &mut forged).unwrap();
        let p = ForwardPacket::decode(&forged[..m + TAG_LEN]).unwrap();
        assert_eq!(p.verify(&ring()), Err(Reject::BadTag));
    }

    #[test]
    fn every_truncation_is_rejected() {
        let r = ring();
        let mut buf = [0u8; 128];
        let n = v6().encode_packet(&syn(), &r, &mut buf).unwrap();
        for cut in 0..n {
            let authentic = ForwardPacket::decode(&buf[..cut]).map(|p| p.verify(&r));
            assert!(
                !matches!(authentic, Ok(Ok(()))),
                "accepted a packet cut to {cut} of {n} bytes"
            );
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        let mut buf = [0u8; 128];
        let n = v4().encode_packet(&syn(), &ring(), &mut buf).unwrap();
        let good = buf[..n].to_vec();
        let seg_at = v4().len();

        let mut bad = good.clone();
        bad[0] = 1;
        assert_eq!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadVersion { version: 1 })
        );
        let mut bad = good.clone();
        bad[1] = 5;
        assert_eq!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadFamily { family: 5 })
        );
        let mut bad = good.clone();
        bad[3] = 60; // claims IPv6 length on an IPv4 header
        assert!(matches!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadHeaderLength { .. })
        ));
        let mut bad = good.clone();
        bad[26] = 1;
        assert_eq!(ForwardPacket::decode(&bad), Err(DecodeError::Reserved));
        let mut bad = good.clone();
        bad[seg_at + 12] = 15 << 4; // data offset 60 beyond a 20-byte segment
        assert!(matches!(
            ForwardPacket::decode(&bad),
            Err(DecodeError::BadSegment { .. })
        ));
        let mut bad = good;
        bad[seg_at + 12] = 2 << 4; // data offset 8 < 20
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
            h.encode_into(1, &mut [0u8; 64]),
            Err(EncodeError::MixedFamilies)
        );
        assert_eq!(
            v4().encode_into(1, &mut [0u8; 10]),
            Err(EncodeError::BufferTooSmall { have: 10, need: 36 })
        );
        // Room for header and segment but not the tag.
        let need = v4().len() + 20;
        assert_eq!(
            v4().encode_packet(&syn(), &ring(), &mut [0u8; 64][..need]),
            Err(EncodeError::BufferTooSmall {
                have: need,
                need: need + TAG_LEN
            })
        );
    }
}
