//! Liveness and load reports between nodes (UDP, prost [`Envelope`]s).
//!
//! Every `health.report_interval_ms` each node counts its sockets on the VIP (sock_diag) and
//! sends a [`NodeReport`] to every other node. A node whose reports stop for
//! `health.dead_after_ms` is marked dead, and the master stops dispatching to it; its next
//! report brings it back. Reports are accepted only from a member's address with that
//! member's id.
//!
//! The same socket carries the Raft election's messages (`Body::Raft`): the receive loop
//! authenticates them the same way and hands them to the Raft task through a bounded channel
//! (a full channel drops the message, as a lossy network would; Raft retransmits).
//! A new master's SYN-RECV queries and the members' answers (`crate::cluster::takeover`) travel the
//! same way and pass the same check.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tdsc_proto::control::{Body, Envelope, NodeReport, Removed, SynRecvAnswer, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::cluster::membership::Members;
use crate::cluster::raft::MemberRequest;
use crate::cluster::view::ClusterView;
use crate::datapath::queue::RoleCell;
use crate::host::sockdiag::SockDiag;

#[derive(Debug, Default)]
pub struct ReportCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub rejected: AtomicU64,
}

#[derive(Debug)]
pub struct Reporter {
    pub node_id: u32,
    pub vip: IpAddr,
    pub port: u16,
    pub interval: Duration,
    pub dead_after: Duration,
    pub view: Arc<ClusterView>,
    pub role: Arc<RoleCell>,
    pub counters: Arc<ReportCounters>,
    pub epoch: Instant,
    /// Where `Body::Raft` messages go: (sender id, raft bytes). None in static mode.
    pub raft_inbox: Option<tokio::sync::mpsc::Sender<(u32, Vec<u8>)>>,
    /// Under Raft: the current members (to tell a removed node so) and the Raft task's
    /// request channel (to hand it a `Body::Removed` notice about this node).
    pub membership: Option<(watch::Receiver<Members>, mpsc::Sender<MemberRequest>)>,
    /// Where SYN-RECV queries go: (querier's address, nonce). None: not answered.
    pub syn_recv_queries: Option<tokio::sync::mpsc::Sender<(SocketAddr, u64)>>,
    /// Where answers to this node's SYN-RECV queries go: (member id, answer).
    pub syn_recv_answers: Option<tokio::sync::mpsc::Sender<(u32, SynRecvAnswer)>>,
}

