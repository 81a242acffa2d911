//! The I/O shell: one long-lived netfilter netlink socket that applies, verifies and removes
//! our tables.
//!
//! A batch is handed to the kernel in one `sendmsg`. nfnetlink processes it synchronously in
//! that call and queues every acknowledgement on our socket before `sendmsg` returns, so after
//! sending we drain the socket without blocking and account for every message's ack.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;

use crate::ffi::{attr, c16, c32, c8};
use crate::lower::{self, Plan};
use crate::model::{
    ChainName, Family, CONTROL_FOREIGN_COMMENT, CONTROL_LOCAL_COMMENT, FOREIGN_DROP_COMMENT,
    NOT_OWNED_COMMENT, SYN_PREFIX_LIMIT_COMMENT, UNTRACKED_COMMENT,
};

/// What the ruleset's counting drop rules have dropped since it was installed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleDrops {
    /// Protocol 253 from a host that is not a member.
    pub foreign_forward: u64,
    /// Client segments of a connection this node was not given (input).
    pub not_owned_in: u64,
    /// Segments this node's TCP sent for such a connection (output): RSTs, ACKs, SYN/ACKs.
    pub not_owned_out: u64,
    /// Client segments conntrack has no entry for (input).
    pub untracked_in: u64,
    /// Segments from the VIP conntrack has no entry for (output).
    pub untracked_out: u64,
    /// Datagrams to the cluster port from a non-member, from another interface or port.
    pub control_port_foreign: u64,
    /// Datagrams to the cluster port that a local process other than the daemon sent.
    pub control_port_local: u64,
    /// Client SYNs the master dropped before the queue because their source prefix was over
    /// [`crate::ClusterSpec::syn_prefix_limit`] (0 on a member, or with no limit).
    pub syn_prefix_limited: u64,
}
use crate::{Error, HostFacts, QueueBackend, Ruleset, TABLE_NAME};

/// Receive buffer size. Dumps come in skbs of at most 32 KiB (and a single message is at most
/// `nft_nlmsg_maxsize`, about 68 KiB), so 128 KiB never truncates.
const RECV_BUF_LEN: usize = 128 * 1024;

/// How long a blocking receive (during a dump) may wait.
const RECV_TIMEOUT_SECS: libc::time_t = 5;

/// `SOL_NETLINK` options (linux/netlink.h): ask for the kernel's error strings, and for error
/// messages that do not echo our whole request back.
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
/// `nlmsgerr` flags and the extended-ack attribute carrying the error string.
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const NLMSG_HDRLEN: usize = 16;

/// Handle on the kernel's nf_tables, through one netfilter netlink socket opened in the network
/// namespace of the thread that called [`Firewall::open`]. Applying over a long-lived socket
/// costs well under a millisecond; a fresh socket per batch costs about 10 ms.
#[derive(Debug)]
pub struct Firewall {
    /// The socket; owned here and closed on drop.
    socket: Socket,
    /// Sequence number of the next dump request (batches number their own messages from 1).
    dump_seq: u32,
    /// Receive buffer, `u64`s so netlink headers in it are aligned.
    buf: Vec<u64>,
}

/// `mnl::Socket` wraps a `*mut mnl_socket`, which makes it `!Send`.
struct Socket(mnl::Socket);

// SAFETY: an `mnl_socket` is a heap struct holding a file descriptor and its bound address. No
// libmnl call depends on the thread that opened it, so moving it to another thread is sound.
// `Firewall` stays `!Sync`: `&mut self` on every method keeps use exclusive.
unsafe impl Send for Socket {}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("fd", &self.0.as_raw_fd())
            .field("portid", &self.0.portid())
            .finish()
    }
}

/// One acknowledgement: the sequence number it answers and the kernel's errno (0 = success).
struct Ack {
    seq: u32,
    errno: i32,
    detail: Option<String>,
}

