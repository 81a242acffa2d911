//! Lowering: ruleset value → one nf_tables netlink batch.
//!
//! Each [`Match`] emits the expressions nft itself emits for the same text (checked with
//! `nft --debug=netlink`), including the dependencies nft adds implicitly, so that
//! `nft list ruleset` prints the kernel's rules back as [`crate::Ruleset::to_nft_text`] does.
//! Still pure: it produces bytes and labels, the socket lives in `firewall.rs`.

use std::ffi::{CStr, CString};
use std::net::IpAddr;

use nftnl::expr::{Bitwise, Cmp, CmpOp, Conntrack, Counter, Immediate, Meta, Register, Verdict};
use nftnl::set::{Set, SetKey};
use nftnl::{Batch, FinalizedBatch, MsgType, ProtoFamily};

use crate::expr::{
    reg, DynsetUpdate, Jhash, LimitOver, Load, NfqueueTarget, PayloadBase, Queue, SetLookup, Store,
};
use crate::ffi::{attr, c32, c8};
use crate::model::{
    syn_prefix_set_name, Action, Chain, ChainName, Family, GivenSet, HashInput, IpFamily, Match,
    NamedSet, QueueBackend, Rule, Ruleset, SynPrefixLimit, SynPrefixSet, GIVEN_SET_NAME,
    GIVEN_SIZE, GIVEN_TIMEOUT_MS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    SYN_PREFIX_SIZE, SYN_PREFIX_TIMEOUT_MS,
};
use crate::TABLE_NAME;

/// The table name as the C string libnftnl wants.
const TABLE_C: &CStr = c"tdsc";
const _: () = assert!(TABLE_C.to_bytes().len() == TABLE_NAME.len());

/// The netdev egress hook number. nftnl's `Hook` only names the inet hooks, but a chain's hook
/// is just a number interpreted per family, and `NF_NETDEV_EGRESS` equals `NF_INET_LOCAL_IN`.
const EGRESS_HOOK: nftnl::Hook = nftnl::Hook::In;
const _: () = assert!(libc::NF_NETDEV_EGRESS == libc::NF_INET_LOCAL_IN);

/// Name of an anonymous set: the kernel replaces `%d` with a free number (nft sends the same).
const ANON_SET_NAME: &CStr = c"__set%d";

/// `ARPHRD_ETHER`: nft guards `ether …` payload access in netdev chains with
/// `meta iiftype ether`.
const ARPHRD_ETHER: u16 = 1;

/// Offsets nft uses: TCP flags are byte 13 of the TCP header; FIN|SYN|RST|ACK = 0x17.
const TCP_FLAGS_OFFSET: u32 = 13;
const TCP_FLAGS_FIN_SYN_RST_ACK: u8 = 0x17;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
/// `ct state invalid` is bit 0 of the ct state bitmask (`NF_CT_STATE_INVALID_BIT`).
const CT_STATE_INVALID: u32 = 1;

/// A finalized batch plus a human label for each of its messages, in order, so an error
/// acknowledgement can say which message the kernel refused.
pub(crate) struct Plan {
    pub batch: FinalizedBatch,
    pub labels: Vec<String>,
}

impl Plan {
    /// The label of the message with sequence number `seq`, if it is one of ours.
    pub fn label(&self, seq: u32) -> String {
        let seqs = self.batch.sequence_numbers();
        // Kernels >= 6.10 acknowledge the batch begin/end messages too; nftnl then gives them
        // sequence numbers around ours.
        let framed = seqs.len() == self.labels.len() + 2;
        let first = if framed { seqs.start + 1 } else { seqs.start };
        match seq.checked_sub(first).map(|i| i as usize) {
            Some(i) if i < self.labels.len() => self.labels[i].clone(),
            _ if framed && seq == seqs.start => "the batch begin message".to_string(),
            _ => "the batch end message".to_string(),
        }
    }

    /// The batch as one contiguous buffer, so it reaches the kernel in one `sendmsg` (one skb,
    /// one transaction) even if libnftnl split it over pages.
    pub fn bytes(&self) -> Vec<u8> {
        self.batch.iter().flatten().copied().collect()
    }
}

struct Builder {
    batch: Batch,
    labels: Vec<String>,
    next_set_id: u32,
    /// Batch-local id of the table's [`GivenSet`], once added.
    given_set_id: u32,
    /// Batch-local id of the table's [`SynPrefixSet`], once added.
    syn_prefix_set_id: u32,
}

