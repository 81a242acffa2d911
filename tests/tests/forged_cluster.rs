//! Forged and replayed cluster datagrams, end to end on a 3-node Raft lab (root only; SKIP
//! otherwise, FAIL in CI): a rogue host on the cluster bridge spoofs members' addresses and
//! the cluster port, and sends today's unsealed wire format (an AddNode proposal, a heartbeat
//! with an impossible commit, `MsgTimeoutNow`, a `Removed` notice, reports of weight 0 and
//! drain) and a genuine sealed datagram captured on a node's cluster link. Under continuous
//! client traffic the daemons drop all of it before decoding, counted by reason, and nothing
//! changes: voters, weights, no daemon dies, no request fails (an election meanwhile is
//! printed, not failed: with every forgery dropped undecoded none can have caused it, and the
//! Raft lab elects on its own under load, docs/known-issues.md). A node started with another
//! cluster key is refused by the others and says so in its own status and log. A forward
//! forged with the master's address but without the key, and a genuine forward captured and
//! sent again, are refused by the member (counted as `bad_tag` and `replay`) and never
//! answered.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType};
use tdsc_lab::cluster::{
    exclusive_lab, forward_counter_now, unique_lab_name, write_key_file, Cluster, ClusterOptions,
};
use tdsc_lab::packet::{self, ipv4_packet, Capture, RawIpSender, Syn};
use tdsc_lab::status::ClusterDropped;
use tdsc_lab::{load, netns};
use tdsc_proto::control::{Body, Envelope, NodeReport, Removed};
use tdsc_proto::forward::{ForwardHeader, FORWARD_PROTO};
use tdsc_proto::seal::{Keyring, KEY_LEN};

/// The cluster port of the lab's configs (the default).
const PORT: u16 = 7400;
const READY: Duration = Duration::from_secs(20);

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

/// An IPv4/UDP packet (checksum 0: none, allowed over IPv4).
fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        anyhow::bail!("IPv4 only");
    };
    let len = u16::try_from(8 + payload.len())?;
    let mut seg = Vec::with_capacity(8 + payload.len());
    seg.extend_from_slice(&s.port().to_be_bytes());
    seg.extend_from_slice(&d.port().to_be_bytes());
    seg.extend_from_slice(&len.to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    Ok(ipv4_packet(*s.ip(), *d.ip(), 17, &seg))
}

fn raft_env(from: u32, term: u64, m: &Message) -> anyhow::Result<Vec<u8>> {
    Ok(Envelope {
        from,
        term,
        body: Some(Body::Raft(m.write_to_bytes()?)),
    }
    .to_bytes())
}

fn raft_msg(t: MessageType, from: u32, to: u32, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(t);
    m.from = u64::from(from);
    m.to = u64::from(to);
    m.term = term;
    m
}

/// A genuine sealed datagram seen arriving on `node`'s cluster link: (source, destination,
/// UDP payload).
fn capture_sealed(
    cluster: &Cluster,
    node: &str,
) -> anyhow::Result<(SocketAddr, SocketAddr, Vec<u8>)> {
    netns::run_in(&cluster.netns(node), || -> anyhow::Result<_> {
        let cap = Capture::open("eth1", Duration::from_millis(500))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let Some(f) = cap.recv(&mut buf)? else {
                continue;
            };
            // Ethernet, IPv4 (any header length), UDP to the cluster port.
            if f.len() < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 17 {
                continue;
            }
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let ip = &f[14..];
            let u = &ip[ihl..];
            let (sport, dport) = (
                u16::from_be_bytes([u[0], u[1]]),
                u16::from_be_bytes([u[2], u[3]]),
            );
            if dport != PORT || sport != PORT {
                continue;
            }
            let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            return Ok((
                SocketAddr::from((src, sport)),
                SocketAddr::from((dst, dport)),
                u[8..len].to_vec(),
            ));
        }
        anyhow::bail!("no cluster datagram seen on {node} in 10 s")
    })?
}