/// Milliseconds since `epoch`, never 0 (0 means "never seen").
fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Reporter {
    pub async fn bind(&self) -> std::io::Result<UdpSocket> {
        UdpSocket::bind(SocketAddr::new(self.view.own().address(), self.port)).await
    }

    /// Applies one received datagram to the view. Returns whether it was accepted.
    pub fn accept(&self, from: SocketAddr, buf: &[u8]) -> bool {
        let Ok(env) = Envelope::from_bytes(buf) else {
            return false;
        };
        let Some(i) = self.view.index_of_address(&from.ip()) else {
            return false;
        };
        let slot = &self.view.nodes[i];
        if slot.id() != env.from || i == self.view.self_index {
            return false;
        }
        if let Some(Body::Removed(r)) = env.body {
            return match &self.membership {
                Some((_, tx)) => tx
                    .try_send(MemberRequest::Removed {
                        from: env.from,
                        index: r.index,
                        voters: r.voters,
                    })
                    .is_ok(),
                None => false,
            };
        }
        if let Some(Body::SynRecvQuery(q)) = env.body {
            return self
                .syn_recv_queries
                .as_ref()
                .is_some_and(|tx| tx.try_send((from, q.nonce)).is_ok());
        }
        if let Some(Body::SynRecvAnswer(a)) = env.body {
            return self
                .syn_recv_answers
                .as_ref()
                .is_some_and(|tx| tx.try_send((env.from, a)).is_ok());
        }
        if let Some(Body::Raft(bytes)) = env.body {
            return match &self.raft_inbox {
                Some(tx) => tx.try_send((env.from, bytes)).is_ok(),
                None => false,
            };
        }
        if let Some(Body::Report(r)) = env.body {
            slot.established.store(r.established, Relaxed);
            slot.syn_recv.store(r.syn_recv, Relaxed);
            slot.draining.store(r.draining, Relaxed);
            slot.load.store(r.load, Relaxed);
            if let Some(w) = r.weight {
                slot.weight.store(w, Relaxed);
            }
            slot.last_seen_ms.store(now_ms(self.epoch), Relaxed);
            slot.report_gen.fetch_add(1, Relaxed);
            if !slot.alive.swap(true, Relaxed) {
                tracing::info!(node = slot.id(), "node is alive");
            }
        }
        true
    }

    /// The notice for a datagram from a node that this node has removed (its address and id
    /// match an absent slot), or None. Such a node missed the commit of its removal; the
    /// notice lets it leave the group instead of carrying on as a member nobody listens to.
    pub fn removal_notice(&self, from: SocketAddr, buf: &[u8]) -> Option<Vec<u8>> {
        let (members, _) = self.membership.as_ref()?;
        let env = Envelope::from_bytes(buf).ok()?;
        let known = self.view.slots().iter().any(|s| {
            !s.is_present()
                && s.ident()
                    .is_some_and(|i| i.id == env.from && i.address == from.ip())
        });
        let m = members.borrow();
        if !known || m.contains(env.from) || !m.contains(self.node_id) {
            return None;
        }
        let notice = Envelope {
            from: self.node_id,
            term: self.role.term.load(Relaxed),
            body: Some(Body::Removed(Removed {
                index: m.index,
                voters: m.ids(),
            })),
        };
        Some(notice.to_bytes())
    }

    /// Marks nodes dead whose reports stopped.
    pub fn sweep(&self) {
        let now = now_ms(self.epoch);
        let dead_ms = u64::try_from(self.dead_after.as_millis()).unwrap_or(u64::MAX);
        for (i, slot) in self.view.slots().iter().enumerate() {
            if i == self.view.self_index || !slot.is_present() {
                continue;
            }
            let seen = slot.last_seen_ms.load(Relaxed);
            if slot.alive.load(Relaxed) && (seen == 0 || now.saturating_sub(seen) > dead_ms) {
                slot.alive.store(false, Relaxed);
                tracing::warn!(
                    node = slot.id(),
                    "no report for {dead_ms} ms: node marked dead"
                );
            }
        }
    }

    /// Where reports go: every present node but this one.
    fn peers(&self) -> Vec<SocketAddr> {
        self.view
            .slots()
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != self.view.self_index && n.is_present())
            .map(|(_, n)| SocketAddr::new(n.address(), self.port))
            .collect()
    }

    pub async fn run(self, sock: Arc<UdpSocket>) {
        let rx = {
            let sock = sock.clone();
            let me = Arc::new(self);
            let me2 = me.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                // When each removed node was last told so (ms): once per report interval.
                let mut told: std::collections::HashMap<IpAddr, u64> = Default::default();
                let every = u64::try_from(me2.interval.as_millis()).unwrap_or(u64::MAX);
                loop {
                    match sock.recv_from(&mut buf).await {
                        Ok((n, from)) => {
                            let c = if me2.accept(from, &buf[..n]) {
                                &me2.counters.received
                            } else {
                                &me2.counters.rejected
                            };
                            c.fetch_add(1, Relaxed);
                            let now = now_ms(me2.epoch);
                            let due = told
                                .get(&from.ip())
                                .is_none_or(|t| now.saturating_sub(*t) >= every);
                            if due {
                                if let Some(notice) = me2.removal_notice(from, &buf[..n]) {
                                    told.insert(from.ip(), now);
                                    let _ = sock.send_to(&notice, from).await;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "report receive failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            me
        };
        let me = rx;
        let mut diag = match SockDiag::open() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(error = %e, "sock_diag unavailable: connection counts will read 0");
                None
            }
        };
        let mut tick = tokio::time::interval(me.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            tick.tick().await;
            let counts = diag
                .as_mut()
                .and_then(|d| d.count(&me.vip).ok())
                .unwrap_or_default();
            let own = me.view.own();
            own.established.store(counts.established, Relaxed);
            own.syn_recv.store(counts.syn_recv, Relaxed);
            own.report_gen.fetch_add(1, Relaxed);
            seq += 1;
            let env = Envelope::report(
                me.node_id,
                me.role.term.load(Relaxed),
                NodeReport {
                    established: counts.established,
                    syn_recv: counts.syn_recv,
                    seq,
                    draining: own.draining.load(Relaxed),
                    load: own.load.load(Relaxed),
                    weight: Some(own.weight.load(Relaxed)),
                },
            );
            let bytes = env.to_bytes();
            // Read every round: membership changes add and remove destinations.
            for p in me.peers() {
                if sock.send_to(&bytes, p).await.is_ok() {
                    me.counters.sent.fetch_add(1, Relaxed);
                }
            }
            me.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdsc_proto::control::SynRecvQuery;

    type Channels = (
        tokio::sync::mpsc::Receiver<(SocketAddr, u64)>,
        tokio::sync::mpsc::Receiver<(u32, SynRecvAnswer)>,
    );

    fn reporter() -> (Reporter, Channels) {
        let nodes = crate::config::test_nodes(3);
        let (qtx, qrx) = tokio::sync::mpsc::channel(4);
        let (atx, arx) = tokio::sync::mpsc::channel(4);
        let r = Reporter {
            node_id: 1,
            vip: "192.0.2.1".parse().unwrap(),
            port: 7400,
            interval: Duration::from_millis(200),
            dead_after: Duration::from_millis(1000),
            view: Arc::new(ClusterView::new(&nodes, 1)),
            role: Arc::new(RoleCell::default()),
            counters: Arc::new(ReportCounters::default()),
            epoch: Instant::now(),
            raft_inbox: None,
            membership: None,
            syn_recv_queries: Some(qtx),
            syn_recv_answers: Some(atx),
        };
        (r, (qrx, arx))
    }

    fn env(from: u32, body: Body) -> Vec<u8> {
        Envelope {
            from,
            term: 1,
            body: Some(body),
        }
        .to_bytes()
    }

    /// SYN-RECV queries and answers pass the same check as reports: a member's address with
    /// that member's id.
    #[test]
    fn syn_recv_queries_and_answers_are_authenticated_and_routed() {
        let (r, (mut queries, mut answers)) = reporter();
        let n2: SocketAddr = "198.51.100.12:7400".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.99:7400".parse().unwrap();
        let query = Body::SynRecvQuery(SynRecvQuery { nonce: 5 });
        assert!(
            !r.accept(stranger, &env(2, query.clone())),
            "unknown address"
        );
        assert!(!r.accept(n2, &env(3, query.clone())), "id of another node");
        assert!(r.accept(n2, &env(2, query)));
        assert_eq!(queries.try_recv().unwrap(), (n2, 5));
        assert!(queries.try_recv().is_err());
        let answer = SynRecvAnswer {
            nonce: 5,
            sockets: Vec::new(),
            truncated: false,
        };
        assert!(!r.accept(stranger, &env(2, Body::SynRecvAnswer(answer.clone()))));
        assert!(r.accept(n2, &env(2, Body::SynRecvAnswer(answer.clone()))));
        assert_eq!(answers.try_recv().unwrap(), (2, answer));
    }
}
