//! The master path: a dedicated thread takes SYNs off the NFQUEUE, asks the SYN-path core
//! ([`crate::datapath::syn_path`]: lease, classifier, dispatcher, encoding), and carries out
//! its verdict: re-inject the SYN into the local stack through a raw socket (as a member
//! does; never an NFQUEUE ACCEPT, see `crate::datapath::syn_path`), or send the forward as
//! protocol 253, and drop the queued original either way.
//!
//! The hot path (one loop iteration) does not allocate and takes no lock: the packet buffer
//! belongs to the nfq crate and is reused while every message is given its verdict before the
//! next `recv`; the forward buffer and the destination addresses are prepared once; shared
//! state is atomics; commands from the control socket arrive through a channel polled with
//! `try_recv`.

use std::net::IpAddr;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use nfq::{Queue, Verdict};
use tdsc_proto::forward::MAX_OVERHEAD;
use tdsc_proto::seal::{Keyring, SendCounter};

use crate::cluster::counters::{add, Counters};
use crate::cluster::role::RoleCell;
use crate::cluster::view::ClusterView;
use crate::config::Config;
use crate::datapath::dispatch::Dispatcher;
use crate::datapath::policy::Policy;
use crate::datapath::rawsock::{Dest, RawSocket};
use crate::datapath::syn_path::{Origin, SynPath, Verdict as SynVerdict};
use crate::shutdown::StopFlag;
use crate::watchdog::Heartbeat;

/// Commands for the master thread.
#[derive(Debug)]
pub enum MasterCommand {
    SetPolicy(Box<dyn Policy>),
    /// Records a new master takes over (replica + SYN-RECV reconciliation), sent before the
    /// master ruleset goes in, so it is processed before the first queued SYN.
    Adopt(Vec<crate::datapath::records::RecordEntry>),
}

/// Kernel queue length before new SYNs are dropped: about 20 ms of SYNs at 200k/s.
pub const QUEUE_MAX_LEN: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("cannot open or configure NFQUEUE {queue}")]
    Queue {
        queue: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the forward socket")]
    Socket(#[source] std::io::Error),
}

pub struct MasterPath {
    queue: Queue,
    queue_num: u16,
    /// The per-SYN decision and encoding; everything here around it is I/O.
    core: SynPath,
    counters: Arc<Counters>,
    role: Arc<RoleCell>,
    commands: Receiver<MasterCommand>,
    heartbeat: Arc<Heartbeat>,
    dests: Vec<Option<Dest>>,
    socket_v4: Option<RawSocket>,
    socket_v6: Option<RawSocket>,
    /// Writes the SYNs this node keeps, rebuilt whole, for local delivery (via `lo`).
    inject: RawSocket,
    inject_to: Dest,
    buf: Box<[u8]>,
}

impl std::fmt::Debug for MasterPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterPath")
            .field("queue_num", &self.queue_num)
            .finish_non_exhaustive()
    }
}

/// What the master thread shares with the rest of the node.
#[derive(Debug)]
pub struct MasterLinks {
    /// Read per SYN (eligibility, addresses); written by the Raft task, the bus and the
    /// control socket.
    pub view: Arc<ClusterView>,
    /// The master path's counters are this thread's.
    pub counters: Arc<Counters>,
    /// Read per SYN: the master flag, the lease, the term to stamp.
    pub role: Arc<RoleCell>,
    /// Policy switches and adoptions; polled before each SYN.
    pub commands: Receiver<MasterCommand>,
    pub dispatcher: Dispatcher,
    /// This thread's progress, for the watchdog (`crate::watchdog`): waiting before each
    /// receive, a beat after each verdict.
    pub heartbeat: Arc<Heartbeat>,
    /// The cluster keyring every forward is tagged with (read only; the same `Arc` as the
    /// cluster socket's and the member path's).
    pub keyring: Arc<Keyring>,
}

