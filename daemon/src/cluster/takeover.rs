//! Replicated SYN-forward records and what a new master adopts (paper §3.5).
//!
//! # The flow
//!
//! 1. The master thread records every *new* dispatch decision in its own table and hands a
//!    [`Dispatched`] value to the Raft task through a bounded `sync_channel` (see
//!    `crate::datapath::dispatch`): no lock, no allocation, never blocks; a full channel is counted
//!    (`records_handoff_overflow`).
//! 2. The Raft task, while leader, drains the hand-off each tick and proposes what it holds as
//!    entries of up to [`MAX_RECORDS_PER_BATCH`] records ([`encode_batch`]), at most
//!    [`MAX_BATCHES_PER_TICK`] of them: as many as the hand-off holds, so it keeps up with any
//!    dispatch rate the channel does ([`drain_tick`]).
//! 3. Every node applies committed batches to its [`Replica`], a table of the same size and
//!    window as the master's, stamped with the local apply time; node ids become view indices.
//! 4. When leadership arrives, *before* the master ruleset goes in, [`Takeover::adopt`]
//!    asks every alive member for the remote address and port of its SYN-RECV sockets on the
//!    VIP (a [`SynRecvQuery`] on the cluster socket, answered by [`answer_queries`]), waits
//!    for all answers (but the previous master's) or `scheduler.syn_recv_wait_ms`, adds its
//!    own SYN-RECV sockets, and builds the replica's live records plus one any-ISN record per
//!    SYN-RECV socket ([`build_adoption`]). Whom to ask, whom to wait for and when to stop is
//!    the pure [`Gathering`]; `Takeover` only sends, receives and keeps time. The node hands
//!    the records to the master thread as a command that is processed before the first
//!    queued SYN; only then does the master ruleset go in.
//!
//! # What is guaranteed, and in which window
//!
//! * A record **committed** before the old master died is on every node that applied it,
//!   and a new master has applied every committed entry before it may dispatch (its lease
//!   needs an entry of its own term committed, which commits and applies all earlier ones,
//!   and the shell applies committed entries before it publishes leadership). So a
//!   retransmitted SYN within `syn_record_window_ms` of the apply goes to the node that took
//!   the first copy, as long as that node is alive.
//! * A record **not yet committed** when the master died (made at most one tick plus one
//!   replication round trip before, about 10–12 ms with the defaults; or dropped by a full
//!   hand-off channel) is lost, but the chosen node has the handshake in SYN-RECV once the
//!   forwarded SYN has arrived: the reconciliation finds it there and the retransmission goes
//!   to that node whatever its ISN, while the node holds the SYN-RECV socket (about 63 s with
//!   `tcp_synack_retries` = 5) and as long as it answered within `syn_recv_wait_ms`.
//! * **Not covered:** a forward still in flight when the new master asks (no SYN-RECV yet,
//!   and no committed record) — the retransmission may go to another node, and if the first
//!   forward then arrives both nodes hold a handshake; the client completes one and the
//!   other node's SYN/ACK is answered with an RST by the client's stack. A member that does
//!   not answer in time, more than [`MAX_SYN_RECV_PER_ANSWER`] SYN-RECV sockets on one node
//!   (the rest are not reconciled), a replica entry pushed out of a full table, records in
//!   log entries a lagging follower received only as a snapshot (the snapshot carries no
//!   records), and records a node applied before its own daemon restarted.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
pub use tdsc_proto::control::MAX_RECORDS_PER_BATCH;
use tdsc_proto::control::{
    addr_bytes, addr_from, Body, Command, Envelope, PeerAddr, RaftCommand, SynRecord,
    SynRecvAnswer, SynRecvQuery, MAX_SYN_RECV_PER_ANSWER,
};

use crate::cluster::bus::ClusterSocket;
use crate::cluster::counters::{Histogram, TAKEOVER_MS_BOUNDS};
use crate::cluster::role::RoleCell;
use crate::cluster::view::ClusterView;
use crate::datapath::queue::MasterCommand;
use crate::datapath::records::{Dispatched, RecordEntry, SynRecords};
use crate::datapath::sticky::{Affinity, AffinitySettings};
use crate::host::sockdiag::SockDiag;
use crate::shutdown::Shutdown;

/// Records waiting between the master thread and the Raft task: many batches' worth, so a
/// burst rides out a slow tick. 28 bytes each, preallocated.
pub const HANDOFF_CAPACITY: usize = 8 * MAX_RECORDS_PER_BATCH;

