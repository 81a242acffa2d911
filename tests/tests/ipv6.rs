//! IPv6 end to end: the IPv6 lab (`deploy/containerlab/tdsc-v6.clab.yml`, addressed from
//! 2001:db8::/32 only) with an IPv6 VIP and IPv6 cluster addresses. Everything the IPv4
//! tests rely on has an IPv6 path of its own here: neighbour discovery for a VIP that three
//! nodes hold (NODAD), the `ip6` rulesets, SYNs forwarded as protocol 253 over IPv6 with the
//! IPv6 forward header, re-injection through an IPv6 raw socket with the TCP checksum
//! recomputed over the IPv6 pseudo-header, liveness reports over IPv6 UDP, and the member's
//! conntrack-INVALID drop of segments of other nodes' connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tdsc_lab::bins::BinDir;
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name};
use tdsc_lab::lab::Lab;
use tdsc_lab::status::Status;
use tdsc_lab::topology::{Role, Topology};
use tdsc_lab::{load, nft};

const NODES: [(&str, u32); 3] = [("node1", 1), ("node2", 2), ("node3", 3)];
const VIP: &str = "[2001:db8::1]:80";
/// Requests per client; two clients, so 3 × 40 with round robin.
const PER_CLIENT: u64 = 60;

fn topology_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/containerlab/tdsc-v6.clab.yml")
}

fn status(tdscctl: &Path, socket: &Path) -> anyhow::Result<Status> {
    tdsc_lab::status::query(tdscctl, socket).map_err(anyhow::Error::msg)
}

