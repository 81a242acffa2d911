//! `tdscd --install-member-rules` / `--remove-rules`: what tdsc-safe-rules.service runs at boot
//! and the unit runs after the daemon stops. Runs the real binary in a throw-away network
//! namespace (needs root; skips with a message otherwise, fails under `CI=true`) and lists what the kernel holds.

use std::process::{Command, Output};

const CONFIG: &str = r#"
node_id = 2
[cluster]
vip = "192.0.2.1"
tcp_ports = [80, 443]
client_interface = "eth0"
cluster_interface = "eth1"
cluster_mac = "02:bf:c0:00:02:01"
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
[[nodes]]
id = 3
address = "198.51.100.13"
"#;

/// A network namespace deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("tdsc-safe-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        NetNs(name)
    }

    fn run(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(argv)
            .output()
            .unwrap()
    }

    fn ruleset(&self) -> String {
        let out = self.run(&["nft", "list", "ruleset"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = Command::new("nft").arg("--version").output().is_ok();
    if !root || !tools {
        // Under CI (`CI=true`) a test that cannot do its work fails instead of skipping.
        if std::env::var_os("CI").is_some_and(|v| v == "true") {
            panic!("{test}: needs root and nft, and CI=true forbids skipping");
        }
        eprintln!("SKIP {test}: needs root and nft");
    }
    root && tools
}

fn write_config(tag: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("tdscd-safe-{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn tdscd(ns: &NetNs, config: &std::path::Path, flag: &str) -> Output {
    ns.run(&[
        env!("CARGO_BIN_EXE_tdscd"),
        "--config",
        config.to_str().unwrap(),
        flag,
    ])
}

#[test]
fn install_member_rules_gives_the_member_ruleset_without_egress_and_remove_clears_it() {
    if !can_run("install_member_rules") {
        return;
    }
    let ns = NetNs::new("inst");
    let cfg = write_config("inst", CONFIG);
    let out = tdscd(&ns, &cfg, "--install-member-rules");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = ns.ruleset();
    // Client SYNs dropped on dispatched ports, foreign segments and RSTs dropped.
    assert!(
        listing.contains(
            "tcp dport { 80, 443 } tcp flags syn / fin,syn,rst,ack counter packets 0 bytes 0 drop"
        ),
        "{listing}"
    );
    assert!(
        listing.contains("ct state invalid counter packets 0 bytes 0 drop comment \"tdsc: segment of no connection this node tracks\""),
        "{listing}"
    );
    assert!(
        listing.contains("ct mark != 0x0dc50001 counter packets 0 bytes 0 drop comment \"tdsc: segment of a connection this node does not own\""),
        "{listing}"
    );
    assert!(
        listing
            .contains("oifname \"eth0\" ip saddr 192.0.2.1 meta l4proto tcp ct mark != 0x0dc50001"),
        "{listing}"
    );
    // No queue rule (member), no egress table (the device need not exist), and none of the
    // host changes the daemon makes.
    assert!(!listing.contains("queue"), "{listing}");
    assert!(!listing.contains("netdev"), "{listing}");
    let addrs = ns.run(&["ip", "-o", "addr"]);
    assert!(!String::from_utf8_lossy(&addrs.stdout).contains("192.0.2.1"));

    // Idempotent: a second run replaces the table atomically and gives the same listing.
    let again = tdscd(&ns, &cfg, "--install-member-rules");
    assert!(again.status.success());
    assert_eq!(ns.ruleset(), listing);

    // A user's own table survives removal.
    let user = ns.run(&["nft", "add", "table", "inet", "mine"]);
    assert!(user.status.success());
    let rm = tdscd(&ns, &cfg, "--remove-rules");
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    let after = ns.ruleset();
    assert!(!after.contains("tdsc"), "{after}");
    assert!(after.contains("table inet mine"), "{after}");
    // Removing what is absent succeeds, and needs no (valid) configuration.
    assert!(tdscd(&ns, &cfg, "--remove-rules").status.success());
    assert!(tdscd(
        &ns,
        std::path::Path::new("/nonexistent/tdsc.toml"),
        "--remove-rules"
    )
    .status
    .success());
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn install_member_rules_refuses_a_bad_config_and_installs_nothing() {
    if !can_run("install_member_rules_bad_config") {
        return;
    }
    let ns = NetNs::new("bad");
    let cfg = write_config(
        "bad",
        &CONFIG.replace("\"eth1\"", "\"an-interface-name-too-long\""),
    );
    let out = tdscd(&ns, &cfg, "--install-member-rules");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cluster_interface"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!ns.ruleset().contains("tdsc"));
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn flags_conflict_with_check_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_tdscd"))
        .args(["--check-config", "--install-member-rules"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