/// Record batches the Raft task proposes in one tick at most: the whole hand-off (the rate
/// this allows: docs/design/syn-records.md).
pub const MAX_BATCHES_PER_TICK: usize = HANDOFF_CAPACITY / MAX_RECORDS_PER_BATCH;

/// Queries or answers waiting in the bus's channels; beyond this they are dropped.
pub const QUERY_CHANNEL_CAPACITY: usize = 64;

/// Replication and adoption figures for `tdscctl status`.
#[derive(Debug, Default)]
pub struct RecordStats {
    pub proposed_batches: AtomicU64,
    pub proposed_records: AtomicU64,
    pub applied_batches: AtomicU64,
    pub applied_records: AtomicU64,
    /// Applied records naming a node id this node does not know.
    pub applied_unknown_node: AtomicU64,
    /// Hand-offs drained while this node was not leader (made just before it stepped down).
    pub discarded_not_leader: AtomicU64,
    pub proposals_refused: AtomicU64,
    /// SYN-RECV queries this node answered.
    pub queries_answered: AtomicU64,
    pub last_takeover: Mutex<Option<TakeoverReport>>,
    /// How long each takeover took, in ms (`TakeoverReport::wait_ms`; the Raft task's
    /// takeover, once per takeover).
    pub takeover_ms: Histogram<{ TAKEOVER_MS_BOUNDS.len() }>,
}

/// What the last takeover adopted.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeoverReport {
    pub term: u64,
    pub records_adopted: u64,
    /// Client-affinity entries adopted from the replica.
    #[serde(default)]
    pub affinity_adopted: u64,
    pub syn_recv_reconciled: u64,
    pub members_asked: u32,
    pub members_answered: u32,
    /// Some member had more SYN-RECV sockets than one answer carries.
    pub truncated: bool,
    pub wait_ms: u64,
}

/// This node's copy of the master's records, filled from committed Raft entries.
#[derive(Debug)]
pub struct Replica {
    pub table: SynRecords,
    /// The client-affinity replica (`crate::datapath::sticky`), built from the same records:
    /// each committed record renews its client's entry. `None` with affinity off.
    pub affinity: Option<Affinity>,
}

impl Replica {
    pub fn new(capacity: usize, window_ms: u64, affinity: Option<&AffinitySettings>) -> Self {
        Replica {
            table: SynRecords::new(capacity, window_ms),
            affinity: affinity.map(Affinity::new),
        }
    }

    /// Switches the affinity replica to `settings`, keeping its live entries.
    pub fn set_affinity(&mut self, settings: Option<&AffinitySettings>, now_ms: u64) {
        self.affinity = Affinity::replace(self.affinity.take(), settings, now_ms);
    }

    /// Applies one committed entry's data; returns (records applied, records naming an
    /// unknown node). Entries of other kinds, or undecodable, apply nothing.
    pub fn apply(&mut self, data: &[u8], view: &ClusterView, now_ms: u64) -> (u64, u64) {
        let Ok(RaftCommand {
            command: Some(Command::Records(batch)),
        }) = RaftCommand::from_bytes(data)
        else {
            return (0, 0);
        };
        let (mut ok, mut unknown) = (0, 0);
        for r in &batch.records {
            let index = view.index_of_id(r.node).and_then(|i| u16::try_from(i).ok());
            let (Some(node), Some(client), Ok(port)) =
                (index, addr_from(&r.client), u16::try_from(r.port))
            else {
                unknown += 1;
                continue;
            };
            self.table.insert(&client, port, r.isn, node, now_ms);
            if let Some(a) = &mut self.affinity {
                a.renew(&client, node, now_ms);
            }
            ok += 1;
        }
        (ok, unknown)
    }
}

/// One Raft entry's data for these records.
pub fn encode_batch(records: &[Dispatched]) -> Vec<u8> {
    RaftCommand::records(
        records
            .iter()
            .map(|d| SynRecord {
                client: addr_bytes(&d.client),
                port: u32::from(d.port),
                isn: d.isn,
                node: d.node_id,
            })
            .collect(),
    )
    .to_bytes()
}

