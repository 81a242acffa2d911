//! End-to-end proofs on a real 3-node cluster in network namespaces (root only; prints SKIP
//! otherwise). Each test builds its own lab (`tdsc-e2e-<pid>-<n>`) and removes it, also on
//! failure. The tests take one lock so that only one lab runs at a time: they count packets
//! and latencies, and two labs on two cores would disturb each other.
//!
//! Needs the workspace binaries: `cargo build --release --workspace`, then
//! `cargo test --release -p tdsc-lab -- --test-threads=1`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{
    exclusive_lab, forward_counter_now, unique_lab_name, Cluster, ClusterOptions,
};
use tdsc_lab::packet::{self, Capture, RawIpSender, RawProtoSender, Syn};
use tdsc_lab::{http, load, netns, nft};
use tdsc_proto::forward::{ForwardHeader, FORWARD_PROTO};
use tdsc_proto::seal::Keyring;

fn start(policy: &str) -> anyhow::Result<Cluster> {
    Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-e2e")),
        policy: Some(policy.to_owned()),
        ..ClusterOptions::default()
    })
    .context("start the cluster")
}

fn teardown(cluster: Cluster) -> anyhow::Result<()> {
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))
}

/// 300 requests from each of the two clients through the VIP: all succeed, no client sees
/// an RST, and each connection got exactly one SYN/ACK (none answered by no node or by two).
fn six_hundred_requests(cluster: &mut Cluster) -> anyhow::Result<load::Tally> {
    let clients = cluster.client_namespaces();
    ensure!(clients.len() == 2, "expected two clients, got {clients:?}");
    for ns in &clients {
        nft::install_client_probe(ns)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tally = load::run(&clients, SocketAddr::V4(cluster.vip()), 300, &stop)?;
    cluster.check_daemons()?;
    assert_eq!(
        tally.failures, 0,
        "failed requests, e.g. {:?}",
        tally.sample_errors
    );
    assert_eq!(tally.ok(), 600);
    let (rsts, synacks) = nft::clients_counters(&clients)?;
    assert_eq!(rsts, 0, "clients received TCP RSTs");
    assert_eq!(
        synacks, 600,
        "SYN/ACKs received != connections: some SYN was answered by no node or by two"
    );
    Ok(tally)
}

/// a) Round robin over three nodes: 600 requests from two clients all succeed, each node
/// serves 200 ± 2, no client sees an RST, and each connection got exactly one SYN/ACK. The
/// master reads its queue with the per-packet reader (`[threads] queue_io = "per-packet"`),
/// so that the reader the default replaced stays covered; every other test runs the default.
#[test]
fn round_robin_spreads_600_requests_evenly_without_resets() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("round_robin_spreads_600_requests_evenly_without_resets")
    else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-e2e")),
        policy: Some("round-robin".to_owned()),
        threads_extra: vec![("queue_io".to_owned(), toml::Value::from("per-packet"))],
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let tally = six_hundred_requests(&mut cluster)?;
    let ids: Vec<u32> = cluster.nodes().iter().map(|n| n.id).collect();
    for id in &ids {
        let n = tally.by_node.get(id).copied().unwrap_or(0);
        assert!(
            (198..=202).contains(&n),
            "node {id} served {n}, not 200 ± 2: {:?}",
            tally.by_node
        );
    }
    assert!(
        tally.by_node.keys().all(|id| ids.contains(id)),
        "replies from unknown nodes: {:?}",
        tally.by_node
    );

    // The servers' own counts agree with what the clients saw.
    let mut served = BTreeMap::new();
    for node in cluster.nodes() {
        served.insert(node.id, cluster.served(&node.name)?);
    }
    assert_eq!(served.values().sum::<u64>(), 600, "served: {served:?}");
    for (id, n) in &served {
        assert_eq!(
            tally.by_node.get(id).copied().unwrap_or(0),
            *n,
            "node {id}: clients and server disagree ({served:?} vs {:?})",
            tally.by_node
        );
    }
    let master = cluster.master()?.name.clone();
    let c = cluster.status(&master)?.counters;
    assert!(c.syns_dispatched >= 600, "{c:?}");
    assert_eq!(c.forward_send_errors, 0, "{c:?}");
    assert_eq!(
        c.queue.batches, 0,
        "not the per-packet reader: {:?}",
        c.queue
    );
    teardown(cluster)
}

