//! The master's decision for one SYN: accept here, forward to a node, or drop. Sans-IO.
//!
//! Order of questions:
//! 1. Is this a retransmission of a SYN we already dispatched (same client address, port and
//!    ISN within the record window)? Then it goes where the first copy went, whatever the
//!    policy says (paper §3.5) — unless that node has died since.
//! 2. Otherwise, with client affinity on, a client whose affinity entry lives goes to the
//!    node that entry names, if that node is eligible ([`crate::datapath::sticky`]).
//! 3. Otherwise the policy picks among the candidates. In-flight dispatches since each node's
//!    last report are added to its reported connection count. The choice renews the client's
//!    affinity entry.
//! 4. The choice is recorded, and (under Raft) handed to the Raft task for replication
//!    through a bounded, preallocated channel: `try_send` on a `sync_channel` writes into a
//!    slot array allocated when the channel was made, never blocks, and takes no lock while
//!    no receiver is blocked (the Raft task only ever calls `try_recv`). A full channel
//!    drops the hand-off and counts it; the local record is kept either way.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::SyncSender;

use crate::cluster::view::{ClusterView, MAX_NODES};
use crate::datapath::classify::Syn;
use crate::datapath::policy::{Candidate, FlowKey, Policy, LOAD_PER_INFLIGHT};
use crate::datapath::records::{Dispatched, Lookup, RecordEntry, SynRecords};
use crate::datapath::sticky::{Affinity, AffinitySettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The master takes the connection itself: accept the queued packet.
    Local,
    /// Forward to the node at this index of the cluster view; drop the queued packet.
    Forward { index: usize },
    /// No node can take it; drop (the client retransmits).
    NoNode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub retransmit: bool,
    /// The client's affinity entry chose the node, not the policy.
    pub sticky: bool,
}

#[derive(Debug)]
pub struct Dispatcher {
    policy: Box<dyn Policy>,
    records: SynRecords,
    /// Reused for every decision: no allocation per SYN.
    candidates: Vec<Candidate>,
    inflight: Vec<u32>,
    seen_gen: Vec<u64>,
    /// Where new records go for replication; `None` without Raft.
    handoff: Option<SyncSender<Dispatched>>,
    /// Hand-offs dropped because the channel was full, since the last `take_handoff_drops`.
    handoff_drops: u64,
    /// Client affinity; `None` when off.
    affinity: Option<Affinity>,
}

impl Dispatcher {
    /// Sized for every slot a view can have ([`MAX_NODES`]), so a membership change never
    /// makes a decision allocate. `nodes` is a lower bound kept for callers' clarity.
    pub fn new(policy: Box<dyn Policy>, records: SynRecords, nodes: usize) -> Self {
        let n = nodes.max(MAX_NODES);
        Dispatcher {
            policy,
            records,
            candidates: Vec::with_capacity(n),
            inflight: vec![0; n],
            seen_gen: vec![0; n],
            handoff: None,
            handoff_drops: 0,
            affinity: None,
        }
    }

    /// Turns client affinity on, with this table.
    pub fn with_affinity(mut self, affinity: Affinity) -> Self {
        self.affinity = Some(affinity);
        self
    }

    /// The client-affinity table, when affinity is on.
    pub fn affinity(&self) -> Option<&Affinity> {
        self.affinity.as_ref()
    }

    /// Hands every new record to `tx` (see the module docs).
    pub fn with_handoff(mut self, tx: SyncSender<Dispatched>) -> Self {
        self.handoff = Some(tx);
        self
    }

    /// Takes over records from a replica and the nodes' SYN-RECV sockets (a new master). An
    /// entry replaces a record of the same client address and port.
    pub fn adopt(&mut self, entries: &[RecordEntry]) {
        for e in entries {
            self.records.adopt(e);
        }
    }

    /// Switches client affinity to `settings` (`None`: off), keeping the live entries
    /// (`Affinity::replace`). Allocates: a settings change, not a SYN.
    pub fn set_affinity(&mut self, settings: Option<&AffinitySettings>, now_ms: u64) {
        self.affinity = Affinity::replace(self.affinity.take(), settings, now_ms);
    }

    /// Takes over a replica's client-affinity entries (a new master). Ignored with affinity
    /// off.
    pub fn adopt_affinity(&mut self, entries: &[RecordEntry]) {
        if let Some(a) = &mut self.affinity {
            for e in entries {
                a.adopt(e);
            }
        }
    }

