//! Paper §3.5 across a master failover, end to end on a 3-node Raft lab (root only; SKIP
//! otherwise). Each test builds its own lab and removes it, also on failure.
//!
//! The scenario: a client's SYN is forwarded to a member, which answers with a SYN/ACK that
//! is lost (an nft rule in the client namespace drops SYN/ACKs to that client port), so the
//! member holds the handshake in SYN-RECV. The master's daemon is SIGKILLed right after. The
//! client retransmits its SYN, and the new master must send it to the member that holds the
//! SYN-RECV socket: the connect succeeds there, the client sees SYN/ACKs from exactly that one
//! node (told apart by the nodes' masked source MACs) and no RST.
//!
//! To make a wrong dispatch certain rather than likely, the holder's weight is set to 0
//! before the retransmission arrives: the policy alone would never pick it, only a record
//! (replicated, or reconciled from SYN-RECV) sends the SYN there. With replication and
//! reconciliation both disabled (test-only config knobs), the retransmission goes to the
//! other live node, which answers with its own SYN/ACK: the negative control below checks
//! that this scenario does catch a wrong dispatch.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterNode, ClusterOptions};
use tdsc_lab::{http, netns, nft, packet};

/// Whether the node's namespace holds a SYN-RECV socket from client port `port`.
fn holds_syn_recv(cluster: &Cluster, node: &ClusterNode, port: u16) -> anyhow::Result<bool> {
    let out = netns::exec(
        &cluster.netns(&node.name),
        "ss",
        ["-Htn", "state", "syn-recv"],
    )?;
    let suffix = format!(":{port}");
    Ok(out
        .lines()
        .any(|l| l.split_whitespace().any(|w| w.ends_with(&suffix))))
}

/// Polls until `cond` holds or `limit` passes (a wait, not a timed assertion).
fn wait_for(
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    anyhow::bail!("{what}: not within {limit:?}")
}

const DROP_TABLE: &str = "tdsclab_lost";

/// Which mechanisms run, and when the master dies.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// `scheduler.replicate_records`.
    replicate: bool,
    /// `scheduler.reconcile_syn_recv`.
    reconcile: bool,
    /// Kill the master only once every member has applied the record (else right after the
    /// SYN-RECV shows on the holder).
    after_commit: bool,
}

