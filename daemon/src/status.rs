//! The control protocol: one JSON request per line on the node-local Unix socket, one JSON
//! reply per line. `tdscctl` is a thin client of it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u32,
    pub address: String,
    pub alive: bool,
    pub draining: bool,
    /// ESTABLISHED connections on the VIP, as last reported.
    pub connections: u32,
    pub syn_recv: u32,
    #[serde(rename = "self")]
    pub is_self: bool,
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
    pub forward_rejected: Rejected,
    pub reports_sent: u64,
    pub reports_received: u64,
    pub reports_rejected: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub node_id: u32,
    pub role: String,
    pub master_id: Option<u32>,
    pub term: u64,
    pub policy: String,
    pub vip: String,
    pub tcp_ports: Vec<u16>,
    pub queue_backend: String,
    pub l2_mode: String,
    pub nodes: Vec<NodeStatus>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Box<Status>),
    Error { error: String },
}
