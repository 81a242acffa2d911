//! Realising a [`Topology`] as network namespaces, and tearing it down again.
//!
//! Mapping from containerlab:
//!
//! | containerlab                         | here                                              |
//! |--------------------------------------|---------------------------------------------------|
//! | `kind: linux` node `N`               | netns `clab-<lab>-N`                              |
//! | `kind: bridge` node `B` (host netns) | netns `clab-<lab>-B` holding a bridge named `B`   |
//! | link `a:ethX` — `b:ethY`             | veth pair created directly in the two namespaces  |
//! | `sysctls`, `exec`                    | `sysctl -w` / the command, via `ip netns exec`    |
//!
//! The bridge gets a namespace of its own because real containerlab expects it in the host
//! namespace, and tests must never touch the host. Bridges keep the kernel defaults: they
//! learn and age MAC addresses like any switch. Veths are created with
//! `ip -n A link add X type veth peer name Y netns B`, so no interface ever appears in the
//! root namespace. Deleting a namespace destroys its interfaces and their veth peers.
//!
//! `exec` lines are split on whitespace (no shell) and only `ip`, `sysctl`, `nft`, `ethtool`
//! and `tc` are run: the lab shares the host's file system, unlike a container.
//!
//! [`Lab`] is the guard: dropping it (also while unwinding from a panic) stops the processes it
//! started, kills anything else left in its namespaces, deletes the namespaces and its work
//! directory, and reports every failure rather than stopping at the first.

use std::fmt;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{self, NetnsError};
use crate::topology::{Kind, Topology};

/// Programs an `exec` line may run.
const EXEC_ALLOWED: &[&str] = &["ip", "sysctl", "nft", "ethtool", "tc"];

/// How long a child gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// Why realising the lab or managing its processes failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(
        "namespace {name} already exists (a stale lab?); remove it with `ip netns del {name}`"
    )]
    Exists { name: String },
    #[error("exec line {line:?} of node {node}: only {EXEC_ALLOWED:?} may be run")]
    ExecNotAllowed { node: String, line: String },
    #[error("no node {node:?} in the topology")]
    NoSuchNode { node: String },
    #[error("{node:?} is a bridge; processes run only in linux nodes")]
    NotLinux { node: String },
    #[error("cannot create {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program} in {node}")]
    Spawn {
        program: String,
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no process labelled {label:?}")]
    NoSuchProcess { label: String },
    #[error("{label} still ran {waited:?} after SIGTERM (killed)")]
    NotStopped { label: String, waited: Duration },
}

/// Every failure met while tearing a lab down.
#[derive(Debug)]
pub struct TeardownError {
    pub errors: Vec<String>,
}

impl fmt::Display for TeardownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} teardown step(s) failed:", self.errors.len())?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TeardownError {}

/// A process the lab started, and where its output goes.
#[derive(Debug)]
struct ManagedChild {
    label: String,
    child: Child,
    log: PathBuf,
}

/// A realised topology. Owns its namespaces, processes and work directory; see the module
/// docs for what [`Drop`] does.
#[derive(Debug)]
pub struct Lab {
    topology: Topology,
    /// Namespaces created so far, in creation order (torn down in reverse).
    namespaces: Vec<String>,
    /// Processes started in the lab; stopped first on teardown.
    children: Vec<ManagedChild>,
    /// `/tmp/<lab>`: generated configs, control sockets, logs.
    workdir: PathBuf,
    /// Set once teardown ran, so that Drop does not run it twice.
    torn_down: bool,
}

impl Lab {
    /// Creates every namespace, bridge and veth of the topology, then applies sysctls and
    /// runs the `exec` lines. `steer_flows`: per-flow CPU steering on the client side (see
    /// `link_topology`). On failure, whatever was made is torn down before returning.
    pub fn realise(topology: Topology, steer_flows: bool) -> Result<Lab, LabError> {
        let workdir = std::env::temp_dir().join(&topology.name);
        let mut lab = Lab {
            topology,
            namespaces: Vec::new(),
            children: Vec::new(),
            workdir,
            torn_down: false,
        };
        // On error `lab` is dropped here, which tears down the partial lab.
        lab.build(steer_flows)?;
        Ok(lab)
    }

