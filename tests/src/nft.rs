//! Observation rules in client namespaces, and kernel counters of any namespace.
//!
//! [`install_client_probe`] adds one table, `inet tdsc_lab`, to a client namespace:
//!
//! ```text
//! table inet tdsc_lab {
//!     counter rst_in { }
//!     counter synack_in { }
//!     chain input {
//!         type filter hook input priority filter; policy accept;
//!         tcp flags & rst == rst counter name "rst_in"
//!         tcp flags & (syn | ack | rst | fin) == syn | ack counter name "synack_in"
//!     }
//! }
//! ```
//!
//! It only counts. `rst_in` proves that no server ever reset a client; `synack_in` counts the
//! SYN/ACKs that reached the client, one per connection if exactly one node answered each
//! SYN (a second node answering would show as an extra SYN/ACK, which the client's stack
//! then resets). [`drop_outgoing_rsts`] adds an output chain dropping the client's own RSTs,
//! for tests that send SYNs from a raw socket. The table disappears with the namespace.

use std::collections::HashMap;

use crate::netns::{self, NetnsError};

/// Table the lab adds to client namespaces.
pub const TABLE: &str = "tdsc_lab";

/// Why a counter could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot read counter {name}: {reason}")]
    Counter { name: String, reason: String },
    #[error("cannot read {path}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

const PROBE: &str = "
table inet tdsc_lab {
    counter rst_in { }
    counter synack_in { }
    chain input {
        type filter hook input priority filter; policy accept;
        tcp flags & rst == rst counter name \"rst_in\"
        tcp flags & (syn | ack | rst | fin) == syn | ack counter name \"synack_in\"
    }
}
";

const DROP_RST: &str = "
table inet tdsc_lab {
    chain output {
        type filter hook output priority filter; policy accept;
        tcp flags & rst == rst drop
    }
}
";

fn nft_apply(ns: &str, ruleset: &str) -> Result<(), NftError> {
    let path = std::env::temp_dir().join(format!("tdsc-lab-nft-{}-{ns}.nft", std::process::id()));
    std::fs::write(&path, ruleset).map_err(|source| NftError::Proc {
        path: path.display().to_string(),
        source,
    })?;
    let r = netns::exec(ns, "nft", ["-f".as_ref(), path.as_os_str()]);
    let _ = std::fs::remove_file(&path);
    r?;
    Ok(())
}

/// Installs the counting table (see the module docs) in a client namespace.
pub fn install_client_probe(ns: &str) -> Result<(), NftError> {
    nft_apply(ns, PROBE)
}

/// Drops every TCP RST the namespace sends.
pub fn drop_outgoing_rsts(ns: &str) -> Result<(), NftError> {
    nft_apply(ns, DROP_RST)
}

/// Drops the protocol-253 forwards arriving on `iface` at its ingress hook, before the
/// node's own rules and TCP see them (table `netdev tdsc_lab`). The dispatch benchmark uses
/// it on the members, so
/// that what it measures is the master's work and not the members' handshakes.
pub fn sink_forwards(ns: &str, iface: &str) -> Result<(), NftError> {
    nft_apply(
        ns,
        &format!(
            "table netdev {TABLE} {{
    chain ingress {{
        type filter hook ingress device \"{iface}\" priority -500; policy accept;
        ip protocol 253 drop
    }}
}}
"
        ),
    )
}

/// Table of [`sink_syns`].
const FLOOR_TABLE: &str = "tdsc_lab_floor";

/// Drops the client SYNs to `vip:port` arriving on `iface` at its ingress hook, before the
/// node's conntrack, rules and queue see them (the dispatch benchmark's floor: the same
/// frames, no dispatch). [`unsink_syns`] removes it.
pub fn sink_syns(ns: &str, iface: &str, vip: std::net::SocketAddrV4) -> Result<(), NftError> {
    let (ip, port) = (vip.ip(), vip.port());
    nft_apply(
        ns,
        &format!(
            "table netdev {FLOOR_TABLE} {{
    chain ingress {{
        type filter hook ingress device \"{iface}\" priority -500; policy accept;
        ip daddr {ip} tcp dport {port} tcp flags & (syn | ack) == syn drop
    }}
}}
"
        ),
    )
}

/// Removes what [`sink_syns`] added.
pub fn unsink_syns(ns: &str) -> Result<(), NftError> {
    netns::exec(ns, "nft", ["delete", "table", "netdev", FLOOR_TABLE])?;
    Ok(())
}

/// Packets counted by a named counter of the lab's table.
pub fn counter(ns: &str, name: &str) -> Result<u64, NftError> {
    let out = netns::exec(ns, "nft", ["-j", "list", "counter", "inet", TABLE, name])?;
    let bad = |reason: String| NftError::Counter {
        name: name.to_owned(),
        reason,
    };
    let json: serde_json::Value = serde_json::from_str(&out).map_err(|e| bad(e.to_string()))?;
    json["nftables"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find_map(|i| i.get("counter")?.get("packets")?.as_u64())
        })
        .ok_or_else(|| bad(format!("no packets in {out}")))
}

/// Both client counters: `(rst_in, synack_in)`.
pub fn client_counters(ns: &str) -> Result<(u64, u64), NftError> {
    Ok((counter(ns, "rst_in")?, counter(ns, "synack_in")?))
}

/// Both client counters summed over several client namespaces: `(rst_in, synack_in)`.
pub fn clients_counters(client_netns: &[String]) -> Result<(u64, u64), NftError> {
    let (mut rsts, mut synacks) = (0, 0);
    for ns in client_netns {
        let (r, s) = client_counters(ns)?;
        rsts += r;
        synacks += s;
    }
    Ok((rsts, synacks))
}

/// The namespace's SNMP and extended TCP counters (`/proc/net/snmp` and `/proc/net/netstat`,
/// as `nstat` names them: `TcpExtTCPFastOpenPassive`, `TcpInCsumErrors`, ...).
pub fn kernel_counters(ns: &str) -> Result<HashMap<String, u64>, NftError> {
    let files = netns::run_in(ns, || {
        // /proc/thread-self/net is the calling thread's namespace; /proc/net would be the
        // process's (the thread group leader's).
        ["snmp", "netstat"].map(|f| {
            let path = format!("/proc/thread-self/net/{f}");
            std::fs::read_to_string(&path).map_err(|source| NftError::Proc { path, source })
        })
    })?;
    let mut out = HashMap::new();
    for text in files {
        let text = text?;
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some((prefix, names)), Some((_, values))) =
                (names.split_once(':'), values.split_once(':'))
            else {
                continue;
            };
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if let Ok(v) = v.parse::<u64>() {
                    out.insert(format!("{prefix}{n}"), v);
                }
            }
        }
    }
    Ok(out)
}
