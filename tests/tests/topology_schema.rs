//! The containerlab topology is valid against containerlab's own JSON schema, and the lab's
//! model reads what the cluster needs from it. No root needed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tdsc_lab::cluster::default_topology_path;
use tdsc_lab::topology::{Kind, Role, Topology, DAEMON_CONFIG_PATH};

/// containerlab's schema, vendored in `tests/data/containerlab/` with its licence (BSD-3).
fn schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/containerlab/clab.schema.json")
}

#[test]
fn topology_validates_against_the_containerlab_schema() -> anyhow::Result<()> {
    let schema_file = schema_path();
    // Fail, never skip: a missing schema means the check did not happen.
    let schema_text = std::fs::read_to_string(&schema_file)
        .with_context(|| format!("containerlab schema missing at {}", schema_file.display()))?;
    let schema: serde_json::Value = serde_json::from_str(&schema_text)?;
    let validator = jsonschema::draft7::new(&schema)
        .map_err(|e| anyhow::anyhow!("schema does not compile: {e}"))?;

    // Every topology shipped: the IPv4 lab and the IPv6 lab beside it.
    let ipv6 = default_topology_path().with_file_name("tdsc-v6.clab.yml");
    let mut topo = serde_json::Value::Null;
    for path in [default_topology_path(), ipv6] {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        topo = serde_yaml::from_str(&text)?;
        let errors: Vec<String> = validator
            .iter_errors(&topo)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{} violates the schema:\n{}",
            path.display(),
            errors.join("\n")
        );
    }

    // The validator really checks: a bad kind and an unknown key are refused.
    let mut broken = topo.clone();
    broken["topology"]["nodes"]["node1"]["kind"] = "no-such-kind".into();
    broken["topology"]["nodes"]["node2"]["colour"] = "blue".into();
    assert!(validator.iter_errors(&broken).count() >= 2);
    Ok(())
}

#[test]
fn topology_has_the_lab_shape() -> anyhow::Result<()> {
    let topo = Topology::load(&default_topology_path())?;
    assert_eq!(topo.name, "tdsc");
    assert_eq!(
        topo.nodes_with_role(Role::ClusterNode),
        ["node1", "node2", "node3"]
    );
    assert_eq!(topo.nodes_with_role(Role::Client), ["client1", "client2"]);
    assert_eq!(topo.nodes_with_role(Role::Baseline), ["plain"]);
    for bridge in ["br-client", "br-cluster"] {
        assert_eq!(topo.nodes[bridge].kind, Kind::Bridge);
    }
    for (i, name) in ["node1", "node2", "node3"].iter().enumerate() {
        let node = &topo.nodes[*name];
        let cfg = node
            .bind_for(DAEMON_CONFIG_PATH)
            .context("cluster node without tdscd config")?;
        assert!(cfg.is_file(), "{} missing", cfg.display());
        // eth0 has no address of its own (tdscd adds the VIP); eth1 is on the cluster net.
        let addrs = node.ipv4_addresses();
        assert_eq!(addrs.len(), 1, "{name}: {addrs:?}");
        assert_eq!(addrs[0].0.to_string(), format!("198.51.100.1{}", i + 1));
        assert_eq!((addrs[0].1, addrs[0].2.as_str()), (24, "eth1"));
        let peers: Vec<_> = topo.links_of(name).map(|l| l.b.node.as_str()).collect();
        assert_eq!(peers, ["br-client", "br-cluster"]);
    }
    assert_eq!(
        topo.nodes["plain"]
            .first_ipv4()
            .map(|a| a.to_string())
            .as_deref(),
        Some("192.0.2.2")
    );
    Ok(())
}