/// a2) The batched queue reader (`[threads] queue_io = "batched"`, the default, set here
/// all the same): the same 600 requests
/// all succeed without a reset, one SYN/ACK each, and the master's status shows that its own
/// reader took them (receive batches counted, a socket buffer sized to the queue, no overrun,
/// no refused verdict). With the per-packet reader `batches` would stay 0.
#[test]
fn the_batched_queue_reader_dispatches_600_requests_without_loss() -> anyhow::Result<()> {
    let Some(_lock) =
        exclusive_lab("the_batched_queue_reader_dispatches_600_requests_without_loss")
    else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-e2e")),
        policy: Some("round-robin".to_owned()),
        threads_extra: vec![("queue_io".to_owned(), toml::Value::from("batched"))],
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    six_hundred_requests(&mut cluster)?;
    let master = cluster.master()?.name.clone();
    let c = cluster.status(&master)?.counters;
    let q = c.queue;
    assert!(q.received >= 600 && c.syns_dispatched >= 600, "{c:?}");
    assert!(q.batches >= 1 && q.batches <= q.received, "{q:?}");
    assert!(q.batch_max >= 1, "{q:?}");
    assert!(
        q.rcvbuf >= 1 << 20,
        "socket buffer not sized to the queue: {q:?}"
    );
    assert_eq!(
        (q.enobufs, q.verdict_errors, q.malformed),
        (0, 0, 0),
        "{q:?}"
    );
    assert_eq!(c.forward_send_errors, 0, "{c:?}");
    assert!(
        c.forwarded_out >= 390,
        "round robin forwards two thirds: {c:?}"
    );
    teardown(cluster)
}

/// a3) The per-prefix SYN limit, end to end through the daemon's `[flood]` keys: a
/// spoofed-source flood of 20,000 SYNs in 1 s from 192.0.2.128/25, limited to 500 a second
/// per /25, while both real clients (in 192.0.2.0/25) connect one after another. The master's
/// `syn_prefix_limited` counts most of the flood, and no real connect fails or waits for a
/// SYN retransmission. Without the `[flood]` keys `syn_prefix_limited` stays 0 (seen).
#[test]
fn the_syn_prefix_limit_holds_back_a_flood_and_real_clients_connect_promptly() -> anyhow::Result<()>
{
    let Some(_lock) =
        exclusive_lab("the_syn_prefix_limit_holds_back_a_flood_and_real_clients_connect_promptly")
    else {
        return Ok(());
    };
    let cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-e2e")),
        policy: Some("round-robin".to_owned()),
        flood_extra: vec![
            ("syn_prefix_rate".to_owned(), toml::Value::from(500)),
            ("syn_prefix_burst".to_owned(), toml::Value::from(500)),
            ("prefix_v4".to_owned(), toml::Value::from(25)),
        ],
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let stop = Arc::new(AtomicBool::new(false));
    let r = tdsc_lab::floodbench::run(&cluster, 20_000, Duration::from_secs(1), &stop)?;
    ensure!(
        r.flood.sent >= 5_000,
        "the flood did not run: {:?}",
        r.flood
    );
    // The bucket lets through its burst and then 500 a second: at most about 1,000 of the
    // flood in its second, and the real connects.
    ensure!(
        r.limited >= r.flood.sent.saturating_sub(1_500),
        "limited {} of {} flood SYNs",
        r.limited,
        r.flood.sent
    );
    ensure!(
        r.failed == 0 && !r.connects.is_empty(),
        "{} real connects failed, {} succeeded",
        r.failed,
        r.connects.len()
    );
    ensure!(
        r.connects
            .iter()
            .all(|d| *d < tdsc_lab::floodbench::RETRANSMITTED),
        "a real connect waited for a SYN retransmission: {:?}",
        r.summary()
    );
    teardown(cluster)
}

