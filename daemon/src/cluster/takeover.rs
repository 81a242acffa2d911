//! Replicated SYN-forward records and what a new master adopts (paper §3.5).
//!
//! # The flow
//!
//! 1. The master thread records every *new* dispatch decision in its own table and hands a
//!    [`Dispatched`] value to the Raft task through a bounded `sync_channel` (see
//!    `crate::datapath::dispatch`): no lock, no allocation, never blocks; a full channel is counted
//!    (`records_handoff_overflow`).
//! 2. The Raft task, while leader, drains up to [`MAX_RECORDS_PER_BATCH`] of them each tick
//!    and proposes them as one entry ([`encode_batch`]); at most one entry per tick.
//! 3. Every node applies committed batches to its [`Replica`], a table of the same size and
//!    window as the master's, stamped with the local apply time; node ids become view indices.
//! 4. When leadership arrives, *before* the master ruleset goes in, [`Takeover::gather`]
//!    asks every alive member for the remote address and port of its SYN-RECV sockets on the
//!    VIP (a [`SynRecvQuery`] on the report socket, answered by [`answer_queries`]), waits
//!    for all answers or `scheduler.syn_recv_wait_ms`, adds its own SYN-RECV sockets, and
//!    returns the replica's live records plus one any-ISN record per SYN-RECV socket
//!    ([`build_adoption`]). The node hands them to the master thread as a command that is
//!    processed before the first queued SYN; only then does the master ruleset go in.
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
use tokio::net::UdpSocket;

use crate::cluster::role::RoleCell;
use crate::cluster::view::ClusterView;
use crate::datapath::queue::MasterCommand;
use crate::datapath::records::{Dispatched, RecordEntry, SynRecords};
use crate::host::sockdiag::SockDiag;
use crate::shutdown::Shutdown;

/// Records waiting between the master thread and the Raft task: many batches' worth, so a
/// burst rides out a slow tick. 28 bytes each, preallocated.
pub const HANDOFF_CAPACITY: usize = 8 * MAX_RECORDS_PER_BATCH;

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
}

/// What the last takeover adopted.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeoverReport {
    pub term: u64,
    pub records_adopted: u64,
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
}

impl Replica {
    pub fn new(capacity: usize, window_ms: u64) -> Self {
        Replica {
            table: SynRecords::new(capacity, window_ms),
        }
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

/// The pieces a new master needs to take over. Owned by the role loop.
#[derive(Debug)]
pub struct Takeover {
    pub node_id: u32,
    pub vip: IpAddr,
    pub port: u16,
    pub wait: Duration,
    pub sock: Arc<UdpSocket>,
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
    pub sock: Arc<UdpSocket>,
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
    /// `previous_master` (the last other node seen leading) is asked too, but not waited for:
    /// after a crash or a partition it cannot answer, and waiting for it would make every such
    /// takeover pay the whole `syn_recv_wait_ms`. Its answer counts if it arrives while the
    /// others are still answering. (After a graceful stop it answers at once, and it stopped
    /// dispatching before it handed leadership over, so its records had time to commit.)
    pub async fn adopt(&mut self, term: u64, previous_master: Option<u32>) {
        let started = std::time::Instant::now();
        let (syn_recv, asked, answered, truncated) = if self.reconcile {
            self.ask_members(term, previous_master).await
        } else {
            (Vec::new(), 0, 0, false)
        };
        let now = self.role.now_ms();
        let replica = match self.replica.lock() {
            Ok(r) => r.table.live_entries(now),
            Err(_) => Vec::new(),
        };
        let records_adopted = u64::try_from(replica.len()).unwrap_or(u64::MAX);
        let reconciled = u64::try_from(syn_recv.len()).unwrap_or(u64::MAX);
        let entries = build_adoption(replica, &syn_recv, now);
        if self.commands.send(MasterCommand::Adopt(entries)).is_err() {
            tracing::error!("the master thread has stopped; nothing adopted");
        }
        let report = TakeoverReport {
            term,
            records_adopted,
            syn_recv_reconciled: reconciled,
            members_asked: asked,
            members_answered: answered,
            truncated,
            wait_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        tracing::info!(?report, "takeover: records and SYN-RECV sockets adopted");
        if let Ok(mut last) = self.stats.last_takeover.lock() {
            *last = Some(report);
        }
    }

    /// Asks every alive member, waits for all answers (but `optional`'s) or `wait`, adds this
    /// node's own SYN-RECV sockets. Returns (entries, asked, answered, truncated).
    async fn ask_members(
        &mut self,
        term: u64,
        optional: Option<u32>,
    ) -> (Vec<(u16, IpAddr, u16)>, u32, u32, bool) {
        self.nonce = self.nonce.wrapping_add(1);
        let nonce = self.nonce;
        // Answers to an earlier query are stale.
        while self.answers.try_recv().is_ok() {}
        let query = Envelope {
            from: self.node_id,
            term,
            body: Some(Body::SynRecvQuery(SynRecvQuery { nonce })),
        }
        .to_bytes();
        let mut pending: Vec<usize> = Vec::new();
        for (i, n) in self.view.slots().iter().enumerate() {
            if i != self.view.self_index && n.is_present() && n.alive.load(Relaxed) {
                let _ = self
                    .sock
                    .send_to(&query, SocketAddr::new(n.address(), self.port))
                    .await;
                pending.push(i);
            }
        }
        let asked = u32::try_from(pending.len()).unwrap_or(u32::MAX);
        let optional = optional.and_then(|id| self.view.index_of_id(id));
        let mut entries = Vec::new();
        let mut truncated = false;
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut take = |from: u32, answer: SynRecvAnswer, pending: &mut Vec<usize>| {
            let Some(i) = self.view.index_of_id(from) else {
                return;
            };
            if answer.nonce != nonce || !pending.contains(&i) {
                return;
            }
            pending.retain(|p| *p != i);
            truncated |= answer.truncated;
            push_peers(&mut entries, i, &answer.sockets);
        };
        while pending.iter().any(|p| Some(*p) != optional) {
            let Ok(Some((from, answer))) =
                tokio::time::timeout_at(deadline, self.answers.recv()).await
            else {
                break;
            };
            take(from, answer, &mut pending);
        }
        // The optional member's answer, if it is here already.
        while let Ok((from, answer)) = self.answers.try_recv() {
            take(from, answer, &mut pending);
        }
        let answered = asked - u32::try_from(pending.len()).unwrap_or(0);
        match own_syn_recv(&self.vip) {
            Ok((own, t)) => {
                truncated |= t;
                push_peers(&mut entries, self.view.self_index, &own.sockets);
            }
            Err(e) => tracing::warn!(error = %e, "cannot list own SYN-RECV sockets"),
        }
        (entries, asked, answered, truncated)
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

/// Answers the SYN-RECV queries the bus accepted (from a member's address with that
/// member's id): (querier's address, nonce). Runs until `shutdown`.
pub async fn answer_queries(
    mut queries: tokio::sync::mpsc::Receiver<(SocketAddr, u64)>,
    sock: Arc<UdpSocket>,
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
        let mut r = Replica::new(1024, 1000);
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
}