impl Builder {
    fn new() -> Self {
        Builder {
            batch: Batch::new(),
            labels: Vec::new(),
            next_set_id: 1,
            given_set_id: 0,
            syn_prefix_set_id: 0,
        }
    }

    fn add<T: nftnl::NlMsg>(&mut self, msg: &T, kind: MsgType, label: String) {
        self.batch.add(msg, kind);
        self.labels.push(label);
    }

    fn finish(self) -> Plan {
        Plan {
            batch: self.batch.finalize(),
            labels: self.labels,
        }
    }

    /// `add table; delete table`: deletes the table and everything in it, and cannot fail
    /// with ENOENT because the table exists by the time the delete runs.
    fn clear_table(&mut self, family: Family) {
        let table = nftnl::Table::new(TABLE_C, proto_family(family));
        let name = format!("{} {TABLE_NAME}", family.as_str());
        self.add(&table, MsgType::Add, format!("add table {name}"));
        self.add(&table, MsgType::Del, format!("delete table {name}"));
    }
}

pub(crate) fn proto_family(family: Family) -> ProtoFamily {
    match family {
        Family::Inet => ProtoFamily::Inet,
        Family::Netdev => ProtoFamily::NetDev,
    }
}

/// What the kernel holds of our `inet` table before an apply, as [`crate::Firewall::apply`]
/// reads it: its chains and named sets. Empty: no table (or not read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Present {
    pub chains: Vec<String>,
    /// Named sets (anonymous ones go with the rules that own them): name and key length.
    pub sets: Vec<(String, u32)>,
}

impl Present {
    /// The [`GivenSet`] in the kernel has the key `set` needs, so its elements can stay.
    fn keeps(&self, set: &GivenSet) -> bool {
        let len = match set.family {
            IpFamily::V4 => GivenKeyV4::LEN,
            IpFamily::V6 => GivenKeyV6::LEN,
        };
        self.sets
            .iter()
            .any(|(name, key_len)| name == GIVEN_SET_NAME && *key_len == len)
    }
}

/// The apply batch. One transaction, so the old ruleset is replaced atomically.
///
/// For the `netdev` table, and for an `inet` table the kernel does not hold yet: clear our
/// table, then build it if the ruleset has one. For an `inet` table the kernel holds
/// (`present`), when the new ruleset's [`GivenSet`] has the same key as the kernel's: delete
/// every chain (with its rules) and every other named set, then add the new sets and chains
/// around the kept `given` set. Its elements, the SYNs this node was given in the last
/// [`GIVEN_TIMEOUT_MS`], survive a role change: a late copy of such a SYN does not take the
/// ownership mark off the node's connection because its ruleset was replaced meanwhile.
pub(crate) fn apply_plan(rs: &Ruleset, present: &Present) -> Plan {
    let mut b = Builder::new();
    for family in Family::ALL {
        let table = rs.table(family);
        let kept = match (family, table) {
            (Family::Inet, Some(t)) => t.sets.iter().find_map(|s| match s {
                NamedSet::Given(g) if present.keeps(g) => Some(g),
                _ => None,
            }),
            _ => None,
        };
        let nl_table = nftnl::Table::new(TABLE_C, proto_family(family));
        if kept.is_some() {
            b.add(
                &nl_table,
                MsgType::Add,
                format!("add table {} {TABLE_NAME}", family.as_str()),
            );
            for chain in &present.chains {
                let name = CString::new(chain.as_str()).unwrap_or_default();
                let nl_chain = nftnl::Chain::new(&name, &nl_table);
                b.add(&nl_chain, MsgType::Del, format!("delete chain {chain}"));
            }
            for (set, _) in present.sets.iter().filter(|(n, _)| n != GIVEN_SET_NAME) {
                let name = CString::new(set.as_str()).unwrap_or_default();
                let s: Set<'_, GivenKeyV4> =
                    Set::new_named(&name, 0, &nl_table, nl_table.get_family());
                b.add(&s, MsgType::Del, format!("delete set {set}"));
            }
        } else {
            b.clear_table(family);
        }
        if let Some(table) = table {
            if kept.is_none() {
                b.add(
                    &nl_table,
                    MsgType::Add,
                    format!("add table {} {TABLE_NAME}", family.as_str()),
                );
            }
            for set in &table.sets {
                match set {
                    // Kept: the rules name it, and the kernel finds it by name.
                    NamedSet::Given(_) if kept.is_some() => {}
                    NamedSet::Given(set) => add_given_set(&mut b, &nl_table, set),
                    NamedSet::SynPrefix(set) => add_syn_prefix_set(&mut b, &nl_table, set),
                }
            }
            for chain in &table.chains {
                add_chain(&mut b, &nl_table, family, chain);
            }
        }
    }
    b.finish()
}

