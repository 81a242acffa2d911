//! `tdscd --check-config`: exit 0 on a valid file; otherwise non-zero with a message naming the
//! key. Runs the real binary; needs no privileges.

use std::process::Command;

const GOOD: &str = r#"
node_id = 1
[cluster]
vip = "192.0.2.1"
tcp_ports = [80]
client_interface = "eth0"
cluster_interface = "eth1"
[scheduler]
policy = "round-robin"
[election]
mode = "static"
master = 1
[[nodes]]
id = 1
address = "198.51.100.11"
[[nodes]]
id = 2
address = "198.51.100.12"
"#;

fn check(text: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("tdscd-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // One file per call: tests run in parallel and several check the same text.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{n}.toml"));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tdscd"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn valid_config_exits_zero() {
    let (code, out) = check(GOOD);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok"), "{out}");
}

/// Under Raft the configured nodes are only the bootstrap set; the check says where the
/// membership lives after the first start.
#[test]
fn raft_config_names_the_bootstrap_set() {
    let raft = GOOD.replacen(
        "mode = \"static\"\nmaster = 1",
        "mode = \"raft\"\ndata_dir = \"/var/lib/tdsc-test\"",
        1,
    );
    let (code, out) = check(&raft);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 bootstrap nodes") && out.contains("/var/lib/tdsc-test/raft.state"),
        "{out}"
    );
    let (_, out) = check(GOOD);
    assert!(
        out.contains("2 nodes") && !out.contains("bootstrap"),
        "{out}"
    );
}

#[test]
fn invalid_configs_exit_nonzero_naming_the_key() {
    for (from, to, key) in [
        ("vip = \"192.0.2.1\"", "vip = \"not-an-ip\"", "cluster.vip"),
        (
            "policy = \"round-robin\"",
            "policy = \"fastest\"",
            "scheduler.policy",
        ),
        ("master = 1", "master = 5", "election.master"),
        ("tcp_ports = [80]", "tcp_ports = [0]", "cluster.tcp_ports"),
        ("node_id = 1", "node_id = 1\nnode_idd = 2", "node_idd"),
    ] {
        let (code, out) = check(&GOOD.replacen(from, to, 1));
        assert_ne!(code, 0, "accepted {to:?}: {out}");
        assert!(
            out.contains(key),
            "message for {to:?} does not name {key}: {out}"
        );
    }
}

#[test]
fn drain_timeout_is_checked_naming_its_key() {
    let (code, out) = check(&format!("{GOOD}\n[shutdown]\ndrain_timeout_ms = 20000\n"));
    assert_eq!(code, 0, "{out}");
    let (code, out) = check(&format!(
        "{GOOD}\n[shutdown]\ndrain_timeout_ms = 99999999\n"
    ));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("shutdown.drain_timeout_ms"), "{out}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_tdscd"))
        .args(["--config", "/nonexistent/tdsc.toml", "--check-config"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/tdsc.toml"));
}
