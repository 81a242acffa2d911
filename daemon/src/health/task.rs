//! The health task: runs every check on its interval, keeps their rise/fall state, and
//! writes the verdict where the rest of the daemon reads it.
//!
//! It is the one owner of the checks' state. It writes this node's `unhealthy` flag in the
//! view (the master's dispatcher reads it for its own slot; the report task announces it to
//! every node), wakes the report task on every change so the cluster hears it at once rather
//! than at the next report interval, and publishes a [`HealthSnapshot`] for `status` and
//! `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cluster::view::ClusterView;
use crate::health::probe;
use crate::health::spec::{CheckSpec, Probe, TimingChange};
use crate::health::state::{node_healthy, Change, CheckState, Verdict};
use crate::shutdown::Shutdown;

/// One check as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckSnapshot {
    pub name: String,
    /// `tcp 127.0.0.1:80`, `http 127.0.0.1:80/healthz`, `command /usr/bin/x`.
    pub probe: String,
    /// None until the first probe finishes.
    pub passing: Option<bool>,
    pub last_failure: Option<String>,
    pub probes: u64,
    pub failures: u64,
    /// Times the check turned from passing to failing.
    pub downs: u64,
    /// Its timing as it runs now (the configuration's, or a `tdscctl health set`'s).
    #[serde(default)]
    pub interval_ms: u64,
    #[serde(default)]
    pub timeout_ms: u64,
    #[serde(default)]
    pub rise: u32,
    #[serde(default)]
    pub fall: u32,
}

impl CheckSnapshot {
    fn new(spec: &CheckSpec, state: Option<&CheckState>, downs: u64) -> Self {
        CheckSnapshot {
            name: spec.name.clone(),
            probe: describe(&spec.probe),
            passing: match state.map(CheckState::verdict) {
                None | Some(Verdict::Unknown) => None,
                Some(v) => Some(v == Verdict::Passing),
            },
            last_failure: state.and_then(|s| s.last_failure.clone()),
            probes: state.map_or(0, |s| s.probes),
            failures: state.map_or(0, |s| s.failures),
            downs,
            interval_ms: millis(spec.interval),
            timeout_ms: millis(spec.timeout),
            rise: spec.rise,
            fall: spec.fall,
        }
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A change of the running checks' timing (`tdscctl health set`), answered with what now
/// runs or why nothing changed.
#[derive(Debug)]
pub struct HealthCommand {
    /// One check by name; `None`: every check.
    pub check: Option<String>,
    pub change: TimingChange,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// Commands waiting for the health task; one operator types them.
pub const COMMAND_CAPACITY: usize = 4;

/// This node's health as its health task last published it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Every check passes (true with no checks).
    pub healthy: bool,
    pub checks: Vec<CheckSnapshot>,
}

impl HealthSnapshot {
    /// Before any probe: healthy only without checks.
    pub fn initial(specs: &[CheckSpec]) -> Self {
        HealthSnapshot {
            healthy: specs.is_empty(),
            checks: specs
                .iter()
                .map(|s| CheckSnapshot::new(s, None, 0))
                .collect(),
        }
    }
}

fn describe(p: &Probe) -> String {
    match p {
        Probe::Tcp { target } => format!("tcp {target}"),
        Probe::Http { target, path, .. } => format!("http {target}{path}"),
        Probe::Command { argv } => format!("command {}", argv.join(" ")),
    }
}

/// The health task's inputs.
#[derive(Debug)]
pub struct HealthTask {
    pub specs: Vec<CheckSpec>,
    pub view: Arc<ClusterView>,
    /// Wakes the report task.
    pub poke: Arc<Notify>,
    pub publish: watch::Sender<HealthSnapshot>,
    /// `tdscctl health set` from the control socket.
    pub commands: mpsc::Receiver<HealthCommand>,
}

/// The new specs for `cmd`, all or nothing: the indices changed and their new specs.
fn retime(
    specs: &[Arc<CheckSpec>],
    check: Option<&str>,
    change: &TimingChange,
) -> Result<Vec<(usize, CheckSpec)>, String> {
    if specs.is_empty() {
        return Err("this node has no health checks ([[health.check]])".into());
    }
    let chosen: Vec<usize> = match check {
        None => (0..specs.len()).collect(),
        Some(name) => {
            let i = specs.iter().position(|s| s.name == name).ok_or_else(|| {
                let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "no health check named {name:?} (checks: {})",
                    names.join(", ")
                )
            })?;
            vec![i]
        }
    };
    chosen
        .into_iter()
        .map(|i| change.apply(&specs[i]).map(|s| (i, s)))
        .collect()
}

fn describe_timing(s: &CheckSpec) -> String {
    format!(
        "check {} every {} ms, timeout {} ms, rise {}, fall {} (detection window {} ms)",
        s.name,
        s.interval.as_millis(),
        s.timeout.as_millis(),
        s.rise,
        s.fall,
        s.detection_window().as_millis()
    )
}

impl HealthTask {
    /// Marks this node unhealthy until its checks pass (a node whose application has not
    /// answered yet takes no connections). Call before the report task starts.
    pub fn hold(&self) {
        if !self.specs.is_empty() {
            self.view.own().unhealthy.store(true, Relaxed);
        }
    }