/// The remove batch: clear both our tables; nothing else.
pub(crate) fn remove_plan() -> Plan {
    let mut b = Builder::new();
    for family in Family::ALL {
        b.clear_table(family);
    }
    b.finish()
}

/// Name of the probe's scratch table. It only ever exists inside an uncommitted batch.
pub(crate) const PROBE_TABLE: &CStr = c"tdsc-probe";

/// The probe batch: a scratch table, a regular chain and one rule with the native `queue`
/// expression. It is sent *without* its batch-end message, so the kernel validates every
/// message and then aborts the transaction (what `nft --check` does): nothing is ever
/// committed.
pub(crate) fn probe_plan() -> Plan {
    let mut b = Builder::new();
    let table = nftnl::Table::new(PROBE_TABLE, ProtoFamily::Inet);
    b.add(&table, MsgType::Add, "add probe table".to_string());
    let chain = nftnl::Chain::new(c"probe", &table);
    b.add(&chain, MsgType::Add, "add probe chain".to_string());
    let mut rule = nftnl::Rule::new(&chain);
    rule.add_expr(&Queue { num: 0 });
    b.add(
        &rule,
        MsgType::Add,
        "the native queue expression".to_string(),
    );
    b.finish()
}

/// The [`GivenSet`] key as its set declares it: nft's concatenated type id of `ipv4_addr .
/// inet_service . inet_service . integer` (each 6 bits, first type highest), and its length
/// in bytes, each field rounded up to a 4-byte register.
struct GivenKeyV4;
struct GivenKeyV6;

impl SetKey for GivenKeyV4 {
    const TYPE: u32 = 0x001c_d344;
    const LEN: u32 = 16;
    fn data(&self) -> Box<[u8]> {
        Box::new([])
    }
}

impl SetKey for GivenKeyV6 {
    const TYPE: u32 = 0x0020_d344;
    const LEN: u32 = 28;
    fn data(&self) -> Box<[u8]> {
        Box::new([])
    }
}

/// The set's user data as nft 1.0.6 writes it for `typeof ip saddr . tcp sport . tcp dport .
/// tcp sequence` (captured from its netlink batch). nft needs it to print the `typeof` line
/// back; the kernel keeps it without reading it. TLVs of one type byte and one length byte:
/// key byte order 0; the key's `typeof`: a concatenation (expression type 13) of four payload
/// expressions (type 7), each a protocol description and a field of it: the address (`ip`
/// 0x0c field 0x0b `saddr`, or `ip6` 0x0d field 0x08), then `tcp` (0x08) fields 1 `sport`,
/// 2 `dport` and 3 `sequence`, the last with its length, 32 bits.
fn given_set_userdata(family: IpFamily) -> [u8; 110] {
    let (desc, field) = match family {
        IpFamily::V4 => (0x0c, 0x0b),
        IpFamily::V6 => (0x0d, 0x08),
    };
    [
        0x00, 0x04, 0x00, 0x00, 0x00, 0x00, // key byte order
        0x03, 0x66, // key typeof, 102 bytes
        0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, // expression: concatenation
        0x01, 0x5e, // its data, 94 bytes
        0x00, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, desc, 0x00, 0x00,
        0x00, 0x01, 0x04, field, 0x00, 0x00, 0x00, // [0] payload: address
        0x01, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x08, 0x00, 0x00,
        0x00, 0x01, 0x04, 0x01, 0x00, 0x00, 0x00, // [1] payload: tcp sport
        0x02, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x08, 0x00, 0x00,
        0x00, 0x01, 0x04, 0x02, 0x00, 0x00, 0x00, // [2] payload: tcp dport
        0x03, 0x1a, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x12, 0x00, 0x04, 0x08, 0x00, 0x00,
        0x00, 0x01, 0x04, 0x03, 0x00, 0x00, 0x00, 0x04, 0x04, 0x20, 0x00, 0x00,
        0x00, // [3] payload: tcp sequence, 32 bits
    ]
}

