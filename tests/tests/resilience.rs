//! Resilience under Raft, end to end on a 3-node lab (root only; SKIP otherwise): forward-term
//! fencing at members, the hard loss of the master's node, and a rolling restart of every
//! daemon under load. Each test builds its own lab and removes it, also on failure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{
    exclusive_lab, forward_counter_now, unique_lab_name, Cluster, ClusterNode, ClusterOptions,
};
use tdsc_lab::packet::{self, Capture, RawProtoSender, Syn};
use tdsc_lab::streams::stream_from;
use tdsc_lab::{load, netns, nft};
use tdsc_proto::forward::{ForwardHeader, FORWARD_PROTO};
use tdsc_proto::seal::Keyring;

fn start_raft(prefix: &str) -> anyhow::Result<Cluster> {
    Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name(prefix)),
        policy: Some("round-robin".to_owned()),
        raft: true,
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")
}

/// Runs `body` and tears the cluster down whatever it returned.
fn with_cluster(
    cluster: Cluster,
    body: impl FnOnce(&mut Cluster) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut cluster = cluster;
    let result = body(&mut cluster);
    let teardown = cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"));
    result?;
    teardown
}

/// A forward from `origin` stamped with `term`, carrying a bare SYN from `client:sport`.
/// Tagged with `ring` and a counter ahead of the master's (see `forward_counter_now`).
fn forward(
    ring: &Keyring,
    term: u64,
    origin: u32,
    client: Ipv4Addr,
    vip: SocketAddr,
    sport: u16,
) -> Vec<u8> {
    let SocketAddr::V4(vip) = vip else {
        unreachable!("the lab's VIP is IPv4")
    };
    let seg = Syn {
        src: client,
        dst: *vip.ip(),
        sport,
        dport: vip.port(),
        seq: 0x5eed_0000 | u32::from(sport),
        payload: Vec::new(),
    }
    .segment();
    let header = ForwardHeader {
        term,
        origin,
        counter: forward_counter_now(),
        client: client.into(),
        vip: (*vip.ip()).into(),
    };
    let mut buf = vec![0u8; 256];
    let n = header.encode_packet(&seg, ring, &mut buf).expect("fits");
    buf.truncate(n);
    buf
}

/// A member refuses a forward stamped with an older term than it knows: counted as
/// `stale_term`, never re-injected, never answered. The same forward stamped with the current
/// term, sent right after, is re-injected and answered (so the capture would have seen an
/// answer to the stale one).
#[test]
fn a_member_refuses_a_forward_from_an_older_term() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_member_refuses_a_forward_from_an_older_term") else {
        return Ok(());
    };
    with_cluster(start_raft("tdsc-rs")?, |cluster| {
        let vip = SocketAddr::V4(cluster.vip());
        let master = cluster.master()?.clone();
        let member = cluster
            .nodes()
            .iter()
            .find(|n| n.id != master.id)
            .cloned()
            .context("a member")?;
        let member_addr = member.cluster_addr.context("member cluster address")?;
        let client = cluster.clients()[0].clone();
        let client_ns = cluster.netns(&client.name);
        // The client has no socket for these SYNs and would reset the SYN/ACKs.
        nft::drop_outgoing_rsts(&client_ns)?;

        let before = cluster.status(&member.name)?;
        let term = before.term;
        ensure!(term >= 1, "a raft member knows a term: {before:?}");
        // Outside the ephemeral port range, so no real connection collides.
        let stale_port = 21_000 + u16::try_from(std::process::id() % 4000).expect("small");
        let fresh_port = stale_port + 1;
        let ring = cluster.keyring()?;
        let stale = forward(&ring, term - 1, master.id, client.addr, vip, stale_port);
        let fresh = forward(&ring, term, master.id, client.addr, vip, fresh_port);

        let cap = netns::run_in(&client_ns, || {
            Capture::open("eth0", Duration::from_millis(100))
        })??;
        // Sent from the master's namespace, so the source address and origin are right.
        netns::run_in(&cluster.netns(&master.name), || -> anyhow::Result<()> {
            let tx = RawProtoSender::new(FORWARD_PROTO)?;
            tx.send(&stale, member_addr)?;
            std::thread::sleep(Duration::from_millis(100));
            tx.send(&fresh, member_addr)?;
            Ok(())
        })??;
        let (mut stale_answers, mut fresh_answers) = (0, 0);
        let mut buf = vec![0u8; 2048];
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            if let Some(f) = cap.recv(&mut buf)?.and_then(packet::parse_tcp_frame) {
                if f.is_syn_ack() && f.dport == stale_port {
                    stale_answers += 1;
                } else if f.is_syn_ack() && f.dport == fresh_port {
                    fresh_answers += 1;
                }
            }
        }

        let deadline = Instant::now() + Duration::from_secs(3);
        let after = loop {
            let a = cluster.status(&member.name)?;
            if a.counters.forward_rejected.stale_term > before.counters.forward_rejected.stale_term
                || Instant::now() > deadline
            {
                break a;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        ensure!(
            after.term == term,
            "the term moved during the test: {after:?}"
        );
        assert_eq!(
            after.counters.forward_rejected.stale_term
                - before.counters.forward_rejected.stale_term,
            1,
            "the stale forward is counted as stale_term"
        );
        assert_eq!(
            after.counters.received_forwarded - before.counters.received_forwarded,
            1,
            "only the current-term forward is accepted"
        );
        assert_eq!(stale_answers, 0, "the stale forward was answered");
        assert!(
            fresh_answers >= 1,
            "control: the current-term forward was not answered, so the capture proves nothing"
        );
        cluster.check_daemons()?;
        Ok(())
    })
}