    /// Hand-offs dropped since the last call.
    pub fn take_handoff_drops(&mut self) -> u64 {
        std::mem::take(&mut self.handoff_drops)
    }

    pub fn set_policy(&mut self, policy: Box<dyn Policy>) {
        self.policy = policy;
    }

    pub fn policy(&self) -> &dyn Policy {
        &*self.policy
    }

    pub fn records(&self) -> &SynRecords {
        &self.records
    }

    pub fn decide(&mut self, syn: &Syn<'_>, view: &ClusterView, now_ms: u64) -> Outcome {
        let slots = view.slots();
        let n = slots.len();
        // Refresh candidates from the shared view. A new report supersedes the in-flight
        // count: the reported figure now includes those connections. A slot whose node is no
        // longer a member stays a candidate (indices are stable) but is never alive.
        self.candidates.clear();
        for (i, slot) in slots.iter().enumerate() {
            let generation = slot.report_gen.load(Relaxed);
            if generation != self.seen_gen[i] {
                self.seen_gen[i] = generation;
                self.inflight[i] = 0;
            }
            let reported = slot.established.load(Relaxed) + slot.syn_recv.load(Relaxed);
            let inflight = self.inflight[i];
            self.candidates.push(Candidate {
                id: slot.id(),
                alive: slot.is_present() && (i == view.self_index || slot.alive.load(Relaxed)),
                draining: slot.draining.load(Relaxed),
                unhealthy: slot.unhealthy.load(Relaxed),
                weight: slot.weight.load(Relaxed),
                connections: reported.saturating_add(inflight),
                load: slot
                    .load
                    .load(Relaxed)
                    .saturating_add(inflight.saturating_mul(LOAD_PER_INFLIGHT)),
            });
        }

        let mut retransmit = false;
        let mut sticky = false;
        let chosen = match self
            .records
            .lookup(&syn.client, syn.client_port, syn.isn, now_ms)
        {
            Lookup::Retransmit { node }
                if usize::from(node) < n && self.candidates[usize::from(node)].alive =>
            {
                retransmit = true;
                Some(usize::from(node))
            }
            _ => {
                let held = self
                    .affinity
                    .as_ref()
                    .and_then(|a| a.lookup(&syn.client, now_ms))
                    .map(usize::from)
                    .filter(|&i| i < n && self.candidates[i].eligible());
                if held.is_some() {
                    sticky = true;
                    held
                } else {
                    let key = FlowKey {
                        client: syn.client,
                        client_port: syn.client_port,
                        isn: syn.isn,
                    };
                    self.policy.pick(&key, &self.candidates)
                }
            }
        };
        let Some(index) = chosen else {
            return Outcome {
                decision: Decision::NoNode,
                retransmit,
                sticky,
            };
        };
        if !retransmit {
            // Node indices are bounded by the cluster size, far below u16::MAX.
            let node = u16::try_from(index).unwrap_or(u16::MAX);
            self.records
                .insert(&syn.client, syn.client_port, syn.isn, node, now_ms);
            if let Some(a) = &mut self.affinity {
                a.renew(&syn.client, node, now_ms);
            }
            self.inflight[index] = self.inflight[index].saturating_add(1);
            if let Some(tx) = &self.handoff {
                let d = Dispatched {
                    client: syn.client,
                    port: syn.client_port,
                    isn: syn.isn,
                    node_id: self.candidates[index].id,
                };
                if tx.try_send(d).is_err() {
                    self.handoff_drops += 1;
                }
            }
        }
        Outcome {
            decision: if index == view.self_index {
                Decision::Local
            } else {
                Decision::Forward { index }
            },
            retransmit,
            sticky,
        }
    }

    /// Live records pushed out since the last call.
    pub fn take_evictions(&mut self) -> u64 {
        std::mem::take(&mut self.records.evicted_live)
    }

