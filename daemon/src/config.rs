//! The node configuration: one TOML file, the same on every node but for `node_id`.
//!
//! Parsing is two steps. serde reads the TOML shape (unknown keys are refused, so a typo is
//! an error, not a silently ignored setting); then `Config::validate` checks meaning and
//! names the offending key in every error, e.g. `cluster.vip: "192.0.2.300" is not an IP
//! address`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_id: u32,
    cluster: RawCluster,
    #[serde(default)]
    scheduler: RawScheduler,
    #[serde(default)]
    election: RawElection,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    threads: RawThreads,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    flood: RawFlood,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    nodes: Vec<RawNode>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawThreads {
    data_path_cpu: Option<i64>,
    queue_io: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    vip: String,
    vip_prefix_len: Option<u8>,
    #[serde(default)]
    tcp_ports: Vec<i64>,
    client_interface: String,
    cluster_interface: String,
    cluster_mac: Option<String>,
    l2_mode: Option<String>,
    queue_num: Option<u16>,
    control_port: Option<u16>,
    key_file: Option<PathBuf>,
    tcp_fastopen_key: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    policy: Option<String>,
    syn_record_window_ms: Option<u64>,
    syn_record_capacity: Option<usize>,
    syn_recv_wait_ms: Option<u64>,
    replicate_records: Option<bool>,
    reconcile_syn_recv: Option<bool>,
    load_file: Option<PathBuf>,
    load_command: Option<String>,
    affinity: Option<String>,
    affinity_timeout_ms: Option<u64>,
    affinity_prefix_v4: Option<u8>,
    affinity_prefix_v6: Option<u8>,
    affinity_capacity: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawElection {
    mode: Option<String>,
    master: Option<u32>,
    tick_ms: Option<u64>,
    election_tick: Option<usize>,
    heartbeat_tick: Option<usize>,
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
    host_state: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    report_interval_ms: Option<u64>,
    dead_after_ms: Option<u64>,
    #[serde(default)]
    check: Vec<crate::health::spec::RawCheck>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    drain_timeout_ms: Option<u64>,
}

/// Integers are read as i64 so that a negative or oversized value gets this module's error,
/// naming the key and the range, rather than serde's.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFlood {
    syn_prefix_rate: Option<i64>,
    syn_prefix_burst: Option<i64>,
    prefix_v4: Option<i64>,
    prefix_v6: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: u32,
    address: String,
    weight: Option<i64>,
}

/// How every node gets every client frame behind a learning switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mode {
    /// Frames leaving the client interface carry a per-node source MAC (as Windows NLB's
    /// unicast mode does), so the switch never learns the cluster MAC and floods frames for it
    /// to every port.
    MaskedMac,
    /// No masking: the operator makes the switch deliver every frame to every node (port
    /// mirroring, a hub, a static multicast MAC entry, …).
    SharedMac,
}

/// Where the node's TCP Fast Open server key comes from (`[cluster] tcp_fastopen_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FastOpenKeySource {
    /// Derived from the cluster key and set at start (`"cluster"`, the default), so a cookie
    /// one node issued is valid on every node.
    #[default]
    Cluster,
    /// Left as the host has it (`"keep"`): the operator shares a key by other means.
    Keep,
}

impl FastOpenKeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            FastOpenKeySource::Cluster => "cluster",
            FastOpenKeySource::Keep => "keep",
        }
    }
}

/// How the master's queue thread talks to NFQUEUE (`[threads] queue_io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueIo {
    /// The daemon's own nfnetlink_queue I/O ([`crate::datapath::queue_socket`]): a receive
    /// buffer sized to the queue, every waiting SYN in one `recvmmsg`, the batch's verdicts in
    /// one `send` and its forwards in one `sendmmsg`, overruns counted. The default.
    #[default]
    Batched,
    /// One `recv`, one verdict and one forward system call per SYN through the nfq crate, at
    /// the default receive buffer: the dispatch benchmark's baseline.
    PerPacket,
}

impl QueueIo {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueIo::Batched => "batched",
            QueueIo::PerPacket => "per-packet",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyName {
    RoundRobin,
    LeastConnections,
    StaticHash,
    WeightedRoundRobin,
    LeastLoad,
    PowerOfTwo,
    IsnHash,
}

impl PolicyName {
    /// New names go at the end: the daemon stores the current policy as an index into this.
    pub const ALL: [(&'static str, PolicyName); 7] = [
        ("round-robin", PolicyName::RoundRobin),
        ("least-connections", PolicyName::LeastConnections),
        ("static-hash", PolicyName::StaticHash),
        ("weighted-round-robin", PolicyName::WeightedRoundRobin),
        ("least-load", PolicyName::LeastLoad),
        ("power-of-two", PolicyName::PowerOfTwo),
        ("isn-hash", PolicyName::IsnHash),
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, p)| *p)
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map(|(n, _)| *n)
            .expect("every policy is listed")
    }
}

/// Where a node's load figure (for `least-load`) comes from. Every source yields a decimal
/// number, which the node reports in milli-units (`1.5` → 1500).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadSource {
    /// The 1-minute run-queue average, first field of `/proc/loadavg`. Per kernel, so nodes in
    /// network namespaces of one host all report the same figure.
    Loadavg,
    /// The first number in this file, re-read every report interval.
    File(PathBuf),
    /// The first number this `sh -c` command prints, run every report interval.
    Command(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElectionMode {
    Static {
        master: u32,
    },
    /// The Raft leader is master. `data_dir` holds the node's Raft hard state and log, so a
    /// restarted node rejoins with its term and vote.
    Raft {
        settings: tdsc_election::RaftSettings,
        data_dir: PathBuf,
    },
}

/// Where a node keeps its Raft state unless `election.data_dir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/tdsc";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: u32,
    pub address: IpAddr,
}

