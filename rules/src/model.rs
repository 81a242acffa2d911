//! The pure core: role + configuration + host facts → ruleset value → `nft` text.
//!
//! Nothing here touches the kernel. The value is lowered to netlink by `lower.rs`; the text is
//! what `nft list ruleset` prints for the same ruleset (nft 1.0.6 syntax), which the namespace
//! tests check.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use crate::{
    Error, CT_MARK_OWNED, EGRESS_PRIORITY, FORWARD_PROTO, INET_PRIORITY, PREROUTING_PRIORITY,
    TABLE_NAME,
};

/// The node's part in the cluster. One event loop in the daemon owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Takes client SYNs for the VIP off the NFQUEUE and dispatches each new connection.
    Master,
    /// Drops client SYNs; serves the connections the master forwards to it.
    Member,
}

/// How the master's SYN rule hands packets to the NFQUEUE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueBackend {
    /// The nftables `queue` expression (`CONFIG_NFT_QUEUE`).
    Native,
    /// The xtables `NFQUEUE` target (revision 3) run through `nft_compat`, for kernels built
    /// without `CONFIG_NFT_QUEUE`. `nft list ruleset` prints it as `queue num N`, but feeding
    /// that text back through `nft -f` asks for the native expression, so on such a kernel the
    /// master's text cannot be loaded by `nft`; only [`crate::Firewall::apply`] can install it.
    Compat,
}

/// Facts about the host that generation depends on, resolved before generation by
/// [`crate::Firewall::probe`] so that [`ruleset`] stays pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostFacts {
    /// Which queue expression the kernel supports.
    pub queue: QueueBackend,
}

/// This node's bucket of the static hash that splits flows the master does not dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StaticHash {
    /// This node's bucket, `0..count`. Every node must have a different one. `index == count`
    /// means no bucket: the node (one that has left the cluster) drops every undispatched
    /// flow, since the members' buckets cover them all.
    pub index: u32,
    /// Number of buckets (nodes). With 1 (and a bucket) the hash rules are left out.
    pub count: u32,
    /// jhash seed. Every node must use the same one, or a flow could hash to no node or to
    /// two. It is always sent to the kernel, because without one nft_hash picks a random seed
    /// per node.
    pub seed: u32,
}

/// The cluster configuration the ruleset is generated from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterSpec {
    /// The shared virtual IP. An IPv6 VIP produces the `ip6` equivalents of every rule.
    pub vip: IpAddr,
    /// TCP ports the master dispatches; empty means every port.
    pub tcp_ports: Vec<u16>,
    /// Interface that receives client frames (every node sees every frame here).
    pub client_interface: String,
    /// Interface of the cluster network, where forwarded SYNs arrive.
    pub cluster_interface: String,
    /// Cluster-network address of every node, this one included.
    pub members: Vec<IpAddr>,
    /// Cluster-network addresses of nodes removed from the cluster that this node still
    /// knows. The cluster port accepts them too (never proto 253): a removed node that missed
    /// the commit of its removal keeps sending, and is answered with a `Removed` notice.
    pub former_members: Vec<IpAddr>,
    /// NFQUEUE number the master's daemon reads SYNs from.
    pub queue_num: u16,
    /// The cluster socket's UDP port (`[cluster] control_port`): every node sends from it and
    /// to it, so both ports of a genuine cluster datagram are this one.
    pub control_port: u16,
    /// Some(mac): rewrite the source MAC of frames leaving `client_interface` (NLB-style layer-2
    /// mode), so a learning bridge never learns the shared cluster MAC.
    pub egress_mac: Option<[u8; 6]>,
    /// This node's bucket for flows the master does not dispatch.
    pub static_hash: StaticHash,
    /// Some(limit): the master drops a client's first SYN when its source prefix sends
    /// SYNs faster than the limit, before the queue ([`SynPrefixLimit`]). None: no limit, and
    /// the ruleset is what it was before the limit existed.
    pub syn_prefix_limit: Option<SynPrefixLimit>,
}

/// A per-source-prefix rate limit on the client SYNs the master queues: one token bucket per
/// source prefix, kept in the dynamic set [`SynPrefixSet`]. A prefix may send `burst` SYNs at
/// once, then `rate_per_second` a second; the master drops the rest before they reach the
/// queue, so a flood from a few prefixes cannot take the queue's room from everyone else.
///
/// What it does not do, by the kernel's rules (`net/netfilter/nft_dynset.c`): the set holds
/// [`SYN_PREFIX_SIZE`] prefixes, each forgotten [`SYN_PREFIX_TIMEOUT_MS`] after its last SYN.
/// With the set full, a SYN of a prefix not in it cannot be added, the kernel ends the rule
/// there, and the SYN goes on to the queue unlimited: a flood spread over more prefixes than
/// that within the timeout is not limited at all (the overload mode of issue 12 is for that).
/// A forgotten prefix starts again with a full bucket, which it would have had anyway unless
/// `burst` is above `rate_per_second` × the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SynPrefixLimit {
    /// SYNs a second one prefix may send on average, 1..=[`MAX_SYN_PREFIX_RATE`].
    pub rate_per_second: u32,
    /// SYNs one prefix may send at once (the bucket's depth), at least 1.
    pub burst: u32,
    /// Length of the prefix IPv4 sources are grouped by, 1..=32.
    pub prefix_v4: u8,
    /// Length of the prefix IPv6 sources are grouped by, 1..=128.
    pub prefix_v6: u8,
}

impl SynPrefixLimit {
    /// The prefix length sources of `family` are grouped by.
    pub fn prefix_len(&self, family: IpFamily) -> u8 {
        match family {
            IpFamily::V4 => self.prefix_v4,
            IpFamily::V6 => self.prefix_v6,
        }
    }

    /// The mask of the prefix as an address of `family` (`255.255.255.0` for /24), which nft
    /// applies to the source address before it looks the prefix up. Assumes a validated length.
    pub fn mask(&self, family: IpFamily) -> IpAddr {
        let len = u32::from(self.prefix_len(family));
        match family {
            IpFamily::V4 => IpAddr::V4(u32::MAX.checked_shl(32 - len.min(32)).unwrap_or(0).into()),
            IpFamily::V6 => IpAddr::V6(
                u128::MAX
                    .checked_shl(128 - len.min(128))
                    .unwrap_or(0)
                    .into(),
            ),
        }
    }
}

impl ClusterSpec {
    /// Checks what [`ruleset`] assumes: interface names the kernel accepts and a hash bucket
    /// that exists. [`ruleset`] itself never fails; call this when the configuration is loaded.
    pub fn validate(&self) -> Result<(), Error> {
        check_iface("client_interface", &self.client_interface)?;
        check_iface("cluster_interface", &self.cluster_interface)?;
        check_hash(&self.static_hash)?;
        if self.vip.is_unspecified() {
            return Err(invalid("vip", "must not be the unspecified address"));
        }
        if self.members.is_empty() {
            return Err(invalid("members", "must list at least this node"));
        }
        if self.tcp_ports.contains(&0) {
            return Err(invalid("tcp_ports", "port 0 is not a port"));
        }
        if self.control_port == 0 {
            return Err(invalid("control_port", "port 0 is not a port"));
        }
        if let Some(limit) = &self.syn_prefix_limit {
            check_limit(limit)?;
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidSpec {
        field,
        reason: reason.into(),
    }
}

/// Linux interface names are at most `IFNAMSIZ - 1` = 15 bytes; `meta iifname` compares all
/// 16 bytes of the NUL-padded name. A `"` would also break the `nft` text.
fn check_iface(field: &'static str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 15 {
        return Err(invalid(field, format!("{name:?} is not 1-15 bytes long")));
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'"' || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(invalid(
            field,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    Ok(())
}

fn check_hash(hash: &StaticHash) -> Result<(), Error> {
    if hash.count == 0 {
        return Err(invalid("static_hash.count", "must be at least 1"));
    }
    if hash.index > hash.count {
        return Err(invalid(
            "static_hash.index",
            format!("{} is above count {}", hash.index, hash.count),
        ));
    }
    Ok(())
}

/// The kernel refuses a rate of 0 and reads a burst of 0 as 5 (`nft_limit_init`); nft 1.0.6
/// refuses both. A prefix of 0 bits would put every client in one bucket, which is no
/// per-prefix limit.
fn check_limit(limit: &SynPrefixLimit) -> Result<(), Error> {
    if !(1..=MAX_SYN_PREFIX_RATE).contains(&limit.rate_per_second) {
        return Err(invalid(
            "syn_prefix_limit.rate_per_second",
            format!(
                "{} is outside 1..={MAX_SYN_PREFIX_RATE}",
                limit.rate_per_second
            ),
        ));
    }
    if limit.burst == 0 {
        return Err(invalid("syn_prefix_limit.burst", "must be at least 1"));
    }
    if !(1..=32).contains(&limit.prefix_v4) {
        return Err(invalid(
            "syn_prefix_limit.prefix_v4",
            format!("{} is outside 1..=32", limit.prefix_v4),
        ));
    }
    if !(1..=128).contains(&limit.prefix_v6) {
        return Err(invalid(
            "syn_prefix_limit.prefix_v6",
            format!("{} is outside 1..=128", limit.prefix_v6),
        ));
    }
    Ok(())
}

/// Layer-3 family of an address match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4 (`ip`, `NFPROTO_IPV4`).
    V4,
    /// IPv6 (`ip6`, `NFPROTO_IPV6`).
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    fn keyword(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }
}

/// Transport protocol of a port-based hash input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4Proto {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
}

impl L4Proto {
    pub(crate) fn number(self) -> u8 {
        match self {
            L4Proto::Tcp => IPPROTO_TCP,
            L4Proto::Udp => IPPROTO_UDP,
        }
    }

    fn keyword(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
        }
    }
}

pub(crate) const IPPROTO_ICMP: u8 = 1;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
pub(crate) const IPPROTO_ICMPV6: u8 = 58;

/// What a static hash is computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashInput {
    /// Source address only (ICMP echo: there are no ports).
    Saddr(IpFamily),
    /// Source address and source port, so one client's flows spread over the nodes.
    SaddrSport(IpFamily, L4Proto),
}

