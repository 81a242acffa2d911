//! The cluster port locked down (issue 11), end to end on the 3-node Raft lab (root only; SKIP
//! otherwise, FAIL under CI): forged cluster datagrams with members' source addresses, from a
//! rogue host on the *client* bridge and from an unprivileged process inside a node's own
//! namespace, are dropped by the ruleset and counted, and nothing changes: membership, the
//! term, the voters, the master, every node's drain flag and weight; the clients are served.
//! The forged datagrams are a report (drain, weight 0, huge counts) and a `Removed` notice
//! with no voters, in today's wire format.
//! The lab (`tdsc-port-<pid>-<n>`) and the rogue hosts are removed, also on failure.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::status::Status;
use tdsc_lab::{load, netns};
use tdsc_proto::control::{Body, Envelope, NodeReport, Removed};

/// `[cluster] control_port`: the lab's configs leave the default.
const CONTROL_PORT: u16 = 7400;

/// Rounds of the forged datagrams ([`forged`]) each sender sends to each target.
const ROUNDS: u64 = 5;

/// Datagrams per target per sender: [`ROUNDS`] of each forged kind.
const COPIES: u64 = 2 * ROUNDS;

/// How long the counters may take to show the drops.
const SETTLE: Duration = Duration::from_secs(5);

/// The forged message: a report in today's wire format claiming that node `from` drains, has
/// weight 0 and more connections than a `u32` sum can take. Accepted, it would show as
/// `draining` in every node's status and stop the master dispatching to `from`.
fn forged_report(from: u32, term: u64) -> Vec<u8> {
    Envelope::report(
        from,
        term,
        NodeReport {
            established: u32::MAX,
            syn_recv: u32::MAX,
            seq: u64::MAX,
            draining: true,
            load: u32::MAX,
            weight: Some(0),
            unhealthy: true,
        },
    )
    .to_bytes()
}

/// A forged `Removed` notice in node `from`'s name with an empty voter list. Accepted, it
/// takes the receiver out of the group until it restarts (issue 11), which its status shows
/// for good: `member` false, other voters.
fn forged_removed(from: u32, term: u64) -> Vec<u8> {
    Envelope {
        from,
        term,
        body: Some(Body::Removed(Removed {
            index: u64::MAX,
            voters: vec![],
        })),
    }
    .to_bytes()
}

/// The forged datagrams every sender sends to every target, in `from`'s name.
fn forged(from: u32, term: u64) -> Vec<Vec<u8>> {
    vec![forged_report(from, term), forged_removed(from, term)]
}

/// What must not change, per node: term, voters, master, and each node's (id, drain, weight).
type Steady = (bool, u64, Vec<u32>, Option<u32>, Vec<(u32, bool, u32)>);

fn steady(s: &Status) -> Steady {
    (
        s.member,
        s.term,
        s.voters.clone(),
        s.master_id,
        s.nodes
            .iter()
            .map(|n| (n.id, n.draining, n.weight))
            .collect(),
    )
}

#[test]
fn forged_cluster_datagrams_from_clients_and_local_users_are_dropped_and_counted(
) -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab(
        "forged_cluster_datagrams_from_clients_and_local_users_are_dropped_and_counted",
    ) else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-port")),
        raft: true,
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")?;
    let result = run(&mut cluster);
    let torn = cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"));
    result.and(torn)
}

