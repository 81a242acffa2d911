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
//!     control_port: 7400,
//!     former_members: vec![],
//!     egress_mac: None,
//!     static_hash: StaticHash { index: 0, count: 2, seed: 0x2a },
//!     syn_prefix_limit: None,
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
//! static hash; a node lets a TCP segment to or from the VIP through only if its conntrack
//! entry carries the ownership mark, which the entry gets when this node is given the
//! connection's SYN and loses when a client starts a new connection on the same 4-tuple;
//! proto-253 forwarded SYNs and the cluster port's datagrams are accepted only from cluster
//! members on the cluster interface, and only the daemon's user may send to the cluster port.
//! With [`ClusterSpec::syn_prefix_limit`], the master drops the client SYNs of a source prefix
//! sending faster than the limit before they reach the queue ([`SynPrefixLimit`] says what
//! it does and does not cover).
//!
//! # Exact ownership
//!
//! A node's reaction to a client segment (letting it reach TCP, and anything TCP sends back)
//! must depend only on whether this node holds that connection, never on what conntrack kept
//! of an earlier connection with the same 4-tuple. Port reuse within a second is ordinary: Linux
//! reuses a port at once after an abortive close, and NAT gateways multiplex thousands of
//! clients over one address. The facts the rules rely on, from the kernel's conntrack TCP state
//! machine (`net/netfilter/nf_conntrack_proto_tcp.c`: the `tcp_conntracks` table and
//! `nf_conntrack_tcp_packet`):
//!
//! 1. Conntrack (prerouting, priority -200) sees every client frame on every node before any
//!    filter rule does, and the daemon sets `nf_conntrack_tcp_be_liberal = 1` (window tracking
//!    must never drop a node's own segments). With an entry present, every segment but an
//!    out-of-window RST is therefore valid (`ct state established`): **`ct state invalid`
//!    only means "no entry", not "not mine"**. That was the whole of the old test, and the
//!    bug: a stale entry let another node's segments through to TCP, which answered them.
//! 2. A SYN that meets an entry in TIME_WAIT or CLOSE whose connection was closed (a FIN seen)
//!    or reset from the same side *reopens* it: conntrack kills the old entry and the SYN
//!    builds a new, unconfirmed one. An unconfirmed entry lives only as long as its packet, so
//!    when the SYN is dropped (member) or forwarded and dropped (master), nothing is left. This
//!    is why letting the SYN through conntrack on every node, and queueing or dropping it only
//!    *after* (prerouting at `mangle`, not `raw`), is the better choice: a SYN dropped before
//!    conntrack (raw priority, netdev ingress) would leave even these entries in place.
//! 3. In every other state (SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, and a
//!    TIME_WAIT or CLOSE that does not qualify) the table maps a SYN to `sIG`: conntrack
//!    *ignores* it, keeps the old entry and lets the packet on as `established`. The old
//!    socket behind that entry — an orphaned FIN_WAIT2, a SYN-RECV request socket that keeps
//!    retransmitting its SYN/ACK, a TIME_WAIT socket — then answers the new connection's
//!    segments with ACKs, SYN/ACKs or an RST. Measured in the lab (`tests/tests/exactness.rs`,
//!    before these rules): A in FIN_WAIT2 sent ACKs and its FIN to the client during
//!    connection 2 (3 and 4 of the 6 (A, B) pairs in two runs), and A holding SYN-RECV reset
//!    connection 2 on 6 of 6 pairs.
//! 4. `ct mark` is stored in the entry and `ct mark set` on a packet writes it; a new entry
//!    starts at 0; a packet without an entry makes `ct mark` break the rule (neither `==` nor
//!    `!=` matches), so the `ct state invalid` drops stay beside the mark drops.
//! 5. The master's daemon gives every queued SYN a DROP verdict; the SYN it keeps for itself
//!    it re-injects through a raw socket, as a member re-injects a forwarded one (see
//!    `tdscd::datapath::syn_path` for why not an ACCEPT verdict). A re-injected SYN gets its
//!    entry at local output and arrives at input via `lo` with it. So on dispatched ports the
//!    only first SYNs that ever reach the input hook are the ones this node was given, and
//!    marking there marks exactly those connections. (The `eth0` SYN mark is for the
//!    undispatched ports, whose SYNs reach input after the static-hash filter.)
//! 6. With `nf_conntrack_tcp_loose = 0`, a non-SYN segment creates no entry: it is INVALID.
//! 7. On a member, the client's own copy of a SYN from the bridge flood usually reaches
//!    conntrack long before the master's forward of it is re-injected (the forward needs two
//!    daemon wake-ups). But the flood copy waits in a softirq backlog, and on a busy host the
//!    backlog can wait for `ksoftirqd`, so the forward sometimes wins: the flood copy then
//!    meets the fresh SYN_RECV entry (`sIG`, fact 3), and rule 1 would take the mark off the
//!    handshake the member just answered, and the connection would stall (the repository's
//!    `docs/design/exactness.md`, "A late copy of a forwarded SYN").
//!
//! The rules that follow: the client's first SYN clears the mark on whatever entry survived
//! (facts 2 and 3) on every node, before it is queued or dropped, unless it is a copy of a SYN
//! this node was given lately (fact 7): the input chain marks the SYN's entry on the node that
//! was given it (fact 5) and remembers the SYN, by (client address, client port, VIP port,
//! sequence number), in the set `given` for 5 s. A new connection on the same 4-tuple has
//! another initial sequence number, so it still disowns the old entry. Every other TCP segment
//! from the client interface to the VIP, and every TCP segment from the VIP out of it, passes
//! only with the mark (facts 1, 4, 6). The `socket` expression was weighed and left: it also
//! finds listeners, TIME_WAIT and request sockets, and a stale one of those is the very problem.
//!
//! What remains: the set holds 65,536 SYNs (13,107 given a second for 5 s); beyond that a SYN
//! is not remembered and a late copy of it may stall its connection (never reset it). Applying
//! a ruleset (a role change) keeps the set and its elements ([`Firewall::apply`]). A client that reused a port within 5 s with the very same
//! initial sequence number would keep the old owner's entry marked; Linux draws it from a keyed
//! hash of the 4-tuple plus a clock that moves 64 ns a tick.
//!
//! The mark is the whole 32-bit `ct mark` of connections to and from the VIP; an administrator
//! must not use conntrack marks for them. Connections open when a node first installs these
//! rules carry no mark and are dropped.
//!
//! # Host requirements
//!
//! * nf_tables with hash sets that the packet path may update (`nft_set_hash`, `dynset`:
//!   part of nf_tables on every distribution kernel), for the set `given`.
//! * With a SYN limit, `nft_limit` (`CONFIG_NFT_LIMIT`) too, carried by `dynset` so that each
//!   set element keeps its own `limit` state (tested on 6.18). Without it the master's apply
//!   fails, and the old ruleset stays.
//! * `net.netfilter.nf_conntrack_tcp_loose = 0` (the daemon sets it). With the default of 1,
//!   conntrack picks up a mid-stream segment as a new ESTABLISHED connection (with mark 0, so
//!   the mark rules would still drop it, but counted as "not owned" rather than "untracked").
//! * Conntrack itself: the ownership mark lives in the conntrack entry, so a node that runs
//!   out of entries (`nf_conntrack_max`) drops new connections instead of serving them.
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
pub use firewall::{Firewall, RuleDrops};
pub use model::{
    ruleset, syn_prefix_set_name, Action, Chain, ChainName, ClusterSpec, Family, GivenSet,
    HashInput, HostFacts, IpFamily, L4Proto, Match, NamedSet, QueueBackend, Role, Rule, Ruleset,
    StaticHash, SynPrefixLimit, SynPrefixSet, Table, GIVEN_SET_NAME, GIVEN_SIZE, GIVEN_TIMEOUT_MS,
    MAX_SYN_PREFIX_RATE, SYN_PREFIX_SIZE, SYN_PREFIX_TIMEOUT_MS,
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

/// The conntrack mark of a connection this node owns (`ct mark`): set when this node's TCP
/// sends the connection's SYN/ACK (or SYN), cleared when a client starts a new connection on
/// the same 4-tuple. Every other TCP segment to or from the VIP on the client interface is
/// dropped. tcp-dsc owns the whole conntrack mark of such connections.
pub const CT_MARK_OWNED: u32 = 0x0dc5_0001;

/// Priority of our `prerouting` base chain: `mangle` (-150, `NF_IP_PRI_MANGLE`).
///
/// After conntrack (-200), so that a client's SYN reaches conntrack on every node: there it
/// ends an earlier connection's entry that may be reopened (TIME_WAIT, CLOSE after an RST),
/// and our first rule takes the ownership mark off any entry it leaves. Before routing and the
/// input hook, so the SYN is queued or dropped before anything else sees it.
pub const PREROUTING_PRIORITY: i32 = -150;

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
