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
use crate::membership::Members;
use crate::raft::{MemberRequest, MembershipLink, RaftTask};
use crate::records::SynRecords;
use crate::report::{ReportCounters, Reporter};
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
    /// The cluster's current members as this node has applied them.
    pub members: watch::Receiver<Members>,
    /// `tdscctl node add|remove` go to the Raft task here; None under a static election.
    pub member_requests: Option<tokio::sync::mpsc::Sender<MemberRequest>>,
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
    let dispatcher = Dispatcher::new(
        crate::policy::build(cfg.policy),
        SynRecords::new(
            cfg.syn_record_capacity,
            u64::try_from(cfg.syn_record_window.as_millis()).unwrap_or(u64::MAX),
        ),
        cfg.nodes.len(),
    );
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
    let (members_tx, mut members_rx) = watch::channel(Members::bootstrap(&cfg));
    let (req_tx, req_rx) = tokio::sync::mpsc::channel(crate::raft::REQUEST_CAPACITY);
    let member_requests = matches!(cfg.election, ElectionMode::Raft { .. }).then_some(req_tx);

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
            .with_membership(MembershipLink {
                config: cfg.clone(),
                view: view.clone(),
                members: members_tx,
                requests: req_rx,
            });
            Some(tokio::spawn(task.run()))
        }
        ElectionMode::Static { .. } => None,
    };
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
        members: members_rx.clone(),
        member_requests,
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
        &mut MembershipRules {
            cfg: &shared.config,
            members: &mut members_rx,
        },
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
    stop.store(true, Relaxed);
    let _ = member_thread.join();
    let _ = load_thread.join();
    let _ = std::fs::remove_file(&socket_path);
    drop(shared);
    result
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
) -> Result<(), NodeError> {
    let mut current = Role::Member;
    let mut spec = spec.clone();
    let spec = &mut spec;
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
        if l.role != current {
            match l.role {
                Role::Master => {
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
