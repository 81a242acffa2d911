//! The JSON that `tdscctl status --json` prints, as far as the lab reads it. Unknown fields are
//! ignored and missing ones default, so the lab keeps working while the daemon grows.

use serde::Deserialize;

/// A node's view of the cluster.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Status {
    pub node_id: u32,
    /// `master` or `member`.
    pub role: String,
    pub master_id: Option<u32>,
    /// Election term (static election: 1).
    pub term: u64,
    pub policy: String,
    /// The Raft leader this node knows of.
    pub leader_id: Option<u32>,
    /// This node is a member of the cluster (false once removed).
    pub member: bool,
    /// Voting members, sorted.
    pub voters: Vec<u32>,
    pub nodes: Vec<NodeStatus>,
    pub counters: Counters,
    /// SYN-forward record replication and the last takeover.
    pub records: Records,
    /// The keyring's ids and the sealing one.
    pub cluster_key: ClusterKey,
    /// Client affinity; `None` when off.
    pub affinity: Option<Affinity>,
    /// This node's application health checks.
    pub health: Option<Health>,
}

/// `health` of `tdscctl status --json`: this node's own checks.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Health {
    pub healthy: bool,
    pub checks: Vec<HealthCheck>,
}

/// One check in [`Health`].
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HealthCheck {
    pub name: String,
    /// None before its first probe.
    pub passing: Option<bool>,
    pub last_failure: Option<String>,
    pub probes: u64,
    pub failures: u64,
    pub downs: u64,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

/// `affinity` of `tdscctl status --json`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Affinity {
    pub timeout_ms: u64,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub replica_live: u64,
    pub hits: u64,
    pub evicted_live: u64,
}

/// `cluster_key` of `tdscctl status --json`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClusterKey {
    pub ids: Vec<u8>,
    pub send: u8,
    /// The cluster key ids the TCP Fast Open keys come from; `None` with `"keep"`.
    pub tcp_fastopen: Option<FastOpen>,
}

/// `cluster_key.tcp_fastopen` of `tdscctl status --json`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct FastOpen {
    pub primary: u8,
    pub backup: Option<u8>,
}

/// Replicated SYN-forward records as one node sees them.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Records {
    pub replicate: bool,
    pub proposed_records: u64,
    pub applied_records: u64,
    pub replica_live: u64,
    pub queries_answered: u64,
    pub last_takeover: Option<Takeover>,
}

/// What a node adopted when it last became master.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Takeover {
    pub term: u64,
    pub records_adopted: u64,
    pub affinity_adopted: u64,
    pub syn_recv_reconciled: u64,
    pub members_asked: u32,
    pub members_answered: u32,
    pub wait_ms: u64,
}

/// One peer as a node sees it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NodeStatus {
    pub id: u32,
    pub address: String,
    pub alive: bool,
    /// The node whose status this is.
    #[serde(rename = "self")]
    pub is_self: bool,
    pub connections: u64,
    pub draining: bool,
    /// Every health check of the node passes, as it reported.
    pub healthy: bool,
    pub weight: u32,
    /// Load figure in milli-units.
    pub load: u32,
    /// A voting member of the Raft group.
    pub voter: bool,
}

/// Data-path counters of one node.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Counters {
    pub syns_dispatched: u64,
    pub forwarded_out: u64,
    pub accepted_locally: u64,
    pub received_forwarded: u64,
    pub reinjected: u64,
    pub retransmit_hits: u64,
    pub forward_send_errors: u64,
    /// New SYN-forward records the Raft task had no room for (not replicated).
    pub records_handoff_overflow: u64,
    pub forward_rejected: Rejected,
    /// Cluster datagrams accepted and refused (all reasons).
    pub reports_received: u64,
    pub reports_rejected: u64,
    /// Cluster datagrams refused, by reason.
    pub cluster_dropped: ClusterDropped,
    /// Drops outside the daemon's own code (NFQUEUE overruns, the ruleset's drop rules).
    pub drops: Drops,
    /// What the control socket refused.
    pub control: ControlRefused,
    /// The master's NFQUEUE reader.
    pub queue: QueueStats,
    /// Control requests over the cluster channel.
    pub remote_control: RemoteControl,
}

/// `counters.remote_control` of `tdscctl status --json` (the counts the lab reads).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RemoteControl {
    pub forwarded: u64,
    pub timeouts: u64,
    pub served: u64,
    pub failed: u64,
    pub bad_request: u64,
    pub not_target: u64,
}