    /// Runs the checks until `shutdown` (without checks: only waits for it); the first probe
    /// of each runs at once.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut specs: Vec<Arc<CheckSpec>> = self.specs.iter().cloned().map(Arc::new).collect();
        if specs.is_empty() {
            // Without checks: refuse commands until the stop (the supervisor treats a task
            // that ends on its own as a failure).
            loop {
                tokio::select! {
                    Some(cmd) = self.commands.recv() => {
                        let answer = retime(&specs, cmd.check.as_deref(), &cmd.change);
                        let _ = cmd.reply.send(answer.map(|_| String::new()));
                    }
                    () = shutdown.requested() => return,
                }
            }
        }
        let mut states: Vec<CheckState> = specs
            .iter()
            .map(|s| CheckState::new(s.rise, s.fall))
            .collect();
        let mut downs = vec![0u64; specs.len()];
        let mut due = vec![Instant::now(); specs.len()];
        let mut in_flight = vec![false; specs.len()];
        let mut probes: JoinSet<Result<(), String>> = JoinSet::new();
        // Which check each probe task runs (a task that panicked names only its id).
        let mut running: HashMap<tokio::task::Id, usize> = HashMap::new();
        let mut healthy = false;
        loop {
            let now = Instant::now();
            for (i, spec) in specs.iter().enumerate() {
                if !in_flight[i] && due[i] <= now {
                    in_flight[i] = true;
                    due[i] = now + spec.interval;
                    let spec = Arc::clone(spec);
                    let task =
                        probes.spawn(async move { probe::run(&spec.probe, spec.timeout).await });
                    running.insert(task.id(), i);
                }
            }
            let next = (0..specs.len())
                .filter(|&i| !in_flight[i])
                .map(|i| due[i])
                .min();
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(cmd) = self.commands.recv() => {
                    let answer = retime(&specs, cmd.check.as_deref(), &cmd.change).map(|changed| {
                        let now = Instant::now();
                        let mut lines = Vec::with_capacity(changed.len());
                        for (i, spec) in changed {
                            states[i].set_runs(spec.rise, spec.fall);
                            due[i] = due[i].min(now + spec.interval);
                            lines.push(describe_timing(&spec));
                            tracing::info!(timing = %lines[lines.len() - 1], "health check retimed");
                            specs[i] = Arc::new(spec);
                        }
                        lines.join("; ")
                    });
                    if answer.is_ok() {
                        self.publish.send_replace(snapshot(healthy, &specs, &states, &downs));
                    }
                    let _ = cmd.reply.send(answer);
                }
                Some(done) = probes.join_next_with_id(), if !probes.is_empty() => {
                    let (id, result) = match done {
                        Ok((id, r)) => (id, r),
                        Err(e) => (e.id(), Err(format!("probe task failed: {e}"))),
                    };
                    let Some(i) = running.remove(&id) else { continue };
                    in_flight[i] = false;
                    let reason = result.as_ref().err().cloned();
                    match states[i].record(result) {
                        Change::Down => {
                            downs[i] += 1;
                            tracing::warn!(
                                check = %specs[i].name,
                                reason = reason.as_deref().unwrap_or(""),
                                "health check failing"
                            );
                        }
                        Change::Up => tracing::info!(check = %specs[i].name, "health check passing"),
                        Change::None => {}
                    }
                    let now_healthy = node_healthy(&states);
                    if now_healthy != healthy {
                        healthy = now_healthy;
                        self.view.own().unhealthy.store(!healthy, Relaxed);
                        self.poke.notify_one();
                        if healthy {
                            tracing::info!("every health check passes: taking new connections");
                        } else {
                            tracing::warn!("a health check fails: no new connections for this node");
                        }
                    }
                    self.publish.send_replace(snapshot(healthy, &specs, &states, &downs));
                }
                () = sleep => {}
                () = shutdown.requested() => {
                    probes.abort_all();
                    return;
                }
            }
        }
    }
}

fn snapshot(
    healthy: bool,
    specs: &[Arc<CheckSpec>],
    states: &[CheckState],
    downs: &[u64],
) -> HealthSnapshot {
    HealthSnapshot {
        healthy,
        checks: specs
            .iter()
            .zip(states)
            .zip(downs)
            .map(|((s, st), &downs)| CheckSnapshot::new(s, Some(st), downs))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(name: &str) -> Arc<CheckSpec> {
        Arc::new(CheckSpec {
            name: name.to_owned(),
            probe: Probe::Tcp {
                target: "127.0.0.1:80".parse().unwrap(),
            },
            interval: Duration::from_millis(2000),
            timeout: Duration::from_millis(1000),
            rise: 2,
            fall: 3,
        })
    }

    #[test]
    fn a_retiming_names_its_checks_and_is_all_or_nothing() {
        let specs = [spec("web"), spec("db")];
        let fall = TimingChange {
            fall: Some(2),
            ..TimingChange::default()
        };
        let all = retime(&specs, None, &fall).unwrap();
        assert_eq!(all.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1]);
        assert!(all.iter().all(|(_, s)| s.fall == 2 && s.rise == 2));
        let one = retime(&specs, Some("db"), &fall).unwrap();
        assert_eq!((one.len(), one[0].0), (1, 1));
        let e = retime(&specs, Some("cache"), &fall).unwrap_err();
        assert!(
            e.contains("no health check named \"cache\" (checks: web, db)"),
            "{e}"
        );
        let short = TimingChange {
            interval_ms: Some(500),
            ..TimingChange::default()
        };
        let e = retime(&specs, None, &short).unwrap_err();
        assert!(e.contains("would exceed its interval"), "{e}");
        let e = retime(&[], None, &fall).unwrap_err();
        assert!(e.contains("no health checks"), "{e}");
    }

    #[test]
    fn a_snapshot_shows_the_timing_that_runs() {
        let s = CheckSnapshot::new(&spec("web"), None, 0);
        assert_eq!(
            (s.interval_ms, s.timeout_ms, s.rise, s.fall, s.passing),
            (2000, 1000, 2, 3, None)
        );
        assert!(describe_timing(&spec("web")).contains("detection window 7000 ms"));
    }
}
