//! The control protocol: one JSON request per line on the node-local Unix socket, one JSON
//! reply per line. `tdscctl` is a thin client of it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Every member's status, asked over the cluster channel by the node whose socket took
    /// it; a node that does not answer is listed with the reason.
    ClusterStatus,
    /// Switch the cluster's dispatch policy: under Raft the leader proposes it and every node
    /// switches as it applies it; under a static election the master switches. Records of
    /// dispatched SYNs survive the switch, so retransmissions still go where their first copy
    /// went.
    PolicySet {
        policy: String,
    },
    /// Client affinity for the cluster (`affinity`: `none` or `client-address`; the keys not
    /// given keep their current values, or their defaults when affinity was off). Carried to
    /// the Raft leader, which commits it; every node applies it (under a static election:
    /// the master). Live entries are kept.
    AffinitySet {
        affinity: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        prefix_v4: Option<u8>,
        #[serde(default)]
        prefix_v6: Option<u8>,
    },
    /// Change the timing of node `node`'s health checks (`check`: one by name; none: all of
    /// them). Carried to node `node`; lasts until its daemon restarts (the configuration is
    /// the lasting place).
    HealthSet {
        node: u32,
        #[serde(default)]
        check: Option<String>,
        #[serde(default)]
        interval_ms: Option<u64>,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        rise: Option<u32>,
        #[serde(default)]
        fall: Option<u32>,
    },
    /// Set node `node`'s weight. Any node takes it: it is carried to node `node`, which
    /// announces its own weight and drain flag in its reports, so whichever node is master
    /// learns them (`crate::admin::route`).
    Weight {
        node: u32,
        weight: u32,
    },
    /// Stop new connections to `node`; existing ones run on (see [`Request::Weight`]).
    Drain {
        node: u32,
    },
    /// Take new connections again.
    Undrain {
        node: u32,
    },
    /// Add node `id` (cluster-network `address`, optional `weight`, default 1) to the cluster
    /// through Raft. Any node takes it and carries it to the Raft leader. The reply comes
    /// once the change has committed.
    NodeAdd {
        id: u32,
        address: String,
        #[serde(default)]
        weight: Option<u32>,
    },
    /// Remove node `id` from the cluster through Raft (carried to the leader, as
    /// [`Request::NodeAdd`]).
    NodeRemove {
        id: u32,
    },
}

/// One member's entry in a cluster status: its status, or why it is missing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeAnswer {
    pub id: u32,
    pub address: String,
    /// Its status, when it answered.
    pub status: Option<Box<Status>>,
    /// Why it is missing (no answer within the timeout, or its error).
    pub error: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u32,
    pub address: String,
    pub alive: bool,
    pub draining: bool,
    /// Every health check of the node's application passes, as it last reported (true for
    /// a node without checks).
    #[serde(default = "yes")]
    pub healthy: bool,
    /// Relative share of new connections (0: none).
    #[serde(default)]
    pub weight: u32,
    /// Load figure in milli-units, as last reported.
    #[serde(default)]
    pub load: u32,
    /// ESTABLISHED connections on the VIP, as last reported.
    pub connections: u32,
    pub syn_recv: u32,
    #[serde(rename = "self")]
    pub is_self: bool,
    /// A voting member of the Raft group (false for a node that has left it: only this node
    /// itself is listed then).
    #[serde(default)]
    pub voter: bool,
    /// Milliseconds since this node's last report reached us (None: never, or self).
    pub last_report_ms_ago: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rejected {
    pub malformed: u64,
    pub unknown_peer: u64,
    pub wrong_vip: u64,
    pub not_syn: u64,
    pub bad_port: u64,
    /// Stamped with an election term older than the newest this node knows: sent by a master
    /// that has been deposed (see `tdsc_election`, *Fencing at members*).
    #[serde(default)]
    pub stale_term: u64,
    /// The forward's tag does not verify (forged or altered; see `tdsc_proto::forward`).
    #[serde(default)]
    pub bad_tag: u64,
    /// Tagged with a key id this node's keyring does not hold.
    #[serde(default)]
    pub unknown_key: u64,
    /// Authentic, but its counter was seen before: a captured forward sent again.
    #[serde(default)]
    pub replay: u64,
    /// Dropped by the ruleset before reaching the daemon: not from a member address on the
    /// cluster interface.
    pub ruleset_foreign: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub syns_dispatched: u64,
    pub forwarded_out: u64,
    pub accepted_locally: u64,
    pub retransmit_hits: u64,
    pub dropped_no_node: u64,
    pub dropped_not_master: u64,
    pub queue_rejected: u64,
    pub forward_send_errors: u64,
    pub received_forwarded: u64,
    pub reinjected: u64,
    pub reinject_errors: u64,
    pub records_evicted_live: u64,
    /// New records not handed to the Raft task for replication (hand-off full).
    #[serde(default)]
    pub records_handoff_overflow: u64,
    /// New connections sent to the node their client's affinity entry named.
    #[serde(default)]
    pub affinity_hits: u64,
    /// Live client-affinity entries pushed out by a full table.
    #[serde(default)]
    pub affinity_evicted_live: u64,
    pub forward_rejected: Rejected,
    pub reports_sent: u64,
    pub reports_received: u64,
    pub reports_rejected: u64,
    /// Cluster datagrams refused, by reason (`reports_rejected` is their sum).
    #[serde(default)]
    pub cluster_dropped: ClusterDropped,
    /// Packets dropped on the way that the daemon can see but never handled itself.
    #[serde(default)]
    pub drops: Drops,
    /// What the control socket refused.
    #[serde(default)]
    pub control: ControlRefused,
    /// The master's queue I/O.
    #[serde(default)]
    pub queue: QueueStats,
    /// Control requests carried over the cluster channel, both ways.
    #[serde(default)]
    pub remote_control: RemoteControl,
}

