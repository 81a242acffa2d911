//! The Raft election on an in-memory network with controlled time.
//!
//! Every node shares one simulated clock. Messages are delivered after a fixed delay (a
//! fraction of a tick) unless a link is cut. After every event the invariant that matters is
//! checked: at no instant do two nodes hold a lease (may dispatch).

use std::collections::{BTreeMap, BTreeSet};

use tdsc_election::raft_core::LOG_KEEP_ENTRIES;
use tdsc_election::{
    MemberChange, PersistJob, Persisted, ProposeError, RaftCore, RaftSettings, Role,
};

const SETTINGS: RaftSettings = RaftSettings {
    tick_ms: 10,
    election_tick: 10,
    heartbeat_tick: 3,
};

struct Sim {
    now: u64,
    nodes: BTreeMap<u64, RaftCore>,
    /// Persisted state as the shell would have written it.
    disk: BTreeMap<u64, Persisted>,
    /// (deliver_at, from, to, bytes)
    wire: Vec<(u64, u64, u64, Vec<u8>)>,
    cut: BTreeSet<u64>,
    /// Nodes that receive nothing (their own messages still go out).
    deaf: BTreeSet<u64>,
    /// Nodes whose shell has revoked the lease for good (a graceful stop): the shell stores
    /// 0 whatever the core says, so they never dispatch again.
    resigned: BTreeSet<u64>,
    delay_ms: u64,
    /// Deterministic pseudo-random drops (xorshift state) and drop rate in percent.
    rng: u64,
    drop_pct: u64,
    /// Data of committed entries each node's shell was handed, in order.
    applied: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Largest persisted log (entries) seen on any node.
    max_persisted_entries: usize,
    /// Per node: how long its disk takes to carry out a write job (absent: at once).
    disk_delay_ms: BTreeMap<u64, u64>,
    /// Jobs waiting for a slow disk, in order: (done_at, node, job).
    writing: Vec<(u64, u64, PersistJob)>,
    /// The shell as it was before asynchronous persistence: every message of a `ready`
    /// waits for its write (the defence disabled, for the slow-disk test).
    hold_all_messages: bool,
}

impl Sim {
    fn new(n: u64) -> Sim {
        let voters: Vec<u64> = (1..=n).collect();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let nodes = voters
            .iter()
            .map(|id| {
                (
                    *id,
                    RaftCore::new(*id, &voters, SETTINGS, None, 0, &log).unwrap(),
                )
            })
            .collect();
        Sim {
            now: 0,
            nodes,
            disk: BTreeMap::new(),
            wire: Vec::new(),
            cut: BTreeSet::new(),
            deaf: BTreeSet::new(),
            resigned: BTreeSet::new(),
            delay_ms: 1,
            rng: 0x9e37_79b9_7f4a_7c15,
            drop_pct: 0,
            applied: BTreeMap::new(),
            max_persisted_entries: 0,
            disk_delay_ms: BTreeMap::new(),
            writing: Vec::new(),
            hold_all_messages: false,
        }
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn drain(&mut self, id: u64) {
        loop {
            let out = self.nodes.get_mut(&id).unwrap().ready();
            self.applied.entry(id).or_default().extend(out.committed);
            let mut now_msgs = out.messages;
            let Some(mut job) = out.persist else {
                // The old shell was blocked in its write: nothing left before it finished.
                match self.writing.iter_mut().rev().find(|w| w.1 == id) {
                    Some(w) if self.hold_all_messages => w.2.messages.append(&mut now_msgs),
                    _ => self.send(id, now_msgs),
                }
                break;
            };
            if self.hold_all_messages {
                now_msgs.append(&mut job.messages);
                job.messages = now_msgs;
                now_msgs = Vec::new();
            }
            self.send(id, now_msgs);
            let delay = self.disk_delay_ms.get(&id).copied().unwrap_or(0);
            let queued = self.writing.iter().filter(|w| w.1 == id).map(|w| w.0).max();
            if delay == 0 && queued.is_none() {
                self.write(id, job);
                continue;
            }
            let done_at = (self.now + delay).max(queued.unwrap_or(0));
            self.writing.push((done_at, id, job));
            break;
        }
        self.check();
    }

    /// Carries out a write job as the shell does: state to disk, then its messages, then
    /// tells the core.
    fn write(&mut self, id: u64, job: PersistJob) {
        if let Some(p) = job.state {
            self.max_persisted_entries = self.max_persisted_entries.max(p.entries.len());
            self.disk.insert(id, p);
        }
        self.send(id, job.messages);
        self.nodes.get_mut(&id).unwrap().persisted(job.number);
    }

    fn send(&mut self, id: u64, msgs: Vec<(u64, Vec<u8>)>) {
        for (to, bytes) in msgs {
            let lost = self.drop_pct > 0 && self.rand() % 100 < self.drop_pct;
            if !lost
                && !self.cut.contains(&id)
                && !self.cut.contains(&to)
                && !self.deaf.contains(&to)
            {
                self.wire.push((self.now + self.delay_ms, id, to, bytes));
            }
        }
    }

    /// At most one node may dispatch at any instant.
    fn check(&self) {
        let holders: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(id, n)| n.lease_until_ms() > self.now && !self.resigned.contains(id))
            .map(|(id, _)| *id)
            .collect();
        assert!(
            holders.len() <= 1,
            "at {} ms nodes {holders:?} all hold a lease",
            self.now
        );
    }

