//! A crashed daemon must leave no node accepting SYNs it should not (fail-closed), and must not
//! disturb connections that are already established (root only; prints SKIP otherwise).
//!
//! The master's daemon is killed with SIGKILL, so it cannot clean up: its ruleset, VIP and
//! sockets stay as they were. The queue rule has no `bypass`, so with no consumer bound the
//! kernel drops client SYNs instead of accepting them on the master; the members keep
//! dropping client SYNs. New connections therefore get no SYN/ACK from anyone (the client
//! retransmits until a daemon runs again), while connections established before the crash
//! — on the master and on the members — carry on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::{http, netns, nft};

#[test]
fn master_daemon_crash_is_fail_closed_and_keeps_established_connections() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("master_daemon_crash_is_fail_closed") else {
        return Ok(());
    };
    let cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-crash")),
        policy: Some("round-robin".to_owned()),
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let result = body(&cluster);
    let teardown = cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"));
    result?;
    teardown
}

fn body(cluster: &Cluster) -> anyhow::Result<()> {
    let vip = SocketAddr::V4(cluster.vip());
    let client = cluster.netns(&cluster.clients()[0].name);
    nft::install_client_probe(&client)?;

    // Three connections, one per node under round robin; no request sent yet.
    let streams: Vec<TcpStream> = netns::run_in(&client, || {
        (0..3)
            .map(|_| TcpStream::connect_timeout(&vip, Duration::from_secs(2)))
            .collect::<std::io::Result<Vec<_>>>()
    })?
    .context("open connections before the crash")?;

    let master = cluster.master()?.name.clone();
    let pid = cluster.daemon_pid(&master)?;
    // SAFETY: kill(2) on a pid we started; no memory is involved.
    let r = unsafe { libc::kill(i32::try_from(pid)?, libc::SIGKILL) };
    ensure!(r == 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
    wait_gone(pid)?;

    // The crashed master's ruleset is still in its kernel, queue rule included.
    let ruleset = netns::exec(
        &cluster.netns(&master),
        "nft",
        ["list", "table", "inet", "tdsc"],
    )?;
    ensure!(
        ruleset.contains("queue") && !ruleset.contains("bypass"),
        "master ruleset after the crash:\n{ruleset}"
    );

    // No node accepts a new connection while no daemon dispatches.
    let (_, synacks_before) = nft::client_counters(&client)?;
    let attempts = netns::run_in(&client, || {
        (0..3)
            .map(|_| TcpStream::connect_timeout(&vip, Duration::from_millis(1500)).is_ok())
            .collect::<Vec<bool>>()
    })?;
    let (rsts, synacks_after) = nft::client_counters(&client)?;
    ensure!(
        attempts.iter().all(|ok| !ok),
        "a new connection was accepted with the master's daemon dead: {attempts:?}"
    );
    ensure!(
        synacks_after == synacks_before,
        "{} SYN/ACKs answered new SYNs after the crash",
        synacks_after - synacks_before
    );
    ensure!(rsts == 0, "the client received {rsts} RSTs");

    // Every connection established before the crash still works, on every node.
    let mut served_by = Vec::new();
    for mut s in streams {
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(&http::request_bytes("/after-crash"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        served_by.push(http::parse_reply(vip, &raw, Duration::ZERO)?.node);
    }
    served_by.sort_unstable();
    ensure!(
        served_by == vec![1, 2, 3],
        "established connections answered by {served_by:?}, expected one on each node"
    );
    Ok(())
}

/// Waits until `pid` has exited (a zombie counts: it holds no sockets).
fn wait_gone(pid: u32) -> anyhow::Result<()> {
    for _ in 0..100 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return Ok(()),
            Ok(stat)
                if stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) =>
            {
                return Ok(())
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    anyhow::bail!("tdscd (pid {pid}) did not exit after SIGKILL")
}