/// b) A SYN carrying TCP Fast Open data is forwarded intact: the member accepts the data from
/// the SYN (TcpExtTCPFastOpenPassive) and echoes the request's exact length and digest.
#[test]
fn tcp_fast_open_data_in_the_syn_reaches_a_member_intact() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("tcp_fast_open_data_in_the_syn_reaches_a_member_intact") else {
        return Ok(());
    };
    let mut cluster = start("round-robin")?;
    let client = cluster.netns(&cluster.clients()[0].name);
    let master_id = cluster.master()?.id;
    let before: BTreeMap<u32, u64> = cluster
        .nodes()
        .iter()
        .map(|n| {
            let c = nft::kernel_counters(&cluster.netns(&n.name))?;
            Ok((
                n.id,
                c.get("TcpExtTCPFastOpenPassive").copied().unwrap_or(0),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let client_before = nft::kernel_counters(&client)?;

    // Six requests: round robin gives members four of them. Each request differs, so a
    // digest match means this very request arrived.
    let vip = cluster.vip();
    let requests: Vec<Vec<u8>> = (0..6)
        .map(|i| http::request_bytes(&format!("/tfo/{i}/{}", "x".repeat(40 * i))))
        .collect();
    let replies = netns::run_in(&client, || {
        requests
            .iter()
            .map(|r| http::get_fastopen(vip, r, Duration::from_secs(3)))
            .collect::<Vec<_>>()
    })?;
    cluster.check_daemons()?;

    let mut by_member: BTreeMap<u32, u64> = BTreeMap::new();
    for (req, reply) in requests.iter().zip(replies) {
        let reply = reply.context("TFO request failed")?;
        assert_eq!(reply.request_len, Some(req.len()), "request truncated");
        assert_eq!(
            reply.request_fnv,
            Some(http::fnv1a64(req)),
            "request altered"
        );
        if reply.node != master_id {
            *by_member.entry(reply.node).or_default() += 1;
        }
    }
    assert!(!by_member.is_empty(), "no TFO request reached a member");
    for node in cluster.nodes() {
        let after = nft::kernel_counters(&cluster.netns(&node.name))?
            .get("TcpExtTCPFastOpenPassive")
            .copied()
            .unwrap_or(0);
        if let Some(n) = by_member.get(&node.id) {
            assert_eq!(
                after - before[&node.id],
                *n,
                "{}: TcpExtTCPFastOpenPassive did not count every request served from SYN \
                 data (the data was not in the SYN the member received?)",
                node.name
            );
        }
    }
    let client_after = nft::kernel_counters(&client)?;
    let active = |c: &std::collections::HashMap<String, u64>| {
        c.get("TcpExtTCPFastOpenActive").copied().unwrap_or(0)
    };
    assert_eq!(
        active(&client_after) - active(&client_before),
        6,
        "the client did not see its SYN data acknowledged every time"
    );
    teardown(cluster)
}

/// c) The same SYN sent twice, 200 ms apart: every SYN/ACK comes from one node (by the
/// per-node masked source MAC), and the master recognised the retransmission. Without a
/// forward record, round robin would hand the copy to the next node, as it does the control
/// SYN sent afterwards.
#[test]
fn duplicate_syn_goes_to_the_same_node() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("duplicate_syn_goes_to_the_same_node") else {
        return Ok(());
    };
    let mut cluster = start("round-robin")?;
    let client = cluster.clients()[0].clone();
    let ns = cluster.netns(&client.name);
    // The client's stack has no socket for this SYN and would reset the SYN/ACK, which would
    // delete the server's request sock; drop its RSTs.
    nft::drop_outgoing_rsts(&ns)?;
    let master = cluster.master()?.name.clone();
    let hits_before = cluster.status(&master)?.counters.retransmit_hits;

    let vip = cluster.vip();
    // Outside the ephemeral port range, so no real connection of the client collides.
    let sport = 20_000 + u16::try_from(std::process::id() % 5000).expect("small");
    let syn = Syn {
        src: client.addr,
        dst: *vip.ip(),
        sport,
        dport: vip.port(),
        seq: 0x7d5c_0001,
        payload: Vec::new(),
    };
    let isn = syn.seq;
    // Control: a different SYN sent afterwards, which round robin gives to another node.
    let other = Syn {
        sport: sport + 1,
        ..syn.clone()
    };
    let (frames, control) = netns::run_in(&ns, || -> anyhow::Result<_> {
        let cap = Capture::open("eth0", Duration::from_millis(100))?;
        let tx = RawIpSender::new()?;
        let pkt = syn.ipv4_packet();
        tx.send(&pkt, syn.dst)?;
        std::thread::sleep(Duration::from_millis(200));
        tx.send(&pkt, syn.dst)?;
        std::thread::sleep(Duration::from_millis(200));
        tx.send(&other.ipv4_packet(), other.dst)?;
        let (mut frames, mut control) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 2048];
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            if let Some(f) = cap.recv(&mut buf)?.and_then(packet::parse_tcp_frame) {
                if f.is_syn_ack() && f.dport == syn.sport {
                    frames.push(f);
                } else if f.is_syn_ack() && f.dport == other.sport {
                    control.push(f);
                }
            }
        }
        Ok((frames, control))
    })??;
    cluster.check_daemons()?;

    assert!(
        frames.len() >= 2,
        "expected a SYN/ACK per SYN (at least 2), got {frames:?}"
    );
    let macs: std::collections::BTreeSet<String> = frames
        .iter()
        .map(|f| packet::mac_string(&f.src_mac))
        .collect();
    assert_eq!(
        macs.len(),
        1,
        "SYN/ACKs for one SYN came from several nodes: {macs:?}"
    );
    // The MAC does tell nodes apart: the control SYN's answer carries another one.
    let control_macs: std::collections::BTreeSet<String> = control
        .iter()
        .map(|f| packet::mac_string(&f.src_mac))
        .collect();
    assert!(
        !control.is_empty() && control_macs.is_disjoint(&macs),
        "control SYN: expected a SYN/ACK from another node, got {control_macs:?} (dup: {macs:?})"
    );
    for f in &frames {
        assert_eq!(f.src, *vip.ip());
        assert_eq!(f.ack, isn.wrapping_add(1), "SYN/ACK for another SYN: {f:?}");
    }
    let hits_after = cluster.status(&master)?.counters.retransmit_hits;
    assert!(
        hits_after > hits_before,
        "master's retransmit_hits did not rise ({hits_before} -> {hits_after})"
    );
    teardown(cluster)
}

