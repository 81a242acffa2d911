//! One TCP Fast Open key for the cluster, end to end with curl (root only; SKIP otherwise, a
//! failure under `CI=true`). Each test builds its own lab and removes it, also on failure.
//!
//! The lab's nodes normally accept data in a SYN without a cookie (`net.ipv4.tcp_fastopen`
//! with 0x200); here they require one (3) and the client sends data only with a cookie it
//! holds (1), as on real hosts. A client keeps one cookie per server address, the VIP, and
//! sends it to whichever node the master picks: the data is accepted in the SYN only if that
//! node's key made the cookie. With `[cluster] tcp_fastopen_key = "cluster"` (the default)
//! every node derives the same key from the cluster key; with `"keep"` each node's kernel has
//! a random key of its own, and round robin sends nearly every SYN to a node whose key did
//! not make the cookie: the reason the feature exists.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::{netns, nft};

/// curl requests per run; the first only fetches the cookie.
const REQUESTS: u64 = 21;

fn options(name: &str, key: &str) -> ClusterOptions {
    ClusterOptions {
        lab_name: Some(unique_lab_name(name)),
        policy: Some("round-robin".to_owned()),
        cluster_extra: vec![("tcp_fastopen_key".to_owned(), key.into())],
        ..ClusterOptions::default()
    }
}

fn passive(cluster: &Cluster) -> anyhow::Result<BTreeMap<u32, u64>> {
    cluster
        .nodes()
        .iter()
        .map(|n| {
            let c = nft::kernel_counters(&cluster.netns(&n.name))?;
            Ok((
                n.id,
                c.get("TcpExtTCPFastOpenPassive").copied().unwrap_or(0),
            ))
        })
        .collect()
}

/// Makes cookies required on the nodes and used by the client, then sends `REQUESTS`
/// sequential curl requests with `--tcp-fastopen` through the VIP. Returns how many had their
/// data accepted in the SYN (after the first), and the nodes that served them.
fn curl_run(cluster: &mut Cluster) -> anyhow::Result<(u64, BTreeMap<u32, u64>)> {
    for n in cluster.nodes() {
        netns::exec(
            &cluster.netns(&n.name),
            "sysctl",
            ["-qw", "net.ipv4.tcp_fastopen=3"],
        )?;
    }
    let client = cluster.client_namespaces()[0].clone();
    netns::exec(&client, "sysctl", ["-qw", "net.ipv4.tcp_fastopen=1"])?;
    let url = format!("http://{}/tfo", cluster.vip().ip());
    let mut served = BTreeMap::new();
    let mut before = BTreeMap::new();
    for i in 0..REQUESTS {
        if i == 1 {
            before = passive(cluster)?;
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &client, "curl", "-sS", "--tcp-fastopen"])
            .args(["--max-time", "3", &url])
            .output()
            .context("run curl (apt-get install curl)")?;
        let body = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "curl {i} failed: {}{body}",
            String::from_utf8_lossy(&out.stderr)
        );
        let node: u32 = body
            .lines()
            .find_map(|l| l.strip_prefix("node="))
            .context("reply without node=")?
            .trim()
            .parse()?;
        *served.entry(node).or_insert(0) += 1;
    }
    let after = passive(cluster)?;
    let accepted = after
        .iter()
        .map(|(id, n)| n - before.get(id).copied().unwrap_or(0))
        .sum();
    cluster.check_daemons()?;
    Ok((accepted, served))
}

/// With the cluster's key every node accepts the cookie any node issued: at least 90 % of the
/// requests after the first have their data accepted in the SYN, whichever of the three nodes
/// round robin picks. `status` names the key the TFO key comes from.
#[test]
fn a_fast_open_cookie_from_any_node_is_valid_on_all() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("a_fast_open_cookie_from_any_node_is_valid_on_all") else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&options("tdsc-tfo", "cluster"))?;
    let (accepted, served) = curl_run(&mut cluster)?;
    eprintln!(
        "cluster key: {accepted} of {} in the SYN, served {served:?}",
        REQUESTS - 1
    );
    ensure!(
        served.len() == 3,
        "served by {served:?}, not all three nodes"
    );
    ensure!(
        accepted * 10 >= (REQUESTS - 1) * 9,
        "only {accepted} of {} requests had their data accepted in the SYN",
        REQUESTS - 1
    );
    for n in cluster.nodes() {
        let st = cluster.status(&n.name)?;
        let f = st
            .cluster_key
            .tcp_fastopen
            .context("status shows no TCP Fast Open key")?;
        ensure!(f.primary == st.cluster_key.send, "{}: {f:?}", n.name);
    }
    cluster.teardown()?;
    Ok(())
}

/// With `tcp_fastopen_key = "keep"` each node keeps its own random key, and a cookie is
/// accepted only by the node that issued it: fewer than half of the requests get their data
/// in the SYN. What the test above would see without the feature.
#[test]
fn without_the_cluster_key_cookies_fail_on_other_nodes() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("without_the_cluster_key_cookies_fail_on_other_nodes") else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&options("tdsc-tfokeep", "keep"))?;
    let (accepted, served) = curl_run(&mut cluster)?;
    eprintln!(
        "kept keys: {accepted} of {} in the SYN, served {served:?}",
        REQUESTS - 1
    );
    ensure!(
        served.len() == 3,
        "served by {served:?}, not all three nodes"
    );
    ensure!(
        accepted * 2 < REQUESTS - 1,
        "{accepted} of {} requests had their data accepted in the SYN with per-node keys",
        REQUESTS - 1
    );
    let st = cluster.status(&cluster.nodes()[0].name)?;
    ensure!(
        st.cluster_key.tcp_fastopen.is_none(),
        "status shows a key set"
    );
    cluster.teardown()?;
    Ok(())
}