/// Drains the hand-off (non-blocking) into batches of at most [`MAX_RECORDS_PER_BATCH`], at
/// most [`MAX_BATCHES_PER_TICK`] of them, and hands each to `each` in turn, through `into`
/// (reused). A batch that is not full ends the tick: records arriving meanwhile wait for the
/// next one rather than make an entry (a Raft message, a disk write) of a few. Returns how
/// many batches it handed over.
pub fn drain_tick(
    rx: &mpsc::Receiver<Dispatched>,
    into: &mut Vec<Dispatched>,
    mut each: impl FnMut(&[Dispatched]),
) -> usize {
    for n in 0..MAX_BATCHES_PER_TICK {
        drain_batch(rx, into);
        if into.is_empty() {
            return n;
        }
        each(into);
        if into.len() < MAX_RECORDS_PER_BATCH {
            return n + 1;
        }
    }
    MAX_BATCHES_PER_TICK
}

/// Drains at most one batch from the hand-off (non-blocking).
pub fn drain_batch(rx: &mpsc::Receiver<Dispatched>, into: &mut Vec<Dispatched>) {
    into.clear();
    while into.len() < MAX_RECORDS_PER_BATCH {
        match rx.try_recv() {
            Ok(d) => into.push(d),
            Err(_) => break,
        }
    }
}

/// What a new master adopts: the replica's live records, then one any-ISN record per
/// SYN-RECV socket `(view index, client address, client port)`, stamped `now_ms`. A SYN-RECV
/// record replaces a replicated one of the same client address and port: it describes the
/// handshake in progress now.
pub fn build_adoption(
    replica: Vec<RecordEntry>,
    syn_recv: &[(u16, IpAddr, u16)],
    now_ms: u64,
) -> Vec<RecordEntry> {
    let mut out = replica;
    out.extend(syn_recv.iter().map(|&(node, client, port)| RecordEntry {
        client,
        port,
        isn: None,
        node,
        stamp_ms: now_ms,
    }));
    out
}

/// One slot of the cluster view, as a [`Gathering`] sees it: a snapshot, so the rule is a
/// plain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The slot's index in the view: SYN-RECV records name the holder by it.
    pub index: usize,
    pub id: u32,
    pub address: IpAddr,
    pub present: bool,
    pub alive: bool,
}

impl Peer {
    /// The view's slots in use, now.
    pub fn snapshot(view: &ClusterView) -> Vec<Peer> {
        view.slots()
            .iter()
            .enumerate()
            .map(|(index, n)| Peer {
                index,
                id: n.id(),
                address: n.address(),
                present: n.is_present(),
                alive: n.alive.load(Relaxed),
            })
            .collect()
    }
}

/// A member to send the [`SynRecvQuery`] to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub index: usize,
    pub id: u32,
    pub address: IpAddr,
}

/// What a gathering collected: the members' SYN-RECV sockets as
/// `(view index, client address, client port)`, and the figures for [`TakeoverReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gathered {
    pub entries: Vec<(u16, IpAddr, u16)>,
    pub asked: u32,
    pub answered: u32,
    /// Some member had more SYN-RECV sockets than one answer carries.
    pub truncated: bool,
}

/// A new master's gathering rule, sans-IO: whom to ask, whom to wait for, when to stop.
///
/// * **Asked:** every present, alive member but this node ([`Gathering::targets`]). An absent
///   slot or a member not heard from within `health.dead_after_ms` is not asked: it could not
///   answer in time anyway.
/// * **Not waited for:** the previous master (the last other node seen leading). After a
///   crash or a partition it cannot answer, and waiting for it would make every such
///   takeover pay the whole `syn_recv_wait_ms`. It is still asked, and its answer counts if
///   it arrives before [`Gathering::finish`]. (After a graceful stop it answers at once, and
///   it stopped dispatching before it handed leadership over, so its records had time to
///   commit.)
/// * **Done:** every awaited member has answered, or the deadline (`now + wait`) has passed.
///   Answers with another nonce, from a member not asked, or a second answer from the same
///   member are ignored.
///
/// The caller sends the queries, feeds answers ([`Gathering::on_answer`]) and the time
/// ([`Gathering::on_tick`]) until [`Gathering::done`], takes the answers already received,
/// then calls [`Gathering::finish`].
#[derive(Debug)]
pub struct Gathering {
    nonce: u64,
    targets: Vec<Target>,
    /// Parallel to `targets`.
    answered: Vec<bool>,
    /// The previous master's id, if it is among the targets.
    not_awaited: Option<u32>,
    deadline_ms: u64,
    expired: bool,
    gathered: Gathered,
}

