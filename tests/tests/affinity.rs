//! Client affinity end to end with a real multi-connection protocol: iperf3 through the VIP
//! (root only; SKIP otherwise, a failure under `CI=true`). Each test builds its own lab and
//! removes it, also on failure.
//!
//! iperf3 opens a control connection, then its data connections, and the server that holds
//! the control connection must get the data connections too. Round robin without affinity
//! sends each to another node; `[scheduler] affinity = "client-address"` keeps a client on
//! one node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};

/// The iperf3 port, made a dispatched port of the lab.
const PORT: u16 = 5201;
/// Longest one iperf3 client may run before it is killed (a run that fails may hang).
const CLIENT_LIMIT: Duration = Duration::from_secs(8);

/// An iperf3 server on every node, each logging to a file of its own; killed on drop.
struct Servers {
    children: Vec<Child>,
    /// (node id, log file)
    logs: Vec<(u32, PathBuf)>,
}

impl Servers {
    fn start(cluster: &Cluster) -> anyhow::Result<Servers> {
        let mut s = Servers {
            children: Vec::new(),
            logs: Vec::new(),
        };
        for n in cluster.nodes() {
            let log = cluster
                .lab()
                .workdir()
                .join(format!("{}-iperf3.log", n.name));
            let child = Command::new("ip")
                .args(["netns", "exec", &cluster.netns(&n.name), "iperf3", "-s"])
                .args(["-p", &PORT.to_string()])
                // A server left waiting by a broken test takes new ones again after this.
                .args(["--idle-timeout", "3", "--forceflush", "--logfile"])
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start iperf3 -s (apt-get install iperf3)")?;
            s.children.push(child);
            s.logs.push((n.id, log));
        }
        // Listening before the first client connects.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.logs.iter().any(|(_, l)| !l.exists()) {
            ensure!(Instant::now() < deadline, "iperf3 servers did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(s)
    }

    /// Connections each node's server has accepted so far (control and data alike).
    fn accepted(&self) -> BTreeMap<u32, usize> {
        self.logs
            .iter()
            .map(|(id, log)| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                (*id, text.matches("Accepted connection from").count())
            })
            .collect()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One iperf3 test (1 s, two data connections) from the client namespace `ns` to the VIP:
/// whether it succeeded, and the nodes whose servers accepted connections meanwhile.
fn run_iperf3(cluster: &Cluster, servers: &Servers, ns: &str) -> anyhow::Result<(bool, Vec<u32>)> {
    let before = servers.accepted();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "iperf3", "-c"])
        .arg(cluster.vip().ip().to_string())
        .args(["-p", &PORT.to_string(), "-t", "1", "-P", "2", "-b", "20M"])
        .args(["--connect-timeout", "3000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start iperf3 -c")?;
    let started = Instant::now();
    let ok = loop {
        if let Some(status) = child.try_wait()? {
            break status.success();
        }
        if started.elapsed() > CLIENT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output()?;
    if !ok {
        eprintln!(
            "iperf3 from {ns} failed: {}{}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let after = servers.accepted();
    let nodes = after
        .iter()
        .filter(|(id, n)| before.get(id).copied().unwrap_or(0) < **n)
        .map(|(id, _)| *id)
        .collect();
    Ok((ok, nodes))
}

fn options(name: &str, affinity: bool, raft: bool, timeout_ms: i64) -> ClusterOptions {
    let mut scheduler = Vec::new();
    if affinity {
        scheduler.push(("affinity".to_owned(), "client-address".into()));
        scheduler.push(("affinity_timeout_ms".to_owned(), timeout_ms.into()));
    }
    ClusterOptions {
        lab_name: Some(unique_lab_name(name)),
        policy: Some("round-robin".to_owned()),
        raft,
        cluster_extra: vec![(
            "tcp_ports".to_owned(),
            toml::Value::Array(vec![80.into(), i64::from(PORT).into()]),
        )],
        scheduler_extra: scheduler,
        ..ClusterOptions::default()
    }
}

/// With affinity, iperf3 through the VIP works every time, and the runs, spread by round
/// robin once each client's entry has timed out, land on all three nodes. Without it,
/// round robin sends the data connections to another node than the control connection, and
/// iperf3 fails every time: the reason the feature exists.
#[test]
fn iperf3_through_the_vip_works_with_affinity_and_fails_without() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("iperf3_through_the_vip_works_with_affinity") else {
        return Ok(());
    };
    let timeout = Duration::from_millis(1500);
    let cluster = Cluster::start(&options("tdsc-aff", true, false, 1500))?;
    let client = cluster.client_namespaces()[0].clone();
    let servers = Servers::start(&cluster)?;
    let mut served = BTreeMap::new();
    for run in 0..5 {
        let (ok, nodes) = run_iperf3(&cluster, &servers, &client)?;
        eprintln!("with affinity, run {run}: ok {ok}, served by {nodes:?}");
        ensure!(ok, "iperf3 run {run} failed with affinity on");
        ensure!(
            nodes.len() == 1,
            "run {run}: connections on {nodes:?}, not one node"
        );
        *served.entry(nodes[0]).or_insert(0) += 1;
        // Let the entry time out, so the next run is a new choice of the policy.
        std::thread::sleep(timeout + Duration::from_millis(500));
    }
    ensure!(
        served.len() == 3,
        "5 runs served by {served:?}, not all three nodes"
    );
    let master = cluster.master()?.clone();
    let st = cluster.status(&master.name)?;
    let a = st.affinity.context("affinity missing from status")?;
    ensure!(a.hits >= 5, "affinity hits {} for 5 runs", a.hits);
    drop(servers);
    cluster.teardown()?;

    let cluster = Cluster::start(&options("tdsc-noaff", false, false, 0))?;
    let client = cluster.client_namespaces()[0].clone();
    let servers = Servers::start(&cluster)?;
    let mut worked = 0;
    for run in 0..3 {
        let (ok, nodes) = run_iperf3(&cluster, &servers, &client)?;
        eprintln!("without affinity, run {run}: ok {ok}, connections on {nodes:?}");
        worked += usize::from(ok);
        std::thread::sleep(Duration::from_secs(4)); // the servers' idle timeout
    }
    ensure!(
        cluster.status(&cluster.master()?.name)?.affinity.is_none(),
        "affinity shown while off"
    );
    drop(servers);
    cluster.teardown()?;
    ensure!(
        worked == 0,
        "{worked} of 3 iperf3 runs worked without affinity: the test shows nothing"
    );
    Ok(())
}

/// A client's affinity survives a SIGKILL of the master: the new master adopts the replica
/// that every node built from the committed records, so the client's very first connection
/// after the takeover, and every later one, goes to its node by affinity, not by the policy.
#[test]
fn affinity_survives_a_sigkill_failover_of_the_master() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("affinity_survives_a_sigkill_failover") else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&options("tdsc-affo", true, true, 60_000))?;
    let servers = Servers::start(&cluster)?;
    let master = cluster.master()?.clone();
    // Round robin gives the two clients two different nodes: one of them is not the master.
    let mut held = None;
    for ns in cluster.client_namespaces() {
        let (ok, nodes) = run_iperf3(&cluster, &servers, &ns)?;
        eprintln!("before the failover, {ns}: ok {ok}, served by {nodes:?}");
        ensure!(
            ok && nodes.len() == 1,
            "iperf3 from {ns}: {ok} on {nodes:?}"
        );
        if nodes[0] != master.id {
            held = Some((ns, nodes[0]));
            break;
        }
    }
    let (client, node) = held.context("both clients landed on the master")?;

    // Every surviving node holds the client's entry in its replica.
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in cluster.nodes().iter().filter(|n| n.id != master.id) {
        loop {
            let live = cluster
                .status(&n.name)?
                .affinity
                .map_or(0, |a| a.replica_live);
            if live >= 1 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{} never replicated the affinity entry",
                n.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    cluster.kill_daemon(&master.name)?;
    let new = cluster
        .wait_master(Some(&master.name), Duration::from_secs(5))
        .context("no new master after SIGKILL")?;
    cluster.wait_liveness(&new.name, master.id, false)?;
    let before = cluster.status(&new.name)?;
    let adopted = before
        .records
        .last_takeover
        .map_or(0, |t| t.affinity_adopted);
    ensure!(
        adopted >= 1,
        "the new master adopted {adopted} affinity entries"
    );
    for run in 0..3 {
        let (ok, nodes) = run_iperf3(&cluster, &servers, &client)?;
        eprintln!("after the failover, run {run}: ok {ok}, served by {nodes:?}");
        ensure!(ok, "iperf3 run {run} after the failover failed");
        ensure!(
            nodes == [node],
            "run {run} served by {nodes:?}, not by node {node}, the client's"
        );
    }
    let after = cluster.status(&new.name)?;
    let syns = after.counters.syns_dispatched - before.counters.syns_dispatched;
    let hits = after.affinity.map_or(0, |a| a.hits) - before.affinity.map_or(0, |a| a.hits);
    ensure!(syns >= 9, "3 runs, {syns} SYNs dispatched");
    ensure!(
        hits == syns,
        "{hits} of {syns} SYNs after the takeover went by affinity: the policy chose the rest"
    );
    drop(servers);
    cluster.teardown()?;
    Ok(())
}
