//! `RaftCore::step` with arbitrary messages, between ticks, proposals and the Ready loop, on
//! node 1 of the voters 1, 2, 3 (the other two exist only as the fuzzer's messages).
//!
//! Each frame is one event, followed by one `ready` as the shell runs it: `op % 4` 0 steps
//! the bytes as a message from node `arg % 5` (0 and 1 are not peers: the check must refuse
//! them), 1 ticks `arg % 32 + 1` times, 2 proposes the bytes, 3 asks for a leadership
//! transfer. Properties: nothing panics in the core or in raft-rs behind it; the term never
//! goes down.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tdsc_election::{RaftCore, RaftSettings};
use tdsc_fuzz::frames;

const SETTINGS: RaftSettings = RaftSettings {
    tick_ms: 10,
    election_tick: 10,
    heartbeat_tick: 3,
};

fuzz_target!(|input: &[u8]| {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let mut core = RaftCore::new(1, &[1, 2, 3], SETTINGS, None, 0, &log).expect("core");
    let mut now = 0;
    let mut term = core.term();
    for f in frames(input) {
        match f.op % 4 {
            0 => {
                let _ = core.step(u64::from(f.arg % 5), f.data, now);
            }
            1 => {
                for _ in 0..=f.arg % 32 {
                    now += SETTINGS.tick_ms;
                    core.tick(now);
                }
            }
            2 => {
                let _ = core.propose(f.data.to_vec());
            }
            _ => {
                let _ = core.transfer_leadership(&[2, 3]);
            }
        }
        // The disk writes at once: every job is reported written.
        if let Some(job) = core.ready().persist {
            core.persisted(job.number);
            let _ = core.ready();
        }
        assert!(core.term() >= term, "term went down");
        term = core.term();
    }
});
