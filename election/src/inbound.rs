//! What a Raft message from the network must look like before raft-rs sees it. Pure.
//!
//! raft-rs trusts every message it is stepped with. Some shapes that no correct peer sends
//! reach a `panic!` inside it (a heartbeat committing past this node's log, an empty
//! proposal, non-contiguous entries), and others make it do what only local code may ask
//! (a term-0 message is taken for a local one and skips every term check; `MsgHup`,
//! `MsgPropose` or `MsgTransferLeader` from outside would start elections, propose entries or
//! move leadership). Authentication keeps strangers out; this check keeps even an
//! authenticated but broken or compromised peer from crashing the Raft task or rewriting the
//! group by accident. [`check`] accepts exactly the message types a peer sends, with the
//! invariants raft-rs relies on.

use raft::eraftpb::{ConfState, Message, MessageType};

/// At most this many entries in one append; a correct leader sends far fewer (each message is
/// kept inside one UDP datagram).
pub const MAX_ENTRIES: usize = 1024;
/// At most this many bytes of entry data, context or snapshot data in one message (a UDP
/// datagram holds less).
pub const MAX_BYTES: usize = 64 * 1024;
/// At most this many voters in a snapshot's configuration (the daemon's view has as many slots).
pub const MAX_VOTERS: usize = 64;
/// No term or index above this is accepted. raft-rs adds 1 to terms and indexes unchecked (a
/// campaign's `term + 1`, a new leader's `last_index + 1`), so a peer's `u64::MAX` would
/// overflow: a panic with overflow checks, a wrap to term 0 without. No cluster gets near
/// 2^62: that is an election every microsecond for 146,000 years.
pub const MAX_TERM_OR_INDEX: u64 = 1 << 62;

/// What this node knows that the check needs, read from the core just before stepping.
#[derive(Debug, Clone, Copy)]
pub struct Local {
    /// This node's id.
    pub id: u64,
    /// Its current term.
    pub term: u64,
    /// The last index in its log.
    pub last_index: u64,
    /// The leader it follows, if any.
    pub leader: Option<u64>,
}

/// Why a message from the network was refused before stepping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A message type no peer sends over the network (local, or not used by tcp-dsc).
    #[error("message type {0:?} is not accepted from the network")]
    Type(MessageType),
    /// Term 0 marks a local message in raft-rs and skips its term checks.
    #[error("term 0")]
    TermZero,
    /// From node 0 (raft-rs's "no node"), or from this node itself.
    #[error("sender id {0} is not a peer")]
    Sender(u64),
    /// More entries, or more bytes, than a datagram of a correct peer carries.
    #[error("oversized: {what}")]
    TooLarge { what: &'static str },
    /// Entries that do not follow `index` one by one, or whose terms go down or exceed the
    /// message's term; or an append after a nonzero index whose log term is 0.
    #[error("entries are not contiguous after index {index}")]
    Entries { index: u64 },
    /// A commit index beyond this node's log (raft-rs panics on it).
    #[error("commit {commit} beyond the last index {last}")]
    CommitBeyondLog { commit: u64, last: u64 },
    /// A response naming an index beyond this node's log.
    #[error("response index {index} beyond the last index {last}")]
    IndexBeyondLog { index: u64, last: u64 },
    /// `MsgTimeoutNow` from a node that is not this node's leader in this term.
    #[error("MsgTimeoutNow from {from}, who does not lead this term")]
    TimeoutNow { from: u64 },
    /// A snapshot whose metadata no correct leader produces.
    #[error("snapshot: {what}")]
    Snapshot { what: &'static str },
}

impl Invalid {
    /// A stable name for counters.
    pub fn as_str(&self) -> &'static str {
        match self {
            Invalid::Type(_) => "type",
            Invalid::TermZero => "term_zero",
            Invalid::Sender(_) => "sender",
            Invalid::TooLarge { .. } => "too_large",
            Invalid::Entries { .. } => "entries",
            Invalid::CommitBeyondLog { .. } => "commit_beyond_log",
            Invalid::IndexBeyondLog { .. } => "index_beyond_log",
            Invalid::TimeoutNow { .. } => "timeout_now",
            Invalid::Snapshot { .. } => "snapshot",
        }
    }
}

