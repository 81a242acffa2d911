//! The docker engine: a [`Topology`] deployed as real containers, doing for it what
//! `containerlab deploy` does, on a Docker engine whose own networking is off.
//!
//! | containerlab                         | here                                              |
//! |--------------------------------------|---------------------------------------------------|
//! | `kind: linux` node `N`               | container `clab-<lab>-N` from the node's `image`, `--network none` (the topology's `network-mode`), hostname `N`, containerlab's labels and `CLAB_*` variables, the node's `env`, `binds`, `sysctls` and `cmd` |
//! | the container's network namespace    | pinned as `/run/netns/clab-<lab>-N`, a symlink to `/proc/<pid>/ns/net`, as containerlab does; it dies with the container |
//! | `kind: bridge` node `B` (host netns) | a bridge `B` in a namespace `clab-<lab>-B` of its own |
//! | link `a:ethX` — `b:ethY`             | veth pair created directly in the two namespaces, both ends up |
//! | `exec`                               | `docker exec`, after the links, in file order     |
//!
//! The pinned namespace is what makes the namespace engine's tools work unchanged on a
//! container: `ip -n`, `ip netns exec` and [`crate::netns::run_in`] reach it by the same name.
//! The bridges get a namespace of their own because containerlab expects them in the host
//! namespace, and tests never touch the host's links.
//!
//! containerlab sets, on every container, the labels `containerlab`, `clab-node-name`,
//! `clab-node-kind`, `clab-node-type`, `clab-node-group`, `clab-node-lab-dir` and
//! `clab-topo-file` beside the node's own, each label also as a `CLAB_LABEL_<KEY>` variable
//! (upper case, other characters than letters and digits as `_`), and `CLAB_INTFS`, the number
//! of the node's link endpoints. `CLAB_INTFS_WITH_MGMT` counts the management interface too;
//! under `network-mode: none` there is none, so both are the same number here.
//!
//! **Privileges.** containerlab starts `linux` nodes `--privileged`. This machine refuses that
//! (one capability is not available to the sandbox, docs/platform.md), so every container gets
//! `--cap-add ALL --cap-drop SYS_RESOURCE` with seccomp, AppArmor and the system paths
//! unconfined instead (`systempaths=unconfined` leaves `/proc/sys` writable, as `--privileged`
//! does: tdscd sets its namespace's sysctls), which covers the topology's `cap-add`.
//!
//! [`DockerLab`] is the guard: dropping it (also while unwinding from a panic) removes the
//! containers, the namespace links and the bridge namespaces, and reports every failure rather
//! than stopping at the first. [`destroy`] does the same from the topology alone, for a lab a
//! earlier process deployed. Neither touches images or the Docker engine itself.
//!
//! [`DockerCluster`] is the tcp-dsc lab on top, as [`crate::cluster::Cluster`] is for the
//! namespace engine: the topology's `cmd` starts `tdscd` in each cluster node; the harness adds
//! the lab's HTTP server in each (`docker exec -d`), reads each node's control socket through a
//! bind of its runtime directory, and waits until every daemon and server answers.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bins::{BinDir, BinError};
use crate::cluster::{served_in, write_key_file, ClusterError, ClusterNode, Host};
use crate::lab::TeardownError;
use crate::netns::{self, NetnsError};
use crate::status::Status;
use crate::topology::{Kind, Role, Topology, TopologyError, DAEMON_CONFIG_PATH};

/// The Debian `docker.io` client. Another `docker` may be first on `PATH`.
pub const DEFAULT_DOCKER: &str = "/usr/bin/docker";

/// Container path of the cluster key every node's topology entry binds.
pub const KEY_PATH: &str = "/etc/tdsc/cluster.key";

/// tdscd's runtime directory in a node (control socket, host state record); the harness binds
/// a directory of its own there to reach the control socket from the host.
pub const RUNTIME_DIR: &str = "/run/tdsc";

