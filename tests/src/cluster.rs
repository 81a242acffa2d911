//! The tcp-dsc cluster on top of a realised lab: per-node tdscd configs, the daemons, and an
//! HTTP server on every cluster node and on the baseline server.
//!
//! Roles come from the topology's `tdsc.role` labels; a cluster node's configuration is the
//! file its topology entry binds to `/etc/tdsc/tdscd.toml`. The harness copies that file into
//! the lab's work directory, changing only `[control].socket` and `[control].host_state` (one
//! socket and one host state file per node, per lab)
//! and, if asked, `[scheduler].policy`. Everything else (VIP, port, node list, master) is read
//! from it.
//!
//! [`Cluster`] owns the [`Lab`]; dropping it stops every daemon and server and removes every
//! namespace.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::bins::{BinDir, BinError};
use crate::lab::{Lab, LabError, TeardownError};
use crate::netns::{self, NetnsError};
use crate::status::Status;
use crate::topology::{Role, Topology, TopologyError, DAEMON_CONFIG_PATH};

/// Lines of a daemon's log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// Why the cluster could not be started or queried.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Bin(#[from] BinError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cluster node {node} binds no {DAEMON_CONFIG_PATH}")]
    NoConfig { node: String },
    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`tdscd --check-config` rejected {path}: {output}")]
    CheckConfig { path: PathBuf, output: String },
    #[error("{what} on {node} not ready after {waited:?}: {last}\n--- log tail ---\n{log}")]
    NotReady {
        what: String,
        node: String,
        waited: Duration,
        last: String,
        log: String,
    },
    #[error("{what} on {node} exited ({status})\n--- log tail ---\n{log}")]
    Exited {
        what: String,
        node: String,
        status: String,
        log: String,
    },
    #[error("`tdscctl status` on {node}: {reason}")]
    Status { node: String, reason: String },
    #[error("no cluster node named {node:?}")]
    NoSuchNode { node: String },
    #[error("topology has no cluster node (label tdsc.role: node)")]
    NoNodes,
}

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Topology file; default: `deploy/containerlab/tdsc.clab.yml` of this repository.
    pub topology: PathBuf,
    /// Lab name; default: the topology's own name.
    pub lab_name: Option<String>,
    /// Scheduler policy to put in every node's config instead of the file's.
    pub policy: Option<String>,
    /// Start tdscd on the cluster nodes. Without it the lab has HTTP servers only, and only
    /// the baseline server is reachable.
    pub daemons: bool,
    /// `RUST_LOG` for the daemons.
    pub rust_log: String,
    /// How long each daemon and server may take to become ready.
    pub ready_timeout: Duration,
    /// Remove namespaces left by an earlier lab of the same name before starting.
    pub remove_stale: bool,
    /// Extra arguments for every node's `tdsc-lab-httpd` (e.g. its CGI mode).
    pub httpd_args: Vec<String>,
    /// Give each cluster node a load file (`<workdir>/<node>.load`): its httpd writes it
    /// (`--load-file`) and its tdscd reads it (`[scheduler] load_file`).
    pub load_files: bool,
    /// Replace each node's `[election]` with `mode = "raft"` (default timing) and a data
    /// directory of its own in the lab's workdir; the master is then whoever Raft elects.
    pub raft: bool,
    /// Extra `[cluster]` keys for every node's config (e.g. `tcp_ports = [80, 5201]`).
    pub cluster_extra: Vec<(String, toml::Value)>,
    /// Extra `[scheduler]` keys for every node's config (e.g. `replicate_records = false`).
    pub scheduler_extra: Vec<(String, toml::Value)>,
    /// Extra `[threads]` keys for every node's config (e.g. `queue_io = "batched"`).
    pub threads_extra: Vec<(String, toml::Value)>,
    /// Extra `[flood]` keys for every node's config (e.g. `syn_prefix_rate = 1000`).
    pub flood_extra: Vec<(String, toml::Value)>,
    /// Extra `[health]` keys for every node's config (e.g. `check = [{ kind = "tcp", .. }]`).
    pub health_extra: Vec<(String, toml::Value)>,
    /// Serve `/metrics` on each node's cluster address at this port (`[metrics] listen`).
    pub metrics_port: Option<u16>,
    /// Per-flow CPU steering (RPS) on the client side's veths, so that each connection's
    /// segments are handled on one CPU as a NIC's RSS does (docs/platform.md). On by default:
    /// without it a veth lets one connection's handshake ACK and request race on two CPUs.
    pub steer_flows: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            topology: default_topology_path(),
            lab_name: None,
            policy: None,
            daemons: true,
            rust_log: "info".to_owned(),
            ready_timeout: Duration::from_secs(15),
            remove_stale: false,
            httpd_args: Vec::new(),
            load_files: false,
            raft: false,
            cluster_extra: Vec::new(),
            scheduler_extra: Vec::new(),
            threads_extra: Vec::new(),
            flood_extra: Vec::new(),
            health_extra: Vec::new(),
            metrics_port: None,
            steer_flows: true,
        }
    }
}

