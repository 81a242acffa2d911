//! State shared between the daemon's threads without locks.
//!
//! The nfq thread (master path), the receive thread (member path), the report task and the
//! control socket all read or bump these. Everything is an atomic in a fixed-size table
//! allocated at start, so the per-SYN path neither locks nor allocates.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// One node's slot, as seen from this node.
#[derive(Debug)]
pub struct NodeSlot {
    pub id: u32,
    pub address: IpAddr,
    /// Reports arrive within `health.dead_after_ms`. This node's own slot is always alive.
    pub alive: AtomicBool,
    /// The node announced, in its reports, that it takes no new connections (`tdscctl drain`
    /// on that node). This node's own slot is the source of truth for its own reports.
    pub draining: AtomicBool,
    /// Relative share of new connections, announced by the node in its reports; starts at the
    /// configured `[[nodes]] weight`. 0 = no new connections.
    pub weight: AtomicU32,
    /// The node's load figure in milli-units (see `[scheduler] load_file`), as last reported.
    pub load: AtomicU32,
    /// ESTABLISHED and SYN-RECV sockets on the VIP, as last reported.
    pub established: AtomicU32,
    pub syn_recv: AtomicU32,
    /// Bumped on every report, so the dispatcher knows to reset its in-flight count.
    pub report_gen: AtomicU64,
    /// Monotonic milliseconds of the last report (0 = never).
    pub last_seen_ms: AtomicU64,
}

#[derive(Debug)]
pub struct ClusterView {
    pub nodes: Box<[NodeSlot]>,
    pub self_index: usize,
}

impl ClusterView {
    pub fn new(nodes: &[crate::config::Node], self_id: u32) -> Self {
        let slots: Vec<NodeSlot> = nodes
            .iter()
            .map(|n| NodeSlot {
                id: n.id,
                address: n.address,
                alive: AtomicBool::new(n.id == self_id),
                draining: AtomicBool::new(false),
                weight: AtomicU32::new(crate::config::DEFAULT_WEIGHT),
                load: AtomicU32::new(0),
                established: AtomicU32::new(0),
                syn_recv: AtomicU32::new(0),
                report_gen: AtomicU64::new(0),
                last_seen_ms: AtomicU64::new(0),
            })
            .collect();
        let self_index = nodes.iter().position(|n| n.id == self_id).unwrap_or(0);
        ClusterView {
            nodes: slots.into_boxed_slice(),
            self_index,
        }
    }

    /// Sets the configured weights, in node order, before any report arrives.
    pub fn set_weights(&self, weights: &[u32]) {
        for (slot, w) in self.nodes.iter().zip(weights) {
            slot.weight.store(*w, Relaxed);
        }
    }

    pub fn index_of_address(&self, a: &IpAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.address == *a)
    }

    pub fn index_of_id(&self, id: u32) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Event counters; `tdscctl status` shows a snapshot.
        #[derive(Debug, Default)]
        pub struct Counters { $( $(#[$doc])* pub $name: AtomicU64, )* }

        #[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
        pub struct CountersSnapshot { $( pub $name: u64, )* }

        impl Counters {
            pub fn snapshot(&self) -> CountersSnapshot {
                CountersSnapshot { $( $name: self.$name.load(Relaxed), )* }
            }
        }
    };
}

counters! {
    /// SYNs taken off the queue and given to the policy (master).
    syns_dispatched,
    /// Of those, sent to another node as proto-253.
    forwarded_out,
    /// Of those, accepted by the master itself.
    accepted_locally,
    /// Retransmitted SYNs sent to the node that took the first copy.
    retransmit_hits,
    /// SYNs dropped because no node was eligible.
    dropped_no_node,
    /// Queued packets that were not a dispatchable SYN (should stay 0: the ruleset filters).
    queue_rejected,
    /// Packets queued while this node was not master (a role change in flight); dropped.
    dropped_not_master,
    /// sendto() of a forward failed.
    forward_send_errors,
    /// Valid forwarded SYNs received from the master (member path).
    received_forwarded,
    /// Of those, written into the local TCP stack.
    reinjected,
    /// Re-injection failed (the SYN is lost; the client will retransmit).
    reinject_errors,
    /// Forward packets refused, by reason.
    rejected_malformed,
    rejected_unknown_peer,
    rejected_wrong_vip,
    rejected_not_syn,
    rejected_bad_port,
    /// Live SYN-forward records pushed out by a full table (SYN flood).
    records_evicted_live,
    /// New records not handed to the Raft task for replication: the hand-off was full.
    records_handoff_overflow,
}

pub fn add(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}
