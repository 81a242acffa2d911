//! State shared between the daemon's threads without locks.
//!
//! The nfq thread (master path), the receive thread (member path), the report task and the
//! control socket all read or bump these. Everything is an atomic in a fixed-size table
//! allocated at start, so the per-SYN path neither locks nor allocates.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Acquire};
use std::sync::atomic::{Ordering::Relaxed, Ordering::Release};
use std::sync::OnceLock;

/// Slots in a [`ClusterView`]: the most distinct (id, address) pairs one daemon run can know.
/// A slot is 100-odd bytes, so the whole table is a few KiB, allocated once at start.
pub const MAX_NODES: usize = 64;

/// Who a slot stands for. Written once, when the slot is first used, and never again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ident {
    pub id: u32,
    pub address: IpAddr,
}

/// One node's slot, as seen from this node.
#[derive(Debug, Default)]
pub struct NodeSlot {
    /// Set once (see [`ClusterView`] for why it never changes); unset slots are unused.
    ident: OnceLock<Ident>,
    /// The node is a member of the cluster now (Raft membership, or the configuration under a
    /// static election). An absent node is never eligible, and forwards, reports and Raft
    /// messages from its address are refused.
    pub present: AtomicBool,
    /// The node votes in the Raft group (status only).
    pub voter: AtomicBool,
    /// Reports arrive within `health.dead_after_ms`. This node's own slot is always alive.
    pub alive: AtomicBool,
    /// The node announced, in its reports, that it takes no new connections (`tdscctl drain`
    /// on that node). This node's own slot is the source of truth for its own reports.
    pub draining: AtomicBool,
    /// A health check of the node's application fails (`[[health.check]]`), as the node
    /// announced in its reports; this node's own slot is written by its health task.
    pub unhealthy: AtomicBool,
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

impl NodeSlot {
    pub fn ident(&self) -> Option<&Ident> {
        self.ident.get()
    }

    /// The node's id (0 for an unused slot; node ids start at 1).
    pub fn id(&self) -> u32 {
        self.ident().map_or(0, |i| i.id)
    }

    /// The node's cluster-network address (unspecified for an unused slot).
    pub fn address(&self) -> IpAddr {
        self.ident().map_or(IpAddr::from([0u8; 4]), |i| i.address)
    }

    pub fn is_present(&self) -> bool {
        self.present.load(Relaxed)
    }
}

/// One member as the membership names it, for [`ClusterView::set_members`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSlot {
    pub id: u32,
    pub address: IpAddr,
    pub weight: u32,
    pub voter: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ViewError {
    #[error(
        "all {MAX_NODES} node slots have been used in this daemon run; restart it to add node {id}"
    )]
    Full { id: u32 },
}

/// Every node this daemon knows, in a table of [`MAX_NODES`] slots fixed at start.
///
/// **Why a fixed table with write-once identities.** The nfq thread reads the view for every
/// SYN, lock-free and allocation-free, and keeps per-slot state of its own (in-flight counts,
/// destination addresses, SYN-forward records that name a slot index for 64 s). A membership
/// change therefore must neither move a slot nor change what a slot stands for while anyone
/// may be reading it. So a slot's (id, address) is written exactly once, in a `OnceLock`,
/// before the slot becomes visible (`used` is raised with release ordering after it), and a
/// change only flips `present`: a removed node's slot stays, absent, and is never eligible; a
/// node re-added with the same id and address gets its old slot back; a new (id, address)
/// takes a fresh slot. A record that still names an absent slot is re-dispatched. The cost is
/// that one daemon run can know at most [`MAX_NODES`] distinct (id, address) pairs; a restart
/// compacts the table.
///
/// The alternative, handing the master thread a new view through its command channel, would
/// have every other reader (reports, member path, status) hold a swappable pointer too, and
/// the records' slot indices would have to be remapped on every swap.
///
/// One writer (the Raft task, or start-up) changes membership; everything else is per-slot
/// atomics written by their one owner (reports by the report task, own load by the load
/// thread, drain and weight by the control socket).
#[derive(Debug)]
pub struct ClusterView {
    /// [`MAX_NODES`] slots; those from `used` on are unused. Iterate [`ClusterView::slots`].
    pub nodes: Box<[NodeSlot]>,
    used: AtomicUsize,
    pub self_index: usize,
}

impl ClusterView {
    /// A view of the configured nodes, all present, in configuration (id) order.
    pub fn new(nodes: &[crate::config::Node], self_id: u32) -> Self {
        let view = ClusterView {
            nodes: (0..MAX_NODES).map(|_| NodeSlot::default()).collect(),
            used: AtomicUsize::new(0),
            self_index: nodes.iter().position(|n| n.id == self_id).unwrap_or(0),
        };
        for n in nodes.iter().take(MAX_NODES) {
            let i = view.claim(n.id, n.address).unwrap_or(0);
            let slot = &view.nodes[i];
            slot.alive.store(n.id == self_id, Relaxed);
            slot.weight.store(crate::config::DEFAULT_WEIGHT, Relaxed);
            slot.voter.store(true, Relaxed);
            slot.present.store(true, Release);
        }
        view
    }

    /// The slots in use (present or not). Candidate and record indices are indices into this.
    pub fn slots(&self) -> &[NodeSlot] {
        &self.nodes[..self.used.load(Acquire).min(MAX_NODES)]
    }

