//! The Raft election as a sans-IO state machine.
//!
//! [`RaftCore`] owns the tikv `RawNode` and never touches a socket, a file or a clock: the
//! daemon's shell feeds it time ([`RaftCore::tick`]) and received bytes ([`RaftCore::step`]),
//! then calls [`RaftCore::ready`] and carries out the returned [`Output`] **in field order**:
//!
//! 1. store [`Output::lease_until_ms`] where the dispatcher reads it (a lapsed or revoked lease
//!    must be visible before anything this node says can help elect another master),
//! 2. publish [`Output::leadership`],
//! 3. write [`Output::persist`] to stable storage (hard state and log; fsync),
//! 4. send [`Output::messages`].
//!
//! Inside `ready` the Ready loop runs in the order raft-rs documents (`examples/five_mem_node`):
//! messages, snapshot, committed entries, entries, hard state, persisted messages, `advance`,
//! commit index, light-ready messages and committed entries, `advance_apply`. Messages a leader
//! may send before persisting and those that must wait are all returned after the one persist
//! blob, which the shell writes before sending anything: simpler and never less safe.
//!
//! ## Membership
//!
//! [`RaftCore::propose_membership`] proposes one raft-rs `ConfChange` (AddNode with an opaque
//! context, or RemoveNode) on the leader, one at a time. Committed conf changes are applied in
//! `ready` (by `RaftCore::apply_conf_entries`, kept apart from normal entries): to raft-rs, to the
//! stored conf state and to the member contexts, all part of [`Output::persist`]; the result is
//! [`Output::membership`]. A removed node is no longer promotable, so it never campaigns; the
//! leader refuses to remove itself and transfers leadership instead.
//!
//! ## The lease
//!
//! See the crate docs for the argument; the mechanism is raft-rs's safe read-index. On every
//! tick the leader calls `read_index` with the current time `s` as context, which broadcasts a
//! heartbeat carrying `s`. When a quorum has answered that heartbeat raft-rs yields a
//! `ReadState` with context `s`, and the lease runs to `s + lease_ms`. A node that stops being
//! leader has its lease revoked (0) in the same `ready`.

use std::collections::BTreeMap;

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MessageType,
};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole};

use crate::{Leadership, Role};

/// Timing of the Raft group. One tick is `tick_ms` of the shell's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftSettings {
    pub tick_ms: u64,
    /// A follower that heard nothing from a leader for a random `[election_tick,
    /// 2 * election_tick)` ticks campaigns; one that heard from a leader less than
    /// `election_tick` ticks ago refuses (pre-)votes.
    pub election_tick: usize,
    pub heartbeat_tick: usize,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            tick_ms: 10,
            election_tick: 10,
            heartbeat_tick: 3,
        }
    }
}

impl RaftSettings {
    /// How long a quorum's acknowledgement of a heartbeat sent at `s` lets the leader
    /// dispatch: `(election_tick - 2) * tick_ms`.
    ///
    /// A follower that received that heartbeat at `r >= s` refuses votes until it has counted
    /// `election_tick` ticks, which takes at least `(election_tick - 1) * tick_ms` of its own
    /// clock (the first tick may fall just after `r`). The one remaining tick is the margin
    /// for clock-rate differences between nodes and for the time between the dispatcher's
    /// lease check and its verdict.
    pub fn lease_ms(&self) -> u64 {
        u64::try_from(self.election_tick.saturating_sub(2))
            .unwrap_or(0)
            .saturating_mul(self.tick_ms)
    }