fn run(cluster: &mut Cluster) -> anyhow::Result<()> {
    cluster.wait_master(None, Duration::from_secs(15))?;
    let nodes: Vec<(String, u32, Ipv4Addr)> = cluster
        .nodes()
        .iter()
        .map(|n| {
            n.cluster_addr
                .map(|a| (n.name.clone(), n.id, a))
                .context("node without cluster address")
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(nodes.len() == 3, "the lab has three nodes: {nodes:?}");
    // Every node agrees before anything is sent (reports settle within a few intervals).
    let deadline = Instant::now() + Duration::from_secs(10);
    let before: Vec<Status> = loop {
        let s: Vec<Status> = nodes
            .iter()
            .map(|(n, ..)| cluster.status(n))
            .collect::<Result<_, _>>()?;
        let all_live = s
            .iter()
            .all(|st| st.nodes.iter().all(|n| n.alive || n.is_self));
        if all_live && s.windows(2).all(|w| w[0].term == w[1].term) {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "the cluster did not settle: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let term = before[0].term;

    // 1. Two rogue hosts on the client bridge. Each holds one member's cluster address and
    //    sends, from the cluster port, forged reports in that member's name to the other
    //    nodes' cluster addresses (routed out of its client-side link).
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let rogues = [
        (
            "rogue-a",
            "rogue-a-eth0",
            "192.0.2.198/24",
            n3,
            vec![n1, n2],
        ),
        ("rogue-b", "rogue-b-eth0", "192.0.2.199/24", n1, vec![n3]),
    ];
    for (name, port, cidr, spoofed, targets) in &rogues {
        let ns = cluster
            .lab_mut()
            .attach_host(name, "br-client", port, cidr)?;
        let (_, spoofed_id, spoofed_addr) = spoofed;
        netns::ip([
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{spoofed_addr}/32"),
            "dev",
            "eth0",
        ])?;
        netns::ip(["-n", &ns, "route", "add", "198.51.100.0/24", "dev", "eth0"])?;
        // Each rogue answers ARP for the address it holds: name each target's client-side
        // MAC statically, so that every datagram reaches the node it is meant for.
        for (node, _, addr) in targets {
            let mac = netns::exec(&cluster.netns(node), "cat", ["/sys/class/net/eth0/address"])?;
            netns::ip([
                "-n",
                &ns,
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                mac.trim(),
                "dev",
                "eth0",
            ])?;
        }
        let payloads = forged(*spoofed_id, term);
        let to: Vec<SocketAddr> = targets
            .iter()
            .map(|(_, _, a)| SocketAddr::V4(SocketAddrV4::new(*a, CONTROL_PORT)))
            .collect();
        let from = SocketAddr::V4(SocketAddrV4::new(*spoofed_addr, CONTROL_PORT));
        netns::run_in(&ns, move || -> anyhow::Result<()> {
            let sock = UdpSocket::bind(from).context("bind the spoofed member address")?;
            for _ in 0..ROUNDS {
                for t in &to {
                    for p in &payloads {
                        sock.send_to(p, t).with_context(|| format!("send to {t}"))?;
                    }
                }
            }
            Ok(())
        })??;
    }

    // 2. An unprivileged process (uid/gid 65534) inside node2's namespace sends forged
    //    reports in node2's name, from node2's own cluster address, to the other two nodes.
    //    bash's /dev/udp opens a socket of that user; the bytes go through printf escapes.
    //    A datagram the output chain drops fails its send with EPERM, which is ignored here:
    //    the counters below say what happened.
    let escape = |d: &Vec<u8>| -> String { d.iter().map(|b| format!("\\x{b:02x}")).collect() };
    let sends: String = forged(n2.1, term)
        .iter()
        .map(|d| {
            format!(
                "printf '{}' 2>/dev/null >/dev/udp/$t/{CONTROL_PORT} || true; ",
                escape(d)
            )
        })
        .collect();
    let script = format!(
        "for i in $(seq {ROUNDS}); do for t in {} {}; do {sends}done; done",
        n1.2, n3.2
    );
    netns::exec(
        &cluster.netns(&n2.0),
        "setpriv",
        [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "bash",
            "-c",
            &script,
        ],
    )
    .context("send as nobody from node2's namespace (setpriv)")?;

    // Counted: node1 and node2 got COPIES each from rogue-a, node3 COPIES from rogue-b; node2
    // refused 2 × COPIES from its local user on the way out, so none of them reached node1
    // or node3 (they would count them too: wrong source port).
    let want = |name: &str| -> (u64, u64) {
        if name == n2.0 {
            (COPIES, 2 * COPIES)
        } else {
            (COPIES, 0)
        }
    };
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut problems = Vec::new();
        for ((name, ..), b) in nodes.iter().zip(&before) {
            let a = cluster.status(name)?.counters.drops;
            let got = (
                a.control_port_foreign - b.counters.drops.control_port_foreign,
                a.control_port_local - b.counters.drops.control_port_local,
            );
            if got != want(name) {
                problems.push(format!(
                    "{name}: cluster-port drops (foreign, local) +{got:?}, expected +{:?}",
                    want(name)
                ));
            }
        }
        if problems.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "drop counters wrong:\n{}",
            problems.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Nothing changed: a few report intervals later, no node shows a forged drain or weight,
    // the term, voters and master are the same, and no daemon has died.
    std::thread::sleep(Duration::from_secs(1));
    for ((name, ..), b) in nodes.iter().zip(&before) {
        let a = cluster.status(name)?;
        ensure!(
            steady(&a) == steady(b),
            "{name} changed: {:?} -> {:?}",
            steady(b),
            steady(&a)
        );
        ensure!(
            a.counters.reports_rejected == b.counters.reports_rejected,
            "{name}: forged datagrams reached the daemon (reports rejected {} -> {})",
            b.counters.reports_rejected,
            a.counters.reports_rejected
        );
    }
    cluster.check_daemons()?;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = load::run(
        &cluster.client_namespaces(),
        SocketAddr::V4(cluster.vip()),
        30,
        &stop,
    )?;
    ensure!(tally.failures == 0, "{:?}", tally.sample_errors);
    Ok(())
}
