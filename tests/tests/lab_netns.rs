//! The lab without tcp-dsc: the topology realised as namespaces, HTTP servers running, only
//! the baseline server reachable from the clients; teardown leaves nothing behind, also when
//! the test panics. Root only: prints SKIP otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use tdsc_lab::cluster::{default_topology_path, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::lab::Lab;
use tdsc_lab::netns::root_or_skip;
use tdsc_lab::topology::Topology;
use tdsc_lab::{http, netns};

fn lab_namespaces(lab: &str) -> Vec<String> {
    let prefix = format!("clab-{lab}-");
    std::fs::read_dir(netns::NETNS_RUN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn lab_realises_the_topology_and_tears_it_down() -> anyhow::Result<()> {
    if !root_or_skip("lab_realises_the_topology_and_tears_it_down") {
        return Ok(());
    }
    let name = unique_lab_name("tdsc-lab");
    let topo = Topology::load(&default_topology_path())?.renamed(&name)?;
    let lab = Lab::realise(topo, false)?;
    let mut made = lab_namespaces(&name);
    made.sort();
    let expected: Vec<String> = [
        "br-client",
        "br-cluster",
        "client1",
        "client2",
        "node1",
        "node2",
        "node3",
        "plain",
    ]
    .iter()
    .map(|n| format!("clab-{name}-{n}"))
    .collect();
    assert_eq!(made, expected);

    // Addressing from the exec lines; node eth0 has none.
    let addrs = netns::exec(&lab.netns("node2"), "ip", ["-4", "-o", "addr", "show"])?;
    assert!(addrs.contains("198.51.100.12/24"), "{addrs}");
    assert!(!addrs.contains("eth0"), "{addrs}");
    let tfo = netns::exec(
        &lab.netns("client1"),
        "sysctl",
        ["-n", "net.ipv4.tcp_fastopen"],
    )?;
    assert_eq!(tfo.trim(), "5");
    // Bridge ports are enslaved in the bridge namespace.
    let ports = netns::exec(
        &lab.netns("br-client"),
        "ip",
        ["-o", "link", "show", "master", "br-client"],
    )?;
    assert_eq!(ports.lines().count(), 6, "{ports}");
    // Inter-node and client L2 reachability: nothing listens yet, so a reachable peer
    // refuses the connection (RST) while an unreachable one times out.
    for (from, to) in [("node1", "198.51.100.13:9"), ("client1", "192.0.2.2:9")] {
        let to: SocketAddr = to.parse()?;
        let r = netns::run_in(&lab.netns(from), || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
        })?;
        let kind = r.err().map(|e| e.kind());
        assert_eq!(
            kind,
            Some(std::io::ErrorKind::ConnectionRefused),
            "{from} -> {to}"
        );
    }

    lab.teardown().map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(lab_namespaces(&name).is_empty());
    Ok(())
}

#[test]
fn teardown_also_happens_on_panic() {
    if !root_or_skip("teardown_also_happens_on_panic") {
        return;
    }
    let name = unique_lab_name("tdsc-lab");
    let result = std::panic::catch_unwind(|| {
        let topo = Topology::load(&default_topology_path())
            .unwrap()
            .renamed(&name)
            .unwrap();
        let _lab = Lab::realise(topo, false).unwrap();
        assert!(!lab_namespaces(&name).is_empty());
        panic!("deliberate");
    });
    assert!(result.is_err());
    assert!(
        lab_namespaces(&name).is_empty(),
        "{:?}",
        lab_namespaces(&name)
    );
}

#[test]
fn without_daemons_only_the_baseline_serves() -> anyhow::Result<()> {
    if !root_or_skip("without_daemons_only_the_baseline_serves") {
        return Ok(());
    }
    let name = unique_lab_name("tdsc-lab");
    let cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(name.clone()),
        daemons: false,
        ..ClusterOptions::default()
    })?;
    let plain = SocketAddr::V4(cluster.baseline_addr().expect("baseline"));
    let vip = SocketAddr::V4(cluster.vip());
    let client = cluster.netns(&cluster.clients()[0].name);
    let (to_plain, to_vip) = netns::run_in(&client, || {
        let ok: Vec<_> = (0..20)
            .map(|_| http::get(plain, "/", Duration::from_secs(2)))
            .collect();
        (ok, http::get(vip, "/", Duration::from_millis(500)))
    })?;
    for r in to_plain {
        assert_eq!(r?.node, 0);
    }
    assert!(
        to_vip.is_err(),
        "nobody holds the VIP without tdscd: {to_vip:?}"
    );
    assert_eq!(cluster.served("plain")?, 20);
    assert_eq!(cluster.served("node1")?, 0);
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(lab_namespaces(&name).is_empty());
    Ok(())
}
