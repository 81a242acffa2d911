//! The master path: a dedicated thread takes SYNs off the NFQUEUE, asks the SYN-path core
//! ([`crate::datapath::syn_path`]: lease, classifier, dispatcher, encoding), and carries out
//! its verdict: re-inject the SYN into the local stack through a raw socket (as a member
//! does; never an NFQUEUE ACCEPT, see `crate::datapath::syn_path`), or send the forward as
//! protocol 253, and drop the queued original either way.
//!
//! Two readers, as `[threads] queue_io` chooses: `per-packet` (the nfq crate: one `recv`, one
//! forward `sendto` and one verdict per SYN) and `batched`
//! ([`crate::datapath::queue_socket`]: every waiting SYN in one `recvmmsg`, each decided as it
//! is read into an output slot of its own, then the batch's forwards in one `sendmmsg` per
//! family, its re-injections in one more, and all its verdicts in one datagram).
//!
//! The hot path does not allocate and takes no lock: the receive and output buffers are
//! allocated once; the destination addresses are prepared once; shared state is atomics;
//! commands from the control socket arrive through a channel polled with `try_recv` once per
//! receive.

use std::net::IpAddr;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use std::sync::atomic::Ordering::Relaxed;

use nfq::{Queue, Verdict as NfqVerdict};
use tdsc_proto::forward::MAX_OVERHEAD;
use tdsc_proto::seal::{Keyring, SendCounter};

use crate::cluster::counters::{add, Counters};
use crate::cluster::role::RoleCell;
use crate::cluster::view::ClusterView;
use crate::config::{Config, QueueIo};
use crate::datapath::dispatch::Dispatcher;
use crate::datapath::nfqueue::{self, Message, Verdict, VerdictBatch, VERDICT_MSG_LEN};
use crate::datapath::policy::Policy;
use crate::datapath::queue_socket::{
    rcvbuf_for, QueueOptions, QueueSocket, RecvBatch, MAX_BATCH, RECV_BUF_LEN,
};
use crate::datapath::rawsock::{Dest, RawSocket};
use crate::datapath::syn_path::{Origin, SynPath, Verdict as SynVerdict};
use crate::shutdown::StopFlag;
use crate::watchdog::Heartbeat;

/// Commands for the master thread.
#[derive(Debug)]
pub enum MasterCommand {
    SetPolicy(Box<dyn Policy>),
    /// New client-affinity settings (`None`: off), applied at `now_ms` on the lease clock.
    SetAffinity {
        settings: Option<crate::datapath::sticky::AffinitySettings>,
        now_ms: u64,
    },
    /// Records a new master takes over (replica + SYN-RECV reconciliation) and the replica's
    /// client-affinity entries, sent before the master ruleset goes in, so they are processed
    /// before the first queued SYN.
    Adopt {
        records: Vec<crate::datapath::records::RecordEntry>,
        affinity: Vec<crate::datapath::records::RecordEntry>,
    },
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
    io: Io,
    path: Path,
}

/// The queue socket, as `[threads] queue_io` chose.
enum Io {
    Batched(Box<Batched>),
    PerPacket(Queue),
}

/// Everything around the queue: the core and the sockets its verdicts are carried out on.
struct Path {
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
    /// The per-packet path's output buffer.
    buf: Box<[u8]>,
}

/// The batched path's socket and buffers, allocated once.
struct Batched {
    sock: QueueSocket,
    rx: RecvBatch,
    out: Outbox,
}

/// What one batch sends once it has been decided: one output buffer per packet, the queued
/// packets to give a verdict, and the sends waiting for their `sendmmsg`.
struct Outbox {
    bufs: Vec<Box<[u8]>>,
    verdict_buf: Box<[u8]>,
    /// (queue, packet id), in arrival order; at most [`MAX_BATCH`].
    ids: Vec<(u16, u32)>,
    sends: Vec<Pending>,
    /// `RecvBatch::truncated` already counted.
    truncated_seen: u64,
}

/// A packet waiting in `Outbox::bufs[slot]`.
#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: usize,
    len: usize,
    to: Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Re-injection of a kept SYN.
    Local,
    /// A forward to the node in this view slot.
    Forward { index: usize, v6: bool },
}

// A batch's forwards to one family fit one `send_many` call.
const _: () = assert!(crate::datapath::rawsock::MAX_SEND_BATCH >= MAX_BATCH);