/// The master's node loses every link (eth0 and eth1 down in its namespace) while two clients
/// keep opening connections and six long-lived connections (two on every node) stream both
/// ways. The connections on the two surviving nodes all survive (none lost, no RST seen by
/// any client); a new master takes over and every new request succeeds on the survivors.
/// With the links back, the old master rejoins as a member of the new one and is given
/// connections again.
#[test]
fn losing_the_master_node_loses_only_its_own_connections() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("losing_the_master_node_loses_only_its_own_connections") else {
        return Ok(());
    };
    with_cluster(start_raft("tdsc-rs")?, |cluster| {
        let clients = cluster.client_namespaces();
        for ns in &clients {
            nft::install_client_probe(ns)?;
        }
        let vip = SocketAddr::V4(cluster.vip());
        let old = cluster.master()?.clone();
        let old_ns = cluster.netns(&old.name);
        let old_term = cluster.status(&old.name)?.term;

        // One thread per connection, so that a connection to the lost node, blocked in its
        // read, does not hold up the others; each has its own round-trip counter.
        let stop_streams = Arc::new(AtomicBool::new(false));
        let mut streams = Vec::new();
        for ns in clients.iter().cycle().take(6) {
            let progress = Arc::new(AtomicU64::new(0));
            let h = stream_from(ns, vip, 1, stop_streams.clone(), progress.clone());
            streams.push((h, progress));
            // Opened one after another, so round robin puts two on every node.
            while streams
                .last()
                .is_some_and(|(_, p)| p.load(Ordering::Relaxed) == 0)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let stop_load = Arc::new(AtomicBool::new(false));
        let load = load::spawn(&clients, vip, 100_000, &stop_load);
        std::thread::sleep(Duration::from_millis(500));

        for dev in ["eth0", "eth1"] {
            netns::exec(&old_ns, "ip", ["link", "set", dev, "down"])?;
        }
        let at_loss: Vec<u64> = streams
            .iter()
            .map(|(_, p)| p.load(Ordering::Relaxed))
            .collect();
        let new = cluster
            .wait_master(Some(&old.name), Duration::from_secs(5))
            .context("no new master after the old one's links went down")?;
        ensure!(cluster.status(&new.name)?.term > old_term);
        cluster.wait_liveness(&new.name, old.id, false)?;
        std::thread::sleep(Duration::from_millis(1000));
        stop_load.store(true, Ordering::Relaxed);
        let during = load.join().expect("load thread")?;
        eprintln!(
            "during the loss: {} ok {:?}, {} failed {:?}",
            during.ok(),
            during.by_node,
            during.failures,
            during.sample_errors
        );

        // Service resumed on the survivors: every request succeeds, none on the lost node.
        load::assert_served_without(&clients, vip, 30, old.id, "after the takeover")?;

        // Stop streaming before the links come back: what survived, survived the loss, and
        // kept streaming after it.
        stop_streams.store(true, Ordering::Relaxed);
        let mut per_node: BTreeMap<u32, usize> = BTreeMap::new();
        let mut lost_elsewhere = Vec::new();
        for ((h, _), at_loss) in streams.into_iter().zip(at_loss) {
            for r in h.join().expect("stream thread")?? {
                eprintln!("stream: {r:?} ({at_loss} round trips when the links went down)");
                *per_node.entry(r.node).or_default() += 1;
                if r.node != old.id && (r.error.is_some() || r.rounds <= at_loss + 20) {
                    lost_elsewhere.push(r);
                }
            }
        }
        let all: BTreeSet<u32> = cluster.nodes().iter().map(|n| n.id).collect();
        assert_eq!(
            per_node.keys().copied().collect::<BTreeSet<_>>(),
            all,
            "a long-lived connection on every node: {per_node:?}"
        );
        assert_eq!(per_node.values().sum::<usize>(), 6);
        assert!(
            lost_elsewhere.is_empty(),
            "connections on surviving nodes were lost: {lost_elsewhere:?}"
        );
        assert_eq!(
            nft::clients_counters(&clients)?.0,
            0,
            "a client received an RST"
        );

        // The links come back: the old master rejoins as a member and gets connections again.
        for dev in ["eth0", "eth1"] {
            netns::exec(&old_ns, "ip", ["link", "set", dev, "up"])?;
        }
        cluster.wait_liveness(&new.name, old.id, true)?;
        wait_follows(cluster, &old, new.id)?;
        let again = load::run(&clients, vip, 30, &Arc::new(AtomicBool::new(false)))?;
        assert_eq!(again.failures, 0, "{:?}", again.sample_errors);
        assert!(
            again.by_node.get(&old.id).copied().unwrap_or(0) >= 15,
            "the rejoined node gets its share again: {:?}",
            again.by_node
        );
        cluster.check_daemons()?;
        Ok(())
    })
}

