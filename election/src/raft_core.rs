//! The Raft election as a sans-IO state machine.
//!
//! [`RaftCore`] owns the tikv `RawNode` and never touches a socket, a file or a clock: the
//! daemon's shell feeds it time ([`RaftCore::tick`]) and received bytes ([`RaftCore::step`]),
//! then calls [`RaftCore::ready`] and carries out the returned [`Output`] **in field order**:
//!
//! 1. store [`Output::lease_until_ms`] where the dispatcher reads it (a lapsed or revoked lease
//!    must be visible before anything this node says can help elect another master),
//! 2. publish [`Output::leadership`],
//! 3. send [`Output::messages`] at once: they never depend on state this node has not yet
//!    written (a leader's appends and heartbeats),
//! 4. queue [`Output::persist`], a [`PersistJob`], for the disk: write its state to stable
//!    storage (hard state and log; fsync), then send its messages (votes, acknowledgements),
//!    then tell the core with [`RaftCore::persisted`]. Jobs are carried out in order; the
//!    shell may write only the newest state of several queued jobs, and report the newest
//!    number.
//!
//! Persistence is asynchronous (raft-rs's `advance_append_async`/`on_persist_ready`) so that a
//! slow disk never holds back the leader's heartbeats: a leader whose fsync took longer than
//! an election timeout used to go silent for that long, and its followers elected another
//! (`docs/known-issues.md` had it as "spontaneous elections"). Safety does not change: the
//! leader counts its own copy of an entry towards the commit quorum only once it is written
//! (raft-rs tracks that), a follower acknowledges an entry or grants a vote only in a job's
//! messages, after the write, and committed entries handed to the shell are never ahead of
//! this node's written log (raft-rs hands out committed entries up to the persisted index).
//!
//! Inside `ready` the Ready loop runs in the order raft-rs documents (`examples/five_mem_node`,
//! async variant): messages, snapshot, committed entries, entries, hard state, persisted
//! messages (into the job), `advance_append_async`, `advance_apply`.
//!
//! ## Proposals, committed entries and compaction
//!
//! The leader's shell proposes opaque data ([`RaftCore::propose`]); every node's `ready`
//! returns the data of newly committed normal entries in [`Output::committed`], in log order,
//! for the shell to apply (the daemon uses this to replicate SYN-forward records, paper §3.5).
//! Empty entries (a new leader's first entry) are not returned. A restarted node resumes at
//! its persisted commit index and does not get entries committed before the restart again:
//! what the daemon applies is soft state that would be stale by then.
//!
//! Besides opaque data, the core keeps **settings** of its own ([`RaftCore::propose_setting`]):
//! normal entries whose context marks them, applied here as last-writer-wins key/value pairs,
//! persisted and returned in [`Output::settings`] (the daemon replicates its policy this way).
//!
//! The log is bounded: once more than `2 * LOG_KEEP_ENTRIES` applied entries are held, the
//! oldest are compacted into a snapshot that keeps the log position and the [`ConfState`] in
//! its metadata and the member contexts and settings in its data (no records: they are soft
//! state that expires within their window). The storage attaches that data to every snapshot
//! it hands a lagging follower, so the follower learns where added nodes are. A follower too far behind
//! receives that snapshot (`MsgSnapshot`) and applies it in `ready`. The snapshot metadata is
//! persisted with the hard state ([`Persisted`]).
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
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot, SnapshotMetadata,
};
use raft::storage::{MemStorage, MemStorageCore};
use raft::{Config, GetEntriesContext, RaftState, RawNode, StateRole, Storage};

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
    /// A shape no correct peer sends, refused before raft-rs sees it ([`crate::inbound`]).
    #[error("refused before stepping")]
    Invalid(#[from] crate::inbound::Invalid),
}

impl StepError {
    /// A stable name for counters.
    pub fn as_str(&self) -> &'static str {
        match self {
            StepError::Malformed => "malformed",
            StepError::WrongSender { .. } => "wrong_sender",
            StepError::NotForUs { .. } => "not_for_us",
            StepError::StartupGuard => "startup_guard",
            StepError::Refused => "refused",
            StepError::Invalid(i) => i.as_str(),
        }
    }
}