/// Encodes a forward packet with a SYN segment for `vip_in_header`, port `dport`, `flags`,
/// tagged with `ring`.
fn forward(ring: &Keyring, origin: u32, vip_in_header: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let client = Ipv4Addr::new(192, 0, 2, 101);
    let mut seg = Syn {
        src: client,
        dst: vip_in_header,
        sport: 41_000,
        dport,
        seq: 1,
        payload: Vec::new(),
    }
    .segment();
    seg[13] = flags;
    let header = ForwardHeader {
        term: 1,
        origin,
        counter: forward_counter_now(),
        client: client.into(),
        vip: vip_in_header.into(),
    };
    let mut buf = vec![0u8; 256];
    let n = header.encode_packet(&seg, ring, &mut buf).expect("fits");
    buf.truncate(n);
    buf
}

/// d) Garbage and foreign protocol-253 packets are rejected and counted, and the cluster
/// keeps serving.
#[test]
fn malformed_and_foreign_forwards_are_rejected_and_counted() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("malformed_and_foreign_forwards_are_rejected_and_counted")
    else {
        return Ok(());
    };
    let mut cluster = start("round-robin")?;
    let vip = *cluster.vip().ip();
    let port = cluster.vip().port();
    let sender = cluster.node("node2")?.clone();
    let receivers: Vec<_> = cluster
        .nodes()
        .iter()
        .filter(|n| n.name != sender.name)
        .cloned()
        .collect();
    let before: Vec<_> = receivers
        .iter()
        .map(|n| cluster.status(&n.name).map(|s| s.counters.forward_rejected))
        .collect::<Result<_, _>>()?;

    let ring = cluster.keyring()?;
    let good = forward(&ring, sender.id, vip, port, packet::flags::SYN);
    let mut bad_version = good.clone();
    bad_version[0] = 0x7f;
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..3].to_vec()),
        ("bad version", bad_version),
        (
            "wrong VIP",
            forward(
                &ring,
                sender.id,
                Ipv4Addr::new(192, 0, 2, 254),
                port,
                packet::flags::SYN,
            ),
        ),
        (
            "not a SYN",
            forward(&ring, sender.id, vip, port, packet::flags::ACK),
        ),
        (
            "bad port",
            forward(&ring, sender.id, vip, port + 1, packet::flags::SYN),
        ),
    ];
    let targets: Vec<Ipv4Addr> = receivers
        .iter()
        .map(|n| n.cluster_addr.context("receiver without cluster address"))
        .collect::<anyhow::Result<_>>()?;
    netns::run_in(&cluster.netns(&sender.name), || -> anyhow::Result<()> {
        let tx = RawProtoSender::new(FORWARD_PROTO)?;
        for (_, payload) in &garbage {
            for t in &targets {
                tx.send(payload, *t)?;
            }
        }
        Ok(())
    })??;

    // A rogue host on the cluster network, not in the node list, sends a well-formed forward
    // claiming to come from the master.
    let master_id = cluster.master()?.id;
    let rogue_ns =
        cluster
            .lab_mut()
            .attach_host("rogue", "br-cluster", "rogue-eth0", "198.51.100.99/24")?;
    let rogue_pkt = forward(&ring, master_id, vip, port, packet::flags::SYN);
    netns::run_in(&rogue_ns, || -> anyhow::Result<()> {
        let tx = RawProtoSender::new(FORWARD_PROTO)?;
        for t in &targets {
            tx.send(&rogue_pkt, *t)?;
        }
        Ok(())
    })??;

    // The member path reads packets asynchronously: wait for the counters to arrive.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut problems = Vec::new();
        for (n, b) in receivers.iter().zip(&before) {
            let a = cluster.status(&n.name)?.counters.forward_rejected;
            let d = |x: u64, y: u64| x - y;
            let got = [
                ("malformed", d(a.malformed, b.malformed), 2),
                ("wrong_vip", d(a.wrong_vip, b.wrong_vip), 1),
                ("not_syn", d(a.not_syn, b.not_syn), 1),
                ("bad_port", d(a.bad_port, b.bad_port), 1),
                (
                    "ruleset_foreign",
                    d(a.ruleset_foreign, b.ruleset_foreign),
                    1,
                ),
            ];
            for (what, delta, want) in got {
                if delta != want {
                    problems.push(format!("{}: {what} +{delta}, expected +{want}", n.name));
                }
            }
        }
        if problems.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rejection counters wrong:\n{}",
            problems.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.check_daemons()?;

    // Nothing of this disturbed the service.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = load::run(
        &cluster.client_namespaces(),
        SocketAddr::V4(cluster.vip()),
        30,
        &stop,
    )?;
    assert_eq!(tally.failures, 0, "{:?}", tally.sample_errors);
    assert_eq!(tally.ok(), 60);
    teardown(cluster)
}