impl Gathering {
    /// `peers` is a snapshot of the view ([`Peer::snapshot`]); `now_ms` and `wait_ms` are on
    /// the caller's clock, the one it later passes to [`Gathering::on_tick`].
    pub fn new(
        peers: &[Peer],
        self_id: u32,
        previous_master: Option<u32>,
        nonce: u64,
        now_ms: u64,
        wait_ms: u64,
    ) -> Self {
        let targets: Vec<Target> = peers
            .iter()
            .filter(|p| p.id != self_id && p.present && p.alive)
            .map(|p| Target {
                index: p.index,
                id: p.id,
                address: p.address,
            })
            .collect();
        Gathering {
            nonce,
            answered: vec![false; targets.len()],
            not_awaited: previous_master.filter(|id| targets.iter().any(|t| t.id == *id)),
            deadline_ms: now_ms.saturating_add(wait_ms),
            expired: false,
            gathered: Gathered {
                asked: u32::try_from(targets.len()).unwrap_or(u32::MAX),
                ..Gathered::default()
            },
            targets,
        }
    }

    /// The nonce the query carries and answers must repeat.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// The members to ask.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// When waiting stops, on the caller's clock.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// Takes an answer from member `from`; returns whether it counted.
    pub fn on_answer(&mut self, from: u32, answer: &SynRecvAnswer) -> bool {
        if answer.nonce != self.nonce {
            return false;
        }
        let Some(t) = self.targets.iter().position(|t| t.id == from) else {
            return false;
        };
        if self.answered[t] {
            return false;
        }
        self.answered[t] = true;
        self.gathered.answered += 1;
        self.gathered.truncated |= answer.truncated;
        push_peers(
            &mut self.gathered.entries,
            self.targets[t].index,
            &answer.sockets,
        );
        true
    }

    /// The time is now `now_ms`.
    pub fn on_tick(&mut self, now_ms: u64) {
        if now_ms >= self.deadline_ms {
            self.expired = true;
        }
    }

    /// Stop waiting: every awaited member answered, or the deadline passed.
    pub fn done(&self) -> bool {
        self.expired
            || self
                .targets
                .iter()
                .zip(&self.answered)
                .all(|(t, answered)| *answered || Some(t.id) == self.not_awaited)
    }

    /// What the answers carried.
    pub fn finish(self) -> Gathered {
        self.gathered
    }
}

/// The pieces a new master needs to take over. Owned by the role loop.
#[derive(Debug)]
pub struct Takeover {
    pub node_id: u32,
    pub vip: IpAddr,
    pub port: u16,
    pub wait: Duration,
    pub sock: Arc<ClusterSocket>,
    pub view: Arc<ClusterView>,
    pub role: Arc<RoleCell>,
    pub replica: Arc<Mutex<Replica>>,
    pub stats: Arc<RecordStats>,
    /// Answers the bus accepted: (member id, answer).
    pub answers: tokio::sync::mpsc::Receiver<(u32, SynRecvAnswer)>,
    pub commands: mpsc::Sender<MasterCommand>,
    /// `scheduler.reconcile_syn_recv`: off (tests only) adopts the replica alone.
    pub reconcile: bool,
    nonce: u64,
}

/// What a [`Takeover`] talks through and reads.
#[derive(Debug)]
pub struct TakeoverLinks {
    /// The cluster socket, to send queries (answers come back through the bus).
    pub sock: Arc<ClusterSocket>,
    pub view: Arc<ClusterView>,
    pub role: Arc<RoleCell>,
    /// Filled by the Raft task; read at adoption.
    pub replica: Arc<Mutex<Replica>>,
    pub stats: Arc<RecordStats>,
    /// Answers the bus accepted: (member id, answer).
    pub answers: tokio::sync::mpsc::Receiver<(u32, SynRecvAnswer)>,
    /// To the master thread.
    pub commands: mpsc::Sender<MasterCommand>,
}