/// One lab at a time on the machine: the end-to-end tests count packets and latencies, and two
/// labs on two cores would disturb each other. An in-process mutex orders the tests of one
/// binary; an exclusive `flock` on [`LAB_LOCK_PATH`] orders test binaries and worktrees. The
/// kernel drops the `flock` when the holder exits, however it exits. Returns `None` after
/// printing a SKIP line when not root (namespaces need root); under `CI=true` it panics
/// instead ([`netns::root_or_skip`]). A test that panicked while
/// holding the mutex has already torn its lab down, so a poisoned mutex is simply taken over.
pub fn exclusive_lab(test: &str) -> Option<LabLock> {
    static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if !netns::root_or_skip(test) {
        return None;
    }
    let guard = ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let file = inherited_lock().unwrap_or_else(|| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LAB_LOCK_PATH)
            .unwrap_or_else(|e| panic!("cannot open {LAB_LOCK_PATH}: {e}"))
    });
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock {LAB_LOCK_PATH}: {e}"));
    Some(LabLock {
        _file: file,
        _guard: guard,
    })
}

/// The machine-wide lab lock file.
pub const LAB_LOCK_PATH: &str = "/run/tdsc-lab.lock";

/// Environment variable naming a file descriptor, open on [`LAB_LOCK_PATH`], that a parent
/// (`tests/scripts/docker-test.sh`, which holds the lock around its Docker engine) passes down.
pub const LAB_LOCK_FD_ENV: &str = "TDSC_LAB_LOCK_FD";

/// A duplicate of the descriptor [`LAB_LOCK_FD_ENV`] names, if it is open on the lock file.
/// `flock` locks belong to the open file description, which a duplicate shares: locking it
/// returns at once while the parent holds the lock, and waits like any other locker if it
/// does not. Anything else there is ignored (the lock file is then opened afresh).
fn inherited_lock() -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;
    let fd: libc::c_int = std::env::var(LAB_LOCK_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: fcntl(2) with F_DUPFD_CLOEXEC only reads the descriptor number; an fd that is
    // not open makes it fail with EBADF, which is checked.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return None;
    }
    // SAFETY: `dup` is a descriptor this process just created and owns nowhere else.
    let file = unsafe { std::fs::File::from_raw_fd(dup) };
    let (have, want) = (
        file.metadata().ok()?,
        std::fs::metadata(LAB_LOCK_PATH).ok()?,
    );
    (have.dev() == want.dev() && have.ino() == want.ino()).then_some(file)
}

/// Held while a test owns the lab; dropping it lets the next test in.
#[derive(Debug)]
pub struct LabLock {
    _file: std::fs::File,
    _guard: std::sync::MutexGuard<'static, ()>,
}

/// The repository's lab topology.
pub fn default_topology_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/containerlab/tdsc.clab.yml");
    // Readable in messages; the unresolved path still works if this fails.
    path.canonicalize().unwrap_or(path)
}

/// A lab name unique to this process and call: `<prefix>-<pid>-<n>`.
pub fn unique_lab_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A node running tdscd.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// Topology name (`node1`).
    pub name: String,
    /// `node_id` from its config.
    pub id: u32,
    /// Its generated config file.
    pub config: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
    /// Its address on the cluster network, from the topology's exec lines.
    pub cluster_addr: Option<Ipv4Addr>,
    /// Its load file, if [`ClusterOptions::load_files`].
    pub load_file: Option<PathBuf>,
}

/// A client or the baseline server: a name and an address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub addr: Ipv4Addr,
}