/// Checks one decoded message from the network against what a correct peer sends.
pub fn check(m: &Message, local: &Local) -> Result<(), Invalid> {
    use MessageType::*;
    let t = m.get_msg_type();
    match t {
        MsgAppend
        | MsgAppendResponse
        | MsgRequestVote
        | MsgRequestVoteResponse
        | MsgRequestPreVote
        | MsgRequestPreVoteResponse
        | MsgHeartbeat
        | MsgHeartbeatResponse
        | MsgSnapshot
        | MsgTimeoutNow => {}
        // Local only (MsgHup, MsgBeat, MsgPropose, MsgCheckQuorum, MsgUnreachable,
        // MsgSnapStatus, MsgTransferLeader), or not used between tcp-dsc nodes (read-index
        // requests: only the leader asks, of itself).
        other => return Err(Invalid::Type(other)),
    }
    if m.term == 0 {
        return Err(Invalid::TermZero);
    }
    if m.from == raft::INVALID_ID || m.from == local.id {
        return Err(Invalid::Sender(m.from));
    }
    let snapshot = m.snapshot.as_ref().and_then(|s| s.metadata.as_ref());
    let snapshot = snapshot.map_or([0, 0], |meta| [meta.index, meta.term]);
    if [m.term, m.log_term, m.index, m.commit, m.reject_hint]
        .into_iter()
        .chain(snapshot)
        .any(|v| v > MAX_TERM_OR_INDEX)
    {
        return Err(Invalid::TooLarge {
            what: "term or index",
        });
    }
    if m.context.len() > MAX_BYTES {
        return Err(Invalid::TooLarge { what: "context" });
    }
    if m.entries.len() > MAX_ENTRIES {
        return Err(Invalid::TooLarge {
            what: "entry count",
        });
    }
    let entry_bytes: usize = m
        .entries
        .iter()
        .map(|e| e.data.len() + e.context.len())
        .sum();
    if entry_bytes > MAX_BYTES {
        return Err(Invalid::TooLarge { what: "entries" });
    }
    match t {
        MsgAppend => check_entries(m)?,
        // A leader's heartbeat commits at most what this follower has acknowledged; raft-rs
        // commits it without looking and panics past the last index.
        MsgHeartbeat if m.commit > local.last_index => {
            return Err(Invalid::CommitBeyondLog {
                commit: m.commit,
                last: local.last_index,
            })
        }
        // Responses name indexes of this leader's own log; larger ones would be taken as
        // progress that does not exist and end in an out-of-bounds slice.
        MsgAppendResponse => {
            for index in [m.index, m.reject_hint] {
                if index > local.last_index {
                    return Err(Invalid::IndexBeyondLog {
                        index,
                        last: local.last_index,
                    });
                }
            }
        }
        MsgTimeoutNow if local.leader != Some(m.from) || m.term != local.term => {
            return Err(Invalid::TimeoutNow { from: m.from })
        }
        MsgSnapshot => check_snapshot(m, local)?,
        _ => {}
    }
    if !m.entries.is_empty() && t != MsgAppend {
        return Err(Invalid::Entries { index: m.index });
    }
    Ok(())
}

fn check_entries(m: &Message) -> Result<(), Invalid> {
    let bad = Invalid::Entries { index: m.index };
    // Only index 0 (before the first entry) has term 0. raft-rs reads the term of an index
    // outside its log as 0, so (index beyond the log, log term 0) would "match", and the
    // commit that follows would panic past the last index.
    if m.index > 0 && m.log_term == 0 {
        return Err(bad);
    }
    let mut prev_term = m.log_term;
    for (i, e) in m.entries.iter().enumerate() {
        let want = u64::try_from(i)
            .ok()
            .and_then(|i| m.index.checked_add(i + 1))
            .ok_or(bad)?;
        if e.index != want || e.term < prev_term || e.term > m.term || e.term == 0 {
            return Err(bad);
        }
        prev_term = e.term;
    }
    Ok(())
}

