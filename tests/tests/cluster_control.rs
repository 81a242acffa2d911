//! Cluster-wide control from any node, end to end on the 3-node Raft lab (root only; SKIP
//! otherwise, a failure under `CI=true`): every `tdscctl` change sent to a follower's socket
//! is carried over the cluster channel to the node that must act — the named node for
//! `weight` and `drain`, the Raft leader for `policy set` and `node add|remove` — and takes
//! effect cluster-wide; bad requests sent to a follower are refused and change nothing;
//! `status --cluster` on a follower lists every member, and a member whose daemon is down as
//! not answering. Each test builds its own lab (`tdsc-cc-<pid>-<n>`) and removes it, also on
//! failure.
//!
//! Every wait polls `tdscctl status` until a condition holds and fails after a generous
//! limit; what is asserted never depends on how long anything took.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde::Deserialize;
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::load;
use tdsc_lab::status::Status;

/// How long a change may take to show before the test gives up.
const PROPAGATION: Duration = Duration::from_secs(15);

/// One entry of `tdscctl status --cluster --json`.
#[derive(Debug, Deserialize)]
struct NodeAnswer {
    id: u32,
    address: String,
    status: Option<Status>,
    error: Option<String>,
}

fn start() -> anyhow::Result<Cluster> {
    Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-cc")),
        policy: Some("round-robin".to_owned()),
        raft: true,
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")
}

