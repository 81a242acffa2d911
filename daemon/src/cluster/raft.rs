//! The Raft election's I/O shell: one tokio task owns the [`RaftCore`] (and so the `RawNode`),
//! feeds it ticks and the messages the cluster socket's receive loop (`crate::cluster::bus`)
//! hands over, and carries out each [`tdsc_election::Output`] in its documented order: lease,
//! leadership, persist, send. It is the only writer of the node's term and lease (it holds
//! the [`ElectionWriter`]).
//!
//! Raft messages travel as `Body::Raft` envelopes on the cluster socket (`control_port`), so
//! they share its checks: a message is stepped only if it was sealed with the cluster key by
//! a current member, from that member's address, and is not a replay (`crate::cluster::bus`).
//!
//! A graceful stop talks to the task through a [`RaftHandle`]: first [`RaftHandle::resign`]
//! (from then on the task stores a revoked lease and publishes this node as member, whatever
//! the core says), then, once the node's dispatcher and ruleset are member,
//! [`RaftHandle::transfer`]. The task keeps running as a follower (a voter) until the node's
//! teardown stops it (its [`Shutdown`]; it revokes the lease as it ends), and hands
//! leadership on again if it should win an election meanwhile.
//!
//! **Requests.** [`RaftRequest`]s keep membership and settings apart. The task owns the
//! cluster's membership ([`MembershipLink`]): it serves `tdscctl node add|remove` (only on
//! the leader, one change at a time, answered once the change has committed) and, whenever committed conf changes come out of the core, it
//! updates its peer table, the dispatch view and the membership watch that the role task
//! re-applies the ruleset from — after the new state is persisted and this round's messages
//! are sent.
//!
//! The task also replicates the SYN-forward records (see `crate::cluster::takeover`): while leader it
//! proposes what the master thread's hand-off holds each tick (a batch per entry), and it applies
//! committed batches to this node's replica *before* it publishes a new leadership, so a node
//! that becomes master has applied every committed record.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tdsc_election::{
    Leadership, MemberChange, Membership, Persisted, ProposeError, RaftCore, RaftError,
    RaftSettings, Role, RoleSignal,
};
use tdsc_proto::control::{Body, Envelope};
use tokio::sync::{mpsc, oneshot, watch};

use crate::cluster::bus::ClusterSocket;
use crate::cluster::membership::{check_add, check_remove, Members};
use crate::cluster::raft_disk::{DiskDone, DiskJob, RaftDisk};
use crate::cluster::role::{ElectionWriter, RoleCell};
use crate::config::{Config, PolicyName};
use crate::shutdown::Shutdown;

/// What the rest of the daemon asks of the Raft task through its request channel.
#[derive(Debug)]
pub enum RaftRequest {
    /// A membership change, or a member's word about this node's membership.
    Member(MemberRequest),
    /// A cluster-wide setting.
    Setting(SettingRequest),
}

