//! Control requests over the cluster channel: the I/O shell that carries a request a node's
//! control socket took to the node that must act on it (`crate::admin::route` decides which),
//! and that serves the requests other nodes carry here.
//!
//! Requests and answers are `Body::ControlRequest` / `Body::ControlAnswer` envelopes on the
//! cluster socket, so they are sealed with the cluster key and accepted only from a present
//! member at its address, fresh (`crate::cluster::bus`). One task owns both directions:
//!
//! * **asking**: a control session hands it an [`Ask`]; the task gives the request a nonce,
//!   keeps it in the [`Pending`] table (at most [`MAX_IN_FLIGHT`]), sends it, and answers the
//!   session with the first answer that carries the nonce *and* comes from the node asked,
//!   or with [`AskError::Timeout`] once the deadline passed;
//! * **serving**: a request from another node is carried out as the control socket would
//!   (`crate::admin::server::serve_peer`: the same validation, never forwarded again), at
//!   most [`MAX_SERVING`] at once; one more is answered `busy` at once. The answer is sent
//!   back to the asking node's cluster address.
//!
//! The counters ([`RemoteCounters`]) are in `status` (`counters.remote_control`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tdsc_proto::control::{
    Body, ControlAnswer, ControlRequest, Envelope, MAX_CONTROL_ANSWER, MAX_CONTROL_REQUEST,
};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::bus::ClusterSocket;
use crate::node::Shared;
use crate::shutdown::Shutdown;

/// How long a forwarded change may take: longer than the Raft task's commit patience
/// (500 ticks, 5 s at the default tick), so that its own answer arrives first.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(8);

/// How long a member has to answer a status query of `status --cluster`.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Requests this node has in flight at once (the control socket serves 16 sessions; a
/// cluster status of a large cluster asks every member).
pub const MAX_IN_FLIGHT: usize = 64;

/// Requests from other nodes carried out at once.
pub const MAX_SERVING: usize = 4;

/// Capacity of each channel into the task; a full one refuses (sessions) or drops (bus).
pub const CHANNEL_CAPACITY: usize = 64;

/// How often deadlines are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Why a forwarded request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    #[error("too many control requests in flight to other nodes (at most {MAX_IN_FLIGHT}); retry")]
    Busy,
    #[error("node {node} ({address}) did not answer within {} ms: down, unreachable, or an older daemon that does not take forwarded requests", after.as_millis())]
    Timeout {
        node: u32,
        address: std::net::IpAddr,
        after: Duration,
    },
    #[error("cannot send the request to node {node} ({address}): {reason}")]
    Send {
        node: u32,
        address: std::net::IpAddr,
        reason: String,
    },
    #[error("request longer than {MAX_CONTROL_REQUEST} bytes")]
    TooLong,
    #[error("the cluster control task has stopped")]
    Stopped,
}

/// A request for another node, from a control session.
#[derive(Debug)]
pub struct Ask {
    pub to: u32,
    /// The target's cluster address and port.
    pub address: SocketAddr,
    /// One request line (JSON).
    pub line: String,
    pub timeout: Duration,
    /// The target's reply line, or why there is none.
    pub reply: oneshot::Sender<Result<String, AskError>>,
}

/// The counters of both directions (see `crate::admin::protocol::RemoteControl`).
#[derive(Debug, Default)]
pub struct RemoteCounters {
    pub forwarded: AtomicU64,
    pub timeouts: AtomicU64,
    pub forward_busy: AtomicU64,
    pub stray_answers: AtomicU64,
    pub served: AtomicU64,
    pub bad_request: AtomicU64,
    pub not_member: AtomicU64,
    pub not_target: AtomicU64,
    pub busy: AtomicU64,
    pub failed: AtomicU64,
}

/// One request in flight.
#[derive(Debug)]
struct Entry<R> {
    to: u32,
    deadline: Instant,
    reply: R,
}

/// The requests in flight, by nonce: bounded, matched by nonce and sender, expired by
/// deadline. Pure (the caller passes the time).
#[derive(Debug)]
pub struct Pending<R> {
    entries: HashMap<u64, Entry<R>>,
    next_nonce: u64,
    capacity: usize,
}

impl<R> Pending<R> {
    /// An empty table whose first nonce is `first_nonce` (the task starts it at the wall
    /// clock, so a restarted node does not reuse the nonces of its previous run).
    pub fn new(capacity: usize, first_nonce: u64) -> Self {
        Self {
            entries: HashMap::new(),
            next_nonce: first_nonce,
            capacity,
        }
    }

    /// Takes a request for node `to`; its nonce, or `reply` back when the table is full.
    pub fn insert(&mut self, to: u32, deadline: Instant, reply: R) -> Result<u64, R> {
        if self.entries.len() >= self.capacity {
            return Err(reply);
        }
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.entries.insert(
            nonce,
            Entry {
                to,
                deadline,
                reply,
            },
        );
        Ok(nonce)
    }

