//! Scheduling policies: which node takes a new connection.
//!
//! A policy sees one [`FlowKey`] and the candidate nodes, and names one of them. It never
//! sees packets or sockets, and it must not allocate: it runs once per SYN on the master's
//! hot path. The master itself is one of the candidates.
//!
//! | policy | decides by | state |
//! |---|---|---|
//! | `round-robin` | turn | next index |
//! | `weighted-round-robin` | turn, in proportion to weight (smooth, nginx-style) | one counter per node |
//! | `least-connections` | fewest connections per unit of weight | tie rotation |
//! | `least-load` | lowest reported load figure per unit of weight | tie rotation |
//! | `power-of-two` | two random eligible nodes, the one with fewer connections per weight | xorshift state |
//! | `static-hash` | client address and port (Windows NLB) | none |
//! | `isn-hash` | the SYN's initial sequence number (the paper's baseline) | none |
//!
//! **Stale reports.** Load and connection figures arrive every report interval (200 ms). Between
//! two reports the dispatcher adds every connection it has sent to a node since that node's
//! last report (in-flight) to both figures (see [`Candidate`]), so a node that reported itself
//! idle stops looking idle after its fair share, instead of receiving every new connection
//! until its next report.

use std::net::IpAddr;

use crate::config::PolicyName;

/// Load units one in-flight dispatch adds to a node's reported load figure (one unit of the
/// figure, which is itself in milli-units: one runnable task, one busy worker slot, …).
pub const LOAD_PER_INFLIGHT: u32 = 1000;

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
    /// A health check of the node's application fails.
    pub unhealthy: bool,
    /// Relative share of new connections; 0 takes none (like draining).
    pub weight: u32,
    /// Connections the node last reported plus those dispatched to it since that report.
    /// Counting in-flight dispatches keeps a stale report from herding every new connection
    /// onto the node that looked idle when it reported.
    pub connections: u32,
    /// The node's last reported load figure (milli-units) plus [`LOAD_PER_INFLIGHT`] for each
    /// connection dispatched to it since, for the same reason.
    pub load: u32,
}

