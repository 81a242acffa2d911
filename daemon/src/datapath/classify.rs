//! SYN classification: what the master's queue consumer learns from one queued packet.
//!
//! The ruleset already queues only SYNs (SYN set; FIN, RST, ACK clear) for the VIP and the
//! dispatched ports, but the classifier checks again: the queue is a trust boundary of sorts
//! (a ruleset edited by hand, a future rule), and a wrong decision here would hand a segment
//! to the wrong node. It borrows from the packet and never allocates.

use std::net::IpAddr;

use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;
use pnet_packet::tcp::TcpPacket;

/// TCP flag bits (RFC 9293 §3.1) as they sit in header byte 13.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// A client's connection request, as the dispatcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syn<'a> {
    pub client: IpAddr,
    pub client_port: u16,
    pub vip: IpAddr,
    pub port: u16,
    /// The client's initial sequence number: a retransmitted SYN repeats it, a new connection
    /// on the same 4-tuple does not.
    pub isn: u32,
    /// The whole TCP segment (header, options, payload such as TCP Fast Open data).
    pub segment: &'a [u8],
}

/// Why a queued packet is not a SYN this node may dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not parseable as IPv4/IPv6 + TCP.
    Malformed,
    /// IP fragments or IPv6 extension headers before TCP: not a plain SYN.
    NotPlainTcp,
    /// Flags other than a bare SYN (SYN+ACK, SYN+RST, …).
    NotSyn,
    /// Not addressed to our VIP.
    WrongVip,
    /// Not one of the dispatched ports.
    WrongPort,
}

