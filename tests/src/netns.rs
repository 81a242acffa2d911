//! Network namespaces: create and delete them with `ip netns`, run commands in them, and run
//! Rust closures in them on a dedicated thread.
//!
//! A namespace made with `ip netns add NAME` is pinned at `/run/netns/NAME`. `setns(2)` with
//! `CLONE_NEWNET` moves only the calling *thread*; every socket that thread then creates
//! belongs to the namespace for its whole life, even if used from elsewhere. The helpers here
//! therefore always use a fresh thread and never move a thread back.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Where `ip netns` pins namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot open namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setns into {name} failed")]
    Setns {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("thread running in namespace {name} panicked")]
    Panicked { name: String },
}

/// Path of a pinned namespace.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(name)
}

/// Whether a namespace of that name is pinned.
pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Runs a program to completion and fails with its stderr if it exits non-zero.
pub fn run<I, S>(program: &str, args: I) -> Result<Output, NetnsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let output = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        let command = std::iter::once(program.to_owned())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        Err(NetnsError::Command {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// `ip ARGS...`
pub fn ip<I, S>(args: I) -> Result<Output, NetnsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run("ip", args)
}

/// `ip netns exec NS PROGRAM ARGS...`, to completion; returns stdout.
pub fn exec<I, S>(ns: &str, program: &str, args: I) -> Result<String, NetnsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut all: Vec<std::ffi::OsString> = vec!["netns".into(), "exec".into(), ns.into()];
    all.push(program.into());
    all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    let out = ip(all)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates a namespace and brings its loopback up.
pub fn add(name: &str) -> Result<(), NetnsError> {
    ip(["netns", "add", name])?;
    ip(["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Kills every process still in the namespace (SIGKILL), then deletes it. Deleting the last
/// reference destroys its interfaces, and with them the peers of its veths.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    kill_all(name)?;
    ip(["netns", "del", name])?;
    Ok(())
}

/// SIGKILLs every process whose network namespace is `name` (`ip netns pids`).
pub fn kill_all(name: &str) -> Result<(), NetnsError> {
    let out = ip(["netns", "pids", name])?;
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<libc::pid_t>() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid was just listed as
            // living in a namespace this lab created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    Ok(())
}

/// Sets a sysctl inside the namespace.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    exec(ns, "sysctl", ["-q", "-w", &format!("{key}={value}")])?;
    Ok(())
}

/// Moves the calling thread into the namespace. Only call on a thread that is thrown away
/// afterwards (see the module docs).
fn enter(name: &str) -> Result<(), NetnsError> {
    let path = netns_path(name);
    let file = File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    // SAFETY: the fd is valid for the duration of the call (owned by `file`); setns(2) only
    // changes the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns {
            name: name.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs `f` inside namespace `name` on a new thread and waits for it. `f` may borrow.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Panicked {
            name: name.to_owned(),
        })?
    })
}

/// Starts `f` inside namespace `name` on a new thread; join the handle for its result.
pub fn spawn_in<T, F>(name: &str, f: F) -> std::thread::JoinHandle<Result<T, NetnsError>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.to_owned();
    std::thread::spawn(move || {
        enter(&name)?;
        Ok(f())
    })
}

/// Whether this process may create namespaces (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// True when a namespace test can run (root). Otherwise it prints a SKIP line and returns
/// false, except under CI (`CI=true`), where a test that cannot do its work must fail: it
/// panics instead, so the suite can never pass on tests that did not run.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if in_ci() {
        panic!("{test}: needs root to create network namespaces, and CI=true forbids skipping");
    }
    eprintln!("SKIP {test}: needs root to create network namespaces");
    false
}

/// Whether this runs under CI (`CI=true`), where no test may skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| v == "true")
}