impl std::fmt::Debug for MasterPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterPath")
            .field("queue_num", &self.path.queue_num)
            .field(
                "io",
                &match self.io {
                    Io::Batched(_) => QueueIo::Batched,
                    Io::PerPacket(_) => QueueIo::PerPacket,
                },
            )
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
        let io = match cfg.queue_io {
            QueueIo::Batched => {
                let sock = QueueSocket::open(
                    queue_num,
                    &QueueOptions {
                        max_len: QUEUE_MAX_LEN,
                        rcvbuf: rcvbuf_for(QUEUE_MAX_LEN),
                    },
                )
                .map_err(q)?;
                Io::Batched(Box::new(Batched {
                    sock,
                    rx: RecvBatch::new(MAX_BATCH),
                    out: Outbox {
                        bufs: (0..MAX_BATCH)
                            .map(|_| vec![0u8; MAX_OVERHEAD + RECV_BUF_LEN].into_boxed_slice())
                            .collect(),
                        verdict_buf: vec![0u8; MAX_BATCH * VERDICT_MSG_LEN].into_boxed_slice(),
                        ids: Vec::with_capacity(MAX_BATCH),
                        sends: Vec::with_capacity(MAX_BATCH),
                        truncated_seen: 0,
                    },
                }))
            }
            QueueIo::PerPacket => {
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
                Io::PerPacket(queue)
            }
        };
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
            io,
            path: Path {
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
            },
        })
    }

    /// Runs until `stop`. While this node is a member nothing is queued and the thread sleeps
    /// in its receive, which has no timeout: the thread is spawned interruptible
    /// (`crate::shutdown::ThreadHandle::spawn_interruptible`), so a stop wakes that receive
    /// with `EINTR` and the loop sees the flag.
    pub fn run(self, stop: &StopFlag) {
        let MasterPath { io, mut path } = self;
        match io {
            Io::Batched(mut b) => {
                tracing::info!(queue = path.queue_num, io = "batched", "master path ready");
                path.run_batched(&mut b, stop);
            }
            Io::PerPacket(queue) => {
                tracing::info!(
                    queue = path.queue_num,
                    io = "per-packet",
                    "master path ready"
                );
                path.run_per_packet(queue, stop);
            }
        }
    }
}