/// Classifies a packet as queued by NFQUEUE (starting at the IP header).
pub fn classify<'a>(pkt: &'a [u8], vip: IpAddr, ports: &[u16]) -> Result<Syn<'a>, Reject> {
    let version = pkt.first().ok_or(Reject::Malformed)? >> 4;
    let (client, dst, segment) = match version {
        4 => {
            let ip = Ipv4Packet::new(pkt).ok_or(Reject::Malformed)?;
            let ihl = usize::from(ip.get_header_length()) * 4;
            let total = usize::from(ip.get_total_length());
            if ihl < 20 || total < ihl || total > pkt.len() {
                return Err(Reject::Malformed);
            }
            // More-fragments flag or a fragment offset: only the first fragment has the TCP
            // header, and a SYN is never legitimately fragmented.
            if ip.get_flags() & 0b001 != 0 || ip.get_fragment_offset() != 0 {
                return Err(Reject::NotPlainTcp);
            }
            if ip.get_next_level_protocol() != IpNextHeaderProtocols::Tcp {
                return Err(Reject::NotPlainTcp);
            }
            (
                IpAddr::V4(ip.get_source()),
                IpAddr::V4(ip.get_destination()),
                &pkt[ihl..total],
            )
        }
        6 => {
            let ip = Ipv6Packet::new(pkt).ok_or(Reject::Malformed)?;
            let total = 40 + usize::from(ip.get_payload_length());
            if total > pkt.len() {
                return Err(Reject::Malformed);
            }
            if ip.get_next_header() != IpNextHeaderProtocols::Tcp {
                return Err(Reject::NotPlainTcp);
            }
            (
                IpAddr::V6(ip.get_source()),
                IpAddr::V6(ip.get_destination()),
                &pkt[40..total],
            )
        }
        _ => return Err(Reject::Malformed),
    };
    let tcp = TcpPacket::new(segment).ok_or(Reject::Malformed)?;
    let data_offset = usize::from(tcp.get_data_offset()) * 4;
    if data_offset < 20 || data_offset > segment.len() {
        return Err(Reject::Malformed);
    }
    if segment[13] & (FIN | SYN | RST | ACK) != SYN {
        return Err(Reject::NotSyn);
    }
    if dst != vip {
        return Err(Reject::WrongVip);
    }
    let port = tcp.get_destination();
    if !ports.is_empty() && ports.binary_search(&port).is_err() {
        return Err(Reject::WrongPort);
    }
    Ok(Syn {
        client,
        client_port: tcp.get_source(),
        vip: dst,
        port,
        isn: tcp.get_sequence(),
        segment,
    })
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Hand-built packets for the fixture tables here and in the dispatcher.

    /// IPv4 + TCP with the given flags and payload; checksums left zero (the classifier does
    /// not check them: a queued packet may carry a partial checksum).
    pub fn v4_tcp(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&0x1122_3344u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        tcp.extend_from_slice(payload);
        let total = u16::try_from(20 + tcp.len()).unwrap();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&tcp);
        ip
    }

    pub fn v6_tcp(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&tcp);
        ip
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    const CLIENT: [u8; 4] = [192, 0, 2, 101];
    const VIP: [u8; 4] = [192, 0, 2, 1];

    fn vip() -> IpAddr {
        IpAddr::from(VIP)
    }

    /// The fixture table: description, packet, ports, expected result.
    #[test]
    fn fixture_table() {
        let mut frag = v4_tcp(CLIENT, VIP, 40000, 80, SYN, b"");
        frag[6] = 0x20; // more fragments
        let mut short_total = v4_tcp(CLIENT, VIP, 40000, 80, SYN, b"");
        short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        let mut bad_offset = v4_tcp(CLIENT, VIP, 40000, 80, SYN, b"");
        bad_offset[20 + 12] = 2 << 4;
        let mut udp = v4_tcp(CLIENT, VIP, 40000, 80, SYN, b"");
        udp[9] = 17;
        let v6vip: [u8; 16] = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let v6cli: [u8; 16] = "2001:db8::65"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();

        type Row = (
            &'static str,
            Vec<u8>,
            IpAddr,
            &'static [u16],
            Result<u16, Reject>,
        );
        let table: Vec<Row> = vec![
            (
                "plain SYN",
                v4_tcp(CLIENT, VIP, 40000, 80, SYN, b""),
                vip(),
                &[80],
                Ok(40000),
            ),
            (
                "SYN, all ports",
                v4_tcp(CLIENT, VIP, 40001, 8080, SYN, b""),
                vip(),
                &[],
                Ok(40001),
            ),
            (
                "SYN with TFO data",
                v4_tcp(CLIENT, VIP, 40002, 80, SYN, b"GET /"),
                vip(),
                &[80],
                Ok(40002),
            ),
            (
                "SYN with ECN bits",
                v4_tcp(CLIENT, VIP, 40003, 80, SYN | 0xc0, b""),
                vip(),
                &[80],
                Ok(40003),
            ),
            (
                "SYN/ACK",
                v4_tcp(CLIENT, VIP, 40000, 80, SYN | ACK, b""),
                vip(),
                &[80],
                Err(Reject::NotSyn),
            ),
            (
                "SYN+RST",
                v4_tcp(CLIENT, VIP, 40000, 80, SYN | RST, b""),
                vip(),
                &[80],
                Err(Reject::NotSyn),
            ),
            (
                "SYN+FIN",
                v4_tcp(CLIENT, VIP, 40000, 80, SYN | FIN, b""),
                vip(),
                &[80],
                Err(Reject::NotSyn),
            ),
            (
                "bare ACK",
                v4_tcp(CLIENT, VIP, 40000, 80, ACK, b""),
                vip(),
                &[80],
                Err(Reject::NotSyn),
            ),
            (
                "other address",
                v4_tcp(CLIENT, [192, 0, 2, 9], 40000, 80, SYN, b""),
                vip(),
                &[80],
                Err(Reject::WrongVip),
            ),
            (
                "other port",
                v4_tcp(CLIENT, VIP, 40000, 22, SYN, b""),
                vip(),
                &[80, 443],
                Err(Reject::WrongPort),
            ),
            ("fragment", frag, vip(), &[80], Err(Reject::NotPlainTcp)),
            ("UDP", udp, vip(), &[80], Err(Reject::NotPlainTcp)),
            (
                "total length too short",
                short_total,
                vip(),
                &[80],
                Err(Reject::Malformed),
            ),
            (
                "data offset < 5",
                bad_offset,
                vip(),
                &[80],
                Err(Reject::Malformed),
            ),
            ("empty", vec![], vip(), &[80], Err(Reject::Malformed)),
            (
                "truncated IP",
                vec![0x45, 0, 0],
                vip(),
                &[80],
                Err(Reject::Malformed),
            ),
            (
                "IPv6 SYN",
                v6_tcp(v6cli, v6vip, 40004, 443, SYN),
                IpAddr::from(v6vip),
                &[443],
                Ok(40004),
            ),
            (
                "IPv6 SYN/ACK",
                v6_tcp(v6cli, v6vip, 40004, 443, SYN | ACK),
                IpAddr::from(v6vip),
                &[443],
                Err(Reject::NotSyn),
            ),
        ];
        for (what, pkt, vip, ports, want) in table {
            let got = classify(&pkt, vip, ports).map(|s| s.client_port);
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn syn_fields_and_segment() {
        let pkt = v4_tcp(CLIENT, VIP, 40000, 80, SYN, b"hello");
        let s = classify(&pkt, vip(), &[80]).unwrap();
        assert_eq!(s.client, IpAddr::from(CLIENT));
        assert_eq!(s.port, 80);
        assert_eq!(s.isn, 0x1122_3344);
        assert_eq!(s.segment.len(), 25);
        assert_eq!(&s.segment[20..], b"hello");
    }

    #[test]
    fn trailing_link_padding_is_not_part_of_the_segment() {
        let mut pkt = v4_tcp(CLIENT, VIP, 40000, 80, SYN, b"");
        pkt.extend_from_slice(&[0u8; 6]); // Ethernet minimum-frame padding
        assert_eq!(classify(&pkt, vip(), &[80]).unwrap().segment.len(), 20);
    }
}