impl Takeover {
    pub fn new(cfg: &crate::config::Config, links: TakeoverLinks) -> Self {
        let TakeoverLinks {
            sock,
            view,
            role,
            replica,
            stats,
            answers,
            commands,
        } = links;
        Takeover {
            node_id: cfg.node_id,
            vip: cfg.vip,
            port: cfg.control_port,
            wait: cfg.syn_recv_wait,
            sock,
            view,
            role,
            replica,
            stats,
            answers,
            commands,
            reconcile: cfg.reconcile_syn_recv,
            nonce: u64::from(cfg.node_id) << 48,
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> u32 {
        self.node_id
    }

    /// Gathers the replica and the cluster's SYN-RECV sockets and hands them to the master
    /// thread (processed before its next SYN). Call before the master ruleset goes in.
    ///
    /// `previous_master` (the last other node seen leading) is asked too, but not waited for;
    /// see [`Gathering`] for the whole rule.
    pub async fn adopt(&mut self, term: u64, previous_master: Option<u32>) {
        let started = std::time::Instant::now();
        let Gathered {
            entries: syn_recv,
            asked,
            answered,
            truncated,
        } = if self.reconcile {
            self.ask_members(term, previous_master).await
        } else {
            Gathered::default()
        };
        let now = self.role.now_ms();
        let replica = match self.replica.lock() {
            Ok(r) => r.table.live_entries(now),
            Err(_) => Vec::new(),
        };
        let records_adopted = u64::try_from(replica.len()).unwrap_or(u64::MAX);
        let reconciled = u64::try_from(syn_recv.len()).unwrap_or(u64::MAX);
        let affinity = match self.replica.lock() {
            Ok(r) => r
                .affinity
                .as_ref()
                .map_or_else(Vec::new, |a| a.live_entries(now)),
            Err(_) => Vec::new(),
        };
        let affinity_adopted = u64::try_from(affinity.len()).unwrap_or(u64::MAX);
        let records = build_adoption(replica, &syn_recv, now);
        if self
            .commands
            .send(MasterCommand::Adopt { records, affinity })
            .is_err()
        {
            tracing::error!("the master thread has stopped; nothing adopted");
        }
        let report = TakeoverReport {
            term,
            records_adopted,
            affinity_adopted,
            syn_recv_reconciled: reconciled,
            members_asked: asked,
            members_answered: answered,
            truncated,
            wait_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        tracing::info!(?report, "takeover: records and SYN-RECV sockets adopted");
        self.stats
            .takeover_ms
            .observe(&TAKEOVER_MS_BOUNDS, report.wait_ms);
        if let Ok(mut last) = self.stats.last_takeover.lock() {
            *last = Some(report);
        }
    }

    /// Runs a [`Gathering`]: sends its queries, feeds it answers and the time until it is
    /// done, then adds this node's own SYN-RECV sockets.
    async fn ask_members(&mut self, term: u64, previous_master: Option<u32>) -> Gathered {
        self.nonce = self.nonce.wrapping_add(1);
        // Answers to an earlier query are stale.
        while self.answers.try_recv().is_ok() {}
        let wait_ms = u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX);
        let mut gathering = Gathering::new(
            &Peer::snapshot(&self.view),
            self.node_id,
            previous_master,
            self.nonce,
            0,
            wait_ms,
        );
        let query = Envelope {
            from: self.node_id,
            term,
            body: Some(Body::SynRecvQuery(SynRecvQuery {
                nonce: gathering.nonce(),
            })),
        }
        .to_bytes();
        for t in gathering.targets() {
            let _ = self
                .sock
                .send_to(&query, SocketAddr::new(t.address, self.port))
                .await;
        }
        // The gathering's clock starts once the queries are out: time 0 is now.
        let clock = tokio::time::Instant::now();
        let elapsed_ms = || u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        while !gathering.done() {
            let deadline = clock + Duration::from_millis(gathering.deadline_ms());
            match tokio::time::timeout_at(deadline, self.answers.recv()).await {
                Ok(Some((from, answer))) => {
                    gathering.on_answer(from, &answer);
                }
                // The report loop has stopped: nothing more will come.
                Ok(None) => break,
                Err(_) => gathering.on_tick(elapsed_ms()),
            }
        }
        // Answers already here count, the previous master's among them.
        while let Ok((from, answer)) = self.answers.try_recv() {
            gathering.on_answer(from, &answer);
        }
        let mut gathered = gathering.finish();
        match own_syn_recv(&self.vip) {
            Ok((own, t)) => {
                gathered.truncated |= t;
                push_peers(&mut gathered.entries, self.view.self_index, &own.sockets);
            }
            Err(e) => tracing::warn!(error = %e, "cannot list own SYN-RECV sockets"),
        }
        gathered
    }
}

fn push_peers(into: &mut Vec<(u16, IpAddr, u16)>, index: usize, peers: &[PeerAddr]) {
    let Ok(node) = u16::try_from(index) else {
        return;
    };
    for p in peers {
        if let (Some(a), Ok(port)) = (addr_from(&p.addr), u16::try_from(p.port)) {
            into.push((node, a, port));
        }
    }
}

/// This node's SYN-RECV sockets on the VIP, as an answer.
fn own_syn_recv(vip: &IpAddr) -> std::io::Result<(SynRecvAnswer, bool)> {
    let (peers, truncated) = SockDiag::open()?.syn_recv_peers(vip, MAX_SYN_RECV_PER_ANSWER)?;
    let answer = SynRecvAnswer {
        nonce: 0,
        sockets: peers
            .iter()
            .map(|(a, p)| PeerAddr {
                addr: addr_bytes(a),
                port: u32::from(*p),
            })
            .collect(),
        truncated,
    };
    Ok((answer, truncated))
}

/// Answers the SYN-RECV queries the bus accepted (sealed by a member, from its address):
/// (querier's address, nonce). Runs until `shutdown`.
pub async fn answer_queries(
    mut queries: tokio::sync::mpsc::Receiver<(SocketAddr, u64)>,
    sock: Arc<ClusterSocket>,
    node_id: u32,
    vip: IpAddr,
    role: Arc<RoleCell>,
    stats: Arc<RecordStats>,
    mut shutdown: Shutdown,
) {
    loop {
        let query = tokio::select! {
            q = queries.recv() => q,
            () = shutdown.requested() => return,
        };
        let Some((to, nonce)) = query else { return };
        let mut answer = match own_syn_recv(&vip) {
            Ok((a, _)) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list SYN-RECV sockets for a new master");
                continue;
            }
        };
        answer.nonce = nonce;
        let env = Envelope {
            from: node_id,
            term: role.term(),
            body: Some(Body::SynRecvAnswer(answer)),
        };
        if sock.send_to(&env.to_bytes(), to).await.is_ok() {
            stats.queries_answered.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::records::Lookup;

    fn view() -> ClusterView {
        let nodes = crate::config::test_nodes(3);
        ClusterView::new(&nodes, 1)
    }

    fn peers(n: u32) -> Vec<Peer> {
        (1..=n)
            .map(|id| Peer {
                index: usize::try_from(id - 1).unwrap(),
                id,
                address: IpAddr::from([198, 51, 100, 10 + u8::try_from(id).unwrap()]),
                present: true,
                alive: true,
            })
            .collect()
    }

    /// An answer carrying one SYN-RECV socket whose client port is `port`.
    fn answer(nonce: u64, port: u32) -> SynRecvAnswer {
        SynRecvAnswer {
            nonce,
            sockets: vec![PeerAddr {
                addr: vec![192, 0, 2, 101],
                port,
            }],
            truncated: false,
        }
    }

    fn ports(g: &Gathered) -> Vec<(u16, u16)> {
        g.entries.iter().map(|(i, _, p)| (*i, *p)).collect()
    }

    const NONCE: u64 = 42;
    const WAIT: u64 = 50;

    /// The previous master crashed: it is asked, never answers, and is not waited for.
    #[test]
    fn crash_previous_master_is_not_waited_for() {
        let mut g = Gathering::new(&peers(3), 1, Some(2), NONCE, 1000, WAIT);
        let asked: Vec<u32> = g.targets().iter().map(|t| t.id).collect();
        assert_eq!(asked, vec![2, 3], "the previous master is asked too");
        assert!(!g.done());
        assert!(g.on_answer(3, &answer(NONCE, 7)));
        assert!(g.done(), "done at once, long before the deadline");
        let got = g.finish();
        assert_eq!((got.asked, got.answered), (2, 1));
        assert_eq!(ports(&got), vec![(2, 7)]);
    }

    /// An alive member cut off: the gathering stops at the deadline with what it has.
    #[test]
    fn partition_stops_at_the_deadline_with_what_it_has() {
        let mut g = Gathering::new(&peers(3), 1, None, NONCE, 1000, WAIT);
        assert_eq!(g.deadline_ms(), 1050);
        assert!(g.on_answer(2, &answer(NONCE, 7)));
        assert!(!g.done(), "node 3 is still awaited");
        g.on_tick(1049);
        assert!(!g.done());
        g.on_tick(1050);
        assert!(g.done());
        let got = g.finish();
        assert_eq!((got.asked, got.answered), (2, 1));
        assert_eq!(ports(&got), vec![(1, 7)]);
    }

    /// A graceful hand-over: the previous master answers and its answer is used, and once
    /// everyone has answered the gathering is done before the deadline.
    #[test]
    fn graceful_previous_master_answer_is_used_and_all_answers_end_early() {
        let mut g = Gathering::new(&peers(3), 1, Some(2), NONCE, 0, WAIT);
        assert!(g.on_answer(2, &answer(NONCE, 7)));
        assert!(!g.done(), "node 3 is awaited");
        assert!(g.on_answer(3, &answer(NONCE, 8)));
        assert!(g.done());
        let got = g.finish();
        assert_eq!((got.asked, got.answered), (2, 2));
        assert_eq!(ports(&got), vec![(1, 7), (2, 8)]);

        // Its answer also counts when it comes after the others, before `finish`.
        let mut g = Gathering::new(&peers(3), 1, Some(2), NONCE, 0, WAIT);
        assert!(g.on_answer(3, &answer(NONCE, 8)));
        assert!(g.done());
        assert!(g.on_answer(2, &answer(NONCE, 7)));
        assert_eq!(ports(&g.finish()), vec![(2, 8), (1, 7)]);

        // With no previous master to spare, everyone is awaited.
        let mut g = Gathering::new(&peers(3), 1, None, NONCE, 0, WAIT);
        g.on_answer(3, &answer(NONCE, 8));
        assert!(!g.done());
    }

    #[test]
    fn duplicate_stale_and_unsolicited_answers_are_ignored() {
        let mut p = peers(4);
        p[3].alive = false;
        let mut g = Gathering::new(&p, 1, None, NONCE, 0, WAIT);
        assert!(!g.on_answer(2, &answer(NONCE - 1, 1)), "an earlier query's");
        assert!(!g.on_answer(9, &answer(NONCE, 2)), "an unknown node");
        assert!(!g.on_answer(1, &answer(NONCE, 3)), "this node");
        assert!(!g.on_answer(4, &answer(NONCE, 4)), "a member not asked");
        assert!(g.on_answer(2, &answer(NONCE, 5)));
        let mut twice = answer(NONCE, 6);
        twice.truncated = true;
        assert!(!g.on_answer(2, &twice), "a second answer");
        assert!(
            !g.done(),
            "node 2 answering twice does not stand in for node 3"
        );
        let got = g.finish();
        assert_eq!((got.asked, got.answered), (2, 1));
        assert_eq!(ports(&got), vec![(1, 5)]);
        assert!(!got.truncated);
    }

    #[test]
    fn absent_slots_dead_members_and_self_are_not_asked() {
        let v = ClusterView::new(&crate::config::test_nodes(4), 2);
        for s in v.slots() {
            s.alive.store(true, Relaxed);
        }
        v.nodes[3].alive.store(false, Relaxed);
        let m = |id: u32| crate::cluster::view::MemberSlot {
            id,
            address: v.nodes[usize::try_from(id - 1).unwrap()].address(),
            weight: 1,
            voter: true,
        };
        // Node 3 leaves: its slot stays, absent.
        v.set_members(&[m(1), m(2), m(4)]).unwrap();
        let snap = Peer::snapshot(&v);
        assert_eq!(snap.len(), 4);
        assert!(!snap[2].present);
        let g = Gathering::new(&snap, 2, Some(3), NONCE, 0, WAIT);
        assert_eq!(
            g.targets(),
            &[Target {
                index: 0,
                id: 1,
                address: v.nodes[0].address()
            }]
        );
        assert!(!g.done());
        // Nobody to ask: done at once.
        let alone = Gathering::new(&snap[1..2], 2, None, NONCE, 0, WAIT);
        assert!(alone.targets().is_empty());
        assert!(alone.done());
        assert_eq!(alone.finish(), Gathered::default());
    }

    /// The affinity replica is built from the same committed records, and outlives the
    /// record window: a new master adopts it with the stamps the replica gave.
    #[test]
    fn committed_records_renew_the_affinity_replica() {
        let v = view();
        let c: IpAddr = "192.0.2.101".parse().unwrap();
        let data = encode_batch(&[Dispatched {
            client: c,
            port: 40000,
            isn: 7,
            node_id: 3,
        }]);
        let settings = AffinitySettings {
            timeout: Duration::from_millis(60_000),
            prefix_v4: 24,
            prefix_v6: 64,
            capacity: 1024,
        };
        let mut r = Replica::new(1024, 1000, Some(&settings));
        assert_eq!(r.apply(&data, &v, 100), (1, 0));
        let a = r.affinity.as_ref().unwrap();
        assert_eq!(a.lookup(&"192.0.2.7".parse().unwrap(), 50_000), Some(2));
        let live = a.live_entries(50_000);
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].node, live[0].stamp_ms), (2, 100));
        assert_eq!(r.table.live_count(50_000), 0, "the record window is over");
        let mut off = Replica::new(1024, 1000, None);
        off.apply(&data, &v, 100);
        assert!(off.affinity.is_none());
    }