    pub fn validate(&self) -> Result<(), RaftError> {
        if self.tick_ms == 0 {
            return Err(RaftError::Settings("tick_ms must be at least 1"));
        }
        if self.heartbeat_tick == 0 || self.election_tick <= self.heartbeat_tick {
            return Err(RaftError::Settings(
                "election_tick must be greater than heartbeat_tick, and heartbeat_tick at least 1",
            ));
        }
        if self.election_tick < 3 {
            return Err(RaftError::Settings(
                "election_tick must be at least 3 (the lease is election_tick - 2 ticks)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("raft")]
    Raft(#[from] raft::Error),
    #[error("invalid raft settings: {0}")]
    Settings(&'static str),
    #[error("persisted raft state is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("persisted raft state cannot be decoded")]
    Decode(#[from] protobuf::ProtobufError),
}

/// Why a received message was not stepped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    #[error("not a raft message")]
    Malformed,
    #[error("message claims to be from {claimed}, envelope says {from}")]
    WrongSender { from: u64, claimed: u64 },
    #[error("message for node {to}")]
    NotForUs { to: u64 },
    #[error("vote request ignored while this node may still honour a lease it acknowledged before it restarted")]
    StartupGuard,
    #[error("raft refused the message")]
    Refused,
}

/// What survives a restart: hard state (term, vote, commit), voters, member contexts and the
/// log.
///
/// Encoded as `"TDSCRAFT2"`, then length-prefixed (u32 BE) records: hard state, conf state
/// (protobuf), the member contexts (one record: `u32 count`, then per member `u64 id` and a
/// length-prefixed context), then each entry. `"TDSCRAFT1"` (no member record) is still read:
/// it is what nodes wrote before membership changes existed. The log is small, so the whole
/// state is rewritten on every change; the shell writes it with an atomic rename.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persisted {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub entries: Vec<Entry>,
    /// Context of every node added by a committed conf change (see [`Membership::members`]).
    pub members: BTreeMap<u64, Vec<u8>>,
}

const MAGIC_V1: &[u8] = b"TDSCRAFT1";
const MAGIC: &[u8] = b"TDSCRAFT2";

impl Persisted {
    pub fn encode(&self) -> Result<Vec<u8>, RaftError> {
        let mut out = MAGIC.to_vec();
        let mut put = |b: Vec<u8>| {
            let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&b);
        };
        put(self.hard_state.write_to_bytes()?);
        put(self.conf_state.write_to_bytes()?);
        put(encode_members(&self.members));
        for e in &self.entries {
            put(e.write_to_bytes()?);
        }
        Ok(out)
    }

    pub fn decode(buf: &[u8]) -> Result<Self, RaftError> {
        let (mut rest, with_members) = match (buf.strip_prefix(MAGIC), buf.strip_prefix(MAGIC_V1)) {
            (Some(rest), _) => (rest, true),
            (None, Some(rest)) => (rest, false),
            (None, None) => return Err(RaftError::Corrupt("bad magic")),
        };
        let mut parts = Vec::new();
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or(RaftError::Corrupt("truncated length"))?;
            let len = usize::try_from(u32::from_be_bytes(*len)).unwrap_or(usize::MAX);
            if tail.len() < len {
                return Err(RaftError::Corrupt("truncated record"));
            }
            parts.push(&tail[..len]);
            rest = &tail[len..];
        }
        if parts.len() < 2 {
            return Err(RaftError::Corrupt("missing hard state or conf state"));
        }
        let mut p = Persisted {
            hard_state: HardState::parse_from_bytes(parts[0])?,
            conf_state: ConfState::parse_from_bytes(parts[1])?,
            entries: Vec::new(),
            members: BTreeMap::new(),
        };
        let mut first_entry = 2;
        if with_members {
            let m = parts
                .get(2)
                .ok_or(RaftError::Corrupt("missing member record"))?;
            p.members = decode_members(m)?;
            first_entry = 3;
        }
        for e in &parts[first_entry..] {
            p.entries.push(Entry::parse_from_bytes(e)?);
        }
        Ok(p)
    }

    /// Appends entries as Raft's log does: a new entry at index i replaces i and all after it.
    fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        self.entries.retain(|e| e.index < first.index);
        self.entries.extend_from_slice(ents);
    }
}

fn encode_members(members: &BTreeMap<u64, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let n = u32::try_from(members.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for (id, ctx) in members {
        out.extend_from_slice(&id.to_be_bytes());
        let len = u32::try_from(ctx.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(ctx);
    }
    out
}

fn decode_members(mut buf: &[u8]) -> Result<BTreeMap<u64, Vec<u8>>, RaftError> {
    let truncated = RaftError::Corrupt("truncated member record");
    let (n, rest) = buf.split_first_chunk::<4>().ok_or(truncated)?;
    let n = u32::from_be_bytes(*n);
    buf = rest;
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (id, rest) = buf
            .split_first_chunk::<8>()
            .ok_or(RaftError::Corrupt("truncated member id"))?;
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(RaftError::Corrupt("truncated member length"))?;
        let len = usize::try_from(u32::from_be_bytes(*len)).unwrap_or(usize::MAX);
        if rest.len() < len {
            return Err(RaftError::Corrupt("truncated member context"));
        }
        out.insert(u64::from_be_bytes(*id), rest[..len].to_vec());
        buf = &rest[len..];
    }
    Ok(out)
}

/// The group's membership as this node has applied it.
///
/// The core does not know what a node's address is: a context is opaque bytes that the shell
/// chose when it proposed the node's addition (the daemon puts a prost `MemberInfo` there)
/// and that every node receives back when the change commits. Nodes of the bootstrap set
/// (present from the start, never added by a conf change) have no context here; the shell
/// takes their details from its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Index of the last conf change applied (0: the bootstrap set).
    pub index: u64,
    /// Voting members, sorted.
    pub voters: Vec<u64>,
    /// Context of every current member added by a conf change.
    pub members: BTreeMap<u64, Vec<u8>>,
}

impl Membership {
    pub fn is_voter(&self, id: u64) -> bool {
        self.voters.binary_search(&id).is_ok()
    }
}

/// One membership change, as an operator asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// Make node `id` a voter; `context` comes back in [`Membership::members`].
    Add {
        id: u64,
        context: Vec<u8>,
    },
    Remove {
        id: u64,
    },
}

/// Why a membership change was not proposed. Nothing was changed in any of these cases.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("another membership change is still being committed; retry when it is done")]
    Pending,
    #[error("node {id} is already a voter")]
    AlreadyVoter { id: u64 },
    #[error("node {id} is not a voter")]
    NotVoter { id: u64 },
    #[error("node {id} is the last voter; a group cannot remove its last member")]
    LastVoter { id: u64 },
    #[error("node {id} is the leader; leadership is being transferred to node {to}, send the request there")]
    RemovingLeader { id: u64, to: u64 },
    #[error("node id 0 is not a node id")]
    ZeroId,
    #[error("raft refused the proposal")]
    Refused,
}

