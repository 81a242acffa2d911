//! The cluster socket (UDP, `control_port`) and its receive loop: one socket carries seven
//! kinds of message between nodes, and this loop is the one place that reads it.
//!
//! # Sealed, both ways, in one place
//!
//! Every datagram on the socket is sealed with the cluster key ([`tdsc_proto::seal`]):
//! [`ClusterSocket::send_to`] is the only way to send on it, and it seals whatever it is
//! given, so a message kind added later is sealed too. For every datagram received, the loop
//! ([`Bus::accept`]), in this order and before anything is decoded:
//!
//! 1. checks the UDP source port is the cluster port (every node sends from its bound
//!    cluster socket, so anything else is not a node);
//! 2. opens the seal: version, key id, tag ([`Keyring::open`]);
//! 3. checks the sealed sender id is the present member whose address the datagram came
//!    from, and not this node;
//! 4. checks the sealed counter against that sender's replay window ([`ReplayWindow`]).
//!
//! Only then is the [`Envelope`] decoded (its `from` must be the sealed sender) and the body
//! routed by kind to its owner. A datagram that fails any step is dropped, counted by
//! [`DropReason`] (`tdscctl status`), and logged with its peer address and reason at most
//! once a second per reason.
//!
//! A sender's counter starts at the wall clock in nanoseconds ([`SendCounter::starting_at`]),
//! so a restarted node's counters are newer than all it sent before and the window its
//! peers kept for it accepts them (unless its clock stepped back by more than its uptime: it
//! is then refused as a replay until the clock catches up, and the drops say so). A
//! restarted *receiver* starts with empty windows: it accepts, once each, genuine datagrams
//! captured before it started. What that allows is in `docs/design/cluster-channel.md`.
//!
//! # Routing
//!
//! | body | owner | how |
//! |---|---|---|
//! | `Report` | liveness and load (`crate::cluster::report`) | applied in place: a few atomic stores to the sender's view slot |
//! | `Raft` | the Raft task | its inbox channel |
//! | `Removed` | the Raft task (membership) | its request channel |
//! | `SynRecvQuery` | the answering task (`crate::cluster::takeover`) | its channel |
//! | `SynRecvAnswer` | the takeover, in the role shell | its channel |
//! | `ControlRequest`, `ControlAnswer` | the cluster control task (`crate::cluster::remote`) | its channels |
//!
//! Channels are bounded and never waited on: a full or closed one drops the message and
//! counts it rejected, as a lossy network would (Raft retransmits, a query is re-sent at the
//! next takeover). Reports are applied in place rather than queued: liveness must not wait
//! behind anything.
//!
//! The loop also answers a datagram from a node this node has removed with a `Removed`
//! notice (at most once per report interval per address): such a node missed the commit of
//! its removal, and the notice lets it leave the group instead of carrying on as a member
//! nobody listens to. The removed node's datagram must still be sealed with the cluster key.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tdsc_proto::control::{
    Body, ControlAnswer, ControlRequest, Envelope, Removed, SynRecvAnswer, MAX_DATAGRAM,
};
use tdsc_proto::seal::{Keyring, Reject, ReplayWindow, SendCounter, OVERHEAD};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::cluster::counters::ReportCounters;
use crate::cluster::membership::Members;
use crate::cluster::raft::{MemberRequest, RaftRequest};
use crate::cluster::report::{self, now_ms};
use crate::cluster::role::RoleCell;
use crate::cluster::view::ClusterView;
use crate::shutdown::Shutdown;

/// The cluster socket. Every send seals (see the module docs); the bus's loop is its only
/// reader. Shared by every sender (`Arc`).
#[derive(Debug)]
pub struct ClusterSocket {
    sock: UdpSocket,
    /// The sender id sealed into every datagram.
    node_id: u32,
    /// The keyring sends seal with and the bus opens with. Behind a lock so that it can be
    /// replaced while running; read once per datagram.
    keyring: RwLock<Arc<Keyring>>,
    /// This node's datagram counter (all senders share it: one nonce space per node and key).
    counter: Mutex<SendCounter>,
}

