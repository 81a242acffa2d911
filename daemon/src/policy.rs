//! Scheduling policies: which node takes a new connection.
//!
//! A policy sees one [`FlowKey`] and the candidate nodes, and names one of them. It never
//! sees packets or sockets, and it must not allocate: it runs once per SYN on the master's
//! hot path. The master itself is one of the candidates.

use std::net::IpAddr;

use crate::config::PolicyName;

/// What a policy may know about a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub client: IpAddr,
    pub client_port: u16,
    pub isn: u32,
}

/// A node as the policy sees it at the moment of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: u32,
    /// Heartbeats arrive (the master counts itself alive).
    pub alive: bool,
    /// The operator asked for no new connections.
    pub draining: bool,
    /// Connections the node last reported plus those dispatched to it since that report.
    /// Counting in-flight dispatches keeps a stale report from herding every new connection
    /// onto the node that looked idle when it reported.
    pub connections: u32,
}

impl Candidate {
    pub fn eligible(&self) -> bool {
        self.alive && !self.draining
    }
}

/// A pluggable scheduling policy.
pub trait Policy: Send + std::fmt::Debug {
    fn name(&self) -> PolicyName;
    /// Index into `nodes` of the node that takes the connection, or `None` when no node is
    /// eligible. Must return only eligible nodes.
    fn pick(&mut self, key: &FlowKey, nodes: &[Candidate]) -> Option<usize>;
}

pub fn build(name: PolicyName) -> Box<dyn Policy> {
    match name {
        PolicyName::RoundRobin => Box::new(RoundRobin::default()),
        PolicyName::LeastConnections => Box::new(LeastConnections::default()),
        PolicyName::StaticHash => Box::new(StaticHash),
    }
}

/// Each eligible node in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn name(&self) -> PolicyName {
        PolicyName::RoundRobin
    }

    fn pick(&mut self, _key: &FlowKey, nodes: &[Candidate]) -> Option<usize> {
        let n = nodes.len();
        for step in 0..n {
            let i = (self.next + step) % n;
            if nodes[i].eligible() {
                self.next = (i + 1) % n;
                return Some(i);
            }
        }
        None
    }
}

/// The eligible node with the fewest connections; ties go round robin, so that an idle
/// cluster still spreads new connections instead of filling the lowest id first.
#[derive(Debug, Default)]
pub struct LeastConnections {
    next: usize,
}

impl Policy for LeastConnections {
    fn name(&self) -> PolicyName {
        PolicyName::LeastConnections
    }

    fn pick(&mut self, _key: &FlowKey, nodes: &[Candidate]) -> Option<usize> {
        let n = nodes.len();
        let mut best: Option<usize> = None;
        for step in 0..n {
            let i = (self.next + step) % n;
            if nodes[i].eligible()
                && best.is_none_or(|b| nodes[i].connections < nodes[b].connections)
            {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            self.next = (b + 1) % n;
        }
        best
    }
}

/// The baseline of existing distributed clusters (Windows NLB hashes client address and
/// port): a fixed function of the client, blind to load. Kept for comparison.
#[derive(Debug, Default)]
pub struct StaticHash;

impl Policy for StaticHash {
    fn name(&self) -> PolicyName {
        PolicyName::StaticHash
    }