impl MasterPath {
    /// Binds the queue now, so that a failure shows at start-up rather than at first SYN.
    pub fn new(cfg: &Config, links: MasterLinks) -> Result<Self, MasterError> {
        let MasterLinks {
            view,
            counters,
            role,
            commands,
            dispatcher,
            heartbeat,
            keyring,
        } = links;
        let (queue_num, vip, ports, self_id) =
            (cfg.queue_num, cfg.vip, cfg.tcp_ports.clone(), cfg.node_id);
        let q = |source| MasterError::Queue {
            queue: queue_num,
            source,
        };
        let mut queue = Queue::open().map_err(q)?;
        queue.bind(queue_num).map_err(q)?;
        // Room for the largest SYN (TCP Fast Open data up to the MTU, or more with GRO).
        queue.set_copy_range(queue_num, 0xffff).map_err(q)?;
        queue
            .set_queue_max_len(queue_num, QUEUE_MAX_LEN)
            .map_err(q)?;
        // Fail closed: when the queue is full the kernel drops the SYN (the client
        // retransmits) instead of accepting it on this node behind the policy's back.
        queue.set_fail_open(queue_num, false).map_err(q)?;
        // One destination per slot, filled in on the first forward to it: a slot's address
        // never changes once set (see `ClusterView`), so it is computed at most once.
        let dests = vec![None; view.nodes.len()];
        let is_v6: Vec<bool> = view.slots().iter().map(|n| n.address().is_ipv6()).collect();
        let socket_v4 = if is_v6.iter().any(|v| !v) {
            Some(RawSocket::forward(&IpAddr::from([0u8; 4])).map_err(MasterError::Socket)?)
        } else {
            None
        };
        let socket_v6 = if is_v6.iter().any(|v| *v) {
            Some(RawSocket::forward(&IpAddr::from([0u8; 16])).map_err(MasterError::Socket)?)
        } else {
            None
        };
        let inject = RawSocket::inject(&vip).map_err(MasterError::Socket)?;
        let inject_to = Dest::new(&vip);
        let core = SynPath::new(
            vip,
            ports,
            Origin {
                id: self_id,
                keyring,
                counter: SendCounter::starting_at(crate::cluster::bus::unix_nanos()),
            },
            view,
            counters.clone(),
            role.clone(),
            dispatcher,
        );
        Ok(MasterPath {
            queue,
            queue_num,
            core,
            counters,
            role,
            commands,
            heartbeat,
            dests,
            socket_v4,
            socket_v6,
            inject,
            inject_to,
            buf: vec![0u8; MAX_OVERHEAD + 0x10000].into_boxed_slice(),
        })
    }

    /// Runs until `stop`. While this node is a member nothing is queued and the thread sleeps
    /// in `recv`, which has no timeout: the thread is spawned interruptible
    /// (`crate::shutdown::ThreadHandle::spawn_interruptible`), so a stop wakes that `recv`
    /// with `EINTR` and the loop sees the flag.
    pub fn run(mut self, stop: &StopFlag) {
        tracing::info!(queue = self.queue_num, "master path ready");
        while !stop.is_set() {
            self.heartbeat.waiting(self.role.now_ms());
            let mut msg = match self.queue.recv() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "nfqueue receive failed");
                    continue;
                }
            };
            while let Ok(cmd) = self.commands.try_recv() {
                match cmd {
                    MasterCommand::SetPolicy(p) => {
                        tracing::info!(policy = p.name().as_str(), "policy switched");
                        self.core.set_policy(p);
                    }
                    MasterCommand::Adopt(entries) => {
                        self.core.adopt(&entries);
                        tracing::info!(records = entries.len(), "records adopted");
                    }
                }
            }
            let verdict = self.handle(msg.get_payload());
            msg.set_verdict(verdict);
            if let Err(e) = self.queue.verdict(msg) {
                tracing::warn!(error = %e, "nfqueue verdict failed");
            }
            self.heartbeat.beat(self.role.now_ms());
        }
    }

    /// Carries out the core's verdict for one queued packet.
    fn handle(&mut self, pkt: &[u8]) -> Verdict {
        match self.core.on_syn(pkt, self.role.now_ms(), &mut self.buf) {
            SynVerdict::Inject { len } => {
                if let Err(e) = self.inject.send_to(&self.buf[..len], &self.inject_to) {
                    add(&self.counters.reinject_errors);
                    tracing::warn!(error = %e, "re-injection of a kept SYN failed");
                }
                // Dropped here either way, as after a forward.
                Verdict::Drop
            }
            SynVerdict::Drop(_) => Verdict::Drop,
            SynVerdict::Forward {
                index, dest, len, ..
            } => {
                let sock = if dest.is_ipv6() {
                    &self.socket_v6
                } else {
                    &self.socket_v4
                };
                let to = self.dests[index].get_or_insert_with(|| Dest::new(&dest));
                let sent = sock
                    .as_ref()
                    .and_then(|s| s.send_to(&self.buf[..len], to).ok());
                if sent.is_some() {
                    add(&self.counters.forwarded_out);
                } else {
                    add(&self.counters.forward_send_errors);
                }
                // Dropped here either way: if the forward failed the client retransmits,
                // and the record sends the retransmission to the same node.
                Verdict::Drop
            }
        }
    }
}
