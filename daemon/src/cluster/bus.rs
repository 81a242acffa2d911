//! The cluster socket (UDP, `control_port`) and its receive loop: one socket carries five
//! kinds of message between nodes, and this loop is the one place that reads it.
//!
//! For every datagram the loop decodes the [`Envelope`] once, authenticates the sender (a
//! present member's address, with that member's id, and not this node), and routes the body
//! by kind to its owner:
//!
//! | body | owner | how |
//! |---|---|---|
//! | `Report` | liveness and load (`crate::cluster::report`) | applied in place: a few atomic stores to the sender's view slot |
//! | `Raft` | the Raft task | its inbox channel |
//! | `Removed` | the Raft task (membership) | its request channel |
//! | `SynRecvQuery` | the answering task (`crate::cluster::takeover`) | its channel |
//! | `SynRecvAnswer` | the takeover, in the role shell | its channel |
//!
//! Channels are bounded and never waited on: a full or closed one drops the message and
//! counts it rejected, as a lossy network would (Raft retransmits, a query is re-sent at the
//! next takeover). Reports are applied in place rather than queued: liveness must not wait
//! behind anything.
//!
//! The loop also answers a datagram from a node this node has removed with a `Removed`
//! notice (at most once per report interval per address): such a node missed the commit of
//! its removal, and the notice lets it leave the group instead of carrying on as a member
//! nobody listens to.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tdsc_proto::control::{Body, Envelope, Removed, SynRecvAnswer, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::cluster::counters::ReportCounters;
use crate::cluster::membership::Members;
use crate::cluster::raft::{MemberRequest, RaftRequest};
use crate::cluster::report::{self, now_ms};
use crate::cluster::role::RoleCell;
use crate::cluster::view::ClusterView;
use crate::shutdown::Shutdown;

/// Binds the cluster socket on this node's cluster address.
pub async fn bind(view: &ClusterView, port: u16) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::new(view.own().address(), port)).await
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
}

/// The receive loop's state. Owned by the bus task; ends at its shutdown signal.
#[derive(Debug)]
pub struct Bus {
    pub node_id: u32,
    /// Read to authenticate senders; peers' report fields are written here (see module docs).
    pub view: Arc<ClusterView>,
    /// Read for the term a `Removed` notice carries.
    pub role: Arc<RoleCell>,
    /// `received` and `rejected` are this loop's.
    pub counters: Arc<ReportCounters>,
    /// The clock of `last_seen_ms` (shared with the report sweep).
    pub epoch: Instant,
    /// How often a removed node is told so, at most.
    pub notice_interval: Duration,
    /// Under Raft: the current members, to tell a removed node so. None: no notices.
    pub members: Option<watch::Receiver<Members>>,
    pub routes: Routes,
}

impl Bus {
    /// Decodes, authenticates and routes one datagram. Returns the sender's claimed id if the
    /// envelope decoded, and whether it was accepted.
    pub fn accept(&self, from: SocketAddr, buf: &[u8]) -> (Option<u32>, bool) {
        let Ok(env) = Envelope::from_bytes(buf) else {
            return (None, false);
        };
        let sender = env.from;
        (Some(sender), self.route(from, env))
    }

    fn route(&self, from: SocketAddr, env: Envelope) -> bool {
        let Some(i) = self.view.index_of_address(&from.ip()) else {
            return false;
        };
        let slot = &self.view.nodes[i];
        if slot.id() != env.from || i == self.view.self_index {
            return false;
        }
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

    /// Receives until `shutdown`.
    pub async fn run(self, sock: Arc<UdpSocket>, mut shutdown: Shutdown) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        // When each removed node was last told so (ms): once per notice interval.
        let mut told: HashMap<IpAddr, u64> = HashMap::new();
        let every = u64::try_from(self.notice_interval.as_millis()).unwrap_or(u64::MAX);
        loop {
            let received = tokio::select! {
                r = sock.recv_from(&mut buf) => r,
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
            let (sender, accepted) = self.accept(from, &buf[..n]);
            let c = if accepted {
                &self.counters.received
            } else {
                &self.counters.rejected
            };
            c.fetch_add(1, Relaxed);
            let Some(sender) = sender else { continue };
            let now = now_ms(self.epoch);
            let due = told
                .get(&from.ip())
                .is_none_or(|t| now.saturating_sub(*t) >= every);
            if due {
                if let Some(notice) = self.removal_notice(from, sender) {
                    told.insert(from.ip(), now);
                    let _ = sock.send_to(&notice, from).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdsc_proto::control::SynRecvQuery;

    type Channels = (
        mpsc::Receiver<(SocketAddr, u64)>,
        mpsc::Receiver<(u32, SynRecvAnswer)>,
    );

    fn bus() -> (Bus, Channels) {
        let nodes = crate::config::test_nodes(3);
        let (qtx, qrx) = mpsc::channel(4);
        let (atx, arx) = mpsc::channel(4);
        let b = Bus {
            node_id: 1,
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
            },
        };
        (b, (qrx, arx))
    }

    fn env(from: u32, body: Body) -> Vec<u8> {
        Envelope {
            from,
            term: 1,
            body: Some(body),
        }
        .to_bytes()
    }

    fn accepted(b: &Bus, from: SocketAddr, buf: &[u8]) -> bool {
        b.accept(from, buf).1
    }

    /// SYN-RECV queries and answers pass the same check as reports: a member's address with
    /// that member's id.
    #[test]
    fn syn_recv_queries_and_answers_are_authenticated_and_routed() {
        let (b, (mut queries, mut answers)) = bus();
        let n2: SocketAddr = "198.51.100.12:7400".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.99:7400".parse().unwrap();
        let query = Body::SynRecvQuery(SynRecvQuery { nonce: 5 });
        assert!(
            !accepted(&b, stranger, &env(2, query.clone())),
            "unknown address"
        );
        assert!(
            !accepted(&b, n2, &env(3, query.clone())),
            "id of another node"
        );
        assert!(accepted(&b, n2, &env(2, query)));
        assert_eq!(queries.try_recv().unwrap(), (n2, 5));
        assert!(queries.try_recv().is_err());
        let answer = SynRecvAnswer {
            nonce: 5,
            sockets: Vec::new(),
            truncated: false,
        };
        assert!(!accepted(
            &b,
            stranger,
            &env(2, Body::SynRecvAnswer(answer.clone()))
        ));
        assert!(accepted(
            &b,
            n2,
            &env(2, Body::SynRecvAnswer(answer.clone()))
        ));
        assert_eq!(answers.try_recv().unwrap(), (2, answer));
    }

    /// Reports pass the same check and land in the sender's slot; Raft messages without a
    /// Raft task are refused.
    #[test]
    fn reports_are_applied_and_unrouted_kinds_refused() {
        let (b, _) = bus();
        let n2: SocketAddr = "198.51.100.12:7400".parse().unwrap();
        let rep = |established| {
            Body::Report(tdsc_proto::control::NodeReport {
                established,
                syn_recv: 0,
                seq: 1,
                draining: false,
                load: 0,
                weight: None,
            })
        };
        assert!(!accepted(&b, n2, &env(3, rep(7))), "id of another node");
        assert_eq!(b.view.nodes[1].established.load(Relaxed), 0);
        assert!(accepted(&b, n2, &env(2, rep(7))));
        assert_eq!(b.view.nodes[1].established.load(Relaxed), 7);
        assert!(b.view.nodes[1].alive.load(Relaxed));
        assert!(!accepted(&b, n2, &env(2, Body::Raft(vec![1]))));
        assert!(!accepted(&b, n2, b"not an envelope"));
    }
}
