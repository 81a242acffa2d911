//! What a Raft state write costs, side by side in one run: a quiet state (a few empty
//! entries), and the worst case under a SYN flood (a full log of full IPv6 record batches,
//! `2 * LOG_KEEP_ENTRIES` of them) written the way the daemon did at first (the whole state in
//! one file, rewritten and fsynced on every change) and the way it does now (the small state
//! file rewritten, the one new batch appended to the log file and fsynced; see
//! `tdsc_election::log_file`).
//!
//! `cargo run --release -p tdsc-election --example persist_bench [DIR]` (default: a directory
//! under the system temp dir; the disk under DIR is what is measured).

use std::time::Instant;

use raft::prelude::Entry;
use tdsc_election::log_file::{append_synced, write_atomic, LogTracker, LogWrite};
use tdsc_election::raft_core::LOG_KEEP_ENTRIES;
use tdsc_election::Persisted;

/// A full record batch of IPv6 records is just under 20 kB (see tdsc-proto's test).
const FULL_BATCH: usize = 20 * 1024;
const ROUNDS: usize = 40;

fn state(entries: u64, size: usize) -> Persisted {
    let mut p = Persisted::default();
    for i in 1..=entries {
        p.entries.push(Entry {
            index: i,
            term: 1,
            data: vec![0xa5; size].into(),
            ..Entry::default()
        });
    }
    p
}

fn invalid(e: tdsc_election::RaftError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// The whole state in one file (the same atomic write the daemon uses).
fn write(path: &std::path::Path, p: &Persisted) -> std::io::Result<usize> {
    let bytes = p.encode().map_err(invalid)?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len())
}

/// The head in the state file, the newest entry appended to the log file (which `tracker`
/// says holds all the others).
fn write_appending(
    path: &std::path::Path,
    log: &std::path::Path,
    tracker: &LogTracker,
    p: &Persisted,
) -> std::io::Result<usize> {
    let head = p.encode_head().map_err(invalid)?;
    let Some(LogWrite::Append(records)) = tracker.plan(p).map_err(invalid)? else {
        return Err(std::io::Error::other("expected an append"));
    };
    append_synced(log, &records)?;
    write_atomic(path, &head)?;
    Ok(head.len() + records.len())
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("tdsc-persist-bench-{}", std::process::id())),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("raft.state");
    let log = dir.join("raft.log");
    let quiet = state(4, 0);
    let flood = state(2 * LOG_KEEP_ENTRIES, FULL_BATCH);
    // The log file holding all but the newest flood entry, as after the previous tick.
    let mut before = flood.clone();
    before.entries.pop();
    let mut tracker = LogTracker::default();
    let Some(LogWrite::Rewrite(file)) = tracker.plan(&before).map_err(invalid)? else {
        return Err(std::io::Error::other("expected a rewrite"));
    };
    tracker.written(&before);
    let names = [
        "quiet, whole state",
        "flood, whole state rewritten",
        "flood, head + one batch appended",
    ];
    println!(
        "Raft state write (write + fsync + rename + dir fsync), {ROUNDS} rounds each, interleaved, in {}:",
        dir.display()
    );
    let mut times = vec![Vec::new(); names.len()];
    let mut sizes = vec![0; names.len()];
    for _ in 0..ROUNDS {
        for (i, slot) in times.iter_mut().enumerate() {
            if i == 2 {
                // Reset the log file to "before" (not timed), then time the append.
                write_atomic(&log, &file)?;
            }
            let t = Instant::now();
            sizes[i] = match i {
                0 => write(&path, &quiet)?,
                1 => write(&path, &flood)?,
                _ => write_appending(&path, &log, &tracker, &flood)?,
            };
            slot.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (i, name) in names.iter().enumerate() {
        let t = &mut times[i];
        t.sort_by(f64::total_cmp);
        println!(
            "  {name:<34} {:>9} bytes   p50 {:>7.2} ms   max {:>7.2} ms",
            sizes[i],
            t[t.len() / 2],
            t[t.len() - 1]
        );
    }
    let p50 = |i: usize| times[i][times[i].len() / 2].max(1e-9);
    println!(
        "  ratios p50: flood rewrite / quiet {:.1}x; flood append / quiet {:.1}x; flood rewrite / flood append {:.1}x",
        p50(1) / p50(0),
        p50(2) / p50(0),
        p50(1) / p50(2)
    );
    println!(
        "  (one write per Raft ready that changed state: up to one per 10 ms tick under load)"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