    /// Live affinity entries pushed out since the last call (0 with affinity off).
    pub fn take_affinity_evictions(&mut self) -> u64 {
        self.affinity.as_mut().map_or(0, Affinity::take_evictions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyName;
    use crate::datapath::policy::build;

    fn view(self_id: u32) -> ClusterView {
        let nodes = crate::config::test_nodes(3);
        let v = ClusterView::new(&nodes, self_id);
        for s in v.nodes.iter() {
            s.alive.store(true, Relaxed);
        }
        v
    }

    fn syn(port: u16, isn: u32) -> Syn<'static> {
        Syn {
            client: "192.0.2.101".parse().unwrap(),
            client_port: port,
            vip: "192.0.2.1".parse().unwrap(),
            port: 80,
            isn,
            segment: &[],
        }
    }

    fn dispatcher(p: PolicyName) -> Dispatcher {
        Dispatcher::new(build(p), SynRecords::new(1024, 64_000), 3)
    }

    #[test]
    fn master_is_a_candidate() {
        let v = view(1);
        let mut d = dispatcher(PolicyName::RoundRobin);
        let got: Vec<_> = (0..3)
            .map(|i| d.decide(&syn(i, i.into()), &v, 0).decision)
            .collect();
        assert_eq!(
            got,
            vec![
                Decision::Local,
                Decision::Forward { index: 1 },
                Decision::Forward { index: 2 }
            ]
        );
    }

    #[test]
    fn retransmitted_syn_goes_to_the_first_node() {
        let v = view(1);
        let mut d = dispatcher(PolicyName::RoundRobin);
        let first = d.decide(&syn(40000, 77), &v, 0);
        assert_eq!(first.decision, Decision::Local);
        let again = d.decide(&syn(40000, 77), &v, 1000);
        assert_eq!(
            again,
            Outcome {
                decision: Decision::Local,
                retransmit: true,
                sticky: false
            }
        );
        // A new ISN on the same port is a new connection: the policy decides.
        let fresh = d.decide(&syn(40000, 78), &v, 2000);
        assert!(!fresh.retransmit);
        assert_eq!(fresh.decision, Decision::Forward { index: 1 });
        // Once that node dies, a retransmission is re-dispatched rather than black-holed.
        v.nodes[1].alive.store(false, Relaxed);
        let after = d.decide(&syn(40000, 78), &v, 3000);
        assert!(!after.retransmit);
        assert_ne!(after.decision, Decision::Forward { index: 1 });
    }

    /// A removed node is never chosen, not even for a retransmission of a SYN it took; once
    /// added back it takes its share again.
    #[test]
    fn removed_nodes_get_nothing_and_return_when_added() {
        use crate::cluster::view::MemberSlot;
        let v = view(1);
        let mut d = dispatcher(PolicyName::RoundRobin);
        let slot = |id: u32| MemberSlot {
            id,
            address: format!("198.51.100.1{id}").parse().unwrap(),
            weight: 1,
            voter: true,
        };
        // Node 3 (index 2) takes a SYN, then leaves.
        let mut isn = 0;
        let to3 = loop {
            isn += 1;
            if d.decide(&syn(7, isn), &v, 0).decision == (Decision::Forward { index: 2 }) {
                break isn;
            }
        };
        v.set_members(&[slot(1), slot(2)]).unwrap();
        for i in 0..30 {
            assert_ne!(
                d.decide(&syn(100 + i, i.into()), &v, 0).decision,
                Decision::Forward { index: 2 }
            );
        }
        let again = d.decide(&syn(7, to3), &v, 10);
        assert!(
            !again.retransmit,
            "the record of a removed node is not followed"
        );
        assert_ne!(again.decision, Decision::Forward { index: 2 });
        v.set_members(&[slot(1), slot(2), slot(3)]).unwrap();
        assert_ne!(
            d.decide(&syn(400, 1), &v, 20).decision,
            Decision::Forward { index: 2 },
            "a returning node waits for its first report"
        );
        v.nodes[2].alive.store(true, Relaxed);
        let back = (0..30)
            .filter(|i| {
                d.decide(&syn(500 + i, (*i).into()), &v, 20).decision
                    == (Decision::Forward { index: 2 })
            })
            .count();
        assert_eq!(back, 10, "node 3 takes its third again");
    }

    #[test]
    fn new_decisions_are_handed_off_retransmits_are_not_and_overflow_is_counted() {
        let v = view(1);
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let mut d = dispatcher(PolicyName::RoundRobin).with_handoff(tx);
        d.decide(&syn(1, 10), &v, 0);
        d.decide(&syn(1, 10), &v, 1);
        d.decide(&syn(2, 20), &v, 2);
        d.decide(&syn(3, 30), &v, 3);
        let got: Vec<_> = rx.try_iter().collect();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].port, got[0].isn, got[0].node_id), (1, 10, 1));
        assert_eq!((got[1].port, got[1].isn, got[1].node_id), (2, 20, 2));
        assert_eq!(d.take_handoff_drops(), 1);
        assert_eq!(d.take_handoff_drops(), 0);
    }

    #[test]
    fn adopted_records_steer_retransmissions() {
        let v = view(1);
        let mut d = dispatcher(PolicyName::RoundRobin);
        let client = "192.0.2.101".parse().unwrap();
        d.adopt(&[
            RecordEntry {
                client,
                port: 5,
                isn: Some(55),
                node: 2,
                stamp_ms: 0,
            },
            RecordEntry {
                client,
                port: 6,
                isn: None,
                node: 1,
                stamp_ms: 0,
            },
        ]);
        let o = d.decide(&syn(5, 55), &v, 10);
        assert_eq!(o.decision, Decision::Forward { index: 2 });
        assert!(o.retransmit);
        let o = d.decide(&syn(6, 999), &v, 10);
        assert_eq!(o.decision, Decision::Forward { index: 1 });
        assert!(o.retransmit);
    }

    fn sticky_dispatcher(p: PolicyName, timeout_ms: u64) -> Dispatcher {
        dispatcher(p).with_affinity(Affinity::new(&crate::datapath::sticky::AffinitySettings {
            timeout: std::time::Duration::from_millis(timeout_ms),
            prefix_v4: 32,
            prefix_v6: 128,
            capacity: 1024,
        }))
    }

    fn syn_from(client: &str, port: u16, isn: u32) -> Syn<'static> {
        Syn {
            client: client.parse().unwrap(),
            ..syn(port, isn)
        }
    }

    /// iperf3's case: a client's data connections follow its control connection, while other
    /// clients are spread by the policy; without affinity round robin splits them.
    #[test]
    fn with_affinity_a_client_keeps_its_node_until_the_timeout() {
        let v = view(1);
        let mut d = sticky_dispatcher(PolicyName::RoundRobin, 1000);
        let first = d.decide(&syn_from("192.0.2.101", 1, 1), &v, 0);
        assert!(!first.sticky);
        for port in 2..8 {
            let o = d.decide(&syn_from("192.0.2.101", port, port.into()), &v, 100);
            assert_eq!(o.decision, first.decision);
            assert!(o.sticky);
        }
        let other = d.decide(&syn_from("192.0.2.102", 1, 1), &v, 100);
        assert_ne!(
            other.decision, first.decision,
            "the policy spreads other clients"
        );
        assert!(!other.sticky);
        // Renewed at 100 ms: lives until 1100 ms.
        let late = d.decide(&syn_from("192.0.2.101", 9, 9), &v, 1099);
        assert!(late.sticky);
        let expired = d.decide(&syn_from("192.0.2.101", 10, 10), &v, 2100);
        assert!(!expired.sticky, "timed out: the policy picks again");

        let mut plain = dispatcher(PolicyName::RoundRobin);
        let a = plain.decide(&syn_from("192.0.2.101", 1, 1), &v, 0).decision;
        let b = plain.decide(&syn_from("192.0.2.101", 2, 2), &v, 0).decision;
        assert_ne!(
            a, b,
            "without affinity the second connection goes elsewhere"
        );
    }

    /// An entry naming a node that stopped being eligible is not followed, and the policy's
    /// new choice replaces it; a retransmitted SYN still follows its record first.
    #[test]
    fn affinity_yields_to_eligibility_and_records_come_first() {
        let v = view(1);
        let mut d = sticky_dispatcher(PolicyName::RoundRobin, 10_000);
        let c = "192.0.2.101";
        let to = d.decide(&syn_from(c, 1, 1), &v, 0).decision;
        let index = match to {
            Decision::Local => 0,
            Decision::Forward { index } => index,
            Decision::NoNode => unreachable!("every node is eligible"),
        };
        v.nodes[index].draining.store(true, Relaxed);
        let moved = d.decide(&syn_from(c, 2, 2), &v, 1);
        assert!(!moved.sticky);
        assert_ne!(moved.decision, to, "a draining node gets no new connection");
        v.nodes[index].draining.store(false, Relaxed);
        let again = d.decide(&syn_from(c, 3, 3), &v, 2);
        assert!(again.sticky);
        assert_eq!(
            again.decision, moved.decision,
            "the entry names the new node"
        );
        // A retransmission of the first SYN still goes where its first copy went.
        let re = d.decide(&syn_from(c, 1, 1), &v, 3);
        assert!(re.retransmit && !re.sticky);
        assert_eq!(re.decision, to);
    }

    #[test]
    fn adopted_affinity_steers_new_connections() {
        let v = view(1);
        let mut d = sticky_dispatcher(PolicyName::RoundRobin, 10_000);
        d.adopt_affinity(&[RecordEntry {
            client: "192.0.2.101".parse().unwrap(),
            port: 0,
            isn: None,
            node: 2,
            stamp_ms: 0,
        }]);
        for port in 1..10 {
            let o = d.decide(&syn_from("192.0.2.101", port, port.into()), &v, 5);
            assert_eq!(o.decision, Decision::Forward { index: 2 });
            assert!(o.sticky);
        }
        dispatcher(PolicyName::RoundRobin).adopt_affinity(&[]);
    }

    #[test]
    fn dead_and_draining_nodes_get_nothing() {
        let v = view(2);
        v.nodes[0].alive.store(false, Relaxed);
        v.nodes[2].draining.store(true, Relaxed);
        let mut d = dispatcher(PolicyName::RoundRobin);
        for i in 0..10 {
            assert_eq!(d.decide(&syn(i, 0), &v, 0).decision, Decision::Local);
        }
        // An unhealthy master (its own slot, index 1) takes none itself: the healthy peer
        // gets them.
        v.nodes[2].draining.store(false, Relaxed);
        v.nodes[1].unhealthy.store(true, Relaxed);
        for i in 10..20 {
            assert_eq!(
                d.decide(&syn(i, 0), &v, 0).decision,
                Decision::Forward { index: 2 }
            );
        }
        v.nodes[1].unhealthy.store(false, Relaxed);
        v.nodes[2].draining.store(true, Relaxed);
        // Even with every peer dead the master counts itself alive.
        v.nodes[2].draining.store(false, Relaxed);
        v.nodes[2].alive.store(false, Relaxed);
        assert_eq!(d.decide(&syn(99, 0), &v, 0).decision, Decision::Local);
    }

    #[test]
    fn weight_zero_and_weights_from_the_view_reach_the_policy() {
        let v = view(1);
        v.set_weights(&[0, 1, 3]);
        let mut d = dispatcher(PolicyName::WeightedRoundRobin);
        let mut count = [0u32; 3];
        for i in 0..400 {
            match d.decide(&syn(i, i.into()), &v, 0).decision {
                Decision::Forward { index } => count[index] += 1,
                other => panic!("weight 0 master took {other:?}"),
            }
        }
        assert_eq!(count, [0, 100, 300]);
    }

    /// The herd case end to end through the dispatcher: node 3 reported load 0, the others 4
    /// busy slots, and no report comes for 30 SYNs.
    #[test]
    fn least_load_charges_inflight_until_the_next_report() {
        let v = view(1);
        v.nodes[0].load.store(4000, Relaxed);
        v.nodes[1].load.store(4000, Relaxed);
        let mut d = dispatcher(PolicyName::LeastLoad);
        let to_idle = (0..30)
            .filter(|i| d.decide(&syn(*i, 0), &v, 0).decision == (Decision::Forward { index: 2 }))
            .count();
        // 4 to catch up, then a third of 26; without the charge, all 30.
        assert!((12..=13).contains(&to_idle), "herded {to_idle} of 30");
        v.nodes[2].report_gen.fetch_add(1, Relaxed);
        assert_eq!(
            d.decide(&syn(500, 0), &v, 0).decision,
            Decision::Forward { index: 2 },
            "a fresh report of load 0 makes node 3 the lightest again"
        );
    }

    #[test]
    fn least_connections_counts_inflight_until_the_next_report() {
        let v = view(1);
        v.nodes[0].established.store(10, Relaxed);
        v.nodes[1].established.store(10, Relaxed);
        v.nodes[2].established.store(0, Relaxed);
        let mut d = dispatcher(PolicyName::LeastConnections);
        let mut to_idle = 0;
        for i in 0..30 {
            if d.decide(&syn(i, 0), &v, 0).decision == (Decision::Forward { index: 2 }) {
                to_idle += 1;
            }
        }
        // 10 to catch up, then a third of the other 20; without in-flight counting, all 30.
        assert!(
            (16..=17).contains(&to_idle),
            "herded {to_idle} of 30 onto the idle node"
        );
        // A fresh report resets the in-flight estimate for that node.
        v.nodes[2].established.store(0, Relaxed);
        v.nodes[2].report_gen.fetch_add(1, Relaxed);
        assert_eq!(
            d.decide(&syn(500, 0), &v, 0).decision,
            Decision::Forward { index: 2 }
        );
    }
}
