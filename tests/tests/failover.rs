//! Master failover under Raft, end to end on a 3-node lab (root only; SKIP otherwise). Each
//! test builds its own lab and removes it, also on failure.
//!
//! `bench_failover` (ignored by default; run with `--ignored --nocapture`) measures the time
//! from SIGKILL of the master's daemon to the first new connection accepted.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::streams::stream_from;
use tdsc_lab::{load, netns, nft};

fn start_raft() -> anyhow::Result<Cluster> {
    Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-fo")),
        policy: Some("round-robin".to_owned()),
        raft: true,
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")
}

/// SIGKILL of the master's daemon while clients keep opening connections and six
/// long-lived connections (two on every node) stream both ways: a new master takes over,
/// every long-lived connection survives, no client sees an RST, service resumes; the
/// restarted daemon rejoins as a member and is given connections again.
#[test]
fn sigkill_of_the_master_keeps_every_connection_and_a_new_master_takes_over() -> anyhow::Result<()>
{
    let Some(_lock) = exclusive_lab("sigkill_of_the_master_keeps_every_connection") else {
        return Ok(());
    };
    let mut cluster = start_raft()?;
    let clients = cluster.client_namespaces();
    for ns in &clients {
        nft::install_client_probe(ns)?;
    }
    let vip = SocketAddr::V4(cluster.vip());
    let old = cluster.master()?.clone();
    let old_term = cluster.status(&old.name)?.term;
    ensure!(old_term > 0, "a raft master has a term");

    // Long-lived connections: round robin puts two on every node.
    let stop_streams = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let streams: Vec<_> = clients
        .iter()
        .map(|ns| stream_from(ns, vip, 3, stop_streams.clone(), progress.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // New connections keep coming while the master dies.
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = load::spawn(&clients, vip, 100_000, &stop_load);
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill_daemon(&old.name)?;
    let new = cluster
        .wait_master(Some(&old.name), Duration::from_secs(5))
        .context("no new master after SIGKILL")?;
    ensure!(new.name != old.name);
    let new_status = cluster.status(&new.name)?;
    ensure!(new_status.term > old_term, "{new_status:?}");
    // The new master stops giving connections to the node whose daemon died.
    cluster.wait_liveness(&new.name, old.id, false)?;
    std::thread::sleep(Duration::from_millis(1000));
    stop_load.store(true, Ordering::Relaxed);
    let during = load.join().expect("load thread")?;
    eprintln!(
        "during failover: {} ok {:?}, {} failed {:?}",
        during.ok(),
        during.by_node,
        during.failures,
        during.sample_errors
    );

    // RSTs on the short requests during the failover window are reported, not asserted
    // (see the README's open points); the long-lived connections below and every request
    // after the failover must see none.
    let mut rsts_during = Vec::new();
    for ns in &clients {
        rsts_during.push(nft::client_counters(ns)?.0);
    }
    eprintln!("RSTs received by the clients during the failover window: {rsts_during:?}");

    // Service resumed: every request after the failover succeeds, on the two live nodes.
    load::assert_served_without(&clients, vip, 30, old.id, "after failover")?;

    // The old node's daemon comes back: member, follows the new master, gets connections.
    cluster.restart_daemon(&old.name, Duration::from_secs(15))?;
    cluster.wait_liveness(&new.name, old.id, true)?;
    let rejoined = cluster.status(&old.name)?;
    assert_eq!(rejoined.role, "member", "{rejoined:?}");
    assert_eq!(rejoined.master_id, Some(new.id), "{rejoined:?}");
    let again = load::run(&clients, vip, 30, &Arc::new(AtomicBool::new(false)))?;
    assert_eq!(again.failures, 0, "{:?}", again.sample_errors);
    assert!(
        again.by_node.get(&old.id).copied().unwrap_or(0) >= 15,
        "the restarted node gets its share again: {:?}",
        again.by_node
    );

    // Every long-lived connection survived, and streamed after the failover too.
    let before_stop = progress.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));
    let still_streaming = progress.load(Ordering::Relaxed) > before_stop;
    stop_streams.store(true, Ordering::Relaxed);
    let mut nodes = BTreeSet::new();
    let mut total = 0;
    for h in streams {
        let rs = h.join().expect("stream thread")??;
        eprintln!("streams: {rs:?}");
        for r in rs {
            assert!(
                r.error.is_none(),
                "connection to node {} lost: {r:?}",
                r.node
            );
            assert!(r.rounds > 20, "{r:?}");
            nodes.insert(r.node);
            total += 1;
        }
    }
    assert_eq!(total, 6);
    assert!(still_streaming, "streams stalled");
    let all: BTreeSet<u32> = cluster.nodes().iter().map(|n| n.id).collect();
    assert_eq!(nodes, all, "a long-lived connection on every node");
    for (ns, before) in clients.iter().zip(rsts_during) {
        let (rsts, _) = nft::client_counters(ns)?;
        assert_eq!(rsts, before, "client {ns} received RSTs after the failover");
    }
    cluster.check_daemons()?;
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))
}