/// One condition of a rule. Each knows its `nft` text and (in `lower.rs`) its expressions,
/// including the implicit dependencies nft adds (`meta nfproto`, `meta l4proto`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `iifname "NAME"`.
    IifName(String),
    /// `oifname "NAME"`.
    OifName(String),
    /// `ip daddr A` / `ip6 daddr A`.
    Daddr(IpAddr),
    /// `ip saddr A` / `ip6 saddr A`.
    Saddr(IpAddr),
    /// `meta l4proto P`.
    L4Proto(u8),
    /// `tcp dport P`, `tcp dport { P, … }`, or their `!=` forms. Ports are sorted and unique.
    TcpDport {
        /// The ports.
        ports: Vec<u16>,
        /// Match ports *not* in the list.
        negate: bool,
    },
    /// `udp sport S udp dport D`. One match, because nft merges the two adjacent payload
    /// comparisons into one 4-byte load; lowering them apart would not verify against a
    /// ruleset nft loaded from the same text.
    UdpPorts {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// `udp dport P`.
    UdpDport(u16),
    /// `meta skuid != UID`: the packet's socket belongs to another user. A packet without a
    /// socket (one the kernel makes itself) matches neither this nor `==`.
    SkUidNot(u32),
    /// `tcp flags syn / fin,syn,rst,ack`, i.e. `flags & (fin|syn|rst|ack) == syn`: a first SYN,
    /// but not the SYN/ACK that plain `tcp flags syn` would also match.
    TcpSynOnly,
    /// `tcp flags rst`: the RST bit is set.
    TcpRst,
    /// `ct state invalid`.
    CtStateInvalid,
    /// `ct mark != MARK`. A packet without a conntrack entry matches neither this nor `==`
    /// (the expression breaks the rule), which is why [`Match::CtStateInvalid`] stays too.
    CtMarkNot(u32),
    /// `icmp type echo-request` / `icmpv6 type echo-request`.
    EchoRequest(IpFamily),
    /// `ip saddr . tcp sport . tcp dport . tcp sequence != @given` (or `ip6 saddr`): this SYN
    /// is not a copy of one this node was given lately ([`GivenSet`]).
    SynNotGiven(IpFamily),
    /// `update @syn_prefix4 { ip saddr & MASK limit rate over R/second burst B packets }` (or
    /// `syn_prefix6`, `ip6 saddr`): the source prefix's bucket in [`SynPrefixSet`] has no token
    /// left for this SYN. Not a pure test: it adds the prefix to the set (restarting its
    /// timeout) and takes a token. With the set full the kernel ends the rule here, so the
    /// match fails and the SYN is not limited.
    SynPrefixOverLimit {
        /// Family of the source address (the VIP's).
        family: IpFamily,
        /// Rate, burst and prefix lengths.
        limit: SynPrefixLimit,
    },
    /// `jhash INPUT mod COUNT seed SEED != INDEX`: the flow belongs to another node.
    HashNotMine {
        /// Fields hashed.
        input: HashInput,
        /// This node's bucket.
        hash: StaticHash,
    },
}

/// What a rule does with a matching packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `accept`.
    Accept,
    /// `drop`.
    Drop,
    /// Hand the packet to NFQUEUE `num`, without the bypass flag.
    Queue {
        /// Queue number.
        num: u16,
        /// Expression used.
        backend: QueueBackend,
    },
    /// `ether saddr set MAC` (not a verdict: the frame continues).
    SetEtherSaddr([u8; 6]),
    /// `ct mark set MARK` on the packet's conntrack entry (not a verdict: the packet goes on
    /// to the next rule). Without an entry it does nothing.
    SetCtMark(u32),
    /// `update @given { ip saddr . tcp sport . tcp dport . tcp sequence }` (or `ip6 saddr`):
    /// remember this SYN in [`GivenSet`], restarting its timeout. Not a verdict. With the set
    /// full the kernel adds nothing and ends the rule there.
    RememberGiven(IpFamily),
}

/// A rule: conditions, an optional counter, an action and a comment that names its purpose in
/// `nft list ruleset` (and lets [`crate::Firewall::foreign_forward_drops`] find its counter).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// All must hold.
    pub matches: Vec<Match>,
    /// Count matching packets.
    pub counter: bool,
    /// What to do with them.
    pub action: Action,
    /// Short purpose, shown as `comment "…"`.
    pub comment: &'static str,
}

/// Our chains. Each is a base chain with a fixed hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainName {
    /// `inet tdsc prerouting`, hook prerouting: client SYNs, after conntrack saw them.
    Prerouting,
    /// `inet tdsc input`, hook input.
    Input,
    /// `inet tdsc output`, hook output.
    Output,
    /// `netdev tdsc egress`, hook egress on the client interface.
    Egress,
}

impl ChainName {
    /// The chain's name in the kernel.
    pub fn as_str(self) -> &'static str {
        match self {
            ChainName::Prerouting => "prerouting",
            ChainName::Input => "input",
            ChainName::Output => "output",
            ChainName::Egress => "egress",
        }
    }
}

/// A base chain of one of our tables. All are `type filter` with `policy accept`: they only
/// ever remove packets (or rewrite a MAC), everything else goes on to the host's own rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    /// Name, which also fixes the hook.
    pub name: ChainName,
    /// Device, for the netdev egress hook.
    pub device: Option<String>,
    /// Hook priority.
    pub priority: i32,
    /// Rules, evaluated in order.
    pub rules: Vec<Rule>,
}

/// Family of one of our tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// `table inet tdsc`: IPv4 and IPv6 input/output filtering.
    Inet,
    /// `table netdev tdsc`: the layer-2 egress rewrite.
    Netdev,
}

impl Family {
    /// Every family we may own a table in; `apply` and `remove` clear all of them.
    pub const ALL: [Family; 2] = [Family::Inet, Family::Netdev];

    /// The nft keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Netdev => "netdev",
        }
    }
}

/// One of our tables (always named [`TABLE_NAME`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Table {
    /// Family.
    pub family: Family,
    /// Named sets, printed before the chains, in this order.
    pub sets: Vec<NamedSet>,
    /// Chains, in the order they are created and printed.
    pub chains: Vec<Chain>,
}

/// The named set `given` of table `inet tdsc`: the SYNs this node was given lately, as
/// (client address, client port, VIP port, sequence number), each kept [`GIVEN_TIMEOUT_MS`]
/// after it was last seen at input. A client's SYN found in it is a copy of a SYN this node
/// was given (a copy that reached this node's client interface late, after the master's forward
/// of it, or a retransmission), not a new connection: it must not take the ownership mark away.
/// See the crate docs, "Exact ownership".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GivenSet {
    /// Family of the addresses in the key (the VIP's).
    pub family: IpFamily,
}