/// Control requests over the cluster channel (`crate::cluster::remote`): those this node
/// forwarded, and those it received, with the refusals of the latter by reason.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RemoteControl {
    /// Requests this node's socket took and forwarded to the node that must act.
    pub forwarded: u64,
    /// Forwarded requests that got no answer within the timeout.
    pub timeouts: u64,
    /// Forwards refused here because too many were in flight.
    pub forward_busy: u64,
    /// Answers with no request of this node in flight (late, or not from the node asked).
    pub stray_answers: u64,
    /// Requests from other nodes carried out here (successfully or with the change's own
    /// error, which is counted under `failed` too).
    pub served: u64,
    /// Requests from other nodes that did not parse or whose arguments are wrong.
    pub bad_request: u64,
    /// Requests from a node that is not a current member (the bus refuses most before).
    pub not_member: u64,
    /// Requests this node is not the one to carry out (leadership moved; never re-forwarded).
    pub not_target: u64,
    /// Requests from other nodes refused because too many were being served.
    pub busy: u64,
    /// Requests from other nodes carried out with an error (the change was refused).
    pub failed: u64,
}

/// The master thread's NFQUEUE I/O (`crate::datapath::queue`). The kernel's own drop counts
/// for the queue are in [`Drops`] (`queue_kernel`, `queue_user`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct QueueStats {
    /// `[threads] queue_io`: `batched` or `per-packet`.
    pub io: String,
    /// The socket's receive buffer in bytes (0 until the thread has opened it; not known
    /// for `per-packet`).
    pub rcvbuf: u64,
    /// Packets taken off the queue.
    pub received: u64,
    /// Receives that returned packets (`received / batches` is the mean batch).
    pub batches: u64,
    /// The largest batch.
    pub batch_max: u64,
    /// Socket overruns reported to the reader (`ENOBUFS`, `NLMSG_OVERRUN`).
    pub enobufs: u64,
    /// Verdicts the kernel refused.
    pub verdict_errors: u64,
    /// Datagrams that did not parse or were cut short.
    pub malformed: u64,
}

/// Requests and sessions the control socket refused (`crate::admin::server`'s limits).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ControlRefused {
    /// Request lines longer than the limit (the session was closed).
    pub oversize: u64,
    /// Connections refused because the session cap was reached.
    pub over_cap: u64,
}

/// Cluster-socket datagrams refused by the bus, by reason (`tdscd::cluster::bus::DropReason`).
/// Each reason is checked in this order; a datagram counts under the first it fails.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClusterDropped {
    /// The UDP source port is not the cluster port.
    pub source_port: u64,
    /// Too short for a sealed datagram, or an unknown seal version.
    pub bad_header: u64,
    /// Sealed with a key id this node's keyring does not hold.
    pub unknown_key: u64,
    /// The tag does not verify (forged, or another key with that id).
    pub bad_tag: u64,
    /// Authentic, but not from the address of the member it names (or from this node).
    pub unknown_sender: u64,
    /// A counter this node accepted before, or older than the sender's replay window.
    pub replay: u64,
    /// Authentic and fresh, but not an envelope of its sender.
    pub undecodable: u64,
    /// Its owner had no room (or there is none: Raft messages under a static election).
    pub no_owner: u64,
}