/// Waits until `node` is a member that names `master` as master.
fn wait_follows(cluster: &Cluster, node: &ClusterNode, master: u32) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let s = cluster.status(&node.name);
        if let Ok(s) = &s {
            if s.role == "member" && s.master_id == Some(master) {
                return Ok(());
            }
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "{} does not follow master {master}: {s:?}",
            node.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a stopped daemon stays down before it is started again (an upgrade's install).
/// Longer than the clients' 3 s request timeout: a connection the stopping node dropped
/// would not be saved by TCP retransmitting into the restarted node.
const RESTART_DOWNTIME: Duration = Duration::from_secs(4);

/// Every node's daemon is restarted one at a time — SIGTERM, wait for exit, stay down for
/// [`RESTART_DOWNTIME`], start again, wait until it is back in the cluster and serving —
/// while six client threads send short HTTP requests without pause. The servers take 30–150
/// ms per request, so every node has requests in flight whenever its daemon is told to stop.
/// The master is restarted too (second in line, so that a restarted node is among the
/// candidates it hands leadership to). No request fails, no client sees an RST, and every
/// node receives connections again after its restart.
#[test]
fn a_rolling_restart_under_load_fails_no_request() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_rolling_restart_under_load_fails_no_request") else {
        return Ok(());
    };
    let cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-rs")),
        policy: Some("round-robin".to_owned()),
        raft: true,
        httpd_args: [
            "--cgi-slots",
            "64",
            "--short-ms",
            "30",
            "--long-ms",
            "150",
            "--long-frac",
            "0.3",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")?;
    with_cluster(cluster, |cluster| {
        let clients = cluster.client_namespaces();
        for ns in &clients {
            nft::install_client_probe(ns)?;
        }
        let vip = SocketAddr::V4(cluster.vip());
        let master = cluster.master()?.clone();
        let mut order: Vec<ClusterNode> = cluster
            .nodes()
            .iter()
            .filter(|n| n.id != master.id)
            .cloned()
            .collect();
        order.insert(1, master.clone());

        let stop_load = Arc::new(AtomicBool::new(false));
        // Three request threads in each client namespace.
        let threads: Vec<String> = clients.iter().cycle().take(6).cloned().collect();
        let load = load::spawn(&threads, vip, 1_000_000, &stop_load);
        std::thread::sleep(Duration::from_millis(500));

        let result = (|| -> anyhow::Result<Vec<String>> {
            let mut report = Vec::new();
            for node in &order {
                let was_master = cluster.current_master(None).map(|m| m.id) == Some(node.id);
                let (status, log) = cluster
                    .stop_daemon(&node.name, Duration::from_secs(60))
                    .with_context(|| format!("stop {}", node.name))?;
                ensure!(
                    status.contains("exit status: 0"),
                    "{} exited with {status}:\n{log}",
                    node.name
                );
                // It stopped because its connections were done, not because time ran out;
                // a master handed leadership over rather than leaving the group to time out.
                ensure!(
                    log.contains("drained: no connection left"),
                    "{} did not drain:\n{log}",
                    node.name
                );
                ensure!(
                    !was_master || log.contains("leadership handed over"),
                    "master {} did not hand leadership over:\n{log}",
                    node.name
                );
                std::thread::sleep(RESTART_DOWNTIME);
                cluster.restart_daemon(&node.name, Duration::from_secs(15))?;
                let served_at_restart = cluster.served(&node.name)?;
                let m = cluster.wait_master(None, Duration::from_secs(10))?;
                cluster.wait_liveness(&m.name, node.id, true)?;
                // Served again: requests arrive through the VIP after the restart.
                let start = Instant::now();
                let served = loop {
                    let s = cluster.served(&node.name)?;
                    if s > served_at_restart || start.elapsed() > Duration::from_secs(15) {
                        break s;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                };
                ensure!(
                    served > served_at_restart,
                    "{} received no connection after its restart (served {served})",
                    node.name
                );
                report.push(format!(
                    "{}{}: stopped ({status}), rejoined under master {}, served {} since",
                    node.name,
                    if was_master { " (master)" } else { "" },
                    m.name,
                    served - served_at_restart
                ));
            }
            Ok(report)
        })();
        stop_load.store(true, Ordering::Relaxed);
        let tally = load.join().expect("load thread")?;
        let report = result?;
        for line in &report {
            eprintln!("{line}");
        }
        eprintln!(
            "rolling restart: {} ok {:?}, {} failed {:?}",
            tally.ok(),
            tally.by_node,
            tally.failures,
            tally.sample_errors
        );
        ensure!(tally.ok() > 300, "too little traffic to prove anything");
        assert_eq!(
            tally.failures, 0,
            "client requests failed during the rolling restart: {:?}",
            tally.sample_errors
        );
        assert_eq!(
            nft::clients_counters(&clients)?.0,
            0,
            "a client received an RST"
        );
        cluster.check_daemons()?;
        Ok(())
    })
}

/// Opens an echo connection to `vip` from `ns` and returns it with the id of the node that
/// took it (from the `node=N` greeting).
fn open_echo(ns: &str, vip: SocketAddr) -> anyhow::Result<(std::net::TcpStream, u32)> {
    use std::io::{Read, Write};
    netns::run_in(ns, || -> anyhow::Result<_> {
        let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /__echo HTTP/1.0\r\n\r\n")?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !(head.windows(4).any(|w| w == b"\r\n\r\n")
            && head.ends_with(b"\n")
            && String::from_utf8_lossy(&head).contains("node="))
        {
            ensure!(s.read(&mut b)? == 1, "echo connection closed early");
            head.push(b[0]);
        }
        let node = String::from_utf8_lossy(&head)
            .lines()
            .find_map(|l| l.strip_prefix("node=").and_then(|v| v.trim().parse().ok()))
            .context("no node= in the echo greeting")?;
        Ok((s, node))
    })?
}

/// One echo round trip on an open connection.
fn echo_once(s: &mut std::net::TcpStream, seq: u64) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let out = [seq.to_be_bytes(); 4].concat();
    let mut back = [0u8; 32];
    s.write_all(&out)?;
    s.read_exact(&mut back)?;
    ensure!(back[..] == out[..], "echo came back different");
    Ok(())
}

