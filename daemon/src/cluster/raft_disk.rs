//! The Raft task's disk: one thread that writes the core's state files, so that no fsync ever
//! runs on the Raft task and holds back its ticks and heartbeats (see
//! `tdsc_election::raft_core`, asynchronous persistence).
//!
//! The task hands the thread one [`DiskJob`] at a time and merges what comes meanwhile into a
//! single queued job ([`DiskJob::merge`]): only the newest state of a merged job is written
//! (it contains every earlier one), so however long a write takes, at most two copies of the
//! state exist and the number of writes adapts to the disk's speed. The thread answers each
//! job with a [`DiskDone`]; the task then sends the job's messages and tells the core.
//!
//! A write that fails withholds its messages and is not reported to the core as written; the
//! next job (even one without a new state: the task sends one every tick meanwhile) rewrites
//! the newest state from scratch before it can succeed. Until then this node sends nothing at
//! all, a leader's heartbeats included: it acknowledges nothing, votes for no one, and a
//! leader that cannot write lets the others elect one that can.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tdsc_election::log_file::{append_synced, write_atomic, LogTracker, LogWrite};
use tdsc_election::Persisted;
use tokio::sync::mpsc;

use crate::cluster::role::RoleCell;
use crate::watchdog::Heartbeat;

/// Messages a merged job keeps at most; older ones are dropped (Raft retransmits).
pub const MAX_HELD_MESSAGES: usize = 4096;

/// What the disk owes the core: see `tdsc_election::PersistJob`. The messages are sealed
/// envelopes, addressed when the job was made.
#[derive(Debug, Default)]
pub struct DiskJob {
    pub number: u64,
    pub state: Option<Persisted>,
    pub messages: Vec<(SocketAddr, Vec<u8>)>,
}

impl DiskJob {
    /// Folds a newer job into this one: the newer number and state (a state contains every
    /// earlier one), the messages of both in order, at most [`MAX_HELD_MESSAGES`].
    pub fn merge(&mut self, newer: DiskJob) {
        self.number = newer.number;
        if newer.state.is_some() {
            self.state = newer.state;
        }
        self.messages.extend(newer.messages);
        let excess = self.messages.len().saturating_sub(MAX_HELD_MESSAGES);
        self.messages.drain(..excess);
    }
}

/// A job carried out, or not.
#[derive(Debug)]
pub struct DiskDone {
    pub number: u64,
    /// Empty when the write failed: they must not be sent.
    pub messages: Vec<(SocketAddr, Vec<u8>)>,
    pub result: std::io::Result<()>,
    /// How long the write took (zero when there was nothing to write).
    pub took: Duration,
}

/// The state files and what they hold.
#[derive(Debug)]
struct Writer {
    state_path: PathBuf,
    log_path: PathBuf,
    /// What `log_path` holds; the first write after start rewrites it.
    log: LogTracker,
    /// The newest state handed over, kept to rewrite after a failure.
    latest: Option<Persisted>,
    failed: bool,
}

impl Writer {
    fn carry_out(&mut self, job: DiskJob) -> DiskDone {
        let fresh = job.state.is_some();
        if let Some(s) = job.state {
            self.latest = Some(s);
        }
        let started = Instant::now();
        // Taken out for the write and put back (no copy of the state per write).
        let result = match self.latest.take() {
            Some(p) if fresh || self.failed => {
                let result = self.write(&p);
                self.latest = Some(p);
                result
            }
            latest => {
                self.latest = latest;
                Ok(())
            }
        };
        self.failed = result.is_err();
        DiskDone {
            number: job.number,
            messages: if result.is_ok() {
                job.messages
            } else {
                Vec::new()
            },
            result,
            took: started.elapsed(),
        }
    }

    /// Writes `p` in the crash-safe order of `tdsc_election::log_file`.
    fn write(&mut self, p: &Persisted) -> std::io::Result<()> {
        let invalid = |e| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let head = p.encode_head().map_err(invalid)?;
        let result = match self.log.plan(p).map_err(invalid)? {
            Some(LogWrite::Append(records)) => append_synced(&self.log_path, &records)
                .and_then(|()| write_atomic(&self.state_path, &head)),
            Some(LogWrite::Rewrite(file)) => write_atomic(&self.state_path, &head)
                .and_then(|()| write_atomic(&self.log_path, &file)),
            None => write_atomic(&self.state_path, &head),
        };
        match &result {
            Ok(()) => self.log.written(p),
            Err(_) => self.log = LogTracker::default(),
        }
        result
    }
}

/// The task's end of the disk thread.
#[derive(Debug)]
pub struct RaftDisk {
    jobs: std::sync::mpsc::Sender<DiskJob>,
    done: mpsc::UnboundedReceiver<DiskDone>,
    busy: bool,
    queued: Option<DiskJob>,
}

