//! What the kernel must do for a tcp-dsc role.
//!
//! Every node of a tcp-dsc cluster holds the same VIP and MAC and receives every client frame.
//! The packet filter decides which of those frames this node may hand to its TCP stack. This
//! crate turns a node's role and the cluster configuration into that filter, and installs it.
//!
//! # The flow
//!
//! 1. **Resolve host facts.** Whether the kernel has the native nftables `queue` expression is
//!    a fact about the host, not about the cluster. [`Firewall::probe`] finds out once, so that
//!    generation stays pure.
//! 2. **Generate the ruleset value.** [`ruleset`] is a pure, deterministic function of the
//!    [`Role`], the [`ClusterSpec`] and the [`HostFacts`]. It opens no socket, so it is unit-
//!    and golden-tested without root.
//! 3. **Render it as text.** [`Ruleset::to_nft_text`] prints exactly what `nft list ruleset`
//!    prints once the ruleset is installed. Operators diff it; tests compare it with golden files.
//! 4. **Apply it as one batch.** [`Firewall::apply`] lowers the value to nf_tables netlink
//!    messages and sends them as one transaction: `add table; delete table; add table; chains;
//!    rules`. Adding before deleting makes the delete succeed whether or not the table existed,
//!    and because the whole batch commits or aborts as a unit, packets never see a half-built
//!    ruleset, and a master↔member switch is a single atomic swap. Every message is acknowledged
//!    and every acknowledgement is checked.
//! 5. **Read it back.** [`Firewall::verify`] dumps our tables over netlink and compares each
//!    chain's hook and rules (as libnftnl renders them) with the messages we sent.
//!
//! ```
//! use std::net::{IpAddr, Ipv4Addr};
//! use tdsc_rules::{ruleset, ClusterSpec, HostFacts, QueueBackend, Role, StaticHash};
//!
//! let spec = ClusterSpec {
//!     vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
//!     tcp_ports: vec![80, 443],
//!     client_interface: "eth0".into(),
//!     cluster_interface: "eth1".into(),
//!     members: vec![
//!         IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11)),
//!         IpAddr::V4(Ipv4Addr::new(198, 51, 100, 12)),
//!     ],
//!     queue_num: 0,
//!     egress_mac: None,
//!     static_hash: StaticHash { index: 0, count: 2, seed: 0x2a },
//! };
//! spec.validate().unwrap();
//! // In the daemon the facts come from `Firewall::probe`.
//! let facts = HostFacts { queue: QueueBackend::Compat };
//! let rs = ruleset(Role::Member, &spec, &facts);
//! let text = rs.to_nft_text();
//! assert!(text.contains("tcp dport { 80, 443 } tcp flags syn / fin,syn,rst,ack counter"));
//! // As root, in the node's network namespace:
//! // let mut fw = tdsc_rules::Firewall::open()?;
//! // fw.apply(&rs)?;
//! // fw.verify(&rs)?;
//! ```
//!
//! # What the ruleset does
//!
//! See [`ruleset`] for each rule and the fact it relies on. In short: client SYNs for the VIP go
//! to the master's NFQUEUE (members drop them); flows the master does not dispatch are split by a
//! static hash; segments of connections this node does not own are INVALID to conntrack and are
//! dropped before TCP could answer them with an RST; proto-253 forwarded SYNs are accepted only
//! from cluster members.
//!
//! # Host requirements
//!
//! * `net.netfilter.nf_conntrack_tcp_loose = 0` (the daemon sets it). With the default of 1,
//!   conntrack picks up a mid-stream segment as a new ESTABLISHED connection, so another node's
//!   segments would not be INVALID and this node's TCP stack would answer them with RSTs.
//! * The socket [`Firewall::open`] creates works in the network namespace of the calling thread
//!   at the time of the call. To manage another namespace, `setns(CLONE_NEWNET)` on a
//!   dedicated thread and open the `Firewall` there; afterwards it may move to any thread
//!   (`Firewall` is `Send`) and keeps talking to that namespace.
//! * `CAP_NET_ADMIN` in that namespace.
//!
//! # Things worth knowing
//!
//! * The tables have no `owner` flag on purpose: if the daemon dies, the member rules stay and
//!   keep dropping client SYNs, rather than every node accepting them.
//! * With [`QueueBackend::Compat`], `nft list ruleset` also prints
//!   `# Warning: table inet tdsc is managed by iptables-nft, do not touch!` and a libxtables
//!   note on stderr. That is nft noticing the xtables target; the listing itself is correct.
//! * `nft_compat` makes a new xtables target wait for the previous transaction's deferred
//!   destructors, i.e. an RCU grace period (about 15 ms here). Replacing a ruleset that
//!   contains the compat target right after another replacement therefore takes ~15 ms instead
//!   of ~0.2 ms (`examples/apply_bench.rs` shows both). Role changes are rare; it does not matter
//!   unless applies are issued back to back.
//! * Anonymous port sets are bound to their rule and constant, so the kernel refuses to change
//!   their elements later; [`Firewall::verify`] compares the rules that reference them but not
//!   the elements.

mod error;
mod expr;
mod ffi;
mod firewall;
mod lower;
mod model;

pub use error::Error;
pub use firewall::Firewall;
pub use model::{
    ruleset, Action, Chain, ChainName, ClusterSpec, Family, HashInput, HostFacts, IpFamily,
    L4Proto, Match, QueueBackend, Role, Rule, Ruleset, StaticHash, Table,
};

/// Name of both our tables, `table inet tdsc` and `table netdev tdsc`. Everything the crate
/// installs lives in these two tables, so removing them removes exactly what we added and never
/// touches the administrator's own tables.
pub const TABLE_NAME: &str = "tdsc";

/// IP protocol number of the encapsulation that carries a forwarded SYN between nodes.
/// RFC 3692 sets 253 and 254 aside for experimentation and testing.
pub const FORWARD_PROTO: u8 = 253;

/// Priority of our `input` and `output` base chains: `filter - 10`.
///
/// Conntrack runs at -200 (`NF_IP_PRI_CONNTRACK`), so `ct state` is known when our rules run;
/// -10 runs before the usual `filter` (0) chains an administrator writes, so a broad `accept`
/// of theirs cannot let another node's segments reach TCP first.
pub const INET_PRIORITY: i32 = -10;

/// Priority of the netdev `egress` base chain (`filter`, 0). It is the only chain on that hook
/// that we install; the number only orders it against other egress chains.
pub const EGRESS_PRIORITY: i32 = 0;

#[cfg(test)]
mod tests {
    #[test]
    fn firewall_can_move_to_the_daemon_task() {
        fn assert_send<T: Send>() {}
        assert_send::<crate::Firewall>();
        assert_send::<crate::Error>();
    }
}