/// SIGTERM to the daemon of a node that holds an open connection: the node announces that it
/// is draining and keeps running — and keeps serving that connection — while the connection
/// is open; a second SIGTERM ends the wait and the daemon exits cleanly. The others carry on
/// serving new requests.
#[test]
fn a_stopping_node_waits_for_its_connection_until_a_second_sigterm() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_stopping_node_waits_for_its_connection") else {
        return Ok(());
    };
    with_cluster(start_raft("tdsc-rs")?, |cluster| {
        let vip = SocketAddr::V4(cluster.vip());
        let clients = cluster.client_namespaces();
        let (mut conn, id) = open_echo(&clients[0], vip)?;
        let node = cluster
            .node_by_id(id)
            .cloned()
            .context("the echo greeting names a cluster node")?;
        echo_once(&mut conn, 1)?;

        let pid = libc::pid_t::try_from(cluster.daemon_pid(&node.name)?)?;
        // SAFETY: kill(2) on a pid this test's lab started; no memory is involved.
        let r = unsafe { libc::kill(pid, libc::SIGTERM) };
        ensure!(
            r == 0,
            "kill -TERM {pid}: {}",
            std::io::Error::last_os_error()
        );

        // Draining is announced to the others (whoever is master now, or soon).
        let start = Instant::now();
        loop {
            let seen = cluster
                .nodes()
                .iter()
                .filter(|n| n.id != id)
                .filter_map(|n| cluster.status(&n.name).ok())
                .any(|s| s.nodes.iter().any(|n| n.id == id && n.draining));
            if seen {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "no other node saw node {id} draining"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Well past the point where it would have drained an idle node, it still runs and
        // still serves the connection it holds.
        std::thread::sleep(Duration::from_millis(1500));
        cluster
            .check_daemons()
            .context("the daemon exited with a connection still open")?;
        for seq in 2..12 {
            echo_once(&mut conn, seq).context("the held connection during the drain")?;
        }
        // New requests meanwhile go to the others.
        let stop = Arc::new(AtomicBool::new(false));
        let during = load::run(&clients, vip, 15, &stop)?;
        assert_eq!(during.failures, 0, "{:?}", during.sample_errors);
        assert!(
            !during.by_node.contains_key(&id),
            "the draining node got new connections: {:?}",
            during.by_node
        );

        let (status, log) = cluster.stop_daemon(&node.name, Duration::from_secs(10))?;
        ensure!(status.contains("exit status: 0"), "{status}:\n{log}");
        ensure!(
            log.contains("second signal"),
            "the second SIGTERM did not cut the wait short:\n{log}"
        );
        drop(conn);
        let m = cluster.wait_master(Some(&node.name), Duration::from_secs(10))?;
        cluster.wait_liveness(&m.name, id, false)?;
        let after = load::run(&clients, vip, 15, &stop)?;
        assert_eq!(after.failures, 0, "{:?}", after.sample_errors);
        Ok(())
    })
}

/// The master's disk stops taking writes (its Raft data directory made immutable, so the
/// state file's atomic replace fails, even for root) under load: the master withholds every
/// message, its heartbeats included, so the others elect a master that can write; no request
/// fails; once the directory takes writes again the node writes its state and rejoins as a
/// follower. (With heartbeats sent while the write fails, the master keeps its followers and
/// its leadership, and the test fails waiting for a new master.)
#[test]
fn a_master_whose_disk_fails_hands_over_and_rejoins_when_it_works_again() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_master_whose_disk_fails_hands_over") else {
        return Ok(());
    };
    with_cluster(start_raft("tdsc-df")?, |cluster| {
        let master = cluster.wait_master(None, Duration::from_secs(15))?;
        let dir = cluster
            .lab()
            .workdir()
            .join(format!("{}-raft", master.name));
        ensure!(dir.is_dir(), "no raft data directory at {}", dir.display());
        let vip = SocketAddr::V4(cluster.vip());
        let stop_load = Arc::new(AtomicBool::new(false));
        let load = load::spawn(&cluster.client_namespaces(), vip, 1_000_000, &stop_load);
        std::thread::sleep(Duration::from_millis(500));
        let chattr = |flag: &str| -> anyhow::Result<()> {
            let st = std::process::Command::new("chattr")
                .arg(flag)
                .arg(&dir)
                .status()
                .context("run chattr")?;
            ensure!(st.success(), "chattr {flag} {}: {st}", dir.display());
            Ok(())
        };
        chattr("+i")?;
        let steps = (|| -> anyhow::Result<()> {
            let next = cluster
                .wait_master(Some(&master.name), Duration::from_secs(10))
                .context("no other node took over from the master whose disk fails")?;
            ensure!(next.id != master.id);
            let log = cluster.daemon_log_tail(&master.name, 400);
            ensure!(
                log.contains("cannot persist raft state"),
                "the failing master did not say why: {log}"
            );
            std::thread::sleep(Duration::from_secs(1));
            Ok(())
        })();
        let undo = chattr("-i");
        let rejoin = steps.and(undo).and_then(|()| {
            let m = cluster.wait_master(None, Duration::from_secs(10))?;
            ensure!(m.id != master.id, "the old master is master again");
            wait_follows(cluster, &master, m.id)?;
            let log = cluster.daemon_log_tail(&master.name, 400);
            ensure!(
                log.contains("raft state written again"),
                "the node did not write again: {log}"
            );
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        });
        stop_load.store(true, Ordering::Relaxed);
        let tally = load.join().expect("load thread")?;
        rejoin?;
        cluster.check_daemons()?;
        println!(
            "disk failure on {}: {} served {:?}, {} failed {:?}",
            master.name,
            tally.ok(),
            tally.by_node,
            tally.failures,
            tally.sample_errors
        );
        ensure!(tally.ok() > 300, "too little traffic to prove anything");
        ensure!(
            tally.failures == 0,
            "requests failed: {:?}",
            tally.sample_errors
        );
        Ok(())
    })
}