/// Nodes `1..=count` at 198.51.100.1<id>, the lab's addressing, for unit tests.
#[cfg(test)]
pub(crate) fn test_nodes(count: u32) -> Vec<Node> {
    (1..=count)
        .map(|id| Node {
            id,
            address: format!("198.51.100.1{id}").parse().unwrap(),
        })
        .collect()
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: u32,
    pub vip: IpAddr,
    pub vip_prefix_len: u8,
    /// Sorted, unique; empty means every port.
    pub tcp_ports: Vec<u16>,
    pub client_interface: String,
    pub cluster_interface: String,
    pub cluster_mac: Option<[u8; 6]>,
    pub l2_mode: L2Mode,
    pub queue_num: u16,
    pub control_port: u16,
    /// `[cluster] key_file`: the cluster keyring every cluster datagram is sealed with
    /// (default [`crate::cluster::keyfile::DEFAULT_KEY_FILE`]); read and checked at start.
    pub key_file: PathBuf,
    /// `[cluster] tcp_fastopen_key`: `"cluster"` (default) or `"keep"`.
    pub tcp_fastopen_key: FastOpenKeySource,
    pub policy: PolicyName,
    pub syn_record_window: Duration,
    pub syn_record_capacity: usize,
    /// `[scheduler] syn_recv_wait_ms`: how long a new master waits for the members' SYN-RECV
    /// lists before it dispatches (default 50 ms).
    pub syn_recv_wait: Duration,
    /// `[scheduler] replicate_records` (default true). Off only for tests: records are then
    /// not replicated, and a new master relies on the SYN-RECV reconciliation alone.
    pub replicate_records: bool,
    /// `[scheduler] reconcile_syn_recv` (default true). Off only for tests: a new master then
    /// adopts the replicated records alone.
    pub reconcile_syn_recv: bool,
    /// `[scheduler] load_file` / `load_command`; default: run queue.
    pub load_source: LoadSource,
    /// Weight of each node in `nodes` order (`[[nodes]] weight`, default 1).
    pub weights: Vec<u32>,
    pub election: ElectionMode,
    pub control_socket: PathBuf,
    /// `[control] host_state`: the host state file, where the daemon records what it changes
    /// on the host before it changes it (see [`crate::host::state`]). Default
    /// [`crate::host::state::DEFAULT_STATE_FILE`].
    pub host_state: PathBuf,
    pub report_interval: Duration,
    pub dead_after: Duration,
    /// `[[health.check]]`: the checks of this node's application (none: always healthy).
    pub health_checks: Vec<crate::health::spec::CheckSpec>,
    /// `[threads] data_path_cpu`: the CPU the queue and forward-receive threads are pinned to
    /// (see [`crate::datapath::affinity`]); `None` leaves them to the scheduler.
    pub data_path_cpu: Option<usize>,
    /// `[threads] queue_io`: `"batched"` (default) or `"per-packet"`.
    pub queue_io: QueueIo,
    /// `[shutdown] drain_timeout_ms`: on SIGTERM, how long the node waits for its own
    /// connections on the VIP to finish before it removes the VIP (0: not at all).
    pub drain_timeout: Duration,
    /// `[flood]`: the master's SYN rate limit per client source prefix, in its ruleset;
    /// `None` (`syn_prefix_rate = 0`, the default) installs none.
    pub syn_prefix_limit: Option<tdsc_rules::SynPrefixLimit>,
    /// `[scheduler] affinity = "client-address"` and its keys; `None`: `affinity = "none"`.
    pub affinity: Option<crate::datapath::sticky::AffinitySettings>,
    /// `[metrics] listen`: the address of the Prometheus endpoint (`crate::metrics`); `None`
    /// (absent, the default) serves none.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Sorted by id.
    pub nodes: Vec<Node>,
}

/// Default UDP port of the control messages on the cluster network.
pub const DEFAULT_CONTROL_PORT: u16 = 7400;
/// A retransmitted SYN arrives 1, 3, 7, 15 and 31 s after the first with Linux defaults
/// (`tcp_syn_retries` = 6 spans 127 s, but a server's SYN-RECV entry lives about 63 s with
/// `tcp_synack_retries` = 5). Remember each forward for 64 s so every retransmission the
/// owner could still answer finds its way back.
pub const DEFAULT_SYN_RECORD_WINDOW_MS: u64 = 64_000;
pub const DEFAULT_SYN_RECORD_CAPACITY: usize = 1 << 16;
/// CPU numbers the kernel's affinity mask can name (`CPU_SETSIZE`).
pub const MAX_CPU: usize = 1024;
/// How long a stopping node waits for its connections by default: well inside systemd's
/// `TimeoutStopSec=45` of the packaged unit, long enough for ordinary request/response traffic.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Longest drain wait accepted: an hour (a typo of 3600000000 is an error, not a hung stop).
pub const MAX_DRAIN_TIMEOUT_MS: u64 = 3_600_000;
/// A member answers a SYN-RECV query within a round trip plus one sock_diag dump (well under
/// a millisecond in a LAN); 50 ms covers a loaded member without delaying a takeover much.
pub const DEFAULT_SYN_RECV_WAIT_MS: u64 = 50;