/// A named set of `table inet tdsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NamedSet {
    /// The SYNs this node was given lately.
    Given(GivenSet),
    /// The master's SYN rate per source prefix.
    SynPrefix(SynPrefixSet),
}

/// The master's dynamic set `syn_prefix4` (IPv4 VIP) or `syn_prefix6` (IPv6 VIP): one element
/// per client source prefix ([`SynPrefixLimit`]) that sent a SYN in the last
/// [`SYN_PREFIX_TIMEOUT_MS`], each carrying its own `limit` state, which the kernel clones
/// from the rule's `update` statement when it adds the element. Only in a master's ruleset
/// with a limit; a role change re-creates it empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SynPrefixSet {
    /// Family of the prefixes (the VIP's).
    pub family: IpFamily,
}

impl SynPrefixSet {
    /// The set's name in the kernel.
    pub fn name(self) -> &'static str {
        syn_prefix_set_name(self.family)
    }
}

/// Name of the [`SynPrefixSet`] of `family`.
pub fn syn_prefix_set_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "syn_prefix4",
        IpFamily::V6 => "syn_prefix6",
    }
}

/// How long a [`SynPrefixSet`] element lives after the prefix's last SYN (every SYN restarts
/// it). Long enough that a prefix sending steadily keeps its bucket; a prefix quiet this long
/// is forgotten, and its bucket would have refilled by then for any burst up to 10 s of rate.
pub const SYN_PREFIX_TIMEOUT_MS: u64 = 10_000;

/// Most elements a [`SynPrefixSet`] holds: 65,536 prefixes seen within
/// [`SYN_PREFIX_TIMEOUT_MS`]. Beyond that a new prefix is not limited ([`SynPrefixLimit`]).
pub const SYN_PREFIX_SIZE: u32 = 65_536;

/// Highest [`SynPrefixLimit::rate_per_second`]. The kernel charges each packet a cost of one
/// second divided by the rate, in whole nanoseconds (`nft_limit_pkts_init`): above 10^9 a
/// second the cost is 0 and the limit would never drop anything.
pub const MAX_SYN_PREFIX_RATE: u32 = 1_000_000_000;

/// Comment of the master's prerouting rule whose counter is `syn_prefix_limited` in
/// [`crate::RuleDrops`].
pub(crate) const SYN_PREFIX_LIMIT_COMMENT: &str =
    "tdsc: SYN rate of this source prefix over the limit";

/// Name of the [`GivenSet`].
pub const GIVEN_SET_NAME: &str = "given";

/// How long a [`GivenSet`] element lives after it was last added or refreshed. A late copy of
/// a SYN arrives microseconds to milliseconds after the forwarded one; a retransmission after
/// 1 s, 3 s and so on. An element gone before a retransmission only means the retransmission
/// takes the mark off until the master's forward of it (to the same node, by its record)
/// puts it back, which is how it worked before the set existed.
pub const GIVEN_TIMEOUT_MS: u64 = 5_000;

/// Most elements a [`GivenSet`] holds: at [`GIVEN_TIMEOUT_MS`], 13,107 SYNs a second given to
/// this node. Beyond that the kernel adds nothing (the rule ends at the `update`) and a late
/// copy of a SYN not remembered may take its mark off (a stall, never a reset).
pub const GIVEN_SIZE: u32 = 65_536;

/// The whole ruleset for one node: the value [`crate::Firewall::apply`] installs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ruleset {
    /// Our tables. A family absent here is removed by `apply`.
    pub tables: Vec<Table>,
}

/// Comment of the rule whose counter [`crate::Firewall::foreign_forward_drops`] reads.
pub(crate) const FOREIGN_DROP_COMMENT: &str = "tdsc: proto 253 from a non-member";

/// Comment of the input rule whose counter is `control_port_foreign` in [`crate::RuleDrops`].
pub(crate) const CONTROL_FOREIGN_COMMENT: &str = "tdsc: cluster port from a non-member";

/// Comment of the output rule whose counter is `control_port_local` in [`crate::RuleDrops`].
pub(crate) const CONTROL_LOCAL_COMMENT: &str = "tdsc: cluster port from an unprivileged process";

/// The daemon's user: it runs as root (it needs `CAP_NET_ADMIN` and writes `/proc/sys`), so a
/// cluster datagram from a socket of any other user is not the daemon's.
pub(crate) const DAEMON_UID: u32 = 0;

/// Comment of the input rule that clears the ownership mark on a client's first SYN.
pub(crate) const DISOWN_COMMENT: &str = "tdsc: a new connection on this 4-tuple, not yet ours";

/// Comment of the rules that mark a connection as this node's when it is given the SYN.
pub(crate) const OWN_COMMENT: &str = "tdsc: a SYN this node was given: it owns the connection";

/// Comment of the input rule that puts a SYN this node was given in the [`GivenSet`].
pub(crate) const REMEMBER_COMMENT: &str =
    "tdsc: remember the SYN this node was given: a late copy of it is no new connection";

/// The loopback interface, where a member's re-injected SYNs arrive.
const LOOPBACK: &str = "lo";

/// Comment of the rules dropping TCP segments conntrack has no entry for (in and out).
pub(crate) const UNTRACKED_COMMENT: &str = "tdsc: segment of no connection this node tracks";

/// Comment of the rules dropping TCP segments of an entry without the ownership mark.
pub(crate) const NOT_OWNED_COMMENT: &str = "tdsc: segment of a connection this node does not own";

/// Builds the ruleset for `role`. Pure and deterministic: the same inputs give the same value,
/// byte for byte, on every node. Assumes [`ClusterSpec::validate`] passed.
///
/// `table inet tdsc`, chain `prerouting` (hook prerouting, priority `mangle`, after conntrack):
///
/// 1. A client's first SYN for the VIP on a dispatched port (`tcp flags & (fin|syn|rst|ack) ==
///    syn`) takes the ownership mark ([`crate::CT_MARK_OWNED`]) off whatever conntrack entry
///    it met: the client starts a new connection on this 4-tuple, and no node owns it yet.
///    Unless it is in the [`GivenSet`]: then it is a copy of a SYN this node was given lately
///    (a late flood copy, a retransmission), and the connection stays this node's.
/// 2. Only on a master with [`ClusterSpec::syn_prefix_limit`]: the same SYN is dropped (and
///    counted) when its source prefix is over the [`SynPrefixLimit`], before it takes room in
///    the queue. After rule 1, so a dropped SYN has disowned its 4-tuple like any other
///    (the client starts a new connection there either way).
/// 3. The same SYN: the master queues it to its daemon, a member drops it, because the master
///    forwards each one to exactly one node.
///
/// Chain `input` (hook input, priority `filter - 10`):
///
/// 1. Flows the master does not dispatch (UDP, TCP on other ports, ICMP echo): a static jhash
///    picks exactly one node; the others drop. Left out with one node.
/// 2. TCP segments for the VIP that conntrack finds INVALID are dropped: with
///    `nf_conntrack_tcp_loose = 0` a segment with no conntrack entry is another node's.
/// 3. A first SYN that got this far was given to this node (accepted by the master's daemon,
///    or, arriving via `lo`, re-injected by a member's): its entry gets the ownership mark.
///    A re-injected one is also put in the [`GivenSet`] (a rule of its own, after the mark:
///    with the set full, the kernel ends that rule at the `update`).
/// 4. Every other TCP segment for the VIP whose entry lacks the mark is dropped, so it never
///    reaches TCP, and TCP never answers it.
/// 5. Protocol 253 (forwarded SYNs) is accepted from each member over the cluster interface,
///    and dropped (and counted) from anyone else.
/// 6. The cluster port likewise: UDP from each member (and each removed node this node knows,
///    [`ClusterSpec::former_members`]) over the cluster interface with the cluster port as
///    both ports is accepted; any other datagram to the cluster port is dropped and counted.
///
/// Every rule that queues or drops matches the client or cluster interface, but the two
/// catch-alls, which match only proto 253 and the cluster port, never TCP. A forwarded SYN is
/// re-injected through a raw socket and arrives again via `lo`, addressed to the VIP; the only
/// `lo` rule marks it, so it is never queued or dropped a second time.
///
/// Chain `output` (hook output): a first SYN from the VIP (a connection this node opens) gets
/// the mark; then any TCP segment from the VIP that conntrack finds INVALID, or whose entry
/// lacks the mark, is dropped: an RST for a segment TCP had no socket for, a TIME_WAIT ACK, a
/// challenge ACK or a retransmitted SYN/ACK of a connection the client has since started
/// again elsewhere is never this node's to send. Last, a datagram to the cluster port leaving
/// by the cluster interface from a socket of a user other than root (the daemon's user) is
/// dropped and counted: it would carry this node's member address, which the others accept.
///
/// Why this is exact, per stale state, is argued in the crate docs ("Exact ownership").
///
/// `table netdev tdsc` (only with `egress_mac`): the egress hook on the client interface
/// rewrites the source MAC, so a learning bridge learns per-node MACs and keeps flooding frames
/// for the shared cluster MAC to every node.
pub fn ruleset(role: Role, spec: &ClusterSpec, facts: &HostFacts) -> Ruleset {
    let family = IpFamily::of(&spec.vip);
    let mut sets = vec![NamedSet::Given(GivenSet { family })];
    if role == Role::Master && spec.syn_prefix_limit.is_some() {
        sets.push(NamedSet::SynPrefix(SynPrefixSet { family }));
    }
    let mut tables = vec![Table {
        family: Family::Inet,
        sets,
        chains: vec![
            Chain {
                name: ChainName::Prerouting,
                device: None,
                priority: PREROUTING_PRIORITY,
                rules: prerouting_rules(role, spec, facts),
            },
            Chain {
                name: ChainName::Input,
                device: None,
                priority: INET_PRIORITY,
                rules: input_rules(spec),
            },
            Chain {
                name: ChainName::Output,
                device: None,
                priority: INET_PRIORITY,
                rules: output_rules(spec),
            },
        ],
    }];
    if let Some(mac) = spec.egress_mac {
        tables.push(Table {
            family: Family::Netdev,
            sets: vec![],
            chains: vec![Chain {
                name: ChainName::Egress,
                device: Some(spec.client_interface.clone()),
                priority: EGRESS_PRIORITY,
                rules: vec![Rule {
                    matches: vec![],
                    counter: false,
                    action: Action::SetEtherSaddr(mac),
                    comment: "tdsc: per-node source MAC",
                }],
            }],
        });
    }
    Ruleset { tables }
}

