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
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cluster::view::ClusterView;
use crate::health::probe;
use crate::health::spec::{CheckSpec, Probe};
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
}

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
                .map(|s| CheckSnapshot {
                    name: s.name.clone(),
                    probe: describe(&s.probe),
                    passing: None,
                    last_failure: None,
                    probes: 0,
                    failures: 0,
                    downs: 0,
                })
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
    pub async fn run(self, mut shutdown: Shutdown) {
        if self.specs.is_empty() {
            // The supervisor treats a task that ends on its own as a failure.
            shutdown.requested().await;
            return;
        }
        let specs: Vec<Arc<CheckSpec>> = self.specs.iter().cloned().map(Arc::new).collect();
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
                    self.publish.send_replace(HealthSnapshot {
                        healthy,
                        checks: specs
                            .iter()
                            .zip(&states)
                            .zip(&downs)
                            .map(|((s, st), &downs)| CheckSnapshot {
                                name: s.name.clone(),
                                probe: describe(&s.probe),
                                passing: match st.verdict() {
                                    Verdict::Unknown => None,
                                    v => Some(v == Verdict::Passing),
                                },
                                last_failure: st.last_failure.clone(),
                                probes: st.probes,
                                failures: st.failures,
                                downs,
                            })
                            .collect(),
                    });
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