/// A `tdscctl node add|remove`, answered (text or error) once it has committed or failed; or
/// a `Body::Removed` notice.
#[derive(Debug)]
pub enum MemberRequest {
    Add {
        id: u32,
        address: IpAddr,
        weight: u32,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Remove {
        id: u32,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// A member (`from`) says this node is not among the voters of its membership at Raft
    /// log index `index` (a `Body::Removed` notice; see `crate::cluster::bus`).
    Removed {
        from: u32,
        index: u64,
        voters: Vec<u32>,
    },
}

/// A cluster-wide setting, answered once it has committed here or failed.
#[derive(Debug)]
pub enum SettingRequest {
    /// `tdscctl policy set` under Raft (see [`POLICY_SETTING`]).
    Policy {
        policy: PolicyName,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// `tdscctl affinity set` under Raft: the settings in their committed text form
    /// (`crate::datapath::sticky::AFFINITY_SETTING`), resolved by the node asked.
    Affinity {
        text: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Requests waiting for the Raft task; one change runs at a time, so a few are plenty.
pub const REQUEST_CAPACITY: usize = 16;

/// Ticks a proposed change may take to commit before the request is answered with an error
/// (the change itself may still commit later; `status` shows it).
const COMMIT_PATIENCE_TICKS: u64 = 500;

/// The Raft setting that holds the scheduling policy's name: `tdscctl policy set` under Raft
/// changes it for the whole cluster, a restarted node and a new master included.
pub const POLICY_SETTING: &str = "policy";

/// The cluster-wide settings as committed (see `RaftCore::propose_setting`).
pub type Settings = std::collections::BTreeMap<String, Vec<u8>>;

/// What the Raft task updates when membership changes.
#[derive(Debug)]
pub struct MembershipLink {
    /// The configuration: the bootstrap set's details, the VIP and this node's address.
    pub config: Config,
    pub view: Arc<ClusterView>,
    /// The role task re-applies the ruleset from it; status reads it.
    pub members: watch::Sender<Members>,
    /// Membership changes and settings from the control socket, notices from the bus.
    pub requests: mpsc::Receiver<RaftRequest>,
    /// The committed settings; the node applies the policy from it.
    pub settings: watch::Sender<Settings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingKind {
    /// Done once the membership has reached the proposal's index.
    Membership,
    /// Done once this node has applied the proposal's index.
    Setting,
}

#[derive(Debug)]
struct Pending {
    index: u64,
    what: String,
    since_tick: u64,
    reply: oneshot::Sender<Result<String, String>>,
    kind: PendingKind,
}
use crate::cluster::takeover::{drain_tick, encode_batch, RecordStats, Replica};
use crate::cluster::view::ClusterView;
use crate::datapath::records::Dispatched;

/// Messages waiting for the Raft task; beyond this the receive loop drops them.
pub const INBOX_CAPACITY: usize = 1024;
/// The file in `data_dir` that holds the hard state, voters, snapshot position, member
/// contexts and settings (rewritten atomically on every change; small).
pub const STATE_FILE: &str = "raft.state";
/// The file in `data_dir` that holds the log's entries, mostly appended to (see
/// `tdsc_election::log_file`).
pub const LOG_FILE: &str = "raft.log";

/// A state write slower than this is logged: on a healthy disk one takes about a millisecond.
const SLOW_WRITE: Duration = Duration::from_millis(100);

/// Requests from the rest of the daemon to the Raft task.
#[derive(Debug)]
pub enum RaftCommand {
    /// Never dispatch again: the lease is revoked now and stays revoked, and this node is
    /// published as member. Replies whether it was the leader.
    Resign { was_leader: oneshot::Sender<bool> },
    /// Hand leadership to one of these nodes, now and whenever this node leads again. Only
    /// after `Resign` and after the dispatcher has stopped (see `tdsc_election`, *Leadership
    /// transfer*); ignored before `Resign`. Replies with the transferee picked, if any.
    Transfer {
        candidates: Vec<u64>,
        picked: oneshot::Sender<Option<u64>>,
    },
}

/// A cloneable way to send [`RaftCommand`]s; `None` replies mean the task has ended.
#[derive(Debug, Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<RaftCommand>,
}

impl RaftHandle {
    /// See [`RaftCommand::Resign`]. `None` if the task has ended.
    pub async fn resign(&self) -> Option<bool> {
        let (was_leader, rx) = oneshot::channel();
        self.tx
            .send(RaftCommand::Resign { was_leader })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// See [`RaftCommand::Transfer`].
    pub async fn transfer(&self, candidates: Vec<u64>) -> Option<u64> {
        let (picked, rx) = oneshot::channel();
        self.tx
            .send(RaftCommand::Transfer { candidates, picked })
            .await
            .ok()?;
        rx.await.ok().flatten()
    }
}

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
    sock: Arc<ClusterSocket>,
    peers: HashMap<u64, SocketAddr>,
    inbox: mpsc::Receiver<(u32, Vec<u8>)>,
    signal: Arc<RoleSignal>,
    /// The only writer of the term and the lease (see `crate::cluster::role`).
    election: ElectionWriter,
    state_path: PathBuf,
    /// The thread that writes the state files (`crate::cluster::raft_disk`).
    disk: RaftDisk,
    /// The number of the last job whose write failed, until a write succeeds: the task
    /// retries every tick and sends nothing meanwhile.
    disk_failed: Option<u64>,
    commands: mpsc::Receiver<RaftCommand>,
    command_tx: mpsc::Sender<RaftCommand>,
    /// Set by `Resign`: the lease stays revoked and the role member until the process exits.
    resigned: bool,
    /// Set by `Transfer` (after `Resign`): hand leadership to one of these whenever leader.
    transfer_to: Option<Vec<u64>>,
    membership: Option<MembershipLink>,
    pending: Option<Pending>,
    ticks: u64,
    records: Option<RecordsLink>,
    /// See [`RaftLinks::heartbeat`].
    heartbeat: Arc<crate::watchdog::Heartbeat>,
}

/// What the Raft task talks through and writes to.
#[derive(Debug)]
pub struct RaftLinks {
    /// The cluster socket, to send (the bus receives for this task).
    pub sock: Arc<ClusterSocket>,
    /// `Body::Raft` messages the bus accepted: (sender id, raft bytes). The bus holds the
    /// sender; when it is gone the task ends.
    pub inbox: mpsc::Receiver<(u32, Vec<u8>)>,
    /// Where the task publishes leadership; the role shell follows it.
    pub signal: Arc<RoleSignal>,
    /// The term and the lease: this task is their only writer.
    pub election: ElectionWriter,
    /// Beaten on every tick, for the watchdog (`crate::watchdog`).
    pub heartbeat: Arc<crate::watchdog::Heartbeat>,
    /// Beaten by the disk thread around each write, for the watchdog.
    pub disk_heartbeat: Arc<crate::watchdog::Heartbeat>,
    /// The clock the heartbeats are written on.
    pub clock: Arc<RoleCell>,
}

/// What the Raft task needs to replicate SYN-forward records.
#[derive(Debug)]
pub struct RecordsLink {
    /// New records from the master thread (bounded; see `crate::datapath::dispatch`).
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
    pub fn open(
        cfg: &Config,
        settings: RaftSettings,
        data_dir: &Path,
        links: RaftLinks,
    ) -> Result<Self, RaftTaskError> {
        let RaftLinks {
            sock,
            inbox,
            signal,
            election,
            heartbeat,
            disk_heartbeat,
            clock,
        } = links;
        let (node_id, nodes, port) = (cfg.node_id, &cfg.nodes[..], cfg.control_port);
        std::fs::create_dir_all(data_dir).map_err(|source| RaftTaskError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let state_path = data_dir.join(STATE_FILE);
        let log_path = data_dir.join(LOG_FILE);
        let log = match std::fs::read(&log_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(RaftTaskError::DataDir {
                    path: log_path,
                    source,
                })
            }
        };
        let persisted = match std::fs::read(&state_path) {
            Ok(bytes) => Some(Persisted::decode_with_log(&bytes, log.as_deref()).map_err(
                |source| RaftTaskError::Load {
                    path: state_path.clone(),
                    source,
                },
            )?),
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
            election.cell().now_ms(),
            &tdsc_election::raft_core::logger(),
        )
        .map_err(RaftTaskError::Start)?;
        let peers = nodes
            .iter()
            .filter(|n| n.id != node_id)
            .map(|n| (u64::from(n.id), SocketAddr::new(n.address, port)))
            .collect();
        let (command_tx, commands) = mpsc::channel(4);
        let disk = RaftDisk::start(state_path.clone(), log_path, disk_heartbeat, clock).map_err(
            |source| RaftTaskError::DataDir {
                path: data_dir.to_owned(),
                source,
            },
        )?;
        Ok(RaftTask {
            core,
            node_id,
            settings,
            sock,
            peers,
            inbox,
            signal,
            election,
            state_path,
            disk,
            disk_failed: None,
            commands,
            command_tx,
            resigned: false,
            transfer_to: None,
            membership: None,
            pending: None,
            ticks: 0,
            heartbeat,
            records: None,
        })
    }

    /// A handle for [`RaftCommand`]s to this task.
    pub fn handle(&self) -> RaftHandle {
        RaftHandle {
            tx: self.command_tx.clone(),
        }
    }

    fn command(&mut self, cmd: RaftCommand) {
        match cmd {
            RaftCommand::Resign { was_leader } => {
                self.resigned = true;
                // Revoked before anything else this task does; flush keeps it revoked.
                self.election.revoke_lease();
                self.signal.publish(Leadership {
                    role: Role::Member,
                    ..self.core.leadership()
                });
                tracing::info!(
                    leader = self.core.is_leader(),
                    "raft: resigned; this node will not dispatch again"
                );
                let _ = was_leader.send(self.core.is_leader());
            }
            RaftCommand::Transfer { candidates, picked } => {
                if !self.resigned {
                    let _ = picked.send(None);
                    return;
                }
                let to = self.core.transfer_leadership(&candidates);
                tracing::info!(?to, ?candidates, "raft: leadership transfer requested");
                self.transfer_to = Some(candidates);
                let _ = picked.send(to);
            }
        }
    }

    /// Gives the task the membership to own, and applies the persisted one at once (the
    /// configured `[[nodes]]` are only the bootstrap set).
    pub fn with_membership(mut self, link: MembershipLink) -> Self {
        link.settings.send_replace(self.core.settings().clone());
        self.membership = Some(link);
        let m = self.core.membership();
        self.apply_membership(&m);
        self
    }

    /// Replicates SYN-forward records through this task (see the module docs).
    pub fn with_records(mut self, link: RecordsLink) -> Self {
        self.records = Some(link);
        self
    }

    /// While leader, proposes the new records waiting in the hand-off, a batch per entry
    /// ([`drain_tick`]); otherwise discards them (made just before this node stepped down; the
    /// next master learns of them by reconciliation).
    fn propose_records(&mut self) {
        let Some(link) = self.records.as_mut() else {
            return;
        };
        let propose = self.core.is_leader() && link.replicate;
        let (stats, core) = (&link.stats, &mut self.core);
        drain_tick(&link.handoff, &mut link.batch, |batch| {
            let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
            if !propose {
                stats.discarded_not_leader.fetch_add(n, Relaxed);
                return;
            }
            match core.propose(encode_batch(batch)) {
                Ok(()) => {
                    stats.proposed_batches.fetch_add(1, Relaxed);
                    stats.proposed_records.fetch_add(n, Relaxed);
                }
                Err(e) => {
                    stats.proposals_refused.fetch_add(1, Relaxed);
                    tracing::debug!(error = %e, "record batch not proposed");
                }
            }
        });
    }

    /// Applies committed record batches to the replica.
    fn apply_committed(&self, committed: &[Vec<u8>]) {
        let Some(link) = self.records.as_ref() else {
            return;
        };
        if committed.is_empty() {
            return;
        }
        let now = self.election.cell().now_ms();
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

    /// Runs until `shutdown`; as it ends it revokes the lease, so nothing this node says
    /// after that (it says nothing more) can find it dispatching.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.settings.tick_ms));
        // Never catch up in a burst: see RaftCore::tick and the lease argument.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.heartbeat.beat(self.election.cell().now_ms());
                    self.ticks += 1;
                    self.core.tick(self.election.cell().now_ms());
                    self.propose_records();
                    // A resigned node that leads (again) hands over again; a transfer that
                    // raft-rs aborted after an election timeout is retried here too.
                    if let Some(c) = &self.transfer_to {
                        self.core.transfer_leadership(c);
                    }
                    // A failed write is retried (the disk thread rewrites the newest state).
                    if let Some(number) = self.disk_failed {
                        self.disk.submit(DiskJob {
                            number,
                            ..DiskJob::default()
                        });
                    }
                }
                Some(cmd) = self.commands.recv() => self.command(cmd),
                Some(req) = next_request(&mut self.membership) => self.handle_request(req),
                () = shutdown.requested() => {
                    self.election.revoke_lease();
                    tracing::info!("raft: stopped");
                    return;
                }
                msg = self.inbox.recv() => {
                    let Some((from, bytes)) = msg else {
                        self.election.revoke_lease();
                        return;
                    };
                    let now = self.election.cell().now_ms();
                    if let Err(e) = self.core.step(u64::from(from), &bytes, now) {
                        tracing::debug!(from, error = %e, "raft message not stepped");
                    }
                }
                done = self.disk.next() => {
                    let Some(done) = done else {
                        // The disk thread is gone: this node can no longer keep Raft's
                        // promises. Ending the task ends the daemon (it is supervised).
                        tracing::error!("raft: the disk thread ended; stopping");
                        self.election.revoke_lease();
                        return;
                    };
                    self.written(done).await;
                }
            }
            self.flush().await;
        }
    }

    /// A disk job is done: its messages go out and the core learns what is written.
    async fn written(&mut self, done: DiskDone) {
        if done.took > SLOW_WRITE {
            tracing::warn!(
                took_ms = done.took.as_millis(),
                "raft state write was slow (heartbeats were not held back)"
            );
        }
        match done.result {
            Ok(()) => {
                if self.disk_failed.take().is_some() {
                    tracing::info!(path = %self.state_path.display(), "raft state written again; messages resume");
                }
                for (addr, env) in done.messages {
                    // Losses are Raft's business: it retransmits on the next heartbeat.
                    let _ = self.sock.send_to(&env, addr).await;
                }
                self.core.persisted(done.number);
            }
            Err(e) => {
                // Sending now could break Raft's promises after a crash; stay silent (a
                // leader's heartbeats too, so that the others elect a leader that can write)
                // and let the cluster carry on without this node until the disk works again.
                if self.disk_failed.replace(done.number).is_none() {
                    tracing::error!(path = %self.state_path.display(), error = %e, "cannot persist raft state; messages withheld, retrying every tick");
                }
            }
        }
    }

    /// Seals raft messages for their peers (a peer this node does not know is skipped).
    fn envelopes(&self, messages: Vec<(u64, Vec<u8>)>) -> Vec<(SocketAddr, Vec<u8>)> {
        let term = self.core.term();
        messages
            .into_iter()
            .filter_map(|(to, bytes)| {
                let addr = self.peers.get(&to)?;
                let env = Envelope {
                    from: self.node_id,
                    term,
                    body: Some(Body::Raft(bytes)),
                };
                Some((*addr, env.to_bytes()))
            })
            .collect()
    }

    async fn flush(&mut self) {
        let out = self.core.ready();
        // 1. Lease first: a revoked lease must bind the dispatcher before a vote goes out (or,
        //    after `Resign`, before a MsgTimeoutNow does: it stays revoked).
        let lease = if self.resigned { 0 } else { out.lease_until_ms };
        self.election.set_lease_until_ms(lease);
        // Committed records before leadership: a new master must have applied them all.
        self.apply_committed(&out.committed);
        // 2. Leadership. The term also fences stale forwards at the member path at once.
        if let Some(mut l) = out.leadership {
            if self.resigned {
                l.role = Role::Member;
            }
            tracing::info!(role = l.role.as_str(), master = ?l.master_id, term = l.term, "raft leadership");
            self.election.raise_term(l.term);
            self.signal.publish(l);
        }
        // 3. Send what does not wait for the disk (a leader's appends and heartbeats): a slow
        //    disk must not silence the leader for an election timeout.
        if self.disk_failed.is_none() {
            for (addr, env) in self.envelopes(out.messages) {
                // Losses are Raft's business: it retransmits on the next heartbeat.
                let _ = self.sock.send_to(&env, addr).await;
            }
        }
        // 4. The rest waits for the disk: a vote or an acknowledged entry must survive a
        //    crash. The disk thread writes; `written` sends and tells the core.
        if let Some(job) = out.persist {
            let messages = self.envelopes(job.messages);
            self.disk.submit(DiskJob {
                number: job.number,
                state: job.state,
                messages,
            });
        }
        // 5. Membership, after sending: these messages were made before the change applied,
        // and among them is the commit that tells a removed node it was removed. (Messages for
        // an added node only come out of the next `ready`.)
        if let Some(m) = &out.membership {
            self.apply_membership(m);
        }
        if let (Some(st), Some(link)) = (&out.settings, &self.membership) {
            link.settings.send_replace(st.clone());
        }
        self.answer_pending();
    }

    /// Peer table, dispatch view and membership watch from a committed membership.
    fn apply_membership(&mut self, m: &Membership) {
        let Some(link) = &self.membership else { return };
        let members = Members::resolve(m, &link.config);
        self.publish_members(members);
    }

    fn publish_members(&mut self, members: Members) {
        let Some(link) = &self.membership else { return };
        if let Err(e) = link.view.set_members(&members.view_slots()) {
            tracing::error!(error = %e, "dispatch view not fully updated");
        }
        let port = link.config.control_port;
        self.peers = members
            .list
            .iter()
            .filter(|n| n.id != self.node_id)
            .map(|n| (u64::from(n.id), SocketAddr::new(n.address, port)))
            .collect();
        let was_member = link.members.borrow().contains(self.node_id);
        let is_member = members.contains(self.node_id);
        tracing::info!(index = members.index, voters = ?members.ids(), "membership");
        if was_member && !is_member {
            tracing::warn!(
                "this node was removed from the cluster: it takes no new connections and keeps the member ruleset (its own connections finish) until it is added again"
            );
        } else if !was_member && is_member {
            tracing::info!("this node is a member of the cluster again");
        }
        link.members.send_replace(members);
    }

    /// Leaves the group on a member's word, if that word is newer than what this node has
    /// applied: the commit of this node's removal never reached it. The Raft core is not
    /// told (it cannot be, short of the log entry); if the node is added again, the leader
    /// sends it the log and the core's membership takes over from this.
    fn removed_notice(&mut self, from: u32, index: u64, voters: &[u32]) {
        let Some(link) = &self.membership else { return };
        let current = link.members.borrow().clone();
        // An empty list is no membership (the bus refuses it too): it would isolate this node.
        if voters.is_empty()
            || index <= current.index
            || voters.contains(&self.node_id)
            || !current.contains(self.node_id)
        {
            return;
        }
        tracing::warn!(
            from,
            index,
            ?voters,
            "a member says this node was removed at a later membership change than it has applied"
        );
        let members = Members {
            index,
            list: current
                .list
                .into_iter()
                .filter(|m| voters.contains(&m.id))
                .collect(),
        };
        self.publish_members(members);
    }

    fn handle_request(&mut self, req: RaftRequest) {
        let (reply, result, kind) = match req {
            RaftRequest::Member(MemberRequest::Add {
                id,
                address,
                weight,
                reply,
            }) => (
                reply,
                self.propose_add(id, address, weight),
                PendingKind::Membership,
            ),
            RaftRequest::Member(MemberRequest::Remove { id, reply }) => {
                (reply, self.propose_remove(id), PendingKind::Membership)
            }
            RaftRequest::Member(MemberRequest::Removed {
                from,
                index,
                voters,
            }) => {
                self.removed_notice(from, index, &voters);
                return;
            }
            RaftRequest::Setting(SettingRequest::Policy { policy, reply }) => {
                (reply, self.propose_policy(policy), PendingKind::Setting)
            }
            RaftRequest::Setting(SettingRequest::Affinity { text, reply }) => {
                (reply, self.propose_affinity(text), PendingKind::Setting)
            }
        };
        match result {
            Ok((index, what)) => {
                self.pending = Some(Pending {
                    index,
                    what,
                    since_tick: self.ticks,
                    reply,
                    kind,
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Checks shared by add and remove: this node leads and nothing else is in flight.
    fn check_can_propose(&self) -> Result<&MembershipLink, String> {
        let link = self
            .membership
            .as_ref()
            .ok_or("membership is not managed by this node")?;
        if !self.core.is_leader() {
            return Err(self.describe(ProposeError::NotLeader {
                leader: self.core.leader_id(),
            }));
        }
        if self.pending.is_some() {
            return Err(self.describe(ProposeError::Pending));
        }
        Ok(link)
    }

    fn propose_policy(&mut self, policy: PolicyName) -> Result<(u64, String), String> {
        self.check_can_propose()?;
        let index = self
            .core
            .propose_setting(POLICY_SETTING, policy.as_str().as_bytes())
            .map_err(|e| self.describe(e))?;
        Ok((index, format!("policy {} for the cluster", policy.as_str())))
    }

    fn propose_affinity(&mut self, text: String) -> Result<(u64, String), String> {
        self.check_can_propose()?;
        let index = self
            .core
            .propose_setting(crate::datapath::sticky::AFFINITY_SETTING, text.as_bytes())
            .map_err(|e| self.describe(e))?;
        Ok((index, format!("affinity {text} for the cluster")))
    }

    fn propose_add(
        &mut self,
        id: u32,
        address: IpAddr,
        weight: u32,
    ) -> Result<(u64, String), String> {
        let link = self.check_can_propose()?;
        let info = check_add(&link.members.borrow(), &link.config, id, address, weight)
            .map_err(|e| e.to_string())?;
        let change = MemberChange::Add {
            id: u64::from(id),
            context: info.to_bytes(),
        };
        let index = self
            .core
            .propose_membership(change)
            .map_err(|e| self.describe(e))?;
        tracing::info!(node = id, %address, weight, index, "proposed: add node");
        Ok((
            index,
            format!("node {id} ({address}, weight {weight}) added"),
        ))
    }

    fn propose_remove(&mut self, id: u32) -> Result<(u64, String), String> {
        let link = self.check_can_propose()?;
        check_remove(&link.members.borrow(), id).map_err(|e| e.to_string())?;
        let index = self
            .core
            .propose_membership(MemberChange::Remove { id: u64::from(id) })
            .map_err(|e| self.describe(e))?;
        tracing::info!(node = id, index, "proposed: remove node");
        Ok((index, format!("node {id} removed")))
    }

    /// An error text that names, where it helps, a node's control address to retry at.
    fn describe(&self, e: ProposeError) -> String {
        let named = |id: u64| match self.peers.get(&id) {
            Some(a) => format!("node {id} ({})", a.ip()),
            None => format!("node {id}"),
        };
        match e {
            ProposeError::NotLeader { leader: Some(l) } => format!(
                "node {} is not the Raft leader; the leader is {}: send the request to its control socket",
                self.node_id,
                named(l)
            ),
            ProposeError::NotLeader { leader: None } => format!(
                "node {} is not the Raft leader and no leader is known (election in progress); retry shortly",
                self.node_id
            ),
            ProposeError::RemovingLeader { id, to } => format!(
                "node {id} is the Raft leader and cannot remove itself; leadership is being transferred to {}: send the request there",
                named(to)
            ),
            other => other.to_string(),
        }
    }

    /// Answers the request in flight once its change has committed here, or has failed.
    fn answer_pending(&mut self) {
        let Some(p) = &self.pending else { return };
        let result = if p.kind == PendingKind::Setting && self.core.applied_index() >= p.index {
            Ok(format!("{} (committed at index {})", p.what, p.index))
        } else if p.kind == PendingKind::Membership && self.core.membership().index >= p.index {
            let voters = self.core.membership().voters;
            Ok(format!("{} (voters now {voters:?})", p.what))
        } else if !self.core.is_leader() {
            Err(format!(
                "leadership was lost before the change ({}) committed; it may still commit: check `tdscctl status`",
                p.what
            ))
        } else if self.ticks.saturating_sub(p.since_tick) > COMMIT_PATIENCE_TICKS {
            Err(format!(
                "the change ({}) has not committed after {COMMIT_PATIENCE_TICKS} ticks; is a quorum reachable? It may still commit: check `tdscctl status`",
                p.what
            ))
        } else {
            return;
        };
        if let Some(p) = self.pending.take() {
            let _ = p.reply.send(result);
        }
    }
}

/// The next membership request, or never when membership is not managed here.
async fn next_request(link: &mut Option<MembershipLink>) -> Option<RaftRequest> {
    match link {
        Some(l) => l.requests.recv().await,
        None => std::future::pending().await,
    }
}
