//! Whether this node dispatches right now, under which term and lease ([`RoleCell`]), who may
//! change that ([`ElectionWriter`], [`MasterFlag`]), and the role transition as a plan of
//! steps ([`plan`]) that the role shell in `crate::node` carries out in order.
//!
//! # One writer per field
//!
//! The cell is read per packet by the data-path threads and by the report, bus and takeover
//! tasks, through `&RoleCell` read methods only. Its fields have one writer each, and the
//! type system holds them to it: [`RoleCell::new`] hands out exactly one writer of each kind,
//! and neither is `Clone`.
//!
//! * **term and lease** belong to the election: the Raft task holds the [`ElectionWriter`]
//!   (it raises the term *before* it publishes a leadership, so the member path fences stale
//!   forwards at once, and it stores the lease before anything it says could help another
//!   node win). Under a static election the node's start-up writes term 1 and an endless
//!   lease with it, and its teardown revokes the lease.
//! * **the master flag** belongs to the role shell (`crate::node`), which sets and clears it
//!   only as a step of a [`plan`], so the flag and the ruleset change in the safe order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use tdsc_election::Role;

/// Whether this node dispatches right now, and under which term. See the module docs for who
/// writes what.
#[derive(Debug)]
pub struct RoleCell {
    /// Set by the role shell while this node holds master duties (see [`plan`]).
    master: AtomicBool,
    /// The highest election term this node knows: stamped on every forward while master, and
    /// the member path's fence against forwards from older terms (see
    /// `crate::datapath::receive`). Only rises.
    term: AtomicU64,
    /// The election lease: the master thread dispatches only while [`RoleCell::now_ms`] is
    /// below this. The election writes it (and writes 0 before it says anything that could
    /// help another node win); a static election sets it to `u64::MAX`. See
    /// `tdsc_election`'s docs for the timing argument.
    lease_until_ms: AtomicU64,
    /// The clock both the lease and the SYN-forward records are measured on.
    epoch: Instant,
}

