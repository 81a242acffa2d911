//! `tdscd` refuses to start without a usable cluster key, before it touches anything (the key
//! is read first), naming the file and how to make one. Runs the real binary; needs no
//! privileges.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const CONFIG: &str = r#"
node_id = 1
[cluster]
vip = "192.0.2.1"
tcp_ports = [80]
client_interface = "eth0"
cluster_interface = "eth1"
key_file = "KEY"
[election]
mode = "static"
master = 1
[control]
socket = "DIR/tdscd.sock"
host_state = "DIR/host.state"
[[nodes]]
id = 1
address = "198.51.100.11"
"#;

/// Runs `tdscd` with the key at `key` (written with `mode` when `Some`); exit code and output.
fn start_with(tag: &str, mode: Option<u32>) -> (i32, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tdscd-key-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("cluster.key");
    if let Some(mode) = mode {
        std::fs::write(&key, tdsc_proto::seal::Keyring::generate_text(1).unwrap()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let config = dir.join("tdsc.toml");
    let text = CONFIG
        .replace("KEY", key.to_str().unwrap())
        .replace("DIR", dir.to_str().unwrap());
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tdscd"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        key,
    )
}

#[test]
fn a_missing_key_file_stops_the_start_and_says_how_to_make_one() {
    let (code, out, key) = start_with("missing", None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(key.to_str().unwrap()), "{out}");
    assert!(out.contains("tdscctl keygen"), "{out}");
    assert!(out.contains("cannot read"), "{out}");
}

#[test]
fn a_key_file_others_can_read_stops_the_start() {
    let (code, out, key) = start_with("open", Some(0o644));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(key.to_str().unwrap()), "{out}");
    assert!(out.contains("mode 0644"), "{out}");
    assert!(out.contains("tdscctl keygen"), "{out}");
}
