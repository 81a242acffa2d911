//! Run-time membership through Raft, end to end on the 3-node lab (root only; SKIP otherwise):
//! `tdscctl node remove` and `node add` under continuous client traffic, and the checks that
//! refuse bad requests. Each test builds its own lab (`tdsc-mem-<pid>-<n>`) and removes it, also
//! on failure (the lab tears itself down when dropped).
//!
//! Every wait polls the nodes' `tdscctl status` until a condition holds and fails after a
//! generous limit; what is asserted never depends on how long anything took.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::status::Status;
use tdsc_lab::{http, load, netns, nft};

/// How long a change may take to show everywhere before the test gives up.
const PROPAGATION: Duration = Duration::from_secs(15);

fn start() -> anyhow::Result<Cluster> {
    Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-mem")),
        policy: Some("round-robin".to_owned()),
        raft: true,
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")
}

fn teardown(cluster: Cluster) -> anyhow::Result<()> {
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Polls every node in `nodes` until `cond` holds for each one's status.
fn wait_all(
    cluster: &Cluster,
    nodes: &[&str],
    what: &str,
    cond: impl Fn(&Status) -> bool,
) -> anyhow::Result<Vec<Status>> {
    let start = Instant::now();
    loop {
        let all: Vec<Status> = nodes
            .iter()
            .map(|n| cluster.status(n))
            .collect::<Result<_, _>>()?;
        if all.iter().all(&cond) {
            return Ok(all);
        }
        if start.elapsed() > PROPAGATION {
            bail!("{what}: not reached within {PROPAGATION:?}; last statuses: {all:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connections node `s` took: forwards received plus SYNs it accepted as master.
fn taken(s: &Status) -> u64 {
    s.counters.received_forwarded + s.counters.accepted_locally
}

/// `node remove 3` on the leader under traffic: every node shows two voters, node 3 is told
/// it was removed and takes no new connection, no request fails and no client sees an RST.
/// Then `node add 3`: node 3 is a voter and a member again, takes connections again, and its
/// vote counts (the leader keeps a quorum with the third node's daemon killed).
#[test]
fn remove_and_add_a_node_under_traffic() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("remove_and_add_a_node_under_traffic") else {
        return Ok(());
    };
    let mut cluster = start()?;
    let all = ["node1", "node2", "node3"];
    wait_all(&cluster, &all, "three voters", |s| s.voters == [1, 2, 3])?;
    let clients = cluster.client_namespaces();
    for ns in &clients {
        nft::install_client_probe(ns)?;
    }
    let vip = SocketAddr::V4(cluster.vip());
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load::spawn(&clients, vip, 1_000_000, &stop);
    let result = remove_then_add(&mut cluster, &all);
    stop.store(true, Ordering::Relaxed);
    let tally = traffic
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
    let (node3_served_while_removed, leader) = result?;
    cluster.check_daemons()?;
    println!(
        "requests: {} ok, {} failed, by node {:?}",
        tally.ok(),
        tally.failures,
        tally.by_node
    );
    assert_eq!(
        tally.failures, 0,
        "failed requests, e.g. {:?}",
        tally.sample_errors
    );
    assert_eq!(
        nft::clients_counters(&clients)?.0,
        0,
        "clients received TCP RSTs"
    );
    assert_eq!(
        node3_served_while_removed, 0,
        "node 3 took connections while removed"
    );
    ensure!(
        tally.by_node.get(&3).copied().unwrap_or(0) > 0,
        "node 3 served nothing at all"
    );
    node3_votes(&mut cluster, &leader, &clients)?;
    teardown(cluster)
}

/// The remove/add sequence; returns the connections node 3 took while removed and the leader.
fn remove_then_add(cluster: &mut Cluster, all: &[&str]) -> anyhow::Result<(u64, String)> {
    let mut leader = cluster.wait_master(None, PROPAGATION)?;
    cluster.wait_master_status("traffic to start", PROPAGATION, |s| {
        s.counters.syns_dispatched >= 100
    })?;
    if leader.id == 3 {
        // The leader cannot remove itself: it hands leadership on and names the new leader.
        let err = cluster
            .ctl("node3", &["node", "remove", "3"])
            .expect_err("the leader removed itself");
        ensure!(
            err.to_string().contains("is being transferred to node"),
            "{err}"
        );
        leader = cluster.wait_master(Some("node3"), PROPAGATION)?;
    }
    let node3_addr = cluster
        .node("node3")?
        .cluster_addr
        .context("node3 has no cluster address")?
        .to_string();

    let out = cluster.ctl(&leader.name, &["node", "remove", "3"])?;
    ensure!(out.contains("node 3 removed"), "tdscctl said {out:?}");
    let after = wait_all(cluster, all, "node 3 removed everywhere", |s| {
        s.voters == [1, 2]
    })?;
    let node3 = &after[2];
    ensure!(!node3.member, "node 3 does not know it was removed");
    ensure!(
        !cluster
            .status(&leader.name)?
            .nodes
            .iter()
            .any(|n| n.id == 3),
        "the leader still lists node 3"
    );
    let taken_at_removal = taken(node3);
    let dispatched = cluster.status(&leader.name)?.counters.syns_dispatched;
    cluster.wait_master_status("300 connections after the removal", PROPAGATION, |s| {
        s.counters.syns_dispatched >= dispatched + 300
    })?;
    let node3_taken = taken(&cluster.status("node3")?) - taken_at_removal;

    let out = cluster.ctl(&leader.name, &["node", "add", "3", &node3_addr])?;
    ensure!(out.contains("node 3"), "tdscctl said {out:?}");
    let back = wait_all(cluster, all, "node 3 added everywhere", |s| {
        s.voters == [1, 2, 3] && s.member
    })?;
    ensure!(
        back.iter()
            .all(|s| s.nodes.iter().filter(|n| n.voter).count() == 3),
        "a node lists fewer than three voters: {back:#?}"
    );
    let before = taken(&back[2]);
    wait_all(
        cluster,
        &["node3"],
        "node 3 to take connections again",
        |s| taken(s) > before + 10,
    )?;
    Ok((node3_taken, leader.name))
}

/// With node 3 back, the two nodes other than the leader's peer form a quorum: kill the third
/// node's daemon and the cluster still has a master that dispatches.
fn node3_votes(cluster: &mut Cluster, leader: &str, clients: &[String]) -> anyhow::Result<()> {
    let victim = ["node1", "node2"]
        .into_iter()
        .find(|n| *n != leader)
        .context("no third node")?;
    let victim_id = cluster.node(victim)?.id;
    cluster.kill_daemon(victim)?;
    // Dead after 1 s without reports: by then a leader without a quorum would long have been
    // deposed (check-quorum, one election timeout).
    let survivors: Vec<&str> = ["node1", "node2", "node3"]
        .into_iter()
        .filter(|n| *n != victim)
        .collect();
    let start = Instant::now();
    loop {
        let statuses: Vec<Status> = survivors
            .iter()
            .filter_map(|n| cluster.status(n).ok())
            .collect();
        let master = statuses.iter().find(|s| s.is_master());
        if master.is_some_and(|m| m.nodes.iter().any(|n| n.id == victim_id && !n.alive)) {
            break;
        }
        ensure!(
            start.elapsed() < PROPAGATION,
            "no master among {survivors:?} once {victim} was dead: {statuses:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let vip = SocketAddr::V4(cluster.vip());
    let mut served = 0;
    for ns in clients {
        for _ in 0..25 {
            let r = netns::run_in(ns, || http::get(vip, "/", load::REQUEST_TIMEOUT))??;
            ensure!(r.node != victim_id, "the dead node served a request");
            served += 1;
        }
    }
    ensure!(served == 25 * clients.len());
    cluster.restart_daemon(victim, PROPAGATION)?;
    Ok(())
}

/// A node whose daemon is down while it is removed misses the commit; restarted with its old
/// Raft state it still believes it is a voter, and the leader no longer talks to it. The
/// others answer its first datagrams with a `Removed` notice: it leaves (its status says so),
/// and when it is added again it catches up from the leader's log and is a member again.
#[test]
fn a_node_down_during_its_removal_learns_it_when_it_returns() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_node_down_during_its_removal_learns_it_when_it_returns")
    else {
        return Ok(());
    };
    let mut cluster = start()?;
    let all = ["node1", "node2", "node3"];
    wait_all(&cluster, &all, "three voters", |s| s.voters == [1, 2, 3])?;
    let leader = cluster.wait_master(None, PROPAGATION)?;
    let victim = cluster
        .nodes()
        .iter()
        .find(|n| n.id != leader.id)
        .context("a follower")?
        .clone();
    let addr = victim.cluster_addr.context("victim address")?.to_string();
    let others: Vec<&str> = all.into_iter().filter(|n| *n != victim.name).collect();
    let rest: Vec<u32> = [1, 2, 3].into_iter().filter(|i| *i != victim.id).collect();

    cluster.kill_daemon(&victim.name)?;
    let id = victim.id.to_string();
    cluster.ctl(&leader.name, &["node", "remove", &id])?;
    wait_all(&cluster, &others, "removal applied by the others", |s| {
        s.voters == rest
    })?;
    cluster.restart_daemon(&victim.name, PROPAGATION)?;
    let told = wait_all(
        &cluster,
        &[victim.name.as_str()],
        "the victim learns",
        |s| !s.member && s.voters == rest,
    )?;
    ensure!(
        told[0].nodes.iter().all(|n| n.id != victim.id || !n.voter),
        "the removed node lists itself as a voter: {:?}",
        told[0].nodes
    );

    cluster.ctl(&leader.name, &["node", "add", &id, &addr])?;
    wait_all(&cluster, &all, "the victim back everywhere", |s| {
        s.voters == [1, 2, 3] && s.member
    })?;
    cluster.check_daemons()?;
    teardown(cluster)
}

/// A follower carries a change to the leader and relays its refusal; the leader refuses bad
/// input with the reason;
/// the leader asked to remove itself hands leadership on instead. Nothing changes.
#[test]
fn bad_membership_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("bad_membership_requests_are_refused_and_change_nothing")
    else {
        return Ok(());
    };
    let cluster = start()?;
    let all = ["node1", "node2", "node3"];
    wait_all(&cluster, &all, "three voters", |s| s.voters == [1, 2, 3])?;
    let leader = cluster.wait_master(None, PROPAGATION)?;
    let leader_addr = leader.cluster_addr.context("leader address")?.to_string();
    let follower = all
        .into_iter()
        .find(|n| *n != leader.name)
        .context("a follower")?;

    let err = cluster
        .ctl(follower, &["node", "remove", "9"])
        .expect_err("a follower accepted the removal of a non-member")
        .to_string();
    let named = format!("node {} refused", leader.id);
    ensure!(
        err.contains(&named) && err.contains("not a member"),
        "error does not relay the leader's refusal: {err} (leader at {leader_addr})"
    );

    let l = leader.name.as_str();
    let refused: [(&[&str], &str); 7] = [
        (&["node", "add", "2", "198.51.100.99"], "already a member"),
        (
            &["node", "add", "4", "198.51.100.12"],
            "already used by node 2",
        ),
        (&["node", "add", "4", "2001:db8::4"], "family"),
        (&["node", "add", "4", "not-an-address"], "not an IP address"),
        (
            &["node", "add", "4", "192.0.2.1"],
            "cannot be a node address",
        ),
        (
            &["node", "add", "4", "198.51.100.14", "--weight", "5000"],
            "outside 0..=1000",
        ),
        (&["node", "remove", "9"], "not a member"),
    ];
    for (args, want) in refused {
        let err = cluster
            .ctl(l, args)
            .expect_err(&format!("accepted: {args:?}"))
            .to_string();
        ensure!(err.contains(want), "{args:?}: {err}");
    }
    let err = cluster
        .ctl(l, &["node", "remove", &leader.id.to_string()])
        .expect_err("the leader removed itself")
        .to_string();
    ensure!(err.contains("is being transferred to node"), "{err}");
    let new = cluster.wait_master(Some(l), PROPAGATION)?;
    ensure!(new.id != leader.id);
    // Nothing was lost: three voters everywhere, all members.
    let now = wait_all(&cluster, &all, "three voters", |s| {
        s.voters == [1, 2, 3] && s.member
    })?;
    for s in &now {
        ensure!(s.nodes.len() == 3, "node {} lists {:?}", s.node_id, s.nodes);
    }
    teardown(cluster)
}

/// `tdscctl policy set` under Raft is a cluster-wide setting: a bad name sent to a follower is
/// refused and changes nothing; on the leader it commits and every node switches; after a SIGKILL of the
/// master's daemon the new master keeps it; and a restarted daemon takes it from its Raft
/// state, not from its config file (which says round-robin).
#[test]
fn policy_set_is_cluster_wide_and_survives_failover_and_restart() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("policy_set_is_cluster_wide_and_survives_failover_and_restart")
    else {
        return Ok(());
    };
    let mut cluster = start()?;
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let master = cluster.wait_master(None, PROPAGATION)?.name.clone();
    let follower = all
        .iter()
        .find(|n| **n != master)
        .copied()
        .context("a follower")?;

    let refused = cluster.ctl(follower, &["policy", "set", "fastest"]);
    let err = format!(
        "{:?}",
        refused.expect_err("a follower accepted an unknown policy")
    );
    ensure!(
        err.contains("unknown policy"),
        "the refusal says no reason: {err}"
    );
    wait_all(&cluster, &all, "policy unchanged after the refusal", |s| {
        s.policy == "round-robin"
    })?;

    let done = cluster.ctl(&master, &["policy", "set", "least-connections"])?;
    ensure!(done.contains("least-connections"), "{done}");
    wait_all(&cluster, &all, "every node applies the policy", |s| {
        s.policy == "least-connections"
    })?;

    cluster.kill_daemon(&master)?;
    let new_master = cluster
        .wait_master(Some(&master), PROPAGATION)?
        .name
        .clone();
    let s = cluster.status(&new_master)?;
    assert_eq!(s.policy, "least-connections", "the new master reverted");

    cluster.restart_daemon(&master, PROPAGATION)?;
    wait_all(
        &cluster,
        &all,
        "the restarted node keeps the cluster policy",
        |s| s.policy == "least-connections",
    )?;
    teardown(cluster)
}

/// A node the cluster has never seen (id 4, not in any config of the three running nodes, on a
/// namespace made for this test) joins at run time: `tdscctl node add 4 198.51.100.14` on the
/// leader, then its daemon starts with the current members plus itself as `[[nodes]]` (the
/// documented procedure). It becomes a voter on every node, follows the master, and serves a
/// share of new connections; no request fails and no client sees an RST.
#[test]
fn a_brand_new_node_joins_and_serves() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_brand_new_node_joins_and_serves") else {
        return Ok(());
    };
    let mut cluster = start()?;
    let all = ["node1", "node2", "node3"];
    wait_all(&cluster, &all, "three voters", |s| s.voters == [1, 2, 3])?;
    let node4 = ExtraNode::create(&cluster, "node4", "198.51.100.14/24")?;
    let result = join_node4(&mut cluster, &node4, &all);
    drop(node4);
    result?;
    teardown(cluster)
}

fn join_node4(cluster: &mut Cluster, node4: &ExtraNode, all: &[&str]) -> anyhow::Result<()> {
    let leader = cluster.wait_master(None, PROPAGATION)?.name.clone();
    let done = cluster.ctl(&leader, &["node", "add", "4", "198.51.100.14"])?;
    ensure!(done.contains('4'), "{done}");
    wait_all(cluster, all, "four voters everywhere", |s| {
        s.voters == [1, 2, 3, 4]
    })?;

    // Its config: node3's, as node 4, with node 4 added to the nodes it starts from.
    let n3 = cluster.node("node3")?.clone();
    let text = std::fs::read_to_string(&n3.config)?;
    let config = text.replace("node_id = 3", "node_id = 4").replace(
        &n3.socket.display().to_string(),
        &node4.socket.display().to_string(),
    ) + "\n[[nodes]]\nid = 4\naddress = \"198.51.100.14\"\n";
    ensure!(
        config.contains("node_id = 4"),
        "no node_id in {}",
        n3.config.display()
    );
    let data_dir = node4.dir.join("raft-node4");
    let config = replace_data_dir(&config, &data_dir)?;
    let path = node4.dir.join("node4.toml");
    std::fs::write(&path, config)?;
    node4.spawn(
        "httpd",
        &node4.bin("tdsc-lab-httpd")?,
        &["--listen", "0.0.0.0:80", "--id", "4"],
    )?;
    node4.spawn(
        "tdscd",
        &node4.bin("tdscd")?,
        &["--config", &path.display().to_string()],
    )?;

    let start = Instant::now();
    loop {
        match node4.status() {
            Ok(s) if s.voters == [1, 2, 3, 4] && s.role == "member" && s.master_id.is_some() => {
                break
            }
            other if start.elapsed() > PROPAGATION => {
                bail!("node 4 did not join: {other:?}\n{}", node4.log("tdscd"))
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    cluster.wait_master_status("node 4 alive at the master", PROPAGATION, |s| {
        s.nodes.iter().any(|n| n.id == 4 && n.alive)
    })?;

    let clients = cluster.client_namespaces();
    for ns in &clients {
        nft::install_client_probe(ns)?;
    }
    let vip = SocketAddr::V4(cluster.vip());
    let tally = load::run(&clients, vip, 120, &Arc::new(AtomicBool::new(false)))?;
    println!(
        "with node 4: {} ok, {} failed, by node {:?}",
        tally.ok(),
        tally.failures,
        tally.by_node
    );
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    assert_eq!(
        nft::clients_counters(&clients)?.0,
        0,
        "clients received TCP RSTs"
    );
    let served4 = tally.by_node.get(&4).copied().unwrap_or(0);
    assert!(
        served4 >= 30,
        "the new node should take about a quarter of 240 round-robin requests: {:?}",
        tally.by_node
    );
    Ok(())
}

/// Points `[election] data_dir` of a lab config at `dir`.
fn replace_data_dir(config: &str, dir: &std::path::Path) -> anyhow::Result<String> {
    let mut table: toml::Table = config.parse()?;
    let election = table
        .get_mut("election")
        .and_then(toml::Value::as_table_mut)
        .context("no [election] table")?;
    election.insert(
        "data_dir".into(),
        toml::Value::String(dir.display().to_string()),
    );
    Ok(toml::to_string(&table)?)
}

/// A cluster node outside the topology: a namespace `clab-<lab>-<name>` with eth0 on the
/// client bridge and eth1 (with `cidr`) on the cluster bridge. Dropping it kills what runs in
/// it and deletes the namespace (and with it both veths), whatever happened.
struct ExtraNode {
    ns: String,
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    bins: tdsc_lab::bins::BinDir,
    tdscctl: std::path::PathBuf,
    children: std::cell::RefCell<Vec<std::process::Child>>,
}

impl ExtraNode {
    fn create(cluster: &Cluster, name: &str, cidr: &str) -> anyhow::Result<ExtraNode> {
        let topo = cluster.lab().topology();
        let ns = topo.netns_name(name);
        netns::add(&ns)?;
        let bins = tdsc_lab::bins::BinDir::locate()?;
        let node = ExtraNode {
            ns: ns.clone(),
            dir: cluster.lab().workdir().join(name),
            socket: cluster.lab().workdir().join(format!("{name}.sock")),
            tdscctl: bins.path("tdscctl")?,
            bins,
            children: std::cell::RefCell::new(Vec::new()),
        };
        std::fs::create_dir_all(&node.dir)?;
        let short = name.replace("node", "n");
        for (dev, bridge) in [("eth0", "br-client"), ("eth1", "br-cluster")] {
            let br_ns = topo.netns_name(bridge);
            let port = format!("{short}-{dev}");
            netns::ip([
                "-n", &ns, "link", "add", dev, "type", "veth", "peer", "name", &port, "netns",
                &br_ns,
            ])?;
            netns::ip(["-n", &br_ns, "link", "set", &port, "master", bridge])?;
            netns::ip(["-n", &br_ns, "link", "set", &port, "up"])?;
            netns::ip(["-n", &ns, "link", "set", dev, "up"])?;
        }
        netns::ip(["-n", &ns, "addr", "add", cidr, "dev", "eth1"])?;
        Ok(node)
    }

    fn bin(&self, name: &str) -> anyhow::Result<std::path::PathBuf> {
        Ok(self.bins.path(name)?)
    }

    /// Starts `program args...` in the namespace, output to `<dir>/<label>.log`.
    fn spawn(&self, label: &str, program: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{label}.log")))?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.children.borrow_mut().push(child);
        Ok(())
    }

    fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default()
    }

    fn status(&self) -> anyhow::Result<Status> {
        tdsc_lab::status::query(&self.tdscctl, &self.socket).map_err(anyhow::Error::msg)
    }
}

impl Drop for ExtraNode {
    fn drop(&mut self) {
        for c in self.children.borrow_mut().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Err(e) = netns::delete(&self.ns) {
            eprintln!("cannot delete namespace {}: {e}", self.ns);
        }
    }
}
