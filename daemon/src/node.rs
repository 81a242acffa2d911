//! One node's life: safe state first, then host setup, then the data paths, then follow the
//! role signal until told to stop; on the way out, undo everything in reverse.
//!
//! Start-up order matters for safety:
//! 1. The **member** ruleset goes in before anything else: from that moment the node accepts
//!    no client SYN and sends no RST for foreign segments, whatever happens next.
//! 2. Sysctls, cluster MAC and VIP.
//! 3. The receive thread (member path) and the queue thread (master path, idle until master).
//! 4. The role signal: becoming master sets the master flag and *then* installs the queue
//!    rule; becoming member installs the drop rule and *then* clears the flag, so at no
//!    instant does the node both queue and not dispatch, or accept SYNs unqueued.
//!    Before either, a node that becomes master adopts the replicated SYN-forward records and
//!    the cluster's SYN-RECV sockets (`crate::cluster::takeover`): the master thread gets them as a
//!    command it processes before the first SYN the new master ruleset queues.
//!
//! Shutdown removes the VIP before the ruleset, so there is no window in which the node holds
//! the VIP without the rules that keep it from accepting SYNs.
//!
//! SIGTERM or SIGINT first stops the node *gracefully* ([`graceful_stop`]), so that no
//! connection is lost:
//! 1. it announces `draining` in its reports: the master gives it no new connections;
//! 2. under Raft it resigns (lease revoked for good, member ruleset, master flag off) and
//!    only then, if it was the leader, hands leadership to an up-to-date live follower and
//!    waits a bounded time for the new leader (the order is argued in `tdsc_election`,
//!    *Leadership transfer*);
//! 3. it waits until its own connections on the VIP are gone, or `[shutdown]
//!    drain_timeout_ms` has passed; the member path keeps re-injecting forwards meanwhile;
//! 4. then it tears down as below.
//!
//! A second SIGTERM or SIGINT skips the waits of 2 and 3 (not the resignation).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tdsc_election::{Leadership, Role, RoleSignal, StaticElection};
use tdsc_rules::{ClusterSpec, Firewall, HostFacts, QueueBackend, StaticHash};
use tokio::sync::watch;

use crate::cluster::membership::Members;
use crate::cluster::raft::{MemberRequest, MembershipLink, RaftHandle, RaftTask};
use crate::cluster::report::{ReportCounters, Reporter};
use crate::cluster::takeover::{RecordStats, Replica, Takeover};
use crate::cluster::view::{ClusterView, Counters};
use crate::config::{Config, ElectionMode, PolicyName};
use crate::datapath::dispatch::Dispatcher;
use crate::datapath::queue::{MasterCommand, MasterPath, RoleCell};
use crate::datapath::receive::MemberPath;
use crate::datapath::records::SynRecords;
use crate::host::setup::HostSetup;