/// What the shell must do after a `step` or `tick`, in field order (see the module docs).
#[derive(Debug, Default)]
pub struct Output {
    /// Dispatch is allowed while the shell's clock reads less than this (ms). 0: never.
    pub lease_until_ms: u64,
    /// A new leadership value, when it changed.
    pub leadership: Option<Leadership>,
    /// The state to write before any message goes out, when it changed.
    pub persist: Option<Persisted>,
    /// (destination node id, encoded raft message).
    pub messages: Vec<(u64, Vec<u8>)>,
    /// The membership after the conf changes applied in this `ready`, when there were any.
    /// The shell updates its peer table, dispatch view and ruleset from it; it is also part of
    /// [`Output::persist`], which the shell writes before anything is sent.
    pub membership: Option<Membership>,
}

/// Bridges raft-rs's slog records into `tracing`.
#[derive(Debug)]
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, r: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match r.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}", r.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", r.msg()),
            slog::Level::Info => tracing::info!(target: "raft", "{}", r.msg()),
            _ => tracing::trace!(target: "raft", "{}", r.msg()),
        }
        Ok(())
    }
}

pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

/// One node of the Raft group, without I/O.
pub struct RaftCore {
    raw: RawNode<MemStorage>,
    settings: RaftSettings,
    /// Ticks since this core was created; vote requests are ignored for the first
    /// `election_tick` of them (see [`StepError::StartupGuard`]).
    ticks: u64,
    now_ms: u64,
    lease_until_ms: u64,
    published: Option<Leadership>,
    persisted: Persisted,
    /// Log index of the last conf change applied (0 until one is).
    membership_index: u64,
}