/// Nanoseconds since the Unix epoch, where a sender's counter starts.
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl ClusterSocket {
    /// Binds the cluster socket on this node's cluster address.
    pub async fn bind(
        view: &ClusterView,
        port: u16,
        node_id: u32,
        keyring: Arc<Keyring>,
    ) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(SocketAddr::new(view.own().address(), port)).await?;
        Ok(Self::new(sock, node_id, keyring, unix_nanos()))
    }

    /// `SO_BINDTODEVICE`: the socket receives only what arrived on `interface` and sends only
    /// through it, whatever the routing table says (the ruleset checks the same on input;
    /// this is the socket's own half).
    pub fn bind_device(&self, interface: &[u8]) -> std::io::Result<()> {
        self.sock.bind_device(Some(interface))
    }

    /// A cluster socket over `sock` whose first counter is `first_counter`.
    fn new(
        sock: UdpSocket,
        node_id: u32,
        keyring: impl Into<Arc<Keyring>>,
        first_counter: u64,
    ) -> Self {
        Self {
            sock,
            node_id,
            keyring: RwLock::new(keyring.into()),
            counter: Mutex::new(SendCounter::starting_at(first_counter)),
        }
    }

    /// The keyring in use.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Seals `payload` into `out` with this node's next counter. Fails only once the counter
    /// space is spent: a nonce is never used twice.
    fn seal(&self, payload: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        let counter = self
            .counter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next()
            .ok_or_else(|| std::io::Error::other("cluster message counter spent"))?;
        self.keyring().seal(self.node_id, counter, payload, out);
        Ok(())
    }

    /// Seals `payload` (an encoded [`Envelope`]) and sends it to `to`.
    pub async fn send_to(&self, payload: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        let mut wire = Vec::with_capacity(payload.len() + OVERHEAD);
        self.seal(payload, &mut wire)?;
        self.sock.send_to(&wire, to).await
    }
}

/// Why a datagram was dropped; each has its counter in
/// [`ClusterDropCounters`](crate::cluster::counters::ClusterDropCounters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    SourcePort,
    BadHeader,
    UnknownKey,
    BadTag,
    UnknownSender,
    Replay,
    Undecodable,
    NoOwner,
}

impl DropReason {
    const ALL: [DropReason; 8] = [
        DropReason::SourcePort,
        DropReason::BadHeader,
        DropReason::UnknownKey,
        DropReason::BadTag,
        DropReason::UnknownSender,
        DropReason::Replay,
        DropReason::Undecodable,
        DropReason::NoOwner,
    ];

    /// A stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::SourcePort => "source_port",
            DropReason::BadHeader => "bad_header",
            DropReason::UnknownKey => "unknown_key",
            DropReason::BadTag => "bad_tag",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::Replay => "replay",
            DropReason::Undecodable => "undecodable",
            DropReason::NoOwner => "no_owner",
        }
    }

    fn index(self) -> usize {
        DropReason::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }

    fn counter(self, c: &ReportCounters) -> &AtomicU64 {
        let d = &c.drops;
        match self {
            DropReason::SourcePort => &d.source_port,
            DropReason::BadHeader => &d.bad_header,
            DropReason::UnknownKey => &d.unknown_key,
            DropReason::BadTag => &d.bad_tag,
            DropReason::UnknownSender => &d.unknown_sender,
            DropReason::Replay => &d.replay,
            DropReason::Undecodable => &d.undecodable,
            DropReason::NoOwner => &d.no_owner,
        }
    }

    /// What the log line adds, for the reasons an operator can act on.
    fn hint(self) -> &'static str {
        match self {
            DropReason::UnknownKey | DropReason::BadTag => {
                "not sealed with a key of this node's keyring: forged, or a node with another cluster key"
            }
            DropReason::Replay => {
                "a counter seen before: a replay, or a sender whose clock stepped back"
            }
            DropReason::SourcePort => "not sent from the cluster port: not a node",
            _ => "",
        }
    }
}

impl From<Reject> for DropReason {
    fn from(r: Reject) -> Self {
        match r {
            Reject::Short | Reject::Version => DropReason::BadHeader,
            Reject::UnknownKey => DropReason::UnknownKey,
            Reject::BadTag => DropReason::BadTag,
        }
    }
}

/// What [`Bus::accept`] made of a datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Taken by its owner, or dropped and why.
    pub result: Result<(), DropReason>,
    /// The sender id, when the seal opened (authentic, whatever happened next).
    pub sender: Option<u32>,
}