fn prerouting_rules(role: Role, spec: &ClusterSpec, facts: &HostFacts) -> Vec<Rule> {
    let ports = sorted_ports(spec);
    let mut rules = Vec::new();

    let mut syn = to_vip(spec);
    if !ports.is_empty() {
        syn.push(Match::TcpDport {
            ports: ports.clone(),
            negate: false,
        });
    }
    syn.push(Match::TcpSynOnly);
    // A first SYN means the client starts a new connection on this 4-tuple, and only the node
    // the master gives it to may own it. Whatever conntrack kept of an earlier connection with
    // the same 4-tuple (CLOSE, TIME_WAIT, FIN_WAIT, …: the SYN does not always make conntrack
    // drop it) stops being this node's here; the node given the SYN owns it again when the
    // SYN reaches its input chain (below). A copy of a SYN this node was given lately (the
    // client's own copy arriving after the master's forward of it, or a retransmission) is no
    // new connection, and leaves the mark alone.
    let mut disown = syn.clone();
    disown.push(Match::SynNotGiven(IpFamily::of(&spec.vip)));
    rules.push(Rule {
        matches: disown,
        counter: false,
        action: Action::SetCtMark(0),
        comment: DISOWN_COMMENT,
    });
    // A flood from a few prefixes would otherwise fill the queue, which serves first come
    // first served, so its drops would fall on every client alike. Members need no limit:
    // they drop every client SYN anyway.
    if let (Role::Master, Some(limit)) = (role, spec.syn_prefix_limit) {
        let mut limited = syn.clone();
        limited.push(Match::SynPrefixOverLimit {
            family: IpFamily::of(&spec.vip),
            limit,
        });
        rules.push(Rule {
            matches: limited,
            counter: true,
            action: Action::Drop,
            comment: SYN_PREFIX_LIMIT_COMMENT,
        });
    }
    rules.push(match role {
        // No bypass flag: if the daemon is not reading the queue, the kernel drops the SYN
        // instead of accepting it. Fail closed: with bypass every node would accept every SYN
        // while the master is down, and each would build its own half of the same connection.
        Role::Master => Rule {
            matches: syn,
            counter: true,
            action: Action::Queue {
                num: spec.queue_num,
                backend: facts.queue,
            },
            comment: "tdsc: new connection, to the dispatcher",
        },
        // The master forwards each SYN to exactly one node over proto 253.
        Role::Member => Rule {
            matches: syn,
            counter: true,
            action: Action::Drop,
            comment: "tdsc: new connection, the master dispatches it",
        },
    });

    rules
}