    /// The request an answer from `from` with `nonce` completes; None (and the entry stays)
    /// when there is none or it was sent to another node.
    pub fn complete(&mut self, from: u32, nonce: u64) -> Option<R> {
        if self.entries.get(&nonce)?.to != from {
            return None;
        }
        self.entries.remove(&nonce).map(|e| e.reply)
    }

    /// Takes back a request that could not be sent.
    pub fn cancel(&mut self, nonce: u64) -> Option<R> {
        self.entries.remove(&nonce).map(|e| e.reply)
    }

    /// The requests whose deadline has passed at `now`, with the node each was sent to.
    pub fn expire(&mut self, now: Instant) -> Vec<(u32, R)> {
        let due: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(n, _)| *n)
            .collect();
        due.into_iter()
            .filter_map(|n| self.entries.remove(&n).map(|e| (e.to, e.reply)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a pending entry holds: the session's reply and where the request went (for the
/// timeout's message).
type Waiter = (
    oneshot::Sender<Result<String, AskError>>,
    SocketAddr,
    Duration,
);

/// The task's inputs.
#[derive(Debug)]
pub struct RemoteLinks {
    /// From control sessions.
    pub asks: mpsc::Receiver<Ask>,
    /// From the bus: (sender id, its address, the request).
    pub requests: mpsc::Receiver<(u32, SocketAddr, ControlRequest)>,
    /// From the bus: (sender id, the answer).
    pub answers: mpsc::Receiver<(u32, ControlAnswer)>,
}

/// Runs until `shutdown`. Requests in flight then get [`AskError::Stopped`] (their reply
/// channel drops), requests being served are abandoned unanswered.
pub async fn run(
    sock: Arc<ClusterSocket>,
    shared: Arc<Shared>,
    mut links: RemoteLinks,
    mut shutdown: Shutdown,
) {
    let counters = shared.remote.counters.clone();
    let mut pending: Pending<Waiter> =
        Pending::new(MAX_IN_FLIGHT, crate::cluster::bus::unix_nanos());
    let mut serving = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let node_id = shared.config.node_id;
    let envelope = |body| {
        Envelope {
            from: node_id,
            term: shared.role.term(),
            body: Some(body),
        }
        .to_bytes()
    };
    loop {
        tokio::select! {
            Some(ask) = links.asks.recv() => {
                if ask.line.len() > MAX_CONTROL_REQUEST {
                    let _ = ask.reply.send(Err(AskError::TooLong));
                    continue;
                }
                let deadline = Instant::now() + ask.timeout;
                let nonce = match pending.insert(ask.to, deadline, (ask.reply, ask.address, ask.timeout)) {
                    Ok(n) => n,
                    Err((reply, _, _)) => {
                        counters.forward_busy.fetch_add(1, Relaxed);
                        let _ = reply.send(Err(AskError::Busy));
                        continue;
                    }
                };
                let wire = envelope(Body::ControlRequest(ControlRequest { nonce, request: ask.line }));
                match sock.send_to(&wire, ask.address).await {
                    Ok(_) => { counters.forwarded.fetch_add(1, Relaxed); }
                    Err(e) => {
                        if let Some((reply, address, _)) = pending.cancel(nonce) {
                            let _ = reply.send(Err(AskError::Send { node: ask.to, address: address.ip(), reason: e.to_string() }));
                        }
                    }
                }
            }
            Some((from, answer)) = links.answers.recv() => {
                match pending.complete(from, answer.nonce) {
                    Some((reply, _, _)) => { let _ = reply.send(Ok(answer.reply)); }
                    None => {
                        counters.stray_answers.fetch_add(1, Relaxed);
                        tracing::debug!(node = from, nonce = answer.nonce, "control answer with no request in flight to that node");
                    }
                }
            }
            Some((from, address, request)) = links.requests.recv() => {
                if serving.len() >= MAX_SERVING {
                    counters.busy.fetch_add(1, Relaxed);
                    let line = reply_line(&crate::admin::protocol::Reply::Error {
                        error: format!("node {node_id} is serving {MAX_SERVING} requests from other nodes; retry"),
                    });
                    let wire = envelope(Body::ControlAnswer(ControlAnswer { nonce: request.nonce, reply: line }));
                    let _ = sock.send_to(&wire, address).await;
                    continue;
                }
                let shared = shared.clone();
                serving.spawn(async move {
                    let reply = crate::admin::server::serve_peer(&shared, from, &request.request).await;
                    (address, request.nonce, reply_line(&reply))
                });
            }
            Some(done) = serving.join_next(), if !serving.is_empty() => {
                if let Ok((address, nonce, reply)) = done {
                    let wire = envelope(Body::ControlAnswer(ControlAnswer { nonce, reply }));
                    if let Err(e) = sock.send_to(&wire, address).await {
                        tracing::warn!(peer = %address, error = %e, "cannot send a control answer");
                    }
                }
            }
            _ = sweep.tick() => {
                for (node, (reply, address, after)) in pending.expire(Instant::now()) {
                    counters.timeouts.fetch_add(1, Relaxed);
                    let _ = reply.send(Err(AskError::Timeout { node, address: address.ip(), after }));
                }
            }
            () = shutdown.requested() => break,
        }
    }
    serving.abort_all();
}

/// A reply as one line, within [`MAX_CONTROL_ANSWER`] (a longer one is replaced by an error
/// saying so).
fn reply_line(reply: &crate::admin::protocol::Reply) -> String {
    let line = serde_json::to_string(reply).unwrap_or_default();
    if line.len() <= MAX_CONTROL_ANSWER {
        return line;
    }
    serde_json::to_string(&crate::admin::protocol::Reply::Error {
        error: format!(
            "the reply ({} bytes) is longer than a cluster datagram carries ({MAX_CONTROL_ANSWER})",
            line.len()
        ),
    })
    .unwrap_or_default()
}

/// What control sessions hold to reach the task.
#[derive(Debug)]
pub struct RemoteHandle {
    pub asks: mpsc::Sender<Ask>,
    pub counters: Arc<RemoteCounters>,
}

impl RemoteHandle {
    /// Sends `line` to node `to` at `address` and waits for its reply line.
    pub async fn ask(
        &self,
        to: u32,
        address: SocketAddr,
        line: String,
        timeout: Duration,
    ) -> Result<String, AskError> {
        let rx = self.start(to, address, line, timeout)?;
        rx.await.map_err(|_| AskError::Stopped)?
    }

    /// Hands the request to the task; the receiver gets its answer (so that several can be
    /// in flight at once).
    pub fn start(
        &self,
        to: u32,
        address: SocketAddr,
        line: String,
        timeout: Duration,
    ) -> Result<oneshot::Receiver<Result<String, AskError>>, AskError> {
        let (reply, rx) = oneshot::channel();
        self.asks
            .try_send(Ask {
                to,
                address,
                line,
                timeout,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.counters.forward_busy.fetch_add(1, Relaxed);
                    AskError::Busy
                }
                mpsc::error::TrySendError::Closed(_) => AskError::Stopped,
            })?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_completes_only_the_request_sent_to_its_sender() {
        let now = Instant::now();
        let mut p = Pending::new(4, 100);
        let a = p.insert(2, now + Duration::from_secs(1), "a").unwrap();
        let b = p.insert(3, now + Duration::from_secs(1), "b").unwrap();
        assert_eq!((a, b), (100, 101));
        // Node 3 answering node 2's request: not taken, and the request stays.
        assert_eq!(p.complete(3, a), None);
        assert_eq!(p.complete(2, 999), None);
        assert_eq!(p.complete(2, a), Some("a"));
        // A second answer to the same nonce is stray.
        assert_eq!(p.complete(2, a), None);
        assert_eq!(p.complete(3, b), Some("b"));
        assert!(p.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_frees_on_answer_or_expiry() {
        let now = Instant::now();
        let mut p = Pending::new(2, 0);
        let first = p.insert(2, now + Duration::from_millis(10), 1).unwrap();
        p.insert(3, now + Duration::from_secs(10), 2).unwrap();
        assert_eq!(p.insert(2, now, 3), Err(3), "full");
        assert!(p.expire(now).is_empty(), "nothing due yet");
        assert_eq!(p.expire(now + Duration::from_millis(10)), vec![(2, 1)]);
        assert_eq!(
            p.complete(2, first),
            None,
            "an answer after the timeout is stray"
        );
        assert_eq!(p.len(), 1);
        assert!(p.insert(2, now, 4).is_ok(), "room again");
    }

    #[test]
    fn nonces_wrap_and_a_cancelled_request_is_gone() {
        let mut p = Pending::new(4, u64::MAX);
        let now = Instant::now();
        let a = p.insert(2, now, 'a').unwrap();
        let b = p.insert(2, now, 'b').unwrap();
        assert_eq!((a, b), (u64::MAX, 0));
        assert_eq!(p.cancel(a), Some('a'));
        assert_eq!(p.complete(2, a), None);
    }

    #[test]
    fn a_reply_too_long_for_a_datagram_becomes_an_error_saying_so() {
        let long = crate::admin::protocol::Reply::Done {
            done: "x".repeat(MAX_CONTROL_ANSWER),
        };
        let line = reply_line(&long);
        assert!(line.len() <= MAX_CONTROL_ANSWER);
        assert!(line.contains("longer than a cluster datagram"), "{line}");
        let short = crate::admin::protocol::Reply::Done { done: "ok".into() };
        assert_eq!(reply_line(&short), r#"{"done":"ok"}"#);
    }
}