/// Where each body kind goes. A `None` route refuses that kind (static election: no Raft).
#[derive(Debug)]
pub struct Routes {
    /// `Body::Raft`: (sender id, raft bytes) to the Raft task's inbox.
    pub raft: Option<mpsc::Sender<(u32, Vec<u8>)>>,
    /// `Body::Removed`: to the Raft task's requests, as [`MemberRequest::Removed`].
    pub raft_requests: Option<mpsc::Sender<RaftRequest>>,
    /// `Body::SynRecvQuery`: (querier's address, nonce) to the answering task.
    pub syn_recv_queries: mpsc::Sender<(SocketAddr, u64)>,
    /// `Body::SynRecvAnswer`: (member id, answer) to the takeover.
    pub syn_recv_answers: mpsc::Sender<(u32, SynRecvAnswer)>,
    /// `Body::ControlRequest`: (member id, its address, request) to the cluster control task.
    pub control_requests: mpsc::Sender<(u32, SocketAddr, ControlRequest)>,
    /// `Body::ControlAnswer`: (member id, answer) to the cluster control task.
    pub control_answers: mpsc::Sender<(u32, ControlAnswer)>,
}

/// The bus's rate limit of drop log lines: per reason, when it last logged and how many it
/// left out since.
#[derive(Debug, Default)]
struct DropLog {
    last_ms: [Option<u64>; DropReason::ALL.len()],
    suppressed: [u64; DropReason::ALL.len()],
}

/// At most one drop log line per reason this often.
const DROP_LOG_EVERY_MS: u64 = 1_000;

/// The receive loop's state. Owned by the bus task; ends at its shutdown signal.
#[derive(Debug)]
pub struct Bus {
    pub node_id: u32,
    /// The cluster port: every datagram must come from it.
    pub port: u16,
    /// Read to authenticate senders; peers' report fields are written here (see module docs).
    pub view: Arc<ClusterView>,
    /// Read for the term a `Removed` notice carries.
    pub role: Arc<RoleCell>,
    /// `received`, `rejected` and `drops` are this loop's.
    pub counters: Arc<ReportCounters>,
    /// The clock of `last_seen_ms` (shared with the report sweep).
    pub epoch: Instant,
    /// How often a removed node is told so, at most.
    pub notice_interval: Duration,
    /// Under Raft: the current members, to tell a removed node so. None: no notices.
    pub members: Option<watch::Receiver<Members>>,
    pub routes: Routes,
    /// One replay window per sender id (only members' ids get one: step 3 comes first).
    pub windows: HashMap<u32, ReplayWindow>,
}

impl Bus {
    /// Opens, authenticates, replay-checks, decodes and routes one datagram from `from`
    /// (in place: `buf` is decrypted). Counts the outcome.
    pub fn accept(&mut self, ring: &Keyring, from: SocketAddr, buf: &mut [u8]) -> Outcome {
        let outcome = self.check_and_route(ring, from, buf);
        let c = match outcome.result {
            Ok(()) => &self.counters.received,
            Err(d) => {
                d.counter(&self.counters).fetch_add(1, Relaxed);
                &self.counters.rejected
            }
        };
        c.fetch_add(1, Relaxed);
        outcome
    }

    fn check_and_route(&mut self, ring: &Keyring, from: SocketAddr, buf: &mut [u8]) -> Outcome {
        let dropped = |d, sender| Outcome {
            result: Err(d),
            sender,
        };
        if from.port() != self.port {
            return dropped(DropReason::SourcePort, None);
        }
        let opened = match ring.open(buf) {
            Ok(o) => o,
            Err(r) => return dropped(r.into(), None),
        };
        let sender = Some(opened.sender);
        let member = self
            .view
            .index_of_address(&from.ip())
            .filter(|&i| i != self.view.self_index && self.view.nodes[i].id() == opened.sender);
        let Some(i) = member else {
            return dropped(DropReason::UnknownSender, sender);
        };
        if self
            .windows
            .entry(opened.sender)
            .or_default()
            .check_and_set(opened.counter)
            .is_err()
        {
            return dropped(DropReason::Replay, sender);
        }
        let env = match Envelope::from_bytes(opened.payload) {
            Ok(env) if env.from == opened.sender => env,
            _ => return dropped(DropReason::Undecodable, sender),
        };
        let routed = self.route(i, from, env);
        Outcome {
            result: if routed {
                Ok(())
            } else {
                Err(DropReason::NoOwner)
            },
            sender,
        }
    }