/// Lines of a container's log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// Why deploying, querying or destroying a docker lab failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Bin(#[from] BinError),
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`docker {args}` failed ({status}): {stderr}")]
    Docker {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("node {node} has no image")]
    NoImage { node: String },
    #[error("node {node}: bind source {path} does not exist")]
    MissingBind { node: String, path: PathBuf },
    #[error("container {name} reported pid {pid:?}")]
    BadPid { name: String, pid: String },
    #[error("container {name} already exists (a stale lab?): `tdsc-lab --engine docker destroy`")]
    Exists { name: String },
    #[error("cannot create or use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{what} on {node} not ready after {waited:?}: {last}\n--- container log ---\n{log}")]
    NotReady {
        what: String,
        node: String,
        waited: Duration,
        last: String,
        log: String,
    },
    #[error("container of {node} is not running\n--- container log ---\n{log}")]
    Stopped { node: String, log: String },
    #[error("no cluster node named {node:?}")]
    NoSuchNode { node: String },
    #[error("topology has no cluster node (label tdsc.role: node)")]
    NoNodes,
}

/// The `docker` client, talking to the engine `DOCKER_HOST` names (or the default socket).
#[derive(Debug, Clone)]
pub struct Docker {
    program: PathBuf,
}

impl Docker {
    /// A client running `program`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Docker {
            program: program.into(),
        }
    }

    /// Runs `docker ARGS…` to completion and returns its stdout, trimmed.
    pub fn run<S: AsRef<str>>(&self, args: &[S]) -> Result<String, DockerError> {
        let out = Command::new(&self.program)
            .args(args.iter().map(AsRef::as_ref))
            .stdin(Stdio::null())
            .output()
            .map_err(|source| DockerError::Spawn {
                program: self.program.display().to_string(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(DockerError::Docker {
                args: args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Whether the engine answers (`docker info`).
    pub fn available(&self) -> bool {
        self.run(&["info", "--format", "{{.ID}}"]).is_ok()
    }

    /// Whether a container runs.
    pub fn running(&self, name: &str) -> bool {
        self.run(&["inspect", "-f", "{{.State.Running}}", name])
            .is_ok_and(|s| s == "true")
    }

    /// The last `lines` lines of a container's output (stdout and stderr).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let out = Command::new(&self.program)
            .args(["logs", "--tail", &lines.to_string(), name])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(docker logs: {e})"),
        }
    }
}

/// What the deployer adds to the topology: the host side of some binds replaced, and binds of
/// its own. Both by container path.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    /// Host file to bind instead of the topology's, per node and container path.
    pub bind_overrides: BTreeMap<(String, String), PathBuf>,
    /// Extra `host:container` binds, per node.
    pub extra_binds: BTreeMap<String, Vec<(PathBuf, String)>>,
    /// A directory of the caller's (configs, keys, runtime directories) that goes with the
    /// lab: removed on teardown unless `TDSC_LAB_KEEP_WORKDIR` is set.
    pub workdir: Option<PathBuf>,
}

/// containerlab's label key turned into an environment variable name: upper case, every
/// character other than a letter or digit as `_`.
fn env_key(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The labels containerlab puts on a node's container, then the node's own.
fn labels(topo: &Topology, node: &str, topo_file: &Path, lab_dir: &Path) -> Vec<(String, String)> {
    let mut labels = vec![
        ("containerlab".to_owned(), topo.name.clone()),
        ("clab-node-name".to_owned(), node.to_owned()),
        ("clab-node-kind".to_owned(), "linux".to_owned()),
        ("clab-node-type".to_owned(), String::new()),
        ("clab-node-group".to_owned(), String::new()),
        (
            "clab-node-lab-dir".to_owned(),
            lab_dir.join(node).display().to_string(),
        ),
        ("clab-topo-file".to_owned(), topo_file.display().to_string()),
    ];
    labels.extend(
        topo.nodes[node]
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    labels
}

/// The `docker run` arguments for one `linux` node (pure: the unit tests check them).
/// `topo_file` is the topology's path and `lab_dir` containerlab's lab directory
/// (`clab-<lab>/` beside the topology), both only named in labels.
pub fn run_args(
    topo: &Topology,
    node: &str,
    topo_file: &Path,
    lab_dir: &Path,
    opts: &DeployOptions,
) -> Result<Vec<String>, DockerError> {
    let n = &topo.nodes[node];
    let image = n.image.clone().ok_or_else(|| DockerError::NoImage {
        node: node.to_owned(),
    })?;
    let name = topo.netns_name(node);
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &name,
        "--hostname",
        node,
        "--network",
        "none",
        "--cap-add",
        "ALL",
        "--cap-drop",
        "SYS_RESOURCE",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        // /proc/sys writable, as under --privileged: tdscd sets the namespace's own conntrack
        // and rp_filter sysctls, which Docker otherwise mounts read-only.
        "--security-opt",
        "systempaths=unconfined",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let labels = labels(topo, node, topo_file, lab_dir);
    for (k, v) in &labels {
        args.push("--label".into());
        args.push(format!("{k}={v}"));
    }
    let endpoints = topo.links_of(node).count().to_string();
    let mut env: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (format!("CLAB_LABEL_{}", env_key(k)), v.clone()))
        .collect();
    env.insert("CLAB_INTFS".into(), endpoints.clone());
    env.insert("CLAB_INTFS_WITH_MGMT".into(), endpoints);
    env.extend(n.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    for (k, v) in &env {
        args.push("--env".into());
        args.push(format!("{k}={v}"));
    }
    for (k, v) in &n.sysctls {
        args.push("--sysctl".into());
        args.push(format!("{k}={v}"));
    }
    for b in &n.binds {
        let host = opts
            .bind_overrides
            .get(&(node.to_owned(), b.container.clone()))
            .unwrap_or(&b.host);
        if !host.exists() {
            return Err(DockerError::MissingBind {
                node: node.to_owned(),
                path: host.clone(),
            });
        }
        let opt = b
            .options
            .as_ref()
            .map(|o| format!(":{o}"))
            .unwrap_or_default();
        args.push("--volume".into());
        args.push(format!("{}:{}{opt}", host.display(), b.container));
    }
    for (host, container) in opts.extra_binds.get(node).into_iter().flatten() {
        args.push("--volume".into());
        args.push(format!("{}:{container}", host.display()));
    }
    args.push(image);
    // containerlab splits `cmd` like a shell; the topology's commands have no quoting.
    if let Some(cmd) = &n.cmd {
        args.extend(cmd.split_whitespace().map(str::to_owned));
    }
    Ok(args)
}

/// A deployed topology. Owns its containers, namespace links and bridge namespaces; see the
/// module docs for what [`Drop`] does.
#[derive(Debug)]
pub struct DockerLab {
    topology: Topology,
    docker: Docker,
    /// See [`DeployOptions::workdir`].
    workdir: Option<PathBuf>,
    /// Set once teardown ran or [`DockerLab::keep`] disarmed it.
    done: bool,
}

impl DockerLab {
    /// Deploys the topology: the containers, then the bridges, the links and the `exec`
    /// lines, in containerlab's order. On failure, whatever was made is removed.
    pub fn deploy(
        topology: Topology,
        topo_file: &Path,
        docker: Docker,
        opts: &DeployOptions,
    ) -> Result<DockerLab, DockerError> {
        ensure_free(&topology, &docker)?;
        let mut lab = DockerLab {
            topology,
            docker,
            workdir: opts.workdir.clone(),
            done: false,
        };
        // On error `lab` is dropped here, which removes the partial lab.
        lab.build(topo_file, opts)?;
        Ok(lab)
    }

    fn build(&mut self, topo_file: &Path, opts: &DeployOptions) -> Result<(), DockerError> {
        let topo = self.topology.clone();
        let lab_dir = topo_file
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("clab-{}", topo.name));
        std::fs::create_dir_all(netns::NETNS_RUN_DIR).map_err(|source| DockerError::Io {
            path: netns::NETNS_RUN_DIR.into(),
            source,
        })?;
        for (name, node) in &topo.nodes {
            let ns = topo.netns_name(name);
            match node.kind {
                Kind::Linux => {
                    let args = run_args(&topo, name, topo_file, &lab_dir, opts)?;
                    self.docker.run(&args)?;
                    let pid = self.docker.run(&["inspect", "-f", "{{.State.Pid}}", &ns])?;
                    if pid.parse::<u32>().map_or(true, |p| p == 0) {
                        return Err(DockerError::BadPid { name: ns, pid });
                    }
                    let link = netns::netns_path(&ns);
                    std::os::unix::fs::symlink(format!("/proc/{pid}/ns/net"), &link).map_err(
                        |source| DockerError::Io {
                            path: link.clone(),
                            source,
                        },
                    )?;
                }
                Kind::Bridge => {
                    netns::add(&ns)?;
                    // The same bridge as the namespace engine's.
                    crate::lab::add_bridge(&ns, name)?;
                }
            }
        }
        // The same links as the namespace engine makes (its default: no flow steering).
        crate::lab::link_topology(&topo, false)?;
        for (name, node) in &topo.nodes {
            let ctr = topo.netns_name(name);
            for line in &node.exec {
                let mut args = vec!["exec".to_owned(), ctr.clone()];
                args.extend(line.split_whitespace().map(str::to_owned));
                self.docker.run(&args)?;
            }
        }
        Ok(())
    }

    /// The deployed topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The docker client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Container (and namespace) name of a node.
    pub fn container(&self, node: &str) -> String {
        self.topology.netns_name(node)
    }

    /// Leaves the lab deployed when this guard goes (for `tdsc-lab --engine docker deploy`;
    /// [`destroy`] removes it later), its work directory too.
    pub fn keep(mut self) {
        self.done = true;
    }

    /// Removes the lab and its work directory, returning every error met.
    pub fn teardown(mut self) -> Result<(), TeardownError> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<(), TeardownError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut errors = match destroy(&self.topology, &self.docker) {
            Ok(()) => Vec::new(),
            Err(e) => e.errors,
        };
        if let Some(dir) = &self.workdir {
            remove_workdir(dir, &mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TeardownError { errors })
        }
    }
}

impl Drop for DockerLab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!(
                "tdsc-lab: teardown of docker lab {}: {e}",
                self.topology.name
            );
        }
    }
}