/// `[scheduler] affinity_timeout_ms` default: IPVS's persistence timeout (5 minutes).
pub const DEFAULT_AFFINITY_TIMEOUT_MS: u64 = 300_000;
/// Longest `[scheduler] affinity_timeout_ms`: a day.
pub const MAX_AFFINITY_TIMEOUT_MS: u64 = 86_400_000;
/// `[scheduler] affinity_capacity` default.
pub const DEFAULT_AFFINITY_CAPACITY: usize = 1 << 16;
/// Longest allowed wait: every takeover pays it when a member is alive but does not answer.
pub const MAX_SYN_RECV_WAIT_MS: u64 = 2_000;
/// A node's weight when `[[nodes]] weight` is absent.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest weight: keeps weight × connections far inside u64 and a typo (10000000) an error.
pub const MAX_WEIGHT: u32 = 1000;
/// `[flood] prefix_v4` unless set: by convention the longest IPv4 prefix networks route
/// between each other, so a flood from one site lands in one bucket and other sites keep theirs.
pub const DEFAULT_FLOOD_PREFIX_V4: u8 = 24;
/// `[flood] prefix_v6` unless set: a /48 is what one site is usually assigned.
pub const DEFAULT_FLOOD_PREFIX_V6: u8 = 48;

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        Config::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let c = raw.cluster;
        let vip: IpAddr = c
            .vip
            .parse()
            .map_err(|_| invalid("cluster.vip", format!("{:?} is not an IP address", c.vip)))?;
        if vip.is_unspecified() || vip.is_multicast() || vip.is_loopback() {
            return Err(invalid(
                "cluster.vip",
                format!("{vip} cannot be a cluster address"),
            ));
        }
        let max_prefix = if vip.is_ipv4() { 32 } else { 128 };
        let vip_prefix_len = c.vip_prefix_len.unwrap_or(max_prefix);
        if vip_prefix_len == 0 || vip_prefix_len > max_prefix {
            return Err(invalid(
                "cluster.vip_prefix_len",
                format!("{vip_prefix_len} is not a prefix length for {vip} (1..={max_prefix})"),
            ));
        }
        let mut ports = BTreeSet::new();
        for p in &c.tcp_ports {
            match u16::try_from(*p) {
                Ok(port) if port != 0 => {
                    if !ports.insert(port) {
                        return Err(invalid(
                            "cluster.tcp_ports",
                            format!("port {port} is listed twice"),
                        ));
                    }
                }
                _ => {
                    return Err(invalid(
                        "cluster.tcp_ports",
                        format!("{p} is not a TCP port (1..=65535)"),
                    ))
                }
            }
        }
        check_ifname("cluster.client_interface", &c.client_interface)?;
        check_ifname("cluster.cluster_interface", &c.cluster_interface)?;
        if c.client_interface == c.cluster_interface {
            return Err(invalid(
                "cluster.cluster_interface",
                "must differ from cluster.client_interface: forwarded SYNs and client frames \
                 are told apart by interface",
            ));
        }
        let cluster_mac = c
            .cluster_mac
            .as_deref()
            .map(|s| {
                parse_mac(s).ok_or_else(|| {
                    invalid(
                        "cluster.cluster_mac",
                        format!("{s:?} is not a MAC address like 02:bf:c0:00:02:01"),
                    )
                })
            })
            .transpose()?;
        if let Some(m) = cluster_mac {
            if m[0] & 1 == 1 {
                return Err(invalid(
                    "cluster.cluster_mac",
                    "is a multicast address; an interface needs a unicast MAC",
                ));
            }
        }
        let l2_mode = match c.l2_mode.as_deref().unwrap_or("masked-mac") {
            "masked-mac" => L2Mode::MaskedMac,
            "shared-mac" => L2Mode::SharedMac,
            other => {
                return Err(invalid(
                    "cluster.l2_mode",
                    format!("unknown mode {other:?}; expected \"masked-mac\" or \"shared-mac\""),
                ))
            }
        };

        let policy_s = raw.scheduler.policy.as_deref().unwrap_or("round-robin");
        let policy = PolicyName::parse(policy_s).ok_or_else(|| {
            let names: Vec<_> = PolicyName::ALL.iter().map(|(n, _)| *n).collect();
            invalid(
                "scheduler.policy",
                format!(
                    "unknown policy {policy_s:?}; expected one of {}",
                    names.join(", ")
                ),
            )
        })?;
        let window_ms = raw
            .scheduler
            .syn_record_window_ms
            .unwrap_or(DEFAULT_SYN_RECORD_WINDOW_MS);
        if window_ms == 0 {
            return Err(invalid(
                "scheduler.syn_record_window_ms",
                "must be positive: retransmitted SYNs must reach the node that took the first",
            ));
        }
        let capacity = raw
            .scheduler
            .syn_record_capacity
            .unwrap_or(DEFAULT_SYN_RECORD_CAPACITY);
        if !(1024..=(1 << 24)).contains(&capacity) {
            return Err(invalid(
                "scheduler.syn_record_capacity",
                format!("{capacity} is outside 1024..=16777216"),
            ));
        }

        let syn_recv_wait_ms = raw
            .scheduler
            .syn_recv_wait_ms
            .unwrap_or(DEFAULT_SYN_RECV_WAIT_MS);
        if !(1..=MAX_SYN_RECV_WAIT_MS).contains(&syn_recv_wait_ms) {
            return Err(invalid(
                "scheduler.syn_recv_wait_ms",
                format!("{syn_recv_wait_ms} is outside 1..={MAX_SYN_RECV_WAIT_MS}"),
            ));
        }
        let affinity = affinity_settings(&raw.scheduler)?;
        let tcp_fastopen_key = match c.tcp_fastopen_key.as_deref().unwrap_or("cluster") {
            "cluster" => FastOpenKeySource::Cluster,
            "keep" => FastOpenKeySource::Keep,
            other => {
                return Err(invalid(
                    "cluster.tcp_fastopen_key",
                    format!("unknown source {other:?}; expected \"cluster\" or \"keep\""),
                ))
            }
        };
        let replicate_records = raw.scheduler.replicate_records.unwrap_or(true);
        let reconcile_syn_recv = raw.scheduler.reconcile_syn_recv.unwrap_or(true);

        let load_source = match (raw.scheduler.load_file, raw.scheduler.load_command) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "scheduler.load_command",
                    "give either load_file or load_command, not both",
                ))
            }
            (Some(f), None) if f.as_os_str().is_empty() => {
                return Err(invalid("scheduler.load_file", "is empty"))
            }
            (Some(f), None) => LoadSource::File(f),
            (None, Some(c)) if c.trim().is_empty() => {
                return Err(invalid("scheduler.load_command", "is empty"))
            }
            (None, Some(c)) => LoadSource::Command(c),
            (None, None) => LoadSource::Loadavg,
        };

        let mut nodes = Vec::new();
        let mut weights = Vec::new();
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for (i, n) in raw.nodes.iter().enumerate() {
            let key = format!("nodes[{i}]");
            if n.id == 0 {
                return Err(invalid(format!("{key}.id"), "node ids start at 1"));
            }
            if !ids.insert(n.id) {
                return Err(invalid(
                    format!("{key}.id"),
                    format!("node id {} is used twice", n.id),
                ));
            }
            let address: IpAddr = n.address.parse().map_err(|_| {
                invalid(
                    format!("{key}.address"),
                    format!("{:?} is not an IP address", n.address),
                )
            })?;
            if address == vip {
                return Err(invalid(
                    format!("{key}.address"),
                    "is the VIP; nodes need their own cluster-network addresses",
                ));
            }
            if !addrs.insert(address) {
                return Err(invalid(
                    format!("{key}.address"),
                    format!("{address} is used by two nodes"),
                ));
            }
            let weight = match n.weight.map(u32::try_from) {
                None => DEFAULT_WEIGHT,
                Some(Ok(w)) if w <= MAX_WEIGHT => w,
                Some(_) => {
                    return Err(invalid(
                        format!("{key}.weight"),
                        format!(
                            "{} is outside 0..={MAX_WEIGHT} (0: no new connections)",
                            n.weight.unwrap_or(0)
                        ),
                    ))
                }
            };
            nodes.push(Node { id: n.id, address });
            weights.push((n.id, weight));
        }
        if nodes.is_empty() {
            return Err(invalid("nodes", "at least one [[nodes]] entry is needed"));
        }
        nodes.sort_by_key(|n| n.id);
        weights.sort_by_key(|(id, _)| *id);
        let weights = weights.into_iter().map(|(_, w)| w).collect();
        if !ids.contains(&raw.node_id) {
            return Err(invalid(
                "node_id",
                format!("{} is not among the [[nodes]] ids {ids:?}", raw.node_id),
            ));
        }

        let election = match raw.election.mode.as_deref().unwrap_or("raft") {
            "static" => {
                let master = raw.election.master.ok_or_else(|| {
                    invalid(
                        "election.master",
                        "mode \"static\" needs the master's node id",
                    )
                })?;
                if !ids.contains(&master) {
                    return Err(invalid(
                        "election.master",
                        format!("{master} is not among the [[nodes]] ids {ids:?}"),
                    ));
                }
                ElectionMode::Static { master }
            }
            "raft" => {
                if raw.election.master.is_some() {
                    return Err(invalid(
                        "election.master",
                        "only mode \"static\" names a master; Raft elects one",
                    ));
                }
                let d = tdsc_election::RaftSettings::default();
                let settings = tdsc_election::RaftSettings {
                    tick_ms: raw.election.tick_ms.unwrap_or(d.tick_ms),
                    election_tick: raw.election.election_tick.unwrap_or(d.election_tick),
                    heartbeat_tick: raw.election.heartbeat_tick.unwrap_or(d.heartbeat_tick),
                };
                settings.validate().map_err(|e| {
                    invalid(
                        "election.election_tick",
                        e.to_string().trim_start_matches("invalid raft settings: "),
                    )
                })?;
                ElectionMode::Raft {
                    settings,
                    data_dir: raw
                        .election
                        .data_dir
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
                }
            }
            other => {
                return Err(invalid(
                    "election.mode",
                    format!("unknown mode {other:?}; expected \"raft\" or \"static\""),
                ))
            }
        };

        let report_ms = raw.health.report_interval_ms.unwrap_or(200);
        let dead_ms = raw.health.dead_after_ms.unwrap_or(1000);
        if report_ms == 0 {
            return Err(invalid("health.report_interval_ms", "must be positive"));
        }
        if dead_ms < 2 * report_ms {
            return Err(invalid(
                "health.dead_after_ms",
                format!(
                    "{dead_ms} ms is less than two report intervals ({} ms): one lost report \
                     would mark a healthy node dead",
                    2 * report_ms
                ),
            ));
        }

        let health_checks = crate::health::spec::validate(&raw.health.check)?;

        let data_path_cpu = match raw.threads.data_path_cpu {
            None => None,
            Some(cpu) => Some(
                usize::try_from(cpu)
                    .ok()
                    .filter(|c| *c < MAX_CPU)
                    .ok_or_else(|| {
                        invalid(
                            "threads.data_path_cpu",
                            format!("{cpu} is not a CPU number (0 to {})", MAX_CPU - 1),
                        )
                    })?,
            ),
        };
        let queue_io = match raw.threads.queue_io.as_deref().unwrap_or("batched") {
            "batched" => QueueIo::Batched,
            "per-packet" => QueueIo::PerPacket,
            other => {
                return Err(invalid(
                    "threads.queue_io",
                    format!("unknown mode {other:?}; expected \"batched\" or \"per-packet\""),
                ))
            }
        };
        let drain_ms = raw
            .shutdown
            .drain_timeout_ms
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS);
        if drain_ms > MAX_DRAIN_TIMEOUT_MS {
            return Err(invalid(
                "shutdown.drain_timeout_ms",
                format!(
                    "{drain_ms} ms is more than the maximum of {MAX_DRAIN_TIMEOUT_MS} ms (an hour)"
                ),
            ));
        }

        let syn_prefix_limit = flood_limit(&raw.flood)?;
        let metrics_listen = metrics_listen(&raw.metrics)?;

        Ok(Config {
            node_id: raw.node_id,
            vip,
            vip_prefix_len,
            tcp_ports: ports.into_iter().collect(),
            client_interface: c.client_interface,
            cluster_interface: c.cluster_interface,
            cluster_mac,
            l2_mode,
            queue_num: c.queue_num.unwrap_or(0),
            control_port: c.control_port.unwrap_or(DEFAULT_CONTROL_PORT),
            key_file: c
                .key_file
                .unwrap_or_else(|| PathBuf::from(crate::cluster::keyfile::DEFAULT_KEY_FILE)),
            tcp_fastopen_key,
            policy,
            syn_record_window: Duration::from_millis(window_ms),
            syn_record_capacity: capacity,
            syn_recv_wait: Duration::from_millis(syn_recv_wait_ms),
            replicate_records,
            reconcile_syn_recv,
            affinity,
            load_source,
            weights,
            election,
            control_socket: raw
                .control
                .socket
                .unwrap_or_else(|| PathBuf::from("/run/tdsc/tdscd.sock")),
            host_state: raw
                .control
                .host_state
                .unwrap_or_else(|| PathBuf::from(crate::host::state::DEFAULT_STATE_FILE)),
            report_interval: Duration::from_millis(report_ms),
            dead_after: Duration::from_millis(dead_ms),
            health_checks,
            data_path_cpu,
            queue_io,
            drain_timeout: Duration::from_millis(drain_ms),
            syn_prefix_limit,
            metrics_listen,
            nodes,
        })
    }

    /// This node's index in the id-sorted node list.
    pub fn self_index(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == self.node_id)
            .expect("validated: node_id is among the nodes")
    }

    pub fn self_address(&self) -> IpAddr {
        self.nodes[self.self_index()].address
    }

    /// The per-node source MAC used on egress in masked-MAC mode, after Windows NLB's
    /// unicast mode: `02:<node id>:<4 bytes>` where the 4 bytes are the IPv4 VIP (or the last
    /// 4 bytes of an IPv6 one). Locally administered (bit 1 of the first octet), unicast.
    pub fn egress_mac(&self) -> Option<[u8; 6]> {
        if self.l2_mode != L2Mode::MaskedMac {
            return None;
        }
        let tail = match self.vip {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(a) => {
                let o = a.octets();
                [o[12], o[13], o[14], o[15]]
            }
        };
        // Node ids above 255 share the low byte; the mask only has to differ from the
        // cluster MAC and between neighbours on one switch, so the id's low byte plus the
        // VIP suffices for any cluster of up to 255 nodes.
        let id = self.node_id.to_le_bytes()[0];
        Some([0x02, id, tail[0], tail[1], tail[2], tail[3]])
    }
}