    #[test]
    fn batches_apply_with_ids_mapped_to_view_indices() {
        let v = view();
        let c: IpAddr = "192.0.2.101".parse().unwrap();
        let data = encode_batch(&[
            Dispatched {
                client: c,
                port: 40000,
                isn: 7,
                node_id: 3,
            },
            Dispatched {
                client: c,
                port: 40001,
                isn: 8,
                node_id: 9,
            },
        ]);
        let mut r = Replica::new(1024, 1000, None);
        assert_eq!(r.apply(&data, &v, 100), (1, 1));
        assert_eq!(
            r.table.lookup(&c, 40000, 7, 1099),
            Lookup::Retransmit { node: 2 }
        );
        assert_eq!(r.table.lookup(&c, 40000, 7, 1100), Lookup::Miss);
        assert_eq!(
            r.apply(b"\xff\xff", &v, 0),
            (0, 0),
            "garbage applies nothing"
        );
    }

    #[test]
    fn adoption_puts_syn_recv_after_the_replica() {
        let c: IpAddr = "192.0.2.101".parse().unwrap();
        let replica = vec![RecordEntry {
            client: c,
            port: 1,
            isn: Some(5),
            node: 0,
            stamp_ms: 3,
        }];
        let got = build_adoption(replica, &[(2, c, 1)], 50);
        let mut t = SynRecords::new(1024, 1000);
        for e in &got {
            t.adopt(e);
        }
        assert_eq!(
            t.lookup(&c, 1, 5, 60),
            Lookup::Retransmit { node: 2 },
            "the SYN-RECV holder wins"
        );
        assert_eq!(t.lookup(&c, 1, 6, 60), Lookup::Retransmit { node: 2 });
    }