fn sorted_ports(spec: &ClusterSpec) -> Vec<u16> {
    let mut ports = spec.tcp_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Every client-side rule starts here: only frames that arrived on the client interface. A
/// SYN re-injected through the raw socket arrives via `lo` and so passes untouched.
fn to_vip(spec: &ClusterSpec) -> Vec<Match> {
    vec![
        Match::IifName(spec.client_interface.clone()),
        Match::Daddr(spec.vip),
    ]
}

fn input_rules(spec: &ClusterSpec) -> Vec<Rule> {
    let family = IpFamily::of(&spec.vip);
    let ports = sorted_ports(spec);
    let to_vip = || to_vip(spec);
    let mut rules = Vec::new();

    let hash = spec.static_hash;
    if hash.count > 1 || hash.index >= hash.count {
        // jhash is deterministic given the seed, so every node computes the same bucket for a
        // flow and exactly one of them (the one whose index it is) keeps it. With no bucket
        // (index == count) `!= index` always holds and the node keeps none.
        let not_mine = |input| Match::HashNotMine { input, hash };
        let mut udp = to_vip();
        udp.push(not_mine(HashInput::SaddrSport(family, L4Proto::Udp)));
        rules.push(drop_rule(udp, "tdsc: UDP flow of another node"));
        if !ports.is_empty() {
            let mut tcp = to_vip();
            tcp.push(Match::TcpDport {
                ports: ports.clone(),
                negate: true,
            });
            tcp.push(not_mine(HashInput::SaddrSport(family, L4Proto::Tcp)));
            rules.push(drop_rule(
                tcp,
                "tdsc: undispatched TCP flow of another node",
            ));
        }
        let mut echo = to_vip();
        echo.push(Match::EchoRequest(family));
        echo.push(not_mine(HashInput::Saddr(family)));
        rules.push(drop_rule(echo, "tdsc: echo request for another node"));
    }

    let mut invalid = to_vip();
    invalid.push(Match::L4Proto(IPPROTO_TCP));
    invalid.push(Match::CtStateInvalid);
    rules.push(Rule {
        matches: invalid,
        counter: true,
        action: Action::Drop,
        comment: UNTRACKED_COMMENT,
    });
    // The first SYNs that get this far are the ones this node was given: on the client
    // interface, those of undispatched ports whose flows the hash gives this node; via `lo`,
    // those the daemon re-injected (a member's forwarded SYNs and the ones the master keeps).
    let mut given = to_vip();
    given.push(Match::TcpSynOnly);
    rules.push(Rule {
        matches: given,
        counter: false,
        action: Action::SetCtMark(CT_MARK_OWNED),
        comment: OWN_COMMENT,
    });
    rules.push(Rule {
        matches: vec![
            Match::IifName(LOOPBACK.to_owned()),
            Match::Daddr(spec.vip),
            Match::TcpSynOnly,
        ],
        counter: false,
        action: Action::SetCtMark(CT_MARK_OWNED),
        comment: OWN_COMMENT,
    });
    // Its own rule, after the mark: with the set full the `update` ends the rule.
    rules.push(Rule {
        matches: vec![
            Match::IifName(LOOPBACK.to_owned()),
            Match::Daddr(spec.vip),
            Match::TcpSynOnly,
        ],
        counter: false,
        action: Action::RememberGiven(family),
        comment: REMEMBER_COMMENT,
    });
    let mut foreign = to_vip();
    foreign.push(Match::L4Proto(IPPROTO_TCP));
    foreign.push(Match::CtMarkNot(CT_MARK_OWNED));
    rules.push(Rule {
        matches: foreign,
        counter: true,
        action: Action::Drop,
        comment: NOT_OWNED_COMMENT,
    });

    for member in &spec.members {
        rules.push(Rule {
            matches: vec![
                Match::IifName(spec.cluster_interface.clone()),
                Match::Saddr(*member),
                Match::L4Proto(FORWARD_PROTO),
            ],
            counter: false,
            action: Action::Accept,
            comment: "tdsc: forwarded SYN from a member",
        });
    }
    // Anyone else could inject SYNs that bypass the master's dispatch (and its policies).
    rules.push(Rule {
        matches: vec![Match::L4Proto(FORWARD_PROTO)],
        counter: true,
        action: Action::Drop,
        comment: FOREIGN_DROP_COMMENT,
    });

    // The cluster port, in the same way: reports, Raft and takeover messages are accepted
    // only on the cluster interface, from a member's address, sent from the cluster port
    // (every node's socket is bound to it, so a datagram from another port is not a
    // daemon's). Anything else to that port is dropped and counted: a host on the client
    // network, a local process reaching its own node via `lo`, a spoofed non-member.
    let port = spec.control_port;
    for member in spec.members.iter().chain(&spec.former_members) {
        rules.push(Rule {
            matches: vec![
                Match::IifName(spec.cluster_interface.clone()),
                Match::Saddr(*member),
                Match::UdpPorts {
                    sport: port,
                    dport: port,
                },
            ],
            counter: false,
            action: Action::Accept,
            comment: "tdsc: cluster message from a member",
        });
    }
    rules.push(Rule {
        matches: vec![Match::UdpDport(port)],
        counter: true,
        action: Action::Drop,
        comment: CONTROL_FOREIGN_COMMENT,
    });
    rules
}

fn drop_rule(matches: Vec<Match>, comment: &'static str) -> Rule {
    Rule {
        matches,
        counter: false,
        action: Action::Drop,
        comment,
    }
}

fn output_rules(spec: &ClusterSpec) -> Vec<Rule> {
    let from_vip = || {
        vec![
            Match::OifName(spec.client_interface.clone()),
            Match::Saddr(spec.vip),
        ]
    };
    let mut mine = from_vip();
    mine.push(Match::TcpSynOnly);
    let mut untracked = from_vip();
    untracked.extend([Match::L4Proto(IPPROTO_TCP), Match::CtStateInvalid]);
    let mut foreign = from_vip();
    foreign.extend([Match::L4Proto(IPPROTO_TCP), Match::CtMarkNot(CT_MARK_OWNED)]);
    vec![
        // A first SYN from the VIP: a connection this node opens itself.
        Rule {
            matches: mine,
            counter: false,
            action: Action::SetCtMark(CT_MARK_OWNED),
            comment: "tdsc: this node opens the connection: it owns it",
        },
        Rule {
            matches: untracked,
            counter: true,
            action: Action::Drop,
            comment: UNTRACKED_COMMENT,
        },
        // An RST for a segment TCP found no socket for, a TIME_WAIT socket's ACK, a challenge
        // ACK: none of them may leave unless the connection is this node's.
        Rule {
            matches: foreign,
            counter: true,
            action: Action::Drop,
            comment: NOT_OWNED_COMMENT,
        },
        // A datagram for the cluster port that leaves by the cluster interface carries a
        // member's source address, and the other nodes would accept it: only the daemon's
        // socket may send one. Another local user (a compromised web application) is refused
        // here, on the node it runs on.
        Rule {
            matches: vec![
                Match::OifName(spec.cluster_interface.clone()),
                Match::UdpDport(spec.control_port),
                Match::SkUidNot(DAEMON_UID),
            ],
            counter: true,
            action: Action::Drop,
            comment: CONTROL_LOCAL_COMMENT,
        },
    ]
}

impl Ruleset {
    /// Renders the ruleset as `nft list ruleset` prints it once installed (nft 1.0.6 syntax,
    /// counters at zero). It loads with `nft -f`, except a master rule using
    /// [`QueueBackend::Compat`]: nft prints that target as `queue num N`, but parses that text
    /// as the native `queue` expression, which kernels without `CONFIG_NFT_QUEUE` reject.
    pub fn to_nft_text(&self) -> String {
        self.to_string()
    }

    /// The table of `family`, if the ruleset has one.
    pub fn table(&self, family: Family) -> Option<&Table> {
        self.tables.iter().find(|t| t.family == family)
    }
}

impl fmt::Display for Ruleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for table in &self.tables {
            writeln!(f, "table {} {TABLE_NAME} {{", table.family.as_str())?;
            for set in &table.sets {
                match set {
                    NamedSet::Given(set) => write_given_set(f, set)?,
                    NamedSet::SynPrefix(set) => write_syn_prefix_set(f, set)?,
                }
                writeln!(f)?;
            }
            for (i, chain) in table.chains.iter().enumerate() {
                if i > 0 {
                    writeln!(f)?;
                }
                write_chain(f, chain)?;
            }
            writeln!(f, "}}")?;
        }
        Ok(())
    }
}

/// nft prints a set declared with `typeof` by those expressions (from the set's user data),
/// its size, flags and timeout in seconds.
fn write_given_set(f: &mut fmt::Formatter<'_>, set: &GivenSet) -> fmt::Result {
    writeln!(f, "\tset {GIVEN_SET_NAME} {{")?;
    writeln!(f, "\t\ttypeof {}", syn_tuple_text(set.family))?;
    writeln!(f, "\t\tsize {GIVEN_SIZE}")?;
    writeln!(f, "\t\tflags dynamic,timeout")?;
    writeln!(f, "\t\ttimeout {}s", GIVEN_TIMEOUT_MS / 1000)?;
    writeln!(f, "\t}}")
}

/// Declared by type, as nft prints a set of plain addresses.
fn write_syn_prefix_set(f: &mut fmt::Formatter<'_>, set: &SynPrefixSet) -> fmt::Result {
    let key = match set.family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    };
    writeln!(f, "\tset {} {{", set.name())?;
    writeln!(f, "\t\ttype {key}")?;
    writeln!(f, "\t\tsize {SYN_PREFIX_SIZE}")?;
    writeln!(f, "\t\tflags dynamic,timeout")?;
    writeln!(f, "\t\ttimeout {}s", SYN_PREFIX_TIMEOUT_MS / 1000)?;
    writeln!(f, "\t}}")
}

/// `update @syn_prefix4 { ip saddr & 255.255.255.0 limit rate over 5/second }` as nft 1.0.6
/// prints it: no mask when it keeps every bit (nft still loads it), and no burst when it is
/// nft's default of 5 packets.
fn syn_prefix_text(family: IpFamily, limit: &SynPrefixLimit) -> String {
    let max = match family {
        IpFamily::V4 => 32,
        IpFamily::V6 => 128,
    };
    let mut text = format!(
        "update @{} {{ {} saddr",
        syn_prefix_set_name(family),
        family.keyword()
    );
    if limit.prefix_len(family) < max {
        let _ = write!(text, " & {}", limit.mask(family));
    }
    let _ = write!(text, " limit rate over {}/second", limit.rate_per_second);
    if limit.burst != NFT_DEFAULT_BURST {
        let _ = write!(text, " burst {} packets", limit.burst);
    }
    text.push_str(" }");
    text
}

/// The packet burst nft assumes when a `limit` statement names none, and leaves out when it
/// prints one (seen with nft 1.0.6: `burst 5 packets` is listed as nothing, 1 and 10 are).
const NFT_DEFAULT_BURST: u32 = 5;

/// The [`GivenSet`] key as nft prints the concatenation.
fn syn_tuple_text(family: IpFamily) -> String {
    format!(
        "{} saddr . tcp sport . tcp dport . tcp sequence",
        family.keyword()
    )
}

fn write_chain(f: &mut fmt::Formatter<'_>, chain: &Chain) -> fmt::Result {
    writeln!(f, "\tchain {} {{", chain.name.as_str())?;
    let hook = match chain.name {
        ChainName::Prerouting => "prerouting".to_string(),
        ChainName::Input => "input".to_string(),
        ChainName::Output => "output".to_string(),
        ChainName::Egress => format!(
            "egress device \"{}\"",
            chain.device.as_deref().unwrap_or_default()
        ),
    };
    writeln!(
        f,
        "\t\ttype filter hook {hook} priority {}; policy accept;",
        priority_text(chain.priority)
    )?;
    for rule in &chain.rules {
        writeln!(f, "\t\t{}", rule_text(rule))?;
    }
    writeln!(f, "\t}}")
}