impl std::fmt::Debug for RaftCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftCore")
            .field("id", &self.raw.raft.id)
            .field("term", &self.raw.raft.term)
            .field("state", &self.raw.raft.state)
            .field("lease_until_ms", &self.lease_until_ms)
            .finish_non_exhaustive()
    }
}

impl RaftCore {
    /// A node with id `id`. With no persisted state the group's voters are `voters` (the same
    /// list on every node); with persisted state the node resumes its term, vote and log.
    pub fn new(
        id: u64,
        voters: &[u64],
        settings: RaftSettings,
        persisted: Option<Persisted>,
        now_ms: u64,
        logger: &slog::Logger,
    ) -> Result<Self, RaftError> {
        settings.validate()?;
        let persisted = persisted.unwrap_or_else(|| Persisted {
            conf_state: ConfState::from((voters.iter().copied(), std::iter::empty())),
            ..Persisted::default()
        });
        let storage = MemStorage::new();
        {
            let mut w = storage.wl();
            w.set_conf_state(persisted.conf_state.clone());
            w.append(&persisted.entries)?;
            w.set_hardstate(persisted.hard_state.clone());
        }
        let cfg = Config {
            id,
            election_tick: settings.election_tick,
            heartbeat_tick: settings.heartbeat_tick,
            check_quorum: true,
            pre_vote: true,
            ..Config::default()
        };
        let raw = RawNode::new(&cfg, storage, logger)?;
        Ok(RaftCore {
            raw,
            settings,
            ticks: 0,
            now_ms,
            lease_until_ms: 0,
            published: None,
            persisted,
            membership_index: 0,
        })
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn lease_until_ms(&self) -> u64 {
        self.lease_until_ms
    }

    /// Advances time to `now_ms` (monotonic, ms) by one tick. The shell calls it every
    /// `tick_ms`, never in a burst to catch up: a follower's refusal to vote is counted in
    /// ticks, and a burst would shorten it below what the leader's lease assumes.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.ticks += 1;
        self.raw.tick();
        if self.is_leader() {
            // Renews the lease: a heartbeat carrying the send time. Dropped silently by raft-rs
            // until the leader has committed an entry of its own term.
            self.raw.read_index(self.now_ms.to_be_bytes().to_vec());
        }
    }