    /// Hands an authenticated envelope from the member of view slot `i` to its owner.
    fn route(&self, i: usize, from: SocketAddr, env: Envelope) -> bool {
        let slot = &self.view.nodes[i];
        let r = &self.routes;
        match env.body {
            Some(Body::Report(rep)) => {
                report::accept(slot, &rep, now_ms(self.epoch));
                true
            }
            Some(Body::Raft(bytes)) => r
                .raft
                .as_ref()
                .is_some_and(|tx| tx.try_send((env.from, bytes)).is_ok()),
            Some(Body::Removed(n)) => r.raft_requests.as_ref().is_some_and(|tx| {
                tx.try_send(RaftRequest::Member(MemberRequest::Removed {
                    from: env.from,
                    index: n.index,
                    voters: n.voters,
                }))
                .is_ok()
            }),
            Some(Body::SynRecvQuery(q)) => r.syn_recv_queries.try_send((from, q.nonce)).is_ok(),
            Some(Body::SynRecvAnswer(a)) => r.syn_recv_answers.try_send((env.from, a)).is_ok(),
            Some(Body::ControlRequest(q)) => {
                r.control_requests.try_send((env.from, from, q)).is_ok()
            }
            Some(Body::ControlAnswer(a)) => r.control_answers.try_send((env.from, a)).is_ok(),
            // An authenticated envelope without a body (or of a kind this daemon does not
            // know): nothing to do, but the sender is a member.
            None => true,
        }
    }

    /// The notice for a datagram from `sender` at `from` if this node has removed that node
    /// (its address and id match an absent slot), or None.
    pub fn removal_notice(&self, from: SocketAddr, sender: u32) -> Option<Vec<u8>> {
        let members = self.members.as_ref()?;
        let known = self.view.slots().iter().any(|s| {
            !s.is_present()
                && s.ident()
                    .is_some_and(|i| i.id == sender && i.address == from.ip())
        });
        let m = members.borrow();
        if !known || m.contains(sender) || !m.contains(self.node_id) {
            return None;
        }
        let notice = Envelope {
            from: self.node_id,
            term: self.role.term(),
            body: Some(Body::Removed(Removed {
                index: m.index,
                voters: m.ids(),
            })),
        };
        Some(notice.to_bytes())
    }

    /// Logs a drop, at most once a second per reason (with how many were left out since).
    fn log_drop(log: &mut DropLog, d: DropReason, from: SocketAddr, now_ms: u64) {
        let i = d.index();
        let due = log.last_ms[i].is_none_or(|t| now_ms.saturating_sub(t) >= DROP_LOG_EVERY_MS);
        if !due {
            log.suppressed[i] += 1;
            return;
        }
        let suppressed = std::mem::take(&mut log.suppressed[i]);
        log.last_ms[i] = Some(now_ms);
        tracing::warn!(
            peer = %from,
            reason = d.as_str(),
            suppressed,
            "cluster datagram dropped{}{}",
            if d.hint().is_empty() { "" } else { ": " },
            d.hint()
        );
    }

