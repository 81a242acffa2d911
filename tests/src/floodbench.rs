//! The flood benchmark (issue 12): real clients opening connections through the VIP while a
//! spoofed-source SYN flood runs against it, with the SYN defence off and on.
//!
//! One run: the paced generator of [`crate::dispatchbench`] floods the VIP from the first
//! client's namespace with SYNs from random addresses of [`FLOOD_PREFIX`]/[`FLOOD_LEN`] and
//! random ports, while each client (their addresses are outside that prefix) opens one
//! connection after another ([`CONNECT_GAP`] apart), sends a request and reads the reply.
//! Only the connects begun while the flood runs count (the clients start 200 ms earlier).
//! Each real connect is timed; one that needed a SYN retransmission takes a second or more
//! (Linux's first SYN timeout), one that failed is counted. The master's `syns_dispatched`
//! and its `drops.syn_prefix_limited` are read before and after.
//!
//! The defence is a cluster configuration (`[flood]`), so each mode gets a cluster of its own
//! and the modes alternate by round (see `tdsc-lab bench-flood`). The flood's SYN/ACKs go to
//! addresses nobody holds: the nodes' neighbour lookups fail and the SYN/ACKs are dropped.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::bench::{connect_once, BenchError, Summary};
use crate::cluster::Cluster;
use crate::dispatchbench::{generate, Generated, Sources};
use crate::netns;

/// The flood's source prefix: the upper half of the clients' /24, as in the trial.
pub const FLOOD_PREFIX: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 128);
pub const FLOOD_LEN: u8 = 25;

/// Pause between one real client's connections.
pub const CONNECT_GAP: Duration = Duration::from_millis(5);

/// A real connect slower than this waited for a SYN retransmission.
pub const RETRANSMITTED: Duration = Duration::from_secs(1);

/// What one run measured.
#[derive(Debug, Clone)]
pub struct FloodRun {
    /// Offered flood SYN/s, and what the generator did.
    pub rate: u64,
    pub flood: Generated,
    /// Real connects: the times of those that succeeded, and how many failed.
    pub connects: Vec<Duration>,
    pub failed: usize,
    /// The master's dispatched SYNs and the SYNs its per-prefix limit dropped, during the run.
    pub dispatched: u64,
    pub limited: u64,
}

impl FloodRun {
    /// Adds `other`'s flood, connects and counts to these: several runs read as one.
    pub fn add(&mut self, other: &FloodRun) {
        self.flood.sent += other.flood.sent;
        self.flood.elapsed += other.flood.elapsed;
        self.flood.cpu += other.flood.cpu;
        self.connects.extend(other.connects.iter().copied());
        self.failed += other.failed;
        self.dispatched += other.dispatched;
        self.limited += other.limited;
    }

    /// Real connects that succeeded without a SYN retransmission, in % of all attempted.
    #[must_use]
    pub fn prompt_percent(&self) -> f64 {
        let prompt = self.connects.iter().filter(|d| **d < RETRANSMITTED).count();
        let all = self.connects.len() + self.failed;
        #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^53")]
        if all == 0 {
            0.0
        } else {
            prompt as f64 * 100.0 / all as f64
        }
    }

    /// Summary of the successful real connects.
    #[must_use]
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.connects)
    }
}

/// One run: a flood at `rate` SYN/s for `duration`, real connects from every client
/// meanwhile.
pub fn run(
    cluster: &Cluster,
    rate: u64,
    duration: Duration,
    stop: &Arc<AtomicBool>,
) -> Result<FloodRun, BenchError> {
    let clients = cluster.clients().to_vec();
    let first = clients
        .first()
        .ok_or(BenchError::Missing { what: "client" })?;
    let master = cluster.master()?.name.clone();
    let vip = cluster.vip();
    let before = cluster.status(&master)?.counters;
    let (flooding, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut real = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (flooding, done, stop) = (Arc::clone(&flooding), Arc::clone(&done), Arc::clone(stop));
        real.push(netns::spawn_in(&cluster.netns(&c.name), move || {
            let (mut ok, mut failed) = (Vec::new(), 0usize);
            let mut index = i * 1_000_000;
            while !done.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                // Only connects begun while the flood runs count.
                let counted = flooding.load(Ordering::Relaxed);
                let result = connect_once(vip, index);
                if counted {
                    match result {
                        Ok((_, took)) => ok.push(took),
                        Err(_) => failed += 1,
                    }
                }
                index += 1;
                std::thread::sleep(CONNECT_GAP);
            }
            (ok, failed)
        }));
    }
    // The real clients run alone for a moment first, then through the flood.
    std::thread::sleep(Duration::from_millis(200));
    let sources = Sources::Spoofed {
        prefix: FLOOD_PREFIX,
        len: FLOOD_LEN,
    };
    flooding.store(true, Ordering::Relaxed);
    let flood = netns::run_in(&cluster.netns(&first.name), || {
        generate(sources, *vip.ip(), vip.port(), rate, duration, stop)
    });
    flooding.store(false, Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    // Every client thread is joined before any error is raised.
    let joined: Vec<_> = real
        .into_iter()
        .map(std::thread::JoinHandle::join)
        .collect();
    let (mut connects, mut failed) = (Vec::new(), 0);
    for j in joined {
        let (ok, f) =
            j.map_err(|_| BenchError::Setup("a real client's thread panicked".into()))??;
        connects.extend(ok);
        failed += f;
    }
    let flood = flood??;
    let after = cluster.status(&master)?.counters;
    Ok(FloodRun {
        rate,
        flood,
        connects,
        failed,
        dispatched: after.syns_dispatched.saturating_sub(before.syns_dispatched),
        limited: after
            .drops
            .syn_prefix_limited
            .saturating_sub(before.drops.syn_prefix_limited),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_connects_are_those_without_a_retransmission_out_of_all_tried() {
        let r = FloodRun {
            rate: 1,
            flood: Generated {
                sent: 0,
                elapsed: Duration::ZERO,
                cpu: Duration::ZERO,
            },
            connects: vec![
                Duration::from_millis(1),
                Duration::from_millis(2),
                Duration::from_millis(1010),
            ],
            failed: 1,
            dispatched: 0,
            limited: 0,
        };
        assert!((r.prompt_percent() - 50.0).abs() < 1e-9);
        assert_eq!(r.summary().map(|s| s.n), Some(3));
    }
}