    /// Sets the configured weights, in node order, before any report arrives.
    pub fn set_weights(&self, weights: &[u32]) {
        for (slot, w) in self.slots().iter().zip(weights) {
            slot.weight.store(*w, Relaxed);
        }
    }

    /// The slot of a present node with this address.
    pub fn index_of_address(&self, a: &IpAddr) -> Option<usize> {
        self.slots()
            .iter()
            .position(|n| n.is_present() && n.ident().is_some_and(|i| i.address == *a))
    }

    /// The slot of a present node with this id.
    pub fn index_of_id(&self, id: u32) -> Option<usize> {
        self.slots()
            .iter()
            .position(|n| n.is_present() && n.id() == id)
    }

    /// This node's own slot.
    pub fn own(&self) -> &NodeSlot {
        &self.nodes[self.self_index]
    }

    /// Makes exactly `members` present. Only one thread may call it (the membership owner).
    /// A member's weight is set when its slot is first used or it returns after an absence;
    /// from then on its reports carry it. A member that finds no free slot is left out (and
    /// reported); every other member and every removal is still applied.
    pub fn set_members(&self, members: &[MemberSlot]) -> Result<(), ViewError> {
        let mut keep = [false; MAX_NODES];
        let mut full = None;
        for m in members {
            let i = match self.claim(m.id, m.address) {
                Ok(i) => i,
                Err(e) => {
                    full = Some(e);
                    continue;
                }
            };
            keep[i] = true;
            let slot = &self.nodes[i];
            slot.voter.store(m.voter, Relaxed);
            if !slot.is_present() {
                slot.weight.store(m.weight, Relaxed);
                slot.present.store(true, Release);
            }
        }
        for (i, slot) in self.slots().iter().enumerate() {
            if !keep[i] && slot.present.swap(false, Relaxed) {
                slot.voter.store(false, Relaxed);
                if i != self.self_index {
                    slot.alive.store(false, Relaxed);
                }
            }
        }
        full.map_or(Ok(()), Err)
    }

    /// The slot that stands for (id, address), taking a fresh one if there is none.
    fn claim(&self, id: u32, address: IpAddr) -> Result<usize, ViewError> {
        let want = Ident { id, address };
        if let Some(i) = self.slots().iter().position(|s| s.ident() == Some(&want)) {
            return Ok(i);
        }
        let i = self.used.load(Relaxed);
        let slot = self.nodes.get(i).ok_or(ViewError::Full { id })?;
        // The slot is beyond `used`, so no reader looks at it yet; it was never set.
        let _ = slot.ident.set(want);
        self.used.store(i + 1, Release);
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Node;

    fn nodes() -> Vec<Node> {
        crate::config::test_nodes(3)
    }

    fn member(id: u32, addr: &str) -> MemberSlot {
        MemberSlot {
            id,
            address: addr.parse().unwrap(),
            weight: 2,
            voter: true,
        }
    }

    #[test]
    fn removal_hides_a_slot_and_return_reuses_it() {
        let v = ClusterView::new(&nodes(), 1);
        assert_eq!(v.slots().len(), 3);
        let a3: IpAddr = "198.51.100.13".parse().unwrap();
        v.nodes[2].alive.store(true, Relaxed);
        v.set_members(&[member(1, "198.51.100.11"), member(2, "198.51.100.12")])
            .unwrap();
        assert!(!v.nodes[2].is_present());
        assert!(
            !v.nodes[2].alive.load(Relaxed),
            "a removed node is not alive"
        );
        assert_eq!(v.index_of_id(3), None);
        assert_eq!(v.index_of_address(&a3), None, "its packets are refused");
        assert_eq!(v.slots().len(), 3, "slots never move");
        v.set_members(&[
            member(1, "198.51.100.11"),
            member(2, "198.51.100.12"),
            member(3, "198.51.100.13"),
        ])
        .unwrap();
        assert_eq!(v.index_of_id(3), Some(2), "same id and address: same slot");
        assert_eq!(
            v.nodes[2].weight.load(Relaxed),
            2,
            "weight from the membership"
        );
        // The same id at a new address is a new slot; the old one stays absent.
        v.set_members(&[member(1, "198.51.100.11"), member(3, "198.51.100.33")])
            .unwrap();
        assert_eq!(v.index_of_id(3), Some(3));
        assert_eq!(v.nodes[2].id(), 3);
        assert!(!v.nodes[2].is_present());
        assert!(!v.nodes[1].is_present());
    }

    #[test]
    fn the_table_is_fixed() {
        let v = ClusterView::new(&nodes(), 1);
        for i in 0..u32::try_from(MAX_NODES - 3).unwrap() {
            let addr = format!("198.51.101.{}", i + 1);
            v.set_members(&[member(100 + i, &addr)]).unwrap();
        }
        assert_eq!(v.slots().len(), MAX_NODES);
        let last = MAX_NODES - 3 + 100 - 1;
        let last_addr = format!("198.51.101.{}", MAX_NODES - 3);
        v.set_members(&[member(100, "198.51.101.1")]).unwrap();
        assert_eq!(
            v.set_members(&[
                member(7, "198.51.102.7"),
                member(u32::try_from(last).unwrap(), &last_addr)
            ]),
            Err(ViewError::Full { id: 7 })
        );
        assert!(
            v.index_of_id(u32::try_from(last).unwrap()).is_some(),
            "the members that fit are still applied"
        );
        assert_eq!(v.index_of_id(100), None, "and removals too");
    }
}