/// Applied entries kept in the log after a compaction; a compaction runs once twice as many
/// are held. A follower that lags by more needs a snapshot (which carries no records). The
/// leader proposes up to eight record batches a 10 ms tick under load (one while fewer than
/// a batch a tick arrive), so this is between 80 ms and 0.64 s of history; the persisted
/// state is at most `2 * LOG_KEEP_ENTRIES` entries (each at most one record batch, see
/// `tdsc_proto::control::MAX_RECORDS_PER_BATCH`).
pub const LOG_KEEP_ENTRIES: u64 = 64;

/// Largest Raft message payload of entries: one full record batch fits, two need two
/// messages. Keeps every Raft message inside one UDP datagram.
pub const MAX_SIZE_PER_MSG: u64 = 32 * 1024;

/// What survives a restart: hard state (term, vote, commit), voters, member contexts, the last
/// snapshot's position and the log after it.
///
/// Encoded as `"TDSCRAFT3"`, then length-prefixed (u32 BE) records: hard state, conf state,
/// snapshot metadata (protobuf), the member contexts (one record: `u32 count`, then per member
/// `u64 id` and a length-prefixed context), the settings (one record: `u32 count`, then per
/// setting a length-prefixed key and value), then each entry. The log is bounded by compaction
/// (see the module docs), so the whole state is rewritten on every change; the shell writes it
/// with an atomic rename. Files of the first format (`"TDSCRAFT1"`: no snapshot metadata, no
/// member or settings record) are read as a state that was never compacted, added no node and
/// set nothing. (`"TDSCRAFT2"` existed only between development branches and is refused.)
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persisted {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Index and term of the last compacted entry (0, 0: never compacted) and the voters at
    /// that point.
    pub snapshot: SnapshotMetadata,
    pub entries: Vec<Entry>,
    /// Context of every node added by a committed conf change (see [`Membership::members`]).
    pub members: BTreeMap<u64, Vec<u8>>,
    /// The latest committed value of every setting (see [`RaftCore::propose_setting`]).
    pub settings: BTreeMap<String, Vec<u8>>,
}