/// `[metrics] listen`: an `address:port` (IPv6 in brackets) with a port above 0; absent, no
/// endpoint. The endpoint has no authentication, so which interface it is on is the
/// operator's choice, never a default.
fn metrics_listen(raw: &RawMetrics) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let Some(text) = &raw.listen else {
        return Ok(None);
    };
    let address: std::net::SocketAddr = text.parse().map_err(|_| {
        invalid(
            "metrics.listen",
            format!("{text:?} is not an address:port (e.g. \"127.0.0.1:9464\", \"[::1]:9464\")"),
        )
    })?;
    if address.port() == 0 {
        return Err(invalid(
            "metrics.listen",
            format!("{text:?}: port 0 is not a fixed port; Prometheus needs one"),
        ));
    }
    Ok(Some(address))
}

/// `[flood]`: off unless `syn_prefix_rate` is set above 0; its other keys are refused while it
/// is off, since they would do nothing. The burst defaults to one second of the rate.
fn flood_limit(raw: &RawFlood) -> Result<Option<tdsc_rules::SynPrefixLimit>, ConfigError> {
    use tdsc_rules::MAX_SYN_PREFIX_RATE;
    let rate = match raw.syn_prefix_rate {
        None | Some(0) => None,
        Some(r) => Some(
            u32::try_from(r)
                .ok()
                .filter(|r| *r <= MAX_SYN_PREFIX_RATE)
                .ok_or_else(|| {
                    invalid(
                        "flood.syn_prefix_rate",
                        format!("{r} is outside 0..={MAX_SYN_PREFIX_RATE} (0: no limit)"),
                    )
                })?,
        ),
    };
    let Some(rate) = rate else {
        let set = [
            ("flood.syn_prefix_burst", raw.syn_prefix_burst),
            ("flood.prefix_v4", raw.prefix_v4),
            ("flood.prefix_v6", raw.prefix_v6),
        ];
        if let Some((key, _)) = set.iter().find(|(_, v)| v.is_some()) {
            return Err(invalid(
                *key,
                "does nothing while flood.syn_prefix_rate is 0 (no limit); set the rate too",
            ));
        }
        return Ok(None);
    };
    let burst = match raw.syn_prefix_burst {
        None => rate,
        Some(b) => u32::try_from(b).ok().filter(|b| *b >= 1).ok_or_else(|| {
            invalid(
                "flood.syn_prefix_burst",
                format!("{b} is outside 1..={}", u32::MAX),
            )
        })?,
    };
    let prefix = |key: &str, value: Option<i64>, default: u8, max: u8| match value {
        None => Ok(default),
        Some(p) => u8::try_from(p)
            .ok()
            .filter(|p| (1..=max).contains(p))
            .ok_or_else(|| invalid(key, format!("{p} is not a prefix length (1..={max})"))),
    };
    Ok(Some(tdsc_rules::SynPrefixLimit {
        rate_per_second: rate,
        burst,
        prefix_v4: prefix(
            "flood.prefix_v4",
            raw.prefix_v4,
            DEFAULT_FLOOD_PREFIX_V4,
            32,
        )?,
        prefix_v6: prefix(
            "flood.prefix_v6",
            raw.prefix_v6,
            DEFAULT_FLOOD_PREFIX_V6,
            128,
        )?,
    }))
}

