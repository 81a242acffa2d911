//! The Raft log on disk as an append-only file, next to the state file.
//!
//! [`Persisted::encode`] rewrites everything; under a SYN flood that is up to a full log of
//! full record batches per tick (see `examples/persist_bench.rs`). So the shell writes the
//! state file without its entries ([`Persisted::encode_head`]) and keeps the entries in a log
//! file it mostly *appends* to: [`LogTracker::plan`] compares what the file holds with the
//! entries to persist and says whether appending the new ones is enough, or whether the file
//! must be rewritten (the first write after start, a compaction that dropped a prefix, or a new
//! leader that overwrote a suffix).
//!
//! Format: `"TDSCLOG1"`, then records of `u32` BE length + protobuf `Entry`. A crash during an
//! append may leave a torn last record; [`decode_log`] stops there, and the first write after
//! a start always rewrites the file, so nothing is ever appended behind a torn record.
//!
//! Order of writes, for crash safety (the shell's job): an append goes to the log (fsync)
//! before the state file; a rewrite comes after the state file. Either way a crash in between
//! leaves a state whose snapshot and commit index refer only to entries on disk, plus at most
//! entries nobody has acknowledged yet.

use std::io::Write as _;
use std::path::Path;

use protobuf::Message as _;
use raft::prelude::Entry;

use crate::raft_core::{Persisted, RaftError};

pub const LOG_MAGIC: &[u8] = b"TDSCLOG1";

/// How to bring the log file up to date.
#[derive(Debug, PartialEq, Eq)]
pub enum LogWrite {
    /// Append these bytes (records only).
    Append(Vec<u8>),
    /// Replace the file with these bytes (magic and every record).
    Rewrite(Vec<u8>),
}

/// What the log file holds: (index, term) of each entry, in order.
#[derive(Debug, Default)]
pub struct LogTracker {
    on_disk: Vec<(u64, u64)>,
    /// False until the first write: that one rewrites whatever was there.
    written: bool,
}

fn key(e: &Entry) -> (u64, u64) {
    (e.index, e.term)
}

fn records(entries: &[Entry], out: &mut Vec<u8>) -> Result<(), RaftError> {
    for e in entries {
        let b = e.write_to_bytes()?;
        let n = u32::try_from(b.len()).map_err(|_| RaftError::Corrupt("entry too large"))?;
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&b);
    }
    Ok(())
}

impl LogTracker {
    /// What to write so that the file holds exactly `p.entries`; `None` when it already does.
    pub fn plan(&self, p: &Persisted) -> Result<Option<LogWrite>, RaftError> {
        let want: Vec<(u64, u64)> = p.entries.iter().map(key).collect();
        if self.written && want == self.on_disk {
            return Ok(None);
        }
        if self.written && want.len() > self.on_disk.len() && want.starts_with(&self.on_disk) {
            let mut out = Vec::new();
            records(&p.entries[self.on_disk.len()..], &mut out)?;
            return Ok(Some(LogWrite::Append(out)));
        }
        let mut out = LOG_MAGIC.to_vec();
        records(&p.entries, &mut out)?;
        Ok(Some(LogWrite::Rewrite(out)))
    }

    /// Records that the file now holds `p.entries` (after the plan's write succeeded).
    pub fn written(&mut self, p: &Persisted) {
        self.on_disk = p.entries.iter().map(key).collect();
        self.written = true;
    }
}

/// The entries of a log file, in file order; a torn last record is dropped.
pub fn decode_log(buf: &[u8]) -> Result<Vec<Entry>, RaftError> {
    let mut rest = buf
        .strip_prefix(LOG_MAGIC)
        .ok_or(RaftError::Corrupt("raft log file: bad magic"))?;
    let mut out = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = usize::try_from(u32::from_be_bytes(*len)).unwrap_or(usize::MAX);
        if tail.len() < len {
            break;
        }
        out.push(Entry::parse_from_bytes(&tail[..len])?);
        rest = &tail[len..];
    }
    Ok(out)
}

impl Persisted {
    /// Everything but the entries, in the state file's format (they go to the log file).
    pub fn encode_head(&self) -> Result<Vec<u8>, RaftError> {
        Persisted {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
            snapshot: self.snapshot.clone(),
            entries: Vec::new(),
            members: self.members.clone(),
            settings: self.settings.clone(),
        }
        .encode()
    }

