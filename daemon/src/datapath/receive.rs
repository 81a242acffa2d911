//! The member path: receive forwarded SYNs, check them, re-inject them into the local stack.
//!
//! Every node runs it (a master may be demoted, and a master never forwards to itself). A
//! forward is accepted only if it comes from a cluster member's address on the cluster
//! interface (the ruleset already enforces that; we check again and count), decodes, names
//! the dispatching node consistently, carries a tag made with the cluster key, was
//! dispatched in a term no older than the newest this node knows, is for our VIP, carries a
//! bare SYN and a dispatched port, and has a counter this node has not seen from that origin
//! in that term. Everything else is counted by reason and dropped.
//!
//! The tag is what makes the other checks mean anything: a source address is easy to spoof
//! on the cluster segment, and without the key a forged forward fails here, before any of
//! its fields is believed. The replay window (RFC 6479, [`ReplayWindow`]) is kept per origin
//! and term: a forward captured off the cluster network and sent again carries a counter
//! the window has seen (or one too old for it) and is refused; a new master's first forward
//! (a new term) starts that origin's window afresh, so it is accepted at once.
//!
//! The term check is the member's half of the no-two-dispatchers argument (see
//! `tdsc_election`'s docs, *Fencing at members*): a master whose lease should have stopped
//! it but did not (a clock far off, a stalled thread) stamps its forwards with its old
//! term, and every member that has heard of a newer term refuses them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tdsc_proto::forward::ForwardPacket;
use tdsc_proto::seal::{Keyring, Reject, ReplayWindow};

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
    /// The tag does not verify: forged, altered, or made with another cluster key.
    BadTag,
    /// Tagged with a key id this keyring does not hold.
    UnknownKey,
    /// Authentic, but its counter was accepted before, is older than the replay window, or
    /// its term is older than one this origin's window has moved on to: a replay.
    Replay,
}

/// The member's replay state: one window per origin slot of the cluster view, each for the
/// newest term it has seen from that origin. Fed only forwards whose tag verified.
#[derive(Debug)]
pub struct ForwardWindows {
    /// Indexed like `ClusterView::nodes`: (term, window), `None` before the first forward.
    slots: Vec<Option<(u64, ReplayWindow)>>,
}

impl ForwardWindows {
    /// Room for `slots` origins (the cluster view's slot count; fixed for the process).
    pub fn new(slots: usize) -> Self {
        Self {
            slots: vec![None; slots],
        }
    }

    /// Accepts `(term, counter)` from the origin in `slot` once. A newer term than the window's
    /// starts a fresh window (a new master counts in a new space); an older one is a replay.
    fn check_and_set(&mut self, slot: usize, term: u64, counter: u64) -> Result<(), Rejection> {
        let Some(entry) = self.slots.get_mut(slot) else {
            // The view never has more slots than it was built with; refuse rather than panic.
            return Err(Rejection::UnknownPeer);
        };
        match entry {
            Some((t, window)) if *t == term => {
                window.check_and_set(counter).map_err(|_| Rejection::Replay)
            }
            Some((t, _)) if *t > term => Err(Rejection::Replay),
            _ => {
                let mut window = ReplayWindow::default();
                window
                    .check_and_set(counter)
                    .map_err(|_| Rejection::Replay)?;
                *entry = Some((term, window));
                Ok(())
            }
        }
    }
}

/// What [`check`] checks a forward against: this node's fixed settings and its keyring.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub vip: IpAddr,
    pub ports: &'a [u16],
    pub keyring: &'a Keyring,
}

/// Checks one received forward. Sans-IO: `src` is the outer IP source, `payload` what
/// follows the outer IP header, `known_term` the highest election term this node has seen (0
/// before any; a static election is term 1 forever, so its forwards always pass). A forward
/// that passes every other check is entered in `windows`, so the same one passes only once.
pub fn check<'a>(
    view: &ClusterView,
    expect: &Expect<'_>,
    windows: &mut ForwardWindows,
    known_term: u64,
    src: IpAddr,
    payload: &'a [u8],
) -> Result<ForwardPacket<'a>, Rejection> {
    let Expect {
        vip,
        ports,
        keyring,
    } = *expect;
    let Some(peer) = view.index_of_address(&src) else {
        return Err(Rejection::UnknownPeer);
    };
    let p = ForwardPacket::decode(payload).map_err(|_| Rejection::Malformed)?;
    if p.header.origin != view.nodes[peer].id() {
        return Err(Rejection::UnknownPeer);
    }
    // Nothing below is believed before the tag verifies.
    p.verify(keyring).map_err(|r| match r {
        Reject::UnknownKey => Rejection::UnknownKey,
        Reject::Short | Reject::Version | Reject::BadTag => Rejection::BadTag,
    })?;
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
    // Last: only a forward that is otherwise accepted uses up its counter.
    windows.check_and_set(peer, p.header.term, p.header.counter)?;
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
    /// The cluster keyring forward tags are verified with (read only).
    pub keyring: Arc<Keyring>,
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
    pub keyring: Arc<Keyring>,
    /// This thread's replay state, one window per origin.
    pub windows: ForwardWindows,
}

