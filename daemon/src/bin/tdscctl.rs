//! `tdscctl`: talk to a running `tdscd` over its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tdscd::status::{Reply, Request, Status};

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
    },
}

fn call(socket: &PathBuf, req: &Request) -> anyhow::Result<Reply> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .context("no reply from the daemon")?;
    serde_json::from_str(&reply).with_context(|| format!("unreadable reply {reply:?}"))
}

fn print_table(s: &Status) {
    println!(
        "node {} is {} (master: {}, term {}), policy {}, vip {}, queue {}",
        s.node_id,
        s.role,
        s.master_id.map_or("none".to_string(), |m| m.to_string()),
        s.term,
        s.policy,
        s.vip,
        s.queue_backend
    );
    println!(
        "{:>4}  {:<16} {:<6} {:>11} {:>8}",
        "id", "address", "alive", "connections", "syn-recv"
    );
    for n in &s.nodes {
        println!(
            "{:>4}  {:<16} {:<6} {:>11} {:>8}{}{}",
            n.id,
            n.address,
            if n.alive { "yes" } else { "NO" },
            n.connections,
            n.syn_recv,
            if n.is_self { "  (self)" } else { "" },
            if n.draining { "  draining" } else { "" }
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
        "rejected forwards: malformed {}  unknown-peer {}  wrong-vip {}  not-syn {}  bad-port {}  by-ruleset {}",
        r.malformed, r.unknown_peer, r.wrong_vip, r.not_syn, r.bad_port, r.ruleset_foreign
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Status { json } => match call(&args.socket, &Request::Status)? {
            Reply::Status(s) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print_table(&s);
                }
            }
            Reply::Error { error } => bail!("daemon: {error}"),
        },
    }
    Ok(())
}
