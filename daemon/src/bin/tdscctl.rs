//! `tdscctl`: talk to a running `tdscd` over its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tdscd::admin::protocol::{NodeAnswer, Reply, Request, Status};

#[derive(Debug, Parser)]
#[command(version, about = "Control a tcp-dsc node daemon")]
struct Args {
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/tdsc/tdscd.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Role, master, nodes and counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Every member's status, asked over the cluster network by the node behind the
        /// socket; a node that does not answer within 2 s is listed as such.
        #[arg(long)]
        cluster: bool,
    },
    /// The cluster's dispatch policy (any node's socket: carried to the Raft leader).
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// The cluster's client affinity (any node's socket: carried to the Raft leader, which
    /// commits it; every node applies it, keeping live entries).
    Affinity {
        #[command(subcommand)]
        action: AffinityAction,
    },
    /// Retime NODE's application health checks (any node's socket: carried to NODE). Lasts
    /// until NODE's daemon restarts; the configuration is the lasting place.
    Health {
        #[command(subcommand)]
        action: HealthAction,
    },
    /// Set NODE's weight (0: no new connections). Any node's socket: the request is carried
    /// to NODE, which announces its weight in its reports to the master.
    Weight { node: u32, weight: u32 },
    /// Stop new connections to NODE while its existing ones finish (any node's socket).
    Drain { node: u32 },
    /// Let NODE take new connections again (any node's socket).
    Undrain { node: u32 },
    /// Cluster membership, replicated through Raft: any node's socket; the request is carried
    /// to the Raft leader. The answer comes once the change has committed.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Write a new cluster key file with one fresh random key (mode 0600; never overwrites).
    /// Copy the same file to every node.
    Keygen {
        /// Where to write it.
        #[arg(long, default_value = tdscd::cluster::keyfile::DEFAULT_KEY_FILE)]
        out: PathBuf,
        /// The key's id (0-255): give a new key an id the keyring does not use yet.
        #[arg(long, default_value_t = 1)]
        id: u8,
    },
}

