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
        pub struct Counters {
            $( $(#[$doc])* pub $name: AtomicU64, )*
            /// The size of every batch the queue reader took off NFQUEUE (master thread, once
            /// per receive that returned packets; never per SYN).
            pub queue_batch_sizes: Histogram<{ BATCH_SIZE_BOUNDS.len() }>,
        }

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

/// Upper bounds of the queue batch-size histogram's buckets, in packets: powers of two up to
/// `crate::datapath::queue_socket::MAX_BATCH` (64), the most one receive returns.
pub const BATCH_SIZE_BOUNDS: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];

/// Upper bounds of the takeover-duration histogram's buckets, in milliseconds: a takeover
/// waits at most `[scheduler] syn_recv_wait_ms` (50 ms by default, 2 s at most) for answers.
pub const TAKEOVER_MS_BOUNDS: [u64; 9] = [1, 5, 10, 25, 50, 100, 250, 500, 2000];

/// A histogram of atomics with fixed bucket bounds, for one writer that observes rarely (once
/// per queue batch, once per takeover), read by `/metrics` ([`crate::metrics`]). An
/// observation is two or three relaxed `fetch_add`s: no lock, no allocation. The bounds are
/// the caller's constant, passed on every call, so the histogram holds only counts.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    /// Observations at most `bounds[i]` and above `bounds[i - 1]` (not cumulative).
    buckets: [AtomicU64; N],
    /// Observations above the last bound.
    over: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    /// Counts `value` in the first bucket whose bound (in `bounds`, ascending) holds it.
    pub fn observe(&self, bounds: &[u64; N], value: u64) {
        match bounds.iter().position(|b| value <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Relaxed),
            None => self.over.fetch_add(1, Relaxed),
        };
        self.sum.fetch_add(value, Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self, bounds: &[u64; N]) -> HistogramSnapshot {
        let buckets: Vec<(u64, u64)> = bounds
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| (*b, c.load(Relaxed)))
            .collect();
        HistogramSnapshot {
            buckets,
            over: self.over.load(Relaxed),
            sum: self.sum.load(Relaxed),
        }
    }
}

/// A [`Histogram`] read at one moment. Read without a lock, so a concurrent observation may be
/// in `sum` and not yet in a bucket; the next read has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// (upper bound, observations above the bound before it and at most this one), ascending;
    /// not cumulative.
    pub buckets: Vec<(u64, u64)>,
    /// Observations above the last bound.
    pub over: u64,
    pub sum: u64,
}

impl HistogramSnapshot {
    /// Every observation.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|(_, c)| c).sum::<u64>() + self.over
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_each_value_once_and_count_what_is_over_the_last_bound() {
        let h = Histogram::<3>::default();
        let bounds = [1, 4, 16];
        for v in [0, 1, 2, 4, 5, 16, 17, 1000] {
            h.observe(&bounds, v);
        }
        let s = h.snapshot(&bounds);
        assert_eq!(s.buckets, vec![(1, 2), (4, 2), (16, 2)]);
        assert_eq!(s.over, 2);
        assert_eq!(s.count(), 8);
        assert_eq!(s.sum, 1045);
    }
}
