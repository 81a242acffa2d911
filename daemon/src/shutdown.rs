//! Cooperative stop: every thread and task of a node is owned by a handle that can ask it to
//! stop and then join it, with a bounded wait (mini-redis `shutdown.rs` style).
//!
//! * A tokio task is spawned with [`TaskHandle::spawn`]: it gets a [`Shutdown`] to `select!`
//!   on at every await that may last, and returns when it fires.
//! * A std thread is spawned with [`ThreadHandle::spawn`]: it gets a [`StopFlag`] to check
//!   between blocking calls, each of which must return within a bounded time (a read
//!   timeout: the receive thread's `SO_RCVTIMEO`, the load sampler's sleep). A thread whose
//!   blocking call has no timeout (the NFQUEUE receive: the `nfq` crate exposes neither its
//!   descriptor nor a timeout) is spawned with [`ThreadHandle::spawn_interruptible`]: stopping
//!   it also sends it [`WAKE_SIGNAL`], whose handler does nothing but is installed without
//!   `SA_RESTART`, so the blocked `recv` returns `EINTR` and the thread sees the flag. The
//!   signal is re-sent until the thread ends: one sent between the thread's flag check and
//!   its `recv` would otherwise be lost.
//!
//! Stopping never aborts what can be asked to stop. A task or thread that has not ended
//! within its wait is logged as an error; a task is then aborted (it holds no state that
//! outlives the process), a thread is left to the process exit.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Once};
use std::time::Duration;

use tokio::sync::watch;

/// How long a stop waits for one task or thread before it logs an error and moves on.
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// How often a stopping thread is checked (and, if interruptible, signalled again).
const THREAD_POLL: Duration = Duration::from_millis(10);

/// The signal that interrupts an interruptible thread's blocking call. SIGUSR2: nothing else
/// in the daemon uses it; with the handler installed, one sent from outside is harmless.
pub const WAKE_SIGNAL: libc::c_int = libc::SIGUSR2;

/// A task's side of its stop signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Whether the stop has been asked for.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the stop is asked for (or its owner is gone). Cancel-safe: use it in
    /// `select!` as often as needed.
    pub async fn requested(&mut self) {
        // An owner dropped without asking counts as asked: nobody could ask any more.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

/// A tokio task and the sender of its stop signal.
#[derive(Debug)]
pub struct TaskHandle {
    name: &'static str,
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
}

impl TaskHandle {
    /// Spawns `task(shutdown)` on the current runtime.
    pub fn spawn<F>(name: &'static str, task: impl FnOnce(Shutdown) -> F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        let join = tokio::spawn(task(Shutdown { rx }));
        TaskHandle { name, stop, join }
    }

    /// Asks the task to stop and waits for it, at most `wait`. Returns whether it ended
    /// cooperatively.
    pub async fn stop(self, wait: Duration) -> bool {
        let _ = self.stop.send(true);
        let mut join = self.join;
        match tokio::time::timeout(wait, &mut join).await {
            Ok(Ok(())) => {
                tracing::debug!(task = self.name, "stopped");
                true
            }
            Ok(Err(e)) => {
                tracing::error!(task = self.name, error = %e, "task failed");
                false
            }
            Err(_) => {
                tracing::error!(
                    task = self.name,
                    "task did not stop within {wait:?}; aborting it"
                );
                join.abort();
                // Wait for the abort too: the task's state (an election writer, say) is
                // dropped only when it is processed.
                if tokio::time::timeout(wait, join).await.is_err() {
                    tracing::error!(task = self.name, "aborted task has not ended either");
                }
                false
            }
        }
    }
}

/// A thread's side of its stop signal.
#[derive(Debug, Clone)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Relaxed)
    }
}

/// A std thread and its stop flag. Dropped without [`ThreadHandle::stop`] (an early error
/// return), it still sets the flag (and wakes an interruptible thread once), so the thread
/// ends on its own; nobody joins it then.
#[derive(Debug)]
pub struct ThreadHandle {
    name: &'static str,
    stop: StopFlag,
    interrupt: bool,
    /// Taken by `stop`.
    join: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ThreadHandle {
    fn drop(&mut self) {
        self.stop.0.store(true, Relaxed);
        if let (true, Some(join)) = (self.interrupt, &self.join) {
            if !join.is_finished() {
                interrupt(join);
            }
        }
    }
}

impl ThreadHandle {
    /// Spawns `body(stop)` as thread `name`. Every blocking call in `body` must return within
    /// a bounded time, so that the flag is seen.
    pub fn spawn(
        name: &'static str,
        body: impl FnOnce(StopFlag) + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::start(name, false, body)
    }