    #[test]
    fn draining_takes_one_bounded_batch() {
        let (tx, rx) = mpsc::sync_channel(HANDOFF_CAPACITY);
        let d = Dispatched {
            client: "192.0.2.1".parse().unwrap(),
            port: 1,
            isn: 1,
            node_id: 1,
        };
        for _ in 0..MAX_RECORDS_PER_BATCH + 3 {
            tx.try_send(d).unwrap();
        }
        let mut v = Vec::new();
        drain_batch(&rx, &mut v);
        assert_eq!(v.len(), MAX_RECORDS_PER_BATCH);
        drain_batch(&rx, &mut v);
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn a_tick_drains_every_batch_waiting_up_to_its_bound() {
        let d = Dispatched {
            client: "192.0.2.1".parse().unwrap(),
            port: 1,
            isn: 1,
            node_id: 1,
        };
        // A full hand-off and some: more than a tick takes.
        let (tx, rx) = mpsc::sync_channel(HANDOFF_CAPACITY + 2 * MAX_RECORDS_PER_BATCH);
        for _ in 0..3 * MAX_RECORDS_PER_BATCH + 10 {
            tx.try_send(d).unwrap();
        }
        let (mut v, mut sizes) = (Vec::new(), Vec::new());
        let full = MAX_RECORDS_PER_BATCH;
        // A record arriving while the partial batch is proposed waits for the next tick.
        let late = tx.clone();
        let mut arrive = |b: &[Dispatched]| {
            sizes.push(b.len());
            if b.len() < full {
                late.try_send(d).unwrap();
            }
        };
        assert_eq!(drain_tick(&rx, &mut v, &mut arrive), 4);
        assert_eq!(sizes, [full, full, full, 10]);
        sizes.clear();
        assert_eq!(drain_tick(&rx, &mut v, |b| sizes.push(b.len())), 1);
        assert_eq!(sizes, [1]);
        assert_eq!(drain_tick(&rx, &mut v, |_| panic!("nothing is left")), 0);

        for _ in 0..(MAX_BATCHES_PER_TICK + 2) * MAX_RECORDS_PER_BATCH {
            tx.try_send(d).unwrap();
        }
        sizes.clear();
        assert_eq!(
            drain_tick(&rx, &mut v, |b| sizes.push(b.len())),
            MAX_BATCHES_PER_TICK
        );
        assert!(sizes.iter().all(|n| *n == full), "{sizes:?}");
        // The rest waits for the next tick.
        assert_eq!(drain_tick(&rx, &mut v, |_| {}), 2);
    }
}
