//! The member path: receive forwarded SYNs, check them, re-inject them into the local stack.
//!
//! Every node runs it (a master may be demoted, and a master never forwards to itself). A
//! forward is accepted only if it comes from a cluster member's address on the cluster
//! interface (the ruleset already enforces that; we check again and count), decodes, names
//! the dispatching node consistently, is for our VIP, carries a bare SYN and a dispatched
//! port, and was dispatched in a term no older than the newest this node knows. Everything
//! else is counted by reason and dropped.
//!
//! The term check is the member's half of the no-two-dispatchers argument (see
//! `tdsc_election`'s docs, *Fencing at members*): a master whose lease should have stopped
//! it but did not (a clock far off, a stalled thread) stamps its forwards with its old
//! term, and every member that has heard of a newer term refuses them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tdsc_proto::forward::ForwardPacket;

use crate::cluster::counters::{add, Counters};
use crate::cluster::role::RoleCell;
use crate::cluster::view::ClusterView;
use crate::config::Config;
use crate::datapath::classify::{ACK, FIN, RST, SYN};
use crate::datapath::inject;
use crate::datapath::rawsock::{Dest, RawSocket};
use crate::shutdown::StopFlag;

/// How often the receive loop wakes to check for shutdown: the receive socket's
/// `SO_RCVTIMEO`, so the blocking `recvfrom` returns at least this often.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Rejection {
    UnknownPeer,
    Malformed,
    WrongVip,
    NotSyn,
    BadPort,
    /// Dispatched in a term older than the newest this node knows: a deposed master's.
    StaleTerm,
}

/// Checks one received forward. Pure: `src` is the outer IP source, `payload` what follows
/// the outer IP header, `known_term` the highest election term this node has seen (0 before
/// any; a static election is term 1 forever, so its forwards always pass).
pub fn check<'a>(
    view: &ClusterView,
    vip: IpAddr,
    ports: &[u16],
    known_term: u64,
    src: IpAddr,
    payload: &'a [u8],
) -> Result<ForwardPacket<'a>, Rejection> {
    let Some(peer) = view.index_of_address(&src) else {
        return Err(Rejection::UnknownPeer);
    };
    let p = ForwardPacket::decode(payload).map_err(|_| Rejection::Malformed)?;
    if p.header.origin != view.nodes[peer].id() {
        return Err(Rejection::UnknownPeer);
    }
    // Equal terms pass: the master of the current term stamps exactly that term. A newer
    // term than ours also passes: the master heard of it first, and our Raft task will too.
    if p.header.term < known_term {
        return Err(Rejection::StaleTerm);
    }
    if p.header.vip != vip {
        return Err(Rejection::WrongVip);
    }
    if p.header.client.is_ipv4() != vip.is_ipv4() {
        return Err(Rejection::Malformed);
    }
    if p.segment[13] & (FIN | SYN | RST | ACK) != SYN {
        return Err(Rejection::NotSyn);
    }
    let port = u16::from_be_bytes([p.segment[2], p.segment[3]]);
    if !ports.is_empty() && ports.binary_search(&port).is_err() {
        return Err(Rejection::BadPort);
    }
    Ok(p)
}

/// What the receive thread shares with the rest of the node.
#[derive(Debug)]
pub struct MemberLinks {
    /// Read per forward (who may send); written by the Raft task.
    pub view: Arc<ClusterView>,
    /// The member path's counters are this thread's.
    pub counters: Arc<Counters>,
    /// Read per forward: the highest election term this node knows, for the stale-term fence.
    pub role: Arc<RoleCell>,
}

#[derive(Debug)]
pub struct MemberPath {
    pub rx: RawSocket,
    pub inject: RawSocket,
    pub vip: IpAddr,
    pub ports: Vec<u16>,
    pub view: Arc<ClusterView>,
    pub counters: Arc<Counters>,
    /// `term`: the highest election term this node knows, for the stale-term fence.
    pub role: Arc<RoleCell>,
}

impl MemberPath {
    pub fn open(cfg: &Config, links: MemberLinks) -> std::io::Result<Self> {
        Ok(MemberPath {
            rx: RawSocket::receive_forwards(&cfg.self_address(), &cfg.cluster_interface, POLL)?,
            inject: RawSocket::inject(&cfg.vip)?,
            vip: cfg.vip,
            ports: cfg.tcp_ports.clone(),
            view: links.view,
            counters: links.counters,
            role: links.role,
        })
    }

