//! The master's work for one queued SYN, as a value: lease check, classification, the
//! dispatcher's decision (records, then policy, then the record hand-off), the counters, and
//! the proto-253 encoding. Sans-IO: [`SynPath::on_syn`] opens no socket, reads no clock (the
//! caller passes `now_ms`) and does not allocate; it returns a [`Verdict`] that the queue
//! thread (`crate::datapath::queue::MasterPath`) carries out: drop the queued packet, and
//! perhaps first send the bytes written into the caller's buffer: a proto-253 forward to
//! another node, or, for a connection the master keeps, the SYN rebuilt for local delivery.
//!
//! The master never accepts a queued SYN into its own stack with an NFQUEUE ACCEPT verdict. It
//! re-injects the SYN through a raw socket, as a member re-injects a forwarded one: one path
//! into the stack on every node. Measured in the lab (`tests/tests/exactness.rs`, the NAT-like
//! client steered to the master, ~330k connections a run): with ACCEPT verdicts, a connection
//! whose SYN met the master's TIME_WAIT socket for the same 4-tuple was, about once a run,
//! answered with an RST right after its handshake (the client's ACK found no request socket);
//! the same load steered to a member (raw-socket re-injection) never was. The kernel mechanism
//! is written up in `docs/design/exactness.md`.
//!
//! Every counter `tdscctl status` shows for the master path is bumped here, except the two
//! that depend on the send itself (`forwarded_out`, `forward_send_errors` for a failed
//! `sendto`), which the shell bumps once it knows.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tdsc_proto::forward::ForwardHeader;
use tdsc_proto::seal::{Keyring, SendCounter};

use crate::cluster::counters::{add, Counters};
use crate::cluster::role::RoleCell;
use crate::cluster::view::ClusterView;
use crate::datapath::classify::{classify, Reject};
use crate::datapath::dispatch::{Decision, Dispatcher};
use crate::datapath::inject;
use crate::datapath::policy::Policy;
use crate::datapath::records::RecordEntry;

/// What the queue thread does with one queued packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This node takes the connection: send the first `len` bytes of the caller's buffer (the
    /// client's SYN, rebuilt for local delivery by [`crate::datapath::inject::build`]) to the
    /// VIP through the re-injection socket, then drop the queued SYN.
    Inject { len: usize },
    /// Drop the queued packet (the client retransmits a SYN).
    Drop(DropReason),
    /// Send the first `len` bytes of the caller's buffer (a proto-253 forward, see
    /// `tdsc_proto::forward`) to `dest`, then drop the queued SYN.
    Forward {
        /// The chosen node's slot in the cluster view (stable: see `ClusterView`).
        index: usize,
        /// The chosen node's id.
        node: u32,
        /// The chosen node's cluster-network address.
        dest: IpAddr,
        len: usize,
    },
}

/// Why a queued packet is dropped without a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// This node is not master: the packet was queued in the instant before the ruleset
    /// turned member.
    NotMaster,
    /// The election lease has lapsed: another node may be dispatching already.
    LeaseLapsed,
    /// Not a SYN this node may dispatch (see [`crate::datapath::classify`]).
    Rejected(Reject),
    /// No node is eligible.
    NoNode,
    /// The forward did not fit the caller's buffer (or mixed address families); counted as a
    /// failed forward, like a failed send.
    Encode,
    /// The SYN to keep could not be rebuilt for re-injection; counted as a failed
    /// re-injection, like a failed send.
    InjectEncode,
}

/// Who this node is when it forwards: its id, the keyring it tags forwards with, and its
/// forward counter (the tag's nonce, so it must never repeat under one key: start it at the
/// wall clock in nanoseconds, like the cluster socket's, so it keeps growing across a
/// restart).
#[derive(Debug)]
pub struct Origin {
    pub id: u32,
    pub keyring: Arc<Keyring>,
    pub counter: SendCounter,
}

/// The master path's state apart from its sockets: owned by the queue thread.
#[derive(Debug)]
pub struct SynPath {
    vip: IpAddr,
    /// Sorted (the classifier binary-searches them); empty means every port.
    ports: Vec<u16>,
    /// Stamped and tagged into every forward; the counter is this thread's alone.
    origin: Origin,
    view: Arc<ClusterView>,
    counters: Arc<Counters>,
    /// Read per packet: master flag, lease deadline, term. Written by the role task and the
    /// election only.
    role: Arc<RoleCell>,
    dispatcher: Dispatcher,
}