/// Flags, size, timeout and user data of a set the packet path adds elements to (`flags
/// dynamic,timeout`: `NFT_SET_EVAL` lets a rule's `update` add elements, `NFT_SET_TIMEOUT`
/// lets them expire).
fn configure_dynamic_set<K: SetKey>(set: &Set<'_, K>, size: u32, timeout_ms: u64, user: &[u8]) {
    let user_len = u32::try_from(user.len()).expect("a constant of a few bytes");
    let set = set.as_ptr().as_ptr();
    // SAFETY: `set` is the live libnftnl set the borrowed `Set` owns; libnftnl copies every
    // value, the user data included.
    unsafe {
        nftnl::nftnl_sys::nftnl_set_set_u32(
            set,
            attr(nftnl::nftnl_sys::NFTNL_SET_FLAGS),
            c32(libc::NFT_SET_TIMEOUT | libc::NFT_SET_EVAL),
        );
        nftnl::nftnl_sys::nftnl_set_set_u32(set, attr(nftnl::nftnl_sys::NFTNL_SET_DESC_SIZE), size);
        nftnl::nftnl_sys::nftnl_set_set_u64(
            set,
            attr(nftnl::nftnl_sys::NFTNL_SET_TIMEOUT),
            timeout_ms,
        );
        nftnl::nftnl_sys::nftnl_set_set_data(
            set,
            attr(nftnl::nftnl_sys::NFTNL_SET_USERDATA),
            user.as_ptr().cast(),
            user_len,
        );
    }
}

/// `set given { typeof … ; size …; flags dynamic,timeout; timeout …; }`, before the chains
/// whose rules name it (by name and batch-local id).
fn add_given_set(b: &mut Builder, table: &nftnl::Table, set: &GivenSet) {
    let id = b.next_set_id;
    b.next_set_id += 1;
    b.given_set_id = id;
    let name = CString::new(GIVEN_SET_NAME).expect("a constant without NUL");
    let family = table.get_family();
    let label = format!("set {GIVEN_SET_NAME}");
    let user = given_set_userdata(set.family);
    match set.family {
        IpFamily::V4 => {
            let s: Set<'_, GivenKeyV4> = Set::new_named(&name, id, table, family);
            configure_dynamic_set(&s, GIVEN_SIZE, GIVEN_TIMEOUT_MS, &user);
            b.add(&s, MsgType::Add, label);
        }
        IpFamily::V6 => {
            let s: Set<'_, GivenKeyV6> = Set::new_named(&name, id, table, family);
            configure_dynamic_set(&s, GIVEN_SIZE, GIVEN_TIMEOUT_MS, &user);
            b.add(&s, MsgType::Add, label);
        }
    }
}

/// The user data nft 1.0.6 writes for a set declared `type ipv4_addr` or `type ipv6_addr`
/// (captured with `nft --debug=mnl`): one TLV, the key byte order (type 0, length 4, host
/// order u32) big endian (nft's `BYTEORDER_BIG_ENDIAN`, 2).
fn address_set_userdata() -> [u8; 6] {
    let order = 2u32.to_ne_bytes();
    [0x00, 0x04, order[0], order[1], order[2], order[3]]
}

/// `set syn_prefix4 { type ipv4_addr; size …; flags dynamic,timeout; timeout …; }` (or
/// `syn_prefix6`, `ipv6_addr`), before the chains whose rules name it.
fn add_syn_prefix_set(b: &mut Builder, table: &nftnl::Table, set: &SynPrefixSet) {
    let id = b.next_set_id;
    b.next_set_id += 1;
    b.syn_prefix_set_id = id;
    let name = CString::new(set.name()).expect("a constant without NUL");
    let family = table.get_family();
    let label = format!("set {}", set.name());
    let user = address_set_userdata();
    match set.family {
        IpFamily::V4 => {
            let s: Set<'_, std::net::Ipv4Addr> = Set::new_named(&name, id, table, family);
            configure_dynamic_set(&s, SYN_PREFIX_SIZE, SYN_PREFIX_TIMEOUT_MS, &user);
            b.add(&s, MsgType::Add, label);
        }
        IpFamily::V6 => {
            let s: Set<'_, std::net::Ipv6Addr> = Set::new_named(&name, id, table, family);
            configure_dynamic_set(&s, SYN_PREFIX_SIZE, SYN_PREFIX_TIMEOUT_MS, &user);
            b.add(&s, MsgType::Add, label);
        }
    }
}