const MAGIC: &[u8] = b"TDSCRAFT3";
const MAGIC_V1: &[u8] = b"TDSCRAFT1";

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
        put(self.snapshot.write_to_bytes()?);
        put(encode_members(&self.members));
        put(encode_settings(&self.settings));
        for e in &self.entries {
            put(e.write_to_bytes()?);
        }
        Ok(out)
    }

    pub fn decode(buf: &[u8]) -> Result<Self, RaftError> {
        let (mut rest, v1) = match (buf.strip_prefix(MAGIC), buf.strip_prefix(MAGIC_V1)) {
            (Some(r), _) => (r, false),
            (None, Some(r)) => (r, true),
            (None, None) => {
                return Err(RaftError::Corrupt(
                    "bad magic (neither TDSCRAFT3 nor the older TDSCRAFT1)",
                ))
            }
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
        let head = if v1 { 2 } else { 3 };
        if parts.len() < head {
            return Err(RaftError::Corrupt(
                "missing hard state, conf state or snapshot metadata",
            ));
        }
        let mut p = Persisted {
            hard_state: HardState::parse_from_bytes(parts[0])?,
            conf_state: ConfState::parse_from_bytes(parts[1])?,
            snapshot: if v1 {
                SnapshotMetadata::default()
            } else {
                SnapshotMetadata::parse_from_bytes(parts[2])?
            },
            entries: Vec::new(),
            members: BTreeMap::new(),
            settings: BTreeMap::new(),
        };
        if !v1 {
            let m = parts
                .get(3)
                .ok_or(RaftError::Corrupt("missing member record"))?;
            p.members = decode_members(m)?;
            let s = parts
                .get(4)
                .ok_or(RaftError::Corrupt("missing settings record"))?;
            p.settings = decode_settings(s)?;
        }
        let first_entry = if v1 { 2 } else { 5 };
        for e in parts.iter().skip(first_entry) {
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

    /// Drops the entries a snapshot covers.
    fn compact(&mut self, meta: &SnapshotMetadata) {
        self.entries.retain(|e| e.index > meta.index);
        self.snapshot = meta.clone();
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

/// Appends `b` with a u32 BE length prefix.
fn put_prefixed(out: &mut Vec<u8>, b: &[u8]) {
    let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
}

/// Splits off one u32 BE length-prefixed field.
fn take_prefixed<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], RaftError> {
    let (len, rest) = buf
        .split_first_chunk::<4>()
        .ok_or(RaftError::Corrupt(what))?;
    let len = usize::try_from(u32::from_be_bytes(*len)).unwrap_or(usize::MAX);
    if rest.len() < len {
        return Err(RaftError::Corrupt(what));
    }
    let (field, rest) = rest.split_at(len);
    *buf = rest;
    Ok(field)
}

fn encode_settings(settings: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let n = u32::try_from(settings.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for (k, v) in settings {
        put_prefixed(&mut out, k.as_bytes());
        put_prefixed(&mut out, v);
    }
    out
}

fn decode_settings(mut buf: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, RaftError> {
    let (n, rest) = buf
        .split_first_chunk::<4>()
        .ok_or(RaftError::Corrupt("truncated settings record"))?;
    let n = u32::from_be_bytes(*n);
    buf = rest;
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (k, v) = decode_setting_pair(&mut buf)?;
        out.insert(k, v);
    }
    Ok(out)
}

fn decode_setting_pair(buf: &mut &[u8]) -> Result<(String, Vec<u8>), RaftError> {
    let k = take_prefixed(buf, "truncated setting key")?;
    let k = std::str::from_utf8(k).map_err(|_| RaftError::Corrupt("setting key is not UTF-8"))?;
    let v = take_prefixed(buf, "truncated setting value")?;
    Ok((k.to_owned(), v.to_vec()))
}

/// The data of a setting entry: length-prefixed key, then length-prefixed value.
fn encode_setting(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_prefixed(&mut out, key.as_bytes());
    put_prefixed(&mut out, value);
    out
}

/// The data of every snapshot this node hands out or installs: the member contexts and the
/// settings, each as a length-prefixed record.
fn encode_snapshot_data(
    members: &BTreeMap<u64, Vec<u8>>,
    settings: &BTreeMap<String, Vec<u8>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    put_prefixed(&mut out, &encode_members(members));
    put_prefixed(&mut out, &encode_settings(settings));
    out
}

type SnapshotState = (BTreeMap<u64, Vec<u8>>, BTreeMap<String, Vec<u8>>);

fn decode_snapshot_data(mut buf: &[u8]) -> Result<SnapshotState, RaftError> {
    let m = take_prefixed(&mut buf, "truncated snapshot member record")?;
    let s = take_prefixed(&mut buf, "truncated snapshot settings record")?;
    Ok((decode_members(m)?, decode_settings(s)?))
}

/// The context of a setting entry, which tells it apart from the shell's opaque proposals.
const SETTING_CONTEXT: &[u8] = b"tdsc-setting";

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
    /// What this `ready` leaves to the disk: carried out after every earlier job.
    pub persist: Option<PersistJob>,
    /// (destination node id, encoded raft message): to send now, before the job is written.
    pub messages: Vec<(u64, Vec<u8>)>,
    /// The membership after the conf changes applied in this `ready`, when there were any.
    /// The shell updates its peer table, dispatch view and ruleset from it. Conf changes apply
    /// only once committed and written here, so it is already on this node's disk.
    pub membership: Option<Membership>,
    /// Data of the normal entries committed since the last `ready`, in log order (see the
    /// module docs). The shell applies them before it publishes [`Output::leadership`], so
    /// a new master's replicated state is complete when it takes over.
    pub committed: Vec<Vec<u8>>,
    /// Every setting's latest value, when a committed setting entry (or an installed
    /// snapshot) changed them in this `ready`; also part of [`Output::persist`].
    pub settings: Option<BTreeMap<String, Vec<u8>>>,
}

/// A write the shell owes the core, and the messages that wait for it (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct PersistJob {
    /// raft-rs's number for the `Ready` this job came from: hand it back to
    /// [`RaftCore::persisted`] once the job is done (a number also covers every earlier job).
    pub number: u64,
    /// The whole state to write, when it changed; `None` when only the messages wait (they
    /// may still depend on an earlier job's state, so they go out after it).
    pub state: Option<Persisted>,
    /// (destination node id, encoded raft message): to send once `state` and every earlier
    /// job's state are on stable storage.
    pub messages: Vec<(u64, Vec<u8>)>,
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

/// raft-rs's `MemStorage`, except that every snapshot it hands out (to a follower too far
/// behind the compacted log) carries the member contexts as its data: that follower has missed
/// the conf changes that carried them, and the voters alone (in the metadata) do not say where
/// the nodes are.
#[derive(Clone, Default)]
struct CoreStorage {
    mem: MemStorage,
    /// The member contexts and settings as of the applied index ([`encode_snapshot_data`]).
    data: Arc<Mutex<Vec<u8>>>,
}

impl CoreStorage {
    fn wl(&self) -> std::sync::RwLockWriteGuard<'_, MemStorageCore> {
        self.mem.wl()
    }

    fn rl(&self) -> std::sync::RwLockReadGuard<'_, MemStorageCore> {
        self.mem.rl()
    }

    fn set_state(&self, p: &Persisted) {
        let encoded = encode_snapshot_data(&p.members, &p.settings);
        match self.data.lock() {
            Ok(mut g) => *g = encoded,
            Err(poisoned) => *poisoned.into_inner() = encoded,
        }
    }
}

impl Storage for CoreStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut snap = self.mem.snapshot(request_index, to)?;
        let data = match self.data.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        snap.data = data.into();
        Ok(snap)
    }
}

