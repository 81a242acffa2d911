//! What tdscd changes on its host (VIP, cluster MAC, conntrack sysctls) is undone after a
//! crash, exactly and only that (root only; prints SKIP otherwise).
//!
//! The daemon records each change in its host state file before it makes it. These tests kill
//! a daemon with SIGKILL, so that it undoes nothing, and then check the two ways the record is
//! used: a restarted daemon takes the changes over and undoes them at its stop, and
//! `tdscd --install-member-rules` (the unit's `ExecStopPost=`) undoes them at once. A VIP the
//! operator configured before the daemon started is left alone by both.
//!
//! The lab is started without daemons; each test starts the one daemon it needs, so that it
//! can read the host's state before tdscd first touches it.

use std::time::Duration;

use anyhow::{ensure, Context};
use tdsc_lab::bins::BinDir;
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::netns;

const READY: Duration = Duration::from_secs(15);
const STOP: Duration = Duration::from_secs(20);
/// The lab's VIP with the prefix length of its node configs.
const VIP: &str = "192.0.2.1/24";
const CLUSTER_MAC: &str = "02:bf:c0:00:02:01";
const LOOSE: &str = "net/netfilter/nf_conntrack_tcp_loose";
const LIBERAL: &str = "net/netfilter/nf_conntrack_tcp_be_liberal";
/// The cluster interface's reverse-path filter (the lab's cluster interface is `eth1`).
const RP_FILTER: &str = "net/ipv4/conf/eth1/rp_filter";

/// What the host state tests look at on a node's client interface and in its sysctls.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostView {
    vip: bool,
    mac: String,
    loose: String,
    liberal: String,
    rp_filter: String,
}

fn view(ns: &str) -> anyhow::Result<HostView> {
    let addrs = netns::exec(ns, "ip", ["-o", "addr", "show", "dev", "eth0"])?;
    let mac = netns::exec(ns, "cat", ["/sys/class/net/eth0/address"])?;
    let sysctl = |key: &str| -> anyhow::Result<String> {
        Ok(netns::exec(ns, "cat", [format!("/proc/sys/{key}")])?
            .trim()
            .to_owned())
    };
    Ok(HostView {
        vip: addrs.contains(&format!(" {VIP} ")),
        mac: mac.trim().to_owned(),
        loose: sysctl(LOOSE)?,
        liberal: sysctl(LIBERAL)?,
        rp_filter: sysctl(RP_FILTER)?,
    })
}

/// Starts a lab without daemons and gives every node sysctl values that differ from what
/// tdscd sets (the kernel's defaults, set explicitly so the test does not depend on them).
fn lab(prefix: &str) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name(prefix)),
        daemons: false,
        ..ClusterOptions::default()
    })
    .context("start the lab")?;
    for n in cluster.nodes() {
        let ns = cluster.netns(&n.name);
        netns::sysctl(&ns, &LOOSE.replace('/', "."), "1")?;
        netns::sysctl(&ns, &LIBERAL.replace('/', "."), "0")?;
        netns::sysctl(&ns, &RP_FILTER.replace('/', "."), "0")?;
    }
    Ok(cluster)
}

fn run(prefix: &str, body: impl FnOnce(&mut Cluster) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut cluster = lab(prefix)?;
    let result = body(&mut cluster);
    let teardown = cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"));
    result?;
    teardown
}

/// Starts a node's daemon and checks that it made the changes the test expects undone.
fn start_and_check(cluster: &mut Cluster, node: &str, before: &HostView) -> anyhow::Result<()> {
    cluster.restart_daemon(node, READY)?;
    let during = view(&cluster.netns(node))?;
    ensure!(
        during
            == HostView {
                vip: true,
                mac: CLUSTER_MAC.into(),
                loose: "0".into(),
                liberal: "1".into(),
                rp_filter: "1".into(),
            },
        "{node} while tdscd runs (before it: {before:?}): {during:?}"
    );
    Ok(())
}

fn stop(cluster: &mut Cluster, node: &str) -> anyhow::Result<String> {
    let (status, log) = cluster.stop_daemon(node, STOP)?;
    ensure!(
        status.contains("exit status: 0"),
        "{node}: tdscd stopped with {status}:\n{log}"
    );
    Ok(log)
}

