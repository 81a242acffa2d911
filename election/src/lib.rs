//! Who is master.
//!
//! The rest of the daemon never asks *how* the master was chosen; it watches a [`RoleSignal`]
//! and reacts to each new [`Leadership`] value: it swaps its ruleset between master and member
//! and starts or idles its SYN dispatcher. The value comes from configuration
//! ([`StaticElection`], `[election] mode = "static"`) or from a Raft group of all nodes
//! ([`RaftCore`], `mode = "raft"`, the default): the Raft leader is the master. Under Raft the
//! group's voters change at run time through conf changes ([`RaftCore::propose_membership`],
//! [`Output::membership`]); the configured nodes are only the bootstrap set.
//!
//! ```
//! use tdsc_election::{Role, StaticElection};
//! let signal = StaticElection { node_id: 2, master: 1 }.start();
//! let now = *signal.subscribe().borrow();
//! assert_eq!(now.role, Role::Member);
//! assert_eq!(now.master_id, Some(1));
//! ```
//!
//! # No two dispatchers, ever
//!
//! Raft alone guarantees at most one leader *per term*, not at most one leader *at a time*: a
//! leader cut off from the cluster network still believes it leads until check-quorum deposes
//! it, while the others may already have elected a successor. Its client interface still
//! receives every SYN, so it must stop dispatching on its own, before any successor can start.
//! The mechanism is a **lease** (see [`raft_core`]):
//!
//! * The leader renews it every tick with a read-index heartbeat carrying the send time `s`
//!   (its monotonic clock). When a quorum (itself included) has acknowledged that heartbeat,
//!   it may dispatch until `s + L`, with `L = lease_ms = (election_tick - 2) * tick_ms`. The
//!   NFQUEUE thread compares its clock with that deadline for every packet (one atomic load)
//!   and drops the SYN once it has passed; the ruleset also turns member when the lease
//!   lapses, and `check_quorum` deposes the leader after an election timeout without quorum.
//! * A follower that acknowledged at `r >= s` has reset its election clock, and with
//!   check-quorum and pre-vote it refuses (pre-)votes of any other candidate until it has
//!   counted `election_tick` ticks: at least `(election_tick - 1) * tick_ms` of its clock.
//!   A successor needs votes from a quorum, and every quorum shares a node with the one that
//!   acknowledged. So no successor can be elected, much less get its own first lease, before
//!   `r + (election_tick - 1) * tick_ms` as measured by that follower.
//! * The inequality relied on, with `ρ` the largest relative clock-rate difference between
//!   two nodes and `δ` the longest time between the dispatcher's lease check and its verdict
//!   taking effect:
//!
//!   ```text
//!   (s + L) · (1 + ρ) + δ  <  r + (election_tick − 1) · tick_ms
//!   ⇐  L + δ + ρ·L  <  (election_tick − 1) · tick_ms      (since r ≥ s)
//!   ⇐  tick_ms  >  δ + ρ · L                               (L = (election_tick − 2) · tick_ms)
//!   ```
//!
//!   With the defaults (10 ms ticks, `election_tick` 10, `L` = 80 ms) that holds for any
//!   clock-rate error below 10 % with δ ≤ 2 ms; the verdict for one SYN takes microseconds.
//!   Monotonic clocks (`CLOCK_MONOTONIC`) of one machine's kernels agree far better than that.
//! * Ticks are never delivered in a burst to catch up (tokio `MissedTickBehavior::Delay`), so
//!   a stalled node only counts *more* slowly.
//! * A node that restarts forgets the leader it acknowledged; it therefore ignores vote
//!   requests for its first `election_tick` ticks ([`StepError::StartupGuard`]).
//! * Stepping down revokes the lease in the same `ready` call, and the shell stores the
//!   revoked lease before it sends any message (a vote included).
//!
//! Two more fences stand behind the lease. A daemon that crashes on the master leaves the
//! queue rule without a consumer, and the rule has no bypass: the kernel drops client SYNs
//! rather than accept them (fail-closed). A daemon that starts installs the member ruleset
//! before it does anything else, and starts as a Raft follower with no lease.
//!
//! # Which SYN went where
//!
//! The same Raft group replicates the master's SYN-forward records (paper §3.5): the leader's
//! shell proposes batches of them ([`RaftCore::propose`]), every node's shell gets committed
//! batches back in [`Output::committed`] and applies them *before* it publishes the
//! leadership of the same [`Output`]. A node's first lease needs an entry of its own term
//! committed, which commits every earlier entry, so a new master has applied every record
//! committed under its predecessors before it may dispatch. What a record not yet committed
//! loses, and how the daemon covers it (SYN-RECV reconciliation), is in the daemon's
//! `takeover` module. The log is compacted to a bounded tail (see [`raft_core`]).
//!
//! What the lease does not cover: a forward already on the wire when the lease lapses still
//! reaches its member. It was dispatched before the successor could start, so it names a
//! connection that no other node has been given.
//!
//! # Fencing at members (defence in depth)
//!
//! The lease rests on the inequality above. Should it ever fail (a clock running far off, a
//! dispatcher thread stalled between its lease check and its verdict for longer than a
//! tick), a deposed master could still forward SYNs beside its successor. Every forward
//! therefore carries the dispatcher's election term in its header, and a member refuses a
//! forward whose term is **older than the highest term it knows** (counted as
//! `rejected_stale_term`; the SYN is dropped and the client retransmits to the real master).
//! A successor's term is higher than its predecessor's, and a successor exists only once a
//! quorum has voted in that term; so a lease-violating stale master's forwards are refused by
//! every member that has heard of the new term — the voters at once, the others from the
//! successor's first heartbeat. What fencing cannot stop is a stale master accepting a SYN
//! *itself* (no forward is involved); that case stays with the lease alone. Equal and newer
//! terms pass (the master may hear of a new term before a member does), and a static
//! election is term 1 everywhere, so fencing never refuses its forwards.
//!
//! # Leadership transfer (graceful stop)
//!
//! A leader that is asked to stop hands leadership over instead of leaving the group to time
//! out ([`RaftCore::transfer_leadership`], raft-rs `transfer_leader`). raft-rs sends the
//! chosen follower `MsgTimeoutNow`, and that follower campaigns at once with a **forced**
//! vote request (`CampaignTransfer`): followers grant it even while they still honour the old
//! leader's lease, so the second bullet of the argument above no longer holds for the
//! transfer. The order is therefore fixed:
//!
//! 1. the old leader stops dispatching for good: its shell stores a revoked lease (0) and
//!    keeps storing 0 whatever the core computes, publishes itself as member, installs the
//!    member ruleset and clears the master flag;
//! 2. only then is `transfer_leadership` called, so the `MsgTimeoutNow` it queues leaves in
//!    a later `ready`, after the revoked lease is visible to the dispatcher.
//!
//! Between 1 and the successor's first lease nobody dispatches, and client SYNs are dropped
//! (fail-closed; clients retransmit). `election/tests/sim.rs` shows both sides: a transfer
//! after resigning never overlaps leases even when the old leader hears nothing more, and the
//! same transfer without resigning first does.