    /// Receives until `shutdown`.
    pub async fn run(mut self, sock: Arc<ClusterSocket>, mut shutdown: Shutdown) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        // When each removed node was last told so (ms): once per notice interval.
        let mut told: HashMap<IpAddr, u64> = HashMap::new();
        let mut log = DropLog::default();
        let every = u64::try_from(self.notice_interval.as_millis()).unwrap_or(u64::MAX);
        loop {
            let received = tokio::select! {
                r = sock.sock.recv_from(&mut buf) => r,
                () = shutdown.requested() => return,
            };
            let (n, from) = match received {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster socket receive failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        () = shutdown.requested() => return,
                    }
                }
            };
            let ring = sock.keyring();
            let outcome = self.accept(&ring, from, &mut buf[..n]);
            let now = now_ms(self.epoch);
            let notice = outcome.sender.and_then(|s| self.removal_notice(from, s));
            match outcome.result {
                // A removed node's datagrams are unknown senders: answered, not logged.
                Err(DropReason::UnknownSender) if notice.is_some() => {}
                Err(d) => Self::log_drop(&mut log, d, from, now),
                Ok(()) => {}
            }
            let Some(notice) = notice else { continue };
            let due = told
                .get(&from.ip())
                .is_none_or(|t| now.saturating_sub(*t) >= every);
            if due {
                told.insert(from.ip(), now);
                let _ = sock.send_to(&notice, from).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdsc_proto::control::{NodeReport, SynRecvQuery};
    use tdsc_proto::seal::KEY_LEN;

    type Channels = (
        mpsc::Receiver<(SocketAddr, u64)>,
        mpsc::Receiver<(u32, SynRecvAnswer)>,
        mpsc::Receiver<(u32, SocketAddr, ControlRequest)>,
        mpsc::Receiver<(u32, ControlAnswer)>,
    );

    /// A datagram fixture: what it is, where it came from, its bytes, the bus's verdict.
    type Fixture = (&'static str, SocketAddr, Vec<u8>, Result<(), DropReason>);

    const PORT: u16 = 7400;
    const KEY: [u8; KEY_LEN] = [7; KEY_LEN];

    fn cluster_ring() -> Keyring {
        Keyring::new(&[(1, KEY)], None).unwrap()
    }

    fn bus() -> (Bus, Channels) {
        let nodes = crate::config::test_nodes(3);
        let (qtx, qrx) = mpsc::channel(4);
        let (atx, arx) = mpsc::channel(4);
        let (crtx, crrx) = mpsc::channel(4);
        let (catx, carx) = mpsc::channel(4);
        let b = Bus {
            node_id: 1,
            port: PORT,
            view: Arc::new(ClusterView::new(&nodes, 1)),
            role: Arc::new(RoleCell::default()),
            counters: Arc::new(ReportCounters::default()),
            epoch: Instant::now(),
            notice_interval: Duration::from_millis(200),
            members: None,
            routes: Routes {
                raft: None,
                raft_requests: None,
                syn_recv_queries: qtx,
                syn_recv_answers: atx,
                control_requests: crtx,
                control_answers: catx,
            },
            windows: HashMap::new(),
        };
        (b, (qrx, arx, crrx, carx))
    }

    fn env(from: u32, body: Body) -> Vec<u8> {
        Envelope {
            from,
            term: 1,
            body: Some(body),
        }
        .to_bytes()
    }

    fn report(established: u32) -> Body {
        Body::Report(NodeReport {
            established,
            syn_recv: 0,
            seq: 1,
            draining: false,
            load: 0,
            weight: None,
            unhealthy: false,
        })
    }

    fn sealed(ring: &Keyring, sender: u32, counter: u64, payload: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        ring.seal(sender, counter, payload, &mut wire);
        wire
    }

    fn addr(id: u32, port: u16) -> SocketAddr {
        SocketAddr::new(format!("198.51.100.1{id}").parse().unwrap(), port)
    }

    fn verdict(b: &mut Bus, from: SocketAddr, wire: &[u8]) -> Result<(), DropReason> {
        b.accept(&cluster_ring(), from, &mut wire.to_vec()).result
    }

    /// The fixture table: each datagram, where it came from, and what the bus makes of it.
    /// Every refusal happens before the envelope is decoded (the unsealed ones are valid
    /// envelopes of today's wire format, sent from a member's address and port).
    #[test]
    fn datagrams_are_opened_authenticated_and_replay_checked_before_decoding() {
        let ring = cluster_ring();
        let other_key = Keyring::new(&[(1, [8; KEY_LEN])], None).unwrap();
        let other_id = Keyring::new(&[(9, KEY)], None).unwrap();
        let good = env(2, report(7));
        let cases: Vec<Fixture> = vec![
            (
                "an unsealed envelope (the old wire format)",
                addr(2, PORT),
                good.clone(),
                Err(DropReason::BadHeader),
            ),
            (
                "an unsealed Raft message",
                addr(2, PORT),
                env(2, Body::Raft(vec![8, 1])),
                Err(DropReason::BadHeader),
            ),
            (
                "empty",
                addr(2, PORT),
                Vec::new(),
                Err(DropReason::BadHeader),
            ),
            (
                "shorter than a seal",
                addr(2, PORT),
                vec![1; OVERHEAD - 1],
                Err(DropReason::BadHeader),
            ),
            (
                "sealed, from another source port",
                addr(2, 40000),
                sealed(&ring, 2, 10, &good),
                Err(DropReason::SourcePort),
            ),
            (
                "another key with the same id",
                addr(2, PORT),
                sealed(&other_key, 2, 11, &good),
                Err(DropReason::BadTag),
            ),
            (
                "a key id this keyring lacks",
                addr(2, PORT),
                sealed(&other_id, 2, 12, &good),
                Err(DropReason::UnknownKey),
            ),
            (
                "sealed by 2, from 3's address",
                addr(3, PORT),
                sealed(&ring, 2, 13, &good),
                Err(DropReason::UnknownSender),
            ),
            (
                "sealed as this node",
                addr(1, PORT),
                sealed(&ring, 1, 14, &env(1, report(7))),
                Err(DropReason::UnknownSender),
            ),
            (
                "from a stranger's address",
                "198.51.100.99:7400".parse().unwrap(),
                sealed(&ring, 2, 15, &good),
                Err(DropReason::UnknownSender),
            ),
            (
                "sealed garbage",
                addr(2, PORT),
                sealed(&ring, 2, 16, b"\xff\xff\xff"),
                Err(DropReason::Undecodable),
            ),
            (
                "an envelope naming another sender",
                addr(2, PORT),
                sealed(&ring, 2, 17, &env(3, report(7))),
                Err(DropReason::Undecodable),
            ),
            (
                "a Raft message without a Raft task",
                addr(2, PORT),
                sealed(&ring, 2, 18, &env(2, Body::Raft(vec![1]))),
                Err(DropReason::NoOwner),
            ),
            (
                "a genuine report",
                addr(2, PORT),
                sealed(&ring, 2, 19, &good),
                Ok(()),
            ),
            (
                "the same report again",
                addr(2, PORT),
                sealed(&ring, 2, 19, &good),
                Err(DropReason::Replay),
            ),
            (
                "an older counter, inside the window",
                addr(2, PORT),
                sealed(&ring, 2, 5, &good),
                Ok(()),
            ),
        ];
        let (mut b, _) = bus();
        for (what, from, wire, want) in &cases {
            assert_eq!(verdict(&mut b, *from, wire), *want, "{what}");
        }
        // Only the genuine report reached the view.
        assert_eq!(b.view.nodes[1].established.load(Relaxed), 7);
        // Counted by reason; `rejected` is their sum.
        let d = &b.counters.drops;
        let by_reason = [
            (&d.bad_header, 4),
            (&d.source_port, 1),
            (&d.bad_tag, 1),
            (&d.unknown_key, 1),
            (&d.unknown_sender, 3),
            (&d.undecodable, 2),
            (&d.no_owner, 1),
            (&d.replay, 1),
        ];
        for (c, n) in by_reason {
            assert_eq!(c.load(Relaxed), n);
        }
        assert_eq!(b.counters.rejected.load(Relaxed), 14);
        assert_eq!(b.counters.received.load(Relaxed), 2);
    }

    /// Control requests and answers from a member are routed with the sender (and, for a
    /// request, the address to answer); the same request sealed by a stranger, from another
    /// member's address, or replayed never reaches the control task.
    #[test]
    fn control_requests_and_answers_reach_the_control_task_only_from_members() {
        let (mut b, (_, _, mut requests, mut answers)) = bus();
        let ring = cluster_ring();
        let q = ControlRequest {
            nonce: 5,
            request: r#"{"cmd":"drain","node":1}"#.into(),
        };
        let wire = sealed(&ring, 2, 10, &env(2, Body::ControlRequest(q.clone())));
        assert_eq!(verdict(&mut b, addr(2, PORT), &wire), Ok(()));
        assert_eq!(requests.try_recv().unwrap(), (2, addr(2, PORT), q.clone()));
        assert_eq!(
            verdict(&mut b, addr(2, PORT), &wire),
            Err(DropReason::Replay)
        );
        let forger = Keyring::new(&[(1, [9; KEY_LEN])], None).unwrap();
        let forged = sealed(&forger, 2, 11, &env(2, Body::ControlRequest(q.clone())));
        assert_eq!(
            verdict(&mut b, addr(2, PORT), &forged),
            Err(DropReason::BadTag)
        );
        let stranger = SocketAddr::new("198.51.100.99".parse().unwrap(), PORT);
        let from_stranger = sealed(&ring, 2, 12, &env(2, Body::ControlRequest(q)));
        assert_eq!(
            verdict(&mut b, stranger, &from_stranger),
            Err(DropReason::UnknownSender)
        );
        assert!(
            requests.try_recv().is_err(),
            "no refused request was routed"
        );
        let a = ControlAnswer {
            nonce: 5,
            reply: r#"{"done":"ok"}"#.into(),
        };
        let wire = sealed(&ring, 3, 10, &env(3, Body::ControlAnswer(a.clone())));
        assert_eq!(verdict(&mut b, addr(3, PORT), &wire), Ok(()));
        assert_eq!(answers.try_recv().unwrap(), (3, a));
    }

    /// A forged datagram is refused before it can touch a sender's replay window: it cannot
    /// slide the window forward and lock the genuine sender out.
    #[test]
    fn forgeries_do_not_move_the_replay_window() {
        let (mut b, _) = bus();
        let forger = Keyring::new(&[(1, [9; KEY_LEN])], None).unwrap();
        let good = env(2, report(1));
        assert_eq!(
            verdict(&mut b, addr(2, PORT), &sealed(&forger, 2, u64::MAX, &good)),
            Err(DropReason::BadTag)
        );
        assert_eq!(
            verdict(
                &mut b,
                addr(3, PORT),
                &sealed(&cluster_ring(), 2, u64::MAX, &good)
            ),
            Err(DropReason::UnknownSender)
        );
        assert_eq!(
            verdict(
                &mut b,
                addr(2, PORT),
                &sealed(&cluster_ring(), 2, 100, &good)
            ),
            Ok(())
        );
    }

    /// A restarted sender's counter starts at its clock, past everything it sent before, so
    /// its peers' windows take it; a sender whose clock stepped back is refused until it
    /// catches up (and counted as a replay).
    #[test]
    fn a_restarted_peer_is_accepted_and_a_clock_stepped_back_is_refused() {
        let (mut b, _) = bus();
        let ring = cluster_ring();
        let second = 1_000_000_000;
        let send = |b: &mut Bus, c: &mut SendCounter| {
            let wire = sealed(&ring, 2, c.next().unwrap(), &env(2, report(1)));
            verdict(b, addr(2, PORT), &wire)
        };
        let mut first_run = SendCounter::starting_at(1_700_000_000 * second);
        for _ in 0..1000 {
            assert_eq!(send(&mut b, &mut first_run), Ok(()));
        }
        // Restarted two seconds later.
        let mut second_run = SendCounter::starting_at(1_700_000_002 * second);
        assert_eq!(send(&mut b, &mut second_run), Ok(()));
        // Restarted with a clock a minute behind: every datagram is refused as a replay.
        let mut stepped_back = SendCounter::starting_at(1_699_999_942 * second);
        for _ in 0..10 {
            assert_eq!(send(&mut b, &mut stepped_back), Err(DropReason::Replay));
        }
        assert_eq!(b.counters.drops.replay.load(Relaxed), 10);
    }

    /// SYN-RECV queries and answers pass the same checks as reports and reach their owners.
    #[test]
    fn syn_recv_queries_and_answers_are_routed() {
        let (mut b, (mut queries, mut answers, _, _)) = bus();
        let ring = cluster_ring();
        let query = env(2, Body::SynRecvQuery(SynRecvQuery { nonce: 5 }));
        assert_eq!(
            verdict(&mut b, addr(2, PORT), &sealed(&ring, 2, 1, &query)),
            Ok(())
        );
        assert_eq!(queries.try_recv().unwrap(), (addr(2, PORT), 5));
        assert!(queries.try_recv().is_err());
        let answer = SynRecvAnswer {
            nonce: 5,
            sockets: Vec::new(),
            truncated: false,
        };
        let wire = sealed(&ring, 2, 2, &env(2, Body::SynRecvAnswer(answer.clone())));
        assert_eq!(verdict(&mut b, addr(2, PORT), &wire), Ok(()));
        assert_eq!(answers.try_recv().unwrap(), (2, answer));
    }

    /// What goes out of the cluster socket is sealed with this node's id and the cluster
    /// key, with a fresh counter per datagram, and opens to the payload given.
    #[tokio::test]
    async fn every_send_is_sealed() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sock = ClusterSocket::new(tx, 2, cluster_ring(), 1_000);
        let to = rx.local_addr().unwrap();
        let payload = env(2, report(3));
        sock.send_to(&payload, to).await.unwrap();
        sock.send_to(&payload, to).await.unwrap();
        let ring = cluster_ring();
        let mut counters = Vec::new();
        for _ in 0..2 {
            let mut buf = vec![0u8; 2048];
            let (n, _) = rx.recv_from(&mut buf).await.unwrap();
            assert_ne!(
                &buf[..payload.len().min(n)],
                &payload[..],
                "not sent in the clear"
            );
            let opened = ring.open(&mut buf[..n]).unwrap();
            assert_eq!((opened.sender, opened.payload), (2, &payload[..]));
            counters.push(opened.counter);
        }
        assert_eq!(counters, [1_000, 1_001]);
    }
}