fn check_snapshot(m: &Message, local: &Local) -> Result<(), Invalid> {
    let Some(snap) = m.snapshot.as_ref() else {
        return Err(Invalid::Snapshot { what: "missing" });
    };
    if snap.data.len() > MAX_BYTES {
        return Err(Invalid::TooLarge {
            what: "snapshot data",
        });
    }
    let Some(meta) = snap.metadata.as_ref() else {
        return Err(Invalid::Snapshot {
            what: "no metadata",
        });
    };
    if meta.index == 0 || meta.term == 0 || meta.term > m.term {
        return Err(Invalid::Snapshot {
            what: "index or term",
        });
    }
    let cs: &ConfState = meta.conf_state.as_ref().ok_or(Invalid::Snapshot {
        what: "no configuration",
    })?;
    // tcp-dsc changes membership one voter at a time (no joint consensus, no learners), and a
    // leader sends snapshots only to members.
    if !cs.learners.is_empty()
        || !cs.voters_outgoing.is_empty()
        || !cs.learners_next.is_empty()
        || cs.auto_leave
    {
        return Err(Invalid::Snapshot {
            what: "joint or learner configuration",
        });
    }
    if cs.voters.is_empty() || cs.voters.len() > MAX_VOTERS || !cs.voters.contains(&local.id) {
        return Err(Invalid::Snapshot { what: "voters" });
    }
    let mut voters = cs.voters.clone();
    voters.sort_unstable();
    voters.dedup();
    if voters.len() != cs.voters.len() || voters.contains(&raft::INVALID_ID) {
        return Err(Invalid::Snapshot { what: "voters" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, Snapshot, SnapshotMetadata};

    const LOCAL: Local = Local {
        id: 2,
        term: 5,
        last_index: 100,
        leader: Some(1),
    };

    fn msg(t: MessageType) -> Message {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.from = 1;
        m.to = 2;
        m.term = 5;
        m
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    fn snapshot(voters: Vec<u64>) -> Message {
        let mut m = msg(MessageType::MsgSnapshot);
        let mut meta = SnapshotMetadata {
            index: 200,
            term: 5,
            ..SnapshotMetadata::default()
        };
        meta.mut_conf_state().voters = voters;
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        m.set_snapshot(snap);
        m
    }

    #[test]
    fn what_peers_send_passes() {
        use MessageType::*;
        for t in [
            MsgAppendResponse,
            MsgRequestVote,
            MsgRequestVoteResponse,
            MsgRequestPreVote,
            MsgRequestPreVoteResponse,
            MsgHeartbeat,
            MsgHeartbeatResponse,
            MsgTimeoutNow,
        ] {
            assert_eq!(check(&msg(t), &LOCAL), Ok(()), "{t:?}");
        }
        let mut append = msg(MsgAppend);
        append.index = 100;
        append.log_term = 4;
        append.entries = vec![entry(101, 4), entry(102, 5)].into();
        append.commit = 102;
        assert_eq!(check(&append, &LOCAL), Ok(()));
        let mut hb = msg(MsgHeartbeat);
        hb.commit = 100;
        hb.context = 7u64.to_be_bytes().to_vec().into();
        assert_eq!(check(&hb, &LOCAL), Ok(()));
        assert_eq!(check(&snapshot(vec![1, 2, 3]), &LOCAL), Ok(()));
    }

    #[test]
    fn local_and_unused_types_are_refused() {
        use MessageType::*;
        for t in [
            MsgHup,
            MsgBeat,
            MsgPropose,
            MsgUnreachable,
            MsgSnapStatus,
            MsgCheckQuorum,
            MsgTransferLeader,
            MsgReadIndex,
            MsgReadIndexResp,
        ] {
            assert_eq!(check(&msg(t), &LOCAL), Err(Invalid::Type(t)));
        }
    }

    #[test]
    fn term_zero_and_bad_senders_are_refused() {
        let mut m = msg(MessageType::MsgHeartbeat);
        m.term = 0;
        assert_eq!(check(&m, &LOCAL), Err(Invalid::TermZero));
        for from in [0, 2] {
            let mut m = msg(MessageType::MsgRequestVote);
            m.from = from;
            assert_eq!(check(&m, &LOCAL), Err(Invalid::Sender(from)));
        }
    }

    #[test]
    fn impossible_commits_and_indexes_are_refused() {
        let mut hb = msg(MessageType::MsgHeartbeat);
        hb.commit = 101;
        assert_eq!(
            check(&hb, &LOCAL),
            Err(Invalid::CommitBeyondLog {
                commit: 101,
                last: 100
            })
        );
        let mut resp = msg(MessageType::MsgAppendResponse);
        resp.index = 1 << 40;
        assert!(matches!(
            check(&resp, &LOCAL),
            Err(Invalid::IndexBeyondLog { .. })
        ));
        let mut resp = msg(MessageType::MsgAppendResponse);
        resp.reject = true;
        resp.reject_hint = 101;
        assert!(matches!(
            check(&resp, &LOCAL),
            Err(Invalid::IndexBeyondLog { .. })
        ));
    }

    #[test]
    fn entries_must_follow_the_index_with_sane_terms() {
        let cases: [(&str, Vec<Entry>); 5] = [
            ("gap", vec![entry(101, 5), entry(103, 5)]),
            ("wrong start", vec![entry(100, 5)]),
            ("term goes down", vec![entry(101, 5), entry(102, 4)]),
            ("term beyond the message's", vec![entry(101, 6)]),
            ("term zero", vec![entry(101, 0)]),
        ];
        for (what, entries) in cases {
            let mut m = msg(MessageType::MsgAppend);
            m.index = 100;
            m.log_term = 4;
            m.entries = entries.into();
            assert_eq!(
                check(&m, &LOCAL),
                Err(Invalid::Entries { index: 100 }),
                "{what}"
            );
        }
        let mut m = msg(MessageType::MsgAppend);
        m.index = MAX_TERM_OR_INDEX;
        m.log_term = 4;
        m.entries = vec![entry(0, 5)].into();
        assert_eq!(
            check(&m, &LOCAL),
            Err(Invalid::Entries {
                index: MAX_TERM_OR_INDEX
            })
        );
        // Entries on anything but an append.
        let mut m = msg(MessageType::MsgHeartbeat);
        m.entries = vec![entry(101, 5)].into();
        assert!(matches!(check(&m, &LOCAL), Err(Invalid::Entries { .. })));
    }

    /// Found by the `raft_step` fuzz target: an append after index 1 with log term 0 and
    /// commit 1, to a node with an empty log, reached a panic in raft-rs (`to_commit 1 is out
    /// of range [last_index 0]`; `RaftCore` level: `tests/sim.rs`).
    #[test]
    fn an_append_after_a_nonzero_index_with_log_term_zero_is_refused() {
        let mut m = msg(MessageType::MsgAppend);
        m.index = 1;
        m.log_term = 0;
        m.commit = 1;
        assert_eq!(check(&m, &LOCAL), Err(Invalid::Entries { index: 1 }));
        // Index 0 has term 0: the first append to an empty log.
        let mut m = msg(MessageType::MsgAppend);
        m.entries = vec![entry(1, 5)].into();
        m.commit = 1;
        assert_eq!(check(&m, &LOCAL), Ok(()));
    }

    /// Found while triaging the `raft_step` findings (raft-rs's `term + 1` in a campaign): a
    /// peer's term or index near `u64::MAX` would overflow inside raft-rs.
    #[test]
    fn terms_and_indexes_beyond_2_62_are_refused() {
        let huge = Err(Invalid::TooLarge {
            what: "term or index",
        });
        let mut m = msg(MessageType::MsgHeartbeat);
        m.term = u64::MAX;
        assert_eq!(check(&m, &LOCAL), huge);
        let mut m = msg(MessageType::MsgRequestVote);
        m.index = MAX_TERM_OR_INDEX + 1;
        assert_eq!(check(&m, &LOCAL), huge);
        let mut m = snapshot(vec![1, 2, 3]);
        m.mut_snapshot().mut_metadata().index = u64::MAX;
        assert_eq!(check(&m, &LOCAL), huge);
        let mut m = msg(MessageType::MsgRequestVote);
        m.term = MAX_TERM_OR_INDEX;
        m.index = MAX_TERM_OR_INDEX;
        assert_eq!(check(&m, &LOCAL), Ok(()));
    }

    #[test]
    fn oversized_messages_are_refused() {
        let mut m = msg(MessageType::MsgAppend);
        m.entries = (1..=MAX_ENTRIES as u64 + 1)
            .map(|i| entry(i, 5))
            .collect::<Vec<_>>()
            .into();
        assert_eq!(
            check(&m, &LOCAL),
            Err(Invalid::TooLarge {
                what: "entry count"
            })
        );
        let mut m = msg(MessageType::MsgAppend);
        let mut e = entry(1, 5);
        e.data = vec![0; MAX_BYTES + 1].into();
        m.entries = vec![e].into();
        assert_eq!(
            check(&m, &LOCAL),
            Err(Invalid::TooLarge { what: "entries" })
        );
        let mut m = msg(MessageType::MsgHeartbeat);
        m.context = vec![0; MAX_BYTES + 1].into();
        assert_eq!(
            check(&m, &LOCAL),
            Err(Invalid::TooLarge { what: "context" })
        );
    }

    #[test]
    fn timeout_now_only_from_this_terms_leader() {
        let mut m = msg(MessageType::MsgTimeoutNow);
        m.from = 3;
        assert_eq!(check(&m, &LOCAL), Err(Invalid::TimeoutNow { from: 3 }));
        let mut m = msg(MessageType::MsgTimeoutNow);
        m.term = 6;
        assert_eq!(check(&m, &LOCAL), Err(Invalid::TimeoutNow { from: 1 }));
        let no_leader = Local {
            leader: None,
            ..LOCAL
        };
        assert!(check(&msg(MessageType::MsgTimeoutNow), &no_leader).is_err());
    }

    #[test]
    fn forged_snapshot_shapes_are_refused() {
        // The takeover seen in the wild: voters [target, 99] is well-formed and passes here
        // (only the cluster key keeps it out); these shapes no leader produces.
        for voters in [vec![], vec![1, 3], vec![1, 2, 2], vec![0, 2]] {
            assert_eq!(
                check(&snapshot(voters.clone()), &LOCAL),
                Err(Invalid::Snapshot { what: "voters" }),
                "{voters:?}"
            );
        }
        let mut m = snapshot(vec![1, 2]);
        m.mut_snapshot().mut_metadata().mut_conf_state().learners = vec![9];
        assert!(matches!(check(&m, &LOCAL), Err(Invalid::Snapshot { .. })));
        let mut m = snapshot(vec![1, 2]);
        m.mut_snapshot().mut_metadata().term = 0;
        assert!(matches!(check(&m, &LOCAL), Err(Invalid::Snapshot { .. })));
        let mut m = snapshot(vec![1, 2]);
        m.mut_snapshot().mut_metadata().term = 6;
        assert!(matches!(check(&m, &LOCAL), Err(Invalid::Snapshot { .. })));
        let mut m = msg(MessageType::MsgSnapshot);
        m.clear_snapshot();
        assert!(matches!(check(&m, &LOCAL), Err(Invalid::Snapshot { .. })));
    }
}
