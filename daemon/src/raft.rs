//! The Raft election's I/O shell: one tokio task owns the [`RaftCore`] (and so the `RawNode`),
//! feeds it ticks and the messages the report socket's receive loop hands over, and carries
//! out each [`tdsc_election::Output`] in its documented order: lease, leadership, persist,
//! send.
//!
//! Raft messages travel as `Body::Raft` envelopes on the report socket (`control_port`), so
//! they share its address check: a message is stepped only if it came from a configured
//! member's address with that member's id.
//!
//! The task also replicates the SYN-forward records (see `crate::takeover`): while leader it
//! proposes at most one batch per tick from the master thread's hand-off, and it applies
//! committed batches to this node's replica *before* it publishes a new leadership, so a node
//! that becomes master has applied every committed record.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tdsc_election::{Persisted, RaftCore, RaftError, RaftSettings, RoleSignal};
use tdsc_proto::control::{Body, Envelope};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::config::Node;
use crate::master::RoleCell;
use crate::records::Dispatched;
use crate::takeover::{drain_batch, encode_batch, RecordStats, Replica};
use crate::view::ClusterView;

/// Messages waiting for the Raft task; beyond this the receive loop drops them.
pub const INBOX_CAPACITY: usize = 1024;
/// The file in `data_dir` that holds the hard state and log.
pub const STATE_FILE: &str = "raft.state";

#[derive(Debug, thiserror::Error)]
pub enum RaftTaskError {
    #[error("cannot use data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: RaftError,
    },
    #[error("cannot start the raft node")]
    Start(#[source] RaftError),
}

#[derive(Debug)]
pub struct RaftTask {
    core: RaftCore,
    node_id: u32,
    settings: RaftSettings,
    sock: Arc<UdpSocket>,
    peers: HashMap<u64, SocketAddr>,
    inbox: mpsc::Receiver<(u32, Vec<u8>)>,
    signal: Arc<RoleSignal>,
    role: Arc<RoleCell>,
    state_path: PathBuf,
    records: Option<RecordsLink>,
}

/// What the Raft task needs to replicate SYN-forward records.
#[derive(Debug)]
pub struct RecordsLink {
    /// New records from the master thread (bounded; see `crate::dispatch`).
    pub handoff: std::sync::mpsc::Receiver<Dispatched>,
    pub replica: Arc<std::sync::Mutex<Replica>>,
    pub stats: Arc<RecordStats>,
    pub view: Arc<ClusterView>,
    /// `scheduler.replicate_records`: off (tests only) drains the hand-off and proposes
    /// nothing, leaving the SYN-RECV reconciliation alone at takeover.
    pub replicate: bool,
    /// Reused for every batch.
    pub batch: Vec<Dispatched>,
}

