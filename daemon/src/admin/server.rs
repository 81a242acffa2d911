//! The node-local control socket (Unix stream, JSON lines). See [`crate::admin::protocol`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::admin::protocol::{
    ClusterDropped, NodeAnswer, NodeStatus, Rejected, RemoteControl, Reply, Request, Status,
};
use crate::admin::route::{parse_policy, route, Facts, Origin, Refusal, Route};
use crate::cluster::raft::{MemberRequest, RaftRequest, SettingRequest};
use crate::cluster::remote::{AskError, FORWARD_TIMEOUT, STATUS_TIMEOUT};
use crate::config::MAX_WEIGHT;
use crate::node::Shared;
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another daemon answers on {path}")]
    InUse { path: PathBuf },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket, replacing a stale file left by a crashed daemon but never a live one.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}

/// The longest request line accepted, newline excluded. The longest real request (`node add`
/// with an IPv6 address) is under 150 bytes; a longer line is refused, counted, and its
/// session closed, so a client cannot make the daemon buffer without bound.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Sessions served at once. One more is answered with an error line, counted and closed at
/// once: `tdscctl` opens one per command, so this is far above any operator's use, and
/// bounds what a stuck or hostile local client can hold.
pub const MAX_SESSIONS: usize = 16;

/// Requests and sessions the control socket refused, shown in `status` (`counters.control`).
#[derive(Debug, Default)]
pub struct ControlCounters {
    /// Request lines over [`MAX_REQUEST_BYTES`].
    pub oversize: AtomicU64,
    /// Connections refused because [`MAX_SESSIONS`] were open.
    pub over_cap: AtomicU64,
}

/// One request line read under the size cap.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line, without its newline (the last one may lack it).
    Request(String),
    /// End of stream.
    End,
    /// More than [`MAX_REQUEST_BYTES`] before a newline.
    Oversize,
}

/// Reads one line into `buf` (kept by the caller, so that a cancelled read loses nothing:
/// `read_until` appends what it got), reading at most `max + 1` bytes of it.
async fn read_line(
    r: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    loop {
        if buf.last() == Some(&b'\n') {
            buf.pop();
            let line = String::from_utf8(std::mem::take(buf))
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            return Ok(Line::Request(line));
        }
        if buf.len() > max {
            return Ok(Line::Oversize);
        }
        let room = u64::try_from(max + 1 - buf.len()).unwrap_or(u64::MAX);
        let n = (&mut *r).take(room).read_until(b'\n', buf).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(Line::End);
            }
            // A last line without its newline, as `lines()` takes it.
            buf.push(b'\n');
        }
    }
}

/// Joins the sessions that have ended; returns how many are left.
fn reap(sessions: &mut tokio::task::JoinSet<()>) -> usize {
    while sessions.try_join_next().is_some() {}
    sessions.len()
}

