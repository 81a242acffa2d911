//! Runtime control on a running 3-node cluster in network namespaces (root only; prints SKIP
//! otherwise): `tdscctl policy set`, `weight`, `drain` and `undrain`. Each test builds its own
//! lab (`tdsc-ctl-<pid>-<n>`) and removes it, also on failure.
//!
//! Changes of weight and drain travel in the node's reports to the master, so each test
//! waits until the master's status shows the change before it sends the traffic whose split
//! it asserts; no assertion depends on how long anything took.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::{http, load, netns, nft};

/// How long a change may take to reach the master before the test gives up (reports go every
/// 200 ms).
const PROPAGATION: Duration = Duration::from_secs(10);

fn start(policy: &str) -> anyhow::Result<Cluster> {
    Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-ctl")),
        policy: Some(policy.to_owned()),
        ..ClusterOptions::default()
    })
    .context("start the cluster")
}

fn teardown(cluster: Cluster) -> anyhow::Result<()> {
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))
}

/// `tdscctl policy set` on the master while two clients send 3,000 requests: every policy in
/// turn, then back to round robin. No request fails, no client sees an RST, every connection
/// got exactly one SYN/ACK, and the master's status names each policy as it is set.
#[test]
fn policy_switch_mid_traffic_loses_no_connection() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("policy_switch_mid_traffic_loses_no_connection") else {
        return Ok(());
    };
    let mut cluster = start("round-robin")?;
    let clients = cluster.client_namespaces();
    for ns in &clients {
        nft::install_client_probe(ns)?;
    }
    let master = cluster.master()?.name.clone();
    let vip = SocketAddr::V4(cluster.vip());
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load::spawn(&clients, vip, 1500, &stop);
    // Switch only once traffic flows, so the switches really happen under load.
    cluster.wait_master_status("traffic to start", PROPAGATION, |s| {
        s.counters.syns_dispatched >= 50
    })?;
    let policies = [
        "least-connections",
        "power-of-two",
        "least-load",
        "weighted-round-robin",
        "isn-hash",
        "static-hash",
        "round-robin",
    ];
    let mut dispatched_at = Vec::new();
    for p in policies {
        let out = cluster.ctl(&master, &["policy", "set", p])?;
        ensure!(out.contains(p), "tdscctl said {out:?}");
        let s = cluster.status(&master)?;
        ensure!(s.policy == p, "status names policy {:?}, not {p}", s.policy);
        dispatched_at.push(s.counters.syns_dispatched);
    }
    let tally = traffic
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
    cluster.check_daemons()?;
    // The last switch came before the last request: the whole sequence ran under traffic.
    let total = cluster.status(&master)?.counters.syns_dispatched;
    ensure!(
        dispatched_at.last().copied().unwrap_or(0) < total,
        "switches did not overlap traffic: {dispatched_at:?}, total {total}"
    );
    assert_eq!(
        tally.failures, 0,
        "failed requests, e.g. {:?}",
        tally.sample_errors
    );
    assert_eq!(tally.ok(), 3000);
    let (rsts, synacks) = nft::clients_counters(&clients)?;
    assert_eq!(rsts, 0, "clients received TCP RSTs");
    assert_eq!(synacks, 3000, "SYN/ACKs != connections");
    // An unknown name is refused and changes nothing.
    ensure!(cluster.ctl(&master, &["policy", "set", "random"]).is_err());
    ensure!(cluster.status(&master)?.policy == "round-robin");
    teardown(cluster)
}

/// A client connection that stays open: it sends its request line, then one header line a
/// second (the lab server waits for the end of the headers), until told to finish; then it
/// ends the headers and returns the serving node's reply.
struct LongConnection {
    finish: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<anyhow::Result<http::Reply>, netns::NetnsError>>,
}

impl LongConnection {
    fn open(ns: &str, vip: SocketAddr) -> Self {
        let finish = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&finish);
        let handle = netns::spawn_in(ns, move || -> anyhow::Result<http::Reply> {
            let started = std::time::Instant::now();
            let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
            let connect_time = started.elapsed();
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /long HTTP/1.0\r\n")?;
            let mut ticks = 0u32;
            while !f.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    s.write_all(b"X-Still-Here: 1\r\n")?;
                }
            }
            s.write_all(b"\r\n")?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            Ok(http::parse_reply(vip, &raw, connect_time)?)
        });
        LongConnection { finish, handle }
    }

    fn finish(self) -> anyhow::Result<http::Reply> {
        self.finish.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("long connection thread panicked"))??
    }
}