impl RaftDisk {
    /// Starts the thread `tdsc-raft-disk`. It beats `heartbeat` (on `clock`) for the
    /// watchdog: waiting while it has no job, busy while it writes. It ends when this handle
    /// is dropped, after the job in hand.
    pub fn start(
        state_path: PathBuf,
        log_path: PathBuf,
        heartbeat: Arc<Heartbeat>,
        clock: Arc<RoleCell>,
    ) -> std::io::Result<RaftDisk> {
        let (jobs, rx) = std::sync::mpsc::channel::<DiskJob>();
        let (done_tx, done) = mpsc::unbounded_channel();
        let mut writer = Writer {
            state_path,
            log_path,
            log: LogTracker::default(),
            latest: None,
            failed: false,
        };
        std::thread::Builder::new()
            .name("tdsc-raft-disk".into())
            .spawn(move || loop {
                heartbeat.waiting(clock.now_ms());
                let Ok(job) = rx.recv() else { return };
                heartbeat.beat(clock.now_ms());
                if done_tx.send(writer.carry_out(job)).is_err() {
                    return;
                }
            })?;
        Ok(RaftDisk {
            jobs,
            done,
            busy: false,
            queued: None,
        })
    }

    /// Hands `job` to the thread, or queues it (merged) while the thread is busy.
    pub fn submit(&mut self, job: DiskJob) {
        if self.busy {
            match &mut self.queued {
                Some(q) => q.merge(job),
                None => self.queued = Some(job),
            }
            return;
        }
        // A send fails only when the thread has ended; `done` then closes and the task ends.
        self.busy = self.jobs.send(job).is_ok();
    }

    /// The next job the thread finished (handing it the queued one, if any); `None` once the
    /// thread has ended. Cancel-safe: a job received is always followed by the hand-over.
    pub async fn next(&mut self) -> Option<DiskDone> {
        let done = self.done.recv().await?;
        self.finished();
        Some(done)
    }

    /// The thread finished a job: hands it the queued one, if any.
    fn finished(&mut self) {
        self.busy = false;
        if let Some(q) = self.queued.take() {
            self.submit(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 2], 7400))
    }

    #[test]
    fn a_merged_job_keeps_the_newest_state_and_every_message_in_order() {
        let mut a = DiskJob {
            number: 3,
            state: Some(Persisted::default()),
            messages: vec![(addr(), vec![1])],
        };
        a.merge(DiskJob {
            number: 4,
            state: None,
            messages: vec![(addr(), vec![2])],
        });
        assert_eq!(a.number, 4);
        assert!(a.state.is_some(), "a job without state keeps the older one");
        let mut newer = Persisted::default();
        newer.hard_state.term = 9;
        a.merge(DiskJob {
            number: 5,
            state: Some(newer),
            messages: vec![(addr(), vec![3])],
        });
        assert_eq!(a.state.as_ref().unwrap().hard_state.term, 9);
        let bytes: Vec<u8> = a.messages.iter().map(|m| m.1[0]).collect();
        assert_eq!(bytes, [1, 2, 3]);
    }

    #[test]
    fn a_merged_job_holds_a_bounded_number_of_messages_dropping_the_oldest() {
        let mut a = DiskJob::default();
        for i in 0..u64::try_from(MAX_HELD_MESSAGES).unwrap() + 10 {
            a.merge(DiskJob {
                number: i,
                state: None,
                messages: vec![(addr(), i.to_be_bytes().to_vec())],
            });
        }
        assert_eq!(a.messages.len(), MAX_HELD_MESSAGES);
        assert_eq!(a.messages[0].1, 10u64.to_be_bytes());
    }

    fn writer(dir: &std::path::Path) -> Writer {
        Writer {
            state_path: dir.join("raft.state"),
            log_path: dir.join("raft.log"),
            log: LogTracker::default(),
            latest: None,
            failed: false,
        }
    }

    /// A failed write sends nothing; the next job, even one without a state, rewrites the
    /// newest state before its messages may go.
    #[test]
    fn after_a_failed_write_the_next_job_rewrites_before_it_reports_success() {
        let dir = std::env::temp_dir().join(format!("tdsc-raft-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = writer(&dir.join("missing"));
        let mut p = Persisted::default();
        p.hard_state.term = 7;
        let done = w.carry_out(DiskJob {
            number: 1,
            state: Some(p),
            messages: vec![(addr(), vec![1])],
        });
        assert!(done.result.is_err(), "the directory does not exist");
        assert!(done.messages.is_empty());
        std::fs::create_dir_all(dir.join("missing")).unwrap();
        let done = w.carry_out(DiskJob {
            number: 2,
            state: None,
            messages: vec![(addr(), vec![2])],
        });
        assert!(done.result.is_ok(), "{:?}", done.result);
        assert_eq!(done.messages.len(), 1);
        let head = std::fs::read(dir.join("missing").join("raft.state")).unwrap();
        let log = std::fs::read(dir.join("missing").join("raft.log")).ok();
        let back = Persisted::decode_with_log(&head, log.as_deref()).unwrap();
        assert_eq!(back.hard_state.term, 7, "the retry wrote the newest state");
        // Nothing new and nothing failed: nothing is written.
        let done = w.carry_out(DiskJob {
            number: 3,
            state: None,
            messages: Vec::new(),
        });
        assert!(done.result.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