/// One node of the Raft group, without I/O.
pub struct RaftCore {
    raw: RawNode<CoreStorage>,
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
    /// An installed snapshot's index until it is written: raft-rs counts it as applied only
    /// then.
    snapshot_unwritten: Option<u64>,
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
        let storage = CoreStorage::default();
        storage.set_state(&persisted);
        {
            let mut w = storage.wl();
            if persisted.snapshot.index > 0 {
                let mut snap = Snapshot::default();
                snap.set_metadata(persisted.snapshot.clone());
                w.apply_snapshot(snap)?;
            }
            w.set_conf_state(persisted.conf_state.clone());
            w.append(&persisted.entries)?;
            w.set_hardstate(persisted.hard_state.clone());
        }
        // Resume at the commit index: entries committed before a restart are not applied
        // again (what normal entries carry is soft state, stale by now; what conf changes
        // did is in the persisted conf state and member contexts).
        let last = storage.last_index()?;
        let applied = persisted
            .hard_state
            .commit
            .min(last)
            .max(persisted.snapshot.index);
        // The last conf change applied, for status: the newest one in the log up to the
        // commit index, else the snapshot's position.
        let membership_index = persisted
            .entries
            .iter()
            .filter(|e| e.index <= applied && e.get_entry_type() != EntryType::EntryNormal)
            .map(|e| e.index)
            .max()
            .unwrap_or(persisted.snapshot.index);
        let cfg = Config {
            id,
            election_tick: settings.election_tick,
            heartbeat_tick: settings.heartbeat_tick,
            check_quorum: true,
            pre_vote: true,
            applied,
            max_size_per_msg: MAX_SIZE_PER_MSG,
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
            membership_index,
            snapshot_unwritten: None,
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

    /// First and last index held in the log (first > last: empty).
    pub fn log_bounds(&self) -> (u64, u64) {
        let s = self.raw.store();
        (s.first_index().unwrap_or(0), s.last_index().unwrap_or(0))
    }

    /// Index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.raw.raft.raft_log.applied
    }