/// `tdscctl drain` on the node that holds a long-lived connection: the master's status shows
/// it draining, 90 new requests go only to the other two nodes, the long connection still
/// completes on the drained node, its connection count goes to zero; `undrain` brings it back
/// into the rotation.
#[test]
fn drain_stops_new_connections_and_lets_existing_ones_finish() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("drain_stops_new_connections_and_lets_existing_ones_finish")
    else {
        return Ok(());
    };
    let mut cluster = start("round-robin")?;
    let clients = cluster.client_namespaces();
    for ns in &clients {
        nft::install_client_probe(ns)?;
    }
    let vip = SocketAddr::V4(cluster.vip());
    let long = LongConnection::open(&clients[0], vip);
    // The node whose report shows the one connection owns it.
    let s = cluster.wait_master_status("the long connection to be reported", PROPAGATION, |s| {
        s.nodes.iter().map(|n| n.connections).sum::<u64>() == 1
    })?;
    let owner_id = s
        .nodes
        .iter()
        .find(|n| n.connections == 1)
        .map(|n| n.id)
        .context("no owner")?;
    let owner = cluster
        .node_by_id(owner_id)
        .context("owner not in cluster")?
        .name
        .clone();

    // A drain for a node that is not a member is refused (any node's socket takes a drain
    // for a member: tests/tests/cluster_control.rs).
    ensure!(
        cluster.ctl(&owner, &["drain", "9"]).is_err(),
        "a node accepted a drain for a non-member"
    );
    cluster.ctl(&owner, &["drain", &owner_id.to_string()])?;
    cluster.wait_master_status("drain to reach the master", PROPAGATION, |s| {
        s.nodes.iter().any(|n| n.id == owner_id && n.draining)
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = load::run(&clients, vip, 45, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    assert_eq!(tally.ok(), 90);
    assert_eq!(
        tally.by_node.get(&owner_id).copied().unwrap_or(0),
        0,
        "the draining node {owner_id} got new connections: {:?}",
        tally.by_node
    );
    ensure!(
        tally.by_node.len() == 2,
        "expected the two other nodes to serve: {:?}",
        tally.by_node
    );

    // The existing connection on the draining node still completes there.
    let reply = long.finish()?;
    assert_eq!(reply.node, owner_id, "the long connection moved");
    let s =
        cluster.wait_master_status("the drained node's count to reach 0", PROPAGATION, |s| {
            s.nodes
                .iter()
                .any(|n| n.id == owner_id && n.draining && n.connections == 0)
        })?;
    ensure!(s.nodes.iter().all(|n| n.alive), "{:?}", s.nodes);

    cluster.ctl(&owner, &["undrain", &owner_id.to_string()])?;
    cluster.wait_master_status("undrain to reach the master", PROPAGATION, |s| {
        s.nodes.iter().any(|n| n.id == owner_id && !n.draining)
    })?;
    let tally = load::run(&clients, vip, 45, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    let back = tally.by_node.get(&owner_id).copied().unwrap_or(0);
    assert!(
        (28..=32).contains(&back),
        "after undrain node {owner_id} served {back} of 90: {:?}",
        tally.by_node
    );
    let (rsts, _) = nft::clients_counters(&clients)?;
    assert_eq!(rsts, 0, "clients received TCP RSTs");
    cluster.check_daemons()?;
    teardown(cluster)
}

/// `tdscctl weight` under weighted round robin: node 2 weight 3, node 3 weight 0 → 120
/// requests split 30 : 90 : 0. Then node 3 back to 1 and it serves again.
#[test]
fn weights_change_the_split_at_run_time() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("weights_change_the_split_at_run_time") else {
        return Ok(());
    };
    let mut cluster = start("weighted-round-robin")?;
    let clients = cluster.client_namespaces();
    let vip = SocketAddr::V4(cluster.vip());
    let name = |id: u32| -> anyhow::Result<String> {
        Ok(cluster.node_by_id(id).context("node")?.name.clone())
    };
    let (n2, n3) = (name(2)?, name(3)?);
    ensure!(
        cluster.ctl(&n2, &["weight", "9", "0"]).is_err(),
        "node 2 accepted a weight for a non-member"
    );
    ensure!(
        cluster.ctl(&n2, &["weight", "2", "5000"]).is_err(),
        "weight above the maximum accepted"
    );
    cluster.ctl(&n2, &["weight", "2", "3"])?;
    cluster.ctl(&n3, &["weight", "3", "0"])?;
    cluster.wait_master_status("weights to reach the master", PROPAGATION, |s| {
        let w: BTreeMap<u32, u32> = s.nodes.iter().map(|n| (n.id, n.weight)).collect();
        w.get(&2) == Some(&3) && w.get(&3) == Some(&0)
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = load::run(&clients, vip, 60, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    let got = |id| tally.by_node.get(&id).copied().unwrap_or(0);
    assert_eq!(got(3), 0, "weight 0 node served: {:?}", tally.by_node);
    assert!(
        (88..=92).contains(&got(2)) && (28..=32).contains(&got(1)),
        "not 30:90:0: {:?}",
        tally.by_node
    );

    cluster.ctl(&n3, &["weight", "3", "1"])?;
    cluster.wait_master_status("weight 1 to reach the master", PROPAGATION, |s| {
        s.nodes.iter().any(|n| n.id == 3 && n.weight == 1)
    })?;
    let tally = load::run(&clients, vip, 50, &stop)?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    let got = |id| tally.by_node.get(&id).copied().unwrap_or(0);
    assert!(
        (18..=22).contains(&got(3)) && (58..=62).contains(&got(2)),
        "not 1:3:1 of 100: {:?}",
        tally.by_node
    );
    cluster.check_daemons()?;
    teardown(cluster)
}

/// The control socket's limits on a running node: with 16 sessions open a 17th connection
/// gets an error line and is closed; a request line over 4096 bytes gets an error reply and
/// its session is closed; both are counted in `status`, and the node serves on (a normal
/// request on a fresh session is answered).
#[test]
fn the_control_socket_caps_sessions_and_request_size() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("the_control_socket_caps_sessions_and_request_size") else {
        return Ok(());
    };
    let cluster = start("round-robin")?;
    let result = control_limits(&cluster);
    let torn = teardown(cluster);
    result.and(torn)
}

/// Reads one reply line (or what came before EOF) with a timeout.
fn reply_line(s: &mut std::os::unix::net::UnixStream) -> anyhow::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn control_limits(cluster: &Cluster) -> anyhow::Result<()> {
    use std::os::unix::net::UnixStream;
    let node = &cluster.nodes()[0];
    let before = cluster.status(&node.name)?.counters.control;

    // 16 idle sessions: each answers a status request, so each is being served.
    let mut open = Vec::new();
    for _ in 0..16 {
        let mut s = UnixStream::connect(&node.socket).context("connect")?;
        s.write_all(b"{\"cmd\":\"status\"}\n")?;
        let line = reply_line(&mut s)?;
        ensure!(line.contains("\"node_id\""), "not a status reply: {line}");
        open.push(s);
    }
    let mut extra = UnixStream::connect(&node.socket)?;
    let refused = reply_line(&mut extra)
        .context("the 17th session got no reply within 5 s: it was not refused")?;
    ensure!(
        refused.contains("too many control sessions"),
        "the 17th session was not refused: {refused:?}"
    );
    let mut rest = Vec::new();
    extra.set_read_timeout(Some(Duration::from_secs(5)))?;
    ensure!(
        extra.read_to_end(&mut rest)? == 0,
        "the 17th session stays open"
    );
    drop(open);

    // An over-size request: an error, then EOF. The 16 sessions end as the daemon reads
    // their EOF; until it has, a new connection is still refused for the cap (and counted).
    let mut line = vec![b' '; 5000];
    line.push(b'\n');
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (mut big, reply) = loop {
        let mut big = UnixStream::connect(&node.socket)?;
        // The daemon may close before it has read everything: a broken pipe is fine.
        let _ = big.write_all(&line);
        let reply = reply_line(&mut big)?;
        if !reply.contains("too many control sessions") {
            break (big, reply);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the ended sessions were not reaped"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        reply.contains("request longer than 4096 bytes"),
        "over-size request not refused: {reply:?}"
    );
    rest.clear();
    ensure!(
        big.read_to_end(&mut rest).unwrap_or(0) == 0,
        "session stays open after it"
    );

    // Counted, and the socket serves on (sessions are reaped as they end).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let after = loop {
        if let Ok(s) = cluster.status(&node.name) {
            break s.counters.control;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "status not answered after the limits"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        after.over_cap > before.over_cap && after.oversize == before.oversize + 1,
        "control counters {before:?} -> {after:?}"
    );
    Ok(())
}