/// Seed of the static hash for undispatched flows; any fixed value, the same on every node.
pub const STATIC_HASH_SEED: u32 = 0x7464_7363; // "tdsc"

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("firewall")]
    Firewall(#[from] tdsc_rules::Error),
    #[error("host setup")]
    Host(#[from] crate::host::setup::HostError),
    #[error("master path")]
    Master(#[from] crate::datapath::queue::MasterError),
    #[error("cannot open the forward receive or inject socket")]
    Member(#[source] std::io::Error),
    #[error("cannot bind the report socket")]
    Report(#[source] std::io::Error),
    #[error("control socket")]
    Control(#[from] crate::admin::server::ControlError),
    #[error("raft election")]
    Raft(#[from] crate::cluster::raft::RaftTaskError),
    #[error("[threads] data_path_cpu")]
    Affinity(#[from] crate::datapath::affinity::AffinityError),
    #[error("{} errors during shutdown: {}", .0.len(), .0.join("; "))]
    Shutdown(Vec<String>),
}

/// What the control socket and the tasks share.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub leadership: watch::Receiver<Leadership>,
    pub view: Arc<ClusterView>,
    pub counters: Arc<Counters>,
    pub reports: Arc<ReportCounters>,
    pub role: Arc<RoleCell>,
    pub queue_backend: &'static str,
    pub epoch: Instant,
    policy: AtomicU8,
    /// A second netlink socket just for reading counters, so status never waits on the role
    /// task's batch.
    counter_fw: Mutex<Option<Firewall>>,
    pub master_commands: Mutex<mpsc::Sender<MasterCommand>>,
    /// The cluster's current members as this node has applied them.
    pub members: watch::Receiver<Members>,
    /// `tdscctl node add|remove` go to the Raft task here; None under a static election.
    pub member_requests: Option<tokio::sync::mpsc::Sender<MemberRequest>>,
    /// Replication and takeover figures (`crate::cluster::takeover`).
    pub records: Arc<RecordStats>,
    /// This node's replica of the master's records.
    pub replica: Arc<Mutex<Replica>>,
}

impl Shared {
    pub fn policy_name(&self) -> PolicyName {
        PolicyName::ALL[usize::from(self.policy.load(Relaxed)) % PolicyName::ALL.len()].1
    }

    /// Records the new policy and hands the master thread a fresh instance of it.
    pub fn set_policy(&self, name: PolicyName) -> Result<(), String> {
        let tx = self
            .master_commands
            .lock()
            .map_err(|_| "master command channel poisoned".to_owned())?;
        tx.send(MasterCommand::SetPolicy(crate::datapath::policy::build(
            name,
        )))
        .map_err(|_| "the master thread has stopped".to_owned())?;
        let index = PolicyName::ALL
            .iter()
            .position(|(_, p)| *p == name)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(0);
        self.policy.store(index, Relaxed);
        Ok(())
    }

    pub fn firewall_counter(&self) -> Option<u64> {
        let mut g = self.counter_fw.lock().ok()?;
        g.as_mut()?.foreign_forward_drops().ok()
    }

    /// Every counting drop rule of the installed ruleset (one rule dump).
    pub fn ruleset_drops(&self) -> Option<tdsc_rules::RuleDrops> {
        let mut g = self.counter_fw.lock().ok()?;
        g.as_mut()?.drop_counters().ok()
    }
}

/// The ruleset's cluster description for the configured (bootstrap) nodes.
pub fn cluster_spec(cfg: &Config) -> ClusterSpec {
    cluster_spec_for(cfg, &Members::bootstrap(cfg))
}

/// The ruleset's cluster description for the current members: forwards are accepted from
/// their addresses, and this node's static-hash bucket is its place among them (none when
/// it is not a member).
pub fn cluster_spec_for(cfg: &Config, members: &Members) -> ClusterSpec {
    let (index, count) = members.static_hash(cfg.node_id);
    ClusterSpec {
        vip: cfg.vip,
        tcp_ports: cfg.tcp_ports.clone(),
        client_interface: cfg.client_interface.clone(),
        cluster_interface: cfg.cluster_interface.clone(),
        members: members.addresses(),
        queue_num: cfg.queue_num,
        egress_mac: cfg.egress_mac(),
        static_hash: StaticHash {
            index,
            count,
            seed: STATIC_HASH_SEED,
        },
    }
}

fn rules_role(r: Role) -> tdsc_rules::Role {
    match r {
        Role::Master => tdsc_rules::Role::Master,
        Role::Member => tdsc_rules::Role::Member,
    }
}

fn apply_role(
    fw: &mut Firewall,
    role: Role,
    spec: &ClusterSpec,
    facts: &HostFacts,
) -> Result<(), tdsc_rules::Error> {
    let rs = tdsc_rules::ruleset(rules_role(role), spec, facts);
    fw.apply(&rs)?;
    fw.verify(&rs)
}

/// Runs the node until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), NodeError> {
    let epoch = Instant::now();
    let spec = cluster_spec(&cfg);

    // 1. Safe state before anything else.
    let mut fw = Firewall::open()?;
    let facts = fw.probe()?;
    apply_role(&mut fw, Role::Member, &spec, &facts)?;
    tracing::info!(backend = ?facts.queue, "member ruleset installed");

    // 2. Host.
    let mut host = match HostSetup::apply(&cfg) {
        Ok(h) => h,
        Err(e) => {
            let _ = fw.remove();
            return Err(e.into());
        }
    };
    let result = serve(cfg, epoch, spec, &mut fw, facts).await;

    // Undo in reverse: VIP (and MAC, sysctls) first, then the ruleset.
    let mut errors = Vec::new();
    if let Err(e) = host.undo() {
        errors.push(e.to_string());
    }
    if let Err(e) = fw.remove() {
        errors.push(format!("removing ruleset: {e}"));
    }
    result?;
    if errors.is_empty() {
        Ok(())
    } else {
        Err(NodeError::Shutdown(errors))
    }
}

async fn serve(
    cfg: Config,
    epoch: Instant,
    spec: ClusterSpec,
    fw: &mut Firewall,
    facts: HostFacts,
) -> Result<(), NodeError> {
    let view = Arc::new(ClusterView::new(&cfg.nodes, cfg.node_id));
    view.set_weights(&cfg.weights);
    let counters = Arc::new(Counters::default());
    let role = Arc::new(RoleCell::default());
    let stop = Arc::new(AtomicBool::new(false));

    // 3. Data paths.
    let member = MemberPath::open(
        cfg.self_address(),
        &cfg.cluster_interface,
        cfg.vip,
        cfg.tcp_ports.clone(),
        view.clone(),
        counters.clone(),
        role.clone(),
        stop.clone(),
    )
    .map_err(NodeError::Member)?;
    let cpu = cfg.data_path_cpu;
    if let Some(c) = cpu {
        crate::datapath::affinity::check(c)?;
    }
    let member_thread = std::thread::Builder::new()
        .name("tdsc-member".into())
        .spawn(move || {
            pin_data_path_thread(cpu);
            member.run()
        })
        .map_err(NodeError::Member)?;

    let load_thread = crate::host::load::spawn(
        cfg.load_source.clone(),
        crate::host::load::sample_period(cfg.report_interval),
        view.clone(),
        stop.clone(),
    )
    .map_err(NodeError::Member)?;

    let (cmd_tx, cmd_rx) = mpsc::channel();
    let window_ms = u64::try_from(cfg.syn_record_window.as_millis()).unwrap_or(u64::MAX);
    let mut dispatcher = Dispatcher::new(
        crate::datapath::policy::build(cfg.policy),
        SynRecords::new(cfg.syn_record_capacity, window_ms),
        cfg.nodes.len(),
    );
    // Records are replicated through Raft; the hand-off is preallocated here, once.
    let record_stats = Arc::new(RecordStats::default());
    let replica = Arc::new(Mutex::new(Replica::new(cfg.syn_record_capacity, window_ms)));
    let (handoff_tx, handoff_rx) = mpsc::sync_channel(crate::cluster::takeover::HANDOFF_CAPACITY);
    if matches!(cfg.election, ElectionMode::Raft { .. }) {
        dispatcher = dispatcher.with_handoff(handoff_tx);
    }
    let master = MasterPath::new(
        cfg.queue_num,
        cfg.vip,
        cfg.tcp_ports.clone(),
        cfg.node_id,
        view.clone(),
        counters.clone(),
        role.clone(),
        cmd_rx,
        dispatcher,
    )?;
    // The queue thread blocks in recv for the life of the process; it holds no resources
    // that need orderly release (the kernel unbinds the queue when the socket closes).
    std::thread::Builder::new()
        .name("tdsc-master".into())
        .spawn(move || {
            pin_data_path_thread(cpu);
            master.run()
        })
        .map_err(NodeError::Member)?;

    // Election. Raft messages share the report socket; the report loop hands them over.
    let signal = Arc::new(match cfg.election {
        ElectionMode::Static { master } => {
            role.lease_until_ms.store(u64::MAX, Relaxed);
            StaticElection {
                node_id: cfg.node_id,
                master,
            }
            .start()
        }
        ElectionMode::Raft { .. } => RoleSignal::new(),
    });
    let mut leadership = signal.subscribe();
    let (raft_tx, raft_rx) = tokio::sync::mpsc::channel(crate::cluster::raft::INBOX_CAPACITY);
    let (members_tx, mut members_rx) = watch::channel(Members::bootstrap(&cfg));
    let (req_tx, req_rx) = tokio::sync::mpsc::channel(crate::cluster::raft::REQUEST_CAPACITY);
    let (settings_tx, settings_rx) = watch::channel(crate::cluster::raft::Settings::new());
    let member_requests = matches!(cfg.election, ElectionMode::Raft { .. }).then_some(req_tx);
    let (query_tx, query_rx) =
        tokio::sync::mpsc::channel(crate::cluster::takeover::QUERY_CHANNEL_CAPACITY);
    let (answer_tx, answer_rx) =
        tokio::sync::mpsc::channel(crate::cluster::takeover::QUERY_CHANNEL_CAPACITY);

    let reports = Arc::new(ReportCounters::default());
    let reporter = Reporter {
        node_id: cfg.node_id,
        vip: cfg.vip,
        port: cfg.control_port,
        interval: cfg.report_interval,
        dead_after: cfg.dead_after,
        view: view.clone(),
        role: role.clone(),
        counters: reports.clone(),
        epoch,
        raft_inbox: matches!(cfg.election, ElectionMode::Raft { .. }).then_some(raft_tx),
        membership: member_requests.clone().map(|tx| (members_rx.clone(), tx)),
        syn_recv_queries: Some(query_tx),
        syn_recv_answers: Some(answer_tx),
    };
    let sock = Arc::new(reporter.bind().await.map_err(NodeError::Report)?);
    let mut raft_handle = None;
    let raft_task = match &cfg.election {
        ElectionMode::Raft { settings, data_dir } => {
            let task = RaftTask::open(
                cfg.node_id,
                &cfg.nodes,
                cfg.control_port,
                *settings,
                data_dir,
                sock.clone(),
                raft_rx,
                signal.clone(),
                role.clone(),
            )?
            .with_membership(MembershipLink {
                config: cfg.clone(),
                view: view.clone(),
                members: members_tx,
                requests: req_rx,
                settings: settings_tx,
            })
            .with_records(crate::cluster::raft::RecordsLink {
                handoff: handoff_rx,
                replica: replica.clone(),
                stats: record_stats.clone(),
                view: view.clone(),
                replicate: cfg.replicate_records,
                batch: Vec::with_capacity(crate::cluster::takeover::MAX_RECORDS_PER_BATCH),
            });
            raft_handle = Some(task.handle());
            Some(tokio::spawn(task.run()))
        }
        ElectionMode::Static { .. } => None,
    };
    let answer_task = tokio::spawn(crate::cluster::takeover::answer_queries(
        query_rx,
        sock.clone(),
        cfg.node_id,
        cfg.vip,
        role.clone(),
        record_stats.clone(),
    ));
    let mut takeover = Takeover::new(
        cfg.node_id,
        cfg.vip,
        cfg.control_port,
        cfg.syn_recv_wait,
        sock.clone(),
        view.clone(),
        role.clone(),
        replica.clone(),
        record_stats.clone(),
        answer_rx,
        cmd_tx.clone(),
    );
    takeover.reconcile = cfg.reconcile_syn_recv;
    let report_task = tokio::spawn(reporter.run(sock));

    let listener = crate::admin::server::bind(&cfg.control_socket).await?;
    let socket_path = cfg.control_socket.clone();
    let shared = Arc::new(Shared {
        policy: AtomicU8::new(
            u8::try_from(
                PolicyName::ALL
                    .iter()
                    .position(|(_, p)| *p == cfg.policy)
                    .unwrap_or(0),
            )
            .unwrap_or(0),
        ),
        config: cfg,
        leadership: signal.subscribe(),
        view,
        counters,
        reports,
        role: role.clone(),
        queue_backend: match facts.queue {
            QueueBackend::Native => "native",
            QueueBackend::Compat => "compat",
        },
        epoch,
        counter_fw: Mutex::new(Firewall::open().ok()),
        master_commands: Mutex::new(cmd_tx),
        members: members_rx.clone(),
        member_requests,
        records: record_stats,
        replica,
    });
    let control_task = tokio::spawn(crate::admin::server::serve(listener, shared.clone()));
    let settings_task = tokio::spawn(follow_settings(settings_rx, shared.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(NodeError::Member)?;
    let result = follow_roles(
        &signal,
        &mut leadership,
        fw,
        &spec,
        &facts,
        &role,
        &mut term,
        &mut MembershipRules {
            cfg: &shared.config,
            members: &mut members_rx,
        },
        &mut takeover,
    )
    .await;
    // The member set may have changed since start: the rules from here on are for the
    // members now.
    let spec = cluster_spec_for(&shared.config, &members_rx.borrow());
    if result.is_ok() {
        graceful_stop(
            &shared,
            raft_handle.as_ref(),
            &mut leadership,
            fw,
            &spec,
            &facts,
            &mut term,
        )
        .await;
    }

    // Stop taking SYNs before anything else goes: no lease, no election messages, then the
    // member ruleset.
    if let Some(t) = raft_task {
        t.abort();
    }
    role.lease_until_ms.store(0, Relaxed);
    if role.master.load(Relaxed) {
        if let Err(e) = apply_role(fw, Role::Member, &spec, &facts) {
            tracing::error!(error = %e, "could not return to member rules at shutdown");
        }
        role.master.store(false, Relaxed);
    }
    control_task.abort();
    settings_task.abort();
    report_task.abort();
    answer_task.abort();
    stop.store(true, Relaxed);
    let _ = member_thread.join();
    let _ = load_thread.join();
    let _ = std::fs::remove_file(&socket_path);
    drop(shared);
    result
}

/// Applies the cluster-wide settings committed through Raft: today the scheduling policy
/// (`tdscctl policy set`), which then overrides `[scheduler] policy` on every node, a new
/// master and a restarted node included.
async fn follow_settings(
    mut settings: watch::Receiver<crate::cluster::raft::Settings>,
    shared: Arc<Shared>,
) {
    loop {
        let policy = settings
            .borrow_and_update()
            .get(crate::cluster::raft::POLICY_SETTING)
            .cloned();
        if let Some(raw) = policy {
            match std::str::from_utf8(&raw).ok().and_then(PolicyName::parse) {
                Some(name) if name != shared.policy_name() => match shared.set_policy(name) {
                    Ok(()) => tracing::info!(policy = name.as_str(), "cluster policy applied"),
                    Err(e) => tracing::error!(error = %e, "cluster policy not applied"),
                },
                Some(_) => {}
                None => {
                    tracing::error!(value = ?String::from_utf8_lossy(&raw), "committed policy unknown to this daemon; keeping the current one")
                }
            }
        }
        if settings.changed().await.is_err() {
            return;
        }
    }
}

/// Pins the calling data-path thread to `[threads] data_path_cpu`, if set. The CPU was checked
/// at start, so a failure here is unexpected; the thread then runs unpinned.
fn pin_data_path_thread(cpu: Option<usize>) {
    if let Some(c) = cpu {
        match crate::datapath::affinity::pin_current_thread(c) {
            Ok(()) => tracing::info!(cpu = c, "data-path thread pinned"),
            Err(e) => tracing::error!(error = %e, "data-path thread left unpinned"),
        }
    }
}

/// How often the drain wait counts this node's connections.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Steps 1–3 of a graceful stop (see the module docs). Never fails: whatever goes wrong, the
/// teardown that follows still runs.
async fn graceful_stop(
    shared: &Shared,
    raft: Option<&RaftHandle>,
    leadership: &mut watch::Receiver<Leadership>,
    fw: &mut Firewall,
    spec: &ClusterSpec,
    facts: &HostFacts,
    term: &mut tokio::signal::unix::Signal,
) {
    let cfg = &shared.config;
    let view = &shared.view;
    let role = &shared.role;
    let own = &view.nodes[view.self_index];
    // 1. Announce: every report from now on says draining.
    own.draining.store(true, Relaxed);
    tracing::info!(
        drain_timeout_ms = cfg.drain_timeout.as_millis(),
        "stopping gracefully: draining (a second SIGTERM or SIGINT skips the waits)"
    );
    let mut again = std::pin::pin!(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });

    // 2. Stop dispatching for good, then (if leader) hand leadership over.
    if let Some(raft) = raft {
        let old_term = leadership.borrow().term;
        let was_leader = raft.resign().await.unwrap_or(false);
        // The task has stored the revoked lease; now the ruleset and the master flag, both
        // before any MsgTimeoutNow can leave.
        if role.master.load(Relaxed) {
            if let Err(e) = apply_role(fw, Role::Member, spec, facts) {
                tracing::error!(error = %e, "could not return to member rules");
            }
            role.master.store(false, Relaxed);
        }
        if was_leader {
            let candidates: Vec<u64> = view
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, n)| {
                    *i != view.self_index
                        && n.is_present()
                        && n.alive.load(Relaxed)
                        && !n.draining.load(Relaxed)
                })
                .map(|(_, n)| u64::from(n.id()))
                .collect();
            let Some(to) = raft.transfer(candidates).await else {
                tracing::warn!("no live follower to hand leadership to; stopping as leader");
                return drain_unless(cfg, &mut again).await;
            };
            let wait = transfer_wait(cfg);
            let me = cfg.node_id;
            let handed_over = async {
                loop {
                    let l = *leadership.borrow_and_update();
                    if l.term > old_term && l.master_id.is_some_and(|m| m != me) {
                        return l;
                    }
                    if leadership.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                r = tokio::time::timeout(wait, handed_over) => match r {
                    Ok(l) => tracing::info!(to, master = ?l.master_id, term = l.term, "leadership handed over"),
                    Err(_) => tracing::warn!(to, "no new leader within {wait:?}; stopping anyway"),
                },
                _ = &mut again => {
                    tracing::info!("second signal: not waiting for the new leader");
                    return;
                }
            }
        }
    }

    // 3. Wait for this node's own connections to finish.
    drain_unless(cfg, &mut again).await;
}

/// Step 3 of a graceful stop, cut short by `again` (a second signal).
async fn drain_unless(cfg: &Config, again: &mut (impl std::future::Future<Output = ()> + Unpin)) {
    tokio::select! {
        () = drain(&cfg.vip, cfg.drain_timeout, cfg.report_interval) => {}
        () = again => tracing::info!("second signal: not waiting for connections"),
    }
}

/// How long a stopping leader waits for its successor: ten election timeouts (1 s with the
/// defaults), far more than a transfer to a live follower takes.
fn transfer_wait(cfg: &Config) -> Duration {
    match &cfg.election {
        ElectionMode::Raft { settings, .. } => Duration::from_millis(
            settings
                .tick_ms
                .saturating_mul(u64::try_from(settings.election_tick).unwrap_or(u64::MAX))
                .saturating_mul(10),
        ),
        ElectionMode::Static { .. } => Duration::ZERO,
    }
}

/// Waits until no ESTABLISHED or SYN-RECV socket on the VIP is left, or `timeout`.
///
/// The master learns of the drain from this node's next report, and may forward a SYN here
/// until then; so the count is trusted only after two report intervals.
async fn drain(vip: &std::net::IpAddr, timeout: Duration, report_interval: Duration) {
    if timeout.is_zero() {
        return;
    }
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    tokio::time::sleep_until(deadline.min(start + 2 * report_interval + DRAIN_POLL)).await;
    let mut diag = match crate::host::sockdiag::SockDiag::open() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "sock_diag unavailable: not waiting for connections");
            return;
        }
    };
    loop {
        match diag.count(vip) {
            Ok(c) if c.established == 0 && c.syn_recv == 0 => {
                tracing::info!(
                    waited_ms = start.elapsed().as_millis(),
                    "drained: no connection left"
                );
                return;
            }
            Ok(c) if tokio::time::Instant::now() >= deadline => {
                tracing::warn!(
                    established = c.established,
                    syn_recv = c.syn_recv,
                    "drain timeout: stopping with connections still open"
                );
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot count connections: not waiting for them");
                return;
            }
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Where the role task learns of membership changes, to re-apply the ruleset for them.
struct MembershipRules<'a> {
    cfg: &'a Config,
    members: &'a mut watch::Receiver<Members>,
}

impl MembershipRules<'_> {
    /// The spec for the members now, if they changed since `spec` was built.
    fn updated(&mut self, spec: &ClusterSpec) -> Option<ClusterSpec> {
        let members = self.members.borrow_and_update().clone();
        let new = cluster_spec_for(self.cfg, &members);
        (new != *spec).then_some(new)
    }
}

#[allow(clippy::too_many_arguments)]
async fn follow_roles(
    _signal: &RoleSignal,
    leadership: &mut watch::Receiver<Leadership>,
    fw: &mut Firewall,
    spec: &ClusterSpec,
    facts: &HostFacts,
    role: &RoleCell,
    term: &mut tokio::signal::unix::Signal,
    membership: &mut MembershipRules<'_>,
    takeover: &mut Takeover,
) -> Result<(), NodeError> {
    let mut current = Role::Member;
    let mut spec = spec.clone();
    let spec = &mut spec;
    // The last other node seen leading: at takeover it is the one most likely dead or cut off.
    let mut previous_master: Option<u32> = None;
    loop {
        // Membership first: a role change below then installs the current member set. The
        // ruleset for the current role is replaced in one atomic batch (see `tdsc_rules`).
        if let Some(new) = membership.updated(spec) {
            *spec = new;
            apply_role(fw, current, spec, facts)?;
            tracing::info!(
                members = ?spec.members,
                bucket = spec.static_hash.index,
                of = spec.static_hash.count,
                role = current.as_str(),
                "ruleset re-applied for the new membership"
            );
        }
        let l = *leadership.borrow_and_update();
        role.term.store(l.term, Relaxed);
        if let Some(m) = l.master_id.filter(|m| *m != takeover.node_id()) {
            previous_master = Some(m);
        }
        if l.role != current {
            match l.role {
                Role::Master => {
                    // Before the master ruleset: the master thread must hold the adopted
                    // records when the first SYN is queued.
                    takeover.adopt(l.term, previous_master).await;
                    role.master.store(true, Relaxed);
                    apply_role(fw, Role::Master, spec, facts)?;
                }
                Role::Member => {
                    apply_role(fw, Role::Member, spec, facts)?;
                    role.master.store(false, Relaxed);
                }
            }
            tracing::info!(role = l.role.as_str(), master = ?l.master_id, term = l.term, "role changed");
            current = l.role;
        }
        tokio::select! {
            changed = leadership.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; shutting down");
                return Ok(());
            }
            _ = term.recv() => {
                tracing::info!("terminated; shutting down");
                return Ok(());
            }
            Ok(()) = membership.members.changed() => {}
        }
    }
}
