//! Cooperative stop: every thread and task of a node is owned by a handle that can ask it to
//! stop and then join it, with a bounded wait (mini-redis `shutdown.rs` style).
//!
//! * A tokio task is spawned with [`TaskHandle::spawn`]: it gets a [`Shutdown`] to `select!`
//!   on at every await that may last, and returns when it fires.
//! * A std thread is spawned with [`ThreadHandle::spawn`]: it gets a [`StopFlag`] to check
//!   between blocking calls, each of which must return within a bounded time (a read
//!   timeout: the receive thread's `SO_RCVTIMEO`, the load sampler's sleep). A thread whose
//!   blocking call has no timeout (the NFQUEUE receive: the `nfq` crate exposes neither its
//!   descriptor nor a timeout, and the batched `recvmmsg` is given none) is spawned with [`ThreadHandle::spawn_interruptible`]: stopping
//!   it also sends it [`WAKE_SIGNAL`], whose handler does nothing but is installed without
//!   `SA_RESTART`, so the blocked `recv` returns `EINTR` and the thread sees the flag. The
//!   signal is re-sent until the thread ends: one sent between the thread's flag check and
//!   its `recv` would otherwise be lost.
//!
//! **Supervision.** Every handle is spawned under a [`Supervisor`]. A task or thread that ends
//! without having been asked to, or panics, is reported to the supervisor's [`Exits`] with its
//! name; the node's role loop waits on it and takes the whole daemon down (teardown, then a
//! non-zero exit, so that systemd's `Restart=on-failure` starts it again). A half-running
//! daemon (Raft task dead, process up) is the one state this rules out. In a release build a
//! panic aborts the process at once (`panic = "abort"`); the panic hook tdscd installs logs it
//! first. In a debug build (tests) the panic unwinds, is caught here, and is reported the
//! same way as an unexpected end.
//!
//! Stopping never aborts what can be asked to stop. A task or thread that has not ended
//! within its wait is logged as an error; a task is then aborted (it holds no state that
//! outlives the process), a thread is left to the process exit.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// How an owner ended when nobody had asked it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// It returned.
    Returned,
    /// It panicked, with this message.
    Panicked(String),
}

/// An owner that ended unexpectedly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The handle's name.
    pub name: &'static str,
    /// How it ended.
    pub kind: ExitKind,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ExitKind::Returned => write!(f, "{} ended unexpectedly", self.name),
            ExitKind::Panicked(msg) => write!(f, "{} panicked: {msg}", self.name),
        }
    }
}

/// The sending side: every handle holds a clone and reports its own unexpected end.
#[derive(Debug, Clone)]
pub struct Supervisor {
    tx: mpsc::UnboundedSender<Exit>,
    /// Set when teardown begins ([`Supervisor::stopping`]): from then on an owner may end
    /// because another was stopped before it (a channel's other side gone), and that is not
    /// a fault.
    stopping: Arc<AtomicBool>,
}

/// The receiving side, held by the node's role loop.
#[derive(Debug)]
pub struct Exits {
    rx: mpsc::UnboundedReceiver<Exit>,
}

impl Supervisor {
    /// A supervisor and the receiver of its reports.
    pub fn new() -> (Supervisor, Exits) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stopping = Arc::new(AtomicBool::new(false));
        (Supervisor { tx, stopping }, Exits { rx })
    }

    /// Teardown has begun: an owner that returns from now on is not reported (a panic still
    /// is).
    pub fn stopping(&self) {
        self.stopping.store(true, Relaxed);
    }

    fn report(&self, name: &'static str, kind: ExitKind) {
        if kind == ExitKind::Returned && self.stopping.load(Relaxed) {
            tracing::debug!(owner = name, "ended during teardown");
            return;
        }
        let exit = Exit { name, kind };
        tracing::error!(owner = name, "{exit}; the daemon stops");
        // No receiver: the node is already stopping.
        let _ = self.tx.send(exit);
    }
}