impl SynPath {
    pub fn new(
        vip: IpAddr,
        ports: Vec<u16>,
        origin: Origin,
        view: Arc<ClusterView>,
        counters: Arc<Counters>,
        role: Arc<RoleCell>,
        dispatcher: Dispatcher,
    ) -> Self {
        SynPath {
            vip,
            ports,
            origin,
            view,
            counters,
            role,
            dispatcher,
        }
    }

    /// Decides what to do with one queued packet at `now_ms` on the lease clock
    /// (`RoleCell::now_ms`). A forward (tagged, see `tdsc_proto::forward`) or a re-injection is
    /// encoded into `out`, which must hold `tdsc_proto::forward::MAX_OVERHEAD` plus the largest
    /// queued segment.
    pub fn on_syn(&mut self, packet: &[u8], now_ms: u64, out: &mut [u8]) -> Verdict {
        if !self.role.is_master() {
            add(&self.counters.dropped_not_master);
            return Verdict::Drop(DropReason::NotMaster);
        }
        if now_ms >= self.role.lease_until_ms() {
            add(&self.counters.dropped_not_master);
            return Verdict::Drop(DropReason::LeaseLapsed);
        }
        let syn = match classify(packet, self.vip, &self.ports) {
            Ok(s) => s,
            Err(reject) => {
                add(&self.counters.queue_rejected);
                return Verdict::Drop(DropReason::Rejected(reject));
            }
        };
        let outcome = self.dispatcher.decide(&syn, &self.view, now_ms);
        add(&self.counters.syns_dispatched);
        if outcome.retransmit {
            add(&self.counters.retransmit_hits);
        }
        if outcome.sticky {
            add(&self.counters.affinity_hits);
        }
        let dropped = self.dispatcher.take_handoff_drops();
        if dropped > 0 {
            self.counters
                .records_handoff_overflow
                .fetch_add(dropped, Relaxed);
        }
        let evicted = self.dispatcher.take_evictions();
        if evicted > 0 {
            self.counters
                .records_evicted_live
                .fetch_add(evicted, Relaxed);
        }
        let evicted = self.dispatcher.take_affinity_evictions();
        if evicted > 0 {
            self.counters
                .affinity_evicted_live
                .fetch_add(evicted, Relaxed);
        }
        match outcome.decision {
            Decision::Local => match inject::build(syn.client, syn.vip, syn.segment, out) {
                Ok(len) => {
                    add(&self.counters.accepted_locally);
                    Verdict::Inject { len }
                }
                Err(_) => {
                    add(&self.counters.reinject_errors);
                    Verdict::Drop(DropReason::InjectEncode)
                }
            },
            Decision::NoNode => {
                add(&self.counters.dropped_no_node);
                Verdict::Drop(DropReason::NoNode)
            }
            Decision::Forward { index } => {
                // A spent counter (after 584 years of nanoseconds) would repeat a nonce: stop
                // forwarding rather than do that.
                let Some(counter) = self.origin.counter.next() else {
                    add(&self.counters.forward_send_errors);
                    return Verdict::Drop(DropReason::Encode);
                };
                let header = ForwardHeader {
                    term: self.role.term(),
                    origin: self.origin.id,
                    counter,
                    client: syn.client,
                    vip: syn.vip,
                };
                match header.encode_packet(syn.segment, &self.origin.keyring, out) {
                    Ok(len) => {
                        let slot = &self.view.nodes[index];
                        Verdict::Forward {
                            index,
                            node: slot.id(),
                            dest: slot.address(),
                            len,
                        }
                    }
                    Err(_) => {
                        add(&self.counters.forward_send_errors);
                        Verdict::Drop(DropReason::Encode)
                    }
                }
            }
        }
    }

    /// Switches the policy (a control-socket command); the records stay.
    pub fn set_policy(&mut self, policy: Box<dyn Policy>) {
        self.dispatcher.set_policy(policy);
    }

    /// Takes over records (a new master; see `crate::cluster::takeover`).
    pub fn adopt(&mut self, entries: &[RecordEntry]) {
        self.dispatcher.adopt(entries);
    }

    /// Switches client affinity (`tdscctl affinity set`), keeping live entries.
    pub fn set_affinity(
        &mut self,
        settings: Option<&crate::datapath::sticky::AffinitySettings>,
        now_ms: u64,
    ) {
        self.dispatcher.set_affinity(settings, now_ms);
    }