fn check_ifname(key: &str, name: &str) -> Result<(), ConfigError> {
    // IFNAMSIZ is 16 including the terminating NUL.
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', ' ', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(invalid(
            key,
            format!("{name:?} is not a valid interface name (1..15 characters, no '/' or spaces)"),
        ));
    }
    Ok(())
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// `[scheduler] affinity` and the keys that go with it. The other keys are refused unless
/// affinity is on: a timeout that does nothing is a mistake to report, not to ignore.
fn affinity_settings(
    raw: &RawScheduler,
) -> Result<Option<crate::datapath::sticky::AffinitySettings>, ConfigError> {
    let on = match raw.affinity.as_deref().unwrap_or("none") {
        "none" => false,
        "client-address" => true,
        other => {
            return Err(invalid(
                "scheduler.affinity",
                format!("unknown affinity {other:?}; expected \"none\" or \"client-address\""),
            ))
        }
    };
    if !on {
        let given = [
            (
                "scheduler.affinity_timeout_ms",
                raw.affinity_timeout_ms.is_some(),
            ),
            (
                "scheduler.affinity_prefix_v4",
                raw.affinity_prefix_v4.is_some(),
            ),
            (
                "scheduler.affinity_prefix_v6",
                raw.affinity_prefix_v6.is_some(),
            ),
            (
                "scheduler.affinity_capacity",
                raw.affinity_capacity.is_some(),
            ),
        ];
        if let Some((key, _)) = given.iter().find(|(_, set)| *set) {
            return Err(invalid(
                *key,
                "is set, but scheduler.affinity is \"none\" (set it to \"client-address\")",
            ));
        }
        return Ok(None);
    }
    let timeout_ms = raw
        .affinity_timeout_ms
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_MS);
    if !(1..=MAX_AFFINITY_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(invalid(
            "scheduler.affinity_timeout_ms",
            format!("{timeout_ms} is outside 1..={MAX_AFFINITY_TIMEOUT_MS}"),
        ));
    }
    let prefix_v4 = raw.affinity_prefix_v4.unwrap_or(32);
    if !(1..=32).contains(&prefix_v4) {
        return Err(invalid(
            "scheduler.affinity_prefix_v4",
            format!("{prefix_v4} is outside 1..=32"),
        ));
    }
    let prefix_v6 = raw.affinity_prefix_v6.unwrap_or(128);
    if !(1..=128).contains(&prefix_v6) {
        return Err(invalid(
            "scheduler.affinity_prefix_v6",
            format!("{prefix_v6} is outside 1..=128"),
        ));
    }
    let capacity = raw.affinity_capacity.unwrap_or(DEFAULT_AFFINITY_CAPACITY);
    if !(1024..=(1 << 24)).contains(&capacity) {
        return Err(invalid(
            "scheduler.affinity_capacity",
            format!("{capacity} is outside 1024..=16777216"),
        ));
    }
    Ok(Some(crate::datapath::sticky::AffinitySettings {
        timeout: Duration::from_millis(timeout_ms),
        prefix_v4,
        prefix_v6,
        capacity,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_id = 2
[cluster]
vip = "192.0.2.1"
vip_prefix_len = 24
tcp_ports = [443, 80]
client_interface = "eth0"
cluster_interface = "eth1"
cluster_mac = "02:bf:c0:00:02:01"
[scheduler]
policy = "least-connections"
[election]
mode = "static"
master = 1
[control]
socket = "/tmp/x.sock"
[[nodes]]
id = 3
address = "198.51.100.13"
[[nodes]]
id = 1
address = "198.51.100.11"
[[nodes]]
id = 2
address = "198.51.100.12"
"#;

    #[test]
    fn good_config_parses() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.tcp_ports, vec![80, 443]);
        assert_eq!(c.policy, PolicyName::LeastConnections);
        assert_eq!(c.election, ElectionMode::Static { master: 1 });
        assert_eq!(
            c.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(c.self_index(), 1);
        assert_eq!(c.cluster_mac, Some([2, 0xbf, 0xc0, 0, 2, 1]));
        assert_eq!(c.egress_mac(), Some([2, 2, 192, 0, 2, 1]));
        assert_eq!(c.syn_record_window, Duration::from_secs(64));
        assert_eq!(
            c.syn_recv_wait,
            Duration::from_millis(DEFAULT_SYN_RECV_WAIT_MS)
        );
        assert!(c.replicate_records && c.reconcile_syn_recv);
        assert_eq!(c.weights, vec![1, 1, 1]);
        assert_eq!(c.load_source, LoadSource::Loadavg);
    }

    #[test]
    fn weights_follow_node_ids_and_load_sources_parse() {
        let text = GOOD
            .replace(
                "address = \"198.51.100.13\"",
                "address = \"198.51.100.13\"\nweight = 3",
            )
            .replace(
                "policy = \"least-connections\"",
                "policy = \"least-load\"\nload_file = \"/run/load\"",
            );
        let c = Config::parse(&text).unwrap();
        // Node 3 is listed first in the file but sorts last.
        assert_eq!(c.weights, vec![1, 1, 3]);
        assert_eq!(c.policy, PolicyName::LeastLoad);
        assert_eq!(c.load_source, LoadSource::File("/run/load".into()));
        for (name, p) in PolicyName::ALL {
            assert_eq!(PolicyName::parse(name), Some(p));
            assert_eq!(p.as_str(), name);
        }
    }

    /// Each bad edit must fail and name its key.
    #[test]
    fn bad_configs_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "vip = \"192.0.2.1\"",
                "vip = \"192.0.2.300\"",
                "cluster.vip",
            ),
            (
                "vip_prefix_len = 24",
                "vip_prefix_len = 33",
                "cluster.vip_prefix_len",
            ),
            (
                "tcp_ports = [443, 80]",
                "tcp_ports = [80, 70000]",
                "cluster.tcp_ports",
            ),
            (
                "tcp_ports = [443, 80]",
                "tcp_ports = [80, 80]",
                "cluster.tcp_ports",
            ),
            (
                "cluster_interface = \"eth1\"",
                "cluster_interface = \"eth0\"",
                "cluster.cluster_interface",
            ),
            (
                "client_interface = \"eth0\"",
                "client_interface = \"a-very-long-interface-name\"",
                "cluster.client_interface",
            ),
            (
                "cluster_mac = \"02:bf:c0:00:02:01\"",
                "cluster_mac = \"zz\"",
                "cluster.cluster_mac",
            ),
            (
                "cluster_mac = \"02:bf:c0:00:02:01\"",
                "cluster_mac = \"01:00:5e:00:00:01\"",
                "cluster.cluster_mac",
            ),
            (
                "policy = \"least-connections\"",
                "policy = \"random\"",
                "scheduler.policy",
            ),
            ("master = 1", "master = 9", "election.master"),
            (
                "address = \"198.51.100.12\"",
                "address = \"198.51.100.12\"\nweight = -1",
                "nodes[2].weight",
            ),
            (
                "address = \"198.51.100.12\"",
                "address = \"198.51.100.12\"\nweight = 1001",
                "nodes[2].weight",
            ),
            (
                "policy = \"least-connections\"",
                "policy = \"least-load\"\nload_file = \"/x\"\nload_command = \"echo 1\"",
                "scheduler.load_command",
            ),
            ("mode = \"static\"", "mode = \"paxos\"", "election.mode"),
            (
                "policy = \"least-connections\"",
                "policy = \"least-connections\"\nsyn_recv_wait_ms = 0",
                "scheduler.syn_recv_wait_ms",
            ),
            (
                "policy = \"least-connections\"",
                "policy = \"least-connections\"\nsyn_recv_wait_ms = 2001",
                "scheduler.syn_recv_wait_ms",
            ),
            ("node_id = 2", "node_id = 7", "node_id"),
            (
                "address = \"198.51.100.13\"",
                "address = \"198.51.100.11\"",
                "nodes[1].address",
            ),
            (
                "address = \"198.51.100.13\"",
                "address = \"192.0.2.1\"",
                "nodes[0].address",
            ),
            ("id = 3", "id = 1", "nodes[1].id"),
            (
                "vip = \"192.0.2.1\"",
                "vip = \"192.0.2.1\"\nbogus = 1",
                "bogus",
            ),
            ("node_id = 2", "", "node_id"),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "fixture lacks {from}");
            let text = GOOD.replacen(from, to, 1);
            let err = Config::parse(&text).expect_err(&format!("accepted {to:?}"));
            let msg = err.to_string();
            assert!(
                msg.contains(key),
                "error for {to:?} does not name {key}: {msg}"
            );
        }
    }

    #[test]
    fn tcp_fastopen_key_defaults_to_the_cluster_key_and_refuses_unknown_sources() {
        assert_eq!(
            Config::parse(GOOD).unwrap().tcp_fastopen_key,
            FastOpenKeySource::Cluster
        );
        let with = |v: &str| {
            GOOD.replacen(
                "vip = \"192.0.2.1\"",
                &format!("vip = \"192.0.2.1\"\ntcp_fastopen_key = {v}"),
                1,
            )
        };
        assert_eq!(
            Config::parse(&with("\"keep\"")).unwrap().tcp_fastopen_key,
            FastOpenKeySource::Keep
        );
        for bad in ["\"adbc6319-c5376d03-0893bf1b-f7d234ae\"", "\"\"", "1"] {
            let msg = Config::parse(&with(bad)).unwrap_err().to_string();
            assert!(
                msg.contains("cluster.tcp_fastopen_key") || msg.contains("tcp_fastopen_key"),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn drain_timeout_has_a_default_and_an_upper_bound() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(
            c.drain_timeout,
            Duration::from_millis(DEFAULT_DRAIN_TIMEOUT_MS)
        );
        let c = Config::parse(&format!("{GOOD}\n[shutdown]\ndrain_timeout_ms = 0\n")).unwrap();
        assert_eq!(c.drain_timeout, Duration::ZERO);
        let text = format!("{GOOD}\n[shutdown]\ndrain_timeout_ms = 3600001\n");
        let msg = Config::parse(&text).unwrap_err().to_string();
        assert!(msg.contains("shutdown.drain_timeout_ms"), "{msg}");
        let text = format!("{GOOD}\n[shutdown]\ndrain_timeout = 5\n");
        let msg = Config::parse(&text).unwrap_err().to_string();
        assert!(msg.contains("drain_timeout"), "{msg}");
    }

    #[test]
    fn flood_limit_is_off_by_default_and_fills_in_its_defaults() {
        assert_eq!(Config::parse(GOOD).unwrap().syn_prefix_limit, None);
        let off = Config::parse(&format!("{GOOD}\n[flood]\nsyn_prefix_rate = 0\n")).unwrap();
        assert_eq!(off.syn_prefix_limit, None);
        let c = Config::parse(&format!("{GOOD}\n[flood]\nsyn_prefix_rate = 200\n")).unwrap();
        assert_eq!(
            c.syn_prefix_limit,
            Some(tdsc_rules::SynPrefixLimit {
                rate_per_second: 200,
                burst: 200,
                prefix_v4: DEFAULT_FLOOD_PREFIX_V4,
                prefix_v6: DEFAULT_FLOOD_PREFIX_V6,
            })
        );
        let text = format!(
            "{GOOD}\n[flood]\nsyn_prefix_rate = 50\nsyn_prefix_burst = 10\nprefix_v4 = 32\nprefix_v6 = 64\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            c.syn_prefix_limit,
            Some(tdsc_rules::SynPrefixLimit {
                rate_per_second: 50,
                burst: 10,
                prefix_v4: 32,
                prefix_v6: 64,
            })
        );
        // What the daemon hands the ruleset passes the ruleset's own checks.
        crate::node::cluster_spec(&c).validate().unwrap();
        assert_eq!(
            crate::node::cluster_spec(&c).syn_prefix_limit,
            c.syn_prefix_limit
        );
    }

    fn with_scheduler(extra: &str) -> String {
        GOOD.replace("[scheduler]\n", &format!("[scheduler]\n{extra}\n"))
    }

    #[test]
    fn affinity_is_off_by_default_and_fills_in_its_defaults() {
        assert_eq!(Config::parse(GOOD).unwrap().affinity, None);
        let off = Config::parse(&with_scheduler("affinity = \"none\"")).unwrap();
        assert_eq!(off.affinity, None);
        let c = Config::parse(&with_scheduler("affinity = \"client-address\"")).unwrap();
        assert_eq!(
            c.affinity,
            Some(crate::datapath::sticky::AffinitySettings {
                timeout: Duration::from_millis(DEFAULT_AFFINITY_TIMEOUT_MS),
                prefix_v4: 32,
                prefix_v6: 128,
                capacity: DEFAULT_AFFINITY_CAPACITY,
            })
        );
        let c = Config::parse(&with_scheduler(
            "affinity = \"client-address\"\naffinity_timeout_ms = 2000\naffinity_prefix_v4 = 24\naffinity_prefix_v6 = 64\naffinity_capacity = 4096",
        ))
        .unwrap();
        assert_eq!(
            c.affinity,
            Some(crate::datapath::sticky::AffinitySettings {
                timeout: Duration::from_millis(2000),
                prefix_v4: 24,
                prefix_v6: 64,
                capacity: 4096,
            })
        );
    }

    /// Each bad affinity setting must fail and name its key.
    #[test]
    fn bad_affinity_values_name_the_key() {
        let on = "affinity = \"client-address\"\n";
        let cases = [
            ("affinity = \"source\"".to_owned(), "scheduler.affinity"),
            ("affinity = 1".to_owned(), "affinity"),
            (
                format!("{on}affinity_timeout_ms = 0"),
                "scheduler.affinity_timeout_ms",
            ),
            (
                format!("{on}affinity_timeout_ms = 86400001"),
                "scheduler.affinity_timeout_ms",
            ),
            (
                format!("{on}affinity_prefix_v4 = 0"),
                "scheduler.affinity_prefix_v4",
            ),
            (
                format!("{on}affinity_prefix_v4 = 33"),
                "scheduler.affinity_prefix_v4",
            ),
            (
                format!("{on}affinity_prefix_v6 = 129"),
                "scheduler.affinity_prefix_v6",
            ),
            (
                format!("{on}affinity_capacity = 10"),
                "scheduler.affinity_capacity",
            ),
            // Keys that would do nothing with affinity off.
            (
                "affinity_timeout_ms = 1000".to_owned(),
                "scheduler.affinity_timeout_ms",
            ),
            (
                "affinity = \"none\"\naffinity_prefix_v4 = 24".to_owned(),
                "scheduler.affinity_prefix_v4",
            ),
            ("affinity_timeout = 5".to_owned(), "affinity_timeout"),
        ];
        for (extra, key) in cases {
            let msg = Config::parse(&with_scheduler(&extra))
                .expect_err(&format!("accepted {extra:?}"))
                .to_string();
            assert!(
                msg.contains(key),
                "error for {extra:?} does not name {key}: {msg}"
            );
        }
    }

    #[test]
    fn metrics_are_off_by_default_and_listen_where_told() {
        assert_eq!(Config::parse(GOOD).unwrap().metrics_listen, None);
        let c = Config::parse(&format!(
            "{GOOD}\n[metrics]\nlisten = \"198.51.100.1:9464\"\n"
        ))
        .unwrap();
        assert_eq!(c.metrics_listen, Some("198.51.100.1:9464".parse().unwrap()));
        let c = Config::parse(&format!("{GOOD}\n[metrics]\nlisten = \"[::1]:9464\"\n")).unwrap();
        assert_eq!(c.metrics_listen, Some("[::1]:9464".parse().unwrap()));
    }

    #[test]
    fn bad_metrics_values_name_the_key() {
        for bad in [
            "listen = \"127.0.0.1\"",
            "listen = \"localhost:9464\"",
            "listen = \"127.0.0.1:0\"",
            "listen = \"::1:9464\"",
        ] {
            let err = Config::parse(&format!("{GOOD}\n[metrics]\n{bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("metrics.listen"),
                "error for {bad:?} does not name the key: {err}"
            );
        }
        // Wrong shapes are refused by serde, naming the key.
        for (bad, key) in [("listen = 9464", "listen"), ("port = 9464", "port")] {
            let err = Config::parse(&format!("{GOOD}\n[metrics]\n{bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains(key),
                "error for {bad:?} does not name {key}: {err}"
            );
        }
    }

    /// Each bad `[flood]` table must fail and name its key.
    #[test]
    fn bad_flood_values_name_the_key() {
        let cases = [
            ("syn_prefix_rate = -1", "flood.syn_prefix_rate"),
            ("syn_prefix_rate = 1000000001", "flood.syn_prefix_rate"),
            (
                "syn_prefix_rate = 10\nsyn_prefix_burst = 0",
                "flood.syn_prefix_burst",
            ),
            (
                "syn_prefix_rate = 10\nsyn_prefix_burst = 4294967296",
                "flood.syn_prefix_burst",
            ),
            ("syn_prefix_rate = 10\nprefix_v4 = 0", "flood.prefix_v4"),
            ("syn_prefix_rate = 10\nprefix_v4 = 33", "flood.prefix_v4"),
            ("syn_prefix_rate = 10\nprefix_v6 = 129", "flood.prefix_v6"),
            ("syn_prefix_rate = 10\nprefix_v6 = -48", "flood.prefix_v6"),
            // Keys that would do nothing with the limit off.
            ("syn_prefix_burst = 10", "flood.syn_prefix_burst"),
            ("syn_prefix_rate = 0\nprefix_v4 = 24", "flood.prefix_v4"),
            ("prefix_v6 = 48", "flood.prefix_v6"),
            ("syn_rate = 10", "syn_rate"),
        ];
        for (flood, key) in cases {
            let text = format!("{GOOD}\n[flood]\n{flood}\n");
            let msg = Config::parse(&text)
                .expect_err(&format!("accepted {flood:?}"))
                .to_string();
            assert!(
                msg.contains(key),
                "error for {flood:?} does not name {key}: {msg}"
            );
        }
    }

    #[test]
    fn health_timing_must_tolerate_one_lost_report() {
        let text = format!("{GOOD}\n[health]\nreport_interval_ms = 500\ndead_after_ms = 600\n");
        let msg = Config::parse(&text).unwrap_err().to_string();
        assert!(msg.contains("health.dead_after_ms"), "{msg}");
    }

    #[test]
    fn queue_io_defaults_to_batched_and_is_checked() {
        assert_eq!(Config::parse(GOOD).unwrap().queue_io, QueueIo::Batched);
        let c = Config::parse(&format!("{GOOD}\n[threads]\nqueue_io = \"per-packet\"\n")).unwrap();
        assert_eq!(c.queue_io, QueueIo::PerPacket);
        let msg = Config::parse(&format!("{GOOD}\n[threads]\nqueue_io = \"fast\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("threads.queue_io") && msg.contains("fast"),
            "{msg}"
        );
    }

    #[test]
    fn data_path_cpu_is_optional_and_checked() {
        assert_eq!(Config::parse(GOOD).unwrap().data_path_cpu, None);
        let c = Config::parse(&format!("{GOOD}\n[threads]\ndata_path_cpu = 1\n")).unwrap();
        assert_eq!(c.data_path_cpu, Some(1));
        for bad in ["-1", "1024"] {
            let msg = Config::parse(&format!("{GOOD}\n[threads]\ndata_path_cpu = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains("threads.data_path_cpu"), "{msg}");
        }
    }

    #[test]
    fn raft_is_the_default_mode_with_its_timing_and_data_dir() {
        let text = GOOD.replace("mode = \"static\"\nmaster = 1", "");
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            c.election,
            ElectionMode::Raft {
                settings: tdsc_election::RaftSettings::default(),
                data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            }
        );
        let text = GOOD.replace(
            "mode = \"static\"\nmaster = 1",
            "mode = \"raft\"\ntick_ms = 5\nelection_tick = 20\nheartbeat_tick = 2\ndata_dir = \"/tmp/r\"",
        );
        let ElectionMode::Raft { settings, data_dir } = Config::parse(&text).unwrap().election
        else {
            panic!("not raft");
        };
        assert_eq!(
            (
                settings.tick_ms,
                settings.election_tick,
                settings.heartbeat_tick
            ),
            (5, 20, 2)
        );
        assert_eq!(settings.lease_ms(), 90);
        assert_eq!(data_dir, PathBuf::from("/tmp/r"));
        for bad in [
            "mode = \"raft\"\nelection_tick = 3\nheartbeat_tick = 3",
            "mode = \"raft\"\ntick_ms = 0",
            "mode = \"raft\"\nmaster = 1",
        ] {
            let text = GOOD.replace("mode = \"static\"\nmaster = 1", bad);
            let msg = Config::parse(&text).unwrap_err().to_string();
            assert!(msg.contains("election."), "{bad}: {msg}");
        }
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02-BF-c0-00-02-01"),
            Some([2, 0xbf, 0xc0, 0, 2, 1])
        );
        assert_eq!(parse_mac("02:bf:c0:00:02"), None);
        assert_eq!(parse_mac("02:bf:c0:00:02:01:07"), None);
        assert_eq!(format_mac(&[2, 0xbf, 0xc0, 0, 2, 1]), "02:bf:c0:00:02:01");
    }
}
