//! Liveness and load reports between nodes (UDP, prost [`Envelope`]s).
//!
//! Every `health.report_interval_ms` each node counts its sockets on the VIP (sock_diag) and
//! sends a [`NodeReport`] to every other node ([`Reporter::run`]). A node whose reports stop
//! for `health.dead_after_ms` is marked dead ([`Reporter::sweep`]), and the master stops
//! dispatching to it; its next report brings it back ([`accept`]). Reports arrive through
//! the cluster socket's receive loop (`crate::cluster::bus`), which accepts them only sealed
//! with the cluster key by a member, from that member's address, and not replayed.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tdsc_proto::control::{Envelope, NodeReport};

use crate::cluster::bus::ClusterSocket;
use crate::cluster::counters::ReportCounters;
use crate::cluster::role::RoleCell;
use crate::cluster::view::{ClusterView, NodeSlot};
use crate::host::sockdiag::SockDiag;
use crate::shutdown::Shutdown;

/// Milliseconds since `epoch`, never 0 (0 means "never seen").
pub fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Applies a report from the node of `slot` (already authenticated), received at `now_ms`.
pub fn accept(slot: &NodeSlot, r: &NodeReport, now_ms: u64) {
    slot.established.store(r.established, Relaxed);
    slot.syn_recv.store(r.syn_recv, Relaxed);
    slot.draining.store(r.draining, Relaxed);
    slot.unhealthy.store(r.unhealthy, Relaxed);
    slot.load.store(r.load, Relaxed);
    if let Some(w) = r.weight {
        slot.weight.store(w, Relaxed);
    }
    slot.last_seen_ms.store(now_ms, Relaxed);
    slot.report_gen.fetch_add(1, Relaxed);
    if !slot.alive.swap(true, Relaxed) {
        tracing::info!(node = slot.id(), "node is alive");
    }
}

/// The report task: sends this node's report every interval and sweeps for silent nodes.
#[derive(Debug)]
pub struct Reporter {
    pub node_id: u32,
    pub vip: IpAddr,
    /// The cluster port (`control_port`) every node listens on.
    pub port: u16,
    pub interval: Duration,
    pub dead_after: Duration,
    /// Own slot: this task writes its connection counts; peers' slots: it marks them dead.
    pub view: Arc<ClusterView>,
    /// Read for the term each report carries.
    pub role: Arc<RoleCell>,
    /// `sent` is this task's.
    pub counters: Arc<ReportCounters>,
    /// The clock of `last_seen_ms` (the bus stamps arrivals on the same one).
    pub epoch: Instant,
    /// Woken by the health task when this node's health changes: the report goes out at
    /// once instead of at the next tick.
    pub poke: Arc<tokio::sync::Notify>,
}

impl Reporter {
    /// Marks nodes dead whose reports stopped.
    pub fn sweep(&self) {
        let now = now_ms(self.epoch);
        let dead_ms = u64::try_from(self.dead_after.as_millis()).unwrap_or(u64::MAX);
        for (i, slot) in self.view.slots().iter().enumerate() {
            if i == self.view.self_index || !slot.is_present() {
                continue;
            }
            let seen = slot.last_seen_ms.load(Relaxed);
            if slot.alive.load(Relaxed) && (seen == 0 || now.saturating_sub(seen) > dead_ms) {
                slot.alive.store(false, Relaxed);
                tracing::warn!(
                    node = slot.id(),
                    "no report for {dead_ms} ms: node marked dead"
                );
            }
        }
    }

    /// Where reports go: every present node but this one.
    fn peers(&self) -> Vec<SocketAddr> {
        self.view
            .slots()
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != self.view.self_index && n.is_present())
            .map(|(_, n)| SocketAddr::new(n.address(), self.port))
            .collect()
    }

    /// Sends a report every interval until `shutdown`.
    pub async fn run(self, sock: Arc<ClusterSocket>, mut shutdown: Shutdown) {
        let mut diag = match SockDiag::open() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(error = %e, "sock_diag unavailable: connection counts will read 0");
                None
            }
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.poke.notified() => {}
                () = shutdown.requested() => return,
            }
            let counts = diag
                .as_mut()
                .and_then(|d| d.count(&self.vip).ok())
                .unwrap_or_default();
            let own = self.view.own();
            own.established.store(counts.established, Relaxed);
            own.syn_recv.store(counts.syn_recv, Relaxed);
            own.report_gen.fetch_add(1, Relaxed);
            seq += 1;
            let env = Envelope::report(
                self.node_id,
                self.role.term(),
                NodeReport {
                    established: counts.established,
                    syn_recv: counts.syn_recv,
                    seq,
                    draining: own.draining.load(Relaxed),
                    load: own.load.load(Relaxed),
                    weight: Some(own.weight.load(Relaxed)),
                    unhealthy: own.unhealthy.load(Relaxed),
                },
            );
            let bytes = env.to_bytes();
            // Read every round: membership changes add and remove destinations.
            for p in self.peers() {
                if sock.send_to(&bytes, p).await.is_ok() {
                    self.counters.sent.fetch_add(1, Relaxed);
                }
            }
            self.sweep();
        }
    }
}