impl Default for RoleCell {
    /// A cell nobody can write: member, term 0, no lease. For readers that need one in tests.
    fn default() -> Self {
        RoleCell {
            master: AtomicBool::new(false),
            term: AtomicU64::new(0),
            lease_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl RoleCell {
    /// A fresh cell (member, term 0, no lease) and its only two writers.
    pub fn new() -> (Arc<RoleCell>, ElectionWriter, MasterFlag) {
        let cell = Arc::new(RoleCell::default());
        (
            cell.clone(),
            ElectionWriter { cell: cell.clone() },
            MasterFlag { cell },
        )
    }

    /// This node holds master duties (the master flag).
    pub fn is_master(&self) -> bool {
        self.master.load(Relaxed)
    }

    /// The highest election term this node knows.
    pub fn term(&self) -> u64 {
        self.term.load(Relaxed)
    }

    /// The end of the election lease, on the [`RoleCell::now_ms`] clock.
    pub fn lease_until_ms(&self) -> u64 {
        self.lease_until_ms.load(Relaxed)
    }

    /// The start of the lease clock.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Milliseconds on the lease clock.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The election's writes to the [`RoleCell`]: term and lease. One per cell, not `Clone`;
/// held by the Raft task, or by the node itself under a static election.
///
/// The lease dies with its writer: dropping it revokes the lease, so an election that ends
/// in any way (stopped, aborted, failed to start) leaves no lease behind.
#[derive(Debug)]
pub struct ElectionWriter {
    cell: Arc<RoleCell>,
}

impl Drop for ElectionWriter {
    fn drop(&mut self) {
        self.revoke_lease();
    }
}

impl ElectionWriter {
    /// Raises the known term to `term` (never lowers it).
    pub fn raise_term(&self, term: u64) {
        self.cell.term.fetch_max(term, Relaxed);
    }

    /// Sets the lease's end, on the [`RoleCell::now_ms`] clock.
    pub fn set_lease_until_ms(&self, until_ms: u64) {
        self.cell.lease_until_ms.store(until_ms, Relaxed);
    }

    /// Revokes the lease: the master thread stops dispatching at its next packet.
    pub fn revoke_lease(&self) {
        self.set_lease_until_ms(0);
    }

    /// The cell, for reading.
    pub fn cell(&self) -> &RoleCell {
        &self.cell
    }
}

/// The role shell's write to the [`RoleCell`]: the master flag. One per cell, not `Clone`.
#[derive(Debug)]
pub struct MasterFlag {
    cell: Arc<RoleCell>,
}

impl MasterFlag {
    pub fn set(&self) {
        self.cell.master.store(true, Relaxed);
    }

    pub fn clear(&self) {
        self.cell.master.store(false, Relaxed);
    }
}

/// What the role shell has made of this node so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duty {
    /// Nothing installed yet (process start).
    Starting,
    /// Member ruleset, master flag off.
    Member,
    /// Master ruleset and master flag — or possibly part of them: a plan towards master that
    /// failed half-way leaves this, so that the way back runs in full.
    Master,
}

/// What happens to the node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The election's word: become master or member (start-up is `Become(Member)` from
    /// [`Duty::Starting`]).
    Become(Role),
    /// A graceful stop under Raft: never dispatch again, then hand leadership on.
    Resign,
    /// Teardown: the election stops, then the node leaves master duties.
    Stop,
}

/// One step of a role transition, carried out by the role shell (`crate::node`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Hand the master thread the replicated records and the cluster's SYN-RECV sockets
    /// (`crate::cluster::takeover`), as a command it processes before its next SYN.
    Adopt,
    SetMasterFlag,
    /// The master ruleset: client SYNs for the VIP go to the queue.
    InstallMasterRules,
    /// The member ruleset: client SYNs for the VIP are dropped.
    InstallMemberRules,
    ClearMasterFlag,
    /// Tell the Raft task to revoke the lease for good and publish this node as member
    /// (`RaftCommand::Resign`).
    Resign,
    /// Ask the Raft task to hand leadership to a live follower, if this node leads.
    HandOver,
    /// Stop the election: the Raft task revokes the lease as it ends and is joined (a static
    /// election's lease is revoked); no election message leaves after this.
    StopElection,
}

/// The steps from `from` through `t`, in the order the shell must carry them out.
///
/// The order is the safety argument of the role change (see `crate::node`):
/// * towards master, the records are adopted before the flag is set and the flag before the
///   master ruleset queues the first SYN: the master thread holds the records when that SYN
///   arrives, and never sees a queued SYN with the flag off;
/// * towards member, the member ruleset goes in before the flag is cleared: no instant
///   queues SYNs that nobody dispatches, and none accepts SYNs unqueued;
/// * a resigning or stopping node gives up the lease before it touches rules or flag, and a
///   resigning one hands leadership on only once it has stopped dispatching.
pub fn plan(from: Duty, t: Transition) -> &'static [Step] {
    use Step::*;
    match (from, t) {
        (Duty::Starting, Transition::Become(Role::Member)) => &[InstallMemberRules],
        (Duty::Starting, Transition::Become(Role::Master)) => {
            &[InstallMemberRules, Adopt, SetMasterFlag, InstallMasterRules]
        }
        (Duty::Member, Transition::Become(Role::Master)) => {
            &[Adopt, SetMasterFlag, InstallMasterRules]
        }
        (Duty::Master, Transition::Become(Role::Member)) => &[InstallMemberRules, ClearMasterFlag],
        (Duty::Member, Transition::Become(Role::Member))
        | (Duty::Master, Transition::Become(Role::Master)) => &[],
        (Duty::Master, Transition::Resign) => {
            &[Resign, InstallMemberRules, ClearMasterFlag, HandOver]
        }
        (Duty::Member | Duty::Starting, Transition::Resign) => &[Resign, HandOver],
        (Duty::Master, Transition::Stop) => &[StopElection, InstallMemberRules, ClearMasterFlag],
        (Duty::Member | Duty::Starting, Transition::Stop) => &[StopElection],
    }
}