/// `update @syn_prefix4 { ip saddr & MASK limit rate over … }` as nft emits it: the source
/// address into register 1, masked there by a bitwise expression (kept by nft even when the
/// mask keeps every bit), then the dynset with the limit inside.
fn check_syn_prefix(
    b: &Builder,
    rule: &mut nftnl::Rule<'_>,
    deps: &mut Deps,
    family: IpFamily,
    limit: &SynPrefixLimit,
) {
    check_nfproto(rule, deps, family);
    let mask = match limit.mask(family) {
        IpAddr::V4(m) => m.octets().to_vec(),
        IpAddr::V6(m) => m.octets().to_vec(),
    };
    load_saddr(rule, family);
    rule.add_expr(&Bitwise::new(&mask[..], &vec![0u8; mask.len()][..]));
    rule.add_expr(&DynsetUpdate {
        set_name: CString::new(syn_prefix_set_name(family)).expect("a constant without NUL"),
        set_id: b.syn_prefix_set_id,
        limit: Some(LimitOver {
            rate_per_second: limit.rate_per_second,
            burst: limit.burst,
        }),
    });
}

/// The source address of `family` into register 1 (and on, for IPv6); returns its length.
fn load_saddr(rule: &mut nftnl::Rule<'_>, family: IpFamily) -> u32 {
    let (offset, len) = match family {
        IpFamily::V4 => (12, 4),
        IpFamily::V6 => (8, 16),
    };
    rule.add_expr(&Load {
        base: PayloadBase::Network,
        offset,
        len,
        dreg: reg::R1,
    });
    len
}

/// `ADDR saddr . tcp sport . tcp dport . tcp sequence` into the registers nft uses for a
/// concatenation: the address from register 1 on, each next field in the 4-byte register
/// after the previous one (zero-padded by the load), so the key starts at register 1.
fn load_syn_tuple(rule: &mut nftnl::Rule<'_>, deps: &mut Deps, family: IpFamily) {
    check_nfproto(rule, deps, family);
    check_l4proto(rule, deps, IPPROTO_TCP);
    let len = load_saddr(rule, family);
    let first = reg::R32_00 + len / 4;
    for (next, (offset, len)) in (first..).zip([(0, 2), (2, 2), (4, 4)]) {
        // A 4-byte register at the start of a 16-byte one is sent as the 16-byte one, as the
        // kernel reports it back (`NFT_REG32_04` is register 2).
        let dreg = if (next - reg::R32_00).is_multiple_of(4) {
            reg::R1 + (next - reg::R32_00) / 4
        } else {
            next
        };
        rule.add_expr(&Load {
            base: PayloadBase::Transport,
            offset,
            len,
            dreg,
        });
    }
}

fn add_chain(b: &mut Builder, table: &nftnl::Table, family: Family, chain: &Chain) {
    let name = CString::new(chain.name.as_str()).expect("chain names have no NUL");
    let mut nl_chain = nftnl::Chain::new(&name, table);
    let hook = match chain.name {
        ChainName::Prerouting => nftnl::Hook::PreRouting,
        ChainName::Input => nftnl::Hook::In,
        ChainName::Output => nftnl::Hook::Out,
        ChainName::Egress => EGRESS_HOOK,
    };
    nl_chain.set_hook(hook, chain.priority);
    nl_chain.set_type(nftnl::ChainType::Filter);
    nl_chain.set_policy(nftnl::Policy::Accept);
    if let Some(device) = &chain.device {
        // Validated (no NUL) by ClusterSpec::validate; an invalid name fails at the kernel.
        let device = CString::new(device.as_str()).unwrap_or_default();
        nl_chain.set_device(&device);
    }
    let path = format!("{} {TABLE_NAME} {}", family.as_str(), chain.name.as_str());
    b.add(&nl_chain, MsgType::Add, format!("add chain {path}"));
    for (i, rule) in chain.rules.iter().enumerate() {
        add_rule(b, &nl_chain, rule, &format!("rule {} of {path}", i + 1));
    }
}

/// Which dependencies the expressions so far have established, so each is emitted once, where
/// nft emits it: before the first match that needs it.
#[derive(Default)]
struct Deps {
    nfproto: Option<IpFamily>,
    l4proto: Option<u8>,
}