impl RaftTask {
    /// Loads `data_dir/raft.state` if present (a restarted node resumes its term, vote and
    /// log) and builds the core. Nothing is sent yet.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        node_id: u32,
        nodes: &[Node],
        port: u16,
        settings: RaftSettings,
        data_dir: &Path,
        sock: Arc<UdpSocket>,
        inbox: mpsc::Receiver<(u32, Vec<u8>)>,
        signal: Arc<RoleSignal>,
        role: Arc<RoleCell>,
    ) -> Result<Self, RaftTaskError> {
        std::fs::create_dir_all(data_dir).map_err(|source| RaftTaskError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let state_path = data_dir.join(STATE_FILE);
        let persisted = match std::fs::read(&state_path) {
            Ok(bytes) => Some(
                Persisted::decode(&bytes).map_err(|source| RaftTaskError::Load {
                    path: state_path.clone(),
                    source,
                })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(RaftTaskError::DataDir {
                    path: state_path,
                    source,
                })
            }
        };
        if let Some(p) = &persisted {
            tracing::info!(
                term = p.hard_state.term,
                vote = p.hard_state.vote,
                entries = p.entries.len(),
                "raft state loaded"
            );
        }
        let voters: Vec<u64> = nodes.iter().map(|n| u64::from(n.id)).collect();
        let core = RaftCore::new(
            u64::from(node_id),
            &voters,
            settings,
            persisted,
            role.now_ms(),
            &tdsc_election::raft_core::logger(),
        )
        .map_err(RaftTaskError::Start)?;
        let peers = nodes
            .iter()
            .filter(|n| n.id != node_id)
            .map(|n| (u64::from(n.id), SocketAddr::new(n.address, port)))
            .collect();
        Ok(RaftTask {
            core,
            node_id,
            settings,
            sock,
            peers,
            inbox,
            signal,
            role,
            state_path,
            records: None,
        })
    }

    /// Replicates SYN-forward records through this task (see the module docs).
    pub fn with_records(mut self, link: RecordsLink) -> Self {
        self.records = Some(link);
        self
    }

    /// While leader, proposes one batch of new records; otherwise discards them (made just
    /// before this node stepped down; the next master learns of them by reconciliation).
    fn propose_records(&mut self) {
        let Some(link) = self.records.as_mut() else {
            return;
        };
        drain_batch(&link.handoff, &mut link.batch);
        if link.batch.is_empty() {
            return;
        }
        let n = u64::try_from(link.batch.len()).unwrap_or(u64::MAX);
        if !self.core.is_leader() || !link.replicate {
            link.stats.discarded_not_leader.fetch_add(n, Relaxed);
            return;
        }
        match self.core.propose(encode_batch(&link.batch)) {
            Ok(()) => {
                link.stats.proposed_batches.fetch_add(1, Relaxed);
                link.stats.proposed_records.fetch_add(n, Relaxed);
            }
            Err(e) => {
                link.stats.proposals_refused.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "record batch not proposed");
            }
        }
    }

    /// Applies committed record batches to the replica.
    fn apply_committed(&self, committed: &[Vec<u8>]) {
        let Some(link) = self.records.as_ref() else {
            return;
        };
        if committed.is_empty() {
            return;
        }
        let now = self.role.now_ms();
        let Ok(mut replica) = link.replica.lock() else {
            return;
        };
        for data in committed {
            let (ok, unknown) = replica.apply(data, &link.view, now);
            link.stats.applied_batches.fetch_add(1, Relaxed);
            link.stats.applied_records.fetch_add(ok, Relaxed);
            link.stats.applied_unknown_node.fetch_add(unknown, Relaxed);
        }
    }

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.settings.tick_ms));
        // Never catch up in a burst: see RaftCore::tick and the lease argument.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.core.tick(self.role.now_ms());
                    self.propose_records();
                }
                msg = self.inbox.recv() => {
                    let Some((from, bytes)) = msg else { return };
                    if let Err(e) = self.core.step(u64::from(from), &bytes, self.role.now_ms()) {
                        tracing::debug!(from, error = %e, "raft message not stepped");
                    }
                }
            }
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        let out = self.core.ready();
        // 1. Lease first: a revoked lease must bind the dispatcher before a vote goes out.
        self.role.lease_until_ms.store(out.lease_until_ms, Relaxed);
        // Committed records before leadership: a new master must have applied them all.
        self.apply_committed(&out.committed);
        // 2. Leadership.
        if let Some(l) = out.leadership {
            tracing::info!(role = l.role.as_str(), master = ?l.master_id, term = l.term, "raft leadership");
            self.signal.publish(l);
        }
        // 3. Persist before sending: a vote or an acknowledged entry must survive a crash.
        if let Some(p) = out.persist {
            if let Err(e) = write_state(&self.state_path, &p) {
                // Sending now could break Raft's promises after a crash; stay silent and let
                // the cluster carry on without this node until the disk works again.
                tracing::error!(path = %self.state_path.display(), error = %e, "cannot persist raft state; messages withheld");
                return;
            }
        }
        // 4. Send.
        let term = self.core.term();
        for (to, bytes) in out.messages {
            let Some(addr) = self.peers.get(&to) else {
                continue;
            };
            let env = Envelope {
                from: self.node_id,
                term,
                body: Some(Body::Raft(bytes)),
            };
            // Losses are Raft's business: it retransmits on the next heartbeat.
            let _ = self.sock.send_to(&env.to_bytes(), addr).await;
        }
    }
}

/// Writes the state with an atomic rename, fsyncing the file and then the directory.
fn write_state(path: &Path, p: &Persisted) -> std::io::Result<()> {
    let bytes = p
        .encode()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