impl Firewall {
    /// Opens and binds the netfilter netlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Firewall, Error> {
        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(Error::Open)?;
        for option in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            set_netlink_option(socket.as_raw_fd(), option).map_err(Error::Open)?;
        }
        set_recv_timeout(socket.as_raw_fd()).map_err(Error::Open)?;
        Ok(Firewall {
            socket: Socket(socket),
            dump_seq: 1 << 24,
            buf: vec![0; RECV_BUF_LEN / 8],
        })
    }

    /// Finds out whether the kernel has the native `queue` expression. Sends a scratch table
    /// with one `queue` rule as a batch *without* its end message: the kernel checks every
    /// message, reports errors, and aborts, so nothing is ever created. ENOENT for the rule
    /// means no `nft_queue`, so the master will use the xtables target through `nft_compat`.
    pub fn probe(&mut self) -> Result<HostFacts, Error> {
        let plan = lower::probe_plan();
        let bytes = plan.bytes();
        let unterminated = strip_batch_end(&bytes)?;
        self.send(unterminated)?;
        let acks = self.drain()?;
        match acks.into_iter().find(|a| a.errno != 0) {
            None => Ok(HostFacts {
                queue: QueueBackend::Native,
            }),
            Some(ack) if ack.errno == libc::ENOENT => {
                tracing::debug!(what = %plan.label(ack.seq), "no native queue expression; using the NFQUEUE target");
                Ok(HostFacts {
                    queue: QueueBackend::Compat,
                })
            }
            Some(ack) => Err(rejected(&plan, ack)),
        }
    }

    /// Replaces our tables with `rs` in one atomic batch: for each family, `add table; delete
    /// table`, then the new table, chains, sets and rules; except that an `inet` table already
    /// there keeps its `given` set with its elements (see `lower::apply_plan`), so its chains
    /// and other sets are read first. Every message's acknowledgement is checked; on any error
    /// the kernel rolls the whole batch back and the old ruleset stays.
    pub fn apply(&mut self, rs: &Ruleset) -> Result<(), Error> {
        let present = self.present()?;
        self.run(&lower::apply_plan(rs, &present))
    }

    /// Our `inet` table's chains and named sets, as the kernel holds them now.
    fn present(&mut self) -> Result<lower::Present, Error> {
        let family = Family::Inet;
        if !self.dump_tables(family)?.iter().any(|n| n == TABLE_NAME) {
            return Ok(lower::Present::default());
        }
        let chains = self
            .dump_chains(family)?
            .into_iter()
            .map(|c| c.name)
            .collect();
        let mut sets = Vec::new();
        self.dump(libc::NFT_MSG_GETSET, family, libc::NLM_F_DUMP, |msg| {
            if msg.family() == Some(family_byte(family)) {
                if let Some(set) = KernelSet::parse(msg)? {
                    sets.push(set);
                }
            }
            Ok(())
        })?;
        Ok(lower::Present { chains, sets })
    }

    /// Deletes our tables (and nothing else). Succeeds when they are already absent.
    pub fn remove(&mut self) -> Result<(), Error> {
        self.run(&lower::remove_plan())
    }

    /// Reads our tables back and compares them with `rs`: which tables exist, each chain's hook,
    /// priority, type, policy and device, and each chain's rules in order, as libnftnl renders
    /// them (`nftnl_rule_snprintf`). The expected rendering comes from parsing the very
    /// messages [`Firewall::apply`] sends, so it checks what the kernel kept against what it was
    /// given, expression by expression. Counter values and the kernel-chosen names of anonymous
    /// sets are masked.
    pub fn verify(&mut self, rs: &Ruleset) -> Result<(), Error> {
        // The rules a fresh table gets are the rules a kept one gets.
        let plan = lower::apply_plan(rs, &lower::Present::default());
        let expected_rules = expected_rules(&plan)?;
        for family in Family::ALL {
            let want_table = rs.table(family);
            let have_table = self
                .dump_tables(family)?
                .iter()
                .any(|name| name == TABLE_NAME);
            if have_table != want_table.is_some() {
                return Err(mismatch(format!(
                    "table {} {TABLE_NAME} is {}",
                    family.as_str(),
                    if have_table { "present" } else { "absent" }
                )));
            }
            let Some(table) = want_table else { continue };

            let chains = self.dump_chains(family)?;
            let names: Vec<&str> = chains.iter().map(|c| c.name.as_str()).collect();
            let want_names: Vec<&str> = table.chains.iter().map(|c| c.name.as_str()).collect();
            if sorted(&names) != sorted(&want_names) {
                return Err(mismatch(format!(
                    "{} {TABLE_NAME} has chains {names:?}, expected {want_names:?}",
                    family.as_str()
                )));
            }
            for want in &table.chains {
                let have = chains
                    .iter()
                    .find(|c| c.name == want.name.as_str())
                    .ok_or_else(|| mismatch(format!("chain {} missing", want.name.as_str())))?;
                check_chain(family, want, have)?;
            }

            let rules = self.dump_rules(family)?;
            for chain in &table.chains {
                let key = (family, chain.name.as_str().to_string());
                let want: &[String] = expected_rules.get(&key).map_or(&[], Vec::as_slice);
                let have: Vec<&String> = rules
                    .iter()
                    .filter(|r| r.chain == key.1)
                    .map(|r| &r.text)
                    .collect();
                let path = format!("{} {TABLE_NAME} {}", family.as_str(), key.1);
                if have.len() != want.len() {
                    return Err(mismatch(format!(
                        "{path} has {} rules, expected {}",
                        have.len(),
                        want.len()
                    )));
                }
                for (i, (have, want)) in have.iter().zip(want).enumerate() {
                    if *have != want {
                        return Err(mismatch(format!(
                            "rule {} of {path}:\n kernel:\n{have}\n sent:\n{want}",
                            i + 1
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Packets dropped by the "protocol 253 from a non-member" rule: forwarded SYNs from hosts
    /// that are not cluster members. Read from the rule's counter over netlink.
    pub fn foreign_forward_drops(&mut self) -> Result<u64, Error> {
        self.dump_rules(Family::Inet)?
            .into_iter()
            .find(|r| {
                r.chain == ChainName::Input.as_str()
                    && r.comment.as_deref() == Some(FOREIGN_DROP_COMMENT)
            })
            .and_then(|r| r.packets)
            .ok_or(Error::RuleNotFound {
                comment: FOREIGN_DROP_COMMENT,
            })
    }

    /// The packet counters of every counting drop rule of ours, from one rule dump. A rule
    /// the installed ruleset lacks counts 0.
    pub fn drop_counters(&mut self) -> Result<RuleDrops, Error> {
        let mut d = RuleDrops::default();
        for r in self.dump_rules(Family::Inet)? {
            let n = r.packets.unwrap_or(0);
            let slot = match (r.chain.as_str(), r.comment.as_deref()) {
                (c, Some(FOREIGN_DROP_COMMENT)) if c == ChainName::Input.as_str() => {
                    &mut d.foreign_forward
                }
                (c, Some(NOT_OWNED_COMMENT)) if c == ChainName::Input.as_str() => {
                    &mut d.not_owned_in
                }
                (c, Some(NOT_OWNED_COMMENT)) if c == ChainName::Output.as_str() => {
                    &mut d.not_owned_out
                }
                (c, Some(UNTRACKED_COMMENT)) if c == ChainName::Input.as_str() => {
                    &mut d.untracked_in
                }
                (c, Some(UNTRACKED_COMMENT)) if c == ChainName::Output.as_str() => {
                    &mut d.untracked_out
                }
                (c, Some(CONTROL_FOREIGN_COMMENT)) if c == ChainName::Input.as_str() => {
                    &mut d.control_port_foreign
                }
                (c, Some(CONTROL_LOCAL_COMMENT)) if c == ChainName::Output.as_str() => {
                    &mut d.control_port_local
                }
                (c, Some(SYN_PREFIX_LIMIT_COMMENT)) if c == ChainName::Prerouting.as_str() => {
                    &mut d.syn_prefix_limited
                }
                _ => continue,
            };
            *slot += n;
        }
        Ok(d)
    }

    /// The kernel's nf_tables generation id, which every committed transaction (ours or anyone
    /// else's) increments. Two reads around [`Firewall::apply`] that differ by exactly one show
    /// the replacement was a single transaction; a change between two of our own applies shows
    /// someone else touched the ruleset.
    pub fn generation(&mut self) -> Result<u32, Error> {
        let mut id = None;
        // NFT_MSG_GETGEN is a plain request (not a dump); its NEWGEN reply carries
        // NFTA_GEN_ID, a big-endian u32.
        self.dump(libc::NFT_MSG_GETGEN, Family::Inet, 0, |msg| {
            id = id.or(attribute(msg, NFTA_GEN_ID)
                .and_then(|v| v.try_into().ok())
                .map(u32::from_be_bytes));
            Ok(())
        })?;
        id.ok_or(Error::Malformed {
            reason: "generation reply without NFTA_GEN_ID",
        })
    }

    /// Sends a finished batch and checks that every message was acknowledged without error.
    fn run(&mut self, plan: &Plan) -> Result<(), Error> {
        self.send(&plan.bytes())?;
        let acks = self.drain()?;
        let expected = plan.batch.sequence_numbers();
        if let Some(ack) = acks.iter().filter(|a| a.errno != 0).min_by_key(|a| a.seq) {
            for other in acks.iter().filter(|a| a.errno != 0 && a.seq != ack.seq) {
                tracing::debug!(what = %plan.label(other.seq), errno = other.errno, "also rejected");
            }
            let ack = Ack {
                seq: ack.seq,
                errno: ack.errno,
                detail: ack.detail.clone(),
            };
            return Err(rejected(plan, ack));
        }
        let acked = acks.iter().filter(|a| expected.contains(&a.seq)).count();
        if acked < expected.len() {
            return Err(Error::MissingAck {
                missing: expected.len() - acked,
                expected: expected.len(),
            });
        }
        Ok(())
    }

    fn send(&self, bytes: &[u8]) -> Result<(), Error> {
        let sent = self.socket.0.send(bytes).map_err(Error::Send)?;
        if sent != bytes.len() {
            return Err(Error::Send(io::Error::other("short netlink send")));
        }
        Ok(())
    }

    /// Receives into the aligned buffer. Returns the number of bytes, or None when `nonblocking`
    /// and nothing is queued.
    fn recv(&mut self, nonblocking: bool) -> Result<Option<usize>, Error> {
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            // SAFETY: the pointer and length describe our own writable buffer.
            let n = unsafe {
                libc::recv(
                    self.socket.0.as_raw_fd(),
                    self.buf.as_mut_ptr().cast::<c_void>(),
                    self.buf.len() * 8,
                    flags,
                )
            };
            if n >= 0 {
                return Ok(Some(n.unsigned_abs()));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if nonblocking => return Ok(None),
                io::ErrorKind::WouldBlock => {
                    return Err(Error::Recv(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no reply from nf_tables",
                    )))
                }
                _ => return Err(Error::Recv(err)),
            }
        }
    }

    fn received(&self, n: usize) -> &[u8] {
        // SAFETY: `buf` owns `buf.len() * 8` initialised bytes and `n` came from recv() into it,
        // so `n` is within bounds. Reading u64 storage as bytes is always valid.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), n) }
    }

    /// Collects every acknowledgement already queued on the socket.
    fn drain(&mut self) -> Result<Vec<Ack>, Error> {
        let mut acks = Vec::new();
        while let Some(n) = self.recv(true)? {
            for msg in messages(self.received(n)) {
                let msg = msg?;
                if msg.ty == c16(libc::NLMSG_ERROR) {
                    acks.push(parse_ack(&msg)?);
                }
            }
        }
        Ok(acks)
    }

    /// Sends a dump request for `msg_type` in `family` and calls `each` on every reply message.
    fn dump(
        &mut self,
        msg_type: libc::c_int,
        family: Family,
        flags: libc::c_int,
        mut each: impl FnMut(&NlMsg<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.dump_seq = self.dump_seq.wrapping_add(1);
        let seq = self.dump_seq;
        let mut request = [0u64; 4];
        // SAFETY: `request` is 32 aligned bytes, enough for the 20-byte header libnftnl writes
        // (nlmsghdr + nfgenmsg) and nothing more.
        let header = unsafe {
            sys::nftnl_nlmsg_build_hdr(
                request.as_mut_ptr().cast::<c_char>(),
                c16(msg_type),
                lower::proto_family(family) as u16,
                c16(flags | libc::NLM_F_ACK),
                seq,
            )
        };
        // SAFETY: `header` points into `request` and was just initialised by libnftnl.
        let len = unsafe { (*header).nlmsg_len } as usize;
        // SAFETY: `len` bytes of `request` were initialised by libnftnl (len <= 32).
        let bytes = unsafe { std::slice::from_raw_parts(request.as_ptr().cast::<u8>(), len) };
        self.send(bytes)?;
        loop {
            let n = self.recv(false)?.unwrap_or(0);
            let mut done = false;
            for msg in messages(self.received(n)) {
                let msg = msg?;
                if msg.seq != seq {
                    continue;
                }
                match msg.ty as libc::c_int {
                    libc::NLMSG_DONE => done = true,
                    libc::NLMSG_ERROR => {
                        let ack = parse_ack(&msg)?;
                        if ack.errno != 0 {
                            return Err(Error::Rejected {
                                what: format!("a dump of {} objects", family.as_str()),
                                detail: ack.detail,
                                source: io::Error::from_raw_os_error(ack.errno),
                            });
                        }
                        done = true;
                    }
                    _ => each(&msg)?,
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    fn dump_tables(&mut self, family: Family) -> Result<Vec<String>, Error> {
        let mut names = Vec::new();
        self.dump(libc::NFT_MSG_GETTABLE, family, libc::NLM_F_DUMP, |msg| {
            if msg.family() == Some(family_byte(family)) {
                names.push(msg.table_name()?);
            }
            Ok(())
        })?;
        Ok(names)
    }

    fn dump_chains(&mut self, family: Family) -> Result<Vec<KernelChain>, Error> {
        let mut chains = Vec::new();
        self.dump(libc::NFT_MSG_GETCHAIN, family, libc::NLM_F_DUMP, |msg| {
            let chain = KernelChain::parse(msg)?;
            if chain.table == TABLE_NAME && msg.family() == Some(family_byte(family)) {
                chains.push(chain);
            }
            Ok(())
        })?;
        Ok(chains)
    }

    fn dump_rules(&mut self, family: Family) -> Result<Vec<KernelRule>, Error> {
        let mut rules = Vec::new();
        self.dump(libc::NFT_MSG_GETRULE, family, libc::NLM_F_DUMP, |msg| {
            let rule = KernelRule::parse(msg)?;
            if rule.table == TABLE_NAME && rule.family == u32::from(family_byte(family)) {
                rules.push(rule);
            }
            Ok(())
        })?;
        Ok(rules)
    }
}

fn set_netlink_option(fd: libc::c_int, option: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` outlives the call and its size is passed correctly.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_NETLINK,
            option,
            (&one as *const libc::c_int).cast::<c_void>(),
            socklen_of::<libc::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Dumps block in `recv`; the kernel answers within microseconds, so a reply that has not come
/// after `RECV_TIMEOUT` is an error rather than a hang of the daemon's firewall task.
fn set_recv_timeout(fd: libc::c_int) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: RECV_TIMEOUT_SECS,
        tv_usec: 0,
    };
    // SAFETY: `timeout` outlives the call and its size is passed correctly.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast::<c_void>(),
            socklen_of::<libc::timeval>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The `nfgenmsg` family byte of one of our families (`NFPROTO_INET` = 1, `NFPROTO_NETDEV` = 5).
fn family_byte(family: Family) -> u8 {
    match family {
        Family::Inet => c8(libc::NFPROTO_INET),
        Family::Netdev => c8(libc::NFPROTO_NETDEV),
    }
}

/// `socklen_t` of a small option value.
fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// `NFTA_GEN_ID` (linux/netfilter/nf_tables.h, `enum nft_gen_attributes`).
const NFTA_GEN_ID: u16 = 1;

/// The payload of the first top-level attribute of type `ty` in an nfnetlink message.
fn attribute<'a>(msg: &NlMsg<'a>, ty: u16) -> Option<&'a [u8]> {
    let b = msg.bytes;
    let mut at = NLMSG_HDRLEN + 4; // nlmsghdr + nfgenmsg
    while at + 4 <= b.len() {
        let len = usize::from(u16::from_ne_bytes([b[at], b[at + 1]]));
        // Mask NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        let kind = u16::from_ne_bytes([b[at + 2], b[at + 3]]) & 0x3fff;
        if len < 4 || at + len > b.len() {
            return None;
        }
        if kind == ty {
            return Some(&b[at + 4..at + len]);
        }
        at += len.next_multiple_of(4);
    }
    None
}

fn mismatch(diff: String) -> Error {
    Error::Mismatch { diff }
}

fn rejected(plan: &Plan, ack: Ack) -> Error {
    Error::Rejected {
        what: plan.label(ack.seq),
        detail: ack.detail,
        source: io::Error::from_raw_os_error(ack.errno),
    }
}

fn sorted<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut v = names.to_vec();
    v.sort_unstable();
    v
}

fn check_chain(family: Family, want: &crate::Chain, have: &KernelChain) -> Result<(), Error> {
    let hook = match want.name {
        ChainName::Prerouting => libc::NF_INET_PRE_ROUTING,
        ChainName::Input => libc::NF_INET_LOCAL_IN,
        ChainName::Output => libc::NF_INET_LOCAL_OUT,
        ChainName::Egress => libc::NF_NETDEV_EGRESS,
    };
    let path = format!("{} {TABLE_NAME} {}", family.as_str(), want.name.as_str());
    let checks = [
        ("hook", have.hook == Some(c32(hook))),
        ("priority", have.priority == want.priority),
        ("type", have.kind.as_deref() == Some("filter")),
        ("policy", have.policy == Some(c32(libc::NF_ACCEPT))),
        ("device", have.device == want.device),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        Some((what, _)) => Err(mismatch(format!("{path}: {what} differs ({have:?})"))),
        None => Ok(()),
    }
}

/// The rule messages of an apply plan, parsed back and rendered the way a dump is rendered.
fn expected_rules(plan: &Plan) -> Result<BTreeMap<(Family, String), Vec<String>>, Error> {
    let bytes = plan.bytes();
    // Copy into u64 storage: libnftnl reads netlink attributes with aligned loads.
    let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `aligned` has at least `bytes.len()` writable bytes; the regions don't overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            aligned.as_mut_ptr().cast::<u8>(),
            bytes.len(),
        )
    };
    // SAFETY: as above; the bytes were just initialised.
    let view = unsafe { std::slice::from_raw_parts(aligned.as_ptr().cast::<u8>(), bytes.len()) };
    let newrule = c16((libc::NFNL_SUBSYS_NFTABLES << 8) | libc::NFT_MSG_NEWRULE);
    let mut out: BTreeMap<(Family, String), Vec<String>> = BTreeMap::new();
    for msg in messages(view) {
        let msg = msg?;
        if msg.ty != newrule {
            continue;
        }
        let rule = KernelRule::parse(&msg)?;
        let family = if rule.family == u32::from(family_byte(Family::Netdev)) {
            Family::Netdev
        } else {
            Family::Inet
        };
        out.entry((family, rule.chain)).or_default().push(rule.text);
    }
    Ok(out)
}

/// The batch without its trailing batch-end message (see [`Firewall::probe`]).
fn strip_batch_end(bytes: &[u8]) -> Result<&[u8], Error> {
    let mut last = None;
    for msg in messages(bytes) {
        let msg = msg?;
        last = Some((msg.offset, msg.ty));
    }
    match last {
        Some((offset, ty)) if ty == c16(libc::NFNL_MSG_BATCH_END) => Ok(&bytes[..offset]),
        _ => Err(Error::Malformed {
            reason: "batch does not end with a batch-end message",
        }),
    }
}

/// One netlink message inside a receive buffer.
struct NlMsg<'a> {
    /// The whole message, header included.
    bytes: &'a [u8],
    /// Where it starts in the buffer.
    offset: usize,
    ty: u16,
    flags: u16,
    seq: u32,
}

impl NlMsg<'_> {
    /// The `nfgenmsg` family byte of an nfnetlink message.
    fn family(&self) -> Option<u8> {
        self.bytes.get(NLMSG_HDRLEN).copied()
    }

    fn header(&self) -> *const libc::nlmsghdr {
        self.bytes.as_ptr().cast::<libc::nlmsghdr>()
    }

    fn table_name(&self) -> Result<String, Error> {
        let table = Owned::new(
            // SAFETY: plain allocation; checked for NULL by `Owned::new`.
            unsafe { sys::nftnl_table_alloc() },
            // SAFETY: frees the table allocated above, once.
            |t| unsafe { sys::nftnl_table_free(t) },
        );
        // SAFETY: the header points at a complete message inside a 4-byte-aligned buffer.
        if unsafe { sys::nftnl_table_nlmsg_parse(self.header(), table.ptr()) } < 0 {
            return Err(Error::Malformed {
                reason: "unparsable table message",
            });
        }
        // SAFETY: the getter returns a string owned by `table`, or NULL.
        Ok(cstr(unsafe {
            sys::nftnl_table_get_str(table.ptr(), attr(sys::NFTNL_TABLE_NAME))
        }))
    }
}

/// Splits a buffer into netlink messages, checking every length.
fn messages(buf: &[u8]) -> impl Iterator<Item = Result<NlMsg<'_>, Error>> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset + NLMSG_HDRLEN > buf.len() {
            return None;
        }
        let rest = &buf[offset..];
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            offset = buf.len();
            return Some(Err(Error::Malformed {
                reason: "netlink message length out of bounds",
            }));
        }
        let msg = NlMsg {
            bytes: &rest[..len],
            offset,
            ty: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes(rest[8..12].try_into().ok()?),
        };
        offset += len.next_multiple_of(4);
        Some(Ok(msg))
    })
}

/// Parses an `NLMSG_ERROR` message: errno (0 for a plain ack) and the extended-ack string.
fn parse_ack(msg: &NlMsg<'_>) -> Result<Ack, Error> {
    let b = msg.bytes;
    let malformed = || Error::Malformed {
        reason: "short error message",
    };
    let error = i32::from_ne_bytes(
        b.get(16..20)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?,
    );
    let mut detail = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // The echoed request follows the errno: just its header when capped, else all of it.
        let echoed = if msg.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            b.get(20..24)
                .and_then(|l| l.try_into().ok())
                .map_or(NLMSG_HDRLEN, |l| u32::from_ne_bytes(l) as usize)
        };
        let mut at = (20 + echoed).next_multiple_of(4);
        while at + 4 <= b.len() {
            let len = u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
            let ty = u16::from_ne_bytes([b[at + 2], b[at + 3]]);
            if len < 4 || at + len > b.len() {
                break;
            }
            if ty == NLMSGERR_ATTR_MSG {
                let text = &b[at + 4..at + len];
                let text = text.split(|&c| c == 0).next().unwrap_or_default();
                detail = Some(String::from_utf8_lossy(text).into_owned());
            }
            at += len.next_multiple_of(4);
        }
    }
    Ok(Ack {
        seq: msg.seq,
        errno: error.saturating_neg(),
        detail,
    })
}

/// A libnftnl object freed on drop.
struct Owned<T> {
    ptr: NonNull<T>,
    free: fn(*mut T),
}

impl<T> Owned<T> {
    fn new(ptr: *mut T, free: fn(*mut T)) -> Self {
        // Allocation failure is OOM; abort as nftnl does.
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::process::abort());
        Owned { ptr, free }
    }

    fn ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        (self.free)(self.ptr.as_ptr());
    }
}

fn cstr(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-NULL pointers from libnftnl getters are NUL-terminated strings that live as
    // long as the object they came from, which outlives this call.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// A chain as the kernel reports it.
#[derive(Debug)]
struct KernelChain {
    table: String,
    name: String,
    hook: Option<u32>,
    priority: i32,
    kind: Option<String>,
    policy: Option<u32>,
    device: Option<String>,
}

impl KernelChain {
    fn parse(msg: &NlMsg<'_>) -> Result<KernelChain, Error> {
        let c = Owned::new(
            // SAFETY: plain allocation; checked for NULL by `Owned::new`.
            unsafe { sys::nftnl_chain_alloc() },
            // SAFETY: frees the chain allocated above, once.
            |c| unsafe { sys::nftnl_chain_free(c) },
        );
        // SAFETY: the header points at a complete message inside a 4-byte-aligned buffer.
        if unsafe { sys::nftnl_chain_nlmsg_parse(msg.header(), c.ptr()) } < 0 {
            return Err(Error::Malformed {
                reason: "unparsable chain message",
            });
        }
        // All getters below act on `c`, a parsed chain: `is_set` guards each getter, and the
        // strings returned are owned by `c`, which outlives the copies made by `cstr`.
        let is_set = |id: u32| {
            // SAFETY: see above.
            unsafe { sys::nftnl_chain_is_set(c.ptr(), attr(id)) }
        };
        let get_u32 = |id: u32| {
            // SAFETY: see above.
            is_set(id).then(|| unsafe { sys::nftnl_chain_get_u32(c.ptr(), attr(id)) })
        };
        let get_str = |id: u32| {
            // SAFETY: see above.
            is_set(id).then(|| cstr(unsafe { sys::nftnl_chain_get_str(c.ptr(), attr(id)) }))
        };
        Ok(KernelChain {
            table: get_str(sys::NFTNL_CHAIN_TABLE).unwrap_or_default(),
            name: get_str(sys::NFTNL_CHAIN_NAME).unwrap_or_default(),
            hook: get_u32(sys::NFTNL_CHAIN_HOOKNUM),
            // SAFETY: see above.
            priority: unsafe { sys::nftnl_chain_get_s32(c.ptr(), attr(sys::NFTNL_CHAIN_PRIO)) },
            kind: get_str(sys::NFTNL_CHAIN_TYPE),
            policy: get_u32(sys::NFTNL_CHAIN_POLICY),
            device: get_str(sys::NFTNL_CHAIN_DEV),
        })
    }
}

/// A named set of our table as the kernel reports it: (name, key length). `None` for another
/// table's set and for anonymous sets (they go with their rules).
struct KernelSet;

impl KernelSet {
    fn parse(msg: &NlMsg<'_>) -> Result<Option<(String, u32)>, Error> {
        let set = Owned::new(
            // SAFETY: plain allocation; checked for NULL by `Owned::new`.
            unsafe { sys::nftnl_set_alloc() },
            // SAFETY: frees the set allocated above, once.
            |p| unsafe { sys::nftnl_set_free(p) },
        );
        // SAFETY: the header points at a complete message inside a 4-byte-aligned buffer.
        if unsafe { sys::nftnl_set_nlmsg_parse(msg.header(), set.ptr()) } < 0 {
            return Err(Error::Malformed {
                reason: "unparsable set message",
            });
        }
        // The getters act on `set`, parsed above; `is_set` guards each, and the strings are
        // owned by `set`, which outlives the copies `cstr` makes.
        let get_str = |id: u32| {
            // SAFETY: see above.
            unsafe { sys::nftnl_set_is_set(set.ptr(), attr(id)) }
                // SAFETY: see above.
                .then(|| cstr(unsafe { sys::nftnl_set_get_str(set.ptr(), attr(id)) }))
        };
        let get_u32 = |id: u32| {
            // SAFETY: see above.
            unsafe { sys::nftnl_set_is_set(set.ptr(), attr(id)) }
                // SAFETY: see above.
                .then(|| unsafe { sys::nftnl_set_get_u32(set.ptr(), attr(id)) })
        };
        let table = get_str(sys::NFTNL_SET_TABLE).unwrap_or_default();
        let name = get_str(sys::NFTNL_SET_NAME).unwrap_or_default();
        let flags = get_u32(sys::NFTNL_SET_FLAGS).unwrap_or(0);
        if table != TABLE_NAME || name.is_empty() || flags & c32(libc::NFT_SET_ANONYMOUS) != 0 {
            return Ok(None);
        }
        Ok(Some((name, get_u32(sys::NFTNL_SET_KEY_LEN).unwrap_or(0))))
    }
}

/// A rule as the kernel reports it (or as we sent it), rendered by libnftnl.
struct KernelRule {
    family: u32,
    table: String,
    chain: String,
    /// `nftnl_rule_snprintf` output without its first line (family, table, chain, handle),
    /// with counter values and anonymous set names masked.
    text: String,
    comment: Option<String>,
    /// Packets of the rule's first counter.
    packets: Option<u64>,
}

impl KernelRule {
    fn parse(msg: &NlMsg<'_>) -> Result<KernelRule, Error> {
        let r = Owned::new(
            // SAFETY: plain allocation; checked for NULL by `Owned::new`.
            unsafe { sys::nftnl_rule_alloc() },
            // SAFETY: frees the rule allocated above, once (it owns its expressions).
            |r| unsafe { sys::nftnl_rule_free(r) },
        );
        // SAFETY: the header points at a complete message inside a 4-byte-aligned buffer.
        if unsafe { sys::nftnl_rule_nlmsg_parse(msg.header(), r.ptr()) } < 0 {
            return Err(Error::Malformed {
                reason: "unparsable rule message",
            });
        }
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: libnftnl writes at most `buf.len()` bytes including the NUL.
        let n = unsafe {
            sys::nftnl_rule_snprintf(
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len(),
                r.ptr(),
                sys::NFTNL_OUTPUT_DEFAULT,
                0,
            )
        };
        if n < 0 || n.unsigned_abs() as usize >= buf.len() {
            return Err(Error::Malformed {
                reason: "rule rendering does not fit",
            });
        }
        buf.truncate(n.unsigned_abs() as usize);
        let text = normalize(&String::from_utf8_lossy(&buf));

        // SAFETY: getters on a parsed rule; strings are owned by `r` and copied by `cstr`.
        let (family, table, chain) = unsafe {
            (
                sys::nftnl_rule_get_u32(r.ptr(), attr(sys::NFTNL_RULE_FAMILY)),
                cstr(sys::nftnl_rule_get_str(
                    r.ptr(),
                    attr(sys::NFTNL_RULE_TABLE),
                )),
                cstr(sys::nftnl_rule_get_str(
                    r.ptr(),
                    attr(sys::NFTNL_RULE_CHAIN),
                )),
            )
        };
        Ok(KernelRule {
            family,
            table,
            chain,
            text,
            comment: rule_comment(&r),
            packets: first_counter(&r),
        })
    }
}

/// The comment in a rule's userdata: TLVs of (type u8, len u8, value), comment = type 0.
fn rule_comment(r: &Owned<sys::nftnl_rule>) -> Option<String> {
    let mut len = 0u32;
    // SAFETY: `r` is a parsed rule; the returned data is owned by it and `len` bytes long.
    let data =
        unsafe { sys::nftnl_rule_get_data(r.ptr(), attr(sys::NFTNL_RULE_USERDATA), &mut len) };
    if data.is_null() {
        return None;
    }
    // SAFETY: see above; `r` outlives this slice.
    let mut tlv = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len as usize) };
    while let [ty, l, rest @ ..] = tlv {
        let l = *l as usize;
        let value = rest.get(..l)?;
        if u32::from(*ty) == sys::NFTNL_UDATA_RULE_COMMENT {
            let text = value.split(|&c| c == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        tlv = &rest[l..];
    }
    None
}

fn first_counter(r: &Owned<sys::nftnl_rule>) -> Option<u64> {
    let iter = Owned::new(
        // SAFETY: `r` is a parsed rule; the iterator borrows it and is destroyed before it.
        unsafe { sys::nftnl_expr_iter_create(r.ptr()) },
        // SAFETY: destroys the iterator created above, once.
        |i| unsafe { sys::nftnl_expr_iter_destroy(i) },
    );
    loop {
        // SAFETY: a live iterator; returns NULL at the end.
        let expr = unsafe { sys::nftnl_expr_iter_next(iter.ptr()) };
        if expr.is_null() {
            return None;
        }
        // SAFETY: `expr` is owned by the rule; NFTNL_EXPR_NAME is always set.
        let name = cstr(unsafe { sys::nftnl_expr_get_str(expr, attr(sys::NFTNL_EXPR_NAME)) });
        if name == "counter" {
            // SAFETY: a counter expression's packet count.
            return Some(unsafe {
                sys::nftnl_expr_get_u64(expr, attr(sys::NFTNL_EXPR_CTR_PACKETS))
            });
        }
    }
}

/// Masks what legitimately differs between what we send and what the kernel reports: the
/// header line (handle), counter values, and the name the kernel gave an anonymous set.
fn normalize(rendering: &str) -> String {
    let mut out = String::new();
    for line in rendering.lines().skip(1) {
        let line = line.trim_end();
        if line.trim_start().starts_with("[ counter ") {
            out.push_str("  [ counter ]\n");
            continue;
        }
        out.push_str(&mask_set_name(line));
        out.push('\n');
    }
    out
}

fn mask_set_name(line: &str) -> String {
    let Some(at) = line.find("__set") else {
        return line.to_string();
    };
    let (head, tail) = line.split_at(at + "__set".len());
    let tail = tail
        .strip_prefix("%d")
        .unwrap_or_else(|| tail.trim_start_matches(|c: char| c.is_ascii_digit()));
    format!("{head}N{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ruleset, ClusterSpec, Role, StaticHash};
    use std::net::{IpAddr, Ipv4Addr};

    fn spec() -> ClusterSpec {
        ClusterSpec {
            vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            tcp_ports: vec![80, 443],
            client_interface: "eth0".into(),
            cluster_interface: "eth1".into(),
            members: vec![IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11))],
            queue_num: 3,
            control_port: 7400,
            former_members: vec![],
            egress_mac: Some([2, 0, 0, 0, 0, 1]),
            static_hash: StaticHash {
                index: 0,
                count: 2,
                seed: 0x2a,
            },
            syn_prefix_limit: None,
        }
    }

    fn master(queue: QueueBackend) -> Ruleset {
        ruleset(Role::Master, &spec(), &HostFacts { queue })
    }

    /// The expressions of rule 1 of `inet tdsc input`, parsed back out of the batch bytes.
    fn syn_rule(queue: QueueBackend) -> Vec<(String, Vec<u8>)> {
        let plan = lower::apply_plan(&master(queue), &lower::Present::default());
        let bytes = plan.bytes();
        let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `aligned` has room for `bytes`; no overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                aligned.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            )
        };
        // SAFETY: initialised just above.
        let view =
            unsafe { std::slice::from_raw_parts(aligned.as_ptr().cast::<u8>(), bytes.len()) };
        let newrule = c16((libc::NFNL_SUBSYS_NFTABLES << 8) | libc::NFT_MSG_NEWRULE);
        let msg = messages(view)
            .map(Result::unwrap)
            .filter(|m| m.ty == newrule)
            // The first rule clears the ownership mark; the second is the SYN rule.
            .nth(1)
            .expect("the SYN rule");
        let r = Owned::new(
            // SAFETY: plain allocation.
            unsafe { sys::nftnl_rule_alloc() },
            // SAFETY: frees it once.
            |r| unsafe { sys::nftnl_rule_free(r) },
        );
        // SAFETY: complete, aligned message.
        assert!(unsafe { sys::nftnl_rule_nlmsg_parse(msg.header(), r.ptr()) } >= 0);
        let iter = Owned::new(
            // SAFETY: iterator over a parsed rule, destroyed before it.
            unsafe { sys::nftnl_expr_iter_create(r.ptr()) },
            // SAFETY: destroys it once.
            |i| unsafe { sys::nftnl_expr_iter_destroy(i) },
        );
        let mut out = Vec::new();
        loop {
            // SAFETY: live iterator.
            let expr = unsafe { sys::nftnl_expr_iter_next(iter.ptr()) };
            if expr.is_null() {
                return out;
            }
            // SAFETY: the name is always set.
            let name = cstr(unsafe { sys::nftnl_expr_get_str(expr, attr(sys::NFTNL_EXPR_NAME)) });
            let info = if name == "target" {
                let mut len = 0u32;
                // SAFETY: the target's info, owned by the expression, `len` bytes long.
                let p =
                    unsafe { sys::nftnl_expr_get(expr, attr(sys::NFTNL_EXPR_TG_INFO), &mut len) };
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) }.to_vec()
            } else if name == "queue" {
                // SAFETY: getters of a queue expression.
                let (num, total, flags) = unsafe {
                    (
                        sys::nftnl_expr_get_u16(expr, attr(sys::NFTNL_EXPR_QUEUE_NUM)),
                        sys::nftnl_expr_get_u16(expr, attr(sys::NFTNL_EXPR_QUEUE_TOTAL)),
                        sys::nftnl_expr_get_u16(expr, attr(sys::NFTNL_EXPR_QUEUE_FLAGS)),
                    )
                };
                [num, total, flags]
                    .iter()
                    .flat_map(|v| v.to_ne_bytes())
                    .collect()
            } else {
                Vec::new()
            };
            out.push((name, info));
        }
    }

    #[test]
    fn compat_queue_is_nfqueue_v3_without_bypass() {
        let exprs = syn_rule(QueueBackend::Compat);
        let (name, info) = exprs.last().unwrap();
        assert_eq!(name, "target");
        // xt_NFQ_info_v3 { queuenum 3, queues_total 1, flags 0 }, host order, padded to 8.
        let mut want = Vec::new();
        for v in [3u16, 1, 0, 0] {
            want.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(info, &want);
        assert!(exprs.iter().any(|(n, _)| n == "counter"));
    }

    #[test]
    fn native_queue_has_no_flags() {
        let exprs = syn_rule(QueueBackend::Native);
        let (name, info) = exprs.last().unwrap();
        assert_eq!(name, "queue");
        let want: Vec<u8> = [3u16, 1, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        assert_eq!(info, &want);
    }

    /// The limit rule's expressions as libnftnl renders our batch, against what
    /// `nft --debug=netlink` 1.0.6 printed for the same text (prefix, port lookup and flags
    /// left out), plus the `timeout 0ms` we send and nft does not (see `expr::DynsetUpdate`).
    #[test]
    fn the_syn_limit_lowers_as_nft_emits_it() {
        let limit = crate::SynPrefixLimit {
            rate_per_second: 7,
            burst: 10,
            prefix_v4: 24,
            prefix_v6: 48,
        };
        for (vip, load, mask, set) in [
            (
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                "[ payload load 4b @ network header + 12 => reg 1 ]",
                "[ bitwise reg 1 = ( reg 1 & 0x00ffffff ) ^ 0x00000000 ]",
                "syn_prefix4",
            ),
            (
                "2001:db8::1".parse().unwrap(),
                "[ payload load 16b @ network header + 8 => reg 1 ]",
                "[ bitwise reg 1 = ( reg 1 & 0xffffffff 0x0000ffff 0x00000000 0x00000000 ) ^ \
                 0x00000000 0x00000000 0x00000000 0x00000000 ]",
                "syn_prefix6",
            ),
        ] {
            let spec = ClusterSpec {
                vip,
                syn_prefix_limit: Some(limit),
                ..spec()
            };
            let rs = ruleset(
                Role::Master,
                &spec,
                &HostFacts {
                    queue: QueueBackend::Compat,
                },
            );
            let rules =
                expected_rules(&lower::apply_plan(&rs, &lower::Present::default())).unwrap();
            let pre = &rules[&(Family::Inet, "prerouting".to_string())];
            assert_eq!(pre.len(), 3);
            let tail: Vec<&str> = pre[1]
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with('['))
                .rev()
                .take(5)
                .collect();
            assert_eq!(
                tail,
                [
                    "[ immediate reg 0 drop ]",
                    "[ counter ]",
                    &*format!(
                        "[ dynset update reg_key 1 set {set} timeout 0ms expr [ limit rate \
                         7/second burst 10 type packets flags 0x1 ] ]"
                    ),
                    mask,
                    load,
                ],
                "{}",
                pre[1]
            );
        }
    }

    #[test]
    fn apply_batch_replaces_both_tables_and_labels_every_message() {
        let plan = lower::apply_plan(&master(QueueBackend::Compat), &lower::Present::default());
        assert_eq!(
            &plan.labels[..6],
            &[
                "add table inet tdsc",
                "delete table inet tdsc",
                "add table inet tdsc",
                "set given",
                "add chain inet tdsc prerouting",
                "the port set of rule 1 of inet tdsc prerouting",
            ]
            .map(String::from)
        );
        assert!(plan.labels.iter().any(|l| l == "delete table netdev tdsc"));
        assert!(plan
            .labels
            .iter()
            .any(|l| l == "add chain netdev tdsc egress"));
        let seqs = plan.batch.sequence_numbers();
        assert!(seqs.len() == plan.labels.len() || seqs.len() == plan.labels.len() + 2);
    }

    #[test]
    fn remove_batch_only_touches_our_tables() {
        let plan = lower::remove_plan();
        assert_eq!(
            plan.labels,
            [
                "add table inet tdsc",
                "delete table inet tdsc",
                "add table netdev tdsc",
                "delete table netdev tdsc",
            ]
            .map(String::from)
        );
    }

    #[test]
    fn probe_batch_is_sent_without_its_end() {
        let plan = lower::probe_plan();
        let bytes = plan.bytes();
        let cut = strip_batch_end(&bytes).unwrap();
        assert!(cut.len() < bytes.len());
        let last = messages(cut).last().unwrap().unwrap();
        assert_eq!(
            last.ty,
            c16((libc::NFNL_SUBSYS_NFTABLES << 8) | libc::NFT_MSG_NEWRULE)
        );
    }

    #[test]
    fn set_names_are_masked_both_ways() {
        assert_eq!(
            mask_set_name("  [ lookup reg 1 set __set%d 0x1 ]"),
            "  [ lookup reg 1 set __setN 0x1 ]"
        );
        assert_eq!(
            mask_set_name("  [ lookup reg 1 set __set12 0x1 ]"),
            "  [ lookup reg 1 set __setN 0x1 ]"
        );
    }

    #[test]
    fn messages_reject_bad_lengths() {
        let mut buf = [0u8; 20];
        buf[0] = 200;
        assert!(matches!(
            messages(&buf).next(),
            Some(Err(Error::Malformed { .. }))
        ));
    }
}