    /// As [`ThreadHandle::spawn`], for a thread that may block without a timeout: stopping it
    /// also interrupts it with [`WAKE_SIGNAL`] (see the module docs).
    pub fn spawn_interruptible(
        name: &'static str,
        body: impl FnOnce(StopFlag) + Send + 'static,
    ) -> std::io::Result<Self> {
        install_wake_handler()?;
        Self::start(name, true, body)
    }

    fn start(
        name: &'static str,
        interrupt: bool,
        body: impl FnOnce(StopFlag) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = StopFlag(Arc::new(AtomicBool::new(false)));
        let flag = stop.clone();
        let join = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(flag))?;
        Ok(ThreadHandle {
            name,
            stop,
            interrupt,
            join: Some(join),
        })
    }

    /// Sets the flag, wakes the thread if it is interruptible, and joins it, waiting at most
    /// `wait` (without blocking the runtime). Returns whether it was joined.
    pub async fn stop(mut self, wait: Duration) -> bool {
        self.stop.0.store(true, Relaxed);
        let Some(join) = self.join.take() else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + wait;
        while !join.is_finished() {
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(
                    thread = self.name,
                    "thread did not stop within {wait:?}; leaving it to the process exit"
                );
                return false;
            }
            if self.interrupt {
                interrupt(&join);
            }
            tokio::time::sleep(THREAD_POLL).await;
        }
        match join.join() {
            Ok(()) => {
                tracing::debug!(thread = self.name, "stopped");
                true
            }
            Err(_) => {
                tracing::error!(thread = self.name, "thread panicked");
                false
            }
        }
    }
}

/// Does nothing: its only effect is that the interrupted system call returns `EINTR`.
extern "C" fn on_wake(_: libc::c_int) {}

/// Installs the [`WAKE_SIGNAL`] handler, once per process.
fn install_wake_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain old data; all-zero is a valid value (empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // No SA_RESTART: a blocked recv must return EINTR rather than resume.
        action.sa_flags = 0;
        // SAFETY: `action` is a valid sigaction whose handler is async-signal-safe (it does
        // nothing); the old action is not asked for.
        if unsafe { libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut()) } != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// Sends [`WAKE_SIGNAL`] to the thread of `join`.
fn interrupt(join: &std::thread::JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: the pthread_t belongs to a thread that has not been joined (we hold its
    // JoinHandle), so it is valid; the signal's handler is installed.
    let rc = unsafe { libc::pthread_kill(join.as_pthread_t(), WAKE_SIGNAL) };
    if rc != 0 {
        tracing::debug!(rc, "wake signal not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_stops_when_asked() {
        let t = TaskHandle::spawn("test", |mut s| async move { s.requested().await });
        let stopped = tokio::time::timeout(Duration::from_secs(1), t.stop(STOP_WAIT))
            .await
            .unwrap();
        assert!(stopped);
    }

    /// A thread blocked in a read with no timeout (here: a pipe nobody writes) is woken by
    /// the signal and sees its flag.
    #[tokio::test]
    async fn an_interruptible_thread_is_woken_from_a_blocking_read() {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds has room for the two descriptors pipe writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (r, w) = (fds[0], fds[1]);
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let t = ThreadHandle::spawn_interruptible("test-pipe", move |stop| {
            let mut b = [0u8; 1];
            while !stop.is_set() {
                // SAFETY: b is valid for writes of 1 byte; r is an open descriptor.
                let _ = unsafe { libc::read(r, b.as_mut_ptr().cast(), 1) };
            }
            done2.store(true, Relaxed);
        })
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        assert!(t.stop(STOP_WAIT).await, "joined");
        assert!(done.load(Relaxed), "the thread ended");
        assert!(started.elapsed() < Duration::from_secs(1));
        // SAFETY: both descriptors are open and ours.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }
}
