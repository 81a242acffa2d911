//! Event counters, bumped lock-free by their one writer each and read by `tdscctl status`.
//!
//! [`Counters`] are the data paths' (the master thread's and the receive thread's; which
//! counter belongs to which is in its doc); [`ReportCounters`] the cluster socket's (the
//! report sender counts `sent`, the bus receive loop `received` and `rejected`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

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
    /// Forwards stamped with an older election term than this node knows (a deposed master).
    rejected_stale_term,
    /// Forwards whose tag does not verify: forged, altered, or tagged with another cluster key.
    rejected_bad_tag,
    /// Forwards tagged with a key id this node's keyring does not hold.
    rejected_unknown_key,
    /// Authentic forwards whose counter was seen before (or fell out of the replay window, or
    /// belongs to an older term of that origin): a captured forward sent again.
    rejected_replay,
    /// Live SYN-forward records pushed out by a full table (SYN flood).
    records_evicted_live,
    /// New records not handed to the Raft task for replication: the hand-off was full.
    records_handoff_overflow,
    /// New connections sent to the node named by their client's affinity entry.
    affinity_hits,
    /// Live client-affinity entries pushed out by a full table.
    affinity_evicted_live,
    /// Packets taken off NFQUEUE (master thread).
    queue_received,
    /// Receives that returned at least one packet: `queue_received / queue_batches` is the
    /// mean batch (master thread).
    queue_batches,
    /// The largest batch so far (a high-water mark, not a count; master thread).
    queue_batch_max,
    /// Receives that failed with `ENOBUFS`, or `NLMSG_OVERRUN` messages: the queue socket's
    /// buffer overran and the kernel dropped SYNs (master thread).
    queue_enobufs,
    /// Verdicts the kernel refused (an error reply for a verdict message; master thread).
    queue_verdict_errors,
    /// Queue datagrams that did not parse, or were cut short (master thread).
    queue_malformed,
    /// The queue socket's receive buffer in bytes, as the kernel reports it (a setting, not a
    /// count; written once by the master thread).
    queue_rcvbuf,
}

pub fn add(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Datagrams on the cluster socket (`crate::cluster::bus`, `crate::cluster::report`).
#[derive(Debug, Default)]
pub struct ReportCounters {
    /// Reports sent (the report task).
    pub sent: AtomicU64,
    /// Datagrams accepted: sealed with the cluster key by a member, not a replay, and taken by
    /// an owner (the bus).
    pub received: AtomicU64,
    /// Datagrams refused, for any of the reasons below (the bus).
    pub rejected: AtomicU64,
    /// Refused, by reason (the bus; see `crate::cluster::bus::DropReason`).
    pub drops: ClusterDropCounters,
}

/// The cluster socket's refusals by reason; one counter per `crate::cluster::bus::DropReason`.
#[derive(Debug, Default)]
pub struct ClusterDropCounters {
    /// The UDP source port is not the cluster port.
    pub source_port: AtomicU64,
    /// Shorter than a sealed header and tag, or a seal version this build does not speak.
    pub bad_header: AtomicU64,
    /// Sealed with a key id this node's keyring does not hold.
    pub unknown_key: AtomicU64,
    /// The tag does not verify: forged, corrupted, or sealed with another key of that id.
    pub bad_tag: AtomicU64,
    /// Authentic, but the source address is not a present member's, the sealed sender id is
    /// not that member's, or it is this node's own.
    pub unknown_sender: AtomicU64,
    /// Authentic, but a counter seen before or older than the sender's replay window.
    pub replay: AtomicU64,
    /// Authentic and fresh, but the plaintext is not an envelope of this sender.
    pub undecodable: AtomicU64,
    /// Accepted, but its owner's channel was full or closed (or there is no owner).
    pub no_owner: AtomicU64,
}