/// Serves until `shutdown`: then stops accepting, and waits for the sessions, which see the
/// same signal and end after the request in hand (the owner's bounded wait covers them).
pub async fn serve(listener: UnixListener, shared: Arc<Shared>, mut shutdown: Shutdown) {
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                // Sessions that have ended but were not reaped yet do not count.
                Ok((stream, _)) if reap(&mut sessions) >= MAX_SESSIONS => {
                    let n = shared.control.over_cap.fetch_add(1, Relaxed) + 1;
                    tracing::warn!(sessions = MAX_SESSIONS, refused = n, "control socket: too many sessions; connection refused");
                    // Never wait on this client: one non-blocking write, then close.
                    let _ = stream.try_write(&error_line(&format!(
                        "too many control sessions (at most {MAX_SESSIONS} at once); try again"
                    )));
                }
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    let shutdown = shutdown.clone();
                    sessions.spawn(async move {
                        if let Err(e) = session(stream, &shared, shutdown).await {
                            tracing::debug!(error = %e, "control session ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            // Reap ended sessions as they go.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            () = shutdown.requested() => break,
        }
    }
    drop(listener);
    while sessions.join_next().await.is_some() {}
}

async fn session(
    stream: UnixStream,
    shared: &Shared,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        // Cancel-safe: a stop mid-line leaves the bytes read so far in `buf`.
        let line = tokio::select! {
            l = read_line(&mut reader, &mut buf, MAX_REQUEST_BYTES) => l?,
            () = shutdown.requested() => return Ok(()),
        };
        let line = match line {
            Line::Request(l) => l,
            Line::End => return Ok(()),
            Line::Oversize => {
                let n = shared.control.oversize.fetch_add(1, Relaxed) + 1;
                tracing::warn!(
                    limit = MAX_REQUEST_BYTES,
                    refused = n,
                    "control socket: request over the size limit; session closed"
                );
                let reply = error_line(&format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes; session closed"
                ));
                w.write_all(&reply).await?;
                return Ok(());
            }
        };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => execute(shared, req).await,
            Err(e) => Reply::Error {
                error: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
}

/// An error reply as one line.
fn error_line(error: &str) -> Vec<u8> {
    let mut out = serde_json::to_vec(&Reply::Error {
        error: error.to_owned(),
    })
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// What the routing core needs to know, read now.
fn facts(s: &Shared) -> Facts {
    Facts {
        self_id: s.config.node_id,
        raft: s.raft_requests.is_some(),
        master: s.leadership.borrow().master_id,
        members: s.members.borrow().ids(),
    }
}

/// A request from this node's socket: carried out here, or carried to the node that must
/// act and its answer relayed (`crate::admin::route`).
async fn execute(s: &Shared, req: Request) -> Reply {
    match route(&req, Origin::Socket, &facts(s)) {
        Route::Local => local(s, req).await,
        Route::Forward(to) => forward(s, to, &req).await,
        Route::Refuse(r) => Reply::Error {
            error: r.to_string(),
        },
    }
}

/// A request another node carried here over the cluster channel (`crate::cluster::remote`):
/// checked as strictly as one from the socket, carried out only if this node must act on it
/// (never forwarded again), and counted by outcome.
pub async fn serve_peer(s: &Shared, from: u32, line: &str) -> Reply {
    let c = &s.remote.counters;
    let refuse = |counter: &AtomicU64, error: String| {
        counter.fetch_add(1, Relaxed);
        tracing::warn!(node = from, %error, "control request from another node refused");
        Reply::Error { error }
    };
    if line.len() > MAX_REQUEST_BYTES {
        return refuse(
            &c.bad_request,
            format!("request longer than {MAX_REQUEST_BYTES} bytes"),
        );
    }
    let req = match serde_json::from_str::<Request>(line) {
        Ok(r) => r,
        Err(e) => return refuse(&c.bad_request, format!("bad request: {e}")),
    };
    match route(&req, Origin::Peer(from), &facts(s)) {
        Route::Local => {
            c.served.fetch_add(1, Relaxed);
            let reply = local(s, req).await;
            if matches!(reply, Reply::Error { .. }) {
                c.failed.fetch_add(1, Relaxed);
            }
            reply
        }
        Route::Refuse(r) => {
            let counter = match r {
                Refusal::BadRequest(_) | Refusal::UnknownNode { .. } => &c.bad_request,
                Refusal::NotMember(_) => &c.not_member,
                Refusal::NotTarget { .. } | Refusal::NoLeader => &c.not_target,
            };
            refuse(counter, r.to_string())
        }
        // `route` never forwards a request from the network; should it, refuse all the same.
        Route::Forward(to) => refuse(
            &c.not_target,
            format!(
                "node {} is not the node that must act (node {to} is)",
                s.config.node_id
            ),
        ),
    }
}

/// Carries out a request that this node must act on.
async fn local(s: &Shared, req: Request) -> Reply {
    let result = match req {
        Request::Status => return Reply::Status(Box::new(status(s))),
        Request::ClusterStatus => return cluster_status(s).await,
        Request::PolicySet { policy } if s.raft_requests.is_some() => {
            cluster_policy(s, &policy).await
        }
        req @ Request::AffinitySet { .. } if s.raft_requests.is_some() => {
            cluster_affinity(s, &req).await
        }
        req @ Request::HealthSet { .. } => health_set(s, &req).await,
        req @ (Request::NodeAdd { .. } | Request::NodeRemove { .. }) => member_change(s, req).await,
        change => apply(s, &change),
    };
    match result {
        Ok(done) => Reply::Done { done },
        Err(error) => Reply::Error { error },
    }
}

/// The cluster address of member `id`.
fn member_address(s: &Shared, id: u32) -> Option<std::net::SocketAddr> {
    let members = s.members.borrow();
    let m = members.get(id)?;
    Some(std::net::SocketAddr::new(m.address, s.config.control_port))
}

/// Carries `req` to node `to` and relays its answer; the target's refusal is named as such.
async fn forward(s: &Shared, to: u32, req: &Request) -> Reply {
    let Some(address) = member_address(s, to) else {
        return Reply::Error {
            error: format!("node {to} is not a member of the cluster"),
        };
    };
    let line = match serde_json::to_string(req) {
        Ok(l) => l,
        Err(e) => {
            return Reply::Error {
                error: e.to_string(),
            }
        }
    };
    let answer = s.remote.ask(to, address, line, FORWARD_TIMEOUT).await;
    match answer.map(|l| serde_json::from_str::<Reply>(&l)) {
        Ok(Ok(Reply::Error { error })) => Reply::Error {
            error: format!("node {to} refused: {error}"),
        },
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => Reply::Error {
            error: format!("node {to} sent an unreadable answer: {e}"),
        },
        Err(e) => Reply::Error {
            error: e.to_string(),
        },
    }
}

/// `status --cluster`: every member's status, asked of all at once; one that does not answer
/// within [`STATUS_TIMEOUT`] is listed with the reason.
async fn cluster_status(s: &Shared) -> Reply {
    let mut ids = s.members.borrow().ids();
    if !ids.contains(&s.config.node_id) {
        ids.push(s.config.node_id);
    }
    ids.sort_unstable();
    let line = serde_json::to_string(&Request::Status).unwrap_or_default();
    // Every query is sent before any answer is awaited.
    let asked: Vec<_> = ids
        .iter()
        .map(|&id| {
            if id == s.config.node_id {
                return (id, s.view.own().address().to_string(), None);
            }
            let (address, rx) = match member_address(s, id) {
                Some(a) => (
                    a.ip().to_string(),
                    s.remote.start(id, a, line.clone(), STATUS_TIMEOUT),
                ),
                None => (String::new(), Err(AskError::Stopped)),
            };
            (id, address, Some(rx))
        })
        .collect();
    let mut cluster = Vec::with_capacity(asked.len());
    for (id, address, rx) in asked {
        let answer = match rx {
            None => Ok(Box::new(status(s))),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(rx)) => match rx.await {
                Err(_) => Err(AskError::Stopped.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(l)) => match serde_json::from_str::<Reply>(&l) {
                    Ok(Reply::Status(st)) => Ok(st),
                    Ok(Reply::Error { error }) => Err(error),
                    Ok(_) => Err("not a status".to_owned()),
                    Err(e) => Err(format!("unreadable answer: {e}")),
                },
            },
        };
        let (status, error) = match answer {
            Ok(st) => (Some(st), None),
            Err(e) => (None, Some(e)),
        };
        cluster.push(NodeAnswer {
            id,
            address,
            status,
            error,
        });
    }
    Reply::Cluster { cluster }
}

/// `policy set` under Raft: the leader proposes it as a cluster-wide setting and answers once
/// it has committed; every node (this one too) then switches as it applies it.
async fn cluster_policy(s: &Shared, policy: &str) -> Result<String, String> {
    let name = parse_policy(policy)?;
    let tx = s
        .raft_requests
        .as_ref()
        .ok_or("cluster-wide settings need [election] mode = \"raft\"")?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    tx.try_send(RaftRequest::Setting(SettingRequest::Policy {
        policy: name,
        reply,
    }))
    .map_err(|_| "the Raft task is busy or stopped; retry".to_owned())?;
    rx.await
        .map_err(|_| "the Raft task stopped before answering".to_owned())?
}

/// The affinity settings `req` asks for, resolved against this node's current ones.
fn resolve_affinity(
    s: &Shared,
    req: &Request,
) -> Result<Option<crate::datapath::sticky::AffinitySettings>, String> {
    crate::admin::route::affinity_change(req)?.resolve(s.affinity().as_ref(), s.affinity_capacity())
}

/// Resolves `affinity set` here (the leader) and has the Raft task commit it; every node
/// applies it from the committed settings.
async fn cluster_affinity(s: &Shared, req: &Request) -> Result<String, String> {
    let settings = resolve_affinity(s, req)?;
    let text = crate::datapath::sticky::AffinitySettings::encode(settings.as_ref());
    let tx = s
        .raft_requests
        .as_ref()
        .ok_or("cluster-wide settings need [election] mode = \"raft\"")?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    tx.try_send(RaftRequest::Setting(SettingRequest::Affinity {
        text,
        reply,
    }))
    .map_err(|_| "the Raft task is busy or stopped; retry".to_owned())?;
    rx.await
        .map_err(|_| "the Raft task stopped before answering".to_owned())?
}

/// Hands `health set` to this node's health task and waits for its answer.
async fn health_set(s: &Shared, req: &Request) -> Result<String, String> {
    let Request::HealthSet { node, .. } = req else {
        return Err("not a health request".into());
    };
    let own = s.config.node_id;
    only_self(own, *node, "retimes only its own checks")?;
    let (check, change) = crate::admin::route::health_change(req)?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    s.health_commands
        .try_send(crate::health::task::HealthCommand {
            check,
            change,
            reply,
        })
        .map_err(|_| "the health task is busy or stopped; retry".to_owned())?;
    let done = rx
        .await
        .map_err(|_| "the health task stopped before answering".to_owned())??;
    Ok(format!("node {own}: {done}"))
}

/// Hands `node add|remove` to the Raft task and waits for its answer (after commit).
async fn member_change(s: &Shared, req: Request) -> Result<String, String> {
    let tx = s.raft_requests.as_ref().ok_or(
        "membership changes need [election] mode = \"raft\"; under a static election the \
         members are the configured [[nodes]]",
    )?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    let msg = match req {
        Request::NodeAdd {
            id,
            address,
            weight,
        } => {
            let address = address
                .parse()
                .map_err(|_| format!("{address:?} is not an IP address"))?;
            MemberRequest::Add {
                id,
                address,
                weight: weight.unwrap_or(crate::config::DEFAULT_WEIGHT),
                reply,
            }
        }
        Request::NodeRemove { id } => MemberRequest::Remove { id, reply },
        _ => return Err("not a membership change".into()),
    };
    tx.try_send(RaftRequest::Member(msg))
        .map_err(|_| "the Raft task is busy or stopped; retry".to_owned())?;
    rx.await
        .map_err(|_| "the Raft task stopped before answering".to_owned())?
}

/// Refuses a request for node `node` that reached node `own`: `route` sends such a request
/// to node `node`, so this is the last line of defence. `what` says what a node does only
/// for itself.
fn only_self(own: u32, node: u32, what: &str) -> Result<(), String> {
    if node == own {
        Ok(())
    } else {
        Err(format!(
            "this is node {own}, not node {node}: a node {what}"
        ))
    }
}

/// Applies a change request; the text says what happened, the error why not.
fn apply(s: &Shared, req: &Request) -> Result<String, String> {
    let own = &s.view.nodes[s.view.self_index];
    let check_self =
        |node: u32| only_self(own.id(), node, "sets only its own weight and drain state");
    match req {
        Request::Status
        | Request::ClusterStatus
        | Request::NodeAdd { .. }
        | Request::NodeRemove { .. }
        | Request::HealthSet { .. } => Err("not a local change".into()),
        Request::AffinitySet { .. } => {
            // Under a static election: the master switches alone (no replication).
            let settings = resolve_affinity(s, req)?;
            s.set_affinity(settings)?;
            Ok(format!(
                "node {}: affinity {}",
                own.id(),
                crate::datapath::sticky::AffinitySettings::encode(settings.as_ref())
            ))
        }
        Request::PolicySet { policy } => {
            let name = parse_policy(policy)?;
            s.set_policy(name)?;
            Ok(format!("node {}: policy {}", own.id(), name.as_str()))
        }
        Request::Weight { node, weight } => {
            check_self(*node)?;
            if *weight > MAX_WEIGHT {
                return Err(format!("weight {weight} is outside 0..={MAX_WEIGHT}"));
            }
            own.weight.store(*weight, Relaxed);
            Ok(format!("node {node}: weight {weight}"))
        }
        Request::Drain { node } => {
            check_self(*node)?;
            own.draining.store(true, Relaxed);
            Ok(format!(
                "node {node}: draining (no new connections; {} established)",
                own.established.load(Relaxed)
            ))
        }
        Request::Undrain { node } => {
            check_self(*node)?;
            own.draining.store(false, Relaxed);
            Ok(format!("node {node}: taking new connections"))
        }
    }
}

pub fn status(s: &Shared) -> Status {
    let l = *s.leadership.borrow();
    let members = s.members.borrow().clone();
    let c = s.counters.snapshot();
    let now = s.epoch.elapsed().as_millis();
    let ruleset_foreign = s.firewall_counter().unwrap_or(0);
    Status {
        node_id: s.config.node_id,
        role: l.role.as_str().to_string(),
        master_id: l.master_id,
        term: l.term,
        leader_id: l.master_id,
        member: members.contains(s.config.node_id),
        voters: members
            .list
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect(),
        membership_index: members.index,
        policy: s.policy_name().as_str().to_string(),
        vip: s.config.vip.to_string(),
        tcp_ports: s.config.tcp_ports.clone(),
        queue_backend: s.queue_backend.to_string(),
        l2_mode: match s.config.l2_mode {
            crate::config::L2Mode::MaskedMac => "masked-mac".into(),
            crate::config::L2Mode::SharedMac => "shared-mac".into(),
        },
        // Present nodes, and this node also when it has been removed.
        nodes: s
            .view
            .slots()
            .iter()
            .enumerate()
            .filter(|(i, n)| n.is_present() || *i == s.view.self_index)
            .map(|(i, n)| {
                let seen = n.last_seen_ms.load(Relaxed);
                let is_self = i == s.view.self_index;
                NodeStatus {
                    id: n.id(),
                    address: n.address().to_string(),
                    voter: n.is_present() && n.voter.load(Relaxed),
                    alive: is_self || n.alive.load(Relaxed),
                    draining: n.draining.load(Relaxed),
                    healthy: !n.unhealthy.load(Relaxed),
                    weight: n.weight.load(Relaxed),
                    load: n.load.load(Relaxed),
                    connections: n.established.load(Relaxed),
                    syn_recv: n.syn_recv.load(Relaxed),
                    is_self,
                    last_report_ms_ago: (!is_self && seen > 0)
                        .then(|| u64::try_from(now).unwrap_or(u64::MAX).saturating_sub(seen)),
                }
            })
            .collect(),
        counters: crate::admin::protocol::Counters {
            syns_dispatched: c.syns_dispatched,
            forwarded_out: c.forwarded_out,
            accepted_locally: c.accepted_locally,
            retransmit_hits: c.retransmit_hits,
            dropped_no_node: c.dropped_no_node,
            dropped_not_master: c.dropped_not_master,
            queue_rejected: c.queue_rejected,
            forward_send_errors: c.forward_send_errors,
            received_forwarded: c.received_forwarded,
            reinjected: c.reinjected,
            reinject_errors: c.reinject_errors,
            records_evicted_live: c.records_evicted_live,
            records_handoff_overflow: c.records_handoff_overflow,
            affinity_hits: c.affinity_hits,
            affinity_evicted_live: c.affinity_evicted_live,
            forward_rejected: Rejected {
                malformed: c.rejected_malformed,
                unknown_peer: c.rejected_unknown_peer,
                wrong_vip: c.rejected_wrong_vip,
                not_syn: c.rejected_not_syn,
                bad_port: c.rejected_bad_port,
                stale_term: c.rejected_stale_term,
                bad_tag: c.rejected_bad_tag,
                unknown_key: c.rejected_unknown_key,
                replay: c.rejected_replay,
                ruleset_foreign,
            },
            reports_sent: s.reports.sent.load(Relaxed),
            reports_received: s.reports.received.load(Relaxed),
            reports_rejected: s.reports.rejected.load(Relaxed),
            cluster_dropped: cluster_dropped(&s.reports.drops),
            control: crate::admin::protocol::ControlRefused {
                oversize: s.control.oversize.load(Relaxed),
                over_cap: s.control.over_cap.load(Relaxed),
            },
            drops: drops(s),
            remote_control: remote_control(&s.remote.counters),
            queue: crate::admin::protocol::QueueStats {
                io: s.config.queue_io.as_str().to_owned(),
                rcvbuf: c.queue_rcvbuf,
                received: c.queue_received,
                batches: c.queue_batches,
                batch_max: c.queue_batch_max,
                enobufs: c.queue_enobufs,
                verdict_errors: c.queue_verdict_errors,
                malformed: c.queue_malformed,
            },
        },
        records: records_status(s),
        cluster_key: {
            let ring = s.cluster_socket.keyring();
            let tcp_fastopen = (s.config.tcp_fastopen_key
                == crate::config::FastOpenKeySource::Cluster)
                .then(|| {
                    let k = ring.tcp_fastopen_keys();
                    crate::admin::protocol::FastOpenStatus {
                        primary: k.primary_id,
                        backup: k.backup_id(),
                    }
                });
            crate::admin::protocol::ClusterKeyStatus {
                ids: ring.ids(),
                send: ring.send_id(),
                tcp_fastopen,
            }
        },
        affinity: affinity_status(s, &c),
        health: Some(s.health.borrow().clone()),
    }
}

fn affinity_status(
    s: &Shared,
    c: &crate::cluster::counters::CountersSnapshot,
) -> Option<crate::admin::protocol::AffinityStatus> {
    let a = s.affinity()?;
    let now = s.role.now_ms();
    Some(crate::admin::protocol::AffinityStatus {
        timeout_ms: u64::try_from(a.timeout.as_millis()).unwrap_or(u64::MAX),
        prefix_v4: a.prefix_v4,
        prefix_v6: a.prefix_v6,
        capacity: u64::try_from(a.capacity).unwrap_or(u64::MAX),
        replica_live: s.replica.lock().map_or(0, |r| {
            r.affinity
                .as_ref()
                .map_or(0, |t| u64::try_from(t.live_count(now)).unwrap_or(u64::MAX))
        }),
        hits: c.affinity_hits,
        evicted_live: c.affinity_evicted_live,
    })
}

/// The drops the daemon can see outside its own code: the ruleset's counting drop rules and
/// the kernel's NFQUEUE overrun counts for our queue.
fn drops(s: &Shared) -> crate::admin::protocol::Drops {
    let r = s.ruleset_drops().unwrap_or_default();
    let (queue_kernel, queue_user) = std::fs::read_to_string(NFQUEUE_PROC)
        .ok()
        .and_then(|text| queue_drops(&text, s.config.queue_num))
        .unwrap_or((0, 0));
    let netstat = std::fs::read_to_string(NETSTAT_PROC).unwrap_or_default();
    let tcp_ext = |name| snmp_value(&netstat, "TcpExt:", name).unwrap_or(0);
    let ct = std::fs::read_to_string(CONNTRACK_STAT_PROC).unwrap_or_default();
    let ct_sum = |name| conntrack_stat(&ct, name).unwrap_or(0);
    crate::admin::protocol::Drops {
        listen_overflows: tcp_ext("ListenOverflows"),
        listen_drops: tcp_ext("ListenDrops"),
        conntrack_insert_failed: ct_sum("insert_failed"),
        conntrack_drop: ct_sum("drop"),
        queue_kernel,
        queue_user,
        not_owned_in: r.not_owned_in,
        not_owned_out: r.not_owned_out,
        untracked_in: r.untracked_in,
        untracked_out: r.untracked_out,
        control_port_foreign: r.control_port_foreign,
        control_port_local: r.control_port_local,
        syn_prefix_limited: r.syn_prefix_limited,
    }
}

/// One line per bound queue (`net/netfilter/nfnetlink_queue.c`, `seq_show`): queue number,
/// peer port id, queue length, copy mode, copy range, queue_dropped, queue_user_dropped,
/// last id, 1.
const NFQUEUE_PROC: &str = "/proc/net/netfilter/nfnetlink_queue";

/// TCP's extended counters, a header line of names and a line of values per group.
const NETSTAT_PROC: &str = "/proc/net/netstat";

/// Conntrack's per-CPU statistics: a header line of names, then one line of hex values per CPU.
const CONNTRACK_STAT_PROC: &str = "/proc/net/stat/nf_conntrack";

/// The value of `name` in the `group` (`TcpExt:`) lines of `/proc/net/netstat`.
fn snmp_value(text: &str, group: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(group));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let i = names.split_whitespace().position(|n| n == name);
        if let Some(i) = i {
            return values.split_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

/// Column `name` of `/proc/net/stat/nf_conntrack`, summed over the CPU lines.
fn conntrack_stat(text: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines();
    let col = lines.next()?.split_whitespace().position(|n| n == name)?;
    lines
        .map(|l| u64::from_str_radix(l.split_whitespace().nth(col)?, 16).ok())
        .sum()
}

/// `(queue_dropped, queue_user_dropped)` of queue `num`, if it is bound.
fn queue_drops(text: &str, num: u16) -> Option<(u64, u64)> {
    text.lines().find_map(|line| {
        let f: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        (f.len() >= 7 && f[0] == u64::from(num)).then(|| (f[5], f[6]))
    })
}

fn records_status(s: &Shared) -> crate::admin::protocol::RecordsStatus {
    let r = &s.records;
    let now = s.role.now_ms();
    crate::admin::protocol::RecordsStatus {
        replicate: s.config.replicate_records,
        reconcile: s.config.reconcile_syn_recv,
        proposed_records: r.proposed_records.load(Relaxed),
        proposed_batches: r.proposed_batches.load(Relaxed),
        applied_records: r.applied_records.load(Relaxed),
        applied_batches: r.applied_batches.load(Relaxed),
        replica_live: s.replica.lock().map_or(0, |t| {
            u64::try_from(t.table.live_count(now)).unwrap_or(u64::MAX)
        }),
        discarded_not_leader: r.discarded_not_leader.load(Relaxed),
        queries_answered: r.queries_answered.load(Relaxed),
        last_takeover: r.last_takeover.lock().ok().and_then(|t| *t),
    }
}

/// A snapshot of the cluster control counters.
fn remote_control(c: &crate::cluster::remote::RemoteCounters) -> RemoteControl {
    RemoteControl {
        forwarded: c.forwarded.load(Relaxed),
        timeouts: c.timeouts.load(Relaxed),
        forward_busy: c.forward_busy.load(Relaxed),
        stray_answers: c.stray_answers.load(Relaxed),
        served: c.served.load(Relaxed),
        bad_request: c.bad_request.load(Relaxed),
        not_member: c.not_member.load(Relaxed),
        not_target: c.not_target.load(Relaxed),
        busy: c.busy.load(Relaxed),
        failed: c.failed.load(Relaxed),
    }
}

/// A snapshot of the bus's drop counters.
fn cluster_dropped(d: &crate::cluster::counters::ClusterDropCounters) -> ClusterDropped {
    ClusterDropped {
        source_port: d.source_port.load(Relaxed),
        bad_header: d.bad_header.load(Relaxed),
        unknown_key: d.unknown_key.load(Relaxed),
        bad_tag: d.bad_tag.load(Relaxed),
        unknown_sender: d.unknown_sender.load(Relaxed),
        replay: d.replay.load(Relaxed),
        undecodable: d.undecodable.load(Relaxed),
        no_owner: d.no_owner.load(Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::{conntrack_stat, queue_drops, read_line, snmp_value, Line, MAX_REQUEST_BYTES};
    use tokio::io::{AsyncWriteExt, BufReader};

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut r = BufReader::new(input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let l = read_line(&mut r, &mut buf, max).await.unwrap();
            let stop = matches!(l, Line::End | Line::Oversize);
            out.push(l);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn lines_up_to_the_limit_pass_and_one_byte_more_does_not() {
        let at = format!("{}\n", "a".repeat(8));
        assert_eq!(
            lines(at.as_bytes(), 8).await,
            vec![Line::Request("a".repeat(8)), Line::End]
        );
        let over = format!("{}\n", "a".repeat(9));
        assert_eq!(lines(over.as_bytes(), 8).await, vec![Line::Oversize]);
        // No newline at all: refused once the limit is passed, not buffered for ever.
        let endless = vec![b'{'; 100_000];
        assert_eq!(
            lines(&endless, MAX_REQUEST_BYTES).await,
            vec![Line::Oversize]
        );
    }

    #[tokio::test]
    async fn several_lines_and_a_last_one_without_newline() {
        assert_eq!(
            lines(b"{\"cmd\":\"status\"}\nab\nlast", 64).await,
            vec![
                Line::Request("{\"cmd\":\"status\"}".into()),
                Line::Request("ab".into()),
                Line::Request("last".into()),
                Line::End
            ]
        );
    }

    /// A line that arrives in pieces is put together, and the cap counts all its pieces.
    #[tokio::test]
    async fn a_line_in_pieces_is_capped_as_a_whole() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut r = BufReader::new(server);
        let mut buf = Vec::new();
        client.write_all(b"aaaa").await.unwrap();
        let read = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            read_line(&mut r, &mut buf, 6),
        )
        .await;
        assert!(read.is_err(), "no line yet");
        assert_eq!(buf, b"aaaa", "the bytes read before the cancel are kept");
        client.write_all(b"aaa\n").await.unwrap();
        assert_eq!(
            read_line(&mut r, &mut buf, 6).await.unwrap(),
            Line::Oversize
        );
    }

    #[test]
    fn proc_counters_are_read_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 5 9\nIpExt: ListenDrops\nIpExt: 77\n";
        assert_eq!(snmp_value(netstat, "TcpExt:", "ListenOverflows"), Some(5));
        assert_eq!(snmp_value(netstat, "TcpExt:", "ListenDrops"), Some(9));
        assert_eq!(snmp_value(netstat, "TcpExt:", "Nope"), None);
        let ct = "entries  clashres insert_failed drop\n00000001 00000000 0000000a 00000001\n00000002 00000000 00000010 00000000\n";
        assert_eq!(conntrack_stat(ct, "insert_failed"), Some(26));
        assert_eq!(conntrack_stat(ct, "drop"), Some(1));
        assert_eq!(conntrack_stat(ct, "nope"), None);
    }

    #[test]
    fn queue_drops_reads_the_columns_of_our_queue() {
        // Two bound queues, as nfnetlink_queue prints them.
        let text =
            "    0  31337     0 2 65531     7    12  4242  1\n    3  31338     5 2 65531 1 2 3 1\n";
        assert_eq!(queue_drops(text, 0), Some((7, 12)));
        assert_eq!(queue_drops(text, 3), Some((1, 2)));
        assert_eq!(queue_drops(text, 1), None);
        assert_eq!(queue_drops("", 0), None);
    }
}