/// The failover benchmark: SIGKILL of the master's daemon → first new connection accepted,
/// over `TDSC_FAILOVER_TRIALS` (default 20) trials. Probes are fresh connects with a 20 ms
/// timeout from four staggered threads (so the resolution is about 5 ms).
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_failover() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("bench_failover") else {
        return Ok(());
    };
    let trials: usize = std::env::var("TDSC_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut cluster = start_raft()?;
    let client = cluster.client_namespaces()[0].clone();
    let vip = SocketAddr::V4(cluster.vip());
    let mut times = Vec::new();
    for trial in 0..trials {
        let old = cluster.wait_master(None, Duration::from_secs(10))?;
        // Everyone alive before the next kill, so each trial starts from the same state.
        for n in cluster.nodes().to_vec() {
            cluster.wait_liveness(&old.name, n.id, true)?;
        }
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        cluster.kill_daemon(&old.name)?;
        let done = Arc::new(AtomicBool::new(false));
        let first = Arc::new(Mutex::new(None::<Duration>));
        let probes: Vec<_> = (0..4u64)
            .map(|i| {
                let done = done.clone();
                let first = first.clone();
                netns::spawn_in(&client, move || {
                    std::thread::sleep(Duration::from_millis(5 * i));
                    while !done.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(10) {
                        if TcpStream::connect_timeout(&vip, Duration::from_millis(20)).is_ok() {
                            let t = t0.elapsed();
                            let mut f = first.lock().expect("probe lock");
                            if f.is_none_or(|x| t < x) {
                                *f = Some(t);
                            }
                            done.store(true, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for p in probes {
            p.join().expect("probe")?;
        }
        let t = first
            .lock()
            .expect("probe lock")
            .context("no connection accepted within 10 s of the kill")?;
        eprintln!("trial {trial}: {} ms", t.as_millis());
        times.push(t);
        cluster.restart_daemon(&old.name, Duration::from_secs(15))?;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pick = |q: usize| {
        // Nearest rank in integers: ceil(q_percent * n / 100), at least 1.
        let n = times.len();
        let rank = (q * n).div_ceil(100).max(1);
        times[rank.min(n) - 1]
    };
    println!(
        "failover (SIGKILL master daemon -> first new connection accepted), {} trials, \
         tick 10 ms, election_tick 10, heartbeat_tick 3, lease 80 ms, dead_after 1000 ms:\n  \
         min {:.0} ms  p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
        times.len(),
        ms(times[0]),
        ms(pick(50)),
        ms(pick(99)),
        ms(times[times.len() - 1])
    );
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))
}

/// The master's cluster interface is cut (nft drops everything in and out of eth1) while its
/// client interface stays up and clients keep connecting. No connection attempt ever gets
/// SYN/ACKs from two different nodes (seen on the clients, by the nodes' masked MACs); the
/// rest of the cluster elects a new master and serves; after the cut heals, the old master
/// is a member that follows the new one.
#[test]
fn a_partitioned_master_never_dispatches_beside_its_successor() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_partitioned_master_never_dispatches_beside_its_successor")
    else {
        return Ok(());
    };
    let cluster = start_raft()?;
    let clients = cluster.client_namespaces();
    let vip = cluster.vip();
    let old = cluster.master()?.clone();
    let old_ns = cluster.netns(&old.name);

    let stop_cap = Arc::new(AtomicBool::new(false));
    let caps: Vec<_> = clients
        .iter()
        .map(|ns| tdsc_lab::packet::capture_synacks(ns, *vip.ip(), stop_cap.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = load::spawn(&clients, SocketAddr::V4(vip), 100_000, &stop_load);
    std::thread::sleep(Duration::from_millis(500));

    netns::exec(
        &old_ns,
        "nft",
        ["add table inet tdsclab_cut; \
          add chain inet tdsclab_cut in { type filter hook input priority -400; policy accept; }; \
          add chain inet tdsclab_cut out { type filter hook output priority -400; policy accept; }; \
          add rule inet tdsclab_cut in iifname eth1 drop; \
          add rule inet tdsclab_cut out oifname eth1 drop"],
    )?;
    let new = cluster.wait_master(Some(&old.name), Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1500));
    let during_cut = cluster.status(&old.name);
    netns::exec(&old_ns, "nft", ["delete table inet tdsclab_cut"])?;
    let new = new.context("no new master while the old one was cut off")?;
    std::thread::sleep(Duration::from_millis(1000));
    stop_load.store(true, Ordering::Relaxed);
    let tally = load.join().expect("load thread")?;
    stop_cap.store(true, Ordering::Relaxed);
    let mut attempts = 0;
    for c in caps {
        let seen = c.join().expect("capture thread")??;
        attempts += seen.len();
        for (conn, macs) in &seen {
            assert!(
                macs.len() == 1,
                "connection attempt {conn:?} got SYN/ACKs from several nodes: {macs:?}"
            );
        }
    }
    eprintln!(
        "partition: {} requests ok {:?}, {} failed; {attempts} answered attempts",
        tally.ok(),
        tally.by_node,
        tally.failures
    );
    ensure!(attempts > 50, "too little traffic to prove anything");
    let during_cut = during_cut?;
    assert_eq!(
        during_cut.role, "member",
        "the cut-off master stepped down: {during_cut:?}"
    );

    // Healed: the old master follows the new one.
    let start = Instant::now();
    loop {
        let s = cluster.status(&old.name)?;
        if s.role == "member" && s.master_id == Some(new.id) {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "old master did not rejoin: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cluster.current_master(None).map(|n| n.id), Some(new.id));
    let stop = Arc::new(AtomicBool::new(false));
    let after = load::run(&clients, SocketAddr::V4(vip), 15, &stop)?;
    assert_eq!(after.failures, 0, "{:?}", after.sample_errors);
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))
}
