//! The Raft election's I/O shell: one tokio task owns the [`RaftCore`] (and so the `RawNode`),
//! feeds it ticks and the messages the report socket's receive loop hands over, and carries
//! out each [`tdsc_election::Output`] in its documented order: lease, leadership, persist,
//! send.
//!
//! Raft messages travel as `Body::Raft` envelopes on the report socket (`control_port`), so
//! they share its address check: a message is stepped only if it came from a configured
//! member's address with that member's id.
//!
//! A graceful stop talks to the task through a [`RaftHandle`]: first [`RaftHandle::resign`]
//! (from then on the task stores a revoked lease and publishes this node as member, whatever
//! the core says), then, once the node's dispatcher and ruleset are member,
//! [`RaftHandle::transfer`]. The task keeps running as a follower (a voter) until the node
//! exits, and hands leadership on again if it should win an election meanwhile.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tdsc_election::{Leadership, Persisted, RaftCore, RaftError, RaftSettings, Role, RoleSignal};
use tdsc_proto::control::{Body, Envelope};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::config::Node;
use crate::master::RoleCell;

/// Messages waiting for the Raft task; beyond this the receive loop drops them.
pub const INBOX_CAPACITY: usize = 1024;
/// The file in `data_dir` that holds the hard state and log.
pub const STATE_FILE: &str = "raft.state";

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
    sock: Arc<UdpSocket>,
    peers: HashMap<u64, SocketAddr>,
    inbox: mpsc::Receiver<(u32, Vec<u8>)>,
    signal: Arc<RoleSignal>,
    role: Arc<RoleCell>,
    state_path: PathBuf,
    commands: mpsc::Receiver<RaftCommand>,
    command_tx: mpsc::Sender<RaftCommand>,
    /// Set by `Resign`: the lease stays revoked and the role member until the process exits.
    resigned: bool,
    /// Set by `Transfer` (after `Resign`): hand leadership to one of these whenever leader.
    transfer_to: Option<Vec<u64>>,
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
        let (command_tx, commands) = mpsc::channel(4);
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
            commands,
            command_tx,
            resigned: false,
            transfer_to: None,
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
                self.role.lease_until_ms.store(0, Relaxed);
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

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.settings.tick_ms));
        // Never catch up in a burst: see RaftCore::tick and the lease argument.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.core.tick(self.role.now_ms());
                    // A resigned node that leads (again) hands over again; a transfer that
                    // raft-rs aborted after an election timeout is retried here too.
                    if let Some(c) = &self.transfer_to {
                        self.core.transfer_leadership(c);
                    }
                }
                Some(cmd) = self.commands.recv() => self.command(cmd),
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
        // 1. Lease first: a revoked lease must bind the dispatcher before a vote goes out (or,
        //    after `Resign`, before a MsgTimeoutNow does: it stays revoked).
        let lease = if self.resigned { 0 } else { out.lease_until_ms };
        self.role.lease_until_ms.store(lease, Relaxed);
        // 2. Leadership. The term also fences stale forwards at the member path at once.
        if let Some(mut l) = out.leadership {
            if self.resigned {
                l.role = Role::Member;
            }
            tracing::info!(role = l.role.as_str(), master = ?l.master_id, term = l.term, "raft leadership");
            self.role.term.fetch_max(l.term, Relaxed);
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