impl Exits {
    /// The next unexpected end. Never resolves while none happens (the node itself holds a
    /// [`Supervisor`], so the channel never closes under it). Cancel-safe.
    pub async fn next(&mut self) -> Exit {
        match self.rx.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
}

/// A panic payload's message, if it is a string (as `panic!` makes it).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Polls a future inside `catch_unwind`: a panic ends it with `Err(message)`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(&*payload))),
        }
    }
}

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
    /// Spawns `task(shutdown)` on the current runtime, under `supervisor`: if it returns
    /// before its stop is asked for, or panics, the supervisor hears of it.
    pub fn spawn<F>(
        name: &'static str,
        supervisor: &Supervisor,
        task: impl FnOnce(Shutdown) -> F,
    ) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        let asked = Shutdown { rx: rx.clone() };
        let fut = CatchUnwind(Box::pin(task(Shutdown { rx })));
        let supervisor = supervisor.clone();
        let join = tokio::spawn(async move {
            match fut.await {
                // Asked, or its handle dropped (an early error return of whoever spawned it).
                Ok(()) if asked.is_requested() || asked.rx.has_changed().is_err() => {}
                Ok(()) => supervisor.report(name, ExitKind::Returned),
                Err(msg) => supervisor.report(name, ExitKind::Panicked(msg)),
            }
        });
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
        supervisor: &Supervisor,
        body: impl FnOnce(StopFlag) + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::start(name, supervisor, false, body)
    }

    /// As [`ThreadHandle::spawn`], for a thread that may block without a timeout: stopping it
    /// also interrupts it with [`WAKE_SIGNAL`] (see the module docs).
    pub fn spawn_interruptible(
        name: &'static str,
        supervisor: &Supervisor,
        body: impl FnOnce(StopFlag) + Send + 'static,
    ) -> std::io::Result<Self> {
        install_wake_handler()?;
        Self::start(name, supervisor, true, body)
    }

    fn start(
        name: &'static str,
        supervisor: &Supervisor,
        interrupt: bool,
        body: impl FnOnce(StopFlag) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = StopFlag(Arc::new(AtomicBool::new(false)));
        let flag = stop.clone();
        let asked = stop.clone();
        let supervisor = supervisor.clone();
        let join = std::thread::Builder::new()
            .name(name.into())
            .spawn(
                move || match std::panic::catch_unwind(AssertUnwindSafe(|| body(flag))) {
                    Ok(()) if asked.is_set() => {}
                    Ok(()) => supervisor.report(name, ExitKind::Returned),
                    Err(payload) => {
                        supervisor.report(name, ExitKind::Panicked(panic_message(&*payload)));
                    }
                },
            )?;
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
        let (sup, mut exits) = Supervisor::new();
        let t = TaskHandle::spawn("test", &sup, |mut s| async move { s.requested().await });
        let stopped = tokio::time::timeout(Duration::from_secs(1), t.stop(STOP_WAIT))
            .await
            .unwrap();
        assert!(stopped);
        // Asked to stop: nothing to report.
        let none = tokio::time::timeout(Duration::from_millis(50), exits.next()).await;
        assert!(none.is_err(), "{none:?}");
    }

    async fn first_exit(exits: &mut Exits) -> Exit {
        tokio::time::timeout(Duration::from_secs(2), exits.next())
            .await
            .expect("the supervisor heard of it")
    }

    /// The Raft task of issue 11: a panic inside raft-rs killed the task and left the
    /// process up. Now the supervisor hears of it, by name.
    #[tokio::test]
    async fn a_panicking_task_is_reported() {
        let (sup, mut exits) = Supervisor::new();
        let _t = TaskHandle::spawn("raft", &sup, |_| async move {
            tokio::task::yield_now().await;
            panic!("to_commit 99 is out of range");
        });
        let e = first_exit(&mut exits).await;
        assert_eq!(e.name, "raft");
        assert_eq!(
            e.kind,
            ExitKind::Panicked("to_commit 99 is out of range".into())
        );
    }

    /// In teardown an owner may end because one stopped before it closed its channel.
    #[tokio::test]
    async fn an_end_during_teardown_is_not_reported() {
        let (sup, mut exits) = Supervisor::new();
        sup.stopping();
        let _t = TaskHandle::spawn("syn-recv answers", &sup, |_| async move {});
        let none = tokio::time::timeout(Duration::from_millis(100), exits.next()).await;
        assert!(none.is_err(), "{none:?}");
    }

    #[tokio::test]
    async fn a_task_that_returns_unasked_is_reported() {
        let (sup, mut exits) = Supervisor::new();
        let _t = TaskHandle::spawn("bus", &sup, |_| async move {});
        let e = first_exit(&mut exits).await;
        assert_eq!((e.name, e.kind), ("bus", ExitKind::Returned));
    }

    #[tokio::test]
    async fn a_thread_that_panics_or_returns_unasked_is_reported() {
        let (sup, mut exits) = Supervisor::new();
        let _a = ThreadHandle::spawn("tdsc-load", &sup, |_| panic!("sampler broke")).unwrap();
        let e = first_exit(&mut exits).await;
        assert_eq!(e.name, "tdsc-load");
        assert_eq!(e.kind, ExitKind::Panicked("sampler broke".into()));
        let _b = ThreadHandle::spawn("tdsc-member", &sup, |_| {}).unwrap();
        let e = first_exit(&mut exits).await;
        assert_eq!((e.name, e.kind), ("tdsc-member", ExitKind::Returned));
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
        let (sup, _exits) = Supervisor::new();
        let t = ThreadHandle::spawn_interruptible("test-pipe", &sup, move |stop| {
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