use tokio::sync::watch;

pub mod inbound;
pub mod log_file;
pub mod raft_core;
pub use raft_core::{
    MemberChange, Membership, Output, PersistJob, Persisted, ProposeError, RaftCore, RaftError,
    RaftSettings, StepError,
};

/// A node's part in dispatching new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes client SYNs off the queue and dispatches them.
    Master,
    /// Drops client SYNs; accepts only SYNs forwarded by the master.
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Member => "member",
        }
    }
}

/// One published decision: this node's role, who the master is, and in which term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub role: Role,
    /// `None` while no master is known (during an election): nobody dispatches then.
    pub master_id: Option<u32>,
    /// Election term; a static configuration is term 1 forever.
    pub term: u64,
}

impl Leadership {
    /// The state every daemon starts in, before any election result: a member that knows no
    /// master. It is the safe state (no SYN is accepted from the client interface).
    pub const fn unknown() -> Self {
        Leadership {
            role: Role::Member,
            master_id: None,
            term: 0,
        }
    }
}

/// The role signal: one writer (the election), many readers (rules, dispatcher, status).
#[derive(Debug)]
pub struct RoleSignal {
    tx: watch::Sender<Leadership>,
}

impl RoleSignal {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Leadership::unknown());
        RoleSignal { tx }
    }

    /// Publishes a decision. Readers see only changes.
    pub fn publish(&self, l: Leadership) {
        self.tx.send_if_modified(|cur| {
            let changed = *cur != l;
            *cur = l;
            changed
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Leadership {
        *self.tx.borrow()
    }
}

impl Default for RoleSignal {
    fn default() -> Self {
        Self::new()
    }
}

/// `[election] mode = "static"`: the configured master is master, forever, in term 1.
#[derive(Debug, Clone, Copy)]
pub struct StaticElection {
    pub node_id: u32,
    pub master: u32,
}

impl StaticElection {
    pub fn decide(&self) -> Leadership {
        Leadership {
            role: if self.node_id == self.master {
                Role::Master
            } else {
                Role::Member
            },
            master_id: Some(self.master),
            term: 1,
        }
    }

    /// A signal that already carries the static decision.
    pub fn start(&self) -> RoleSignal {
        let s = RoleSignal::new();
        s.publish(self.decide());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_election_picks_the_configured_master() {
        let m = StaticElection {
            node_id: 3,
            master: 3,
        }
        .decide();
        assert_eq!(m.role, Role::Master);
        assert_eq!(m.master_id, Some(3));
        let s = StaticElection {
            node_id: 1,
            master: 3,
        }
        .decide();
        assert_eq!(s.role, Role::Member);
    }

    #[test]
    fn readers_see_changes_only() {
        let sig = RoleSignal::new();
        let mut rx = sig.subscribe();
        assert_eq!(*rx.borrow_and_update(), Leadership::unknown());
        sig.publish(Leadership::unknown());
        assert!(!rx.has_changed().unwrap());
        let m = Leadership {
            role: Role::Master,
            master_id: Some(1),
            term: 2,
        };
        sig.publish(m);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), m);
        assert_eq!(sig.current(), m);
    }
}