/// Runs the scenario. With at least one mechanism on, asserts the connection is saved;
/// with both off, asserts that it is not (the negative control).
fn lost_synack_across_failover(test: &str, mode: Mode, port: u16) -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab(test) else {
        return Ok(());
    };
    let scheduler_extra = vec![
        (
            "replicate_records".to_owned(),
            toml::Value::Boolean(mode.replicate),
        ),
        (
            "reconcile_syn_recv".to_owned(),
            toml::Value::Boolean(mode.reconcile),
        ),
    ];
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-rec")),
        policy: Some("round-robin".to_owned()),
        raft: true,
        scheduler_extra,
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")?;
    let client = cluster.client_namespaces()[0].clone();
    nft::install_client_probe(&client)?;
    let vip: SocketAddrV4 = cluster.vip();
    let master = cluster.master()?.clone();
    let master_status = cluster.status(&master.name)?;
    ensure!(
        master_status.nodes.iter().all(|n| n.alive),
        "every node alive before the test: {master_status:?}"
    );
    eprintln!(
        "first master {} takeover: {:?}",
        master.name, master_status.records.last_takeover
    );
    // The master takes nothing itself: the SYN is forwarded to a member.
    cluster.ctl(&master.name, &["weight", &master.id.to_string(), "0"])?;

    netns::exec(
        &client,
        "nft",
        [format!(
            "add table inet {DROP_TABLE}; \
             add chain inet {DROP_TABLE} in {{ type filter hook input priority -400; policy accept; }}; \
             add rule inet {DROP_TABLE} in tcp dport {port} tcp flags & (syn | ack) == syn | ack drop"
        )],
    )?;
    let stop_cap = Arc::new(AtomicBool::new(false));
    let cap = packet::capture_synacks(&client, *vip.ip(), stop_cap.clone());
    std::thread::sleep(Duration::from_millis(100));

    let conn = netns::spawn_in(&client, move || {
        http::get_from_port(vip, port, "/", Duration::from_secs(15))
    });
    let members: Vec<ClusterNode> = cluster
        .nodes()
        .iter()
        .filter(|n| n.id != master.id)
        .cloned()
        .collect();
    let mut holder = None;
    wait_for(
        Duration::from_secs(3),
        "a member holds the SYN-RECV",
        || {
            for m in &members {
                if holds_syn_recv(&cluster, m, port)? {
                    holder = Some(m.clone());
                    return Ok(true);
                }
            }
            Ok(false)
        },
    )?;
    let holder = holder.context("holder")?;
    if mode.after_commit {
        for m in &members {
            wait_for(Duration::from_secs(3), "the record is applied", || {
                Ok(cluster.status(&m.name)?.records.applied_records >= 1)
            })?;
        }
    }
    cluster.kill_daemon(&master.name)?;
    eprintln!(
        "SYN from port {port} held in SYN-RECV by {} (id {}); master {} killed",
        holder.name, holder.id, master.name
    );
    // From now on only a record can send the client's SYN to the holder.
    cluster.ctl(&holder.name, &["weight", &holder.id.to_string(), "0"])?;
    let new = cluster
        .wait_master(Some(&master.name), Duration::from_secs(5))
        .context("no new master after SIGKILL")?;
    wait_for(
        Duration::from_secs(3),
        "the new master knows weight 0",
        || {
            let s = cluster.status(&new.name)?;
            Ok(s.nodes.iter().any(|n| n.id == holder.id && n.weight == 0))
        },
    )?;
    ensure!(
        holds_syn_recv(&cluster, &holder, port)?,
        "the holder still has the handshake"
    );
    // SYN/ACKs stay dropped until the new master has dispatched the client's retransmitted
    // SYN: otherwise the holder's own SYN/ACK retransmission (on a timer as long as the
    // client's) could complete the handshake first and hide where the SYN went. The capture
    // sees dropped SYN/ACKs, so it shows every node that answered.
    wait_for(
        Duration::from_secs(8),
        "the new master dispatches the retransmitted SYN",
        || Ok(cluster.status(&new.name)?.counters.syns_dispatched >= 1),
    )?;
    std::thread::sleep(Duration::from_millis(50));
    netns::exec(&client, "nft", [format!("delete table inet {DROP_TABLE}")])?;

    let reply = conn.join().expect("connect thread")?;
    std::thread::sleep(Duration::from_millis(200));
    stop_cap.store(true, Ordering::Relaxed);
    let seen = cap.join().expect("capture thread")??;
    let new_status = cluster.status(&new.name)?;
    eprintln!(
        "new master {} (id {}): records {:?}; SYN/ACKs seen {seen:?}; reply {reply:?}",
        new.name, new.id, new_status.records
    );
    let attempts: Vec<_> = seen.iter().filter(|((p, _), _)| *p == port).collect();
    assert_eq!(attempts.len(), 1, "one handshake (one ISN): {seen:?}");
    let hits = new_status.counters.retransmit_hits;
    if !mode.replicate && !mode.reconcile {
        // Negative control: nothing steers the retransmission, so another node answers it.
        assert!(
            attempts[0].1.len() >= 2,
            "without records the retransmission should have gone astray: {seen:?}"
        );
        return cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"));
    }
    assert!(hits >= 1, "the new master sent the SYN by a record");
    let reply = reply.context("the connection from the fixed port")?;
    assert_eq!(
        reply.node, holder.id,
        "the retransmitted SYN must land on the SYN-RECV holder"
    );
    assert_eq!(
        attempts[0].1.len(),
        1,
        "SYN/ACKs from exactly one node: {seen:?}"
    );
    let (rsts, _) = nft::client_counters(&client)?;
    assert_eq!(rsts, 0, "the client received an RST");

    let takeover = new_status
        .records
        .last_takeover
        .context("the new master reports its takeover")?;
    assert!(
        takeover.records_adopted + takeover.syn_recv_reconciled >= 1,
        "{takeover:?}"
    );
    if mode.reconcile {
        assert!(takeover.members_answered >= 1, "{takeover:?}");
    } else {
        assert_eq!(takeover.syn_recv_reconciled, 0, "{takeover:?}");
        assert!(takeover.records_adopted >= 1, "{takeover:?}");
    }
    if !mode.replicate {
        assert_eq!(new_status.records.applied_records, 0, "nothing replicated");
        assert!(takeover.syn_recv_reconciled >= 1, "{takeover:?}");
    }
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Replication and reconciliation together (the product's configuration); the master dies
/// right after the forward, possibly before the record is committed.
#[test]
fn a_retransmitted_syn_reaches_the_syn_recv_holder_after_the_master_dies() -> anyhow::Result<()> {
    lost_synack_across_failover(
        "a_retransmitted_syn_reaches_the_syn_recv_holder_after_the_master_dies",
        Mode {
            replicate: true,
            reconcile: true,
            after_commit: false,
        },
        41234,
    )
}

/// Reconciliation switched off (test knob): a committed record alone saves it.
#[test]
fn a_committed_record_alone_saves_the_handshake() -> anyhow::Result<()> {
    lost_synack_across_failover(
        "a_committed_record_alone_saves_the_handshake",
        Mode {
            replicate: true,
            reconcile: false,
            after_commit: true,
        },
        41235,
    )
}

/// Replication switched off (test knob): the SYN-RECV reconciliation alone saves it.
#[test]
fn reconciliation_alone_saves_the_handshake_without_replication() -> anyhow::Result<()> {
    lost_synack_across_failover(
        "reconciliation_alone_saves_the_handshake_without_replication",
        Mode {
            replicate: false,
            reconcile: true,
            after_commit: false,
        },
        41236,
    )
}

/// Negative control: with both switched off the scenario does catch the wrong dispatch.
#[test]
fn without_records_the_retransmission_goes_astray() -> anyhow::Result<()> {
    lost_synack_across_failover(
        "without_records_the_retransmission_goes_astray",
        Mode {
            replicate: false,
            reconcile: false,
            after_commit: false,
        },
        41237,
    )
}