    /// Steps one message received from node `from` (already authenticated by address).
    pub fn step(&mut self, from: u64, bytes: &[u8], now_ms: u64) -> Result<(), StepError> {
        self.now_ms = self.now_ms.max(now_ms);
        let m = Message::parse_from_bytes(bytes).map_err(|_| StepError::Malformed)?;
        if m.from != from {
            return Err(StepError::WrongSender {
                from,
                claimed: m.from,
            });
        }
        if m.to != self.id() {
            return Err(StepError::NotForUs { to: m.to });
        }
        let is_vote = matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        );
        // A node that acknowledged a leader's heartbeat and then restarted has forgotten that
        // leader, so raft-rs would grant a vote at once and the old leader's lease would no
        // longer be backed by a quorum. Waiting out one election timeout after start restores
        // the promise the acknowledgement made.
        if is_vote && self.ticks < u64::try_from(self.settings.election_tick).unwrap_or(u64::MAX) {
            return Err(StepError::StartupGuard);
        }
        self.raw.step(m).map_err(|_| StepError::Refused)
    }

    /// Asks raft-rs to hand leadership to one of `candidates` (node ids; others and this
    /// node are ignored) and returns the one chosen, or `None` when this node is not leader or
    /// no candidate is known. While a transfer is in flight it returns its target and starts
    /// nothing new; raft-rs aborts a transfer that has not finished within an election
    /// timeout, and the shell may then call again.
    ///
    /// Preference: a peer that answered within the last election timeout (`recent_active`),
    /// then one whose log is already complete (raft-rs sends it `MsgTimeoutNow` at once;
    /// otherwise it first brings the log up to date), then the most complete log, then the
    /// lowest id.
    ///
    /// **Stop dispatching before calling this.** `MsgTimeoutNow` makes the target campaign
    /// at once with a *forced* vote request, which followers grant even while they still
    /// honour this leader's lease (the crate docs, *Leadership transfer*). The shell must
    /// therefore have stored a revoked lease, and must keep it revoked, before the message
    /// that this call queues leaves in the next [`RaftCore::ready`].
    pub fn transfer_leadership(&mut self, candidates: &[u64]) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        if let Some(t) = self.raw.raft.lead_transferee {
            return Some(t);
        }
        let me = self.id();
        let last = self.raw.raft.raft_log.last_index();
        let prs = self.raw.raft.prs();
        let (to, ..) = candidates
            .iter()
            .copied()
            .filter(|id| *id != me)
            .filter_map(|id| prs.get(id).map(|p| (id, p.recent_active, p.matched)))
            .max_by_key(|(id, active, matched)| {
                (*active, *matched >= last, *matched, std::cmp::Reverse(*id))
            })?;
        self.raw.transfer_leader(to);
        Some(to)
    }

    /// The current decision as the data plane sees it: master only while leader *and*
    /// holding a lease (the first lease comes one heartbeat round after winning).
    pub fn leadership(&self) -> Leadership {
        let r = &self.raw.raft;
        let leader = r.state == StateRole::Leader && self.lease_until_ms > self.now_ms;
        Leadership {
            role: if leader { Role::Master } else { Role::Member },
            master_id: u32::try_from(r.leader_id).ok().filter(|id| *id != 0),
            term: r.term,
        }
    }

    /// Runs the Ready loop once and returns what the shell must do.
    pub fn ready(&mut self) -> Output {
        let mut out = Output::default();
        let mut dirty = false;
        if self.raw.has_ready() {
            let mut rd = self.raw.ready();
            self.collect(rd.take_messages(), &mut out);
            // No snapshots are ever produced (no compaction yet), so none can arrive.
            for rs in rd.take_read_states() {
                if let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) {
                    let sent = u64::from_be_bytes(ctx);
                    let until = sent.saturating_add(self.settings.lease_ms());
                    self.lease_until_ms = self.lease_until_ms.max(until);
                }
            }
            // Committed entries carry nothing yet besides the leader's empty entry and
            // membership changes.
            dirty |= self.apply_conf_entries(&rd.take_committed_entries(), &mut out);
            if !rd.entries().is_empty() {
                if let Err(e) = self.raw.store().wl().append(rd.entries()) {
                    tracing::error!(error = %e, "raft log append failed");
                }
                self.persisted.append(rd.entries());
                dirty = true;
            }
            if let Some(hs) = rd.hs() {
                self.raw.store().wl().set_hardstate(hs.clone());
                self.persisted.hard_state = hs.clone();
                dirty = true;
            }
            self.collect(rd.take_persisted_messages(), &mut out);
            let mut light = self.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                self.raw.store().wl().mut_hard_state().commit = commit;
                self.persisted.hard_state.commit = commit;
                dirty = true;
            }
            self.collect(light.take_messages(), &mut out);
            dirty |= self.apply_conf_entries(&light.take_committed_entries(), &mut out);
            self.raw.advance_apply();
        }
        if !self.is_leader() {
            self.lease_until_ms = 0;
        }
        out.lease_until_ms = self.lease_until_ms;
        let l = self.leadership();
        if self.published != Some(l) {
            self.published = Some(l);
            out.leadership = Some(l);
        }
        if dirty {
            out.persist = Some(self.persisted.clone());
        }
        out
    }

    /// The leader this node knows of, if any (whether or not it holds a lease).
    pub fn leader_id(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|id| *id != 0)
    }

    /// The membership as applied so far.
    pub fn membership(&self) -> Membership {
        let mut voters: Vec<u64> = self.persisted.conf_state.voters.clone();
        voters.sort_unstable();
        Membership {
            index: self.membership_index,
            voters,
            members: self.persisted.members.clone(),
        }
    }

    /// Proposes one membership change (a raft-rs `ConfChange`). Only the leader proposes, one
    /// change at a time; the change takes effect on each node when it commits (see
    /// [`Output::membership`]). Returns the log index of the proposal.
    ///
    /// Removing the leader itself is refused: the leader starts a leadership transfer to the
    /// most up-to-date other voter instead, and the caller retries there. A leader that removed
    /// itself would keep dispatching until the change committed and then leave the group
    /// leaderless for an election timeout.
    pub fn propose_membership(&mut self, change: MemberChange) -> Result<u64, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader: self.leader_id(),
            });
        }
        if self.raw.raft.has_pending_conf() {
            return Err(ProposeError::Pending);
        }
        let voters = self.membership().voters;
        let mut cc = ConfChange::default();
        match change {
            MemberChange::Add { id, context } => {
                if id == 0 {
                    return Err(ProposeError::ZeroId);
                }
                if voters.contains(&id) {
                    return Err(ProposeError::AlreadyVoter { id });
                }
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = id;
                cc.context = context.into();
            }
            MemberChange::Remove { id } => {
                if !voters.contains(&id) {
                    return Err(ProposeError::NotVoter { id });
                }
                if voters.len() == 1 {
                    return Err(ProposeError::LastVoter { id });
                }
                if id == self.id() {
                    let to = self
                        .transfer_target()
                        .ok_or(ProposeError::LastVoter { id })?;
                    self.raw.transfer_leader(to);
                    return Err(ProposeError::RemovingLeader { id, to });
                }
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = id;
            }
        }
        self.raw
            .propose_conf_change(Vec::new(), cc)
            .map_err(|_| ProposeError::Refused)?;
        Ok(self.raw.raft.raft_log.last_index())
    }

    /// The other voter whose log matches the leader's furthest.
    fn transfer_target(&self) -> Option<u64> {
        let me = self.id();
        self.persisted
            .conf_state
            .voters
            .iter()
            .copied()
            .filter(|id| *id != me)
            .max_by_key(|id| self.raw.raft.prs().get(*id).map_or(0, |p| p.matched))
    }

    /// Applies the committed conf changes among `entries`, in log order, to raft-rs, the
    /// stored conf state and the member contexts. Returns whether anything changed.
    ///
    /// After a restart raft-rs hands back every committed entry from the start of the log, so
    /// changes already reflected in the persisted conf state are applied again; each change
    /// names one node and is idempotent, so replaying them in order ends in the same state.
    fn apply_conf_entries(&mut self, entries: &[Entry], out: &mut Output) -> bool {
        let mut changed = false;
        for e in entries {
            if e.get_entry_type() != EntryType::EntryConfChange {
                continue;
            }
            let cc = match ConfChange::parse_from_bytes(&e.data) {
                Ok(cc) => cc,
                Err(err) => {
                    tracing::error!(index = e.index, error = %err, "undecodable conf change skipped");
                    continue;
                }
            };
            let cs = match self.raw.apply_conf_change(&cc) {
                Ok(cs) => cs,
                Err(err) => {
                    tracing::error!(index = e.index, error = %err, "conf change not applied");
                    continue;
                }
            };
            match cc.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    self.persisted
                        .members
                        .insert(cc.node_id, cc.context.to_vec());
                }
                ConfChangeType::RemoveNode => {
                    self.persisted.members.remove(&cc.node_id);
                }
            }
            self.raw.store().wl().set_conf_state(cs.clone());
            self.persisted.conf_state = cs;
            self.membership_index = e.index;
            changed = true;
        }
        if changed {
            out.membership = Some(self.membership());
        }
        changed
    }

    fn collect(&self, msgs: Vec<Message>, out: &mut Output) {
        for m in msgs {
            match m.write_to_bytes() {
                Ok(b) => out.messages.push((m.to, b)),
                Err(e) => tracing::error!(error = %e, "cannot encode raft message"),
            }
        }
    }
}