/// The traffic beside a test: every request served. (A rare stall here, a member's handshake
/// disowned by a late flood copy of its SYN, was what CI failed on at stop 18:
/// docs/design/exactness.md, "A late copy of a forwarded SYN".)
fn check_traffic(tally: &load::Tally) -> anyhow::Result<()> {
    ensure!(
        tally.failures == 0,
        "{} requests failed: {:?}",
        tally.failures,
        tally.sample_errors
    );
    Ok(())
}

fn drops(cluster: &Cluster, node: &str) -> anyhow::Result<ClusterDropped> {
    Ok(cluster.status(node)?.counters.cluster_dropped)
}

#[test]
fn forged_and_replayed_cluster_datagrams_are_dropped_and_change_nothing() -> anyhow::Result<()> {
    let Some(_lock) =
        exclusive_lab("forged_and_replayed_cluster_datagrams_are_dropped_and_change_nothing")
    else {
        return Ok(());
    };
    with_cluster(start_raft("tdsc-fc")?, |cluster| {
        let master = cluster.wait_master(None, READY)?;
        let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
        let mut addrs = std::collections::BTreeMap::new();
        for n in cluster.nodes() {
            let a = n.cluster_addr.context("no cluster address")?;
            addrs.insert(n.name.clone(), SocketAddr::from((a, PORT)));
        }
        let addr = |name: &str| -> anyhow::Result<SocketAddr> {
            addrs.get(name).copied().context("no such node")
        };
        // Settled: every node agrees on voters, term and master.
        let deadline = Instant::now() + READY;
        let before = loop {
            let all: Vec<_> = names
                .iter()
                .map(|n| cluster.status(n))
                .collect::<Result<_, _>>()?;
            let agreed = all.iter().all(|s| {
                s.voters == [1, 2, 3] && s.term == all[0].term && s.master_id == Some(master.id)
            });
            if agreed {
                break all;
            }
            ensure!(Instant::now() < deadline, "cluster not settled: {all:?}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let term = before[0].term;
        let follower = names
            .iter()
            .find(|n| **n != master.name)
            .context("a follower")?
            .clone();
        let drops_before: Vec<ClusterDropped> = names
            .iter()
            .map(|n| drops(cluster, n))
            .collect::<Result<_, _>>()?;
        // The ruleset admits the cluster port only from the cluster port (docs/design/
        // control-port.md), so a datagram from another source port is dropped there, counted
        // as `control_port_foreign`, before the bus could count it as `source_port`.
        let ruleset_before: Vec<u64> = names
            .iter()
            .map(|n| Ok(cluster.status(n)?.counters.drops.control_port_foreign))
            .collect::<anyhow::Result<_>>()?;

        // A genuine datagram, captured on the follower's link, to replay later.
        let (cap_src, cap_dst, captured) = capture_sealed(cluster, &follower)?;
        let replay_target = names
            .iter()
            .find(|n| addr(n).ok() == Some(cap_dst))
            .context("captured datagram to no node")?
            .clone();

        // The forgeries, in today's (unsealed) wire format, each from a member's address and
        // the cluster port.
        let m_addr = addr(&master.name)?;
        let mut forged: Vec<(SocketAddr, SocketAddr, Vec<u8>)> = Vec::new();
        for n in &names {
            let to = addr(n)?;
            let id = cluster.node(n)?.id;
            if *n == master.name {
                // To the leader, from a follower: an AddNode proposal for node 99, and
                // reports of weight 0 and drain.
                let f = cluster.node(&follower)?;
                let f_addr = addr(&follower)?;
                let mut cc = ConfChange::default();
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = 99;
                cc.context = b"198.51.100.99".to_vec().into();
                let mut e = Entry::default();
                e.set_entry_type(EntryType::EntryConfChange);
                e.data = cc.write_to_bytes()?.into();
                let mut p = raft_msg(MessageType::MsgPropose, f.id, id, 0);
                p.set_entries(vec![e].into());
                forged.push((f_addr, to, raft_env(f.id, term, &p)?));
                for (weight, draining) in [(0, false), (1, true)] {
                    let rep = Envelope::report(
                        f.id,
                        term,
                        NodeReport {
                            established: 0,
                            syn_recv: 0,
                            seq: 1 << 40,
                            draining,
                            load: 0,
                            weight: Some(weight),
                            unhealthy: true,
                        },
                    );
                    forged.push((f_addr, to, rep.to_bytes()));
                }
            } else {
                // To a follower, from the leader: a heartbeat with an impossible commit,
                // MsgTimeoutNow, and a Removed notice with no voters.
                let mut hb = raft_msg(MessageType::MsgHeartbeat, master.id, id, term);
                hb.commit = 1 << 40;
                forged.push((m_addr, to, raft_env(master.id, term, &hb)?));
                let tn = raft_msg(MessageType::MsgTimeoutNow, master.id, id, term);
                forged.push((m_addr, to, raft_env(master.id, term, &tn)?));
                let removed = Envelope {
                    from: master.id,
                    term,
                    body: Some(Body::Removed(Removed {
                        index: 1 << 40,
                        voters: Vec::new(),
                    })),
                };
                forged.push((m_addr, to, removed.to_bytes()));
            }
        }
        // One sealed-looking datagram from a member's address but another source port.
        let odd_port = SocketAddr::from((
            match cap_src {
                SocketAddr::V4(a) => *a.ip(),
                SocketAddr::V6(_) => unreachable!("IPv4 lab"),
            },
            40000,
        ));

        let stop = Arc::new(AtomicBool::new(false));
        let vip = SocketAddr::V4(cluster.vip());
        let traffic = load::spawn(&cluster.client_namespaces(), vip, 1_000_000, &stop);
        std::thread::sleep(Duration::from_secs(1));

        let rogue = cluster.lab_mut().attach_host(
            "rogue",
            "br-cluster",
            "rogue-eth0",
            "198.51.100.99/24",
        )?;
        const ROUNDS: u64 = 10;
        let packets = {
            let mut v = Vec::new();
            for (s, d, p) in &forged {
                v.push((udp(*s, *d, p)?, *d));
            }
            v
        };
        let replay = udp(cap_src, cap_dst, &captured)?;
        let odd = udp(odd_port, cap_dst, &captured)?;
        let sent = netns::run_in(&rogue, || -> anyhow::Result<()> {
            let tx = RawIpSender::new()?;
            let ip = |a: SocketAddr| match a {
                SocketAddr::V4(a) => *a.ip(),
                SocketAddr::V6(_) => unreachable!("IPv4 lab"),
            };
            for _ in 0..ROUNDS {
                for (pkt, d) in &packets {
                    tx.send(pkt, ip(*d))?;
                }
                tx.send(&replay, ip(cap_dst))?;
                tx.send(&odd, ip(cap_dst))?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        // Let elections that a forgery would have started run their course under traffic.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let tally = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        sent??;

        cluster.check_daemons()?;
        let mut problems = Vec::new();
        let forged_to = |name: &str| -> u64 {
            let a = addr(name).ok();
            u64::try_from(forged.iter().filter(|(_, d, _)| Some(*d) == a).count()).unwrap_or(0)
        };
        for (i, n) in names.iter().enumerate() {
            let s = cluster.status(n)?;
            let (b, a) = (drops_before[i], s.counters.cluster_dropped);
            if a.bad_header - b.bad_header < ROUNDS * forged_to(n) {
                problems.push(format!(
                    "{n}: bad_header +{}, expected at least +{}",
                    a.bad_header - b.bad_header,
                    ROUNDS * forged_to(n)
                ));
            }
            if *n == replay_target {
                if a.replay - b.replay < ROUNDS {
                    problems.push(format!(
                        "{n}: replay +{}, expected +{ROUNDS}",
                        a.replay - b.replay
                    ));
                }
                let by_ruleset = s
                    .counters
                    .drops
                    .control_port_foreign
                    .saturating_sub(ruleset_before[i]);
                if a.source_port - b.source_port + by_ruleset < ROUNDS {
                    problems.push(format!(
                        "{n}: source_port +{} and ruleset control_port_foreign +{by_ruleset}, \
                         expected +{ROUNDS} together",
                        a.source_port - b.source_port
                    ));
                }
            }
            if s.voters != [1, 2, 3] {
                problems.push(format!("{n}: voters {:?}", s.voters));
            }
            // No election: a forged MsgTimeoutNow or vote that got through would start one,
            // and so would a leader whose heartbeats waited for its disk (fixed by the
            // asynchronous Raft persistence; the test elected about one run in five before).
            if s.term != term || s.master_id != Some(master.id) {
                problems.push(format!(
                    "{n}: term {} (was {term}), master {:?} (was {})",
                    s.term, s.master_id, master.id
                ));
            }
            for p in &s.nodes {
                if p.weight != 1 || p.draining || !p.alive {
                    problems.push(format!("{n} sees node {}: {p:?}", p.id));
                }
            }
        }
        ensure!(problems.is_empty(), "{}", problems.join("\n"));
        check_traffic(&tally)?;
        ensure!(tally.ok() > 0, "no request was served");
        Ok(())
    })
}

/// A node started with another cluster key is refused by the others (counted as bad tags),
/// stays out of the group (the others' term and master do not move), and says so in its own
/// status and log.
#[test]
fn a_node_with_another_key_is_refused_and_says_so() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_node_with_another_key_is_refused_and_says_so") else {
        return Ok(());
    };
    with_cluster(start_raft("tdsc-wk")?, |cluster| {
        let master = cluster.wait_master(None, READY)?;
        let odd = cluster
            .nodes()
            .iter()
            .find(|n| n.id != master.id)
            .context("a member")?
            .clone();
        let others: Vec<String> = cluster
            .nodes()
            .iter()
            .filter(|n| n.id != odd.id)
            .map(|n| n.name.clone())
            .collect();
        cluster.stop_daemon(&odd.name, READY)?;
        let other_key = cluster.lab().workdir().join("other.key");
        write_key_file(&other_key, 1)?;
        cluster.set_key_file(&odd.name, &other_key)?;
        let before: Vec<_> = others
            .iter()
            .map(|n| cluster.status(n))
            .collect::<Result<_, _>>()?;
        cluster.restart_daemon(&odd.name, READY)?;
        std::thread::sleep(Duration::from_secs(5));
        cluster.check_daemons()?;

        let mut problems = Vec::new();
        for (n, b) in others.iter().zip(&before) {
            let s = cluster.status(n)?;
            let (a, bb) = (s.counters.cluster_dropped, b.counters.cluster_dropped);
            if a.bad_tag <= bb.bad_tag {
                problems.push(format!(
                    "{n}: bad_tag did not rise ({} -> {})",
                    bb.bad_tag, a.bad_tag
                ));
            }
            if s.term != b.term || s.master_id != Some(master.id) {
                problems.push(format!(
                    "{n}: term {} -> {}, master {:?}: the odd node disturbed the group",
                    b.term, s.term, s.master_id
                ));
            }
            if s.nodes.iter().any(|p| p.id == odd.id && p.alive) {
                problems.push(format!("{n}: sees node {} alive", odd.id));
            }
        }
        let own = cluster.status(&odd.name)?;
        if own.counters.cluster_dropped.bad_tag == 0 || own.counters.reports_received != 0 {
            problems.push(format!(
                "{}: own counters do not show the refusal: {:?}, received {}",
                odd.name, own.counters.cluster_dropped, own.counters.reports_received
            ));
        }
        let human = cluster.ctl(&odd.name, &["status"])?;
        if !human.contains("check [cluster] key_file") {
            problems.push(format!("{}: status does not say so:\n{human}", odd.name));
        }
        let log = cluster.daemon_log_tail(&odd.name, 200);
        // The log may be coloured: look for the message and the reason apart.
        if !(log.contains("cluster datagram dropped") && log.contains("bad_tag")) {
            problems.push(format!("{}: log does not say so:\n{log}", odd.name));
        }
        ensure!(problems.is_empty(), "{}", problems.join("\n"));
        Ok(())
    })
}

/// Writes a key file of `lines` (mode 0600) at `path`.
fn write_keyring(path: &std::path::Path, lines: &[&str]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{}", lines.join("\n"))?;
    Ok(())
}

/// The documented rotation (docs/operating.md), node by node with a restart each, under
/// continuous client traffic: add key 2 everywhere (still sending with 1), switch every node
/// to sending with 2, retire key 1. After every restart, with the nodes' keyrings mixed, every
/// node sees every other alive and none refuses datagrams for their key; no request fails.
/// (Skipping the "add" step makes it fail.)
#[test]
fn the_cluster_key_is_rotated_by_rolling_restarts_under_traffic() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("the_cluster_key_is_rotated_by_rolling_restarts_under_traffic")
    else {
        return Ok(());
    };
    with_cluster(start_raft("tdsc-kr")?, |cluster| {
        let master = cluster.wait_master(None, READY)?;
        let old = std::fs::read_to_string(cluster.key_file())?;
        let old_key = old
            .lines()
            .find(|l| l.starts_with("key 1 "))
            .context("no key 1 in the lab's key file")?
            .to_owned();
        let fresh = cluster.lab().workdir().join("fresh.key");
        write_key_file(&fresh, 2)?;
        let new_key = std::fs::read_to_string(&fresh)?
            .lines()
            .find(|l| l.starts_with("key 2 "))
            .context("no key 2")?
            .to_owned();
        let dir = cluster.lab().workdir().to_owned();
        let phases = [
            ("added", vec![old_key.as_str(), new_key.as_str(), "send 1"]),
            (
                "switched",
                vec![old_key.as_str(), new_key.as_str(), "send 2"],
            ),
            ("retired", vec![new_key.as_str()]),
        ];
        // Members first, then the master, then the last member (as the rolling restart).
        let mut order: Vec<(String, u32)> = cluster
            .nodes()
            .iter()
            .filter(|n| n.id != master.id)
            .map(|n| (n.name.clone(), n.id))
            .collect();
        order.insert(1, (master.name.clone(), master.id));

        let stop = Arc::new(AtomicBool::new(false));
        let vip = SocketAddr::V4(cluster.vip());
        let traffic = load::spawn(&cluster.client_namespaces(), vip, 1_000_000, &stop);
        std::thread::sleep(Duration::from_millis(500));
        let steps = (|| -> anyhow::Result<()> {
            for (phase, lines) in &phases {
                let path = dir.join(format!("{phase}.key"));
                write_keyring(&path, lines)?;
                for (name, id) in &order {
                    cluster
                        .stop_daemon(name, Duration::from_secs(60))
                        .with_context(|| format!("{phase}: stop {name}"))?;
                    cluster.set_key_file(name, &path)?;
                    cluster
                        .restart_daemon(name, READY)
                        .with_context(|| format!("{phase}: restart {name}"))?;
                    let m = cluster.wait_master(None, READY)?;
                    cluster
                        .wait_liveness(&m.name, *id, true)
                        .with_context(|| format!("{phase}: {name} back"))?;
                    // Mixed keyrings, as they are between two restarts: past the dead-after
                    // time (1 s) every node still sees every other alive, and no node is
                    // refusing datagrams for their key.
                    std::thread::sleep(Duration::from_millis(1500));
                    let refused = |c: &Cluster| -> anyhow::Result<Vec<u64>> {
                        let mut v = Vec::new();
                        for (n, _) in &order {
                            let d = c.status(n)?.counters.cluster_dropped;
                            v.push(d.unknown_key + d.bad_tag);
                        }
                        Ok(v)
                    };
                    let before = refused(cluster)?;
                    std::thread::sleep(Duration::from_secs(1));
                    let after = refused(cluster)?;
                    ensure!(
                        before == after,
                        "{phase}, after restarting {name}: datagrams refused for their key \
                         (per node, before and after a second: {before:?} {after:?})"
                    );
                    for (n, _) in &order {
                        let s = cluster.status(n)?;
                        ensure!(
                            s.nodes.iter().all(|p| p.alive),
                            "{phase}, after restarting {name}: {n} sees {:?}",
                            s.nodes
                        );
                    }
                }
            }
            Ok(())
        })();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let tally = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        steps?;
        cluster.check_daemons()?;
        let mut problems = Vec::new();
        for (name, _) in &order {
            let s = cluster.status(name)?;
            let d = s.counters.cluster_dropped;
            if d.unknown_key + d.bad_tag != 0 {
                problems.push(format!("{name}: refused datagrams for their key: {d:?}"));
            }
            if s.voters != [1, 2, 3] || s.nodes.iter().any(|p| !p.alive) {
                problems.push(format!(
                    "{name}: voters {:?}, nodes {:?}",
                    s.voters, s.nodes
                ));
            }
            if s.cluster_key.ids != [2] || s.cluster_key.send != 2 {
                problems.push(format!("{name}: runs with keyring {:?}", s.cluster_key));
            }
        }
        ensure!(problems.is_empty(), "{}", problems.join("\n"));
        check_traffic(&tally)?;
        ensure!(tally.ok() > 0, "no request was served");
        Ok(())
    })
}

/// The first IPv4 proto-253 packet seen arriving on `cap` within 10 s: (the whole IP packet,
/// the client port of the SYN it carries).
fn capture_forward(cap: &Capture) -> anyhow::Result<(Vec<u8>, u16)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let Some(f) = cap.recv(&mut buf)? else {
            continue;
        };
        if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != FORWARD_PROTO {
            continue;
        }
        let ip = &f[14..];
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let fwd = ip.get(ihl..total).context("short forward")?;
        let hdr_len = usize::from(u16::from_be_bytes([fwd[2], fwd[3]]));
        let seg = fwd.get(hdr_len..).context("short forward")?;
        return Ok((ip[..total].to_vec(), u16::from_be_bytes([seg[0], seg[1]])));
    }
    anyhow::bail!("no forward seen in 10 s")
}