    /// Advances 1 ms: delivers due messages, ticks every node on tick boundaries.
    fn step_ms(&mut self) {
        self.now += 1;
        let due: Vec<_> = {
            let now = self.now;
            let (due, later) = std::mem::take(&mut self.wire)
                .into_iter()
                .partition(|m| m.0 <= now);
            self.wire = later;
            due
        };
        for (_, from, to, bytes) in due {
            if self.cut.contains(&from) || self.cut.contains(&to) {
                continue;
            }
            if let Some(n) = self.nodes.get_mut(&to) {
                let _ = n.step(from, &bytes, self.now);
                self.drain(to);
            }
        }
        let now = self.now;
        let (done, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.writing)
            .into_iter()
            .partition(|w| w.0 <= now);
        self.writing = later;
        for (_, id, job) in done {
            if self.nodes.contains_key(&id) {
                self.write(id, job);
                self.drain(id);
            }
        }
        if self.now.is_multiple_of(SETTINGS.tick_ms) {
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            for id in ids {
                self.nodes.get_mut(&id).unwrap().tick(self.now);
                self.drain(id);
            }
        }
        self.check();
    }

    fn run_ms(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step_ms();
        }
    }

    fn masters(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(id, n)| n.leadership().role == Role::Master && !self.resigned.contains(id))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Runs until exactly one node among `among` is master; returns it and the time taken.
    fn until_master(&mut self, among: &[u64], limit_ms: u64) -> Option<(u64, u64)> {
        let start = self.now;
        while self.now - start < limit_ms {
            self.step_ms();
            let m: Vec<u64> = self
                .masters()
                .into_iter()
                .filter(|id| among.contains(id))
                .collect();
            if m.len() == 1 {
                return Some((m[0], self.now - start));
            }
        }
        None
    }

    /// Proposes a membership change on `leader`, runs until every node in `on` has applied
    /// it, and returns the log index of the proposal.
    fn change(&mut self, leader: u64, change: MemberChange, on: &[u64]) -> u64 {
        let index = self
            .nodes
            .get_mut(&leader)
            .unwrap()
            .propose_membership(change)
            .expect("the leader accepts the change");
        self.drain(leader);
        for _ in 0..2_000 {
            if on
                .iter()
                .all(|id| self.nodes[id].membership().index >= index)
            {
                return index;
            }
            self.step_ms();
        }
        panic!("change at index {index} not applied on {on:?} within 2 s");
    }

    fn voters(&self, id: u64) -> Vec<u64> {
        self.nodes[&id].membership().voters
    }

    /// Proposes `data` on `leader` and lets the outcome go out.
    fn propose(&mut self, leader: u64, data: Vec<u8>) {
        self.nodes
            .get_mut(&leader)
            .unwrap()
            .propose(data)
            .expect("leader accepts the proposal");
        self.drain(leader);
    }

    fn restart(&mut self, id: u64) {
        let voters: Vec<u64> = self.nodes.keys().copied().collect();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        // A crash loses the writes still queued for the disk.
        self.writing.retain(|w| w.1 != id);
        let disk = self.disk.get(&id).cloned();
        let core = RaftCore::new(id, &voters, SETTINGS, disk, self.now, &log).unwrap();
        self.nodes.insert(id, core);
    }
}

#[test]
fn three_nodes_elect_one_master_that_all_agree_on() {
    let mut sim = Sim::new(3);
    let (m, took) = sim
        .until_master(&[1, 2, 3], 2_000)
        .expect("no master elected");
    assert!(took <= 2_000);
    sim.run_ms(200);
    assert_eq!(sim.masters(), vec![m], "leadership is stable");
    for n in sim.nodes.values() {
        assert_eq!(n.leadership().master_id, Some(u32::try_from(m).unwrap()));
    }
}