    /// The state file plus, if there is one, the log file: the log's entries overwrite the
    /// state file's own (a file written before the log existed), as Raft's log does, and
    /// entries the snapshot covers are dropped.
    pub fn decode_with_log(state: &[u8], log: Option<&[u8]>) -> Result<Self, RaftError> {
        let mut p = Persisted::decode(state)?;
        if let Some(log) = log {
            for e in decode_log(log)? {
                p.entries.retain(|x| x.index < e.index);
                p.entries.push(e);
            }
        }
        let floor = p.snapshot.index;
        p.entries.retain(|e| e.index > floor);
        Ok(p)
    }
}

/// Appends to a file and fsyncs it: how the shell appends to the log file.
pub fn append_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_data()
}

/// Replaces a file with an atomic rename (via `<name>.tmp`), fsyncing the file and then the
/// directory: how the shell writes the state file and rewrites the log file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![u8::try_from(index % 251).unwrap(); 8].into(),
            ..Entry::default()
        }
    }

    fn state(entries: &[(u64, u64)], snapshot_index: u64) -> Persisted {
        let mut p = Persisted {
            entries: entries.iter().map(|(i, t)| entry(*i, *t)).collect(),
            ..Persisted::default()
        };
        p.snapshot.index = snapshot_index;
        p
    }

    /// Applies plans to an in-memory "file" exactly as the shell does to the real one.
    fn apply(file: &mut Vec<u8>, w: LogWrite) -> &'static str {
        match w {
            LogWrite::Append(b) => {
                file.extend_from_slice(&b);
                "append"
            }
            LogWrite::Rewrite(b) => {
                *file = b;
                "rewrite"
            }
        }
    }

    #[test]
    fn appends_when_the_log_grows_and_rewrites_otherwise() {
        let mut t = LogTracker::default();
        let mut file = Vec::new();
        // (entries as (index, term), snapshot index, expected kind of write)
        type Step<'a> = (&'a [(u64, u64)], u64, &'a str);
        let steps: [Step<'_>; 5] = [
            (&[(1, 1), (2, 1)], 0, "rewrite"), // first write after start
            (&[(1, 1), (2, 1), (3, 1), (4, 2)], 0, "append"), // growth
            (&[(1, 1), (2, 1), (3, 3)], 0, "rewrite"), // a new leader overwrote 3 and 4
            (&[(3, 3), (4, 3)], 2, "rewrite"), // compaction dropped a prefix
            (&[(3, 3), (4, 3), (5, 3)], 2, "append"),
        ];
        for (entries, snap, how) in steps {
            let p = state(entries, snap);
            let w = t.plan(&p).unwrap().expect("something to write");
            assert_eq!(apply(&mut file, w), how, "{entries:?}");
            t.written(&p);
            assert_eq!(t.plan(&p).unwrap(), None, "nothing left to write");
            let head = p.encode_head().unwrap();
            let back = Persisted::decode_with_log(&head, Some(&file)).unwrap();
            assert_eq!(back, p, "after {how} of {entries:?}");
        }
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_the_next_write_rewrites() {
        let p = state(&[(1, 1), (2, 1), (3, 1)], 0);
        let t = LogTracker::default();
        let mut file = Vec::new();
        apply(&mut file, t.plan(&p).unwrap().unwrap());
        file.truncate(file.len() - 3);
        let head = p.encode_head().unwrap();
        let back = Persisted::decode_with_log(&head, Some(&file)).unwrap();
        assert_eq!(back.entries.len(), 2, "the torn third entry is gone");
        // A restarted shell has a fresh tracker: its first write is a rewrite.
        let restarted = LogTracker::default();
        assert!(matches!(
            restarted.plan(&back).unwrap(),
            Some(LogWrite::Rewrite(_))
        ));
    }

    #[test]
    fn a_state_file_with_inline_entries_still_loads_and_the_log_wins() {
        let old = state(&[(1, 1), (2, 1)], 0);
        let inline = old.encode().unwrap();
        assert_eq!(Persisted::decode_with_log(&inline, None).unwrap(), old);
        let mut file = LOG_MAGIC.to_vec();
        records(&[entry(2, 2), entry(3, 2)], &mut file).unwrap();
        let merged = Persisted::decode_with_log(&inline, Some(&file)).unwrap();
        let keys: Vec<_> = merged.entries.iter().map(key).collect();
        assert_eq!(keys, [(1, 1), (2, 2), (3, 2)]);
        assert!(decode_log(b"NOTALOG").is_err());
    }
}