    /// Takes over client-affinity entries (a new master).
    pub fn adopt_affinity(&mut self, entries: &[RecordEntry]) {
        self.dispatcher.adopt_affinity(entries);
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::role::{ElectionWriter, MasterFlag};
    use crate::config::PolicyName;
    use crate::datapath::classify::fixtures::v4_tcp;
    use crate::datapath::classify::{ACK, SYN};
    use crate::datapath::policy::build;
    use crate::datapath::records::SynRecords;
    use tdsc_proto::forward::{ForwardPacket, MAX_OVERHEAD};
    use tdsc_proto::seal::KEY_LEN;

    const CLIENT: [u8; 4] = [192, 0, 2, 101];
    const VIP: [u8; 4] = [192, 0, 2, 1];
    const TERM: u64 = 7;
    /// The master's first forward counter.
    const FIRST: u64 = 1_000;

    fn keyring() -> Arc<Keyring> {
        Arc::new(Keyring::new(&[(1, [5; KEY_LEN])], None).unwrap())
    }

    struct Fixture {
        path: SynPath,
        view: Arc<ClusterView>,
        counters: Arc<Counters>,
        election: ElectionWriter,
        flag: MasterFlag,
        buf: Vec<u8>,
    }

    /// Node 1 of 3, master with a lease until 10 000 ms, all peers alive, round robin.
    fn fixture() -> Fixture {
        let view = Arc::new(ClusterView::new(&crate::config::test_nodes(3), 1));
        for s in view.slots() {
            s.alive.store(true, Relaxed);
        }
        let counters = Arc::new(Counters::default());
        let (role, election, flag) = RoleCell::new();
        flag.set();
        election.raise_term(TERM);
        election.set_lease_until_ms(10_000);
        let dispatcher = Dispatcher::new(
            build(PolicyName::RoundRobin),
            SynRecords::new(1024, 64_000),
            3,
        );
        Fixture {
            path: SynPath::new(
                IpAddr::from(VIP),
                vec![80, 443],
                Origin {
                    id: 1,
                    keyring: keyring(),
                    counter: SendCounter::starting_at(FIRST),
                },
                view.clone(),
                counters.clone(),
                role.clone(),
                dispatcher,
            ),
            view,
            counters,
            election,
            flag,
            buf: vec![0u8; MAX_OVERHEAD + 0x10000],
        }
    }

    impl Fixture {
        fn on(&mut self, pkt: &[u8], now_ms: u64) -> Verdict {
            self.path.on_syn(pkt, now_ms, &mut self.buf)
        }
    }

    fn syn(sport: u16) -> Vec<u8> {
        v4_tcp(CLIENT, VIP, sport, 80, SYN, b"")
    }

    #[test]
    fn no_dispatch_without_the_role_or_past_the_lease() {
        let mut f = fixture();
        assert!(
            matches!(f.on(&syn(1), 9_999), Verdict::Inject { .. }),
            "inside the lease"
        );
        assert_eq!(
            f.on(&syn(2), 10_000),
            Verdict::Drop(DropReason::LeaseLapsed),
            "the lease ends at its deadline"
        );
        f.election.revoke_lease();
        assert_eq!(f.on(&syn(3), 0), Verdict::Drop(DropReason::LeaseLapsed));
        f.election.set_lease_until_ms(u64::MAX);
        f.flag.clear();
        assert_eq!(f.on(&syn(4), 0), Verdict::Drop(DropReason::NotMaster));
        let c = f.counters.snapshot();
        assert_eq!(c.dropped_not_master, 3);
        assert_eq!(c.syns_dispatched, 1, "nothing dispatched without a lease");
        assert_eq!(f.path.dispatcher().records().live_count(0), 1);
    }

    #[test]
    fn packets_that_are_not_dispatchable_syns_are_dropped_with_the_reason() {
        let mut f = fixture();
        let table: [(&str, Vec<u8>, Reject); 4] = [
            (
                "SYN/ACK",
                v4_tcp(CLIENT, VIP, 1, 80, SYN | ACK, b""),
                Reject::NotSyn,
            ),
            (
                "other address",
                v4_tcp(CLIENT, [192, 0, 2, 9], 1, 80, SYN, b""),
                Reject::WrongVip,
            ),
            (
                "other port",
                v4_tcp(CLIENT, VIP, 1, 22, SYN, b""),
                Reject::WrongPort,
            ),
            ("garbage", vec![0x45, 0, 0], Reject::Malformed),
        ];
        for (what, pkt, reject) in &table {
            assert_eq!(
                f.on(pkt, 0),
                Verdict::Drop(DropReason::Rejected(*reject)),
                "{what}"
            );
        }
        let c = f.counters.snapshot();
        assert_eq!(c.queue_rejected, 4);
        assert_eq!(c.syns_dispatched, 0);
    }

    #[test]
    fn the_master_takes_its_share_and_forwards_the_rest_intact() {
        let mut f = fixture();
        let pkt = v4_tcp(CLIENT, VIP, 40000, 80, SYN, b"GET /");
        // Round robin from the master: itself, then node 2.
        let own = syn(39999);
        let Verdict::Inject { len } = f.on(&own, 0) else {
            panic!("the master keeps the first connection");
        };
        // Rebuilt for local delivery: the client's addresses and segment, a valid checksum.
        let rebuilt = &f.buf[..len];
        assert_eq!(&rebuilt[12..20], &own[12..20], "client -> VIP");
        assert_eq!(rebuilt.len(), own.len());
        assert_eq!(
            &rebuilt[20..36],
            &own[20..36],
            "the segment up to its checksum"
        );
        assert_eq!(&rebuilt[38..], &own[38..], "and after it");
        assert_eq!(
            crate::datapath::inject::tcp_checksum(
                &IpAddr::from(CLIENT),
                &IpAddr::from(VIP),
                &rebuilt[20..]
            )
            .to_be_bytes(),
            [rebuilt[36], rebuilt[37]]
        );
        let v = f.on(&pkt, 0);
        let Verdict::Forward {
            index,
            node,
            dest,
            len,
        } = v
        else {
            panic!("expected a forward, got {v:?}");
        };
        assert_eq!((index, node), (1, 2));
        assert_eq!(dest, f.view.nodes[1].address());
        let fwd = ForwardPacket::decode(&f.buf[..len]).expect("a valid forward");
        assert_eq!(
            fwd.header,
            ForwardHeader {
                term: TERM,
                origin: 1,
                counter: FIRST,
                client: IpAddr::from(CLIENT),
                vip: IpAddr::from(VIP),
            }
        );
        assert_eq!(
            fwd.verify(&keyring()),
            Ok(()),
            "tagged with the cluster key"
        );
        assert_eq!(fwd.segment, &pkt[20..], "the whole segment, TFO data too");
        // The next forward counts on.
        let Verdict::Forward { len, .. } = f.on(&syn(40001), 0) else {
            panic!("round robin forwards to node 3 next");
        };
        let next = ForwardPacket::decode(&f.buf[..len]).expect("a valid forward");
        assert_eq!(next.header.counter, FIRST + 1);
        assert_eq!(next.verify(&keyring()), Ok(()));
        let c = f.counters.snapshot();
        assert_eq!((c.syns_dispatched, c.accepted_locally), (3, 1));
        assert_eq!(
            c.forwarded_out, 0,
            "the shell counts a forward once it is sent"
        );
    }

    #[test]
    fn a_forward_that_does_not_fit_is_dropped_and_counted() {
        let mut f = fixture();
        assert!(matches!(f.on(&syn(1), 0), Verdict::Inject { .. }));
        let mut small = [0u8; 30];
        assert_eq!(
            f.path.on_syn(&syn(2), 0, &mut small),
            Verdict::Drop(DropReason::Encode)
        );
        assert_eq!(f.counters.snapshot().forward_send_errors, 1);
    }

    #[test]
    fn a_retransmission_follows_its_record_unless_that_node_died() {
        let mut f = fixture();
        assert!(matches!(f.on(&syn(1), 0), Verdict::Inject { .. }));
        let first = f.on(&syn(2), 0);
        assert!(
            matches!(first, Verdict::Forward { node: 2, .. }),
            "{first:?}"
        );
        // Round robin would pick node 3 next; the record sends the copy to node 2 again.
        let again = f.on(&syn(2), 1_000);
        assert!(
            matches!(again, Verdict::Forward { node: 2, .. }),
            "{again:?}"
        );
        assert_eq!(f.counters.snapshot().retransmit_hits, 1);
        // Node 2 dies: its record is not followed, the copy is dispatched anew.
        f.view.nodes[1].alive.store(false, Relaxed);
        let after = f.on(&syn(2), 2_000);
        assert!(
            !matches!(after, Verdict::Forward { node: 2, .. }),
            "{after:?}"
        );
        assert_eq!(f.counters.snapshot().retransmit_hits, 1);
    }

    #[test]
    fn adopted_records_steer_retransmissions() {
        let mut f = fixture();
        f.path.adopt(&[RecordEntry {
            client: IpAddr::from(CLIENT),
            port: 5,
            isn: None,
            node: 2,
            stamp_ms: 0,
        }]);
        let v = f.on(&syn(5), 10);
        assert!(matches!(v, Verdict::Forward { node: 3, .. }), "{v:?}");
        assert_eq!(f.counters.snapshot().retransmit_hits, 1);
    }

    #[test]
    fn no_eligible_node_drops() {
        let mut f = fixture();
        f.view.set_weights(&[0, 0, 0]);
        assert_eq!(f.on(&syn(1), 0), Verdict::Drop(DropReason::NoNode));
        assert_eq!(f.counters.snapshot().dropped_no_node, 1);
    }
}