#[test]
fn a_crashed_daemons_changes_are_undone_by_its_successor_and_by_exec_stop_post(
) -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("host_state_crash") else {
        return Ok(());
    };
    run("tdsc-hoststate", |cluster| {
        // node2: SIGKILL, restart, stop.
        let ns = cluster.netns("node2");
        let before = view(&ns)?;
        ensure!(
            !before.vip,
            "node2 holds the VIP before tdscd ran: {before:?}"
        );
        start_and_check(cluster, "node2", &before)?;
        cluster.kill_daemon("node2")?;
        let crashed = view(&ns)?;
        ensure!(
            crashed.vip && crashed.mac == CLUSTER_MAC,
            "a SIGKILLed daemon cannot undo anything: {crashed:?}"
        );
        cluster.restart_daemon("node2", READY)?;
        let log = stop(cluster, "node2")?;
        let after = view(&ns)?;
        ensure!(
            after == before,
            "node2 after crash, restart and stop: {after:?}, before tdscd: {before:?}\n{log}"
        );

        // node3: SIGKILL, then what systemd runs next (ExecStopPost=).
        let ns = cluster.netns("node3");
        let before = view(&ns)?;
        start_and_check(cluster, "node3", &before)?;
        cluster.kill_daemon("node3")?;
        let config = cluster.node("node3")?.config.clone();
        let tdscd = BinDir::locate()?.path("tdscd")?;
        let out = netns::exec(
            &ns,
            &tdscd.display().to_string(),
            [
                "--config".to_owned(),
                config.display().to_string(),
                "--install-member-rules".to_owned(),
            ],
        )?;
        let after = view(&ns)?;
        ensure!(
            after == before,
            "node3 after crash and --install-member-rules ({out}): {after:?}, before: {before:?}"
        );
        let rules = netns::exec(&ns, "nft", ["list", "table", "inet", "tdsc"])?;
        ensure!(
            rules.contains("drop") && !rules.contains("queue"),
            "--install-member-rules left no member ruleset:\n{rules}"
        );
        Ok(())
    })
}

#[test]
fn a_vip_the_operator_configured_stays_through_crash_restart_and_stop() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("host_state_operator_vip") else {
        return Ok(());
    };
    run("tdsc-hostvip", |cluster| {
        let ns = cluster.netns("node2");
        netns::exec(&ns, "ip", ["addr", "add", VIP, "dev", "eth0"])?;
        let before = view(&ns)?;
        ensure!(before.vip, "the operator's VIP was not added: {before:?}");
        start_and_check(cluster, "node2", &before)?;
        cluster.kill_daemon("node2")?;
        cluster.restart_daemon("node2", READY)?;
        let log = stop(cluster, "node2")?;
        let after = view(&ns)?;
        ensure!(
            after == before,
            "node2 after crash, restart and stop: {after:?}, before tdscd: {before:?}\n{log}"
        );
        Ok(())
    })
}

#[test]
fn a_corrupt_host_state_file_is_kept_reported_and_does_not_stop_the_node() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("host_state_corrupt") else {
        return Ok(());
    };
    run("tdsc-hostbad", |cluster| {
        let node = cluster.node("node2")?.clone();
        let state = node.socket.with_extension("host-state");
        let aside = node.socket.with_extension("host-state.corrupt");
        let garbage = "{\"version\": 1, \"vip\": {\"interface\": \"eth0\", \"addr";
        let ns = cluster.netns("node2");

        // The one-shot command: the file stays as it is, the rules go in, the exit is non-zero.
        std::fs::write(&state, garbage)?;
        let tdscd = BinDir::locate()?.path("tdscd")?;
        let out = netns::exec(
            &ns,
            &tdscd.display().to_string(),
            [
                "--config".to_owned(),
                node.config.display().to_string(),
                "--install-member-rules".to_owned(),
            ],
        );
        let Err(netns::NetnsError::Command { stderr, .. }) = out else {
            anyhow::bail!("--install-member-rules with a corrupt record succeeded: {out:?}");
        };
        ensure!(
            stderr.contains("is not a tcp-dsc host record"),
            "unclear error: {stderr}"
        );
        ensure!(
            std::fs::read_to_string(&state)? == garbage,
            "record changed"
        );
        netns::exec(&ns, "nft", ["list", "table", "inet", "tdsc"])
            .context("the member ruleset is installed even so")?;

        // The daemon: moves it aside, says so, starts, and records afresh.
        let before = view(&ns)?;
        start_and_check(cluster, "node2", &before)?;
        ensure!(
            std::fs::read_to_string(&aside)? == garbage,
            "the corrupt record was not kept beside"
        );
        let log = cluster.daemon_log_tail("node2", 40);
        ensure!(
            log.contains("host state file unreadable"),
            "not reported:\n{log}"
        );
        ensure!(state.exists(), "no new record while tdscd runs");
        stop(cluster, "node2")?;
        let after = view(&ns)?;
        ensure!(after == before, "after stop: {after:?}, before: {before:?}");
        ensure!(!state.exists(), "record left after a clean stop");
        Ok(())
    })
}