/// nft prints a filter chain's priority relative to the named `filter` priority (0).
fn priority_text(priority: i32) -> String {
    match priority {
        0 => "filter".to_string(),
        // nft names this one too (NF_IP_PRI_MANGLE).
        -150 => "mangle".to_string(),
        p if p < 0 => format!("filter - {}", p.unsigned_abs()),
        p => format!("filter + {p}"),
    }
}

/// One rule as nft prints it: conditions, `counter packets 0 bytes 0`, action, comment.
pub(crate) fn rule_text(rule: &Rule) -> String {
    let mut words: Vec<String> = rule.matches.iter().map(match_text).collect();
    if rule.counter {
        words.push("counter packets 0 bytes 0".to_string());
    }
    words.push(action_text(&rule.action));
    words.push(format!("comment \"{}\"", rule.comment));
    words.join(" ")
}

fn match_text(m: &Match) -> String {
    match m {
        Match::IifName(name) => format!("iifname \"{name}\""),
        Match::OifName(name) => format!("oifname \"{name}\""),
        Match::Daddr(addr) => format!("{} daddr {addr}", IpFamily::of(addr).keyword()),
        Match::Saddr(addr) => format!("{} saddr {addr}", IpFamily::of(addr).keyword()),
        Match::L4Proto(proto) => format!("meta l4proto {}", proto_name(*proto)),
        Match::TcpDport { ports, negate } => {
            let op = if *negate { "!= " } else { "" };
            match ports.as_slice() {
                [port] => format!("tcp dport {op}{port}"),
                _ => {
                    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                    format!("tcp dport {op}{{ {} }}", list.join(", "))
                }
            }
        }
        Match::UdpPorts { sport, dport } => format!("udp sport {sport} udp dport {dport}"),
        Match::UdpDport(port) => format!("udp dport {port}"),
        Match::SkUidNot(uid) => format!("meta skuid != {uid}"),
        Match::TcpSynOnly => "tcp flags syn / fin,syn,rst,ack".to_string(),
        Match::TcpRst => "tcp flags rst".to_string(),
        Match::CtStateInvalid => "ct state invalid".to_string(),
        Match::CtMarkNot(mark) => format!("ct mark != {mark:#010x}"),
        Match::SynNotGiven(family) => {
            format!("{} != @{GIVEN_SET_NAME}", syn_tuple_text(*family))
        }
        Match::SynPrefixOverLimit { family, limit } => syn_prefix_text(*family, limit),
        Match::EchoRequest(IpFamily::V4) => "icmp type echo-request".to_string(),
        Match::EchoRequest(IpFamily::V6) => "icmpv6 type echo-request".to_string(),
        Match::HashNotMine { input, hash } => {
            let mut text = String::from("jhash ");
            match input {
                HashInput::Saddr(fam) => {
                    let _ = write!(text, "{} saddr", fam.keyword());
                }
                HashInput::SaddrSport(fam, l4) => {
                    let _ = write!(text, "{} saddr . {} sport", fam.keyword(), l4.keyword());
                }
            }
            let _ = write!(
                text,
                " mod {} seed {:#x} != {}",
                hash.count, hash.seed, hash.index
            );
            text
        }
    }
}

/// nft prints protocol names from /etc/protocols for the common ones, numbers otherwise.
fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_ICMP => "icmp".to_string(),
        IPPROTO_TCP => "tcp".to_string(),
        IPPROTO_UDP => "udp".to_string(),
        IPPROTO_ICMPV6 => "ipv6-icmp".to_string(),
        other => other.to_string(),
    }
}