/// Fails if a container or namespace of the lab exists already (a lab of that name runs, or
/// an earlier one was not destroyed).
fn ensure_free(topo: &Topology, docker: &Docker) -> Result<(), DockerError> {
    for (name, node) in &topo.nodes {
        let ns = topo.netns_name(name);
        let taken = (node.kind == Kind::Linux && docker.run(&["inspect", &ns]).is_ok())
            || netns::exists(&ns)
            || netns::netns_path(&ns).is_symlink();
        if taken {
            return Err(DockerError::Exists { name: ns });
        }
    }
    Ok(())
}

/// Removes what [`DockerLab::deploy`] made for this topology, whoever made it: the containers
/// labelled `containerlab=<lab>` (with their anonymous volumes), the namespace links of the
/// `linux` nodes and the bridge namespaces (their veths go with them). Leaves images and the
/// engine alone. Every error is collected; nothing there is not an error.
pub fn destroy(topo: &Topology, docker: &Docker) -> Result<(), TeardownError> {
    let mut errors = Vec::new();
    match docker.run(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=containerlab={}", topo.name),
    ]) {
        Ok(ids) => {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids);
                if let Err(e) = docker.run(&args) {
                    errors.push(format!("remove containers: {e}"));
                }
            }
        }
        Err(e) => errors.push(format!("list containers: {e}")),
    }
    for (name, node) in &topo.nodes {
        let ns = topo.netns_name(name);
        let path = netns::netns_path(&ns);
        match node.kind {
            Kind::Linux if path.is_symlink() => {
                if let Err(e) = std::fs::remove_file(&path) {
                    errors.push(format!("remove {}: {e}", path.display()));
                }
            }
            Kind::Bridge if netns::exists(&ns) => {
                if let Err(e) = netns::delete(&ns) {
                    errors.push(format!("delete netns {ns}: {e}"));
                }
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(TeardownError { errors })
    }
}

/// How to deploy the tcp-dsc lab on Docker.
#[derive(Debug, Clone)]
pub struct DockerClusterOptions {
    /// Topology file; default: `deploy/containerlab/tdsc.clab.yml` of this repository.
    pub topology: PathBuf,
    /// Lab name; default: the topology's own name.
    pub lab_name: Option<String>,
    /// The docker client.
    pub docker: PathBuf,
    /// Bind every node a copy of its config with `[election] mode = "raft"` (default timing,
    /// default data directory) instead of the topology's file.
    pub raft: bool,
    /// Bind every node a fresh cluster key from the lab's work directory instead of the
    /// topology's `cluster.key`.
    pub fresh_key: bool,
    /// How long each daemon and server may take to become ready.
    pub ready_timeout: Duration,
}

impl Default for DockerClusterOptions {
    fn default() -> Self {
        DockerClusterOptions {
            topology: crate::cluster::default_topology_path(),
            lab_name: None,
            docker: DEFAULT_DOCKER.into(),
            raft: false,
            fresh_key: false,
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// The tcp-dsc lab deployed as containers. See the module docs.
#[derive(Debug)]
pub struct DockerCluster {
    lab: DockerLab,
    bins: BinDir,
    nodes: Vec<ClusterNode>,
    clients: Vec<Host>,
    vip: Ipv4Addr,
    port: u16,
}

impl DockerCluster {
    /// Deploys the topology, starts the HTTP servers, and waits until every daemon answers,
    /// one is master, and the master reports every node alive.
    pub fn deploy(opts: &DockerClusterOptions) -> Result<DockerCluster, DockerError> {
        let bins = BinDir::locate()?;
        bins.path("tdscctl")?;
        let mut topology = Topology::load(&opts.topology)?;
        if let Some(name) = &opts.lab_name {
            topology = topology.renamed(name)?;
        }
        let docker = Docker::new(&opts.docker);
        // Before the work directory is made: a running lab of that name uses the same one.
        ensure_free(&topology, &docker)?;
        let workdir = std::env::temp_dir().join(&topology.name);
        std::fs::create_dir_all(&workdir).map_err(|source| DockerError::Io {
            path: workdir.clone(),
            source,
        })?;
        let mut deploy = DeployOptions {
            workdir: Some(workdir.clone()),
            ..DeployOptions::default()
        };
        if opts.fresh_key {
            let key = workdir.join("cluster.key");
            write_key_file(&key, 1)?;
            for name in topology.nodes_with_role(Role::ClusterNode) {
                deploy
                    .bind_overrides
                    .insert((name.to_owned(), KEY_PATH.to_owned()), key.clone());
            }
        }
        let mut nodes = Vec::new();
        let mut vip = None;
        let mut port = None;
        for name in topology.nodes_with_role(Role::ClusterNode) {
            let node = &topology.nodes[name];
            let src = node
                .bind_for(DAEMON_CONFIG_PATH)
                .ok_or_else(|| ClusterError::NoConfig {
                    node: name.to_owned(),
                })?;
            let facts = read_config(src)?;
            if opts.raft {
                let dst = workdir.join(format!("{name}.toml"));
                write_raft_config(src, &dst)?;
                deploy
                    .bind_overrides
                    .insert((name.to_owned(), DAEMON_CONFIG_PATH.to_owned()), dst);
            }
            let run = workdir.join(format!("{name}-run"));
            std::fs::create_dir_all(&run).map_err(|source| DockerError::Io {
                path: run.clone(),
                source,
            })?;
            deploy
                .extra_binds
                .entry(name.to_owned())
                .or_default()
                .push((run.clone(), RUNTIME_DIR.to_owned()));
            vip.get_or_insert(facts.vip);
            port.get_or_insert(facts.port);
            nodes.push(ClusterNode {
                name: name.to_owned(),
                id: facts.node_id,
                config: src.to_owned(),
                socket: run.join(&facts.socket_name),
                cluster_addr: node
                    .ipv4_addresses()
                    .iter()
                    .find(|(_, _, dev)| dev == "eth1")
                    .map(|(a, _, _)| *a),
                load_file: None,
            });
        }
        let (Some(vip), Some(port)) = (vip, port) else {
            return Err(DockerError::NoNodes);
        };
        let clients = topology
            .nodes_with_role(Role::Client)
            .into_iter()
            .filter_map(|name| {
                topology.nodes[name].first_ipv4().map(|addr| Host {
                    name: name.to_owned(),
                    addr,
                })
            })
            .collect();
        let topo_file = opts
            .topology
            .canonicalize()
            .unwrap_or_else(|_| opts.topology.clone());
        let lab = DockerLab::deploy(topology, &topo_file, docker, &deploy)?;
        let cluster = DockerCluster {
            lab,
            bins,
            nodes,
            clients,
            vip,
            port,
        };
        // The lab's HTTP server on every cluster node, on the wildcard address (the VIP may
        // not be there yet); the baseline server's is its topology `cmd`.
        let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).to_string();
        for n in &cluster.nodes {
            let (id, ctr) = (n.id.to_string(), cluster.lab.container(&n.name));
            let args = [
                "exec",
                "-d",
                &ctr,
                "tdsc-lab-httpd",
                "--listen",
                &listen,
                "--id",
                &id,
                "--fastopen",
            ];
            cluster.lab.docker.run(&args).map_err(|e| {
                if cluster.lab.docker.running(&ctr) {
                    e
                } else {
                    // Its tdscd (the container's first process) has exited: say why.
                    DockerError::Stopped {
                        node: n.name.clone(),
                        log: cluster.lab.docker.log_tail(&ctr, LOG_TAIL_LINES),
                    }
                }
            })?;
        }
        for n in cluster.nodes.clone() {
            cluster.wait(&n.name, "tdsc-lab-httpd", opts.ready_timeout, |c| {
                served_in(&c.lab.container(&n.name), c.port).map(drop)
            })?;
            cluster.wait(&n.name, "tdscd", opts.ready_timeout, |c| {
                c.status(&n.name).map(drop).map_err(|e| e.to_string())
            })?;
        }
        let master = cluster.wait_master(None, opts.ready_timeout)?;
        cluster.wait(
            &master.name,
            "every node alive",
            opts.ready_timeout,
            |c| match c.status(&master.name) {
                Ok(s) if !s.nodes.is_empty() && s.nodes.iter().all(|n| n.alive) => Ok(()),
                Ok(s) => Err(format!("{:?}", s.nodes)),
                Err(e) => Err(e.to_string()),
            },
        )?;
        Ok(cluster)
    }

    /// Polls `probe` until it succeeds; fails early, with the container's log, if the
    /// node's container stops, and after `timeout` with the last probe error.
    fn wait(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        probe: impl Fn(&Self) -> Result<(), String>,
    ) -> Result<(), DockerError> {
        let start = Instant::now();
        loop {
            let last = match probe(self) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let ctr = self.lab.container(node);
            if !self.lab.docker.running(&ctr) {
                return Err(DockerError::Stopped {
                    node: node.to_owned(),
                    log: self.lab.docker.log_tail(&ctr, LOG_TAIL_LINES),
                });
            }
            if start.elapsed() > timeout {
                return Err(DockerError::NotReady {
                    what: what.to_owned(),
                    node: node.to_owned(),
                    waited: start.elapsed(),
                    last,
                    log: self.lab.docker.log_tail(&ctr, LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `tdscctl status --json` of a node, through its bound control socket.
    pub fn status(&self, node: &str) -> Result<Status, DockerError> {
        let n = self.node(node)?;
        crate::status::query(&self.bins.path("tdscctl")?, &n.socket).map_err(|reason| {
            ClusterError::Status {
                node: node.to_owned(),
                reason,
            }
            .into()
        })
    }

    /// The node that says it is master, if exactly one (other than `excluding`) does.
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
    ) -> Result<ClusterNode, DockerError> {
        let start = Instant::now();
        loop {
            if let Some(m) = self.current_master(excluding) {
                return Ok(m);
            }
            if start.elapsed() > timeout {
                return Err(DockerError::NoSuchNode {
                    node: format!("master (none within {timeout:?})"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to 10 s until node `observer` reports node `id` alive (`want`) or not.
    pub fn wait_liveness(&self, observer: &str, id: u32, want: bool) -> Result<(), DockerError> {
        self.wait(
            observer,
            &format!("node {id} alive={want}"),
            Duration::from_secs(10),
            |c| match c.status(observer) {
                Ok(s) if s.nodes.iter().any(|n| n.id == id && n.alive == want) => Ok(()),
                Ok(s) => Err(format!("{:?}", s.nodes)),
                Err(e) => Err(e.to_string()),
            },
        )
    }

    /// SIGKILL to a node's tdscd. It is its container's first process (the entrypoint execs
    /// the topology's `cmd`), so the container stops with it, as it would under containerlab,
    /// and the node's namespace and links go with it. Waits until the container has stopped.
    pub fn kill_daemon(&self, node: &str) -> Result<(), DockerError> {
        let ctr = self.lab.container(node);
        self.lab.docker.run(&["kill", "--signal", "KILL", &ctr])?;
        self.lab.docker.run(&["wait", &ctr])?;
        Ok(())
    }

    /// Fails if a cluster node's container (and so its tdscd) has stopped, quoting its log.
    /// Nodes in `except` are not checked.
    pub fn check_daemons(&self, except: &[&str]) -> Result<(), DockerError> {
        for n in &self.nodes {
            let ctr = self.lab.container(&n.name);
            if !except.contains(&n.name.as_str()) && !self.lab.docker.running(&ctr) {
                return Err(DockerError::Stopped {
                    node: n.name.clone(),
                    log: self.lab.docker.log_tail(&ctr, LOG_TAIL_LINES),
                });
            }
        }
        Ok(())
    }

    /// Requests a node's HTTP server served so far.
    pub fn served(&self, node: &str) -> Result<u64, DockerError> {
        served_in(&self.lab.container(node), self.port).map_err(|reason| {
            ClusterError::Status {
                node: node.to_owned(),
                reason,
            }
            .into()
        })
    }

    /// A cluster node by topology name.
    pub fn node(&self, name: &str) -> Result<&ClusterNode, DockerError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| DockerError::NoSuchNode {
                node: name.to_owned(),
            })
    }

    /// Every cluster node, in topology order.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// Namespaces (pinned container namespaces) of the clients.
    pub fn client_namespaces(&self) -> Vec<String> {
        self.clients
            .iter()
            .map(|c| self.lab.container(&c.name))
            .collect()
    }

    /// The VIP and service port.
    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip, self.port)
    }

    /// The lab underneath.
    pub fn lab(&self) -> &DockerLab {
        &self.lab
    }

    /// The last lines of a node's container log (its tdscd's output).
    pub fn daemon_log_tail(&self, node: &str, lines: usize) -> String {
        self.lab.docker.log_tail(&self.lab.container(node), lines)
    }

    /// Leaves the lab deployed (see [`DockerLab::keep`]); its work directory stays too.
    pub fn keep(self) {
        self.lab.keep();
    }

    /// Removes the lab and its work directory, reporting every failure.
    pub fn teardown(self) -> Result<(), TeardownError> {
        self.lab.teardown()
    }
}

/// Removes a lab's work directory (kept with `TDSC_LAB_KEEP_WORKDIR`), noting a failure.
fn remove_workdir(dir: &Path, errors: &mut Vec<String>) {
    let keep = std::env::var_os("TDSC_LAB_KEEP_WORKDIR").is_some();
    if !keep && dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }
}

/// What the harness reads from a node's config.
struct ConfigFacts {
    node_id: u32,
    vip: Ipv4Addr,
    port: u16,
    /// File name of `[control] socket`, which must be in [`RUNTIME_DIR`].
    socket_name: String,
}

fn read_table(path: &Path) -> Result<toml::Table, DockerError> {
    let text = std::fs::read_to_string(path).map_err(|source| DockerError::Io {
        path: path.to_owned(),
        source,
    })?;
    text.parse()
        .map_err(|e: toml::de::Error| DockerError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

fn read_config(path: &Path) -> Result<ConfigFacts, DockerError> {
    let bad = |reason: &str| DockerError::Config {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let t = read_table(path)?;
    let node_id = t
        .get("node_id")
        .and_then(toml::Value::as_integer)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| bad("no node_id"))?;
    let cluster = t.get("cluster").ok_or_else(|| bad("no [cluster]"))?;
    let vip = cluster
        .get("vip")
        .and_then(toml::Value::as_str)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no IPv4 cluster.vip"))?;
    let port = cluster
        .get("tcp_ports")
        .and_then(toml::Value::as_array)
        .and_then(|a| a.first())
        .and_then(toml::Value::as_integer)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| bad("no cluster.tcp_ports"))?;
    let socket = t
        .get("control")
        .and_then(|c| c.get("socket"))
        .and_then(toml::Value::as_str)
        .unwrap_or("/run/tdsc/tdscd.sock");
    let socket_name = Path::new(socket)
        .strip_prefix(RUNTIME_DIR)
        .ok()
        .and_then(|p| p.to_str())
        .filter(|p| !p.is_empty() && !p.contains('/'))
        .ok_or_else(|| bad("[control] socket is not a file in /run/tdsc"))?
        .to_owned();
    Ok(ConfigFacts {
        node_id,
        vip,
        port,
        socket_name,
    })
}

/// Copies a node config with its `[election]` replaced by `mode = "raft"` (default timing and
/// data directory, which tdscd creates).
fn write_raft_config(src: &Path, dst: &Path) -> Result<(), DockerError> {
    let mut t = read_table(src)?;
    let mut election = toml::Table::new();
    election.insert("mode".into(), toml::Value::String("raft".into()));
    t.insert("election".into(), toml::Value::Table(election));
    let text = toml::to_string(&t).map_err(|e| DockerError::Config {
        path: src.to_owned(),
        reason: e.to_string(),
    })?;
    std::fs::write(dst, text).map_err(|source| DockerError::Io {
        path: dst.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        Topology::load(&crate::cluster::default_topology_path())
            .unwrap()
            .renamed("t1")
            .unwrap()
    }

    #[test]
    fn a_node_gets_what_containerlab_gives_it() {
        let t = topo();
        let dir = std::env::temp_dir().join(crate::cluster::unique_lab_name("tdsc-unit-docker"));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("cluster.key");
        std::fs::write(&key, "").unwrap();
        let mut opts = DeployOptions::default();
        opts.bind_overrides
            .insert(("node2".into(), KEY_PATH.into()), key.clone());
        opts.extra_binds
            .insert("node2".into(), vec![(dir.join("run"), RUNTIME_DIR.into())]);
        let file = Path::new("/lab/tdsc.clab.yml");
        let args = run_args(&t, "node2", file, Path::new("/lab/clab-t1"), &opts).unwrap();
        let has = |pair: &[&str]| args.windows(2).any(|w| w[0] == pair[0] && w[1] == pair[1]);
        assert!(has(&["--name", "clab-t1-node2"]), "{args:?}");
        assert!(has(&["--hostname", "node2"]));
        assert!(has(&["--network", "none"]));
        assert!(has(&["--cap-add", "ALL"]));
        assert!(has(&["--cap-drop", "SYS_RESOURCE"]));
        assert!(has(&["--label", "containerlab=t1"]));
        assert!(has(&["--label", "tdsc.role=node"]));
        assert!(has(&["--env", "CLAB_LABEL_CLAB_NODE_NAME=node2"]));
        assert!(has(&["--env", "CLAB_LABEL_TDSC_ROLE=node"]));
        assert!(has(&[
            "--env",
            "CLAB_LABEL_CLAB_TOPO_FILE=/lab/tdsc.clab.yml"
        ]));
        // eth0 on br-client, eth1 on br-cluster.
        assert!(has(&["--env", "CLAB_INTFS=2"]));
        assert!(has(&["--env", "CLAB_INTFS_WITH_MGMT=2"]));
        assert!(has(&["--env", "TDSC_WAIT_ADDRESSES=198.51.100.12"]));
        assert!(has(&["--sysctl", "net.ipv4.tcp_fastopen=514"]));
        let config = t.nodes["node2"].bind_for(DAEMON_CONFIG_PATH).unwrap();
        assert!(has(&[
            "--volume",
            &format!("{}:/etc/tdsc/tdscd.toml:ro", config.display())
        ]));
        assert!(has(&[
            "--volume",
            &format!("{}:/etc/tdsc/cluster.key:ro", key.display())
        ]));
        assert!(has(&[
            "--volume",
            &format!("{}:/run/tdsc", dir.join("run").display())
        ]));
        let image = args
            .iter()
            .position(|a| a == "tcp-dsc/node:latest")
            .unwrap();
        assert_eq!(
            args[image + 1..],
            ["tdscd", "--config", "/etc/tdsc/tdscd.toml"]
        );
        // A bind whose source is missing is refused, as containerlab refuses it.
        opts.bind_overrides.clear();
        let missing = t.nodes["node2"].bind_for(KEY_PATH).unwrap().to_owned();
        if !missing.exists() {
            assert!(matches!(
                run_args(&t, "node2", file, Path::new("/lab/clab-t1"), &opts),
                Err(DockerError::MissingBind { .. })
            ));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clients_keep_the_image_command() {
        let t = topo();
        let args = run_args(
            &t,
            "client1",
            Path::new("/x.yml"),
            Path::new("/clab-t1"),
            &DeployOptions::default(),
        )
        .unwrap();
        assert_eq!(args.last().map(String::as_str), Some("tcp-dsc/node:latest"));
        assert!(args.iter().any(|a| a == "CLAB_INTFS=1"));
        assert!(args.iter().any(|a| a == "net.ipv4.tcp_fastopen=5"));
    }

    #[test]
    fn raft_config_replaces_only_the_election() {
        let dir = std::env::temp_dir().join(crate::cluster::unique_lab_name("tdsc-unit-raft"));
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/containerlab/node3.toml");
        let dst = dir.join("node3.toml");
        write_raft_config(&src, &dst).unwrap();
        let t = read_table(&dst).unwrap();
        assert_eq!(t["election"]["mode"].as_str(), Some("raft"));
        assert!(t["election"].get("master").is_none());
        let facts = read_config(&dst).unwrap();
        assert_eq!(facts.node_id, 3);
        assert_eq!(facts.socket_name, "tdscd.sock");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
