//! The master's per-SYN work — `SynPath::on_syn`: lease check, classify, dispatch (records +
//! policy + the hand-off of each new record to the Raft task), counters, encode the forward —
//! must not allocate: it runs once per new connection at up to ~200k SYN/s. A counting global
//! allocator makes that checkable, for every policy. (The nfq receive/verdict calls around it
//! reuse the nfq crate's buffers as long as every message gets its verdict before the next
//! `recv`, which `queue::MasterPath::run` does; the send reuses a destination prepared once.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use std::sync::Arc;

use tdsc_proto::forward::MAX_OVERHEAD;
use tdsc_proto::seal::{Keyring, SendCounter, KEY_LEN};
use tdscd::cluster::counters::Counters;
use tdscd::cluster::role::RoleCell;
use tdscd::cluster::view::{ClusterView, MemberSlot};
use tdscd::config::{Node, PolicyName};
use tdscd::datapath::dispatch::Dispatcher;
use tdscd::datapath::policy::build;
use tdscd::datapath::records::SynRecords;
use tdscd::datapath::sticky::{Affinity, AffinitySettings};
use tdscd::datapath::syn_path::{Origin, SynPath, Verdict};

/// The enum's variant count, by an exhaustive match (no wildcard): a new policy does not
/// compile until it gets an ordinal here, and then the check below fails the build
/// until `PolicyName::ALL`, which the test drives, lists it.
const fn ordinal(p: PolicyName) -> usize {
    match p {
        PolicyName::RoundRobin => 0,
        PolicyName::LeastConnections => 1,
        PolicyName::StaticHash => 2,
        PolicyName::WeightedRoundRobin => 3,
        PolicyName::LeastLoad => 4,
        PolicyName::PowerOfTwo => 5,
        PolicyName::IsnHash => 6,
    }
}
const VARIANTS: usize = 7;

/// Checked at compile time: `PolicyName::ALL` names every variant of the enum.
const _: () = {
    let mut seen = [false; VARIANTS];
    let mut i = 0;
    while i < PolicyName::ALL.len() {
        seen[ordinal(PolicyName::ALL[i].1)] = true;
        i += 1;
    }
    let mut v = 0;
    while v < VARIANTS {
        assert!(
            seen[v],
            "a PolicyName variant is missing from PolicyName::ALL"
        );
        v += 1;
    }
};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
thread_local! {
    /// Counting is per thread: the test harness's own threads may allocate meanwhile.
    /// (`const` initialisation: reading it never allocates.)
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

fn set_counting(on: bool) {
    COUNTING.with(|c| c.set(on));
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A SYN from 192.0.2.`host`.
fn syn(host: u8, sport: u16, isn: u32) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, host, 192, 0, 2, 1,
    ];
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[4..8].copy_from_slice(&isn.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    p.extend_from_slice(&t);
    p
}

#[test]
fn per_syn_path_does_not_allocate() {
    let nodes: Vec<Node> = (1..=3)
        .map(|id| Node {
            id,
            address: format!("198.51.100.1{id}").parse().unwrap(),
        })
        .collect();
    let view = Arc::new(ClusterView::new(&nodes, 1));
    for s in view.nodes.iter() {
        s.alive.store(true, Relaxed);
    }
    let (role, election, flag) = RoleCell::new();
    flag.set();
    election.raise_term(1);
    election.set_lease_until_ms(u64::MAX);
    let vip = "192.0.2.1".parse().unwrap();
    let packets: Vec<Vec<u8>> = (0..10_000u32)
        .map(|i| syn(1 + (i % 50) as u8, 1024 + (i % 60000) as u16, i))
        .collect();
    let mut buf = vec![0u8; MAX_OVERHEAD + 0x10000];
    let members = |n: u32| -> Vec<MemberSlot> {
        (1..=n)
            .map(|id| MemberSlot {
                id,
                address: format!("198.51.100.{}", 10 + id).parse().unwrap(),
                weight: 1,
                voter: true,
            })
            .collect()
    };
    let (three, two, five) = (members(3), members(2), members(5));
    // Every forward is tagged: the tag must not allocate either.
    let keyring = Arc::new(Keyring::new(&[(1, [3; KEY_LEN])], None).unwrap());
    // Every policy with client affinity off, and with it on (64 entries for 50 clients in 16 sets, so
    // its evictions run too).
    let runs = PolicyName::ALL
        .iter()
        .flat_map(|(_, p)| [(*p, false), (*p, true)]);
    for (policy, sticky) in runs {
        // Smaller than the number of SYNs: both the hand-off and its overflow path run.
        let (tx, rx) = std::sync::mpsc::sync_channel(tdscd::cluster::takeover::HANDOFF_CAPACITY);
        let mut d = Dispatcher::new(build(policy), SynRecords::new(1 << 16, 64_000), nodes.len())
            .with_handoff(tx);
        if sticky {
            d = d.with_affinity(Affinity::new(&AffinitySettings {
                timeout: std::time::Duration::from_secs(300),
                prefix_v4: 32,
                prefix_v6: 128,
                capacity: 64,
            }));
        }
        let counters = Arc::new(Counters::default());
        let mut path = SynPath::new(
            vip,
            vec![80],
            Origin {
                id: 1,
                keyring: keyring.clone(),
                counter: SendCounter::starting_at(1),
            },
            view.clone(),
            counters.clone(),
            role.clone(),
            d,
        );
        let (mut forwarded, mut accepted) = (0u32, 0u32);
        view.set_members(&three).unwrap();
        ALLOCS.store(0, Relaxed);
        set_counting(true);
        for (i, p) in packets.iter().enumerate() {
            // Membership changes between SYNs (the Raft task's work, counted too: it must
            // not make the next decisions allocate either): a node leaves, two join.
            match i {
                3_000 => view.set_members(&two).unwrap(),
                6_000 => view.set_members(&five).unwrap(),
                _ => {}
            }
            if i == 6_000 {
                for s in view.slots() {
                    s.alive.store(true, Relaxed);
                }
            }
            match path.on_syn(p, i as u64, &mut buf) {
                Verdict::Forward { len, .. } => forwarded += u32::from(len > 0),
                Verdict::Inject { len } => accepted += u32::from(len > 0),
                Verdict::Drop(why) => panic!("{policy:?}: SYN {i} dropped: {why:?}"),
            }
        }
        set_counting(false);
        assert!(
            forwarded > 0,
            "{policy:?} forwarded nothing: the test would prove nothing"
        );
        assert!(accepted > 0, "{policy:?} accepted nothing");
        assert_eq!(
            ALLOCS.load(Relaxed),
            0,
            "{policy:?}: allocations on the per-SYN path"
        );
        let handed = rx.try_iter().count();
        assert_eq!(
            handed,
            tdscd::cluster::takeover::HANDOFF_CAPACITY,
            "{policy:?}"
        );
        let c = counters.snapshot();
        assert_eq!(c.syns_dispatched, 10_000, "{policy:?}");
        assert!(
            c.records_handoff_overflow > 0,
            "{policy:?}: overflow path not run"
        );
        if sticky {
            assert!(c.affinity_hits > 0, "{policy:?}: affinity never chose");
            assert!(c.affinity_evicted_live > 0, "{policy:?}: no eviction run");
        }
    }
}