/// `counters.queue` of `tdscctl status --json` (its `io` name is left out: the counts tell
/// the two readers apart, `batches` stays 0 for `per-packet`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct QueueStats {
    pub rcvbuf: u64,
    pub received: u64,
    pub batches: u64,
    pub batch_max: u64,
    pub enobufs: u64,
    pub verdict_errors: u64,
    pub malformed: u64,
}

/// `counters.control` of `tdscctl status --json`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ControlRefused {
    pub oversize: u64,
    pub over_cap: u64,
}

/// `counters.cluster_dropped` of `tdscctl status --json`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClusterDropped {
    pub source_port: u64,
    pub bad_header: u64,
    pub unknown_key: u64,
    pub bad_tag: u64,
    pub unknown_sender: u64,
    pub replay: u64,
    pub undecodable: u64,
    pub no_owner: u64,
}

/// `counters.drops` of `tdscctl status --json`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Drops {
    pub queue_kernel: u64,
    pub queue_user: u64,
    pub not_owned_in: u64,
    pub not_owned_out: u64,
    pub untracked_in: u64,
    pub untracked_out: u64,
    pub control_port_foreign: u64,
    pub control_port_local: u64,
    pub syn_prefix_limited: u64,
    pub listen_overflows: u64,
    pub listen_drops: u64,
    pub conntrack_insert_failed: u64,
    pub conntrack_drop: u64,
}

/// Why received proto-253 packets were refused.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Rejected {
    pub malformed: u64,
    pub unknown_peer: u64,
    pub wrong_vip: u64,
    pub not_syn: u64,
    pub bad_port: u64,
    /// Stamped with an older election term than the receiver knows.
    pub stale_term: u64,
    /// The tag does not verify.
    pub bad_tag: u64,
    /// Tagged with a key id the receiver does not hold.
    pub unknown_key: u64,
    /// A counter seen before: a replayed forward.
    pub replay: u64,
    pub ruleset_foreign: u64,
}

impl Rejected {
    /// All rejections together.
    pub fn total(&self) -> u64 {
        self.malformed
            + self.unknown_peer
            + self.wrong_vip
            + self.not_syn
            + self.bad_port
            + self.stale_term
            + self.bad_tag
            + self.unknown_key
            + self.replay
            + self.ruleset_foreign
    }
}

impl Status {
    /// Whether this node says it is the master.
    pub fn is_master(&self) -> bool {
        self.role == "master"
    }
}

/// Runs `tdscctl --socket SOCKET ARGS…` and returns its stdout; a failure to run it or a
/// non-zero exit is an error naming the command and carrying stderr.
pub fn tdscctl(
    tdscctl: &std::path::Path,
    socket: &std::path::Path,
    args: &[&str],
) -> Result<String, String> {
    let out = std::process::Command::new(tdscctl)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tdscctl.display()))?;
    if !out.status.success() {
        return Err(format!(
            "tdscctl {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `tdscctl status --json` of the daemon behind `socket`, parsed.
pub fn query(tdscctl_path: &std::path::Path, socket: &std::path::Path) -> Result<Status, String> {
    let out = tdscctl(tdscctl_path, socket, &["status", "--json"])?;
    serde_json::from_str(&out).map_err(|e| format!("unparsable JSON ({e}): {}", out.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape_and_tolerates_extras() {
        let json = r#"{"node_id":1,"role":"master","master_id":1,"policy":"round-robin",
            "nodes":[{"id":1,"address":"198.51.100.11","alive":true,"connections":0,"extra":1}],
            "counters":{"syns_dispatched":5,"forwarded_out":3,"accepted_locally":2,
            "received_forwarded":0,"reinjected":0,"retransmit_hits":1,"forward_send_errors":0,
            "forward_rejected":{"malformed":1,"unknown_peer":0,"wrong_vip":2,"not_syn":0,
            "bad_port":0,"ruleset_foreign":0},"new_counter":7},"uptime":3}"#;
        let s: Status = serde_json::from_str(json).unwrap();
        assert!(s.is_master());
        assert_eq!(s.master_id, Some(1));
        assert_eq!(s.nodes[0].address, "198.51.100.11");
        assert_eq!(s.counters.syns_dispatched, 5);
        assert_eq!(s.counters.forward_rejected.total(), 3);
    }
}
