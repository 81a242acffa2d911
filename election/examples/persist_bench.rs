//! What a Raft state write costs: the state file is rewritten whole (and fsynced) on every
//! change, bounded by compaction at `2 * LOG_KEEP_ENTRIES` entries. This measures encode +
//! write + fsync + rename of a quiet state (a few empty entries) and of the worst case under a
//! SYN flood (a full log of full IPv6 record batches), side by side in one run.
//!
//! `cargo run --release -p tdsc-election --example persist_bench [DIR]` (default: a directory
//! under the system temp dir; the disk under DIR is what is measured).

use std::io::Write;
use std::time::Instant;

use raft::prelude::Entry;
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

fn write(path: &std::path::Path, p: &Persisted) -> std::io::Result<usize> {
    let bytes = p
        .encode()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(bytes.len())
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("tdsc-persist-bench-{}", std::process::id())),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("raft.state");
    let cases = [
        ("quiet (4 empty entries)", state(4, 0)),
        (
            "flood (full log of full batches)",
            state(2 * LOG_KEEP_ENTRIES, FULL_BATCH),
        ),
    ];
    println!("Raft state write (encode + write + fsync + rename + dir fsync), {ROUNDS} rounds each, interleaved, in {}:", dir.display());
    let mut times = vec![Vec::new(); cases.len()];
    let mut sizes = vec![0; cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, p)) in cases.iter().enumerate() {
            let t = Instant::now();
            sizes[i] = write(&path, p)?;
            times[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (i, (name, _)) in cases.iter().enumerate() {
        let t = &mut times[i];
        t.sort_by(f64::total_cmp);
        println!(
            "  {name:<34} {:>9} bytes   p50 {:>7.2} ms   max {:>7.2} ms",
            sizes[i],
            t[t.len() / 2],
            t[t.len() - 1]
        );
    }
    let ratio = times[1][times[1].len() / 2] / times[0][times[0].len() / 2].max(1e-9);
    println!("  ratio flood/quiet p50: {ratio:.1}x (one write per Raft ready that changed state, i.e. up to one per 10 ms tick under load)");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