    fn pick(&mut self, key: &FlowKey, nodes: &[Candidate]) -> Option<usize> {
        let eligible = nodes.iter().filter(|c| c.eligible()).count();
        if eligible == 0 {
            return None;
        }
        let h = flow_hash(&key.client, key.client_port);
        // The remainder is below `eligible`, a usize, so it converts back losslessly.
        let mut k = usize::try_from(h % u64::try_from(eligible).unwrap_or(u64::MAX)).unwrap_or(0);
        nodes.iter().position(|c| {
            if c.eligible() {
                if k == 0 {
                    return true;
                }
                k -= 1;
            }
            false
        })
    }
}

/// A fixed, well-mixed hash of client address and port (splitmix64 finaliser). Fixed, so that
/// every run and every node computes the same value.
pub fn flow_hash(addr: &IpAddr, port: u16) -> u64 {
    let a = match addr {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    };
    // Fold the 128-bit address into 64 bits; truncation is the point of the fold.
    #[allow(clippy::cast_possible_truncation)]
    let folded = (a as u64) ^ ((a >> 64) as u64);
    mix64(folded ^ (u64::from(port) << 48) ^ u64::from(port))
}

pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u32) -> Vec<Candidate> {
        (1..=n)
            .map(|id| Candidate {
                id,
                alive: true,
                draining: false,
                connections: 0,
            })
            .collect()
    }

    fn key(port: u16) -> FlowKey {
        FlowKey {
            client: "192.0.2.101".parse().unwrap(),
            client_port: port,
            isn: 1,
        }
    }

    #[test]
    fn round_robin_cycles_and_skips_ineligible() {
        let mut p = RoundRobin::default();
        let mut ns = nodes(3);
        let picks: Vec<_> = (0..6).map(|i| p.pick(&key(i), &ns).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        ns[1].alive = false;
        ns[2].draining = true;
        for i in 0..4 {
            assert_eq!(p.pick(&key(i), &ns), Some(0));
        }
        ns[0].alive = false;
        assert_eq!(p.pick(&key(0), &ns), None);
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let mut p = RoundRobin::default();
        let ns = nodes(3);
        let mut count = [0; 3];
        for i in 0..600 {
            count[p.pick(&key(i), &ns).unwrap()] += 1;
        }
        assert_eq!(count, [200, 200, 200]);
    }

    #[test]
    fn least_connections_prefers_the_emptiest_and_rotates_ties() {
        let mut p = LeastConnections::default();
        let mut ns = nodes(3);
        ns[0].connections = 5;
        ns[1].connections = 2;
        ns[2].connections = 9;
        assert_eq!(p.pick(&key(0), &ns), Some(1));
        ns[1].draining = true;
        assert_eq!(p.pick(&key(0), &ns), Some(0));
        let ns = nodes(3);
        let picks: Vec<_> = (0..3).map(|i| p.pick(&key(i), &ns).unwrap()).collect();
        let mut sorted = picks.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2], "ties must rotate: {picks:?}");
    }

    /// With in-flight dispatches counted (the dispatcher adds them to `connections`), a node
    /// that reported 0 stops being the target as soon as it has received its share.
    #[test]
    fn least_connections_does_not_herd_when_inflight_is_counted() {
        let mut p = LeastConnections::default();
        let mut ns = nodes(3);
        ns[0].connections = 10;
        ns[1].connections = 10;
        ns[2].connections = 0; // stale report: looked idle
        let mut got = [0u32; 3];
        for i in 0..60 {
            let k = p.pick(&key(i), &ns).unwrap();
            got[k] += 1;
            ns[k].connections += 1; // what the dispatcher does between reports
        }
        // 10 to catch up, then an even third of the remaining 50; without the in-flight
        // count all 60 would land on the idle node.
        assert!((26..=27).contains(&got[2]), "herded: {got:?}");
        assert!(
            (16..=17).contains(&got[0]) && (16..=17).contains(&got[1]),
            "{got:?}"
        );
    }

    #[test]
    fn static_hash_is_stable_and_spreads() {
        let mut p = StaticHash;
        let ns = nodes(3);
        let mut count = [0; 3];
        for port in 1024..4096u16 {
            let a = p.pick(&key(port), &ns).unwrap();
            assert_eq!(p.pick(&key(port), &ns), Some(a), "same flow, same node");
            count[a] += 1;
        }
        for c in count {
            assert!((900..1150).contains(&c), "uneven spread {count:?}");
        }
        let mut dead = nodes(3);
        dead[0].alive = false;
        for port in 0..100 {
            assert_ne!(p.pick(&key(port), &dead), Some(0));
        }
    }

    #[test]
    fn build_names_match() {
        for (_, name) in PolicyName::ALL {
            assert_eq!(build(name).name(), name);
        }
    }
}