fn teardown(cluster: Cluster) -> anyhow::Result<()> {
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Polls every node's status until `cond` holds for each.
fn wait_all(
    cluster: &Cluster,
    what: &str,
    cond: impl Fn(&Status) -> bool,
) -> anyhow::Result<Vec<Status>> {
    let start = Instant::now();
    loop {
        let all: Vec<Status> = cluster
            .nodes()
            .iter()
            .map(|n| cluster.status(&n.name))
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

/// The leader, a follower whose socket every command goes to, and the other follower, whose
/// weight and drain flag the commands change (so each is a real forward to a non-leader).
struct Roles {
    leader: (String, u32),
    follower: String,
    other: (String, u32),
}

fn roles(cluster: &Cluster) -> anyhow::Result<Roles> {
    let leader = cluster.wait_master(None, PROPAGATION)?;
    let mut followers = cluster.nodes().iter().filter(|n| n.id != leader.id);
    let follower = followers.next().context("a follower")?.name.clone();
    let other = followers.next().context("a second follower")?;
    Ok(Roles {
        leader: (leader.name.clone(), leader.id),
        follower,
        other: (other.name.clone(), other.id),
    })
}

/// `ctl` that must fail; its message.
fn refused(cluster: &Cluster, node: &str, args: &[&str]) -> anyhow::Result<String> {
    match cluster.ctl(node, args) {
        Ok(out) => bail!("{node} accepted {args:?}: {out}"),
        Err(e) => Ok(e.to_string()),
    }
}

/// The master's entry for node `id`.
fn entry(s: &Status, id: u32) -> anyhow::Result<&tdsc_lab::status::NodeStatus> {
    s.nodes
        .iter()
        .find(|n| n.id == id)
        .with_context(|| format!("the master lists no node {id}: {:?}", s.nodes))
}

/// Through one follower's socket: `policy set` (seen on the master and every node), `weight`
/// and `drain`/`undrain` of the other follower (seen in the master's status and in where 90
/// new connections go), bad requests refused with their reason and nothing changed, and
/// `status --cluster` listing all three nodes — then, with one daemon killed, that node as
/// not answering.
#[test]
fn weight_drain_and_policy_sent_to_a_follower_take_effect_cluster_wide() -> anyhow::Result<()> {
    let Some(_lock) =
        exclusive_lab("weight_drain_and_policy_sent_to_a_follower_take_effect_cluster_wide")
    else {
        return Ok(());
    };
    let mut cluster = start()?;
    wait_all(&cluster, "three voters", |s| s.voters == [1, 2, 3])?;
    let Roles {
        leader,
        follower,
        other: (other_name, other),
    } = roles(&cluster)?;
    let f = follower.as_str();
    let clients = cluster.client_namespaces();
    let vip = SocketAddr::V4(cluster.vip());
    let stop = Arc::new(AtomicBool::new(false));
    let o = other.to_string();

    // policy set through the follower: committed by the leader, applied everywhere.
    let done = cluster.ctl(f, &["policy", "set", "weighted-round-robin"])?;
    ensure!(done.contains("weighted-round-robin"), "{done}");
    ensure!(cluster.status(&leader.0)?.policy == "weighted-round-robin");
    wait_all(&cluster, "every node applies the policy", |s| {
        s.policy == "weighted-round-robin"
    })?;

    // weight of the other follower through this one: seen by the master, and obeyed.
    let done = cluster.ctl(f, &["weight", &o, "0"])?;
    ensure!(done.contains(&format!("node {other}: weight 0")), "{done}");
    cluster.wait_master_status("weight 0 to reach the master", PROPAGATION, |s| {
        entry(s, other).is_ok_and(|n| n.weight == 0)
    })?;
    let tally = load::run(&clients, vip, 45, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    assert_eq!(tally.ok(), 90);
    assert_eq!(
        tally.by_node.get(&other).copied().unwrap_or(0),
        0,
        "node {other} at weight 0 got connections: {:?}",
        tally.by_node
    );
    cluster.ctl(f, &["weight", &o, "1"])?;
    cluster.wait_master_status("weight 1 to reach the master", PROPAGATION, |s| {
        entry(s, other).is_ok_and(|n| n.weight == 1)
    })?;

    // drain and undrain of the other follower through this one.
    let done = cluster.ctl(f, &["drain", &o])?;
    ensure!(done.contains("draining"), "{done}");
    ensure!(
        cluster
            .status(&other_name)?
            .nodes
            .iter()
            .any(|n| n.is_self && n.draining),
        "the drained node's own status does not say draining"
    );
    cluster.wait_master_status("drain to reach the master", PROPAGATION, |s| {
        entry(s, other).is_ok_and(|n| n.draining)
    })?;
    let tally = load::run(&clients, vip, 45, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    assert_eq!(
        tally.by_node.get(&other).copied().unwrap_or(0),
        0,
        "the draining node {other} got connections: {:?}",
        tally.by_node
    );
    cluster.ctl(f, &["undrain", &o])?;
    cluster.wait_master_status("undrain to reach the master", PROPAGATION, |s| {
        entry(s, other).is_ok_and(|n| !n.draining)
    })?;
    let tally = load::run(&clients, vip, 45, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    let back = tally.by_node.get(&other).copied().unwrap_or(0);
    assert!(
        (25..=35).contains(&back),
        "after undrain node {other} served {back} of 90: {:?}",
        tally.by_node
    );

    // Bad requests to the follower: refused with the reason, nothing changed.
    let bad: [(&[&str], &str); 7] = [
        (&["weight", "9", "1"], "node 9 is not a member"),
        (&["drain", "9"], "node 9 is not a member"),
        (&["weight", &o, "5000"], "outside 0..=1000"),
        (&["policy", "set", "fastest"], "unknown policy"),
        (&["node", "add", "4", "not-an-address"], "not an IP address"),
        // Checked by the leader, which refuses with its own reason.
        (&["node", "remove", "9"], "refused"),
        (
            &["node", "add", "4", "198.51.100.12"],
            "already used by node 2",
        ),
    ];
    for (args, want) in bad {
        let err = refused(&cluster, f, args)?;
        ensure!(err.contains(want), "{args:?}: {err}");
    }
    let s = cluster.status(&leader.0)?;
    ensure!(s.policy == "weighted-round-robin", "policy {}", s.policy);
    ensure!(s.voters == [1, 2, 3], "voters {:?}", s.voters);
    let n = entry(&s, other)?;
    ensure!(n.weight == 1 && !n.draining, "node {other} changed: {n:?}");
    let leader_counters = s.counters.remote_control;
    ensure!(
        leader_counters.failed >= 1,
        "the leader counted no refused change: {leader_counters:?}"
    );
    let fs = cluster.status(f)?.counters.remote_control;
    // policy, weight twice, drain, undrain, and the two the leader refused; the other bad
    // requests were refused before anything was sent.
    ensure!(fs.forwarded == 7, "the follower forwarded {fs:?}");
    ensure!(fs.timeouts == 0, "forwards timed out: {fs:?}");

    // status --cluster from the follower: all three, each its own status.
    let all: Vec<NodeAnswer> =
        serde_json::from_str(&cluster.ctl(f, &["status", "--cluster", "--json"])?)?;
    ensure!(
        all.iter().map(|a| a.id).collect::<Vec<_>>() == [1, 2, 3],
        "{all:?}"
    );
    for a in &all {
        let s = a
            .status
            .as_ref()
            .with_context(|| format!("no status: {a:?}"))?;
        ensure!(s.node_id == a.id && a.error.is_none(), "{a:?}");
        ensure!(s.policy == "weighted-round-robin", "{a:?}");
    }

    // A member whose daemon is down is listed as not answering, not left out.
    cluster.kill_daemon(&other_name)?;
    let all: Vec<NodeAnswer> =
        serde_json::from_str(&cluster.ctl(f, &["status", "--cluster", "--json"])?)?;
    ensure!(all.len() == 3, "{all:?}");
    for a in &all {
        if a.id == other {
            ensure!(a.status.is_none(), "{a:?}");
            let e = a.error.as_deref().unwrap_or_default();
            ensure!(e.contains("did not answer"), "{a:?}");
            ensure!(!a.address.is_empty(), "{a:?}");
        } else {
            ensure!(a.status.is_some(), "{a:?}");
        }
    }
    let table = cluster.ctl(f, &["status", "--cluster"])?;
    ensure!(table.contains(&format!("node {other} (")), "{table}");
    ensure!(table.contains("NO ANSWER"), "{table}");
    // A change for it cannot be carried out: a clear timeout, not a silent success.
    let err = refused(&cluster, f, &["drain", &o])?;
    ensure!(err.contains("did not answer"), "{err}");
    teardown(cluster)
}

/// Through one follower's socket: `affinity set` (committed by the leader, applied by every
/// node, and obeyed: with a /24 both clients' 90 connections go to one node; back to `none`
/// they spread over all three), `health set` of the other follower's checks (seen in its
/// status), and bad settings refused with their reason and nothing changed.
#[test]
fn affinity_and_health_settings_sent_to_a_follower_take_effect_cluster_wide() -> anyhow::Result<()>
{
    let Some(_lock) =
        exclusive_lab("affinity_and_health_settings_sent_to_a_follower_take_effect_cluster_wide")
    else {
        return Ok(());
    };
    let mut check = toml::Table::new();
    check.insert("name".into(), "web".into());
    check.insert("kind".into(), "tcp".into());
    check.insert("port".into(), 80.into());
    let cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-cs")),
        policy: Some("round-robin".to_owned()),
        raft: true,
        health_extra: vec![(
            "check".to_owned(),
            toml::Value::Array(vec![toml::Value::Table(check)]),
        )],
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")?;
    wait_all(&cluster, "three voters, all healthy", |s| {
        s.voters == [1, 2, 3] && s.health.as_ref().is_some_and(|h| h.healthy)
    })?;
    let Roles {
        leader,
        follower,
        other: (other_name, other),
    } = roles(&cluster)?;
    let f = follower.as_str();
    let o = other.to_string();
    let clients = cluster.client_namespaces();
    let vip = SocketAddr::V4(cluster.vip());
    let stop = Arc::new(AtomicBool::new(false));

    // affinity set through the follower: committed, applied everywhere, obeyed.
    let done = cluster.ctl(
        f,
        &[
            "affinity",
            "set",
            "client-address",
            "--timeout-ms",
            "60000",
            "--prefix-v4",
            "24",
        ],
    )?;
    ensure!(
        done.contains("client-address timeout_ms=60000 prefix_v4=24"),
        "{done}"
    );
    wait_all(&cluster, "every node applies the affinity", |s| {
        s.affinity
            .is_some_and(|a| a.timeout_ms == 60_000 && a.prefix_v4 == 24 && a.prefix_v6 == 128)
    })?;
    let tally = load::run(&clients, vip, 45, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    assert_eq!(
        tally.by_node.len(),
        1,
        "both clients share a /24, so one node should take all: {:?}",
        tally.by_node
    );
    // A change of the timeout alone keeps the prefix.
    cluster.ctl(
        f,
        &["affinity", "set", "client-address", "--timeout-ms", "30000"],
    )?;
    wait_all(&cluster, "every node applies the new timeout", |s| {
        s.affinity
            .is_some_and(|a| a.timeout_ms == 30_000 && a.prefix_v4 == 24)
    })?;
    let done = cluster.ctl(f, &["affinity", "set", "none"])?;
    ensure!(done.contains("affinity none"), "{done}");
    wait_all(&cluster, "every node turns affinity off", |s| {
        s.affinity.is_none()
    })?;
    let tally = load::run(&clients, vip, 45, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    assert_eq!(
        tally.by_node.len(),
        3,
        "round robin again: {:?}",
        tally.by_node
    );

    // health set of the other follower's checks through this one.
    let done = cluster.ctl(
        f,
        &[
            "health",
            "set",
            &o,
            "--interval-ms",
            "300",
            "--timeout-ms",
            "100",
            "--fall",
            "2",
        ],
    )?;
    ensure!(
        done.contains(&format!(
            "node {other}: check web every 300 ms, timeout 100 ms, rise 2, fall 2"
        )),
        "{done}"
    );
    let web = |s: &Status| {
        s.health
            .as_ref()
            .and_then(|h| h.checks.iter().find(|c| c.name == "web").cloned())
    };
    let c = web(&cluster.status(&other_name)?).context("no check web")?;
    ensure!(
        (c.interval_ms, c.timeout_ms, c.rise, c.fall) == (300, 100, 2, 2),
        "{c:?}"
    );
    let untouched = web(&cluster.status(f)?).context("no check web")?;
    ensure!(
        untouched.interval_ms == 2000,
        "the follower's own check changed: {untouched:?}"
    );

    // Bad settings: refused with the reason, nothing changed.
    let bad: [(&[&str], &str); 6] = [
        (&["affinity", "set", "sticky"], "unknown affinity"),
        (
            &["affinity", "set", "none", "--timeout-ms", "5"],
            "client-address\" only",
        ),
        (
            &["affinity", "set", "client-address", "--prefix-v4", "33"],
            "outside 1..=32",
        ),
        (
            &["health", "set", &o, "--interval-ms", "5"],
            "outside 10..=",
        ),
        (
            &["health", "set", &o, "--check", "db", "--fall", "3"],
            "no health check named \"db\"",
        ),
        (
            &["health", "set", &o, "--interval-ms", "50"],
            "would exceed its interval",
        ),
    ];
    for (args, want) in bad {
        let err = refused(&cluster, f, args)?;
        ensure!(err.contains(want), "{args:?}: {err}");
    }
    let c = web(&cluster.status(&other_name)?).context("no check web")?;
    ensure!(
        (c.interval_ms, c.fall) == (300, 2),
        "changed by a refused request: {c:?}"
    );
    ensure!(
        cluster.status(&leader.0)?.affinity.is_none(),
        "affinity changed"
    );
    teardown(cluster)
}

/// `node remove` and `node add` of the other follower through one follower's socket: the
/// leader commits each, every node shows the new voters, the removed node takes no new
/// connection, and the re-added one is a voter and member again.
#[test]
fn node_remove_and_add_sent_to_a_follower_are_committed_by_the_leader() -> anyhow::Result<()> {
    let Some(_lock) =
        exclusive_lab("node_remove_and_add_sent_to_a_follower_are_committed_by_the_leader")
    else {
        return Ok(());
    };
    let cluster = start()?;
    wait_all(&cluster, "three voters", |s| s.voters == [1, 2, 3])?;
    let Roles {
        follower,
        other: (other_name, other),
        ..
    } = roles(&cluster)?;
    let f = follower.as_str();
    let address = cluster
        .node_by_id(other)
        .and_then(|n| n.cluster_addr)
        .context("address")?
        .to_string();
    let mut rest: Vec<u32> = vec![1, 2, 3];
    rest.retain(|&i| i != other);

    let done = cluster.ctl(f, &["node", "remove", &other.to_string()])?;
    ensure!(
        done.contains("removed") && done.contains("voters now"),
        "{done}"
    );
    let start = Instant::now();
    for n in cluster.nodes().iter().filter(|n| n.id != other) {
        loop {
            let s = cluster.status(&n.name)?;
            if s.voters == rest {
                break;
            }
            ensure!(
                start.elapsed() < PROPAGATION,
                "{}: voters {:?}",
                n.name,
                s.voters
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let clients = cluster.client_namespaces();
    let vip = SocketAddr::V4(cluster.vip());
    let stop = Arc::new(AtomicBool::new(false));
    let tally = load::run(&clients, vip, 30, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    assert_eq!(
        tally.by_node.get(&other).copied().unwrap_or(0),
        0,
        "the removed node {other} got connections: {:?}",
        tally.by_node
    );
    ensure!(
        !cluster.status(&other_name)?.member,
        "node {other} still a member"
    );

    let done = cluster.ctl(f, &["node", "add", &other.to_string(), &address])?;
    ensure!(done.contains("added"), "{done}");
    wait_all(&cluster, "three voters again", |s| {
        s.voters == [1, 2, 3] && s.member
    })?;
    teardown(cluster)
}
