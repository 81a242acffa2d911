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
//! Every role change is a plan of steps ([`crate::cluster::role::plan`], a pure function whose
//! order the unit tests assert); the role shell here only carries the steps out, in order.
//!
//! **Owners.** What the owners share and talk through is made in one place, `Wiring`, whose
//! field docs say who writes and who reads each piece and what it does at shutdown. Every
//! thread and task is then held by a handle in a named field of `Owners` (or, for the Raft
//! task, `Election`; see [`crate::shutdown`]): stopping one is its signal plus a bounded join, never an abort of
//! something that could have been asked.
//!
//! Shutdown removes the VIP before the ruleset, so there is no window in which the node holds
//! the VIP without the rules that keep it from accepting SYNs. Before that, the teardown plan
//! stops the election (no lease, no election messages) and returns to the member ruleset, and
//! only then are the other tasks and the threads stopped, in `Owners`' order.
//!
//! SIGTERM or SIGINT first stops the node *gracefully* (`Node::graceful_stop`), so that no
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tdsc_election::{Leadership, Role, RoleSignal, StaticElection};
use tdsc_proto::seal::Keyring;
use tdsc_rules::{ClusterSpec, Firewall, HostFacts, QueueBackend, StaticHash};
use tokio::sync::watch;

use crate::cluster::bus::{Bus, ClusterSocket, Routes};
use crate::cluster::counters::{Counters, ReportCounters};
use crate::cluster::membership::Members;
use crate::cluster::raft::{
    MembershipLink, RaftHandle, RaftLinks, RaftRequest, RaftTask, RecordsLink, Settings,
};
use crate::cluster::report::Reporter;
use crate::cluster::role::{self, Duty, ElectionWriter, MasterFlag, RoleCell, Step, Transition};
use crate::cluster::takeover::{RecordStats, Replica, Takeover, TakeoverLinks};
use crate::cluster::view::ClusterView;
use crate::config::{Config, ElectionMode, PolicyName};
use crate::datapath::dispatch::Dispatcher;
use crate::datapath::queue::{MasterCommand, MasterLinks, MasterPath};
use crate::datapath::receive::{MemberLinks, MemberPath};
use crate::datapath::records::{Dispatched, SynRecords};
use crate::datapath::sticky::AffinitySettings;
use crate::host::setup::HostSetup;
use crate::shutdown::{Exits, Shutdown, Supervisor, TaskHandle, ThreadHandle, STOP_WAIT};
use crate::watchdog::Heartbeat;

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
    #[error(
        "cluster key: every node needs the cluster's key file ([cluster] key_file): make it once with \
         `tdscctl keygen --out PATH`, copy it to every node, mode 0600 owned by root"
    )]
    Key(#[source] crate::cluster::keyfile::KeyFileError),
    #[error("cannot bind the cluster socket (control_port)")]
    Report(#[source] std::io::Error),
    #[error("cannot bind the cluster socket to interface {interface:?} (SO_BINDTODEVICE)")]
    BindDevice {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket")]
    Control(#[from] crate::admin::server::ControlError),
    #[error("metrics endpoint")]
    Metrics(#[from] crate::metrics::server::ListenError),
    #[error("raft election")]
    Raft(#[from] crate::cluster::raft::RaftTaskError),
    #[error("[threads] data_path_cpu")]
    Affinity(#[from] crate::datapath::affinity::AffinityError),
    #[error("{0}")]
    Died(crate::shutdown::Exit),
    #[error("{} errors during shutdown: {}", .0.len(), .0.join("; "))]
    Shutdown(Vec<String>),
}

/// Control requests from other nodes: (sender id, its address, request), bus → cluster
/// control task.
type RemoteRequestTx = tokio::sync::mpsc::Sender<(
    u32,
    std::net::SocketAddr,
    tdsc_proto::control::ControlRequest,
)>;
type RemoteRequestRx = tokio::sync::mpsc::Receiver<(
    u32,
    std::net::SocketAddr,
    tdsc_proto::control::ControlRequest,
)>;

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
    /// `tdscctl node add|remove` and `policy set` go to the Raft task here; None under a
    /// static election.
    pub raft_requests: Option<tokio::sync::mpsc::Sender<RaftRequest>>,
    /// Replication and takeover figures (`crate::cluster::takeover`).
    pub records: Arc<RecordStats>,
    /// This node's replica of the master's records.
    pub replica: Arc<Mutex<Replica>>,
    /// The cluster socket, for the keyring's ids in `status` (the bus and senders own its use).
    pub cluster_socket: Arc<ClusterSocket>,
    /// The control socket's refusals; its accept loop and sessions write them.
    pub control: crate::admin::server::ControlCounters,
    /// The metrics server's own counts; its accept loop and connections write them.
    pub metrics_http: crate::metrics::server::HttpCounters,
    /// The cluster control task: control sessions hand it requests for other nodes.
    pub remote: crate::cluster::remote::RemoteHandle,
    /// This node's application health, as its health task last published it.
    pub health: watch::Receiver<crate::health::task::HealthSnapshot>,
    /// `tdscctl health set` goes to the health task here.
    pub health_commands: tokio::sync::mpsc::Sender<crate::health::task::HealthCommand>,
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

    /// The client-affinity settings in force (`None`: off). The replica holds them: it is
    /// switched together with the master thread's table.
    pub fn affinity(&self) -> Option<AffinitySettings> {
        let r = self.replica.lock().ok()?;
        r.affinity.as_ref().map(|a| *a.settings())
    }

    /// Switches client affinity on this node: its replica now, the master thread's table
    /// before its next SYN. Each keeps its live entries.
    pub fn set_affinity(&self, settings: Option<AffinitySettings>) -> Result<(), String> {
        let now_ms = self.role.now_ms();
        self.replica
            .lock()
            .map_err(|_| "replica lock poisoned".to_owned())?
            .set_affinity(settings.as_ref(), now_ms);
        let tx = self
            .master_commands
            .lock()
            .map_err(|_| "master command channel poisoned".to_owned())?;
        tx.send(MasterCommand::SetAffinity { settings, now_ms })
            .map_err(|_| "the master thread has stopped".to_owned())
    }

    /// The table size affinity gets on this node (`[scheduler] affinity_capacity`).
    pub fn affinity_capacity(&self) -> usize {
        self.config
            .affinity
            .map_or(crate::config::DEFAULT_AFFINITY_CAPACITY, |a| a.capacity)
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
    cluster_spec_for(cfg, &Members::bootstrap(cfg), Vec::new())
}

/// Nodes this node has known that are no longer members (absent view slots): they may still
/// reach the cluster port, to be told they were removed (`crate::cluster::bus`).
fn former_members(view: &ClusterView, members: &Members) -> Vec<std::net::IpAddr> {
    let current = members.addresses();
    let mut former: Vec<std::net::IpAddr> = view
        .slots()
        .iter()
        .filter(|s| !s.is_present())
        .filter_map(|s| s.ident().map(|i| i.address))
        .filter(|a| !current.contains(a))
        .collect();
    former.sort_unstable();
    former.dedup();
    former
}

/// The ruleset's cluster description for the current members: forwards are accepted from
/// their addresses, and this node's static-hash bucket is its place among them (none when
/// it is not a member).
pub fn cluster_spec_for(
    cfg: &Config,
    members: &Members,
    former: Vec<std::net::IpAddr>,
) -> ClusterSpec {
    let (index, count) = members.static_hash(cfg.node_id);
    ClusterSpec {
        vip: cfg.vip,
        tcp_ports: cfg.tcp_ports.clone(),
        client_interface: cfg.client_interface.clone(),
        cluster_interface: cfg.cluster_interface.clone(),
        members: members.addresses(),
        former_members: former,
        queue_num: cfg.queue_num,
        control_port: cfg.control_port,
        egress_mac: cfg.egress_mac(),
        static_hash: StaticHash {
            index,
            count,
            seed: STATIC_HASH_SEED,
        },
        syn_prefix_limit: cfg.syn_prefix_limit,
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
    // The key first: without it the node cannot talk to the cluster, so nothing else starts.
    let keyring = crate::cluster::keyfile::load(&cfg.key_file).map_err(NodeError::Key)?;
    tracing::info!(path = %cfg.key_file.display(), keys = ?keyring.ids(), send = keyring.send_id(), "cluster key loaded");
    let (role, election, flag) = RoleCell::new();

    // 1. Safe state before anything else.
    let mut fw = Firewall::open()?;
    let facts = fw.probe()?;
    let mut shell = RoleShell {
        fw: &mut fw,
        spec: cluster_spec(&cfg),
        facts,
        flag,
        duty: Duty::Starting,
    };
    shell.start()?;
    tracing::info!(backend = ?shell.facts.queue, "member ruleset installed");

    // 2. Host.
    let mut host = match HostSetup::apply(&cfg) {
        Ok(h) => h,
        Err(e) => {
            drop(shell);
            let _ = fw.remove();
            return Err(e.into());
        }
    };
    if cfg.tcp_fastopen_key == crate::config::FastOpenKeySource::Cluster {
        let keys = keyring.tcp_fastopen_keys();
        if let Err(e) = crate::host::setup::set_tcp_fastopen_keys(&keys) {
            drop(shell);
            let _ = host.undo();
            let _ = fw.remove();
            return Err(e.into());
        }
        tracing::info!(
            key = keys.primary_id,
            backup = ?keys.backup_id(),
            "TCP Fast Open key set from the cluster key: a cookie from any node is valid on all"
        );
    }
    let result = serve(cfg, keyring, epoch, shell, role, election).await;

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
    keyring: Keyring,
    epoch: Instant,
    shell: RoleShell<'_>,
    role: Arc<RoleCell>,
    election: ElectionWriter,
) -> Result<(), NodeError> {
    let mut node = Node::start(cfg, keyring, epoch, shell, role, election).await?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(NodeError::Member)?;
    // The member ruleset, the host setup and every owner are in place.
    tell_systemd("READY=1");
    let result = node.follow_roles(&mut sigterm).await;
    tell_systemd("STOPPING=1");
    // The member set may have changed since the last look: the rules from here on are for
    // the members now.
    let former = former_members(&node.shared.view, &node.members.borrow());
    node.shell.spec = cluster_spec_for(&node.shared.config, &node.members.borrow(), former);
    if result.is_ok() {
        node.graceful_stop(&mut sigterm).await;
    }
    node.stop().await;
    result
}

/// Everything the node's owners share or talk through, made in one place before any of them
/// starts, and then moved, field by field, into its owners by [`Node::start`]. Each field
/// says who writes it, who reads it, and its part in shutdown.
///
/// The shared state (`Arc`s) outlives every owner and needs nothing at shutdown. A channel's
/// owners never rely on it closing to stop: each stops on its own signal ([`Owners`]).
struct Wiring {
    /// The dispatch view. Writers: the Raft task (membership), the bus (peers' reports), the
    /// report task (own connection counts), the load thread (own load), the control socket
    /// (own weight and drain). Readers: all of these and both data-path threads.
    view: Arc<ClusterView>,
    /// Data-path counters: the master and receive threads bump them, status reads them.
    counters: Arc<Counters>,
    /// Cluster-socket counters: the report task (`sent`), the bus (`received`, `rejected`);
    /// status reads them.
    reports: Arc<ReportCounters>,
    /// Master flag, term and lease. Read per packet by both data-path threads, and by the
    /// bus, report and answer tasks and the takeover. Written through the
    /// [`ElectionWriter`] (the Raft task, or [`Node::start`] under a static election) and the
    /// [`MasterFlag`] (the role shell). At shutdown the teardown plan revokes the lease (the
    /// writer's drop) and clears the flag.
    role: Arc<RoleCell>,
    /// Replication and takeover figures: the Raft task, the takeover and the answer task
    /// write them, status reads them.
    records: Arc<RecordStats>,
    /// This node's replica of the master's records: the Raft task applies committed batches,
    /// the takeover reads it at adoption, status counts it.
    replica: Arc<Mutex<Replica>>,
    /// The leadership watch: the election publishes (the Raft task, or a static decision made
    /// here), the role shell follows, status reads. Kept alive by [`Node`], so that the role
    /// loop ends only on a signal.
    signal: Arc<RoleSignal>,
    /// Master-thread commands. Senders: `Shared::set_policy` (control socket, settings task)
    /// and the takeover; receiver: the master thread, which polls it before every SYN.
    master_commands: mpsc::Sender<MasterCommand>,
    master_commands_rx: mpsc::Receiver<MasterCommand>,
    /// New dispatch records, master thread → Raft task (bounded, never blocks the master
    /// thread; under a static election nobody holds the sender).
    handoff: mpsc::SyncSender<Dispatched>,
    handoff_rx: mpsc::Receiver<Dispatched>,
    /// `Body::Raft` messages, bus → Raft task. The Raft task also ends if the bus goes.
    raft_inbox: tokio::sync::mpsc::Sender<(u32, Vec<u8>)>,
    raft_inbox_rx: tokio::sync::mpsc::Receiver<(u32, Vec<u8>)>,
    /// Membership changes and settings (control socket) and `Removed` notices (bus) → the
    /// Raft task. A request in flight when the Raft task stops is answered with an error (its
    /// reply channel drops).
    raft_requests: tokio::sync::mpsc::Sender<RaftRequest>,
    raft_requests_rx: tokio::sync::mpsc::Receiver<RaftRequest>,
    /// The applied membership: the Raft task publishes; the role shell re-applies the ruleset
    /// from it, the bus sends removal notices from it, status reads it.
    members: watch::Sender<Members>,
    members_rx: watch::Receiver<Members>,
    /// The committed cluster-wide settings: the Raft task publishes, the settings task applies
    /// them.
    settings: watch::Sender<Settings>,
    settings_rx: watch::Receiver<Settings>,
    /// SYN-RECV queries, bus → answer task.
    queries: tokio::sync::mpsc::Sender<(std::net::SocketAddr, u64)>,
    queries_rx: tokio::sync::mpsc::Receiver<(std::net::SocketAddr, u64)>,
    /// Answers to this node's SYN-RECV queries, bus → takeover.
    answers: tokio::sync::mpsc::Sender<(u32, tdsc_proto::control::SynRecvAnswer)>,
    answers_rx: tokio::sync::mpsc::Receiver<(u32, tdsc_proto::control::SynRecvAnswer)>,
    /// Control requests for other nodes, control sessions → cluster control task.
    remote_asks: tokio::sync::mpsc::Sender<crate::cluster::remote::Ask>,
    remote_asks_rx: tokio::sync::mpsc::Receiver<crate::cluster::remote::Ask>,
    /// Control requests from other nodes, bus → cluster control task.
    remote_requests: RemoteRequestTx,
    remote_requests_rx: RemoteRequestRx,
    /// Answers to this node's control requests, bus → cluster control task.
    remote_answers: tokio::sync::mpsc::Sender<(u32, tdsc_proto::control::ControlAnswer)>,
    remote_answers_rx: tokio::sync::mpsc::Receiver<(u32, tdsc_proto::control::ControlAnswer)>,
    /// Progress of the queue thread (it writes) and of the Raft task (it writes); the
    /// watchdog feeder reads both.
    queue_beat: Arc<Heartbeat>,
    raft_beat: Arc<Heartbeat>,
    /// The Raft task's disk thread (it writes).
    disk_beat: Arc<Heartbeat>,
}

impl Wiring {
    fn new(cfg: &Config, role: Arc<RoleCell>) -> Self {
        let view = Arc::new(ClusterView::new(&cfg.nodes, cfg.node_id));
        view.set_weights(&cfg.weights);
        let window_ms = record_window_ms(cfg);
        let signal = Arc::new(match cfg.election {
            ElectionMode::Static { master } => StaticElection {
                node_id: cfg.node_id,
                master,
            }
            .start(),
            ElectionMode::Raft { .. } => RoleSignal::new(),
        });
        let (master_commands, master_commands_rx) = mpsc::channel();
        let (handoff, handoff_rx) = mpsc::sync_channel(crate::cluster::takeover::HANDOFF_CAPACITY);
        let (raft_inbox, raft_inbox_rx) =
            tokio::sync::mpsc::channel(crate::cluster::raft::INBOX_CAPACITY);
        let (raft_requests, raft_requests_rx) =
            tokio::sync::mpsc::channel(crate::cluster::raft::REQUEST_CAPACITY);
        let (members, members_rx) = watch::channel(Members::bootstrap(cfg));
        let (settings, settings_rx) = watch::channel(Settings::new());
        let (queries, queries_rx) =
            tokio::sync::mpsc::channel(crate::cluster::takeover::QUERY_CHANNEL_CAPACITY);
        let (answers, answers_rx) =
            tokio::sync::mpsc::channel(crate::cluster::takeover::QUERY_CHANNEL_CAPACITY);
        let remote_capacity = crate::cluster::remote::CHANNEL_CAPACITY;
        let (remote_asks, remote_asks_rx) = tokio::sync::mpsc::channel(remote_capacity);
        let (remote_requests, remote_requests_rx) = tokio::sync::mpsc::channel(remote_capacity);
        let (remote_answers, remote_answers_rx) = tokio::sync::mpsc::channel(remote_capacity);
        Wiring {
            view,
            counters: Arc::new(Counters::default()),
            reports: Arc::new(ReportCounters::default()),
            role,
            records: Arc::new(RecordStats::default()),
            replica: Arc::new(Mutex::new(Replica::new(
                cfg.syn_record_capacity,
                window_ms,
                cfg.affinity.as_ref(),
            ))),
            signal,
            master_commands,
            master_commands_rx,
            handoff,
            handoff_rx,
            raft_inbox,
            raft_inbox_rx,
            raft_requests,
            raft_requests_rx,
            members,
            members_rx,
            settings,
            settings_rx,
            queries,
            queries_rx,
            answers,
            answers_rx,
            remote_asks,
            remote_asks_rx,
            remote_requests,
            remote_requests_rx,
            remote_answers,
            remote_answers_rx,
            queue_beat: Arc::new(Heartbeat::default()),
            raft_beat: Arc::new(Heartbeat::default()),
            disk_beat: Arc::new(Heartbeat::default()),
        }
    }
}

/// `[scheduler] syn_record_window_ms`, for the master's records and the replica alike.
fn record_window_ms(cfg: &Config) -> u64 {
    u64::try_from(cfg.syn_record_window.as_millis()).unwrap_or(u64::MAX)
}

/// Every thread and task of a running node but the election's ([`Election`]), each held by
/// the handle that stops it. [`Node::stop`] ends them in field order, after the teardown plan
/// has stopped the election and returned the node to the member ruleset.
#[derive(Debug)]
struct Owners {
    /// Feeds systemd's watchdog (`crate::watchdog`), when the unit asks for one. First: once
    /// teardown begins, no `WATCHDOG=1` vouches for owners that are being stopped.
    watchdog: Option<TaskHandle>,
    /// The control socket's accept loop and its sessions. First, so that no request starts
    /// once teardown has begun; a session ends after the request in hand.
    control: TaskHandle,
    /// The `/metrics` server (`[metrics] listen`), when configured. Beside the control
    /// socket: a scrape reads the same state, and ends within its timeouts.
    metrics: Option<TaskHandle>,
    /// Carries control requests to other nodes and serves theirs (`crate::cluster::remote`).
    /// Right after the control socket, whose sessions wait on it.
    remote: TaskHandle,
    /// Applies committed settings (the policy) through `Shared::set_policy`.
    settings: TaskHandle,
    /// The cluster socket's receive loop ([`Bus`]).
    bus: TaskHandle,
    /// Report sender and dead-node sweep ([`Reporter`]).
    reporter: TaskHandle,
    /// The application health checks (`crate::health::task`); idle without checks.
    health: TaskHandle,
    /// Answers SYN-RECV queries (`crate::cluster::takeover::answer_queries`).
    answers: TaskHandle,
    /// The master path: NFQUEUE receive and dispatch. Its `recv` has no timeout, so it is
    /// interruptible (see `crate::shutdown`). Stopped after the member ruleset is back, when
    /// nothing is queued any more.
    master: ThreadHandle,
    /// The member path: receive and re-inject forwards (read timeout 250 ms).
    member: ThreadHandle,
    /// The load sampler (sleeps at most 50 ms between samples).
    load: ThreadHandle,
}

/// The election, as the role shell reaches it.
#[derive(Debug)]
enum Election {
    /// The Raft task owns the term and lease writer; `task` is taken by the teardown step.
    Raft {
        task: Option<TaskHandle>,
        handle: RaftHandle,
    },
    /// A static election: the term (1) and the endless lease were written at start; the
    /// writer is dropped (revoking the lease) by the teardown step.
    Static { writer: Option<ElectionWriter> },
}

impl Election {
    /// The teardown step [`Step::StopElection`]: afterwards the lease is revoked and no
    /// election message leaves this node.
    async fn stop(&mut self) {
        match self {
            Election::Raft { task, .. } => {
                if let Some(t) = task.take() {
                    t.stop(STOP_WAIT).await;
                }
            }
            Election::Static { writer } => drop(writer.take()),
        }
    }
}

/// Carries out the ruleset and master-flag steps of a role plan. The only writer of the
/// master flag; holds the firewall for the life of the node.
struct RoleShell<'a> {
    fw: &'a mut Firewall,
    /// The ruleset's cluster description for the current members.
    spec: ClusterSpec,
    facts: HostFacts,
    flag: MasterFlag,
    duty: Duty,
}

impl RoleShell<'_> {
    /// Start-up: the plan from nothing to member, which needs nothing but the shell.
    fn start(&mut self) -> Result<(), tdsc_rules::Error> {
        let t = Transition::Become(Role::Member);
        for &step in role::plan(self.duty, t) {
            self.local(step)?;
        }
        self.duty = role::after(t);
        Ok(())
    }

    /// One step that needs only the shell. The others are the running node's
    /// ([`Node::step`]).
    fn local(&mut self, step: Step) -> Result<(), tdsc_rules::Error> {
        match step {
            Step::SetMasterFlag => self.flag.set(),
            Step::ClearMasterFlag => self.flag.clear(),
            Step::InstallMasterRules => {
                apply_role(self.fw, Role::Master, &self.spec, &self.facts)?;
            }
            Step::InstallMemberRules => {
                apply_role(self.fw, Role::Member, &self.spec, &self.facts)?;
            }
            Step::Adopt | Step::Resign | Step::HandOver | Step::StopElection => {
                tracing::error!(?step, "role step needs the running node; skipped");
            }
        }
        Ok(())
    }

    /// The role whose ruleset is installed (a half-done plan towards master counts as
    /// master, so that the way back runs in full).
    fn role(&self) -> Role {
        match self.duty {
            Duty::Master => Role::Master,
            Duty::Member | Duty::Starting => Role::Member,
        }
    }
}

/// What a plan's election steps found: whether this node led when it resigned, and whom
/// leadership was handed to.
#[derive(Debug, Default, Clone, Copy)]
struct Handover {
    was_leader: bool,
    to: Option<u64>,
}

/// What a failed step does to the rest of its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnError {
    /// Stop the plan and return the error (the role loop: it ends, and teardown follows).
    Return,
    /// Log it and carry on (resignation and teardown: every later step still matters).
    Log,
}

/// A running node: its owners, the role shell, and what the role loop follows.
struct Node<'a> {
    shared: Arc<Shared>,
    shell: RoleShell<'a>,
    /// Owned by the role loop; used by the [`Step::Adopt`] step.
    takeover: Takeover,
    election: Election,
    owners: Owners,
    /// Unexpected ends of any owner, the election's included: the role loop stops on the first.
    exits: Exits,
    /// Told when teardown begins, so that owners ending then are not taken for faults.
    supervisor: Supervisor,
    leadership: watch::Receiver<Leadership>,
    members: watch::Receiver<Members>,
    /// The last other node seen leading: at takeover it is the one most likely dead or cut off.
    previous_master: Option<u32>,
    /// Kept so that the leadership watch stays open (a static election publishes once).
    _signal: Arc<RoleSignal>,
}

impl<'a> Node<'a> {
    /// Starts the data paths, the election and the tasks, in the order of the module docs.
    async fn start(
        cfg: Config,
        keyring: Keyring,
        epoch: Instant,
        shell: RoleShell<'a>,
        role: Arc<RoleCell>,
        election: ElectionWriter,
    ) -> Result<Node<'a>, NodeError> {
        let w = Wiring::new(&cfg, role);
        // One keyring for the cluster socket, the master path (tags forwards) and the member
        // path (verifies them).
        let keyring = Arc::new(keyring);
        let raft = matches!(cfg.election, ElectionMode::Raft { .. });
        // Every thread and task below is spawned under it: one that ends unasked, or
        // panics, ends the role loop (`Node::exits`).
        let (sup, exits) = Supervisor::new();

        // 3. Data paths.
        let member_path = MemberPath::open(
            &cfg,
            MemberLinks {
                view: w.view.clone(),
                counters: w.counters.clone(),
                role: w.role.clone(),
                keyring: keyring.clone(),
            },
        )
        .map_err(NodeError::Member)?;
        let cpu = cfg.data_path_cpu;
        if let Some(c) = cpu {
            crate::datapath::affinity::check(c)?;
        }
        let member = ThreadHandle::spawn("tdsc-member", &sup, move |stop| {
            pin_data_path_thread(cpu);
            member_path.run(&stop);
        })
        .map_err(NodeError::Member)?;

        let load = {
            let source = cfg.load_source.clone();
            let period = crate::host::load::sample_period(cfg.report_interval);
            let view = w.view.clone();
            ThreadHandle::spawn("tdsc-load", &sup, move |stop| {
                crate::host::load::run(&source, period, &view, &stop);
            })
            .map_err(NodeError::Member)?
        };

        let mut dispatcher = Dispatcher::new(
            crate::datapath::policy::build(cfg.policy),
            SynRecords::new(cfg.syn_record_capacity, record_window_ms(&cfg)),
            cfg.nodes.len(),
        );
        if let Some(settings) = &cfg.affinity {
            dispatcher = dispatcher.with_affinity(crate::datapath::sticky::Affinity::new(settings));
        }
        // Records are replicated through Raft; the hand-off is preallocated, once.
        if raft {
            dispatcher = dispatcher.with_handoff(w.handoff);
        }
        let master_path = MasterPath::new(
            &cfg,
            MasterLinks {
                view: w.view.clone(),
                counters: w.counters.clone(),
                role: w.role.clone(),
                commands: w.master_commands_rx,
                dispatcher,
                heartbeat: w.queue_beat.clone(),
                keyring: keyring.clone(),
            },
        )?;
        let master = ThreadHandle::spawn_interruptible("tdsc-master", &sup, move |stop| {
            pin_data_path_thread(cpu);
            master_path.run(&stop);
        })
        .map_err(NodeError::Member)?;

        // Election. Raft messages share the cluster socket; the bus hands them over.
        let sock: Arc<ClusterSocket> = Arc::new(
            ClusterSocket::bind(&w.view, cfg.control_port, cfg.node_id, keyring)
                .await
                .map_err(NodeError::Report)?,
        );
        sock.bind_device(cfg.cluster_interface.as_bytes())
            .map_err(|source| NodeError::BindDevice {
                interface: cfg.cluster_interface.clone(),
                source,
            })?;
        let election = match &cfg.election {
            ElectionMode::Raft { settings, data_dir } => {
                let task = RaftTask::open(
                    &cfg,
                    *settings,
                    data_dir,
                    RaftLinks {
                        sock: sock.clone(),
                        inbox: w.raft_inbox_rx,
                        signal: w.signal.clone(),
                        election,
                        heartbeat: w.raft_beat.clone(),
                        disk_heartbeat: w.disk_beat.clone(),
                        clock: w.role.clone(),
                    },
                )?
                .with_membership(MembershipLink {
                    config: cfg.clone(),
                    view: w.view.clone(),
                    members: w.members,
                    requests: w.raft_requests_rx,
                    settings: w.settings,
                })
                .with_records(RecordsLink {
                    handoff: w.handoff_rx,
                    replica: w.replica.clone(),
                    stats: w.records.clone(),
                    view: w.view.clone(),
                    replicate: cfg.replicate_records,
                    batch: Vec::with_capacity(crate::cluster::takeover::MAX_RECORDS_PER_BATCH),
                });
                let handle = task.handle();
                Election::Raft {
                    task: Some(TaskHandle::spawn("raft", &sup, move |s| task.run(s))),
                    handle,
                }
            }
            ElectionMode::Static { .. } => {
                election.raise_term(w.signal.current().term);
                election.set_lease_until_ms(u64::MAX);
                Election::Static {
                    writer: Some(election),
                }
            }
        };
        let answers = {
            let (sock, role, stats) = (sock.clone(), w.role.clone(), w.records.clone());
            let (node_id, vip) = (cfg.node_id, cfg.vip);
            TaskHandle::spawn("syn-recv answers", &sup, move |s| {
                crate::cluster::takeover::answer_queries(
                    w.queries_rx,
                    sock,
                    node_id,
                    vip,
                    role,
                    stats,
                    s,
                )
            })
        };
        let takeover = Takeover::new(
            &cfg,
            TakeoverLinks {
                sock: sock.clone(),
                view: w.view.clone(),
                role: w.role.clone(),
                replica: w.replica.clone(),
                stats: w.records.clone(),
                answers: w.answers_rx,
                commands: w.master_commands.clone(),
            },
        );
        let poke = Arc::new(tokio::sync::Notify::new());
        let (health_tx, health_rx) = watch::channel(crate::health::task::HealthSnapshot::initial(
            &cfg.health_checks,
        ));
        let (health_commands, health_commands_rx) =
            tokio::sync::mpsc::channel(crate::health::task::COMMAND_CAPACITY);
        let health = {
            let h = crate::health::task::HealthTask {
                specs: cfg.health_checks.clone(),
                view: w.view.clone(),
                poke: poke.clone(),
                publish: health_tx,
                commands: health_commands_rx,
            };
            // Before the first report: a node with checks is unhealthy until they pass.
            h.hold();
            TaskHandle::spawn("health", &sup, move |s| h.run(s))
        };
        let reporter = {
            let r = Reporter {
                poke,
                node_id: cfg.node_id,
                vip: cfg.vip,
                port: cfg.control_port,
                interval: cfg.report_interval,
                dead_after: cfg.dead_after,
                view: w.view.clone(),
                role: w.role.clone(),
                counters: w.reports.clone(),
                epoch,
            };
            let sock = sock.clone();
            TaskHandle::spawn("reports", &sup, move |s| r.run(sock, s))
        };
        let cluster_socket = sock.clone();
        let bus = {
            let b = Bus {
                node_id: cfg.node_id,
                port: cfg.control_port,
                view: w.view.clone(),
                role: w.role.clone(),
                counters: w.reports.clone(),
                epoch,
                notice_interval: cfg.report_interval,
                members: raft.then(|| w.members_rx.clone()),
                routes: Routes {
                    raft: raft.then_some(w.raft_inbox),
                    raft_requests: raft.then(|| w.raft_requests.clone()),
                    syn_recv_queries: w.queries,
                    syn_recv_answers: w.answers,
                    control_requests: w.remote_requests,
                    control_answers: w.remote_answers,
                },
                windows: HashMap::new(),
            };
            TaskHandle::spawn("bus", &sup, move |s| b.run(sock, s))
        };

        let listener = crate::admin::server::bind(&cfg.control_socket).await?;
        let metrics_listener = match cfg.metrics_listen {
            Some(address) => Some(crate::metrics::server::bind(address).await?),
            None => None,
        };
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
            leadership: w.signal.subscribe(),
            view: w.view,
            counters: w.counters,
            reports: w.reports,
            role: w.role,
            queue_backend: match shell.facts.queue {
                QueueBackend::Native => "native",
                QueueBackend::Compat => "compat",
            },
            epoch,
            counter_fw: Mutex::new(Firewall::open().ok()),
            master_commands: Mutex::new(w.master_commands),
            members: w.members_rx.clone(),
            raft_requests: raft.then_some(w.raft_requests),
            records: w.records,
            replica: w.replica,
            cluster_socket,
            control: crate::admin::server::ControlCounters::default(),
            metrics_http: crate::metrics::server::HttpCounters::default(),
            health: health_rx,
            health_commands,
            remote: crate::cluster::remote::RemoteHandle {
                asks: w.remote_asks,
                counters: Arc::default(),
            },
        });
        let remote = {
            let shared = shared.clone();
            let sock = shared.cluster_socket.clone();
            let links = crate::cluster::remote::RemoteLinks {
                asks: w.remote_asks_rx,
                requests: w.remote_requests_rx,
                answers: w.remote_answers_rx,
            };
            TaskHandle::spawn("cluster-control", &sup, move |s| {
                crate::cluster::remote::run(sock, shared, links, s)
            })
        };
        let control = {
            let shared = shared.clone();
            TaskHandle::spawn("control", &sup, move |s| {
                crate::admin::server::serve(listener, shared, s)
            })
        };
        let metrics = metrics_listener.map(|listener| {
            let shared = shared.clone();
            TaskHandle::spawn("metrics", &sup, move |s| {
                crate::metrics::server::serve(listener, shared, s)
            })
        });
        let settings = {
            let shared = shared.clone();
            TaskHandle::spawn("settings", &sup, move |s| {
                follow_settings(w.settings_rx, shared, s)
            })
        };
        // Only the owners that must keep moving: the queue thread, and the Raft task when
        // there is one (see `crate::watchdog`).
        let watchdog = crate::watchdog::interval_from_env().map(|interval| {
            let mut beats = vec![("queue thread", w.queue_beat)];
            if raft {
                beats.push(("raft task", w.raft_beat));
                beats.push(("raft disk thread", w.disk_beat));
            }
            let watched = crate::watchdog::Watched {
                role: shared.role.clone(),
                beats,
            };
            tracing::info!(
                interval_ms = interval.as_millis(),
                "systemd watchdog fed while the queue thread and the raft task make progress"
            );
            TaskHandle::spawn("watchdog", &sup, move |s| {
                crate::watchdog::feed(watched, interval, s)
            })
        });
        Ok(Node {
            shared,
            shell,
            takeover,
            election,
            exits,
            supervisor: sup,
            owners: Owners {
                watchdog,
                control,
                metrics,
                remote,
                settings,
                bus,
                reporter,
                health,
                answers,
                master,
                member,
                load,
            },
            leadership: w.signal.subscribe(),
            members: w.members_rx,
            previous_master: None,
            _signal: w.signal,
        })
    }

    /// Carries out `role::plan(duty, t)` step by step, in order (`l`: the leadership the
    /// transition follows, for the adoption's term).
    async fn transition(
        &mut self,
        t: Transition,
        l: Leadership,
        on_error: OnError,
    ) -> Result<Handover, NodeError> {
        let steps = role::plan(self.shell.duty, t);
        if t == Transition::Become(Role::Master) {
            // From the first step on the node may be partly master; see `RoleShell::role`.
            self.shell.duty = Duty::Master;
        }
        let mut out = Handover::default();
        for &step in steps {
            if let Err(e) = self.step(step, l, &mut out).await {
                match on_error {
                    OnError::Return => return Err(e),
                    OnError::Log => {
                        tracing::error!(?step, error = %e, "role step failed; carrying on");
                    }
                }
            }
        }
        self.shell.duty = role::after(t);
        Ok(out)
    }

    /// One step of a plan.
    async fn step(
        &mut self,
        step: Step,
        l: Leadership,
        out: &mut Handover,
    ) -> Result<(), NodeError> {
        match step {
            // Before the master ruleset: the master thread must hold the adopted records
            // when the first SYN is queued.
            Step::Adopt => self.takeover.adopt(l.term, self.previous_master).await,
            Step::Resign => {
                if let Election::Raft { handle, .. } = &self.election {
                    out.was_leader = handle.resign().await.unwrap_or(false);
                }
            }
            // Only after the lease is revoked and the dispatcher has stopped: no
            // MsgTimeoutNow leaves before.
            Step::HandOver => {
                if let (true, Election::Raft { handle, .. }) = (out.was_leader, &self.election) {
                    out.to = handle.transfer(self.candidates()).await;
                }
            }
            Step::StopElection => self.election.stop().await,
            Step::SetMasterFlag
            | Step::ClearMasterFlag
            | Step::InstallMasterRules
            | Step::InstallMemberRules => self.shell.local(step)?,
        }
        Ok(())
    }

    /// Live, present, not draining followers to hand leadership to.
    fn candidates(&self) -> Vec<u64> {
        let view = &self.shared.view;
        view.nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                *i != view.self_index
                    && n.is_present()
                    && n.alive.load(Relaxed)
                    && !n.draining.load(Relaxed)
            })
            .map(|(_, n)| u64::from(n.id()))
            .collect()
    }

    /// The spec for the members now, if they changed since the shell's was built.
    fn membership_update(&mut self) -> Option<ClusterSpec> {
        let members = self.members.borrow_and_update().clone();
        let former = former_members(&self.shared.view, &members);
        let new = cluster_spec_for(&self.shared.config, &members, former);
        (new != self.shell.spec).then_some(new)
    }

    /// The role loop: follows the leadership and the membership until a signal.
    async fn follow_roles(
        &mut self,
        sigterm: &mut tokio::signal::unix::Signal,
    ) -> Result<(), NodeError> {
        loop {
            // Membership first: a role change below then installs the current member set.
            // The ruleset for the current role is replaced in one atomic batch (see
            // `tdsc_rules`).
            if let Some(new) = self.membership_update() {
                self.shell.spec = new;
                let current = self.shell.role();
                apply_role(self.shell.fw, current, &self.shell.spec, &self.shell.facts)?;
                let spec = &self.shell.spec;
                tracing::info!(
                    members = ?spec.members,
                    bucket = spec.static_hash.index,
                    of = spec.static_hash.count,
                    role = current.as_str(),
                    "ruleset re-applied for the new membership"
                );
            }
            let l = *self.leadership.borrow_and_update();
            if let Some(m) = l.master_id.filter(|m| *m != self.shared.config.node_id) {
                self.previous_master = Some(m);
            }
            if l.role != self.shell.role() {
                self.transition(Transition::Become(l.role), l, OnError::Return)
                    .await?;
                tracing::info!(role = l.role.as_str(), master = ?l.master_id, term = l.term, "role changed");
            }
            tokio::select! {
                changed = self.leadership.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("interrupted; shutting down");
                    return Ok(());
                }
                _ = sigterm.recv() => {
                    tracing::info!("terminated; shutting down");
                    return Ok(());
                }
                Ok(()) = self.members.changed() => {}
                exit = self.exits.next() => return Err(NodeError::Died(exit)),
            }
        }
    }

    /// Steps 1–3 of a graceful stop (see the module docs). Never fails: whatever goes wrong,
    /// the teardown that follows still runs.
    async fn graceful_stop(&mut self, sigterm: &mut tokio::signal::unix::Signal) {
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let view = &shared.view;
        let own = &view.nodes[view.self_index];
        // 1. Announce: every report from now on says draining.
        own.draining.store(true, Relaxed);
        tracing::info!(
            drain_timeout_ms = cfg.drain_timeout.as_millis(),
            "stopping gracefully: draining (a second SIGTERM or SIGINT skips the waits)"
        );
        let mut again = std::pin::pin!(async {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        });

        // 2. Stop dispatching for good, then (if leader) hand leadership over: the resign
        //    plan (the Raft task stores the revoked lease; then the ruleset and the master
        //    flag, both before any MsgTimeoutNow can leave).
        if matches!(self.election, Election::Raft { .. }) {
            let l = *self.leadership.borrow();
            let old_term = l.term;
            let handover = self
                .transition(Transition::Resign, l, OnError::Log)
                .await
                .unwrap_or_default();
            if handover.was_leader {
                let Some(to) = handover.to else {
                    tracing::warn!("no live follower to hand leadership to; stopping as leader");
                    return drain_unless(cfg, &mut again).await;
                };
                let wait = transfer_wait(cfg);
                let me = cfg.node_id;
                let leadership = &mut self.leadership;
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

    /// Teardown: stop taking SYNs before anything else goes (the stop plan: no lease, no
    /// election messages, then the member ruleset and the flag), then every other owner in
    /// [`Owners`]' order, then the control socket's file.
    async fn stop(mut self) {
        self.supervisor.stopping();
        let started = Instant::now();
        let l = *self.leadership.borrow();
        let _ = self.transition(Transition::Stop, l, OnError::Log).await;
        let Owners {
            watchdog,
            control,
            metrics,
            remote,
            settings,
            bus,
            reporter,
            health,
            answers,
            master,
            member,
            load,
        } = self.owners;
        if let Some(w) = watchdog {
            w.stop(STOP_WAIT).await;
        }
        let metrics_joined = match metrics {
            Some(m) => m.stop(STOP_WAIT).await,
            None => true,
        };
        let joined = [
            control.stop(STOP_WAIT).await,
            metrics_joined,
            remote.stop(STOP_WAIT).await,
            settings.stop(STOP_WAIT).await,
            bus.stop(STOP_WAIT).await,
            reporter.stop(STOP_WAIT).await,
            health.stop(STOP_WAIT).await,
            answers.stop(STOP_WAIT).await,
            master.stop(STOP_WAIT).await,
            member.stop(STOP_WAIT).await,
            load.stop(STOP_WAIT).await,
        ];
        let _ = std::fs::remove_file(&self.shared.config.control_socket);
        let left = joined.iter().filter(|j| !**j).count();
        if left == 0 {
            tracing::info!(
                ms = started.elapsed().as_millis(),
                "election stopped, member ruleset back, every task and thread joined"
            );
        } else {
            tracing::error!(left, "some tasks or threads did not stop (see above)");
        }
    }
}

/// Applies the cluster-wide settings committed through Raft: the scheduling policy
/// (`tdscctl policy set`) and client affinity (`tdscctl affinity set`), which then override
/// `[scheduler]` on every node, a new master and a restarted node included. Runs until
/// `shutdown`.
async fn follow_settings(
    mut settings: watch::Receiver<Settings>,
    shared: Arc<Shared>,
    mut shutdown: Shutdown,
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
        let affinity = settings
            .borrow()
            .get(crate::datapath::sticky::AFFINITY_SETTING)
            .cloned();
        if let Some(raw) = affinity {
            let text = String::from_utf8_lossy(&raw);
            match AffinitySettings::decode(&text, shared.affinity_capacity()) {
                Ok(a) if a != shared.affinity() => match shared.set_affinity(a) {
                    Ok(()) => tracing::info!(affinity = %text, "cluster affinity applied"),
                    Err(e) => tracing::error!(error = %e, "cluster affinity not applied"),
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "committed affinity unreadable; keeping the current one");
                }
            }
        }
        tokio::select! {
            changed = settings.changed() => {
                if changed.is_err() {
                    // No Raft task (a static election), or it has ended (and is reported
                    // itself): nothing more will come; wait for the stop.
                    shutdown.requested().await;
                    return;
                }
            }
            () = shutdown.requested() => return,
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

/// `sd_notify`, logged when it fails (systemd then sees no `READY=1` and fails the start
/// after `TimeoutStartSec=`; that is the right outcome, so nothing else is done).
fn tell_systemd(state: &str) {
    match crate::host::notify::notify(state) {
        Ok(true) => tracing::debug!(state, "told systemd"),
        Ok(false) => {}
        Err(e) => tracing::error!(state, error = %e, "cannot notify systemd"),
    }
}

/// How often the drain wait counts this node's connections.
const DRAIN_POLL: Duration = Duration::from_millis(50);

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