/// Waits until exactly one of the daemons behind `sockets` (other than `excluding`) is master
/// and sees `alive` nodes alive; returns its id.
fn wait_master(
    tdscctl: &Path,
    sockets: &BTreeMap<u32, PathBuf>,
    excluding: Option<u32>,
    alive: usize,
    lab: &mut Lab,
) -> anyhow::Result<u32> {
    let start = Instant::now();
    loop {
        let masters: Vec<(u32, Status)> = sockets
            .iter()
            .filter(|(id, _)| Some(**id) != excluding)
            .filter_map(|(id, sock)| status(tdscctl, sock).ok().map(|s| (*id, s)))
            .filter(|(_, s)| s.role == "master")
            .collect();
        if let [(id, s)] = masters.as_slice() {
            if s.nodes.iter().filter(|n| n.alive).count() == alive {
                return Ok(*id);
            }
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!(
                "no single master seeing {alive} nodes alive within 15 s: {masters:?}\n{}",
                lab.log_tail("tdscd-node1", 30)
            );
        }
        for (node, id) in NODES {
            if Some(id) == excluding {
                continue;
            }
            if let Some(how) = lab.exited(&format!("tdscd-{node}"))? {
                bail!(
                    "tdscd on {node} exited ({how}):\n{}",
                    lab.log_tail(&format!("tdscd-{node}"), 30)
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The election of a lab run: the topology's static one, or Raft over the IPv6 cluster network.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Election {
    Static,
    Raft,
}

/// Round robin over three IPv6 nodes: every request succeeds, each node serves exactly a
/// third, the master forwards two thirds over IPv6 and each member re-injects its share,
/// every connection gets exactly one SYN/ACK, and no client ever sees an RST.
#[test]
fn ipv6_vip_round_robin_over_three_nodes() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("ipv6_vip_round_robin_over_three_nodes") else {
        return Ok(());
    };
    let topology = Topology::load(&topology_path())?.renamed(&unique_lab_name("tdsc-v6"))?;
    let mut lab = Lab::realise(topology, true)?;
    let result = run_static(&mut lab);
    let teardown = lab.teardown();
    result?;
    teardown.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Raft over the IPv6 cluster network: a master is elected, dispatches round robin over the
/// three nodes, and after a SIGKILL of its daemon another node takes over and every new
/// request still succeeds, with no RST, on the two survivors; SYN-forward records are
/// replicated over IPv6 on the way.
#[test]
fn ipv6_raft_elects_a_master_and_fails_over() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("ipv6_raft_elects_a_master_and_fails_over") else {
        return Ok(());
    };
    let topology = Topology::load(&topology_path())?.renamed(&unique_lab_name("tdsc-v6r"))?;
    let mut lab = Lab::realise(topology, true)?;
    let result = run_raft(&mut lab);
    let teardown = lab.teardown();
    result?;
    teardown.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Starts an HTTP server and tdscd on every node; returns tdscctl's path and the control
/// sockets by node id.
fn start_nodes(
    lab: &mut Lab,
    election: Election,
) -> anyhow::Result<(PathBuf, BTreeMap<u32, PathBuf>)> {
    let bins = BinDir::locate()?;
    let (tdscd, tdscctl, httpd) = (
        bins.path("tdscd")?,
        bins.path("tdscctl")?,
        bins.path("tdsc-lab-httpd")?,
    );
    let dir = lab.workdir().to_owned();
    std::fs::create_dir_all(&dir)?;
    // One cluster key for the lab's nodes.
    let key_file = dir.join("cluster.key");
    tdsc_lab::cluster::write_key_file(&key_file, 1)?;
    let mut sockets = BTreeMap::new();
    for (node, id) in NODES {
        let args = ["--listen", "[::]:80", "--id", &id.to_string()].map(str::to_owned);
        lab.spawn(node, &format!("httpd-{node}"), &httpd, &args, &[])?;
        let source = lab
            .topology()
            .nodes
            .get(node)
            .and_then(|n| n.bind_for(tdsc_lab::topology::DAEMON_CONFIG_PATH))
            .with_context(|| format!("{node} binds no tdscd config"))?
            .to_owned();
        let socket = dir.join(format!("{node}.sock"));
        let text = std::fs::read_to_string(&source)?;
        // The host state file beside the socket: the nodes share one filesystem, and one
        // shared record would mix their changes (and race on its temporary file).
        let mut rewritten = text.replace(
            "socket = \"/run/tdsc/tdscd.sock\"",
            &format!(
                "socket = \"{}\"\nhost_state = \"{}\"",
                socket.display(),
                socket.with_extension("host-state").display()
            ),
        );
        ensure!(
            rewritten != text,
            "{} sets no [control] socket",
            source.display()
        );
        let keyed = rewritten.replace(
            "[cluster]\n",
            &format!("[cluster]\nkey_file = \"{}\"\n", key_file.display()),
        );
        ensure!(keyed != rewritten, "{} has no [cluster]", source.display());
        rewritten = keyed;
        if election == Election::Raft {
            let raft = format!(
                "[election]\nmode = \"raft\"\ndata_dir = \"{}\"\n",
                dir.join(format!("raft-{node}")).display()
            );
            let with_raft = rewritten.replace("[election]\nmode = \"static\"\nmaster = 1\n", &raft);
            ensure!(
                with_raft != rewritten,
                "{} has no static [election]",
                source.display()
            );
            rewritten = with_raft;
        }
        let config = dir.join(format!("{node}.toml"));
        std::fs::write(&config, rewritten)?;
        let args = ["--config".to_owned(), config.display().to_string()];
        lab.spawn(
            node,
            &format!("tdscd-{node}"),
            &tdscd,
            &args,
            &[("RUST_LOG", "info")],
        )?;
        sockets.insert(id, socket);
    }
    Ok((tdscctl, sockets))
}

/// The two client namespaces, with the counting probe installed.
fn clients(lab: &Lab) -> anyhow::Result<Vec<String>> {
    let clients: Vec<String> = lab
        .topology()
        .nodes_with_role(Role::Client)
        .into_iter()
        .map(|c| lab.netns(c))
        .collect();
    ensure!(clients.len() == 2, "expected two clients, got {clients:?}");
    for ns in &clients {
        nft::install_client_probe(ns)?;
    }
    Ok(clients)
}

fn run_raft(lab: &mut Lab) -> anyhow::Result<()> {
    let (tdscctl, sockets) = start_nodes(lab, Election::Raft)?;
    let first = wait_master(&tdscctl, &sockets, None, 3, lab)?;
    let clients = clients(lab)?;
    let vip: SocketAddr = VIP.parse()?;
    let stop = Arc::new(AtomicBool::new(false));
    let before = load::run(&clients, vip, PER_CLIENT, &stop)?;
    assert_eq!(before.failures, 0, "{:?}", before.sample_errors);
    for (_, id) in NODES {
        assert_eq!(
            before.by_node.get(&id).copied().unwrap_or(0),
            PER_CLIENT * 2 / 3,
            "round robin over IPv6 under Raft: {:?}",
            before.by_node
        );
    }
    control_port_is_closed_to_the_client_network(lab, &tdscctl, &sockets, &clients[0])?;
    let replicated = status(&tdscctl, &sockets[&first])?;
    let victim = NODES
        .iter()
        .find(|(_, id)| *id == first)
        .map(|(n, _)| *n)
        .context("the master's node")?;
    lab.kill(&format!("tdscd-{victim}"))?;
    let second = wait_master(&tdscctl, &sockets, Some(first), 2, lab)?;
    let after = load::run(&clients, vip, PER_CLIENT, &stop)?;
    assert_eq!(
        after.failures, 0,
        "after the failover: {:?}",
        after.sample_errors
    );
    assert_eq!(after.ok(), PER_CLIENT * 2);
    assert_eq!(
        after.by_node.get(&first).copied().unwrap_or(0),
        0,
        "the dead master's node served: {:?}",
        after.by_node
    );
    let (rsts, _) = nft::clients_counters(&clients)?;
    assert_eq!(rsts, 0, "IPv6 clients received TCP RSTs");
    let s = status(&tdscctl, &sockets[&second])?;
    assert!(
        s.term > replicated.term,
        "the new master's term {} is not newer",
        s.term
    );
    // Every connection of the first round was a new dispatch: its record went through Raft
    // to the node that is master now, and the takeover adopted the live ones.
    assert!(
        s.records.applied_records >= PER_CLIENT * 2,
        "records applied over IPv6: {:?}",
        s.records
    );
    let t = s
        .records
        .last_takeover
        .context("the new master reports its takeover")?;
    assert!(t.records_adopted > 0, "{t:?}");
    Ok(())
}

/// Datagrams to the cluster port (from that port, as a member's would be) sent from the client
/// network to the IPv6 VIP, which every node holds. They are one UDP flow: the static hash
/// gives it to one node, whose ruleset drops and counts them (`control_port_foreign`, the
/// counter of the rule that closes the port); the others drop them as another node's flow. No
/// node's cluster socket sees them (no bad header counted), and term and master stay.
fn control_port_is_closed_to_the_client_network(
    lab: &Lab,
    tdscctl: &Path,
    sockets: &BTreeMap<u32, PathBuf>,
    client: &str,
) -> anyhow::Result<()> {
    const SENT: u64 = 10;
    let before: BTreeMap<u32, Status> = sockets
        .iter()
        .map(|(id, sock)| Ok((*id, status(tdscctl, sock)?)))
        .collect::<anyhow::Result<_>>()?;
    let vip: SocketAddr = VIP.parse()?;
    let target = SocketAddr::new(vip.ip(), 7400);
    tdsc_lab::netns::run_in(client, || -> anyhow::Result<()> {
        let sock = std::net::UdpSocket::bind("[::]:7400")?;
        for i in 0..SENT {
            sock.send_to(format!("forged {i}").as_bytes(), target)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("{e}"))??;
    std::thread::sleep(Duration::from_millis(500));
    let mut by_ruleset = 0;
    for (id, sock) in sockets {
        let (b, a) = (&before[id], status(tdscctl, sock)?);
        by_ruleset += a
            .counters
            .drops
            .control_port_foreign
            .saturating_sub(b.counters.drops.control_port_foreign);
        let (cb, ca) = (b.counters.cluster_dropped, a.counters.cluster_dropped);
        ensure!(
            ca.bad_header == cb.bad_header && ca.source_port == cb.source_port,
            "node {id}: the cluster socket saw them: {cb:?} -> {ca:?}"
        );
        ensure!(
            a.term == b.term && a.master_id == b.master_id,
            "node {id}: term {} -> {}, master {:?} -> {:?}",
            b.term,
            a.term,
            b.master_id,
            a.master_id
        );
    }
    ensure!(
        by_ruleset >= SENT,
        "the rulesets dropped {by_ruleset} of {SENT} datagrams from the client network to the \
         cluster port (lab {})",
        lab.name()
    );
    Ok(())
}

fn run_static(lab: &mut Lab) -> anyhow::Result<()> {
    let (tdscctl, sockets) = start_nodes(lab, Election::Static)?;
    wait_master(&tdscctl, &sockets, None, 3, lab)?;
    let clients = clients(lab)?;
    let vip: SocketAddr = VIP.parse()?;
    let tally = load::run(&clients, vip, PER_CLIENT, &Arc::new(AtomicBool::new(false)))?;

    let total = PER_CLIENT * 2;
    assert_eq!(
        tally.failures,
        0,
        "failed IPv6 requests, e.g. {:?}\nnode2 log:\n{}",
        tally.sample_errors,
        lab.log_tail("tdscd-node2", 20)
    );
    assert_eq!(tally.ok(), total);
    for (_, id) in NODES {
        assert_eq!(
            tally.by_node.get(&id).copied().unwrap_or(0),
            total / 3,
            "round robin over three IPv6 nodes: {:?}",
            tally.by_node
        );
    }
    let (rsts, synacks) = nft::clients_counters(&clients)?;
    assert_eq!(rsts, 0, "IPv6 clients received TCP RSTs");
    assert_eq!(synacks, total, "SYN/ACKs received != connections");

    let master = status(&tdscctl, &sockets[&1])?;
    assert_eq!(
        master.counters.syns_dispatched, total,
        "{:?}",
        master.counters
    );
    assert_eq!(
        master.counters.forwarded_out,
        total * 2 / 3,
        "{:?}",
        master.counters
    );
    assert_eq!(master.counters.forward_send_errors, 0);
    for id in [2, 3] {
        let s = status(&tdscctl, &sockets[&id])?;
        assert_eq!(
            s.counters.reinjected,
            total / 3,
            "node {id}: {:?}",
            s.counters
        );
        assert_eq!(
            s.counters.forward_rejected.total(),
            0,
            "node {id}: {:?}",
            s.counters
        );
        let k = nft::kernel_counters(&lab.netns(&format!("node{id}")))?;
        assert_eq!(
            // The TCP MIB is shared by IPv4 and IPv6.
            k.get("TcpInCsumErrors").copied(),
            Some(0),
            "node {id}: re-injected IPv6 SYNs with a bad checksum"
        );
    }
    Ok(())
}