impl Path {
    fn poll_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                MasterCommand::SetPolicy(p) => {
                    tracing::info!(policy = p.name().as_str(), "policy switched");
                    self.core.set_policy(p);
                }
                MasterCommand::SetAffinity { settings, now_ms } => {
                    self.core.set_affinity(settings.as_ref(), now_ms);
                    tracing::info!(
                        affinity =
                            crate::datapath::sticky::AffinitySettings::encode(settings.as_ref()),
                        "affinity switched"
                    );
                }
                MasterCommand::Adopt { records, affinity } => {
                    self.core.adopt(&records);
                    self.core.adopt_affinity(&affinity);
                    tracing::info!(
                        records = records.len(),
                        affinity = affinity.len(),
                        "records adopted"
                    );
                }
            }
        }
    }

    /// The batched loop: every waiting packet in one receive, each decided as it is read, then
    /// the batch's forwards, re-injections and verdicts sent together ([`Path::flush`]).
    fn run_batched(&mut self, b: &mut Batched, stop: &StopFlag) {
        let granted = b.sock.rcvbuf().unwrap_or(0);
        self.counters
            .queue_rcvbuf
            .store(u64::try_from(granted).unwrap_or(u64::MAX), Relaxed);
        if b.sock.dropped_during_setup > 0 {
            tracing::info!(
                dropped = b.sock.dropped_during_setup,
                "SYNs queued while the queue was being configured were dropped"
            );
        }
        while !stop.is_set() {
            self.heartbeat.waiting(self.role.now_ms());
            let n = match b.sock.recv_batch(&mut b.rx) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    add(&self.counters.queue_enobufs);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nfqueue receive failed");
                    continue;
                }
            };
            self.poll_commands();
            let now = self.role.now_ms();
            let mut packets = 0u64;
            for i in 0..n {
                for msg in nfqueue::messages(b.rx.datagram(i)) {
                    match msg {
                        Ok(Message::Packet(p)) => {
                            packets += 1;
                            self.decide(p.payload, now, &mut b.out);
                            b.out.ids.push((p.queue, p.id));
                            if b.out.ids.len() == MAX_BATCH {
                                self.flush(&b.sock, &mut b.out);
                            }
                        }
                        Ok(Message::Ack { errno, .. }) if errno != 0 => {
                            add(&self.counters.queue_verdict_errors);
                        }
                        Ok(Message::Overrun) => add(&self.counters.queue_enobufs),
                        Ok(_) => {}
                        Err(_) => add(&self.counters.queue_malformed),
                    }
                }
            }
            self.flush(&b.sock, &mut b.out);
            if b.rx.truncated > b.out.truncated_seen {
                self.counters
                    .queue_malformed
                    .fetch_add(b.rx.truncated - b.out.truncated_seen, Relaxed);
                b.out.truncated_seen = b.rx.truncated;
            }
            if packets > 0 {
                self.counters.queue_received.fetch_add(packets, Relaxed);
                add(&self.counters.queue_batches);
                self.counters.queue_batch_max.fetch_max(packets, Relaxed);
                self.counters
                    .queue_batch_sizes
                    .observe(&crate::cluster::counters::BATCH_SIZE_BOUNDS, packets);
            }
            self.heartbeat.beat(self.role.now_ms());
        }
    }

    /// Asks the core about one packet and files what it decided in the outbox.
    fn decide(&mut self, pkt: &[u8], now: u64, out: &mut Outbox) {
        let slot = out.ids.len();
        let verdict = self.core.on_syn(pkt, now, &mut out.bufs[slot]);
        let to = match verdict {
            SynVerdict::Inject { len } => Some((Target::Local, len)),
            SynVerdict::Drop(_) => None,
            SynVerdict::Forward {
                index, dest, len, ..
            } => {
                self.dests[index].get_or_insert_with(|| Dest::new(&dest));
                Some((
                    Target::Forward {
                        index,
                        v6: dest.is_ipv6(),
                    },
                    len,
                ))
            }
        };
        if let Some((to, len)) = to {
            out.sends.push(Pending { slot, len, to });
        }
    }

    /// Sends what the batch decided: forwards first (one `sendmmsg` per family), then the
    /// re-injections, then every verdict in one datagram. All verdicts are drops: a kept SYN
    /// is re-injected, never accepted (see `crate::datapath::syn_path`).
    fn flush(&mut self, sock: &QueueSocket, out: &mut Outbox) {
        if out.ids.is_empty() {
            return;
        }
        for v6 in [false, true] {
            let wanted = out
                .sends
                .iter()
                .filter(|p| matches!(p.to, Target::Forward { v6: f, .. } if f == v6))
                .count();
            if wanted == 0 {
                continue;
            }
            let socket = if v6 { &self.socket_v6 } else { &self.socket_v4 };
            let (bufs, dests) = (&out.bufs, &self.dests);
            let items = out.sends.iter().filter_map(|p| match p.to {
                Target::Forward { index, v6: f } if f == v6 => {
                    dests[index].as_ref().map(|d| (&bufs[p.slot][..p.len], d))
                }
                _ => None,
            });
            let (sent, failed, error) = match socket {
                Some(s) => {
                    let r = s.send_many(items);
                    (r.sent, wanted - r.sent, r.last_error)
                }
                None => (0, wanted, None),
            };
            self.counters.forwarded_out.fetch_add(sent as u64, Relaxed);
            if failed > 0 {
                self.counters
                    .forward_send_errors
                    .fetch_add(failed as u64, Relaxed);
                if let Some(e) = error {
                    tracing::debug!(error = %e, failed, "forwards not sent");
                }
            }
        }
        let local = out.sends.iter().filter(|p| p.to == Target::Local).count();
        if local > 0 {
            let inject_to = &self.inject_to;
            let items = out
                .sends
                .iter()
                .filter(|p| p.to == Target::Local)
                .map(|p| (&out.bufs[p.slot][..p.len], inject_to));
            let r = self.inject.send_many(items);
            if r.sent < local {
                self.counters
                    .reinject_errors
                    .fetch_add((local - r.sent) as u64, Relaxed);
                if let Some(e) = r.last_error {
                    tracing::warn!(error = %e, "re-injection of a kept SYN failed");
                }
            }
        }
        // Dropped here either way: if a send failed the client retransmits, and the record
        // sends the retransmission to the same node.
        let mut batch = VerdictBatch::new(&mut out.verdict_buf);
        for &(queue, id) in &out.ids {
            // The buffer holds MAX_BATCH verdicts and ids holds at most that many.
            if batch.push(queue, id, Verdict::Drop, None).is_err() {
                add(&self.counters.queue_verdict_errors);
            }
        }
        if let Err(e) = sock.send(batch.bytes()) {
            self.counters
                .queue_verdict_errors
                .fetch_add(out.ids.len() as u64, Relaxed);
            tracing::warn!(error = %e, "nfqueue verdicts not sent");
        }
        out.ids.clear();
        out.sends.clear();
    }

    /// The per-packet loop (`queue_io = "per-packet"`): one `recv`, one forward and one
    /// verdict system call per SYN, through the nfq crate.
    fn run_per_packet(&mut self, mut queue: Queue, stop: &StopFlag) {
        while !stop.is_set() {
            self.heartbeat.waiting(self.role.now_ms());
            let mut msg = match queue.recv() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "nfqueue receive failed");
                    continue;
                }
            };
            self.poll_commands();
            add(&self.counters.queue_received);
            self.handle(msg.get_payload());
            // Dropped either way: kept SYNs are re-injected, never accepted.
            msg.set_verdict(NfqVerdict::Drop);
            if let Err(e) = queue.verdict(msg) {
                tracing::warn!(error = %e, "nfqueue verdict failed");
            }
            self.heartbeat.beat(self.role.now_ms());
        }
    }

    /// Carries out the core's verdict for one queued packet (per-packet path).
    fn handle(&mut self, pkt: &[u8]) {
        match self.core.on_syn(pkt, self.role.now_ms(), &mut self.buf) {
            SynVerdict::Inject { len } => {
                if let Err(e) = self.inject.send_to(&self.buf[..len], &self.inject_to) {
                    add(&self.counters.reinject_errors);
                    tracing::warn!(error = %e, "re-injection of a kept SYN failed");
                }
            }
            SynVerdict::Drop(_) => {}
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
            }
        }
    }
}