/// Where a role change leaves the node once every step of its plan has been carried out.
pub fn after(t: Transition) -> Duty {
    match t {
        Transition::Become(Role::Master) => Duty::Master,
        Transition::Become(Role::Member) | Transition::Resign | Transition::Stop => Duty::Member,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Step::*;

    /// Where `a` and `b` stand in `steps`; panics if either is missing.
    fn before(steps: &[Step], a: Step, b: Step) -> bool {
        let at = |s| steps.iter().position(|x| *x == s).unwrap();
        at(a) < at(b)
    }

    #[test]
    fn member_to_master_adopts_then_flags_then_queues() {
        let p = plan(Duty::Member, Transition::Become(Role::Master));
        assert_eq!(p, &[Adopt, SetMasterFlag, InstallMasterRules]);
        assert!(before(p, Adopt, SetMasterFlag));
        assert!(before(p, SetMasterFlag, InstallMasterRules));
    }

    #[test]
    fn master_to_member_drops_then_unflags() {
        let p = plan(Duty::Master, Transition::Become(Role::Member));
        assert_eq!(p, &[InstallMemberRules, ClearMasterFlag]);
    }

    #[test]
    fn startup_installs_the_member_ruleset_first() {
        assert_eq!(
            plan(Duty::Starting, Transition::Become(Role::Member)),
            &[InstallMemberRules]
        );
        let p = plan(Duty::Starting, Transition::Become(Role::Master));
        assert_eq!(p[0], InstallMemberRules, "safe state before anything else");
        assert!(before(p, Adopt, SetMasterFlag));
        assert!(before(p, SetMasterFlag, InstallMasterRules));
    }

    #[test]
    fn no_change_no_steps() {
        assert!(plan(Duty::Member, Transition::Become(Role::Member)).is_empty());
        assert!(plan(Duty::Master, Transition::Become(Role::Master)).is_empty());
    }

    #[test]
    fn resign_gives_up_the_lease_and_dispatching_before_handing_over() {
        let p = plan(Duty::Master, Transition::Resign);
        assert_eq!(p, &[Resign, InstallMemberRules, ClearMasterFlag, HandOver]);
        assert_eq!(plan(Duty::Member, Transition::Resign), &[Resign, HandOver]);
    }

    #[test]
    fn stop_ends_the_election_before_the_rules() {
        assert_eq!(
            plan(Duty::Master, Transition::Stop),
            &[StopElection, InstallMemberRules, ClearMasterFlag]
        );
        assert_eq!(plan(Duty::Member, Transition::Stop), &[StopElection]);
    }

    #[test]
    fn duties_after_a_transition() {
        let master = Transition::Become(Role::Master);
        let member = Transition::Become(Role::Member);
        assert_eq!(after(master), Duty::Master);
        assert_eq!(after(member), Duty::Member);
        assert_eq!(after(Transition::Resign), Duty::Member);
        assert_eq!(after(Transition::Stop), Duty::Member);
    }

    #[test]
    fn only_the_writers_write() {
        let (cell, election, flag) = RoleCell::new();
        election.raise_term(5);
        election.raise_term(3);
        assert_eq!(cell.term(), 5, "the term only rises");
        election.set_lease_until_ms(9);
        assert_eq!(cell.lease_until_ms(), 9);
        election.revoke_lease();
        assert_eq!(cell.lease_until_ms(), 0);
        flag.set();
        assert!(cell.is_master());
        flag.clear();
        assert!(!cell.is_master());
        election.set_lease_until_ms(u64::MAX);
        drop(election);
        assert_eq!(cell.lease_until_ms(), 0, "the lease dies with its writer");
        assert_eq!(cell.term(), 5, "the term stays");
    }
}