/// SYN/ACKs seen on `cap` for each of `ports` (as destination port) within `wait`.
fn synacks_to(cap: &Capture, ports: &[u16], wait: Duration) -> anyhow::Result<Vec<usize>> {
    let mut seen = vec![0; ports.len()];
    let mut buf = vec![0u8; 2048];
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if let Some(f) = cap.recv(&mut buf)?.and_then(packet::parse_tcp_frame) {
            if let Some(i) = ports.iter().position(|p| *p == f.dport) {
                seen[i] += usize::from(f.is_syn_ack());
            }
        }
    }
    Ok(seen)
}

/// A rogue host on the cluster bridge sends a member (1) a forward forged with the master's
/// source address, origin and term but without the cluster key, and (2) a genuine forward
/// captured on that member's cluster link a moment before, sent again. The member counts the
/// first as `bad_tag` and the second as `replay`, re-injects neither, and the client sees no
/// SYN/ACK for either (the genuine forward's first delivery was answered: the capture sees
/// answers).
#[test]
fn forged_and_replayed_forwards_are_dropped_and_counted() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("forged_and_replayed_forwards_are_dropped_and_counted") else {
        return Ok(());
    };
    with_cluster(start_raft("tdsc-ff")?, |cluster| {
        let master = cluster.wait_master(None, READY)?;
        let master_addr = master.cluster_addr.context("master cluster address")?;
        let member = cluster
            .nodes()
            .iter()
            .find(|n| n.id != master.id)
            .cloned()
            .context("a member")?;
        let member_addr = member.cluster_addr.context("member cluster address")?;
        let vip = cluster.vip();
        let client = cluster.clients()[0].clone();
        let client_ns = cluster.netns(&client.name);
        let term = cluster.status(&member.name)?.term;

        // 1. A genuine forward to the member: the client sends bare SYNs from ports no socket
        // holds (its stack resets each SYN/ACK, so the member keeps no request for it) until
        // the master forwards one to the member, which the capture on its link keeps.
        let on_link = netns::run_in(&cluster.netns(&member.name), || {
            Capture::open("eth1", Duration::from_millis(100))
        })??;
        let at_client = netns::run_in(&client_ns, || {
            Capture::open("eth0", Duration::from_millis(100))
        })??;
        // Outside the ephemeral port range, so no real connection collides.
        let base = 24_000 + u16::try_from(std::process::id() % 4000).expect("small");
        netns::run_in(&client_ns, || -> anyhow::Result<()> {
            let tx = RawIpSender::new()?;
            for i in 0..6 {
                let syn = Syn {
                    src: client.addr,
                    dst: *vip.ip(),
                    sport: base + i,
                    dport: vip.port(),
                    seq: 0x0f0f_0000 | u32::from(i),
                    payload: Vec::new(),
                };
                tx.send(&syn.ipv4_packet(), *vip.ip())?;
            }
            Ok(())
        })??;
        let (captured, genuine_port) = capture_forward(&on_link)?;
        let first = synacks_to(&at_client, &[genuine_port], Duration::from_secs(1))?;
        ensure!(
            first[0] >= 1,
            "control: the genuine forward's first delivery was not answered, so the capture \
             proves nothing"
        );

        // 2. A forward forged without the key: the master's address, origin and current term,
        // a fresh counter, tagged with another key under the cluster key's id.
        let ring = cluster.keyring()?;
        let forger = Keyring::new(&[(ring.send_id(), [0x66; KEY_LEN])], None)?;
        let forged_port = base + 100;
        let seg = Syn {
            src: client.addr,
            dst: *vip.ip(),
            sport: forged_port,
            dport: vip.port(),
            seq: 0x0bad_0000,
            payload: Vec::new(),
        }
        .segment();
        let header = ForwardHeader {
            term,
            origin: master.id,
            counter: forward_counter_now(),
            client: client.addr.into(),
            vip: (*vip.ip()).into(),
        };
        let mut buf = vec![0u8; 256];
        let n = header.encode_packet(&seg, &forger, &mut buf)?;
        let forged = ipv4_packet(master_addr, member_addr, FORWARD_PROTO, &buf[..n]);

        let before = cluster.status(&member.name)?.counters;
        let rogue = cluster.lab_mut().attach_host(
            "rogue",
            "br-cluster",
            "rogue-eth0",
            "198.51.100.99/24",
        )?;
        netns::run_in(&rogue, || -> anyhow::Result<()> {
            let tx = RawIpSender::new()?;
            tx.send(&forged, member_addr)?;
            tx.send(&captured, member_addr)?;
            Ok(())
        })??;
        let answers = synacks_to(
            &at_client,
            &[forged_port, genuine_port],
            Duration::from_millis(1500),
        )?;
        let after = cluster.status(&member.name)?.counters;
        let (b, a) = (before.forward_rejected, after.forward_rejected);
        let mut problems = Vec::new();
        for (what, got, want) in [
            ("bad_tag", a.bad_tag - b.bad_tag, 1),
            ("replay", a.replay - b.replay, 1),
            (
                "received_forwarded",
                after.received_forwarded - before.received_forwarded,
                0,
            ),
        ] {
            if got != want {
                problems.push(format!("{what} +{got}, expected +{want}"));
            }
        }
        if answers != [0, 0] {
            problems.push(format!(
                "the client saw SYN/ACKs (forged, replayed): {answers:?}"
            ));
        }
        ensure!(problems.is_empty(), "{}", problems.join("\n"));
        cluster.check_daemons()?;
        Ok(())
    })
}