    /// Deletes namespaces left behind by an earlier run of a lab of the same name (for
    /// example after a SIGKILL). Returns the names it removed.
    pub fn remove_stale(topology: &Topology) -> Result<Vec<String>, LabError> {
        let mut removed = Vec::new();
        for node in topology.nodes.keys() {
            let name = topology.netns_name(node);
            if netns::exists(&name) {
                netns::delete(&name)?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    fn build(&mut self, steer_flows: bool) -> Result<(), LabError> {
        std::fs::create_dir_all(&self.workdir).map_err(|source| LabError::Io {
            path: self.workdir.clone(),
            source,
        })?;
        let topo = self.topology.clone();
        for (name, node) in &topo.nodes {
            let ns = topo.netns_name(name);
            self.add_netns(&ns)?;
            if node.kind == Kind::Bridge {
                add_bridge(&ns, name)?;
            }
        }
        link_topology(&topo, steer_flows)?;
        for (name, node) in &topo.nodes {
            if node.kind != Kind::Linux {
                continue;
            }
            let ns = topo.netns_name(name);
            for (key, value) in &node.sysctls {
                netns::sysctl(&ns, key, value)?;
            }
            for line in &node.exec {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.split_first() {
                    Some((program, args)) if EXEC_ALLOWED.contains(program) => {
                        netns::exec(&ns, program, args)?;
                    }
                    _ => {
                        return Err(LabError::ExecNotAllowed {
                            node: name.clone(),
                            line: line.clone(),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<(), LabError> {
        if netns::exists(name) {
            return Err(LabError::Exists {
                name: name.to_owned(),
            });
        }
        netns::add(name)?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    /// The realised topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The lab's name (also the name of its work directory).
    pub fn name(&self) -> &str {
        &self.topology.name
    }

    /// Namespace of a node.
    pub fn netns(&self, node: &str) -> String {
        self.topology.netns_name(node)
    }

    /// Per-lab scratch directory (`/tmp/<lab>`), removed on teardown.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Attaches an extra host to a bridge: a namespace `clab-<lab>-<name>` whose `eth0` (with
    /// `cidr`) is a veth to port `port` of `bridge`. Torn down with the lab. Used for hosts
    /// that are not part of the topology, such as a rogue sender.
    pub fn attach_host(
        &mut self,
        name: &str,
        bridge: &str,
        port: &str,
        cidr: &str,
    ) -> Result<String, LabError> {
        match self.topology.nodes.get(bridge) {
            Some(n) if n.kind == Kind::Bridge => {}
            _ => {
                return Err(LabError::NoSuchNode {
                    node: bridge.to_owned(),
                })
            }
        }
        let ns = self.topology.netns_name(name);
        let br_ns = self.topology.netns_name(bridge);
        self.add_netns(&ns)?;
        netns::ip([
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", &br_ns,
        ])?;
        netns::ip(["-n", &br_ns, "link", "set", port, "master", bridge])?;
        netns::ip(["-n", &br_ns, "link", "set", port, "up"])?;
        netns::ip(["-n", &ns, "link", "set", "eth0", "up"])?;
        netns::ip(["-n", &ns, "addr", "add", cidr, "dev", "eth0"])?;
        Ok(ns)
    }

    /// Starts `program args...` inside `node` (through `ip netns exec`, which execs it, so the
    /// returned pid is the program's own). Its stdout and stderr go to `<workdir>/<label>.log`.
    /// The child is also given `PR_SET_PDEATHSIG(SIGKILL)`, so it dies if the thread that
    /// started it dies without tearing down (e.g. the test process is killed): start
    /// processes from the thread that owns the lab. It runs in a process group of its own.
    pub fn spawn(
        &mut self,
        node: &str,
        label: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Result<u32, LabError> {
        match self.topology.nodes.get(node) {
            Some(n) if n.kind == Kind::Linux => {}
            Some(_) => {
                return Err(LabError::NotLinux {
                    node: node.to_owned(),
                })
            }
            None => {
                return Err(LabError::NoSuchNode {
                    node: node.to_owned(),
                })
            }
        }
        let log = self.workdir.join(format!("{label}.log"));
        let out = File::create(&log).map_err(|source| LabError::Io {
            path: log.clone(),
            source,
        })?;
        let err = out.try_clone().map_err(|source| LabError::Io {
            path: log.clone(),
            source,
        })?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns(node)])
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the closure runs between fork and exec and calls only prctl(2) and
        // setpgid(2), which are async-signal-safe and touch no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A process group of its own: a Ctrl-C in the terminal reaches only the lab's
                // owner, which then stops the children in order.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            program: program.display().to_string(),
            node: node.to_owned(),
            source,
        })?;
        let pid = child.id();
        self.children.push(ManagedChild {
            label: label.to_owned(),
            child,
            log,
        });
        Ok(pid)
    }

    /// Pid of a started process.
    pub fn pid(&self, label: &str) -> Result<u32, LabError> {
        self.find(label).map(|c| c.child.id())
    }

    fn find(&self, label: &str) -> Result<&ManagedChild, LabError> {
        self.children
            .iter()
            .find(|c| c.label == label)
            .ok_or_else(|| LabError::NoSuchProcess {
                label: label.to_owned(),
            })
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self, label: &str) -> Result<Option<String>, LabError> {
        let child = self
            .children
            .iter_mut()
            .find(|c| c.label == label)
            .ok_or_else(|| LabError::NoSuchProcess {
                label: label.to_owned(),
            })?;
        Ok(child
            .child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.to_string()))
    }

    /// Last `lines` lines of a process's output.
    pub fn log_tail(&self, label: &str, lines: usize) -> String {
        let Ok(c) = self.find(label) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&c.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Removes a started process from the lab's list (its label can be spawned again).
    fn take(&mut self, label: &str) -> Result<ManagedChild, LabError> {
        let idx = self
            .children
            .iter()
            .position(|c| c.label == label)
            .ok_or_else(|| LabError::NoSuchProcess {
                label: label.to_owned(),
            })?;
        Ok(self.children.remove(idx))
    }

    /// Stops one process (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&mut self, label: &str) -> Result<(), LabError> {
        let mut c = self.take(label)?;
        stop_child(&mut c.child);
        Ok(())
    }

    /// Sends one process SIGTERM and waits up to `timeout` for it to exit on its own, then
    /// forgets it (so its label can be spawned again). Returns its exit status and its log
    /// file. A process still running after `timeout` is killed: [`LabError::NotStopped`].
    pub fn terminate(
        &mut self,
        label: &str,
        timeout: Duration,
    ) -> Result<(String, PathBuf), LabError> {
        let mut c = self.take(label)?;
        if let Ok(pid) = libc::pid_t::try_from(c.child.id()) {
            // SAFETY: kill(2) touches no memory; the pid is our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.child.try_wait() {
                return Ok((status.to_string(), c.log));
            }
            if start.elapsed() > timeout {
                let _ = c.child.kill();
                let _ = c.child.wait();
                return Err(LabError::NotStopped {
                    label: label.to_owned(),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills one process with SIGKILL at once (no grace: a crash), reaps it and forgets it,
    /// so that its label can be spawned again.
    pub fn kill(&mut self, label: &str) -> Result<(), LabError> {
        let mut c = self.take(label)?;
        let _ = c.child.kill();
        let _ = c.child.wait();
        Ok(())
    }

    /// Tears the lab down, returning every error met.
    pub fn teardown(mut self) -> Result<(), TeardownError> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<(), TeardownError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        // Ask every child to stop at once, then wait for all: the grace period is shared.
        for c in &self.children {
            if let Ok(pid) = libc::pid_t::try_from(c.child.id()) {
                // SAFETY: kill(2) touches no memory; the pid is our own unreaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + TERM_GRACE;
        for c in &mut self.children {
            loop {
                match c.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => {
                        if let Err(e) = c.child.kill() {
                            errors.push(format!("kill {}: {e}", c.label));
                        }
                        if let Err(e) = c.child.wait() {
                            errors.push(format!("wait {}: {e}", c.label));
                        }
                        break;
                    }
                    Err(e) => {
                        errors.push(format!("wait {}: {e}", c.label));
                        break;
                    }
                }
            }
        }
        self.children.clear();
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = netns::delete(&ns) {
                errors.push(format!("delete netns {ns}: {e}"));
            }
        }
        let keep = std::env::var_os("TDSC_LAB_KEEP_WORKDIR").is_some();
        if !keep && self.workdir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.workdir) {
                errors.push(format!("remove {}: {e}", self.workdir.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TeardownError { errors })
        }
    }
}

fn stop_child(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) touches no memory; the pid is our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!("tdsc-lab: teardown of lab {}: {e}", self.topology.name);
        }
    }
}

/// Creates bridge `name` in namespace `ns` and brings it up: a plain learning bridge with
/// kernel defaults (ageing 300 s, STP off), as a switch is. Where `br_netfilter` is loaded
/// (Docker loads it), its `bridge-nf-call-*` switches are per namespace and start on, which
/// sends every bridged frame through the bridge namespace's IP hooks and conntrack; a switch
/// does not do that, and in the dispatch benchmark it was a large share of each SYN's cost.
/// They are turned off in the bridge's namespace (never in the host's).
pub fn add_bridge(ns: &str, name: &str) -> Result<(), LabError> {
    netns::ip(["-n", ns, "link", "add", name, "type", "bridge"])?;
    netns::ip(["-n", ns, "link", "set", name, "up"])?;
    netns::run_in(ns, || {
        for key in [
            "bridge-nf-call-iptables",
            "bridge-nf-call-ip6tables",
            "bridge-nf-call-arptables",
        ] {
            // /proc/sys/net is the calling thread's namespace.
            let path = format!("/proc/sys/net/bridge/{key}");
            match std::fs::write(&path, "0") {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(LabError::Sysctl { path, source: e });
                }
                _ => {}
            }
        }
        Ok(())
    })?
}

/// Creates every veth of `topo` between the namespaces of its ends (which exist), puts bridge
/// ends into their bridge, brings both ends up, and steers flows on the `linux` ends of the
/// links to a bridge that clients are attached to when `steer` ([`steer_flows`];
/// `TDSC_LAB_RPS=1` or `=0` overrides it). Shared by the namespace and docker engines.
pub(crate) fn link_topology(topo: &Topology, steer: bool) -> Result<(), NetnsError> {
    for link in &topo.links {
        let (ns_a, ns_b) = (topo.netns_name(&link.a.node), topo.netns_name(&link.b.node));
        netns::ip([
            "-n",
            &ns_a,
            "link",
            "add",
            &link.a.interface,
            "type",
            "veth",
            "peer",
            "name",
            &link.b.interface,
            "netns",
            &ns_b,
        ])?;
        for (end, ns) in [(&link.a, &ns_a), (&link.b, &ns_b)] {
            if topo.nodes[&end.node].kind == Kind::Bridge {
                netns::ip(["-n", ns, "link", "set", &end.interface, "master", &end.node])?;
            }
            netns::ip(["-n", ns, "link", "set", &end.interface, "up"])?;
        }
    }
    let mask = cpu_mask(std::thread::available_parallelism().map_or(1, usize::from));
    let steer = match std::env::var("TDSC_LAB_RPS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => steer,
    };
    // Only the client side carries TCP connections to the VIP: the links of the bridges that
    // clients hang off. The cluster links (datagrams, forwards) keep the kernel's behaviour.
    let bridge_of = |link: &crate::topology::Link| {
        [&link.a, &link.b]
            .into_iter()
            .find(|e| topo.nodes[&e.node].kind == Kind::Bridge)
            .map(|e| e.node.clone())
    };
    let client_bridges: std::collections::BTreeSet<String> = topo
        .links
        .iter()
        .filter(|l| {
            [&l.a, &l.b]
                .into_iter()
                .any(|e| topo.nodes[&e.node].role() == Some(crate::topology::Role::Client))
        })
        .filter_map(bridge_of)
        .collect();
    for link in topo.links.iter().filter(|_| steer) {
        if !bridge_of(link).is_some_and(|b| client_bridges.contains(&b)) {
            continue;
        }
        for end in [&link.a, &link.b] {
            if topo.nodes[&end.node].kind == Kind::Linux {
                steer_flows(&topo.netns_name(&end.node), &end.interface, &mask)?;
            }
        }
    }
    Ok(())
}

/// Per-flow receive steering (RPS over every CPU, `mask`) on `iface` in `ns`, so that a
/// host handles all segments of one connection on one CPU, as a multi-queue NIC's RSS makes
/// it do. A veth otherwise delivers each packet on the CPU that sent it, and a client that
/// sends its handshake ACK from a softirq and its request from a thread has a node process
/// the two at once on two CPUs (docs/platform.md, "A veth delivers a packet on the CPU that
/// sent it").
fn steer_flows(ns: &str, iface: &str, mask: &str) -> Result<(), NetnsError> {
    let path = format!("/sys/class/net/{iface}/queues/rx-0/rps_cpus");
    // `ip netns exec` mounts the namespace's own sysfs, where `iface` is this veth end.
    netns::exec(ns, "sh", ["-c", &format!("echo {mask} > {path}")])?;
    Ok(())
}

/// The RPS CPU mask naming CPUs `0..n`: hexadecimal, in comma-separated 32-bit groups, most
/// significant first (the format of `rps_cpus`).
fn cpu_mask(n: usize) -> String {
    let n = n.max(1);
    let groups = n.div_ceil(32);
    (0..groups)
        .rev()
        .map(|g| {
            let bits = (n - g * 32).min(32);
            let word: u32 = if bits == 32 {
                u32::MAX
            } else {
                (1u32 << bits) - 1
            };
            format!("{word:08x}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_masks_name_every_cpu_in_32_bit_groups() {
        assert_eq!(super::cpu_mask(1), "00000001");
        assert_eq!(super::cpu_mask(2), "00000003");
        assert_eq!(super::cpu_mask(32), "ffffffff");
        assert_eq!(super::cpu_mask(33), "00000001,ffffffff");
        assert_eq!(super::cpu_mask(0), "00000001");
    }
}