    /// Proposes opaque data as a normal entry. Only a leader can; the data comes back in
    /// [`Output::committed`] on every node once committed.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), RaftError> {
        if !self.is_leader() {
            return Err(RaftError::Raft(raft::Error::ProposalDropped));
        }
        self.raw.propose(Vec::new(), data)?;
        Ok(())
    }

    /// Proposes a new value for a cluster-wide setting (last writer wins). Only the leader
    /// proposes; once committed every node keeps it, persisted and in every snapshot, and
    /// reports it in [`Output::settings`]. Returns the log index of the proposal.
    pub fn propose_setting(&mut self, key: &str, value: &[u8]) -> Result<u64, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader: self.leader_id(),
            });
        }
        self.raw
            .propose(SETTING_CONTEXT.to_vec(), encode_setting(key, value))
            .map_err(|_| ProposeError::Refused)?;
        Ok(self.raw.raft.raft_log.last_index())
    }

    /// Every setting's latest committed value, as applied here.
    pub fn settings(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.persisted.settings
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

    /// Steps one message received from node `from` (already authenticated by address). It
    /// must be a message a peer sends ([`crate::inbound::check`]); anything else is refused
    /// before raft-rs sees it.
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
        let raft = &self.raw.raft;
        crate::inbound::check(
            &m,
            &crate::inbound::Local {
                id: raft.id,
                term: raft.term,
                last_index: raft.raft_log.last_index(),
                leader: (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id),
            },
        )?;
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
        let mut job = None;
        if self.raw.has_ready() {
            let mut rd = self.raw.ready();
            out.messages = self.encode(rd.take_messages());
            if !rd.snapshot().is_empty() {
                self.apply_snapshot(rd.snapshot().clone(), &mut out);
                dirty = true;
            }
            for rs in rd.take_read_states() {
                if let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) {
                    let sent = u64::from_be_bytes(ctx);
                    let until = sent.saturating_add(self.settings.lease_ms());
                    self.lease_until_ms = self.lease_until_ms.max(until);
                }
            }
            let snapshot =
                Some(rd.snapshot().get_metadata().index).filter(|_| !rd.snapshot().is_empty());
            let committed = rd.take_committed_entries();
            // Applying moves the commit index the state file may record (below).
            dirty |= !committed.is_empty();
            dirty |= self.apply_conf_entries(&committed, &mut out);
            dirty |= self.apply_committed(committed, &mut out);
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
            let after = self.encode(rd.take_persisted_messages());
            let number = rd.number();
            // Entries and hard state are in the in-memory storage (raft-rs reads them from
            // there); raft-rs counts them as written only at `persisted`.
            self.raw.advance_append_async(rd);
            // Committed entries handed out are never ahead of the written log, but an
            // installed snapshot is until it is written: it counts as applied at `persisted`.
            if snapshot.is_some() {
                self.snapshot_unwritten = snapshot;
            }
            if self.snapshot_unwritten.is_none() {
                self.raw.advance_apply();
            }
            dirty |= self.maybe_compact();
            if dirty || !after.is_empty() {
                job = Some(PersistJob {
                    number,
                    state: None,
                    messages: after,
                });
            }
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
            // The commit index written is never ahead of what this node has applied: raft-rs
            // may know of commits beyond its written log (they are handed out only once
            // written), and a restart resumes at the written commit without replay, so a
            // higher one would skip conf changes and settings this state does not hold yet.
            // A lower commit index is always safe: it is volatile in Raft.
            let mut state = self.persisted.clone();
            state.hard_state.commit = state
                .hard_state
                .commit
                .min(self.raw.raft.raft_log.applied)
                .max(state.snapshot.index);
            job.get_or_insert_with(PersistJob::default).state = Some(state);
        }
        out.persist = job;
        out
    }

    /// The shell has carried out every [`PersistJob`] up to number `number`: its state is on
    /// stable storage and its messages were handed to the network. raft-rs may now count the
    /// written entries (a leader's own copy towards the commit quorum); call [`Self::ready`]
    /// again after this.
    pub fn persisted(&mut self, number: u64) {
        self.raw.on_persist_ready(number);
        if let Some(index) = self.snapshot_unwritten {
            if self.raw.raft.raft_log.persisted >= index {
                self.snapshot_unwritten = None;
                self.raw.advance_apply();
            }
        }
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
            self.raw.store().set_state(&self.persisted);
            out.membership = Some(self.membership());
        }
        changed
    }

    /// Hands the data of committed normal entries to the shell. Configuration changes
    /// (`EntryConfChange`, `EntryConfChangeV2`) are not handled here.
    ///
    /// Setting entries (context [`SETTING_CONTEXT`]) are kept here instead: the latest value
    /// of each key, persisted and part of every snapshot, and returned in [`Output::settings`].
    /// Returns whether a setting changed.
    fn apply_committed(&mut self, ents: Vec<Entry>, out: &mut Output) -> bool {
        let mut changed = false;
        for e in ents {
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue;
            }
            if e.context.as_ref() as &[u8] != SETTING_CONTEXT {
                out.committed.push(e.data.to_vec());
                continue;
            }
            let mut data: &[u8] = &e.data;
            match decode_setting_pair(&mut data) {
                Ok((k, v)) => {
                    self.persisted.settings.insert(k, v);
                    changed = true;
                }
                Err(err) => {
                    tracing::error!(index = e.index, error = %err, "undecodable setting skipped")
                }
            }
        }
        if changed {
            self.raw.store().set_state(&self.persisted);
            out.settings = Some(self.persisted.settings.clone());
        }
        changed
    }

    /// A follower too far behind got the leader's snapshot: the log restarts after it, and the
    /// membership (voters from the metadata, member contexts from the data) is the snapshot's.
    fn apply_snapshot(&mut self, snap: Snapshot, out: &mut Output) {
        let meta = snap.get_metadata().clone();
        // raft-rs has taken the snapshot already: the storage must follow whatever the data
        // holds. Undecodable member contexts (never written by this code) keep the old ones.
        let state = decode_snapshot_data(&snap.data);
        if let Err(e) = self.raw.store().wl().apply_snapshot(snap) {
            tracing::error!(error = %e, "cannot apply raft snapshot");
            return;
        }
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "raft snapshot applied"
        );
        self.persisted.entries.clear();
        self.persisted.conf_state = meta.get_conf_state().clone();
        self.persisted.hard_state = self.raw.store().rl().hard_state().clone();
        match state {
            Ok((members, settings)) => {
                self.persisted.members = members;
                self.persisted.settings = settings;
                self.raw.store().set_state(&self.persisted);
                out.settings = Some(self.persisted.settings.clone());
            }
            Err(e) => {
                tracing::error!(error = %e, "raft snapshot's member contexts and settings undecodable; kept the old ones")
            }
        }
        self.membership_index = meta.index;
        self.persisted.snapshot = meta;
        out.membership = Some(self.membership());
    }

    /// Compacts the log to the last [`LOG_KEEP_ENTRIES`] applied entries once it holds twice
    /// as many. Returns whether anything changed.
    ///
    /// The snapshot records the storage's current voters, which are those as of the applied
    /// index; so compaction waits while a configuration change sits between the snapshot
    /// index and the applied index (the snapshot would otherwise claim it too early).
    fn maybe_compact(&mut self) -> bool {
        let applied = self.applied_index();
        let store = self.raw.store().clone();
        let (Ok(first), Ok(last)) = (store.first_index(), store.last_index()) else {
            return false;
        };
        if applied < first || applied + 1 - first <= 2 * LOG_KEEP_ENTRIES {
            return false;
        }
        let upto = applied - LOG_KEEP_ENTRIES;
        let ctx = GetEntriesContext::empty(false);
        let Ok(tail) = store.entries(upto + 1, last + 1, None, ctx) else {
            return false;
        };
        let conf_change_pending = tail
            .iter()
            .any(|e| e.index <= applied && e.get_entry_type() != EntryType::EntryNormal);
        let Ok(term) = store.term(upto) else {
            return false;
        };
        if conf_change_pending {
            return false;
        }
        let Ok(state) = store.initial_state() else {
            return false;
        };
        let mut w = store.wl();
        let hs = w.hard_state().clone();
        let mut meta = SnapshotMetadata {
            index: upto,
            term,
            ..SnapshotMetadata::default()
        };
        meta.set_conf_state(state.conf_state);
        let mut snap = Snapshot::default();
        snap.set_metadata(meta.clone());
        // The member contexts travel in the data: a follower that gets this snapshot has
        // missed the conf changes that carried them.
        snap.data = encode_snapshot_data(&self.persisted.members, &self.persisted.settings).into();
        // MemStorage moves its snapshot position only through apply_snapshot, which also
        // drops the entries after it and lowers the commit index: put both back.
        let restored = w
            .apply_snapshot(snap)
            .and_then(|()| w.append(&tail))
            .map(|()| w.set_hardstate(hs));
        if let Err(e) = restored {
            tracing::error!(error = %e, "raft log compaction failed");
            return false;
        }
        self.persisted.compact(&meta);
        true
    }

    fn encode(&self, msgs: Vec<Message>) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            match m.write_to_bytes() {
                Ok(b) => out.push((m.to, b)),
                Err(e) => tracing::error!(error = %e, "cannot encode raft message"),
            }
        }
        out
    }
}
