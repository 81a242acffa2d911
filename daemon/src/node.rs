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
//!    the cluster's SYN-RECV sockets (`crate::takeover`): the master thread gets them as a
//!    command it processes before the first SYN the new master ruleset queues.
//!
//! Shutdown removes the VIP before the ruleset, so there is no window in which the node holds
//! the VIP without the rules that keep it from accepting SYNs.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use tdsc_election::{Leadership, Role, RoleSignal, StaticElection};
use tdsc_rules::{ClusterSpec, Firewall, HostFacts, QueueBackend, StaticHash};
use tokio::sync::watch;

use crate::config::{Config, ElectionMode, PolicyName};
use crate::dispatch::Dispatcher;
use crate::host::HostSetup;
use crate::master::{MasterCommand, MasterPath, RoleCell};
use crate::member::MemberPath;
use crate::raft::RaftTask;
use crate::records::SynRecords;
use crate::report::{ReportCounters, Reporter};
use crate::takeover::{RecordStats, Replica, Takeover};
use crate::view::{ClusterView, Counters};

/// Seed of the static hash for undispatched flows; any fixed value, the same on every node.
pub const STATIC_HASH_SEED: u32 = 0x7464_7363; // "tdsc"

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("firewall")]
    Firewall(#[from] tdsc_rules::Error),
    #[error("host setup")]
    Host(#[from] crate::host::HostError),
    #[error("master path")]
    Master(#[from] crate::master::MasterError),
    #[error("cannot open the forward receive or inject socket")]
    Member(#[source] std::io::Error),
    #[error("cannot bind the report socket")]
    Report(#[source] std::io::Error),
    #[error("control socket")]
    Control(#[from] crate::control::ControlError),
    #[error("raft election")]
    Raft(#[from] crate::raft::RaftTaskError),
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
    /// Replication and takeover figures (`crate::takeover`).
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
        tx.send(MasterCommand::SetPolicy(crate::policy::build(name)))
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
}

pub fn cluster_spec(cfg: &Config) -> ClusterSpec {
    ClusterSpec {
        vip: cfg.vip,
        tcp_ports: cfg.tcp_ports.clone(),
        client_interface: cfg.client_interface.clone(),
        cluster_interface: cfg.cluster_interface.clone(),
        members: cfg.nodes.iter().map(|n| n.address).collect(),
        queue_num: cfg.queue_num,
        egress_mac: cfg.egress_mac(),
        static_hash: StaticHash {
            // Cluster sizes are far below u32::MAX.
            index: u32::try_from(cfg.self_index()).unwrap_or(0),
            count: u32::try_from(cfg.nodes.len()).unwrap_or(1),
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
        stop.clone(),
    )
    .map_err(NodeError::Member)?;
    let member_thread = std::thread::Builder::new()
        .name("tdsc-member".into())
        .spawn(move || member.run())
        .map_err(NodeError::Member)?;

    let load_thread = crate::load::spawn(
        cfg.load_source.clone(),
        crate::load::sample_period(cfg.report_interval),
        view.clone(),
        stop.clone(),
    )
    .map_err(NodeError::Member)?;

    let (cmd_tx, cmd_rx) = mpsc::channel();
    let window_ms = u64::try_from(cfg.syn_record_window.as_millis()).unwrap_or(u64::MAX);
    let mut dispatcher = Dispatcher::new(
        crate::policy::build(cfg.policy),
        SynRecords::new(cfg.syn_record_capacity, window_ms),
        cfg.nodes.len(),
    );
    // Records are replicated through Raft; the hand-off is preallocated here, once.
    let record_stats = Arc::new(RecordStats::default());
    let replica = Arc::new(Mutex::new(Replica::new(cfg.syn_record_capacity, window_ms)));
    let (handoff_tx, handoff_rx) = mpsc::sync_channel(crate::takeover::HANDOFF_CAPACITY);
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
        .spawn(move || master.run())
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
    let (raft_tx, raft_rx) = tokio::sync::mpsc::channel(crate::raft::INBOX_CAPACITY);
    let (query_tx, query_rx) = tokio::sync::mpsc::channel(crate::takeover::QUERY_CHANNEL_CAPACITY);
    let (answer_tx, answer_rx) =
        tokio::sync::mpsc::channel(crate::takeover::QUERY_CHANNEL_CAPACITY);

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
        syn_recv_queries: Some(query_tx),
        syn_recv_answers: Some(answer_tx),
    };
    let sock = Arc::new(reporter.bind().await.map_err(NodeError::Report)?);
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
            .with_records(crate::raft::RecordsLink {
                handoff: handoff_rx,
                replica: replica.clone(),
                stats: record_stats.clone(),
                view: view.clone(),
                replicate: cfg.replicate_records,
                batch: Vec::with_capacity(crate::takeover::MAX_RECORDS_PER_BATCH),
            });
            Some(tokio::spawn(task.run()))
        }
        ElectionMode::Static { .. } => None,
    };
    let answer_task = tokio::spawn(crate::takeover::answer_queries(
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

    let listener = crate::control::bind(&cfg.control_socket).await?;
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
        records: record_stats,
        replica,
    });
    let control_task = tokio::spawn(crate::control::serve(listener, shared.clone()));

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
        &mut takeover,
    )
    .await;

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
    report_task.abort();
    answer_task.abort();
    stop.store(true, Relaxed);
    let _ = member_thread.join();
    let _ = load_thread.join();
    let _ = std::fs::remove_file(&socket_path);
    drop(shared);
    result
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
    takeover: &mut Takeover,
) -> Result<(), NodeError> {
    let mut current = Role::Member;
    loop {
        let l = *leadership.borrow_and_update();
        role.term.store(l.term, Relaxed);
        if l.role != current {
            match l.role {
                Role::Master => {
                    // Before the master ruleset: the master thread must hold the adopted
                    // records when the first SYN is queued.
                    takeover.adopt(l.term).await;
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
        }
    }
}
