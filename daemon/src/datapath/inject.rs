//! Building the packet that re-injects a forwarded SYN into the local TCP stack. Sans-IO.
//!
//! A member writes the client's SYN to an `IPPROTO_RAW` socket, with an IP header of its own
//! making: source = the client, destination = the VIP. The kernel routes it to the local
//! stack via `lo`, and the listener answers the client directly out of the client interface.
//!
//! The TCP checksum is always recomputed. The master may have captured the segment with only
//! a partial checksum (CHECKSUM_PARTIAL on a veth, or GSO), and a wrong checksum makes the
//! receiving stack drop the SYN silently (`nstat` counts `TcpInCsumErrors`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Largest packet we build: an IP header and a TCP segment that fit in a 64 KiB datagram.
pub const MAX_PACKET: usize = 65535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("segment of {len} bytes does not fit in one IP packet")]
    TooLong { len: usize },
    #[error("client and VIP addresses are of different families")]
    MixedFamilies,
    #[error("buffer too small")]
    BufferTooSmall,
}

/// RFC 1071 one's-complement sum, folded later.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves acc <= 0xffff.
    !(u16::try_from(acc).unwrap_or(0xffff))
}

/// The TCP checksum of `segment` (checksum field taken as zero) between `src` and `dst`.
pub fn tcp_checksum(src: &IpAddr, dst: &IpAddr, segment: &[u8]) -> u16 {
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum16(sum16(0, &s.octets()), &d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum16(sum16(0, &s.octets()), &d.octets()),
        _ => 0,
    };
    acc += 6; // protocol TCP
              // Segments are bounded by MAX_PACKET, so the length fits in u32.
    acc += u32::try_from(segment.len()).unwrap_or(u32::MAX);
    if segment.len() >= 18 {
        acc = sum16(acc, &segment[..16]);
        acc = sum16(acc, &segment[18..]);
    } else {
        acc = sum16(acc, segment);
    }
    fold(acc)
}

/// Writes IP header + segment (with a fresh TCP checksum) into `buf`; returns the length.
pub fn build(
    client: IpAddr,
    vip: IpAddr,
    segment: &[u8],
    buf: &mut [u8],
) -> Result<usize, InjectError> {
    match (client, vip) {
        (IpAddr::V4(c), IpAddr::V4(v)) => build_v4(c, v, segment, buf),
        (IpAddr::V6(c), IpAddr::V6(v)) => build_v6(c, v, segment, buf),
        _ => Err(InjectError::MixedFamilies),
    }
}

fn build_v4(
    client: Ipv4Addr,
    vip: Ipv4Addr,
    segment: &[u8],
    buf: &mut [u8],
) -> Result<usize, InjectError> {
    let total = 20 + segment.len();
    let total16 = u16::try_from(total).map_err(|_| InjectError::TooLong { len: segment.len() })?;
    if buf.len() < total {
        return Err(InjectError::BufferTooSmall);
    }
    let h = &mut buf[..20];
    h[0] = 0x45; // version 4, 5-word header
    h[1] = 0;
    h[2..4].copy_from_slice(&total16.to_be_bytes());
    h[4..6].copy_from_slice(&[0, 0]); // id: the kernel fills it in for IP_HDRINCL when zero
    h[6..8].copy_from_slice(&[0x40, 0]); // DF, as the client's SYN had in practice
    h[8] = 64;
    h[9] = 6;
    h[10..12].copy_from_slice(&[0, 0]); // header checksum: always filled in by the kernel
    h[12..16].copy_from_slice(&client.octets());
    h[16..20].copy_from_slice(&vip.octets());
    buf[20..total].copy_from_slice(segment);
    let ck = tcp_checksum(&IpAddr::V4(client), &IpAddr::V4(vip), segment);
    buf[20 + 16..20 + 18].copy_from_slice(&ck.to_be_bytes());
    Ok(total)
}

fn build_v6(
    client: Ipv6Addr,
    vip: Ipv6Addr,
    segment: &[u8],
    buf: &mut [u8],
) -> Result<usize, InjectError> {
    let plen =
        u16::try_from(segment.len()).map_err(|_| InjectError::TooLong { len: segment.len() })?;
    let total = 40 + segment.len();
    if buf.len() < total {
        return Err(InjectError::BufferTooSmall);
    }
    let h = &mut buf[..40];
    h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    h[4..6].copy_from_slice(&plen.to_be_bytes());
    h[6] = 6;
    h[7] = 64;
    h[8..24].copy_from_slice(&client.octets());
    h[24..40].copy_from_slice(&vip.octets());
    buf[40..total].copy_from_slice(segment);
    let ck = tcp_checksum(&IpAddr::V6(client), &IpAddr::V6(vip), segment);
    buf[40 + 16..40 + 18].copy_from_slice(&ck.to_be_bytes());
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::tcp::{ipv4_checksum, ipv6_checksum, TcpPacket};

    fn segment(payload: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 24];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[4..8].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        t[12] = 6 << 4;
        t[13] = 0x02;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t[16..18].copy_from_slice(&[0xab, 0xcd]); // a partial checksum, as captured off a veth
        t[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
        t.extend_from_slice(payload);
        t
    }

    #[test]
    fn v4_checksum_matches_pnet_for_odd_and_even_lengths() {
        let c: Ipv4Addr = "192.0.2.101".parse().unwrap();
        let v: Ipv4Addr = "192.0.2.1".parse().unwrap();
        for payload in [&b""[..], b"x", b"GET / HTTP/1.0\r\n\r\n", b"odd!!"] {
            let seg = segment(payload);
            let mut buf = [0u8; 256];
            let n = build(c.into(), v.into(), &seg, &mut buf).unwrap();
            assert_eq!(n, 20 + seg.len());
            let tcp = TcpPacket::new(&buf[20..n]).unwrap();
            assert_eq!(
                tcp.get_checksum(),
                ipv4_checksum(&tcp, &c, &v),
                "payload {payload:?}"
            );
            assert_ne!(tcp.get_checksum(), 0xabcd);
            assert_eq!(&buf[12..16], &c.octets());
            assert_eq!(&buf[16..20], &v.octets());
            assert_eq!(
                &buf[20 + 18..n],
                &seg[18..],
                "everything but the checksum is intact"
            );
        }
    }

    #[test]
    fn v6_checksum_matches_pnet() {
        let c: Ipv6Addr = "2001:db8::65".parse().unwrap();
        let v: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let seg = segment(b"tfo");
        let mut buf = [0u8; 256];
        let n = build(c.into(), v.into(), &seg, &mut buf).unwrap();
        let tcp = TcpPacket::new(&buf[40..n]).unwrap();
        assert_eq!(tcp.get_checksum(), ipv6_checksum(&tcp, &c, &v));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let seg = segment(b"");
        assert_eq!(
            build(
                "192.0.2.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                &seg,
                &mut [0u8; 100]
            ),
            Err(InjectError::MixedFamilies)
        );
        assert_eq!(
            build(
                "192.0.2.101".parse().unwrap(),
                "192.0.2.1".parse().unwrap(),
                &seg,
                &mut [0u8; 30]
            ),
            Err(InjectError::BufferTooSmall)
        );
    }
}