fn add_rule(b: &mut Builder, chain: &nftnl::Chain<'_>, rule: &Rule, label: &str) {
    let mut nl_rule = nftnl::Rule::new(chain);
    let mut deps = Deps::default();
    for m in &rule.matches {
        add_match(b, chain.get_table(), &mut nl_rule, &mut deps, m, label);
    }
    if rule.counter {
        nl_rule.add_expr(&Counter);
    }
    add_verdict(b, &mut nl_rule, &mut deps, &rule.action);
    let comment = CString::new(rule.comment).expect("comments are constants without NUL");
    nl_rule
        .set_comment(&comment)
        .expect("comments are constants shorter than NFTNL_UDATA_COMMENT_MAXLEN");
    b.add(&nl_rule, MsgType::Add, label.to_string());
}

fn cmp(op: CmpOp, data: &[u8]) -> Cmp<&[u8]> {
    Cmp::new(op, data)
}

fn check_nfproto(rule: &mut nftnl::Rule<'_>, deps: &mut Deps, family: IpFamily) {
    if deps.nfproto != Some(family) {
        let nfproto = match family {
            IpFamily::V4 => libc::NFPROTO_IPV4,
            IpFamily::V6 => libc::NFPROTO_IPV6,
        };
        rule.add_expr(&Meta::NfProto);
        rule.add_expr(&cmp(CmpOp::Eq, &[c8(nfproto)]));
        deps.nfproto = Some(family);
    }
}

fn check_l4proto(rule: &mut nftnl::Rule<'_>, deps: &mut Deps, proto: u8) {
    if deps.l4proto != Some(proto) {
        rule.add_expr(&Meta::L4Proto);
        rule.add_expr(&cmp(CmpOp::Eq, &[proto]));
        deps.l4proto = Some(proto);
    }
}

/// `meta iifname`/`oifname` compare all IFNAMSIZ (16) bytes of the NUL-padded name, as nft does.
fn check_iface(rule: &mut nftnl::Rule<'_>, key: Meta, name: &str) {
    let mut padded = [0u8; libc::IFNAMSIZ];
    let len = name.len().min(libc::IFNAMSIZ - 1);
    padded[..len].copy_from_slice(&name.as_bytes()[..len]);
    rule.add_expr(&key);
    rule.add_expr(&cmp(CmpOp::Eq, &padded));
}

fn check_addr(rule: &mut nftnl::Rule<'_>, deps: &mut Deps, addr: &IpAddr, dest: bool) {
    let family = IpFamily::of(addr);
    check_nfproto(rule, deps, family);
    let (offset, len, octets) = match addr {
        IpAddr::V4(a) => (if dest { 16 } else { 12 }, 4, a.octets().to_vec()),
        IpAddr::V6(a) => (if dest { 24 } else { 8 }, 16, a.octets().to_vec()),
    };
    rule.add_expr(&Load {
        base: PayloadBase::Network,
        offset,
        len,
        dreg: reg::R1,
    });
    rule.add_expr(&cmp(CmpOp::Eq, &octets));
}

/// Loads 1 byte of the TCP header at `TCP_FLAGS_OFFSET` and masks it.
fn load_tcp_flags(rule: &mut nftnl::Rule<'_>, deps: &mut Deps, mask: u8) {
    check_l4proto(rule, deps, IPPROTO_TCP);
    rule.add_expr(&Load {
        base: PayloadBase::Transport,
        offset: TCP_FLAGS_OFFSET,
        len: 1,
        dreg: reg::R1,
    });
    rule.add_expr(&Bitwise::new(&[mask][..], &[0u8][..]));
}

/// A port list for an anonymous set: key type `inet_service` (13), 2 bytes, network order.
struct Port(u16);

impl SetKey for Port {
    const TYPE: u32 = 13;
    const LEN: u32 = 2;

    fn data(&self) -> Box<[u8]> {
        Box::new(self.0.to_be_bytes())
    }
}