#[derive(Debug, Subcommand)]
enum NodeAction {
    /// Add node ID with cluster-network ADDRESS as a voter. It takes new connections once
    /// its daemon runs and reports. A brand-new node: add it first, then start its daemon with
    /// the current members and itself as `[[nodes]]` in its configuration.
    Add {
        /// The node's id (1 or more; not in use).
        id: u32,
        /// Its address on the cluster interface (same family as the other nodes').
        address: String,
        /// Its share of new connections (0..=1000; default 1).
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove node ID: it gets no new connection from then on, its own connections finish,
    /// and it stops voting. The leader cannot remove itself: it hands leadership to another
    /// voter and names it; send the request there.
    Remove {
        /// The member's id.
        id: u32,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyAction {
    /// Switch to NAME (round-robin, weighted-round-robin, least-connections, least-load,
    /// power-of-two, static-hash, isn-hash). Established connections are not touched.
    Set { name: String },
}

#[derive(Debug, Subcommand)]
enum AffinityAction {
    /// Switch to MODE (`none` or `client-address`). What is not given keeps its current
    /// value (or its default, when affinity was off).
    Set {
        mode: String,
        /// How long an entry lives after its client's last new connection (1..=86400000).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// The prefix IPv4 clients are grouped by (1..=32).
        #[arg(long)]
        prefix_v4: Option<u8>,
        /// The prefix IPv6 clients are grouped by (1..=128).
        #[arg(long)]
        prefix_v6: Option<u8>,
    },
}

#[derive(Debug, Subcommand)]
enum HealthAction {
    /// Change the timing of NODE's checks (all of them, or `--check NAME`).
    Set {
        node: u32,
        /// One check by its name (see `status`); default: every check of the node.
        #[arg(long)]
        check: Option<String>,
        #[arg(long)]
        interval_ms: Option<u64>,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(long)]
        rise: Option<u32>,
        #[arg(long)]
        fall: Option<u32>,
    },
}

fn call(socket: &PathBuf, req: &Request) -> anyhow::Result<Reply> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    // Membership changes answer after commit (a few ticks; at most ~5 s before the daemon
    // gives up), and a forwarded request at most after the daemon's forward timeout (8 s),
    // so wait a little longer than that.
    s.set_read_timeout(Some(Duration::from_secs(12)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .context("no reply from the daemon")?;
    serde_json::from_str(&reply).with_context(|| format!("unreadable reply {reply:?}"))
}

fn change(socket: &PathBuf, req: &Request) -> anyhow::Result<()> {
    match call(socket, req)? {
        Reply::Done { done } => {
            println!("{done}");
            Ok(())
        }
        Reply::Error { error } => bail!("daemon: {error}"),
        Reply::Status(_) | Reply::Cluster { .. } => bail!("unexpected status reply"),
    }
}

/// `status --cluster`: one block per member, or the reason it is missing.
fn print_cluster(cluster: &[NodeAnswer]) {
    for (i, n) in cluster.iter().enumerate() {
        if i > 0 {
            println!();
        }
        match (&n.status, &n.error) {
            (Some(s), _) => print_table(s),
            (None, e) => println!(
                "node {} ({}): NO ANSWER: {}",
                n.id,
                n.address,
                e.as_deref().unwrap_or("no reason given")
            ),
        }
    }
}

fn print_table(s: &Status) {
    println!(
        "node {} is {}{} (master: {}, raft leader: {}, term {}), policy {}, vip {}, queue {}",
        s.node_id,
        s.role,
        if s.member {
            ""
        } else {
            ", REMOVED from the cluster"
        },
        s.master_id.map_or("none".to_string(), |m| m.to_string()),
        s.leader_id.map_or("none".to_string(), |m| m.to_string()),
        s.term,
        s.policy,
        s.vip,
        s.queue_backend
    );
    println!(
        "{:>4}  {:<16} {:<6} {:<6} {:>11} {:>8} {:>6} {:>8}",
        "id", "address", "voter", "alive", "connections", "syn-recv", "weight", "load"
    );
    for n in &s.nodes {
        println!(
            "{:>4}  {:<16} {:<6} {:<6} {:>11} {:>8} {:>6} {:>8.3}{}{}{}",
            n.id,
            n.address,
            if n.voter { "yes" } else { "no" },
            if n.alive { "yes" } else { "NO" },
            n.connections,
            n.syn_recv,
            n.weight,
            f64::from(n.load) / 1000.0,
            if n.is_self { "  (self)" } else { "" },
            if n.draining { "  draining" } else { "" },
            if n.healthy { "" } else { "  UNHEALTHY" }
        );
    }
    let c = &s.counters;
    println!(
        "dispatched {}  forwarded {}  local {}  retransmits {}  received {}  reinjected {}",
        c.syns_dispatched,
        c.forwarded_out,
        c.accepted_locally,
        c.retransmit_hits,
        c.received_forwarded,
        c.reinjected
    );
    let r = &c.forward_rejected;
    println!(
        "rejected forwards: malformed {}  unknown-peer {}  bad-tag {}  unknown-key {}  replay {}  wrong-vip {}  not-syn {}  bad-port {}  stale-term {}  by-ruleset {}",
        r.malformed,
        r.unknown_peer,
        r.bad_tag,
        r.unknown_key,
        r.replay,
        r.wrong_vip,
        r.not_syn,
        r.bad_port,
        r.stale_term,
        r.ruleset_foreign
    );
    let fastopen = match s.cluster_key.tcp_fastopen {
        Some(f) => match f.backup {
            Some(b) => format!("from key {} (and key {b}'s accepted)", f.primary),
            None => format!("from key {}", f.primary),
        },
        None => "left as the host has it".to_owned(),
    };
    println!(
        "cluster key: ids {:?}, sealing with {}; TCP Fast Open key {fastopen}",
        s.cluster_key.ids, s.cluster_key.send
    );
    let k = &c.cluster_dropped;
    println!(
        "cluster datagrams: reports sent {}  received {}  dropped {}: source-port {}  bad-header {}  unknown-key {}  bad-tag {}  unknown-sender {}  replay {}  undecodable {}  no-owner {}",
        c.reports_sent, c.reports_received, c.reports_rejected, k.source_port, k.bad_header, k.unknown_key,
        k.bad_tag, k.unknown_sender, k.replay, k.undecodable, k.no_owner
    );
    if k.unknown_key + k.bad_tag > 0 && c.reports_received == 0 {
        println!(
            "  nothing from the cluster opens with this node's key: check [cluster] key_file is the cluster's key"
        );
    }
    println!(
        "control socket refused: oversize requests {}  sessions over the cap {}",
        c.control.oversize, c.control.over_cap
    );
    let d = &c.drops;
    println!(
        "drops: syn-prefix-limited {}  queue-full {}  queue-socket {}  listen-overflow {} (listen drops {})  conntrack insert-failed {} drop {}  not-owned in {} out {}  untracked in {} out {}  cluster-port foreign {} local {}",
        d.syn_prefix_limited,
        d.queue_kernel,
        d.queue_user,
        d.listen_overflows,
        d.listen_drops,
        d.conntrack_insert_failed,
        d.conntrack_drop,
        d.not_owned_in,
        d.not_owned_out,
        d.untracked_in,
        d.untracked_out,
        d.control_port_foreign,
        d.control_port_local
    );
    let q = &c.queue;
    println!(
        "queue i/o {}: received {} in {} batches (largest {})  overruns {}  verdict errors {}  malformed {}  socket buffer {} KiB",
        q.io,
        q.received,
        q.batches,
        q.batch_max,
        q.enobufs,
        q.verdict_errors,
        q.malformed,
        q.rcvbuf / 1024
    );
    let rec = &s.records;
    println!(
        "records: replicate {}  reconcile {}  proposed {} in {} batches  applied {} in {} batches  replica live {}  handoff overflow {}  discarded {}  queries answered {}",
        if rec.replicate { "on" } else { "OFF" },
        if rec.reconcile { "on" } else { "OFF" },
        rec.proposed_records,
        rec.proposed_batches,
        rec.applied_records,
        rec.applied_batches,
        rec.replica_live,
        c.records_handoff_overflow,
        rec.discarded_not_leader,
        rec.queries_answered
    );
    match &s.affinity {
        Some(a) => println!(
            "affinity: client-address /{} /{} for {} ms  hits {}  replica live {} of {}  evicted {}",
            a.prefix_v4,
            a.prefix_v6,
            a.timeout_ms,
            a.hits,
            a.replica_live,
            a.capacity,
            a.evicted_live
        ),
        None => println!("affinity: none"),
    }
    match &s.health {
        Some(h) if !h.checks.is_empty() => {
            println!(
                "health: {}",
                if h.healthy {
                    "every check passes"
                } else {
                    "FAILING: no new connections for this node"
                }
            );
            for k in &h.checks {
                println!(
                    "  {:<16} {:<8} {}  every {} ms, timeout {} ms, rise {}, fall {}  probes {}  failures {}  downs {}{}",
                    k.name,
                    match k.passing {
                        None => "pending",
                        Some(true) => "passing",
                        Some(false) => "FAILING",
                    },
                    k.probe,
                    k.interval_ms,
                    k.timeout_ms,
                    k.rise,
                    k.fall,
                    k.probes,
                    k.failures,
                    k.downs,
                    k.last_failure
                        .as_ref()
                        .map(|r| format!("  last failure: {r}"))
                        .unwrap_or_default()
                );
            }
        }
        _ => println!("health: no checks"),
    }
    if let Some(t) = &rec.last_takeover {
        println!(
            "last takeover (term {}): {} records and {} affinity entries adopted, {} SYN-RECV reconciled, {}/{} members answered{}, waited {} ms",
            t.term,
            t.records_adopted,
            t.affinity_adopted,
            t.syn_recv_reconciled,
            t.members_answered,
            t.members_asked,
            if t.truncated { " (truncated)" } else { "" },
            t.wait_ms
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Status { json, cluster } => {
            let req = if cluster {
                Request::ClusterStatus
            } else {
                Request::Status
            };
            match call(&args.socket, &req)? {
                Reply::Status(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
                Reply::Status(s) => print_table(&s),
                Reply::Cluster { cluster } if json => {
                    println!("{}", serde_json::to_string_pretty(&cluster)?);
                }
                Reply::Cluster { cluster } => print_cluster(&cluster),
                Reply::Error { error } => bail!("daemon: {error}"),
                Reply::Done { done } => bail!("unexpected reply: {done}"),
            }
        }
        Command::Policy {
            action: PolicyAction::Set { name },
        } => change(&args.socket, &Request::PolicySet { policy: name })?,
        Command::Affinity {
            action:
                AffinityAction::Set {
                    mode,
                    timeout_ms,
                    prefix_v4,
                    prefix_v6,
                },
        } => change(
            &args.socket,
            &Request::AffinitySet {
                affinity: mode,
                timeout_ms,
                prefix_v4,
                prefix_v6,
            },
        )?,
        Command::Health {
            action:
                HealthAction::Set {
                    node,
                    check,
                    interval_ms,
                    timeout_ms,
                    rise,
                    fall,
                },
        } => change(
            &args.socket,
            &Request::HealthSet {
                node,
                check,
                interval_ms,
                timeout_ms,
                rise,
                fall,
            },
        )?,
        Command::Weight { node, weight } => {
            change(&args.socket, &Request::Weight { node, weight })?;
        }
        Command::Drain { node } => change(&args.socket, &Request::Drain { node })?,
        Command::Undrain { node } => change(&args.socket, &Request::Undrain { node })?,
        Command::Node {
            action:
                NodeAction::Add {
                    id,
                    address,
                    weight,
                },
        } => change(
            &args.socket,
            &Request::NodeAdd {
                id,
                address,
                weight,
            },
        )?,
        Command::Node {
            action: NodeAction::Remove { id },
        } => change(&args.socket, &Request::NodeRemove { id })?,
        Command::Keygen { out, id } => {
            tdscd::cluster::keyfile::create(&out, id)?;
            println!("wrote key {id} to {}", out.display());
        }
    }
    Ok(())
}
