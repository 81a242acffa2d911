//! The systemd watchdog: `WATCHDOG=1` is sent only while the owners that must keep moving do.
//!
//! Two owners carry a [`Heartbeat`]: the queue thread (the master path) and the Raft task. The
//! Raft task beats on every tick; a task that stops ticking (stuck in a step, in a write, or on
//! a wedged runtime) stops beating. The queue thread beats after each packet and, before it
//! blocks in its receive, marks itself *waiting*: a member's queue thread waits for SYNs that
//! never come, and that is not a fault. Stuck means busy with one packet (or between packets)
//! for longer than the limit.
//!
//! [`check`] is the pure part, a function of the heartbeats and the time; [`feed`] is the task
//! that reads them every half watchdog interval and notifies systemd (`crate::host::notify`)
//! only when every one is fine. When one is not, it logs which and for how long and stops
//! feeding: systemd then kills the daemon (`WatchdogSignal=`, SIGABRT by default) and
//! `Restart=on-failure` starts it again.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::role::RoleCell;
use crate::shutdown::Shutdown;

/// One owner's last sign of progress: `ms << 1 | waiting`, on the [`RoleCell::now_ms`] clock,
/// in one atomic so that the hot path pays one relaxed store per change.
#[derive(Debug, Default)]
pub struct Heartbeat(AtomicU64);

impl Heartbeat {
    /// Progress at `now_ms` (a tick handled, a packet done).
    pub fn beat(&self, now_ms: u64) {
        self.0.store(now_ms << 1, Relaxed);
    }

    /// About to block waiting for input at `now_ms`: fine for as long as it lasts.
    pub fn waiting(&self, now_ms: u64) {
        self.0.store((now_ms << 1) | 1, Relaxed);
    }

    fn read(&self) -> Beat {
        let v = self.0.load(Relaxed);
        Beat {
            at_ms: v >> 1,
            waiting: v & 1 == 1,
        }
    }
}

/// A heartbeat as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// When it was last written.
    pub at_ms: u64,
    /// Blocked waiting for input since then.
    pub waiting: bool,
}

/// The first owner found without progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stuck {
    /// The owner's name.
    pub name: &'static str,
    /// How long since its last beat.
    pub for_ms: u64,
}

/// Whether every owner made progress within `limit_ms` of `now_ms` (or is waiting for input).
/// A beat from the future (a clock read racing the store) counts as recent.
pub fn check(beats: &[(&'static str, Beat)], now_ms: u64, limit_ms: u64) -> Result<(), Stuck> {
    for &(name, beat) in beats {
        let age = now_ms.saturating_sub(beat.at_ms);
        if !beat.waiting && age > limit_ms {
            return Err(Stuck { name, for_ms: age });
        }
    }
    Ok(())
}

/// What the feeder watches.
#[derive(Debug)]
pub struct Watched {
    /// The clock every heartbeat is written on.
    pub role: Arc<RoleCell>,
    /// Named heartbeats: the queue thread's, and the Raft task's under Raft.
    pub beats: Vec<(&'static str, Arc<Heartbeat>)>,
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, for this process when
/// `WATCHDOG_PID` is set), or None when the unit has no `WatchdogSec=`.
pub fn interval_from_env() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Feeds the watchdog every `interval / 2` while [`check`] passes with a limit of half the
/// interval, until `shutdown`. Logs once when it stops feeding and once when it resumes.
pub async fn feed(watched: Watched, interval: Duration, mut shutdown: Shutdown) {
    let half = interval / 2;
    let limit_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut starving = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.requested() => return,
        }
        let beats: Vec<(&'static str, Beat)> =
            watched.beats.iter().map(|(n, h)| (*n, h.read())).collect();
        match check(&beats, watched.role.now_ms(), limit_ms) {
            Ok(()) => {
                if starving {
                    tracing::warn!("watchdog: every owner moves again; feeding resumed");
                    starving = false;
                }
                if let Err(e) = crate::host::notify::notify("WATCHDOG=1") {
                    tracing::warn!(error = %e, "watchdog: cannot notify systemd");
                }
            }
            Err(s) => {
                if !starving {
                    tracing::error!(
                        owner = s.name,
                        stuck_ms = s.for_ms,
                        "watchdog: {} has made no progress for {} ms; not feeding the \
                         watchdog, systemd will restart the daemon",
                        s.name,
                        s.for_ms
                    );
                    starving = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(at_ms: u64, waiting: bool) -> Beat {
        Beat { at_ms, waiting }
    }

    #[test]
    fn recent_beats_pass_and_a_stale_one_names_its_owner() {
        let beats = [("queue", beat(9_000, false)), ("raft", beat(9_900, false))];
        // The limit itself still passes; one millisecond over does not.
        assert_eq!(check(&beats, 10_000, 1_000), Ok(()));
        assert_eq!(
            check(&beats, 10_001, 1_000),
            Err(Stuck {
                name: "queue",
                for_ms: 1_001
            })
        );
        let beats = [("queue", beat(9_900, false)), ("raft", beat(1_000, false))];
        assert_eq!(
            check(&beats, 10_000, 1_000),
            Err(Stuck {
                name: "raft",
                for_ms: 9_000
            })
        );
    }

    /// A member's queue thread blocks in its receive for as long as no SYN comes: waiting is
    /// not stuck, however old; busy for as long is.
    #[test]
    fn waiting_for_input_is_never_stuck() {
        let waiting = [("queue", beat(0, true))];
        assert_eq!(check(&waiting, 1_000_000, 1_000), Ok(()));
        let busy = [("queue", beat(0, false))];
        assert!(check(&busy, 1_000_000, 1_000).is_err());
    }

    #[test]
    fn a_beat_from_the_future_counts_as_recent() {
        assert_eq!(check(&[("raft", beat(10_500, false))], 10_000, 100), Ok(()));
    }

    #[test]
    fn the_heartbeat_keeps_time_and_state_apart() {
        let h = Heartbeat::default();
        h.waiting(123_456);
        assert_eq!(h.read(), beat(123_456, true));
        h.beat(123_789);
        assert_eq!(h.read(), beat(123_789, false));
    }
}