fn action_text(action: &Action) -> String {
    match action {
        Action::Accept => "accept".to_string(),
        Action::Drop => "drop".to_string(),
        // nft 1.0.6 prints the native expression in its `queue to N` syntax, and the xtables
        // target through libxtables' translation, `queue num N`.
        Action::Queue {
            num,
            backend: QueueBackend::Native,
        } => format!("queue to {num}"),
        Action::Queue {
            num,
            backend: QueueBackend::Compat,
        } => format!("queue num {num}"),
        Action::SetEtherSaddr(mac) => {
            let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            format!("ether saddr set {}", hex.join(":"))
        }
        Action::SetCtMark(mark) => format!("ct mark set {mark:#010x}"),
        Action::RememberGiven(family) => {
            format!("update @{GIVEN_SET_NAME} {{ {} }}", syn_tuple_text(*family))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn spec() -> ClusterSpec {
        ClusterSpec {
            vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            tcp_ports: vec![443, 80, 443],
            client_interface: "eth0".into(),
            cluster_interface: "eth1".into(),
            members: vec![
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11)),
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, 12)),
            ],
            former_members: vec![],
            queue_num: 7,
            control_port: 7400,
            egress_mac: None,
            static_hash: StaticHash {
                index: 0,
                count: 2,
                seed: 9,
            },
            syn_prefix_limit: None,
        }
    }

    const COMPAT: HostFacts = HostFacts {
        queue: QueueBackend::Compat,
    };

    fn chain(rs: &Ruleset, name: ChainName) -> &[Rule] {
        let table = rs.table(Family::Inet).unwrap();
        &table.chains.iter().find(|c| c.name == name).unwrap().rules
    }

    fn input(rs: &Ruleset) -> &[Rule] {
        chain(rs, ChainName::Input)
    }

    fn prerouting(rs: &Ruleset) -> &[Rule] {
        chain(rs, ChainName::Prerouting)
    }

    #[test]
    fn roles_differ_only_in_the_syn_rule_action() {
        let master = ruleset(Role::Master, &spec(), &COMPAT);
        let member = ruleset(Role::Member, &spec(), &COMPAT);
        assert_eq!(input(&master), input(&member));
        assert_eq!(
            chain(&master, ChainName::Output),
            chain(&member, ChainName::Output)
        );
        let (m, n) = (prerouting(&master), prerouting(&member));
        assert_eq!(m.len(), 2);
        assert_eq!(m.len(), n.len());
        assert_eq!(m[..1], n[..1]);
        assert_eq!(m[1].matches, n[1].matches);
        assert_eq!(
            m[1].action,
            Action::Queue {
                num: 7,
                backend: QueueBackend::Compat
            }
        );
        assert_eq!(n[1].action, Action::Drop);
    }

    #[test]
    fn every_input_rule_but_the_catch_alls_is_bound_to_our_interfaces() {
        // A re-injected SYN arrives via `lo`; only interface-bound rules can leave it alone,
        // and the two unbound rules only match protocol 253 and the cluster port, never TCP.
        // The one `lo` rule only marks the SYN's conntrack entry as this node's.
        let rs = ruleset(Role::Master, &spec(), &COMPAT);
        for rule in prerouting(&rs) {
            assert_eq!(rule.matches[0], Match::IifName("eth0".into()));
        }
        let rules = input(&rs);
        let unbound: Vec<&Rule> = rules
            .iter()
            .filter(|r| !matches!(r.matches[0], Match::IifName(_)))
            .collect();
        for rule in rules {
            match &rule.matches[0] {
                Match::IifName(name) if name == "lo" => {
                    assert!(
                        rule.action == Action::SetCtMark(CT_MARK_OWNED)
                            || rule.action == Action::RememberGiven(IpFamily::V4),
                        "{rule:?}"
                    );
                }
                Match::IifName(name) => assert!(name == "eth0" || name == "eth1"),
                _ => {}
            }
        }
        assert_eq!(unbound.len(), 2, "{unbound:?}");
        assert_eq!(unbound[0].matches, vec![Match::L4Proto(FORWARD_PROTO)]);
        assert_eq!(unbound[0].comment, FOREIGN_DROP_COMMENT);
        assert_eq!(unbound[1].matches, vec![Match::UdpDport(7400)]);
        assert_eq!(unbound[1].comment, CONTROL_FOREIGN_COMMENT);
        assert!(unbound
            .iter()
            .all(|r| r.action == Action::Drop && r.counter));
    }

    /// The cluster port is open only on the cluster interface, from each member's address and
    /// the cluster port, in the members' own family, and only after every member's accept;
    /// locally only the daemon's user may send to it.
    #[test]
    fn the_cluster_port_is_open_to_members_only() {
        let members = vec![
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x12)),
        ];
        let spec = ClusterSpec {
            members: members.clone(),
            ..spec()
        };
        for role in [Role::Master, Role::Member] {
            let rs = ruleset(role, &spec, &COMPAT);
            let rules = input(&rs);
            let accepts: Vec<&Rule> = rules
                .iter()
                .filter(|r| {
                    r.action == Action::Accept && r.comment == "tdsc: cluster message from a member"
                })
                .collect();
            assert_eq!(accepts.len(), members.len());
            for (rule, member) in accepts.iter().zip(&members) {
                assert_eq!(
                    rule.matches,
                    vec![
                        Match::IifName("eth1".into()),
                        Match::Saddr(*member),
                        Match::UdpPorts {
                            sport: 7400,
                            dport: 7400
                        },
                    ]
                );
            }
            let drop = rules
                .iter()
                .position(|r| r.comment == CONTROL_FOREIGN_COMMENT)
                .unwrap();
            let last_accept = rules
                .iter()
                .rposition(|r| {
                    r.action == Action::Accept && r.comment == "tdsc: cluster message from a member"
                })
                .unwrap();
            assert!(last_accept < drop);
            let local = chain(&rs, ChainName::Output)
                .iter()
                .find(|r| r.comment == CONTROL_LOCAL_COMMENT)
                .unwrap();
            assert_eq!(
                local.matches,
                vec![
                    Match::OifName("eth1".into()),
                    Match::UdpDport(7400),
                    Match::SkUidNot(DAEMON_UID),
                ]
            );
            assert_eq!(local.action, Action::Drop);
            assert!(local.counter);
            let text = rs.to_nft_text();
            assert!(
                text.contains("iifname \"eth1\" ip6 saddr 2001:db8:1::12 udp sport 7400 udp dport 7400 accept"),
                "{text}"
            );
        }
    }

    /// A removed node may still reach the cluster port (to be told it was removed), never
    /// with proto 253.
    #[test]
    fn a_former_member_reaches_the_cluster_port_only() {
        let former = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 13));
        let spec = ClusterSpec {
            former_members: vec![former],
            ..spec()
        };
        let rs = ruleset(Role::Member, &spec, &COMPAT);
        let from_former: Vec<&Rule> = input(&rs)
            .iter()
            .filter(|r| r.matches.contains(&Match::Saddr(former)))
            .collect();
        assert_eq!(from_former.len(), 1, "{from_former:?}");
        assert!(from_former[0].matches.contains(&Match::UdpPorts {
            sport: 7400,
            dport: 7400
        }));
        assert_eq!(from_former[0].action, Action::Accept);
    }

    #[test]
    fn ports_are_sorted_and_deduplicated_and_negated_for_the_hash() {
        let rs = ruleset(Role::Member, &spec(), &COMPAT);
        let dports: Vec<&Match> = prerouting(&rs)
            .iter()
            .chain(input(&rs))
            .flat_map(|r| &r.matches)
            .filter(|m| matches!(m, Match::TcpDport { .. }))
            .collect();
        assert_eq!(
            dports,
            vec![
                // The disown rule and the SYN rule.
                &Match::TcpDport {
                    ports: vec![80, 443],
                    negate: false
                },
                &Match::TcpDport {
                    ports: vec![80, 443],
                    negate: false
                },
                &Match::TcpDport {
                    ports: vec![80, 443],
                    negate: true
                },
            ]
        );
    }

    #[test]
    fn all_ports_means_no_dport_match_and_no_tcp_hash() {
        let spec = ClusterSpec {
            tcp_ports: vec![],
            ..spec()
        };
        let rs = ruleset(Role::Member, &spec, &COMPAT);
        let text = rs.to_nft_text();
        // The `given` set's key names both ports; no rule matches either.
        let rules: String = text
            .lines()
            .filter(|l| !l.contains("@given") && !l.contains("typeof"))
            .collect();
        assert!(!rules.contains("tcp dport"), "{text}");
        assert!(!rules.contains("tcp sport"), "{text}");
        assert!(text.contains("udp sport"), "{text}");
    }

    #[test]
    fn one_node_has_no_hash_rules() {
        let spec = ClusterSpec {
            static_hash: StaticHash {
                index: 0,
                count: 1,
                seed: 0,
            },
            ..spec()
        };
        let text = ruleset(Role::Member, &spec, &COMPAT).to_nft_text();
        assert!(!text.contains("jhash"), "{text}");
    }

    /// A node that has left the cluster keeps no bucket, even when one member remains.
    #[test]
    fn no_bucket_drops_every_undispatched_flow() {
        for count in [1, 2] {
            let spec = ClusterSpec {
                static_hash: StaticHash {
                    index: count,
                    count,
                    seed: 0,
                },
                ..spec()
            };
            assert!(spec.validate().is_ok());
            let text = ruleset(Role::Member, &spec, &COMPAT).to_nft_text();
            assert!(
                text.contains(&format!("mod {count} seed 0x0 != {count}")),
                "{text}"
            );
            assert!(text.contains("udp sport"), "{text}");
        }
    }

    #[test]
    fn ipv6_vip_uses_ip6_everywhere() {
        let spec = ClusterSpec {
            vip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            ..spec()
        };
        let text = ruleset(Role::Member, &spec, &COMPAT).to_nft_text();
        assert!(text.contains("ip6 daddr 2001:db8::1"), "{text}");
        assert!(text.contains("jhash ip6 saddr . udp sport"), "{text}");
        assert!(text.contains("icmpv6 type echo-request"), "{text}");
        assert!(!text.contains("ip daddr"), "{text}");
        // Members keep their own family (here IPv4 cluster network).
        assert!(
            text.contains("ip saddr 198.51.100.11 meta l4proto 253"),
            "{text}"
        );
    }

    /// A client's first SYN takes the mark off before it is queued or dropped; the input chain
    /// gives it back only to a SYN that got past that (accepted by the master, or re-injected),
    /// and only after the hash rules dropped other nodes' flows; then every TCP segment of an
    /// unmarked entry is dropped, in and out.
    #[test]
    fn only_connections_given_to_this_node_carry_the_mark() {
        for role in [Role::Master, Role::Member] {
            let rs = ruleset(role, &spec(), &COMPAT);
            let pre = prerouting(&rs);
            assert_eq!(pre[0].action, Action::SetCtMark(0));
            // The mark comes off for every first SYN the second rule queues or drops, but a
            // copy of one this node was given lately.
            let (last, rest) = pre[0].matches.split_last().unwrap();
            assert_eq!(rest, pre[1].matches.as_slice());
            assert_eq!(*last, Match::SynNotGiven(IpFamily::V4));
            assert!(pre[0].matches.contains(&Match::TcpSynOnly));

            let input = input(&rs);
            let pos = |f: &dyn Fn(&Rule) -> bool| input.iter().position(f).unwrap();
            let last_hash = input
                .iter()
                .rposition(|r| {
                    r.matches
                        .iter()
                        .any(|m| matches!(m, Match::HashNotMine { .. }))
                })
                .unwrap();
            let own = pos(&|r| r.action == Action::SetCtMark(CT_MARK_OWNED));
            let foreign = pos(&|r| r.matches.contains(&Match::CtMarkNot(CT_MARK_OWNED)));
            assert!(last_hash < own && own < foreign, "{input:?}");
            assert_eq!(input[own + 1].action, Action::SetCtMark(CT_MARK_OWNED));
            // The re-injected SYN is remembered after it is marked, by a rule of its own (a
            // full set ends the rule at the `update`), with the same matches.
            assert_eq!(input[own + 2].action, Action::RememberGiven(IpFamily::V4));
            assert_eq!(input[own + 2].matches, input[own + 1].matches);
            assert_eq!(own + 3, foreign);
            assert_eq!(
                rs.table(Family::Inet).unwrap().sets,
                vec![NamedSet::Given(GivenSet {
                    family: IpFamily::V4
                })]
            );
            assert_eq!(input[foreign].action, Action::Drop);
            assert!(input[foreign]
                .matches
                .contains(&Match::L4Proto(IPPROTO_TCP)));

            let out = chain(&rs, ChainName::Output);
            assert_eq!(out[0].action, Action::SetCtMark(CT_MARK_OWNED));
            assert!(out[0].matches.contains(&Match::TcpSynOnly));
            let (control, out) = out.split_last().unwrap();
            assert_eq!(control.comment, CONTROL_LOCAL_COMMENT);
            for drop in &out[1..] {
                assert_eq!(drop.action, Action::Drop);
                assert!(drop.matches.contains(&Match::L4Proto(IPPROTO_TCP)));
                assert!(
                    !drop.matches.contains(&Match::TcpRst),
                    "every segment, not only RSTs"
                );
            }
            assert!(out
                .iter()
                .any(|r| r.matches.contains(&Match::CtMarkNot(CT_MARK_OWNED))));
        }
    }

    #[test]
    fn layer2_mode_adds_the_egress_table_only_when_asked() {
        let plain = ruleset(Role::Member, &spec(), &COMPAT);
        assert!(plain.table(Family::Netdev).is_none());
        let l2 = ruleset(
            Role::Member,
            &ClusterSpec {
                egress_mac: Some([2, 0, 0, 0, 0, 0xab]),
                ..spec()
            },
            &COMPAT,
        );
        let text = l2.to_nft_text();
        assert!(
            text.contains("hook egress device \"eth0\" priority filter;"),
            "{text}"
        );
        assert!(text.contains("ether saddr set 02:00:00:00:00:ab"), "{text}");
    }

    #[test]
    fn queue_text_follows_the_backend() {
        let native = HostFacts {
            queue: QueueBackend::Native,
        };
        let master = ruleset(Role::Master, &spec(), &native).to_nft_text();
        assert!(master.contains(" queue to 7 "), "{master}");
        let compat = ruleset(Role::Master, &spec(), &COMPAT).to_nft_text();
        assert!(compat.contains(" queue num 7 "), "{compat}");
        assert!(!compat.contains("bypass") && !master.contains("bypass"));
    }

    const LIMIT: SynPrefixLimit = SynPrefixLimit {
        rate_per_second: 5,
        burst: 5,
        prefix_v4: 24,
        prefix_v6: 48,
    };

    fn limited() -> ClusterSpec {
        ClusterSpec {
            syn_prefix_limit: Some(LIMIT),
            ..spec()
        }
    }

    /// The limit sits between the disown rule and the queue rule, with the very same SYN
    /// matches, and only the master gets it (and its set).
    #[test]
    fn the_master_limits_syns_per_prefix_before_the_queue() {
        let rs = ruleset(Role::Master, &limited(), &COMPAT);
        let pre = prerouting(&rs);
        assert_eq!(pre.len(), 3);
        assert_eq!(pre[0].comment, DISOWN_COMMENT);
        let (last, syn) = pre[1].matches.split_last().unwrap();
        assert_eq!(syn, pre[2].matches.as_slice());
        assert_eq!(
            *last,
            Match::SynPrefixOverLimit {
                family: IpFamily::V4,
                limit: LIMIT
            }
        );
        assert_eq!(pre[1].action, Action::Drop);
        assert!(pre[1].counter);
        assert_eq!(pre[1].comment, SYN_PREFIX_LIMIT_COMMENT);
        assert!(matches!(pre[2].action, Action::Queue { .. }));
        assert_eq!(
            rs.table(Family::Inet).unwrap().sets,
            vec![
                NamedSet::Given(GivenSet {
                    family: IpFamily::V4
                }),
                NamedSet::SynPrefix(SynPrefixSet {
                    family: IpFamily::V4
                }),
            ]
        );
        // Everything else is the ruleset without the limit.
        let plain = ruleset(Role::Master, &spec(), &COMPAT);
        assert_eq!(input(&rs), input(&plain));
        assert_eq!(
            ruleset(Role::Member, &limited(), &COMPAT),
            ruleset(Role::Member, &spec(), &COMPAT)
        );
    }

    #[test]
    fn the_limit_prints_as_nft_lists_it() {
        let text = ruleset(Role::Master, &limited(), &COMPAT).to_nft_text();
        assert!(
            text.contains(
                "tcp flags syn / fin,syn,rst,ack update @syn_prefix4 { ip saddr & 255.255.255.0 \
                 limit rate over 5/second } counter packets 0 bytes 0 drop comment \
                 \"tdsc: SYN rate of this source prefix over the limit\""
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\tset syn_prefix4 {\n\t\ttype ipv4_addr\n\t\tsize 65536\n\t\tflags dynamic,timeout\n\t\ttimeout 10s\n\t}\n"
            ),
            "{text}"
        );
        let text = |family, limit| syn_prefix_text(family, &limit);
        let other = SynPrefixLimit {
            rate_per_second: 100,
            burst: 1,
            prefix_v4: 32,
            prefix_v6: 47,
        };
        assert_eq!(
            text(IpFamily::V4, other),
            "update @syn_prefix4 { ip saddr limit rate over 100/second burst 1 packets }"
        );
        assert_eq!(
            text(IpFamily::V6, other),
            "update @syn_prefix6 { ip6 saddr & ffff:ffff:fffe:: limit rate over 100/second burst 1 packets }"
        );
        assert_eq!(
            text(IpFamily::V6, LIMIT),
            "update @syn_prefix6 { ip6 saddr & ffff:ffff:ffff:: limit rate over 5/second }"
        );
    }

    #[test]
    fn prefix_masks_keep_the_prefix_bits() {
        let mask = |v4, v6| {
            let l = SynPrefixLimit {
                prefix_v4: v4,
                prefix_v6: v6,
                ..LIMIT
            };
            (
                l.mask(IpFamily::V4).to_string(),
                l.mask(IpFamily::V6).to_string(),
            )
        };
        assert_eq!(mask(1, 1), ("128.0.0.0".into(), "8000::".into()));
        assert_eq!(
            mask(20, 64),
            ("255.255.240.0".into(), "ffff:ffff:ffff:ffff::".into())
        );
        assert_eq!(
            mask(32, 128),
            (
                "255.255.255.255".into(),
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".into()
            )
        );
    }

    #[test]
    fn validate_rejects_a_limit_the_kernel_cannot_take() {
        assert!(limited().validate().is_ok());
        let bad = [
            (
                "syn_prefix_limit.rate_per_second",
                SynPrefixLimit {
                    rate_per_second: 0,
                    ..LIMIT
                },
            ),
            (
                "syn_prefix_limit.burst",
                SynPrefixLimit { burst: 0, ..LIMIT },
            ),
            (
                "syn_prefix_limit.prefix_v4",
                SynPrefixLimit {
                    prefix_v4: 0,
                    ..LIMIT
                },
            ),
            (
                "syn_prefix_limit.prefix_v4",
                SynPrefixLimit {
                    prefix_v4: 33,
                    ..LIMIT
                },
            ),
            (
                "syn_prefix_limit.prefix_v6",
                SynPrefixLimit {
                    prefix_v6: 0,
                    ..LIMIT
                },
            ),
            (
                "syn_prefix_limit.prefix_v6",
                SynPrefixLimit {
                    prefix_v6: 129,
                    ..LIMIT
                },
            ),
        ];
        for (want, limit) in bad {
            let spec = ClusterSpec {
                syn_prefix_limit: Some(limit),
                ..spec()
            };
            match spec.validate() {
                Err(Error::InvalidSpec { field, .. }) => assert_eq!(field, want, "{limit:?}"),
                other => panic!("{limit:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn priorities_print_relative_to_filter() {
        assert_eq!(priority_text(-10), "filter - 10");
        assert_eq!(priority_text(0), "filter");
        assert_eq!(priority_text(5), "filter + 5");
    }

    #[test]
    fn validate_rejects_what_the_kernel_or_the_hash_cannot_take() {
        assert!(spec().validate().is_ok());
        let bad = [
            ClusterSpec {
                client_interface: "a-very-long-interface".into(),
                ..spec()
            },
            ClusterSpec {
                cluster_interface: "eth\"1".into(),
                ..spec()
            },
            ClusterSpec {
                static_hash: StaticHash {
                    index: 3,
                    count: 2,
                    seed: 0,
                },
                ..spec()
            },
            ClusterSpec {
                static_hash: StaticHash {
                    index: 0,
                    count: 0,
                    seed: 0,
                },
                ..spec()
            },
            ClusterSpec {
                members: vec![],
                ..spec()
            },
            ClusterSpec {
                tcp_ports: vec![0],
                ..spec()
            },
            ClusterSpec {
                control_port: 0,
                ..spec()
            },
            ClusterSpec {
                vip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ..spec()
            },
        ];
        for spec in bad {
            assert!(
                matches!(spec.validate(), Err(Error::InvalidSpec { .. })),
                "{spec:?}"
            );
        }
    }
}