    /// Runs until `stop` (seen within `POLL`, 250 ms).
    pub fn run(self, stop: &StopFlag) {
        let mut rbuf = vec![0u8; 0x10000];
        let mut obuf = vec![0u8; inject::MAX_PACKET];
        let to = Dest::new(&self.vip);
        tracing::info!("member path ready");
        while !stop.is_set() {
            let (n, src) = match self.rx.recv_from(&mut rbuf) {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "forward receive failed");
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            let pkt = &rbuf[..n];
            // An IPv4 raw socket hands us the outer header; IPv6 does not.
            let payload = if src.is_ipv4() {
                let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
                if ihl < 20 || ihl > pkt.len() {
                    add(&self.counters.rejected_malformed);
                    continue;
                }
                &pkt[ihl..]
            } else {
                pkt
            };
            let known_term = self.role.term();
            match check(&self.view, self.vip, &self.ports, known_term, src, payload) {
                Ok(p) => {
                    add(&self.counters.received_forwarded);
                    let res = inject::build(p.header.client, p.header.vip, p.segment, &mut obuf)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                        .and_then(|len| self.inject.send_to(&obuf[..len], &to));
                    match res {
                        Ok(_) => add(&self.counters.reinjected),
                        Err(e) => {
                            add(&self.counters.reinject_errors);
                            tracing::warn!(error = %e, "re-injection failed");
                        }
                    }
                }
                Err(r) => {
                    let c = &self.counters;
                    add(match r {
                        Rejection::UnknownPeer => &c.rejected_unknown_peer,
                        Rejection::Malformed => &c.rejected_malformed,
                        Rejection::WrongVip => &c.rejected_wrong_vip,
                        Rejection::NotSyn => &c.rejected_not_syn,
                        Rejection::BadPort => &c.rejected_bad_port,
                        Rejection::StaleTerm => &c.rejected_stale_term,
                    });
                    tracing::debug!(%src, reason = ?r, "forward rejected");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdsc_proto::forward::ForwardHeader;

    fn view() -> ClusterView {
        let nodes = crate::config::test_nodes(3);
        ClusterView::new(&nodes, 2)
    }

    fn wire(origin: u32, vip: &str, flags: u8, port: u16) -> Vec<u8> {
        wire_in_term(1, origin, vip, flags, port)
    }

    fn wire_in_term(term: u64, origin: u32, vip: &str, flags: u8, port: u16) -> Vec<u8> {
        let h = ForwardHeader {
            term,
            origin,
            client: "192.0.2.101".parse().unwrap(),
            vip: vip.parse().unwrap(),
        };
        let mut seg = [0u8; 20];
        seg[2..4].copy_from_slice(&port.to_be_bytes());
        seg[12] = 5 << 4;
        seg[13] = flags;
        let mut buf = vec![0u8; 128];
        let n = h.encode_packet(&seg, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// Fixture table: who sent what, and the expected verdict.
    #[test]
    fn forward_fixture_table() {
        let v = view();
        let vip: IpAddr = "192.0.2.1".parse().unwrap();
        let master: IpAddr = "198.51.100.11".parse().unwrap();
        let rogue: IpAddr = "198.51.100.99".parse().unwrap();
        type Row = (&'static str, IpAddr, Vec<u8>, Result<(), Rejection>);
        let table: Vec<Row> = vec![
            (
                "good SYN from the master",
                master,
                wire(1, "192.0.2.1", SYN, 80),
                Ok(()),
            ),
            (
                "non-member source",
                rogue,
                wire(1, "192.0.2.1", SYN, 80),
                Err(Rejection::UnknownPeer),
            ),
            (
                "origin id does not match source",
                master,
                wire(3, "192.0.2.1", SYN, 80),
                Err(Rejection::UnknownPeer),
            ),
            (
                "other VIP",
                master,
                wire(1, "192.0.2.9", SYN, 80),
                Err(Rejection::WrongVip),
            ),
            (
                "SYN/ACK",
                master,
                wire(1, "192.0.2.1", SYN | ACK, 80),
                Err(Rejection::NotSyn),
            ),
            (
                "RST",
                master,
                wire(1, "192.0.2.1", RST, 80),
                Err(Rejection::NotSyn),
            ),
            (
                "port not dispatched",
                master,
                wire(1, "192.0.2.1", SYN, 22),
                Err(Rejection::BadPort),
            ),
            (
                "truncated",
                master,
                wire(1, "192.0.2.1", SYN, 80)[..30].to_vec(),
                Err(Rejection::Malformed),
            ),
            (
                "garbage",
                master,
                vec![0xde, 0xad, 0xbe, 0xef],
                Err(Rejection::Malformed),
            ),
        ];
        for (what, src, payload, want) in table {
            let got = check(&v, vip, &[80], 1, src, &payload).map(|_| ());
            assert_eq!(got, want, "{what}");
        }
    }

    /// Fixture table of the term fence: (forward's term, highest term this node knows).
    #[test]
    fn stale_term_fixture_table() {
        let v = view();
        let vip: IpAddr = "192.0.2.1".parse().unwrap();
        let master: IpAddr = "198.51.100.11".parse().unwrap();
        let table: &[(&str, u64, u64, Result<(), Rejection>)] = &[
            ("static election: term 1 on both sides", 1, 1, Ok(())),
            ("node knows no term yet (starting)", 1, 0, Ok(())),
            ("current Raft term", 7, 7, Ok(())),
            ("master knows a newer term first", 8, 7, Ok(())),
            (
                "deposed master, one term behind",
                6,
                7,
                Err(Rejection::StaleTerm),
            ),
            (
                "deposed master, far behind",
                1,
                900,
                Err(Rejection::StaleTerm),
            ),
            (
                "term 0 once any term is known",
                0,
                1,
                Err(Rejection::StaleTerm),
            ),
        ];
        for (what, term, known, want) in table {
            let payload = wire_in_term(*term, 1, "192.0.2.1", SYN, 80);
            let got = check(&v, vip, &[80], *known, master, &payload).map(|_| ());
            assert_eq!(got, *want, "{what}");
        }
        // The fence comes after the sender checks: a stale forward from a stranger still
        // counts as unknown_peer, not stale_term.
        let rogue: IpAddr = "198.51.100.99".parse().unwrap();
        let payload = wire_in_term(1, 1, "192.0.2.1", SYN, 80);
        assert_eq!(
            check(&v, vip, &[80], 5, rogue, &payload).map(|_| ()),
            Err(Rejection::UnknownPeer)
        );
    }
}