impl MemberPath {
    pub fn open(cfg: &Config, links: MemberLinks) -> std::io::Result<Self> {
        Ok(MemberPath {
            rx: RawSocket::receive_forwards(&cfg.self_address(), &cfg.cluster_interface, POLL)?,
            inject: RawSocket::inject(&cfg.vip)?,
            vip: cfg.vip,
            ports: cfg.tcp_ports.clone(),
            windows: ForwardWindows::new(links.view.nodes.len()),
            view: links.view,
            counters: links.counters,
            role: links.role,
            keyring: links.keyring,
        })
    }

    /// Runs until `stop` (seen within `POLL`, 250 ms).
    pub fn run(mut self, stop: &StopFlag) {
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
            let expect = Expect {
                vip: self.vip,
                ports: &self.ports,
                keyring: &self.keyring,
            };
            match check(
                &self.view,
                &expect,
                &mut self.windows,
                known_term,
                src,
                payload,
            ) {
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
                        Rejection::BadTag => &c.rejected_bad_tag,
                        Rejection::UnknownKey => &c.rejected_unknown_key,
                        Rejection::Replay => &c.rejected_replay,
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
    use tdsc_proto::seal::{KEY_LEN, REPLAY_WINDOW};

    const VIP: &str = "192.0.2.1";

    fn view() -> ClusterView {
        let nodes = crate::config::test_nodes(3);
        ClusterView::new(&nodes, 2)
    }

    fn ring() -> Keyring {
        Keyring::new(&[(1, [6; KEY_LEN])], None).unwrap()
    }

    fn master() -> IpAddr {
        "198.51.100.11".parse().unwrap()
    }

    /// A forward from `origin` in `term` with `counter`, tagged with `ring`.
    fn tagged(
        ring: &Keyring,
        term: u64,
        counter: u64,
        origin: u32,
        vip: &str,
        flags: u8,
        port: u16,
    ) -> Vec<u8> {
        let h = ForwardHeader {
            term,
            origin,
            counter,
            client: "192.0.2.101".parse().unwrap(),
            vip: vip.parse().unwrap(),
        };
        let mut seg = [0u8; 20];
        seg[2..4].copy_from_slice(&port.to_be_bytes());
        seg[12] = 5 << 4;
        seg[13] = flags;
        let mut buf = vec![0u8; 128];
        let n = h.encode_packet(&seg, ring, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    fn wire(origin: u32, vip: &str, flags: u8, port: u16) -> Vec<u8> {
        tagged(&ring(), 1, 1, origin, vip, flags, port)
    }

    /// Checks `payload` from `src` against a fresh replay state.
    fn check_fresh(known_term: u64, src: IpAddr, payload: &[u8]) -> Result<(), Rejection> {
        let v = view();
        let ring = ring();
        let expect = Expect {
            vip: VIP.parse().unwrap(),
            ports: &[80],
            keyring: &ring,
        };
        let mut windows = ForwardWindows::new(v.nodes.len());
        check(&v, &expect, &mut windows, known_term, src, payload).map(|_| ())
    }

    /// Fixture table: who sent what, and the expected verdict.
    #[test]
    fn forward_fixture_table() {
        let rogue: IpAddr = "198.51.100.99".parse().unwrap();
        let other_key = Keyring::new(&[(1, [7; KEY_LEN])], None).unwrap();
        let unknown_id = Keyring::new(&[(2, [6; KEY_LEN])], None).unwrap();
        let mut altered = wire(1, VIP, SYN, 80);
        altered[36 + 3] ^= 1; // the destination port, 80 -> 81... -> still tagged as 80
        let mut untagged = wire(1, VIP, SYN, 80);
        let n = untagged.len();
        untagged[n - 16..].fill(0);
        type Row = (&'static str, IpAddr, Vec<u8>, Result<(), Rejection>);
        let table: Vec<Row> = vec![
            (
                "good SYN from the master",
                master(),
                wire(1, VIP, SYN, 80),
                Ok(()),
            ),
            (
                "non-member source",
                rogue,
                wire(1, VIP, SYN, 80),
                Err(Rejection::UnknownPeer),
            ),
            (
                "origin id does not match source",
                master(),
                wire(3, VIP, SYN, 80),
                Err(Rejection::UnknownPeer),
            ),
            (
                "tagged with another cluster key",
                master(),
                tagged(&other_key, 1, 1, 1, VIP, SYN, 80),
                Err(Rejection::BadTag),
            ),
            (
                "tagged with a key id we do not hold",
                master(),
                tagged(&unknown_id, 1, 1, 1, VIP, SYN, 80),
                Err(Rejection::UnknownKey),
            ),
            (
                "altered after tagging",
                master(),
                altered,
                Err(Rejection::BadTag),
            ),
            ("zero tag", master(), untagged, Err(Rejection::BadTag)),
            (
                "other VIP",
                master(),
                wire(1, "192.0.2.9", SYN, 80),
                Err(Rejection::WrongVip),
            ),
            (
                "SYN/ACK",
                master(),
                wire(1, VIP, SYN | ACK, 80),
                Err(Rejection::NotSyn),
            ),
            (
                "RST",
                master(),
                wire(1, VIP, RST, 80),
                Err(Rejection::NotSyn),
            ),
            (
                "port not dispatched",
                master(),
                wire(1, VIP, SYN, 22),
                Err(Rejection::BadPort),
            ),
            (
                "truncated",
                master(),
                wire(1, VIP, SYN, 80)[..30].to_vec(),
                Err(Rejection::Malformed),
            ),
            (
                "garbage",
                master(),
                vec![0xde, 0xad, 0xbe, 0xef],
                Err(Rejection::Malformed),
            ),
        ];
        for (what, src, payload, want) in table {
            assert_eq!(check_fresh(1, src, &payload), want, "{what}");
        }
    }

    #[test]
    fn every_flipped_bit_of_a_forward_is_refused() {
        let good = wire(1, VIP, SYN, 80);
        assert_eq!(check_fresh(1, master(), &good), Ok(()));
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut w = good.clone();
                w[i] ^= 1 << bit;
                assert!(
                    check_fresh(1, master(), &w).is_err(),
                    "byte {i} bit {bit} flipped and accepted"
                );
            }
        }
    }

    /// Fixture table of the term fence: (forward's term, highest term this node knows).
    #[test]
    fn stale_term_fixture_table() {
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
            let payload = tagged(&ring(), *term, 1, 1, VIP, SYN, 80);
            assert_eq!(check_fresh(*known, master(), &payload), *want, "{what}");
        }
        // The fence comes after the sender checks: a stale forward from a stranger still
        // counts as unknown_peer, not stale_term.
        let rogue: IpAddr = "198.51.100.99".parse().unwrap();
        let payload = tagged(&ring(), 1, 1, 1, VIP, SYN, 80);
        assert_eq!(check_fresh(5, rogue, &payload), Err(Rejection::UnknownPeer));
    }

    #[test]
    fn a_replayed_forward_is_refused_and_a_new_term_starts_afresh() {
        let v = view();
        let ring = ring();
        let expect = Expect {
            vip: VIP.parse().unwrap(),
            ports: &[80],
            keyring: &ring,
        };
        let mut windows = ForwardWindows::new(v.nodes.len());
        let at_port = |windows: &mut ForwardWindows, term, counter, origin: u32, port| {
            let src: IpAddr = format!("198.51.100.1{origin}").parse().unwrap();
            let payload = tagged(&ring, term, counter, origin, VIP, SYN, port);
            check(&v, &expect, windows, 0, src, &payload).map(|_| ())
        };
        let mut at = |term, counter, origin| at_port(&mut windows, term, counter, origin, 80);
        let start = 1_700_000_000_000_000_000;
        assert_eq!(at(5, start, 1), Ok(()));
        assert_eq!(
            at(5, start, 1),
            Err(Rejection::Replay),
            "the same forward again"
        );
        assert_eq!(at(5, start + 10, 1), Ok(()));
        assert_eq!(at(5, start + 3, 1), Ok(()), "late, inside the window");
        assert_eq!(at(5, start + 3, 1), Err(Rejection::Replay));
        // Window edges: the oldest counter still inside, the first one outside.
        let top = start + 10;
        assert_eq!(at(5, top - (REPLAY_WINDOW - 1), 1), Ok(()));
        assert_eq!(at(5, top - REPLAY_WINDOW, 1), Err(Rejection::Replay));
        // Another origin has its own window: the same counter is new there.
        assert_eq!(at(5, start, 3), Ok(()));
        // A new master (node 3, term 6) whose counter is lower than anything seen from it is
        // accepted at once: a new term is a new counter space.
        assert_eq!(at(6, 1, 3), Ok(()));
        assert_eq!(at(6, 1, 3), Err(Rejection::Replay));
        // Its old term's forwards, replayed now, are refused by its window even though this
        // node's known term (0 here) would let them pass the stale-term fence.
        assert_eq!(at(5, start + 1, 3), Err(Rejection::Replay));
        // A rejected forward does not use up its counter.
        assert_eq!(
            at_port(&mut windows, 5, top + 1, 1, 22),
            Err(Rejection::BadPort)
        );
        assert_eq!(at_port(&mut windows, 5, top + 1, 1, 80), Ok(()));
    }
}