/// A running cluster. See the module docs.
#[derive(Debug)]
pub struct Cluster {
    lab: Lab,
    bins: BinDir,
    nodes: Vec<ClusterNode>,
    clients: Vec<Host>,
    baseline: Option<Host>,
    vip: Ipv4Addr,
    port: u16,
    master_id: Option<u32>,
    /// The lab's cluster key file (0600), named in every node's config.
    key_file: PathBuf,
    daemons: bool,
    rust_log: String,
    /// Each HTTP server's arguments, by node name, to start it again.
    httpd_args: std::collections::BTreeMap<String, Vec<String>>,
}

impl Cluster {
    /// Realises the lab, writes the node configs, starts the HTTP servers and (if asked) the
    /// daemons, and waits until all of them answer.
    pub fn start(opts: &ClusterOptions) -> Result<Cluster, ClusterError> {
        let bins = BinDir::locate()?;
        let httpd = bins.path("tdsc-lab-httpd")?;
        let tdscd = if opts.daemons {
            // Both must exist before anything is built; tdscctl is looked up again per call.
            bins.path("tdscctl")?;
            Some(bins.path("tdscd")?)
        } else {
            None
        };
        let mut topology = Topology::load(&opts.topology)?;
        if let Some(name) = &opts.lab_name {
            topology = topology.renamed(name)?;
        }
        if opts.remove_stale {
            for name in Lab::remove_stale(&topology)? {
                eprintln!("tdsc-lab: removed stale namespace {name}");
            }
        }
        let lab = Lab::realise(topology, opts.steer_flows)?;
        let topo = lab.topology().clone();

        // One cluster key for every node of the lab (the daemons refuse to start without one).
        let key_file = lab.workdir().join("cluster.key");
        write_key_file(&key_file, 1)?;

        // Node configs.
        let mut nodes = Vec::new();
        let mut vip = None;
        let mut port = None;
        let mut master_id = None;
        for name in topo.nodes_with_role(Role::ClusterNode) {
            let node = &topo.nodes[name];
            let src = node
                .bind_for(DAEMON_CONFIG_PATH)
                .ok_or_else(|| ClusterError::NoConfig {
                    node: name.to_owned(),
                })?;
            let socket = lab.workdir().join(format!("{name}.sock"));
            let config = lab.workdir().join(format!("{name}.toml"));
            let load_file = opts
                .load_files
                .then(|| lab.workdir().join(format!("{name}.load")));
            let raft_dir = opts
                .raft
                .then(|| lab.workdir().join(format!("{name}-raft")));
            let facts = write_node_config(
                src,
                &config,
                &socket,
                &key_file,
                opts.policy.as_deref(),
                load_file.as_deref(),
                raft_dir.as_deref(),
            )?;
            add_keys(&config, "cluster", &opts.cluster_extra)?;
            add_keys(&config, "scheduler", &opts.scheduler_extra)?;
            add_keys(&config, "threads", &opts.threads_extra)?;
            add_keys(&config, "flood", &opts.flood_extra)?;
            add_keys(&config, "health", &opts.health_extra)?;
            let cluster_addr = node
                .ipv4_addresses()
                .iter()
                .find(|(_, _, dev)| dev == "eth1")
                .map(|(a, _, _)| *a);
            if let (Some(port), Some(addr)) = (opts.metrics_port, cluster_addr) {
                let listen = SocketAddrV4::new(addr, port).to_string();
                add_keys(&config, "metrics", &[("listen".to_owned(), listen.into())])?;
            }
            vip.get_or_insert(facts.vip);
            port.get_or_insert(facts.port);
            if facts.master.is_some() {
                master_id = facts.master;
            }
            nodes.push(ClusterNode {
                name: name.to_owned(),
                id: facts.node_id,
                config,
                socket,
                cluster_addr,
                load_file,
            });
        }
        let (Some(vip), Some(port)) = (vip, port) else {
            return Err(ClusterError::NoNodes);
        };
        let host = |name: &str| {
            topo.nodes[name].first_ipv4().map(|addr| Host {
                name: name.to_owned(),
                addr,
            })
        };
        let clients = topo
            .nodes_with_role(Role::Client)
            .into_iter()
            .filter_map(host)
            .collect();
        let baseline = topo
            .nodes_with_role(Role::Baseline)
            .into_iter()
            .find_map(host);

        let mut cluster = Cluster {
            lab,
            bins,
            nodes,
            clients,
            baseline,
            vip,
            port,
            master_id,
            key_file,
            daemons: opts.daemons,
            rust_log: opts.rust_log.clone(),
            httpd_args: Default::default(),
        };

        // HTTP servers: on every cluster node (listening on the wildcard address, so it does
        // not matter whether the daemon added the VIP yet) and on the baseline server.
        let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).to_string();
        let mut servers: Vec<(String, u32, Option<PathBuf>)> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.id, n.load_file.clone()))
            .collect();
        if let Some(b) = &cluster.baseline {
            servers.push((b.name.clone(), 0, None));
        }
        for (name, id, load_file) in &servers {
            let mut args = vec![
                "--listen".to_owned(),
                listen.clone(),
                "--id".to_owned(),
                id.to_string(),
                "--fastopen".to_owned(),
            ];
            args.extend(opts.httpd_args.iter().cloned());
            if let Some(f) = load_file {
                args.push("--load-file".to_owned());
                args.push(f.display().to_string());
            }
            cluster
                .lab
                .spawn(name, &format!("httpd-{name}"), &httpd, &args, &[])?;
            cluster.httpd_args.insert(name.clone(), args);
        }
        for (name, _, _) in &servers {
            cluster.wait_httpd(name, opts.ready_timeout)?;
        }

        if let Some(tdscd) = tdscd {
            for node in cluster.nodes.clone() {
                check_config(&tdscd, &node.config)?;
                cluster.spawn_daemon(&tdscd, &node)?;
            }
            for node in cluster.nodes.clone() {
                cluster.wait_daemon(&node.name, opts.ready_timeout)?;
            }
            if cluster.master_id.is_none() {
                cluster.wait_master(None, opts.ready_timeout)?;
            }
            cluster.wait_all_alive(Duration::from_secs(5));
        }
        Ok(cluster)
    }

    fn spawn_daemon(&mut self, tdscd: &Path, node: &ClusterNode) -> Result<u32, ClusterError> {
        let args = vec!["--config".to_owned(), node.config.display().to_string()];
        let log = self.rust_log.clone();
        Ok(self.lab.spawn(
            &node.name,
            &format!("tdscd-{}", node.name),
            tdscd,
            &args,
            &[("RUST_LOG", log.as_str())],
        )?)
    }

    /// Kills a node's HTTP server with SIGKILL: the application dies, the daemon runs on.
    pub fn kill_httpd(&mut self, node: &str) -> Result<(), ClusterError> {
        Ok(self.lab.kill(&format!("httpd-{node}"))?)
    }

    /// Starts a node's HTTP server again (after [`Cluster::kill_httpd`]), with the arguments
    /// it first had, and waits until it accepts connections.
    pub fn restart_httpd(&mut self, node: &str, timeout: Duration) -> Result<(), ClusterError> {
        let httpd = self.bins.path("tdsc-lab-httpd")?;
        let args = self
            .httpd_args
            .get(node)
            .cloned()
            .ok_or_else(|| ClusterError::NoSuchNode {
                node: node.to_owned(),
            })?;
        self.lab
            .spawn(node, &format!("httpd-{node}"), &httpd, &args, &[])?;
        self.wait_httpd(node, timeout)
    }

    /// Kills a node's tdscd with SIGKILL, as a crash would: it removes nothing it installed.
    pub fn kill_daemon(&mut self, node: &str) -> Result<(), ClusterError> {
        Ok(self.lab.kill(&format!("tdscd-{node}"))?)
    }

    /// Stops a node's tdscd as an operator would (SIGTERM: its graceful stop) and waits up to
    /// `timeout` for it to exit. Returns its exit status and the last lines of its log; the
    /// label can then be started again with [`Cluster::restart_daemon`].
    pub fn stop_daemon(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> Result<(String, String), ClusterError> {
        let (status, log) = self.lab.terminate(&format!("tdscd-{node}"), timeout)?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        Ok((status, tail))
    }

    /// Starts a node's tdscd again (after [`Cluster::kill_daemon`]) and waits until it
    /// answers `status`.
    pub fn restart_daemon(&mut self, node: &str, timeout: Duration) -> Result<(), ClusterError> {
        let tdscd = self.bins.path("tdscd")?;
        let n = self.node(node)?.clone();
        self.spawn_daemon(&tdscd, &n)?;
        self.wait_daemon(node, timeout)
    }

    /// The node that says it is master, if exactly one does (asked of every daemon that
    /// answers; the others are skipped).
    pub fn current_master(&self, excluding: Option<&str>) -> Option<ClusterNode> {
        let masters: Vec<&ClusterNode> = self
            .nodes
            .iter()
            .filter(|n| Some(n.name.as_str()) != excluding)
            .filter(|n| self.status(&n.name).is_ok_and(|s| s.role == "master"))
            .collect();
        match masters.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        }
    }

    /// Waits until exactly one node (other than `excluding`) says it is master.
    pub fn wait_master(
        &self,
        excluding: Option<&str>,
        timeout: Duration,
    ) -> Result<ClusterNode, ClusterError> {
        let start = Instant::now();
        loop {
            if let Some(m) = self.current_master(excluding) {
                return Ok(m);
            }
            if start.elapsed() > timeout {
                return Err(ClusterError::NoSuchNode {
                    node: format!("master (none elected within {timeout:?})"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_httpd(&mut self, node: &str, timeout: Duration) -> Result<(), ClusterError> {
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let ns = self.lab.netns(node);
        self.wait_ready(
            node,
            "tdsc-lab-httpd",
            "httpd",
            timeout,
            Duration::from_millis(20),
            |_| {
                let probe = netns::run_in(&ns, || {
                    std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200))
                })?;
                Ok(probe.map(drop).map_err(|e| e.to_string()))
            },
        )
    }

    /// Polls `tdscctl status` until the daemon answers: by then it has installed its
    /// nftables table, VIP and MAC.
    fn wait_daemon(&mut self, node: &str, timeout: Duration) -> Result<(), ClusterError> {
        self.wait_ready(
            node,
            "tdscd",
            "tdscd",
            timeout,
            Duration::from_millis(50),
            |c| Ok(c.status(node).map(drop).map_err(|e| e.to_string())),
        )
    }

    /// Polls `probe` until it succeeds; fails early, with the log tail, if the process
    /// labelled `<label>-<node>` exits, and after `timeout` with the last probe error.
    fn wait_ready(
        &mut self,
        node: &str,
        what: &str,
        label: &str,
        timeout: Duration,
        poll: Duration,
        probe: impl Fn(&Self) -> Result<Result<(), String>, ClusterError>,
    ) -> Result<(), ClusterError> {
        let label = format!("{label}-{node}");
        let start = Instant::now();
        loop {
            let last = match probe(self)? {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if let Some(status) = self.lab.exited(&label)? {
                return Err(ClusterError::Exited {
                    what: what.into(),
                    node: node.to_owned(),
                    status,
                    log: self.lab.log_tail(&label, LOG_TAIL_LINES),
                });
            }
            if start.elapsed() > timeout {
                return Err(ClusterError::NotReady {
                    what: what.into(),
                    node: node.to_owned(),
                    waited: start.elapsed(),
                    last,
                    log: self.lab.log_tail(&label, LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(poll);
        }
    }

    /// Waits (best effort) until the master reports every node alive, so that the first
    /// requests are spread over all of them. Warns and goes on after `timeout`.
    fn wait_all_alive(&self, timeout: Duration) {
        let Ok(master) = self.master() else { return };
        let master = master.name.clone();
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            match self.status(&master) {
                Ok(s) if !s.nodes.is_empty() && s.nodes.iter().all(|n| n.alive) => return,
                Ok(s) => last = Some(format!("{:?}", s.nodes)),
                Err(e) => last = Some(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "tdsc-lab: warning: master {master} does not report every node alive after \
             {timeout:?}: {}",
            last.unwrap_or_default()
        );
    }

    /// `tdscctl status --json` of a node.
    pub fn status(&self, node: &str) -> Result<Status, ClusterError> {
        let n = self.node(node)?;
        crate::status::query(&self.bins.path("tdscctl")?, &n.socket).map_err(|reason| {
            ClusterError::Status {
                node: node.to_owned(),
                reason,
            }
        })
    }

    /// Runs `tdscctl --socket <node's socket> ARGS…` and returns its stdout; a non-zero exit is
    /// an error carrying stderr.
    pub fn ctl(&self, node: &str, args: &[&str]) -> Result<String, ClusterError> {
        let n = self.node(node)?;
        crate::status::tdscctl(&self.bins.path("tdscctl")?, &n.socket, args).map_err(|reason| {
            ClusterError::Status {
                node: node.to_owned(),
                reason,
            }
        })
    }

    /// Polls the master's status until `cond` holds for it, or fails after `timeout` with the
    /// last status seen. Used to wait for a report to carry a change to the master; what is
    /// then asserted never depends on how long it took.
    pub fn wait_master_status(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Status) -> bool,
    ) -> Result<Status, ClusterError> {
        let master = self.master()?.name.clone();
        let start = Instant::now();
        loop {
            let s = self.status(&master)?;
            if cond(&s) {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                return Err(ClusterError::NotReady {
                    what: what.to_owned(),
                    node: master,
                    waited: start.elapsed(),
                    last: format!("{:?}", s.nodes),
                    log: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` until node `observer` reports node `id` alive (`want`) or not.
    pub fn wait_liveness(&self, observer: &str, id: u32, want: bool) -> Result<(), ClusterError> {
        let timeout = Duration::from_secs(10);
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.status(observer) {
                Ok(s) if s.nodes.iter().any(|n| n.id == id && n.alive == want) => return Ok(()),
                Ok(s) => last = format!("{:?}", s.nodes),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(ClusterError::NotReady {
            what: format!("node {id} alive={want}"),
            node: observer.to_owned(),
            waited: start.elapsed(),
            last,
            log: String::new(),
        })
    }

    /// Fails if any daemon has exited, quoting its log.
    pub fn check_daemons(&mut self) -> Result<(), ClusterError> {
        if !self.daemons {
            return Ok(());
        }
        for node in self.nodes.clone() {
            let label = format!("tdscd-{}", node.name);
            if let Some(status) = self.lab.exited(&label)? {
                return Err(ClusterError::Exited {
                    what: "tdscd".into(),
                    node: node.name,
                    status,
                    log: self.lab.log_tail(&label, LOG_TAIL_LINES),
                });
            }
        }
        Ok(())
    }

    /// Requests a node's HTTP server served so far (asked over its own loopback).
    pub fn served(&self, node: &str) -> Result<u64, ClusterError> {
        served_in(&self.lab.netns(node), self.port).map_err(|reason| ClusterError::Status {
            node: node.to_owned(),
            reason,
        })
    }

    /// A cluster node by topology name.
    pub fn node(&self, name: &str) -> Result<&ClusterNode, ClusterError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ClusterError::NoSuchNode {
                node: name.to_owned(),
            })
    }

    /// A cluster node by node id.
    pub fn node_by_id(&self, id: u32) -> Option<&ClusterNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The node the static election config names master, or under Raft the one that says it
    /// is master now.
    pub fn master(&self) -> Result<&ClusterNode, ClusterError> {
        let id = match self.master_id {
            Some(id) => Some(id),
            None => self.current_master(None).map(|n| n.id),
        };
        id.and_then(|id| self.node_by_id(id))
            .ok_or_else(|| ClusterError::NoSuchNode {
                node: format!("master (id {id:?})"),
            })
    }

    /// Every cluster node, in topology order.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The clients, in topology order.
    pub fn clients(&self) -> &[Host] {
        &self.clients
    }

    /// The baseline server, if the topology has one.
    pub fn baseline(&self) -> Option<&Host> {
        self.baseline.as_ref()
    }

    /// The VIP and service port.
    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip, self.port)
    }

    /// The baseline server's address and the service port.
    pub fn baseline_addr(&self) -> Option<SocketAddrV4> {
        self.baseline
            .as_ref()
            .map(|b| SocketAddrV4::new(b.addr, self.port))
    }

    /// Namespaces of the client hosts.
    pub fn client_namespaces(&self) -> Vec<String> {
        self.clients().iter().map(|c| self.netns(&c.name)).collect()
    }

    /// Namespace of a topology node.
    pub fn netns(&self, node: &str) -> String {
        self.lab.netns(node)
    }

    /// Pid of a node's tdscd.
    pub fn daemon_pid(&self, node: &str) -> Result<u32, ClusterError> {
        Ok(self.lab.pid(&format!("tdscd-{node}"))?)
    }

    /// The cluster key file every node's config names.
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// The lab's cluster keyring, for tests that craft genuine forwards (as a master would).
    pub fn keyring(&self) -> Result<tdsc_proto::seal::Keyring, ClusterError> {
        let key = |reason: String| ClusterError::Key {
            path: self.key_file.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&self.key_file).map_err(|e| key(e.to_string()))?;
        tdsc_proto::seal::Keyring::parse(&text).map_err(|e| key(e.to_string()))
    }

    /// Points `node`'s config at another key file (takes effect at its next start).
    pub fn set_key_file(&self, node: &str, key_file: &Path) -> Result<(), ClusterError> {
        set_key_file(&self.node(node)?.config, key_file)
    }

    /// Last lines of a node's tdscd log.
    pub fn daemon_log_tail(&self, node: &str, lines: usize) -> String {
        self.lab.log_tail(&format!("tdscd-{node}"), lines)
    }

    /// The lab underneath.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The lab underneath, to attach hosts or start processes.
    pub fn lab_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }

    /// Stops everything and removes the lab, reporting every failure.
    pub fn teardown(self) -> Result<(), TeardownError> {
        self.lab.teardown()
    }
}

/// Requests served so far by the lab's HTTP server listening on `port` in namespace `ns`
/// (asked over the namespace's loopback: `GET /__served`).
pub fn served_in(ns: &str, port: u16) -> Result<u64, String> {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let reply = netns::run_in(ns, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(&crate::http::request_bytes("/__served"))?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok::<_, std::io::Error>(raw)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("/__served: {e}"))?;
    reply
        .lines()
        .find_map(|l| l.strip_prefix("served="))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("/__served reply without a count: {reply:?}"))
}

/// What the harness needs to know from a node's config.
#[derive(Debug)]
struct NodeFacts {
    node_id: u32,
    vip: Ipv4Addr,
    port: u16,
    master: Option<u32>,
}

/// Copies a node config to `dst`, pointing `[control].socket` at `socket` (and
/// `[control].host_state` at the same path with extension `host-state`) and optionally
/// replacing the policy, and the election with Raft keeping its state in `raft_dir`.
fn write_node_config(
    src: &Path,
    dst: &Path,
    socket: &Path,
    key_file: &Path,
    policy: Option<&str>,
    load_file: Option<&Path>,
    raft_dir: Option<&Path>,
) -> Result<NodeFacts, ClusterError> {
    let bad = |reason: String| ClusterError::Config {
        path: src.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(src).map_err(|e| bad(e.to_string()))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.to_string()))?;
    let node_id = table
        .get("node_id")
        .and_then(toml::Value::as_integer)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| bad("no node_id".into()))?;
    let cluster = table
        .get_mut("cluster")
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| bad("no [cluster]".into()))?;
    cluster.insert(
        "key_file".into(),
        toml::Value::String(key_file.display().to_string()),
    );
    let vip = cluster
        .get("vip")
        .and_then(toml::Value::as_str)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no IPv4 cluster.vip".into()))?;
    let port = cluster
        .get("tcp_ports")
        .and_then(toml::Value::as_array)
        .and_then(|a| a.first())
        .and_then(toml::Value::as_integer)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| bad("no cluster.tcp_ports".into()))?;
    if let Some(dir) = raft_dir {
        let mut election = toml::Table::new();
        election.insert("mode".into(), toml::Value::String("raft".into()));
        election.insert(
            "data_dir".into(),
            toml::Value::String(dir.display().to_string()),
        );
        table.insert("election".into(), toml::Value::Table(election));
    }
    let master = table
        .get("election")
        .and_then(|e| e.get("master"))
        .and_then(toml::Value::as_integer)
        .and_then(|m| u32::try_from(m).ok());
    let control = table
        .entry("control")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| bad("[control] is not a table".into()))?;
    control.insert(
        "socket".into(),
        toml::Value::String(socket.display().to_string()),
    );
    // The host state file beside it (`node1.host-state`): the nodes share one filesystem.
    control.insert(
        "host_state".into(),
        toml::Value::String(socket.with_extension("host-state").display().to_string()),
    );
    if policy.is_some() || load_file.is_some() {
        let scheduler = table
            .entry("scheduler")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| bad("[scheduler] is not a table".into()))?;
        if let Some(policy) = policy {
            scheduler.insert("policy".into(), toml::Value::String(policy.to_owned()));
        }
        if let Some(f) = load_file {
            scheduler.insert(
                "load_file".into(),
                toml::Value::String(f.display().to_string()),
            );
        }
    }
    let out = toml::to_string(&table).map_err(|e| bad(e.to_string()))?;
    std::fs::write(dst, out).map_err(|source| ClusterError::Write {
        path: dst.to_owned(),
        source,
    })?;
    Ok(NodeFacts {
        node_id,
        vip,
        port,
        master,
    })
}

/// Writes a new cluster key file with one key of id `id` at `path` (replacing any), mode
/// 0600 as the daemon demands.
/// A forward counter for a crafted forward: the wall clock in nanoseconds, like a master's.
/// It is ahead of every counter the lab's master has used (it started counting at its start),
/// so the receiver's replay window accepts it; the master's own forwards to that receiver in
/// the same term are then refused as replays, so craft them last or to a node the master will
/// not forward to in that term.
pub fn forward_counter_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub fn write_key_file(path: &Path, id: u8) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |source| ClusterError::Write {
        path: path.to_owned(),
        source,
    };
    let text = tdsc_proto::seal::Keyring::generate_text(id)
        .map_err(|e| write(std::io::Error::other(e.to_string())))?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(write(e)),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write)?;
    f.write_all(text.as_bytes()).map_err(write)
}

/// Sets `[cluster] key_file` of the config at `path`.
fn set_key_file(path: &Path, key_file: &Path) -> Result<(), ClusterError> {
    let bad = |reason: String| ClusterError::Config {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.to_string()))?;
    table
        .get_mut("cluster")
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| bad("no [cluster]".into()))?
        .insert(
            "key_file".into(),
            toml::Value::String(key_file.display().to_string()),
        );
    let out = toml::to_string(&table).map_err(|e| bad(e.to_string()))?;
    std::fs::write(path, out).map_err(|source| ClusterError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Sets `keys` in the `[section]` table of the node config at `path` (nothing if empty).
fn add_keys(
    path: &Path,
    section: &str,
    keys: &[(String, toml::Value)],
) -> Result<(), ClusterError> {
    if keys.is_empty() {
        return Ok(());
    }
    let bad = |reason: String| ClusterError::Config {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.to_string()))?;
    let t = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| bad(format!("[{section}] is not a table")))?;
    for (k, v) in keys {
        t.insert(k.clone(), v.clone());
    }
    let out = toml::to_string(&table).map_err(|e| bad(e.to_string()))?;
    std::fs::write(path, out).map_err(|source| ClusterError::Write {
        path: path.to_owned(),
        source,
    })
}

fn check_config(tdscd: &Path, config: &Path) -> Result<(), ClusterError> {
    let out = Command::new(tdscd)
        .arg("--config")
        .arg(config)
        .arg("--check-config")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::CheckConfig {
            path: config.to_owned(),
            output: format!("cannot run {}: {e}", tdscd.display()),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::CheckConfig {
            path: config.to_owned(),
            output: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_config_is_rewritten_and_read() {
        let dir = std::env::temp_dir().join(unique_lab_name("tdsc-unit"));
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/containerlab/node2.toml");
        let dst = dir.join("node2.toml");
        let facts = write_node_config(
            &src,
            &dst,
            &dir.join("n2.sock"),
            &dir.join("cluster.key"),
            Some("least-connections"),
            None,
            None,
        )
        .unwrap();
        assert_eq!(facts.node_id, 2);
        assert_eq!(facts.vip, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(facts.port, 80);
        assert_eq!(facts.master, Some(1));
        let written: toml::Table = std::fs::read_to_string(&dst).unwrap().parse().unwrap();
        assert_eq!(
            written["control"]["socket"].as_str(),
            Some(dir.join("n2.sock").to_str().unwrap())
        );
        assert_eq!(
            written["control"]["host_state"].as_str(),
            Some(dir.join("n2.host-state").to_str().unwrap())
        );
        assert_eq!(
            written["scheduler"]["policy"].as_str(),
            Some("least-connections")
        );
        assert_eq!(written["nodes"].as_array().unwrap().len(), 3);
        assert_eq!(
            written["cluster"]["key_file"].as_str(),
            Some(dir.join("cluster.key").to_str().unwrap())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