fn check_port(
    b: &mut Builder,
    table: &nftnl::Table,
    rule: &mut nftnl::Rule<'_>,
    deps: &mut Deps,
    ports: &[u16],
    negate: bool,
    label: &str,
) {
    check_l4proto(rule, deps, IPPROTO_TCP);
    rule.add_expr(&Load {
        base: PayloadBase::Transport,
        offset: 2,
        len: 2,
        dreg: reg::R1,
    });
    let op = if negate { CmpOp::Neq } else { CmpOp::Eq };
    if let [port] = ports {
        // nft turns a one-element set into a plain comparison; so do we.
        rule.add_expr(&cmp(op, &port.to_be_bytes()));
        return;
    }
    // An anonymous, constant set that lives and dies with the rule. It must precede the rule in
    // the batch; the rule finds it by its batch-local id.
    let id = b.next_set_id;
    b.next_set_id += 1;
    let mut set: Set<'_, Port> = Set::new(ANON_SET_NAME, id, table, table.get_family());
    for port in ports {
        set.add(&Port(*port));
    }
    b.add(&set, MsgType::Add, format!("the port set of {label}"));
    // Each message must be written before the iterator advances: writing it is what moves
    // libnftnl's element cursor (collecting first would loop forever).
    for msg in set.elems_iter() {
        b.add(
            &msg,
            MsgType::Add,
            format!("the port set elements of {label}"),
        );
    }
    rule.add_expr(&SetLookup {
        set_name: ANON_SET_NAME.to_owned(),
        set_id: id,
        invert: negate,
    });
}

/// `udp sport P` (`offset` 0) or `udp dport P` (`offset` 2): two bytes of the UDP header,
/// network order, after the `meta l4proto udp` dependency nft adds.
fn check_udp_port(rule: &mut nftnl::Rule<'_>, deps: &mut Deps, offset: u32, port: u16) {
    check_l4proto(rule, deps, IPPROTO_UDP);
    rule.add_expr(&Load {
        base: PayloadBase::Transport,
        offset,
        len: 2,
        dreg: reg::R1,
    });
    rule.add_expr(&cmp(CmpOp::Eq, &port.to_be_bytes()));
}

/// `jhash INPUT mod COUNT seed SEED != INDEX`, with the input laid out in registers exactly as
/// nft lays out a concatenation: address in register 2, then the port in the next 4-byte
/// register (zero-padded by the payload load), hashed over the rounded-up length.
fn check_hash(
    rule: &mut nftnl::Rule<'_>,
    deps: &mut Deps,
    input: HashInput,
    modulus: u32,
    seed: u32,
    index: u32,
) {
    let (family, l4) = match input {
        HashInput::Saddr(family) => (family, None),
        HashInput::SaddrSport(family, l4) => (family, Some(l4)),
    };
    check_nfproto(rule, deps, family);
    if let Some(l4) = l4 {
        check_l4proto(rule, deps, l4.number());
    }
    let (offset, addr_len, port_reg) = match family {
        IpFamily::V4 => (12, 4, reg::R32_05),
        IpFamily::V6 => (8, 16, reg::R3),
    };
    rule.add_expr(&Load {
        base: PayloadBase::Network,
        offset,
        len: addr_len,
        dreg: reg::R2,
    });
    let mut len = addr_len;
    if l4.is_some() {
        rule.add_expr(&Load {
            base: PayloadBase::Transport,
            offset: 0,
            len: 2,
            dreg: port_reg,
        });
        len += 4;
    }
    rule.add_expr(&Jhash {
        sreg: reg::R2,
        len,
        modulus,
        seed,
    });
    rule.add_expr(&cmp(CmpOp::Neq, &index.to_ne_bytes()));
}

