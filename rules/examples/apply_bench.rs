//! Measures how long installing a ruleset takes: `Firewall::apply` on one long-lived netlink
//! socket, on a fresh socket each time, and `nft -f` with the same member ruleset as text.
//!
//! ```bash
//! # as root
//! cargo run --release -p tdsc-rules --example apply_bench [ITERATIONS]
//! ```
//!
//! What it changes: it creates the network namespace `tdsc-rules-bench-<pid>` with two veth
//! pairs, installs rulesets there only, and deletes the namespace when it ends. Nothing in the
//! host's own namespace is touched. If it is killed midway, undo with
//! `ip netns del tdsc-rules-bench-<pid>`.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tdsc_rules::{ruleset, ClusterSpec, Firewall, Role, StaticHash};

struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

fn spec() -> ClusterSpec {
    ClusterSpec {
        vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        tcp_ports: vec![80, 443],
        client_interface: "eth0".into(),
        cluster_interface: "eth1".into(),
        members: (11..=13)
            .map(|n| IpAddr::V4(Ipv4Addr::new(198, 51, 100, n)))
            .collect(),
        queue_num: 0,
        control_port: 7400,
        former_members: vec![],
        egress_mac: Some([0x02, 0x00, 0x5e, 0x00, 0x53, 0x0b]),
        static_hash: StaticHash {
            index: 1,
            count: 3,
            seed: 0x2a,
        },
        syn_prefix_limit: None,
    }
}

/// Median and mean of the samples, in microseconds.
fn summary(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let median = samples[samples.len() / 2].as_secs_f64() * 1e6;
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64 * 1e6;
    (median, mean)
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .map_or(200, |n| n.parse().expect("ITERATIONS must be a number"));
    let name = format!("tdsc-rules-bench-{}", std::process::id());
    ip(&["netns", "add", &name]);
    let ns = Namespace(name);
    for dev in ["eth0", "eth1"] {
        let peer = format!("{dev}p");
        ip(&[
            "-n", &ns.0, "link", "add", dev, "type", "veth", "peer", "name", &peer,
        ]);
    }

    let path = format!("/var/run/netns/{}", ns.0);
    let (master, master_spaced, member_socket, fresh_socket, member_text) =
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());

            let mut fw = Firewall::open().expect("open");
            let facts = fw.probe().expect("probe");
            let master = ruleset(Role::Master, &spec(), &facts);
            let member = ruleset(Role::Member, &spec(), &facts);
            // Each closure returns the duration to record (usually the whole call).
            let time = |f: &mut dyn FnMut() -> Duration| -> Vec<Duration> {
                (0..iterations).map(|_| f()).collect()
            };
            let whole = |f: &mut dyn FnMut()| {
                let start = Instant::now();
                f();
                start.elapsed()
            };
            let master_t = time(&mut || whole(&mut || fw.apply(&master).expect("apply master")));
            // nft_compat's init waits for the previous transaction's deferred destructors, which
            // wait for an RCU grace period. Back to back that wait dominates; spaced out (as role
            // changes are) it is gone.
            let master_spaced_t = time(&mut || {
                std::thread::sleep(Duration::from_millis(50));
                let start = Instant::now();
                fw.apply(&master).expect("apply master");
                start.elapsed()
            });
            let member_t = time(&mut || whole(&mut || fw.apply(&member).expect("apply member")));
            let fresh_t = time(&mut || {
                whole(&mut || {
                    Firewall::open()
                        .and_then(|mut fw| fw.apply(&member))
                        .expect("apply on a fresh socket")
                })
            });
            fw.remove().expect("remove");
            (
                master_t,
                master_spaced_t,
                member_t,
                fresh_t,
                member.to_nft_text(),
            )
        })
        .join()
        .expect("bench thread");

    // The same replacement as one nft transaction: add+delete both tables, then the text.
    let script = format!(
        "table inet tdsc\ndelete table inet tdsc\ntable netdev tdsc\ndelete table netdev tdsc\n{member_text}"
    );
    let mut nft_t = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.0, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write");
        assert!(child.wait().expect("wait").success(), "nft -f failed");
        nft_t.push(start.elapsed());
    }

    let (mut master, mut master_spaced) = (master, master_spaced);
    let (mut member_socket, mut fresh_socket) = (member_socket, fresh_socket);
    let rows = [
        ("apply master, back to back", summary(&mut master)),
        ("apply master, 50 ms apart", summary(&mut master_spaced)),
        (
            "apply member, long-lived socket",
            summary(&mut member_socket),
        ),
        ("apply member, new socket each", summary(&mut fresh_socket)),
        (
            "nft -f member text (incl. ip netns exec)",
            summary(&mut nft_t),
        ),
    ];
    println!("{iterations} iterations each, microseconds");
    println!("{:<44} {:>10} {:>10}", "", "median", "mean");
    for (label, (median, mean)) in &rows {
        println!("{label:<44} {median:>10.1} {mean:>10.1}");
    }
    println!(
        "nft -f / apply member (long-lived socket), medians: {:.0}x",
        rows[4].1 .0 / rows[2].1 .0
    );
}