#[test]
fn a_cut_off_master_loses_its_lease_before_a_successor_gets_one() {
    let mut sim = Sim::new(3);
    let (old, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    sim.cut.insert(old);
    let cut_at = sim.now;
    let others: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    // `check` runs after every event, so reaching a new master proves the leases never
    // overlapped on the way.
    let (new, _) = sim
        .until_master(&others, 3_000)
        .expect("the majority elects a new master");
    assert_ne!(new, old);
    let old_node = &sim.nodes[&old];
    assert!(old_node.lease_until_ms() <= sim.now);
    assert_eq!(old_node.leadership().role, Role::Member, "lease lapsed");
    assert!(sim.now > cut_at);

    // Heal: the old master rejoins as a follower of the new one.
    sim.cut.clear();
    sim.run_ms(500);
    assert_eq!(sim.masters(), vec![new]);
    assert_eq!(
        sim.nodes[&old].leadership().master_id,
        Some(u32::try_from(new).unwrap())
    );
    assert_eq!(sim.nodes[&old].term(), sim.nodes[&new].term());
}

#[test]
fn a_minority_never_elects_a_master() {
    let mut sim = Sim::new(5);
    let (old, _) = sim.until_master(&[1, 2, 3, 4, 5], 2_000).unwrap();
    // Cut the master and one follower away from each other and from the rest: neither of the
    // two may become master, while the three others elect one.
    let other = (1..=5).find(|i| *i != old).unwrap();
    sim.cut.insert(old);
    sim.cut.insert(other);
    sim.run_ms(3_000);
    let m = sim.masters();
    assert_eq!(m.len(), 1);
    assert!(!m.contains(&old) && !m.contains(&other));
}

#[test]
fn a_restarted_node_keeps_term_and_vote_and_rejoins() {
    let mut sim = Sim::new(3);
    let (m, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let follower = (1..=3).find(|i| *i != m).unwrap();
    let term = sim.nodes[&follower].term();
    assert_eq!(sim.disk[&follower].hard_state.term, term);
    sim.restart(follower);
    assert_eq!(
        sim.nodes[&follower].term(),
        term,
        "term survives the restart"
    );
    sim.run_ms(300);
    assert_eq!(
        sim.masters(),
        vec![m],
        "a follower's restart does not depose the master"
    );
    assert_eq!(
        sim.nodes[&follower].leadership().master_id,
        Some(u32::try_from(m).unwrap())
    );
}

#[test]
fn a_restarted_master_is_replaced_without_overlap() {
    let mut sim = Sim::new(3);
    let (old, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    // The daemon dies (its messages stop) and comes back at once with its disk state.
    sim.restart(old);
    let (new, _) = sim.until_master(&[1, 2, 3], 3_000).unwrap();
    sim.run_ms(300);
    assert_eq!(sim.masters(), vec![new]);
}

/// A graceful stop of the master: its shell revokes the lease for good (`resign`), then the
/// core hands leadership over with `transfer_leadership`. After `MsgTimeoutNow` has left, the
/// old master hears nothing more (`deaf`), so it cannot learn of the new term and step down
/// by itself: only the revoked lease keeps it from dispatching beside its successor.
fn transfer_from_a_deaf_master(resign_first: bool) -> (Sim, u64, u64) {
    let mut sim = Sim::new(3);
    let (old, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    assert!(
        sim.nodes[&old].lease_until_ms() > sim.now,
        "a lease to revoke"
    );
    if resign_first {
        sim.resigned.insert(old);
    }
    let others: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let to = sim
        .nodes
        .get_mut(&old)
        .unwrap()
        .transfer_leadership(&others)
        .expect("a leader with live followers picks a transferee");
    assert!(others.contains(&to));
    // Not leader: nothing to transfer.
    assert_eq!(
        sim.nodes.get_mut(&to).unwrap().transfer_leadership(&[old]),
        None
    );
    sim.drain(old);
    sim.deaf.insert(old);
    let (new, _) = sim
        .until_master(&others, 1_000)
        .expect("the transferee takes over");
    (sim, old, new)
}

#[test]
fn a_leadership_transfer_after_resigning_never_overlaps_leases() {
    let (mut sim, old, new) = transfer_from_a_deaf_master(true);
    // The forced campaign made the transferee leader with the old master's lease unexpired
    // in its core; `check` ran after every event and found one dispatcher at a time.
    assert_eq!(sim.nodes[&new].term(), sim.nodes[&old].term() + 1);
    sim.deaf.clear();
    sim.run_ms(300);
    assert_eq!(sim.masters(), vec![new]);
    assert_eq!(
        sim.nodes[&old].leadership().master_id,
        Some(u32::try_from(new).unwrap()),
        "the old master follows its successor"
    );
}

/// The same transfer without revoking the lease first: the successor is elected by forced
/// votes while the old master's lease still runs. This is why the shell must stop
/// dispatching before `MsgTimeoutNow` leaves.
#[test]
#[should_panic(expected = "all hold a lease")]
fn a_leadership_transfer_without_resigning_overlaps_leases() {
    let _ = transfer_from_a_deaf_master(false);
}

#[test]
fn leases_never_overlap_under_random_loss_and_partitions() {
    let mut sim = Sim::new(3);
    sim.drop_pct = 20;
    sim.delay_ms = 3;
    let mut masters_seen = BTreeSet::new();
    for round in 0..60u64 {
        sim.cut.clear();
        let r = sim.rand();
        if !r.is_multiple_of(3) {
            sim.cut.insert(1 + (r >> 8) % 3);
        }
        sim.run_ms(150 + (round * 37) % 400);
        masters_seen.extend(sim.masters());
    }
    sim.cut.clear();
    sim.drop_pct = 0;
    assert!(sim.until_master(&[1, 2, 3], 3_000).is_some());
    assert!(
        masters_seen.len() > 1,
        "the scenario moved leadership around"
    );
}

/// A leader whose every write takes 250 ms (longer than the longest election timeout, 200 ms)
/// while it commits a batch per tick. Returns (leader, its term before, the terms after, how
/// many batches every node applied).
fn slow_leader_disk(hold_all_messages: bool) -> (u64, u64, Vec<u64>, usize) {
    let mut sim = Sim::new(3);
    sim.hold_all_messages = hold_all_messages;
    let (leader, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let term = sim.nodes[&leader].term();
    sim.disk_delay_ms.insert(leader, 250);
    for i in 0..100 {
        if sim.nodes[&leader].is_leader() {
            sim.propose(leader, payload(i));
        }
        sim.run_ms(SETTINGS.tick_ms);
    }
    sim.disk_delay_ms.clear();
    sim.run_ms(500);
    let terms = sim.nodes.values().map(RaftCore::term).collect();
    let applied = sim.applied.values().map(Vec::len).min().unwrap_or(0);
    (leader, term, terms, applied)
}

/// The leader's heartbeats and appends go out before its own write: a slow disk delays only
/// the leader's own vote in the commit quorum, never its followers' news of it.
#[test]
fn a_leader_with_a_slow_disk_keeps_its_followers_and_commits() {
    let (_, term, terms, applied) = slow_leader_disk(false);
    assert!(
        terms.iter().all(|t| *t == term),
        "an election: {term} -> {terms:?}"
    );
    assert_eq!(
        applied, 100,
        "every batch committed and applied on every node"
    );
}

/// The shell as it was (every message of a `ready` held back until its write is done): the
/// same slow disk silences the leader for longer than an election timeout and its followers
/// elect another. This is the spontaneous election the lab saw under load.
#[test]
fn a_shell_that_holds_heartbeats_for_the_disk_loses_its_leader() {
    let (_, term, terms, _) = slow_leader_disk(true);
    assert!(
        terms.iter().any(|t| *t > term),
        "no election: {term} -> {terms:?}"
    );
}

/// A follower with a slow disk learns that an entry is committed (from the leader's next
/// append) before its own copy is written and applied. The state it writes meanwhile must not
/// record that commit index: a node that crashes right after that write resumes at the
/// written commit without replay, and would never apply the entry. Here the entry is a
/// setting; the follower crashes at the first instant its disk records the entry committed.
/// (Writing the core's commit index unclamped, the follower restarts without the setting.)
#[test]
fn a_crash_after_a_write_never_skips_an_entry_committed_but_not_yet_applied() {
    let mut sim = Sim::new(3);
    let (leader, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let slow = (1..=3).find(|i| *i != leader).unwrap();
    sim.disk_delay_ms.insert(slow, 100);
    let index = sim
        .nodes
        .get_mut(&leader)
        .unwrap()
        .propose_setting("policy", b"least-connections")
        .unwrap();
    sim.drain(leader);
    sim.run_ms(SETTINGS.tick_ms);
    sim.propose(leader, payload(1));
    let mut crashed = false;
    for _ in 0..1_000 {
        sim.step_ms();
        if sim
            .disk
            .get(&slow)
            .is_some_and(|p| p.hard_state.commit >= index)
        {
            sim.restart(slow);
            crashed = true;
            break;
        }
    }
    assert!(crashed, "the slow follower never wrote the entry committed");
    sim.disk_delay_ms.clear();
    sim.run_ms(1_000);
    assert_eq!(
        sim.nodes[&slow].settings().get("policy").map(Vec::as_slice),
        Some(&b"least-connections"[..]),
        "the restarted follower lost a committed setting"
    );
}

#[test]
fn persisted_state_round_trips() {
    let mut sim = Sim::new(3);
    sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(50);
    for p in sim.disk.values() {
        let back = Persisted::decode(&p.encode().unwrap()).unwrap();
        assert_eq!(&back, p);
    }
    // First-format files: see first_format_state_files_are_still_read.
    assert!(Persisted::decode(b"garbage").is_err());
    assert!(Persisted::decode(b"TDSCRAFT1\x00\x00\x00\x09ab").is_err());
}

/// After a follower's removal the group is {leader, other}: with the other voter cut off, the
/// leader alone is no quorum and must lose its lease, although the removed node still hears
/// it. Were the removed node still a voter, leader + it would be a quorum and keep the lease.
#[test]
fn a_removed_node_no_longer_counts_toward_quorum() {
    let mut sim = Sim::new(3);
    let (leader, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let (removed, other) = if leader == 3 {
        (1, 2)
    } else {
        (3, if leader == 1 { 2 } else { 1 })
    };
    sim.change(leader, MemberChange::Remove { id: removed }, &[1, 2, 3]);
    let mut want = vec![leader, other];
    want.sort_unstable();
    for id in 1..=3 {
        assert_eq!(sim.voters(id), want, "node {id} applied the removal");
    }
    sim.run_ms(200);
    assert_eq!(
        sim.masters(),
        vec![leader],
        "the two voters keep their master"
    );
    sim.cut.insert(other);
    sim.run_ms(1_000);
    assert!(
        sim.masters().is_empty(),
        "the leader kept a lease with only the removed node answering: {:?}",
        sim.masters()
    );
    // The removed node never campaigns: it is not a voter in its own view either.
    sim.cut.clear();
    sim.run_ms(1_000);
    let m = sim.masters();
    assert_eq!(m.len(), 1);
    assert_ne!(m[0], removed, "the removed node became master");
}

/// A node added at run time starts with the bootstrap voters and an empty log, catches up
/// from the leader, applies its own addition and from then on counts toward quorum: with one
/// old follower cut, the leader keeps its lease only thanks to node 4's acknowledgements
/// (quorum of 4 voters is 3).
#[test]
fn an_added_node_catches_up_and_votes() {
    let mut sim = Sim::new(3);
    let (leader, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let joiner = RaftCore::new(4, &[1, 2, 3], SETTINGS, None, sim.now, &log).unwrap();
    sim.nodes.insert(4, joiner);
    sim.change(
        leader,
        MemberChange::Add {
            id: 4,
            context: b"node four".to_vec(),
        },
        &[1, 2, 3, 4],
    );
    for id in 1..=4 {
        assert_eq!(sim.voters(id), vec![1, 2, 3, 4], "node {id}");
        assert_eq!(
            sim.nodes[&id].membership().members.get(&4),
            Some(&b"node four".to_vec()),
            "node {id} has node 4's context"
        );
    }
    assert_eq!(sim.nodes[&4].term(), sim.nodes[&leader].term());
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    sim.cut.insert(follower);
    sim.run_ms(1_000);
    assert_eq!(
        sim.masters(),
        vec![leader],
        "node 4's votes keep the quorum"
    );
    // And the other way round: with the leader and one more cut, 2 of 4 is no quorum.
    let third = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    sim.cut.insert(third);
    sim.run_ms(1_000);
    assert!(sim.masters().is_empty());
}

#[test]
fn bad_membership_changes_are_refused_and_change_nothing() {
    let mut sim = Sim::new(3);
    let (leader, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let f = sim.nodes.get_mut(&follower).unwrap();
    assert_eq!(
        f.propose_membership(MemberChange::Remove { id: 3 }),
        Err(ProposeError::NotLeader {
            leader: Some(leader)
        })
    );
    let l = sim.nodes.get_mut(&leader).unwrap();
    assert_eq!(
        l.propose_membership(MemberChange::Add {
            id: follower,
            context: vec![]
        }),
        Err(ProposeError::AlreadyVoter { id: follower })
    );
    assert_eq!(
        l.propose_membership(MemberChange::Remove { id: 9 }),
        Err(ProposeError::NotVoter { id: 9 })
    );
    assert_eq!(
        l.propose_membership(MemberChange::Add {
            id: 0,
            context: vec![]
        }),
        Err(ProposeError::ZeroId)
    );
    let index = l
        .propose_membership(MemberChange::Remove { id: follower })
        .unwrap();
    assert_eq!(
        l.propose_membership(MemberChange::Add {
            id: 7,
            context: vec![]
        }),
        Err(ProposeError::Pending),
        "one change at a time"
    );
    sim.drain(leader);
    sim.run_ms(300);
    assert!(sim.nodes[&leader].membership().index >= index);
    assert_eq!(sim.voters(leader).len(), 2);
    // Removing the leader hands leadership to the other voter instead.
    let other = sim
        .voters(leader)
        .into_iter()
        .find(|i| *i != leader)
        .unwrap();
    let l = sim.nodes.get_mut(&leader).unwrap();
    assert_eq!(
        l.propose_membership(MemberChange::Remove { id: leader }),
        Err(ProposeError::RemovingLeader {
            id: leader,
            to: other
        })
    );
    sim.drain(leader);
    sim.run_ms(1_000);
    assert_eq!(sim.masters(), vec![other], "leadership moved");
    assert_eq!(sim.voters(other).len(), 2, "nobody was removed");
    // The last voter is never removed.
    sim.change(other, MemberChange::Remove { id: leader }, &[other]);
    let o = sim.nodes.get_mut(&other).unwrap();
    assert_eq!(
        o.propose_membership(MemberChange::Remove { id: other }),
        Err(ProposeError::LastVoter { id: other })
    );
}

#[test]
fn membership_survives_a_restart() {
    let mut sim = Sim::new(3);
    let (leader, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    sim.nodes.insert(
        4,
        RaftCore::new(4, &[1, 2, 3], SETTINGS, None, sim.now, &log).unwrap(),
    );
    sim.change(
        leader,
        MemberChange::Add {
            id: 4,
            context: vec![4, 4],
        },
        &[1, 2, 3, 4],
    );
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let p = sim.disk[&follower].clone();
    assert_eq!(Persisted::decode(&p.encode().unwrap()).unwrap(), p);
    let core = RaftCore::new(follower, &[1, 2, 3], SETTINGS, Some(p), sim.now, &log).unwrap();
    let m = core.membership();
    assert_eq!(
        m.voters,
        vec![1, 2, 3, 4],
        "voters come from disk, not the bootstrap list"
    );
    assert_eq!(m.members.get(&4), Some(&vec![4, 4]));
}

fn payload(i: u32) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

/// Thousands of proposals: every node applies each once, in order, while the persisted log
/// stays bounded by compaction; a restarted node resumes from its compacted state without
/// being handed old entries again, and applies new ones.
#[test]
fn the_log_stays_bounded_and_a_restarted_core_resumes() {
    let mut sim = Sim::new(3);
    let (m, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(50);
    let n = 3_000u32;
    for i in 0..n {
        sim.propose(m, payload(i));
        sim.run_ms(1);
    }
    sim.run_ms(100);
    let all: Vec<Vec<u8>> = (0..n).map(payload).collect();
    for id in 1..=3 {
        assert_eq!(
            sim.applied[&id], all,
            "node {id} applied every proposal in order"
        );
        let disk = &sim.disk[&id];
        assert!(
            disk.snapshot.index > u64::from(n) / 2,
            "node {id} compacted: {:?}",
            disk.snapshot
        );
        assert!(
            disk.entries.len() as u64 <= 2 * LOG_KEEP_ENTRIES + 1,
            "node {id} keeps {} entries",
            disk.entries.len()
        );
        let back = Persisted::decode(&disk.encode().unwrap()).unwrap();
        assert_eq!(&back, disk);
    }
    assert!(sim.max_persisted_entries as u64 <= 2 * LOG_KEEP_ENTRIES + 2);

    // A follower restarts from its compacted state.
    let f = (1..=3).find(|i| *i != m).unwrap();
    let before = sim.nodes[&f].log_bounds();
    sim.restart(f);
    assert_eq!(
        sim.nodes[&f].log_bounds(),
        before,
        "log resumes where it was"
    );
    sim.applied.insert(f, Vec::new());
    sim.run_ms(300);
    assert_eq!(sim.masters(), vec![m]);
    sim.propose(m, payload(n));
    sim.run_ms(50);
    assert_eq!(
        sim.applied[&f],
        vec![payload(n)],
        "old entries are not handed over again, new ones are"
    );
}

/// A follower cut off while the log moves far past what the others keep catches up through
/// a snapshot, then applies new entries again.
#[test]
fn a_lagging_follower_catches_up_via_snapshot() {
    let mut sim = Sim::new(3);
    let (m, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(50);
    let f = (1..=3).find(|i| *i != m).unwrap();
    sim.cut.insert(f);
    let lag_last = sim.nodes[&f].log_bounds().1;
    for i in 0..1_000u32 {
        sim.propose(m, payload(i));
        sim.run_ms(1);
    }
    sim.run_ms(50);
    let (leader_first, _) = sim.nodes[&m].log_bounds();
    assert!(
        leader_first > lag_last + 1,
        "the leader no longer holds what the follower needs"
    );
    sim.cut.clear();
    sim.run_ms(500);
    assert_eq!(
        sim.masters(),
        vec![m],
        "the follower's return deposes nobody"
    );
    assert!(
        sim.disk[&f].snapshot.index >= leader_first - 1,
        "the follower installed a snapshot: {:?}",
        sim.disk[&f].snapshot
    );
    assert_eq!(
        sim.nodes[&f].log_bounds().1,
        sim.nodes[&m].log_bounds().1,
        "caught up"
    );
    let had = sim.applied.get(&f).map_or(0, Vec::len);
    sim.propose(m, payload(5_000));
    sim.run_ms(50);
    assert_eq!(sim.applied[&f].len(), had + 1);
    assert_eq!(sim.applied[&f].last(), Some(&payload(5_000)));
}

/// A follower cut off while a node was added, and brought back after the log that carried the
/// addition was compacted, learns the new node's context from the snapshot it installs: the
/// voters alone would not say where node 4 is.
#[test]
fn a_follower_caught_up_by_snapshot_learns_the_member_contexts() {
    let mut sim = Sim::new(3);
    let (m, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let f = (1..=3).find(|i| *i != m).unwrap();
    let other = (1..=3).find(|i| *i != m && *i != f).unwrap();
    sim.cut.insert(f);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let joiner = RaftCore::new(4, &[1, 2, 3], SETTINGS, None, sim.now, &log).unwrap();
    sim.nodes.insert(4, joiner);
    sim.change(
        m,
        MemberChange::Add {
            id: 4,
            context: b"node four".to_vec(),
        },
        &[m, other, 4],
    );
    for i in 0..1_000u32 {
        sim.propose(m, payload(i));
        sim.run_ms(1);
    }
    sim.run_ms(50);
    assert!(
        sim.disk[&m].snapshot.index > sim.nodes[&m].membership().index,
        "the addition was compacted away on the leader"
    );
    assert_eq!(sim.nodes[&f].membership().members.get(&4), None);
    sim.cut.clear();
    sim.run_ms(500);
    assert!(
        sim.disk[&f].snapshot.index > 0,
        "the follower installed a snapshot"
    );
    let got = sim.nodes[&f].membership();
    assert_eq!(got.voters, vec![1, 2, 3, 4]);
    assert_eq!(
        got.members.get(&4),
        Some(&b"node four".to_vec()),
        "node 4's context came with the snapshot"
    );
    assert_eq!(sim.disk[&f].members.get(&4), Some(&b"node four".to_vec()));
}

/// A setting proposed on the leader is applied by every node, survives a restart from the
/// persisted state, reaches a follower that catches up through a snapshot, and is refused on a
/// follower (naming the leader).
#[test]
fn settings_are_replicated_persisted_and_snapshotted() {
    let mut sim = Sim::new(3);
    let (m, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let f = (1..=3).find(|i| *i != m).unwrap();
    match sim
        .nodes
        .get_mut(&f)
        .unwrap()
        .propose_setting("policy", b"x")
    {
        Err(ProposeError::NotLeader { leader }) => assert_eq!(leader, Some(m)),
        other => panic!("a follower accepted a setting: {other:?}"),
    }
    sim.nodes
        .get_mut(&m)
        .unwrap()
        .propose_setting("policy", b"least-connections")
        .unwrap();
    sim.drain(m);
    sim.run_ms(100);
    for id in 1..=3 {
        assert_eq!(
            sim.nodes[&id].settings().get("policy").map(Vec::as_slice),
            Some(&b"least-connections"[..]),
            "node {id}"
        );
        assert_eq!(
            sim.disk[&id].settings.get("policy").map(Vec::as_slice),
            Some(&b"least-connections"[..]),
            "node {id} persisted it"
        );
    }
    // Restart from disk: the setting is there without replaying the log.
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let back = RaftCore::new(
        f,
        &[1, 2, 3],
        SETTINGS,
        Some(sim.disk[&f].clone()),
        sim.now,
        &log,
    )
    .unwrap();
    assert_eq!(
        back.settings().get("policy").map(Vec::as_slice),
        Some(&b"least-connections"[..])
    );
    // A follower cut off across a later change and a compaction gets it from the snapshot.
    sim.cut.insert(f);
    sim.nodes
        .get_mut(&m)
        .unwrap()
        .propose_setting("policy", b"power-of-two")
        .unwrap();
    sim.drain(m);
    for i in 0..1_000u32 {
        sim.propose(m, payload(i));
        sim.run_ms(1);
    }
    sim.cut.clear();
    sim.run_ms(500);
    assert!(
        sim.disk[&f].snapshot.index > 0,
        "the follower installed a snapshot"
    );
    assert_eq!(
        sim.nodes[&f].settings().get("policy").map(Vec::as_slice),
        Some(&b"power-of-two"[..])
    );
    // Setting entries never reach the shell as opaque data.
    assert!(sim
        .applied
        .values()
        .flatten()
        .all(|d| d.windows(12).all(|w| w != b"power-of-two")));
}

#[test]
fn first_format_state_files_are_still_read() {
    let mut sim = Sim::new(3);
    sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(50);
    let p = sim.disk.values().next().unwrap().clone();
    // Re-encode in the first format: magic, hard state, conf state, entries (no snapshot
    // metadata, no member or settings record).
    let v2 = p.encode().unwrap();
    let mut parts = Vec::new();
    let mut rest = &v2[b"TDSCRAFT3".len()..];
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        parts.push(rest[..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    let mut v1 = b"TDSCRAFT1".to_vec();
    for (i, part) in parts.iter().enumerate() {
        if !(2..=4).contains(&i) {
            v1.extend_from_slice(part);
        }
    }
    assert_eq!(Persisted::decode(&v1).unwrap(), p);
    for bad in [&b"TDSCRAFT9"[..], b"TDSCRAFT2"] {
        let err = Persisted::decode(bad).unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");
    }
    let err = Persisted::decode(b"TDSCRAFT9").unwrap_err().to_string();
    assert!(err.contains("magic"), "{err}");
}

/// What a peer's compromised or broken process (or, without the cluster key, anyone) could
/// step into a core: each shape below crashed the Raft task, rewrote membership or forced an
/// election before `tdsc_election::inbound` refused it. Every one is refused; the cluster
/// keeps its master, its term and its voters.
#[test]
fn forged_raft_messages_are_refused_and_change_nothing() {
    use protobuf::Message as _;
    use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType};

    let mut sim = Sim::new(3);
    let (leader, _) = sim.until_master(&[1, 2, 3], 2_000).unwrap();
    sim.run_ms(100);
    let follower = if leader == 1 { 2 } else { 1 };
    let other = 6 - leader - follower;
    let term = sim.nodes[&leader].term();
    let forge = |t: MessageType, from: u64, to: u64, term: u64| {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.from = from;
        m.to = to;
        m.term = term;
        m
    };
    let mut forged: Vec<(&str, u64, Message)> = Vec::new();
    // An AddNode proposal for an attacker's node 99, sent to the leader with term 0.
    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::AddNode);
    cc.node_id = 99;
    let mut e = Entry::default();
    e.set_entry_type(EntryType::EntryConfChange);
    e.data = cc.write_to_bytes().unwrap().into();
    let mut propose = forge(MessageType::MsgPropose, follower, leader, 0);
    propose.entries = vec![e].into();
    forged.push(("conf change proposal", leader, propose));
    forged.push((
        "empty proposal",
        leader,
        forge(MessageType::MsgPropose, follower, leader, term),
    ));
    // A heartbeat committing far past the follower's log (raft-rs panics on it).
    let mut hb = forge(MessageType::MsgHeartbeat, leader, follower, term);
    hb.commit = 1 << 40;
    forged.push(("impossible commit", follower, hb));
    // MsgTimeoutNow from a node that does not lead: forces an election inside the lease.
    forged.push((
        "timeout now",
        follower,
        forge(MessageType::MsgTimeoutNow, other, follower, term),
    ));
    forged.push((
        "local hup",
        follower,
        forge(MessageType::MsgHup, other, follower, term),
    ));
    // A snapshot that makes the follower's voters [follower, 99].
    let mut snap = forge(MessageType::MsgSnapshot, leader, follower, 0);
    {
        let meta = snap.mut_snapshot().mut_metadata();
        meta.index = 1 << 30;
        meta.term = 0;
        meta.mut_conf_state().voters = vec![follower, 99];
    }
    forged.push(("term-0 snapshot", follower, snap));
    let mut resp = forge(MessageType::MsgAppendResponse, follower, leader, term);
    resp.index = 1 << 40;
    forged.push(("progress beyond the log", leader, resp));

    let voters_before: Vec<Vec<u64>> = (1..=3).map(|id| sim.voters(id)).collect();
    let mut got_in = Vec::new();
    for (what, to, m) in forged {
        let bytes = m.write_to_bytes().unwrap();
        let (from, now) = (m.from, sim.now);
        let node = sim.nodes.get_mut(&to).unwrap();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            node.step(from, &bytes, now)
        })) {
            Ok(Err(_)) => {}
            Ok(Ok(())) => got_in.push(format!("{what}: stepped")),
            Err(_) => {
                // raft-rs panicked: in the daemon that is the Raft task gone.
                got_in.push(format!("{what}: raft-rs panicked"));
                continue;
            }
        }
        sim.drain(to);
        sim.run_ms(50);
    }
    assert!(got_in.is_empty(), "forged messages got in: {got_in:?}");
    sim.run_ms(500);
    assert_eq!(sim.masters(), vec![leader], "the master did not change");
    assert_eq!(sim.nodes[&leader].term(), term, "no election happened");
    let voters_after: Vec<Vec<u64>> = (1..=3).map(|id| sim.voters(id)).collect();
    assert_eq!(voters_after, voters_before, "membership unchanged");
}

/// Found by the `raft_step` fuzz target: an authenticated peer's append after index 1 with
/// log term 0 and commit 1 reached a panic inside raft-rs on a node with an empty log
/// (`to_commit 1 is out of range [last_index 0]`), which ends the daemon. It is refused now.
#[test]
fn an_append_with_log_term_zero_after_a_nonzero_index_is_refused_not_a_panic() {
    use protobuf::Message as _;
    use raft::eraftpb::{Message, MessageType};
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let mut core = RaftCore::new(1, &[1, 2, 3], SETTINGS, None, 0, &log).unwrap();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.from = 2;
    m.to = 1;
    m.term = 1;
    m.index = 1;
    m.log_term = 0;
    m.commit = 1;
    let bytes = m.write_to_bytes().unwrap();
    assert!(matches!(
        core.step(2, &bytes, 0),
        Err(tdsc_election::StepError::Invalid(_))
    ));
    let _ = core.ready();
    assert_eq!(core.log_bounds().1, 0);
}

/// A peer's heartbeat with term `u64::MAX` would make this node adopt that term, and its next
/// campaign's `term + 1` inside raft-rs overflows (a panic with overflow checks; without, a
/// pre-vote for term 0, which raft-rs takes for a local message). It is refused now.
#[test]
fn a_term_of_u64_max_is_refused_and_the_next_campaign_does_not_wrap() {
    use protobuf::Message as _;
    use raft::eraftpb::{Message, MessageType};
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let mut core = RaftCore::new(1, &[1, 2, 3], SETTINGS, None, 0, &log).unwrap();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = 2;
    m.to = 1;
    m.term = u64::MAX;
    let bytes = m.write_to_bytes().unwrap();
    assert!(matches!(
        core.step(2, &bytes, 0),
        Err(tdsc_election::StepError::Invalid(_))
    ));
    let mut terms = Vec::new();
    for t in 1..=3 * SETTINGS.election_tick as u64 {
        core.tick(t * SETTINGS.tick_ms);
        let out = core.ready();
        let mut sent = out.messages;
        if let Some(job) = out.persist {
            sent.extend(job.messages);
            core.persisted(job.number);
        }
        for (_, bytes) in sent {
            terms.push(Message::parse_from_bytes(&bytes).unwrap().term);
        }
    }
    assert!(core.term() < u64::MAX);
    assert!(
        !terms.is_empty() && terms.iter().all(|&t| t > 0),
        "{terms:?}"
    );
}