fn add_match(
    b: &mut Builder,
    table: &nftnl::Table,
    rule: &mut nftnl::Rule<'_>,
    deps: &mut Deps,
    m: &Match,
    label: &str,
) {
    match m {
        Match::IifName(name) => check_iface(rule, Meta::IifName, name),
        Match::OifName(name) => check_iface(rule, Meta::OifName, name),
        Match::Daddr(addr) => check_addr(rule, deps, addr, true),
        Match::Saddr(addr) => check_addr(rule, deps, addr, false),
        Match::L4Proto(proto) => {
            // An explicit match always emits its comparison (nft prints it back).
            rule.add_expr(&Meta::L4Proto);
            rule.add_expr(&cmp(CmpOp::Eq, &[*proto]));
            deps.l4proto = Some(*proto);
        }
        Match::TcpDport { ports, negate } => {
            check_port(b, table, rule, deps, ports, *negate, label)
        }
        Match::UdpPorts { sport, dport } => {
            // nft merges `udp sport S udp dport D` into one load of both ports.
            check_l4proto(rule, deps, IPPROTO_UDP);
            rule.add_expr(&Load {
                base: PayloadBase::Transport,
                offset: 0,
                len: 4,
                dreg: reg::R1,
            });
            let mut both = [0u8; 4];
            both[..2].copy_from_slice(&sport.to_be_bytes());
            both[2..].copy_from_slice(&dport.to_be_bytes());
            rule.add_expr(&cmp(CmpOp::Eq, &both));
        }
        Match::UdpDport(port) => check_udp_port(rule, deps, 2, *port),
        Match::SkUidNot(uid) => {
            rule.add_expr(&Meta::SkUid);
            rule.add_expr(&cmp(CmpOp::Neq, &uid.to_ne_bytes()));
        }
        Match::TcpSynOnly => {
            load_tcp_flags(rule, deps, TCP_FLAGS_FIN_SYN_RST_ACK);
            rule.add_expr(&cmp(CmpOp::Eq, &[TCP_FLAG_SYN]));
        }
        Match::SynNotGiven(family) => {
            load_syn_tuple(rule, deps, *family);
            rule.add_expr(&SetLookup {
                set_name: CString::new(GIVEN_SET_NAME).expect("a constant without NUL"),
                set_id: b.given_set_id,
                invert: true,
            });
        }
        Match::CtMarkNot(mark) => {
            rule.add_expr(&Conntrack::Mark { set: false });
            rule.add_expr(&cmp(CmpOp::Neq, &mark.to_ne_bytes()));
        }
        Match::TcpRst => {
            load_tcp_flags(rule, deps, TCP_FLAG_RST);
            rule.add_expr(&cmp(CmpOp::Neq, &[0]));
        }
        Match::CtStateInvalid => {
            rule.add_expr(&Conntrack::State);
            rule.add_expr(&Bitwise::new(
                &CT_STATE_INVALID.to_ne_bytes()[..],
                &0u32.to_ne_bytes()[..],
            ));
            rule.add_expr(&cmp(CmpOp::Neq, &0u32.to_ne_bytes()));
        }
        Match::EchoRequest(family) => {
            let (proto, echo) = match family {
                IpFamily::V4 => (IPPROTO_ICMP, ICMP_ECHO_REQUEST),
                IpFamily::V6 => (IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST),
            };
            check_l4proto(rule, deps, proto);
            rule.add_expr(&Load {
                base: PayloadBase::Transport,
                offset: 0,
                len: 1,
                dreg: reg::R1,
            });
            rule.add_expr(&cmp(CmpOp::Eq, &[echo]));
        }
        Match::HashNotMine { input, hash } => {
            check_hash(rule, deps, *input, hash.count, hash.seed, hash.index)
        }
        Match::SynPrefixOverLimit { family, limit } => {
            check_syn_prefix(b, rule, deps, *family, limit)
        }
    }
}

fn add_verdict(b: &Builder, rule: &mut nftnl::Rule<'_>, deps: &mut Deps, action: &Action) {
    match action {
        Action::Accept => rule.add_expr(&Verdict::Accept),
        Action::Drop => rule.add_expr(&Verdict::Drop),
        Action::Queue {
            num,
            backend: QueueBackend::Native,
        } => rule.add_expr(&Queue { num: *num }),
        Action::Queue {
            num,
            backend: QueueBackend::Compat,
        } => rule.add_expr(&NfqueueTarget { num: *num }),
        Action::SetEtherSaddr(mac) => {
            rule.add_expr(&Meta::IifType);
            rule.add_expr(&cmp(CmpOp::Eq, &ARPHRD_ETHER.to_ne_bytes()));
            rule.add_expr(&Immediate::new(*mac, Register::Reg1));
            rule.add_expr(&Store {
                base: PayloadBase::Link,
                offset: 6,
                len: 6,
                sreg: reg::R1,
            });
        }
        Action::SetCtMark(mark) => {
            rule.add_expr(&Immediate::new(mark.to_ne_bytes(), Register::Reg1));
            rule.add_expr(&Conntrack::Mark { set: true });
        }
        Action::RememberGiven(family) => {
            load_syn_tuple(rule, deps, *family);
            rule.add_expr(&DynsetUpdate {
                set_name: CString::new(GIVEN_SET_NAME).expect("a constant without NUL"),
                set_id: b.given_set_id,
                limit: None,
            });
        }
    }
}