impl Candidate {
    pub fn eligible(&self) -> bool {
        self.alive && !self.draining && !self.unhealthy && self.weight > 0
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
        PolicyName::WeightedRoundRobin => Box::new(WeightedRoundRobin::default()),
        PolicyName::LeastConnections => Box::new(LeastConnections::default()),
        PolicyName::LeastLoad => Box::new(LeastLoad::default()),
        PolicyName::PowerOfTwo => Box::new(PowerOfTwo::default()),
        PolicyName::StaticHash => Box::new(StaticHash),
        PolicyName::IsnHash => Box::new(IsnHash),
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

/// The eligible node with the fewest connections per unit of weight; ties go round robin, so
/// that an idle cluster still spreads new connections instead of filling the lowest id first.
#[derive(Debug, Default)]
pub struct LeastConnections {
    next: usize,
}

impl Policy for LeastConnections {
    fn name(&self) -> PolicyName {
        PolicyName::LeastConnections
    }

    fn pick(&mut self, _key: &FlowKey, nodes: &[Candidate]) -> Option<usize> {
        least_per_weight(&mut self.next, nodes, |c| c.connections)
    }
}

/// The eligible node with the lowest load figure per unit of weight (the figure each node
/// reports, plus its in-flight dispatches); ties go round robin.
#[derive(Debug, Default)]
pub struct LeastLoad {
    next: usize,
}

impl Policy for LeastLoad {
    fn name(&self) -> PolicyName {
        PolicyName::LeastLoad
    }

    fn pick(&mut self, _key: &FlowKey, nodes: &[Candidate]) -> Option<usize> {
        least_per_weight(&mut self.next, nodes, |c| c.load)
    }
}

/// `a / wa < b / wb` without division: `a * wb < b * wa` in u64 (both factors are u32, so the
/// products cannot overflow).
fn lighter(a: u32, wa: u32, b: u32, wb: u32) -> bool {
    u64::from(a) * u64::from(wb) < u64::from(b) * u64::from(wa)
}

/// Scans from `*next` so that ties rotate; strict `lighter` keeps the first of equals.
fn least_per_weight(
    next: &mut usize,
    nodes: &[Candidate],
    score: impl Fn(&Candidate) -> u32,
) -> Option<usize> {
    let n = nodes.len();
    let mut best: Option<usize> = None;
    for step in 0..n {
        let i = (*next + step) % n;
        let c = &nodes[i];
        if c.eligible()
            && best.is_none_or(|b| lighter(score(c), c.weight, score(&nodes[b]), nodes[b].weight))
        {
            best = Some(i);
        }
    }
    if let Some(b) = best {
        *next = (b + 1) % n;
    }
    best
}

/// Smooth weighted round robin (nginx): every pick adds each eligible node's weight to its
/// counter, takes the node with the largest counter and subtracts the total weight from it.
/// Over any window of `sum(weights)` picks each node gets exactly its weight, interleaved
/// (5:1:1 gives a a b a c a a, not a a a a a b c).
#[derive(Debug)]
pub struct WeightedRoundRobin {
    /// One counter per node index, with room for every slot a view can have
    /// ([`crate::cluster::view::MAX_NODES`]), so no pick allocates, not even after a membership change.
    current: Vec<i64>,
}

impl Default for WeightedRoundRobin {
    fn default() -> Self {
        WeightedRoundRobin {
            current: Vec::with_capacity(crate::cluster::view::MAX_NODES),
        }
    }
}

impl Policy for WeightedRoundRobin {
    fn name(&self) -> PolicyName {
        PolicyName::WeightedRoundRobin
    }

    fn pick(&mut self, _key: &FlowKey, nodes: &[Candidate]) -> Option<usize> {
        if self.current.len() != nodes.len() {
            self.current.clear();
            self.current.resize(nodes.len(), 0);
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, c) in nodes.iter().enumerate() {
            if !c.eligible() {
                // A node that leaves forgets its credit, so it does not burst on return.
                self.current[i] = 0;
                continue;
            }
            let w = i64::from(c.weight);
            self.current[i] += w;
            total += w;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }
}

/// Power of two choices (Mitzenmacher): two distinct eligible nodes drawn at random, the one
/// with fewer connections per unit of weight wins. It needs no scan for the minimum, so it
/// stays cheap at large N, and its randomness spreads a burst that arrives between two reports
/// even without the in-flight correction.
#[derive(Debug)]
pub struct PowerOfTwo {
    state: u64,
}

impl Default for PowerOfTwo {
    fn default() -> Self {
        PowerOfTwo::with_seed(0x7464_7363_7032_6331)
    }
}

impl PowerOfTwo {
    pub fn with_seed(seed: u64) -> Self {
        // xorshift must not start at 0.
        PowerOfTwo { state: seed | 1 }
    }

    /// xorshift64 (Marsaglia): fast, no allocation; quality is ample for sampling.
    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        // n is a node count; the remainder is below n, so both conversions are lossless.
        usize::try_from(self.next() % u64::try_from(n).unwrap_or(u64::MAX)).unwrap_or(0)
    }
}

impl Policy for PowerOfTwo {
    fn name(&self) -> PolicyName {
        PolicyName::PowerOfTwo
    }

    fn pick(&mut self, _key: &FlowKey, nodes: &[Candidate]) -> Option<usize> {
        let eligible = nodes.iter().filter(|c| c.eligible()).count();
        match eligible {
            0 => return None,
            1 => return nth_eligible(nodes, 0),
            _ => {}
        }
        let a = self.below(eligible);
        // A second, distinct draw: pick among the other eligible - 1 and skip over `a`.
        let mut b = self.below(eligible - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (nth_eligible(nodes, a)?, nth_eligible(nodes, b)?);
        let (ca, cb) = (&nodes[a], &nodes[b]);
        if lighter(cb.connections, cb.weight, ca.connections, ca.weight) {
            Some(b)
        } else {
            Some(a)
        }
    }
}

/// Index of the `k`-th eligible node.
fn nth_eligible(nodes: &[Candidate], mut k: usize) -> Option<usize> {
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

/// `h mod eligible`, as the index of an eligible node.
fn hash_pick(h: u64, nodes: &[Candidate]) -> Option<usize> {
    let eligible = nodes.iter().filter(|c| c.eligible()).count();
    if eligible == 0 {
        return None;
    }
    // The remainder is below `eligible`, a usize, so it converts back losslessly.
    let k = usize::try_from(h % u64::try_from(eligible).unwrap_or(u64::MAX)).unwrap_or(0);
    nth_eligible(nodes, k)
}

/// The paper's baseline (TCP-DSC §5.3): the SYN's initial sequence number modulo the node
/// count. ISNs are random, so this is a load-blind random choice; unlike `static-hash` a
/// client's next connection may land anywhere.
#[derive(Debug, Default)]
pub struct IsnHash;

impl Policy for IsnHash {
    fn name(&self) -> PolicyName {
        PolicyName::IsnHash
    }

    fn pick(&mut self, key: &FlowKey, nodes: &[Candidate]) -> Option<usize> {
        hash_pick(u64::from(key.isn), nodes)
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
        hash_pick(flow_hash(&key.client, key.client_port), nodes)
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
    #[allow(
        clippy::cast_possible_truncation,
        reason = "truncation is the point of the fold"
    )]
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
                unhealthy: false,
                weight: 1,
                connections: 0,
                load: 0,
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

    fn key_isn(isn: u32) -> FlowKey {
        FlowKey { isn, ..key(40000) }
    }

    /// Every policy, including weight 0, dead, draining and unhealthy nodes: only eligible
    /// picks, and `None` when nobody is eligible.
    #[test]
    fn no_policy_picks_a_dead_draining_unhealthy_or_zero_weight_node() {
        for (_, name) in PolicyName::ALL {
            let mut p = build(name);
            let mut ns = nodes(5);
            ns[0].alive = false;
            ns[1].draining = true;
            ns[2].weight = 0;
            ns[3].unhealthy = true;
            for i in 0..200u16 {
                assert_eq!(
                    p.pick(&key_isn(u32::from(i) * 7919), &ns),
                    Some(4),
                    "{name:?}"
                );
                assert_eq!(p.pick(&key(i), &ns), Some(4), "{name:?}");
            }
            ns[4].alive = false;
            assert_eq!(p.pick(&key(1), &ns), None, "{name:?}");
        }
    }

    #[test]
    fn weighted_round_robin_is_exact_and_smooth() {
        let mut p = WeightedRoundRobin::default();
        let mut ns = nodes(3);
        ns[0].weight = 5;
        let picks: Vec<_> = (0..7).map(|i| p.pick(&key(i), &ns).unwrap()).collect();
        // nginx's example: 5:1:1 interleaves.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        ns[0].weight = 3;
        ns[1].weight = 2;
        ns[2].weight = 1;
        let mut count = [0; 3];
        for i in 0..600 {
            count[p.pick(&key(i), &ns).unwrap()] += 1;
        }
        assert_eq!(count, [300, 200, 100]);
        // Equal weights degrade to plain round robin.
        let mut p = WeightedRoundRobin::default();
        let ns = nodes(3);
        let picks: Vec<_> = (0..6).map(|i| p.pick(&key(i), &ns).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_least_connections_compares_per_unit_of_weight() {
        let mut p = LeastConnections::default();
        let mut ns = nodes(3);
        ns[0].weight = 3;
        ns[0].connections = 9; // 3 per unit
        ns[1].connections = 4; // 4 per unit
        ns[2].connections = 5;
        assert_eq!(p.pick(&key(0), &ns), Some(0));
        // Filling by dispatch converges to connections proportional to weight.
        let mut ns = nodes(3);
        ns[0].weight = 3;
        for i in 0..500 {
            let k = p.pick(&key(i), &ns).unwrap();
            ns[k].connections += 1;
        }
        assert!((299..=301).contains(&ns[0].connections), "{ns:?}");
        assert!((99..=101).contains(&ns[1].connections), "{ns:?}");
    }

    #[test]
    fn least_load_takes_the_lowest_figure_per_weight() {
        let mut p = LeastLoad::default();
        let mut ns = nodes(3);
        ns[0].load = 2000;
        ns[1].load = 500;
        ns[2].load = 1500;
        ns[1].connections = 100; // connections do not matter to this policy
        assert_eq!(p.pick(&key(0), &ns), Some(1));
        ns[0].weight = 8; // 250 per unit
        assert_eq!(p.pick(&key(0), &ns), Some(0));
    }

    /// The herd case: node 3 reported load 0 while the others reported 4 busy slots, and no
    /// report arrives for the next 60 SYNs. With the in-flight charge the dispatcher adds
    /// (`LOAD_PER_INFLIGHT` per dispatch), node 3 takes 4 to catch up and then a third of the
    /// rest; without it, it would take all 60.
    #[test]
    fn least_load_does_not_herd_onto_a_stale_idle_report() {
        let mut p = LeastLoad::default();
        let mut ns = nodes(3);
        ns[0].load = 4000;
        ns[1].load = 4000;
        ns[2].load = 0;
        let mut got = [0u32; 3];
        for i in 0..60 {
            let k = p.pick(&key(i), &ns).unwrap();
            got[k] += 1;
            ns[k].load += LOAD_PER_INFLIGHT; // what the dispatcher does between reports
        }
        assert!((22..=23).contains(&got[2]), "herded: {got:?}");
        assert!(got[0] >= 18 && got[1] >= 18, "{got:?}");
    }

    #[test]
    fn power_of_two_prefers_the_lighter_of_two_and_never_the_heaviest() {
        let mut p = PowerOfTwo::default();
        let mut ns = nodes(3);
        ns[0].connections = 10;
        ns[1].connections = 20;
        ns[2].connections = 30;
        let mut count = [0u32; 3];
        for i in 0..3000 {
            count[p.pick(&key(i), &ns).unwrap()] += 1;
        }
        // Each of the 3 pairs is drawn about equally often: node 1 wins 2 pairs of 3, node 2
        // one, node 3 none.
        assert_eq!(count[2], 0, "{count:?}");
        assert!((1800..2200).contains(&count[0]), "{count:?}");
        assert!((800..1200).contains(&count[1]), "{count:?}");
        // Two eligible nodes: always the lighter.
        ns[0].alive = false;
        for i in 0..50 {
            assert_eq!(p.pick(&key(i), &ns), Some(1));
        }
    }

    /// The herd case for power of two: node 3 looked idle in a stale report. The in-flight
    /// charge (+1 connection per dispatch) makes it lose its draws once it has caught up.
    #[test]
    fn power_of_two_does_not_herd_onto_a_stale_idle_report() {
        let mut p = PowerOfTwo::default();
        let mut ns = nodes(3);
        ns[0].connections = 10;
        ns[1].connections = 10;
        ns[2].connections = 0;
        let mut got = [0u32; 3];
        for i in 0..90 {
            let k = p.pick(&key(i), &ns).unwrap();
            got[k] += 1;
            ns[k].connections += 1;
        }
        // Perfect balance would give node 3 about 10 + 70/3 = 33; all 90 would be the herd.
        assert!(got[2] <= 40, "herded: {got:?}");
        let spread = ns.iter().map(|c| c.connections).max().unwrap()
            - ns.iter().map(|c| c.connections).min().unwrap();
        assert!(spread <= 4, "{ns:?}");
    }

    #[test]
    fn isn_hash_is_isn_mod_eligible() {
        let mut p = IsnHash;
        let mut ns = nodes(3);
        for isn in 0..30u32 {
            assert_eq!(
                p.pick(&key_isn(isn), &ns),
                Some(usize::try_from(isn % 3).unwrap())
            );
        }
        ns[0].draining = true;
        assert_eq!(p.pick(&key_isn(4), &ns), Some(1));
        assert_eq!(p.pick(&key_isn(5), &ns), Some(2));
    }

    #[test]
    fn build_names_match() {
        for (_, name) in PolicyName::ALL {
            assert_eq!(build(name).name(), name);
        }
    }
}