/// Drops outside the daemon's own code, read when `status` is asked for.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Drops {
    /// SYNs the kernel could not queue to the daemon (`queue_dropped` in
    /// `/proc/net/netfilter/nfnetlink_queue`: queue full).
    pub queue_kernel: u64,
    /// SYNs the kernel could not copy to the daemon's socket (`queue_user_dropped`: socket
    /// receive buffer full; `NETLINK_NO_ENOBUFS` hides these from the reader).
    pub queue_user: u64,
    /// Ruleset: client segments of connections this node was not given.
    pub not_owned_in: u64,
    /// Ruleset: segments this node's TCP sent for connections it was not given.
    pub not_owned_out: u64,
    /// Ruleset: client segments without a conntrack entry.
    pub untracked_in: u64,
    /// Ruleset: segments from the VIP without a conntrack entry.
    pub untracked_out: u64,
    /// Ruleset: datagrams to the cluster port not from a member over the cluster interface
    /// (from a non-member address, another interface, another source port).
    pub control_port_foreign: u64,
    /// Ruleset: datagrams to the cluster port a local process other than the daemon sent.
    pub control_port_local: u64,
    /// Ruleset (master with `[flood] syn_prefix_rate`): client SYNs dropped before the queue
    /// because their source prefix sent SYNs faster than the limit.
    pub syn_prefix_limited: u64,
    /// This namespace's TCP: SYNs or handshake ACKs dropped because a listener's accept
    /// queue was full (`TcpExtListenOverflows` in `/proc/net/netstat`).
    pub listen_overflows: u64,
    /// This namespace's TCP: every SYN or ACK a listener dropped (`TcpExtListenDrops`).
    pub listen_drops: u64,
    /// Conntrack: packets dropped because their new entry could not be inserted (a clash,
    /// `insert_failed` of `/proc/net/stat/nf_conntrack`, summed over CPUs).
    pub conntrack_insert_failed: u64,
    /// Conntrack: packets dropped for want of an entry (table full: `drop`, summed).
    pub conntrack_drop: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub node_id: u32,
    pub role: String,
    pub master_id: Option<u32>,
    pub term: u64,
    /// The Raft leader this node knows of (the master once it holds its lease).
    #[serde(default)]
    pub leader_id: Option<u32>,
    /// This node is a member of the cluster (false once it has been removed).
    #[serde(default)]
    pub member: bool,
    /// The voting members, sorted.
    #[serde(default)]
    pub voters: Vec<u32>,
    /// Raft log index of the last membership change applied (0: the configured set).
    #[serde(default)]
    pub membership_index: u64,
    pub policy: String,
    pub vip: String,
    pub tcp_ports: Vec<u16>,
    pub queue_backend: String,
    pub l2_mode: String,
    pub nodes: Vec<NodeStatus>,
    pub counters: Counters,
    /// SYN-forward record replication and the last takeover (paper §3.5).
    #[serde(default)]
    pub records: RecordsStatus,
    /// The cluster keyring this node runs with (ids only, never key material).
    #[serde(default)]
    pub cluster_key: ClusterKeyStatus,
    /// Client affinity (`[scheduler] affinity`); `None` when off.
    #[serde(default)]
    pub affinity: Option<AffinityStatus>,
    /// This node's application health checks (`[[health.check]]`); `None` from older
    /// daemons.
    #[serde(default)]
    pub health: Option<crate::health::task::HealthSnapshot>,
}

/// Client affinity's settings and figures.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AffinityStatus {
    pub timeout_ms: u64,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub capacity: u64,
    /// Live entries in this node's replica (what it would adopt as a new master).
    pub replica_live: u64,
    /// New connections sent where their client's entry named (master).
    pub hits: u64,
    /// Live entries pushed out by a full table (master).
    pub evicted_live: u64,
}

/// The key ids of the keyring and the one this node seals with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterKeyStatus {
    pub ids: Vec<u8>,
    pub send: u8,
    /// The TCP Fast Open server keys this node set from the cluster key (`[cluster]
    /// tcp_fastopen_key = "cluster"`); `None` with `"keep"`.
    #[serde(default)]
    pub tcp_fastopen: Option<FastOpenStatus>,
}

/// Which cluster keys the node's TCP Fast Open keys are derived from (never the keys).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FastOpenStatus {
    /// Cookies are issued with the key derived from this cluster key id.
    pub primary: u8,
    /// And accepted with the key derived from this one too.
    pub backup: Option<u8>,
}

/// Replication of the SYN-forward records, as this node sees it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordsStatus {
    /// `scheduler.replicate_records`.
    pub replicate: bool,
    /// `scheduler.reconcile_syn_recv`.
    #[serde(default)]
    pub reconcile: bool,
    /// Records and batches this node proposed while master.
    pub proposed_records: u64,
    pub proposed_batches: u64,
    /// Records and batches applied to this node's replica from committed entries.
    pub applied_records: u64,
    pub applied_batches: u64,
    /// Live records in the replica now.
    pub replica_live: u64,
    /// Hand-offs drained while not leader (or with replication off), hence not proposed.
    pub discarded_not_leader: u64,
    /// SYN-RECV queries this node answered for a new master.
    pub queries_answered: u64,
    /// What this node adopted when it last became master.
    pub last_takeover: Option<crate::cluster::takeover::TakeoverReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Box<Status>),
    Error {
        error: String,
    },
    /// A change was applied; the text says what.
    Done {
        done: String,
    },
    /// `cluster-status`: every member, in id order.
    Cluster {
        cluster: Vec<NodeAnswer>,
    },
}
