//! Fixtures and namespace helpers shared by the integration tests.
//!
//! Only documentation addresses: VIP 192.0.2.1 (RFC 5737 TEST-NET-1), members
//! 198.51.100.11-13 (TEST-NET-2), and 2001:db8::/32 (RFC 3849) for IPv6.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tdsc_rules::{ClusterSpec, HostFacts, QueueBackend, Role, Ruleset, StaticHash, SynPrefixLimit};

pub const MEMBER_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x53, 0x0b];

pub fn spec_v4() -> ClusterSpec {
    ClusterSpec {
        vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        tcp_ports: vec![443, 80],
        client_interface: "eth0".into(),
        cluster_interface: "eth1".into(),
        members: (11..=13)
            .map(|n| IpAddr::V4(Ipv4Addr::new(198, 51, 100, n)))
            .collect(),
        queue_num: 0,
        control_port: 7400,
        former_members: vec![],
        egress_mac: Some(MEMBER_MAC),
        static_hash: StaticHash {
            index: 1,
            count: 3,
            seed: 0x2a,
        },
        syn_prefix_limit: None,
    }
}

pub fn spec_v6() -> ClusterSpec {
    ClusterSpec {
        vip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        members: (0x11..=0x13)
            .map(|n| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, n)))
            .collect(),
        ..spec_v4()
    }
}

/// The golden files' SYN limit: a burst other than nft's default of 5, so its text is printed.
pub const SYN_LIMIT: SynPrefixLimit = SynPrefixLimit {
    rate_per_second: 200,
    burst: 50,
    prefix_v4: 24,
    prefix_v6: 48,
};

/// `spec` with the SYN limit on.
pub fn with_syn_limit(spec: ClusterSpec, limit: SynPrefixLimit) -> ClusterSpec {
    ClusterSpec {
        syn_prefix_limit: Some(limit),
        ..spec
    }
}

pub const COMPAT: HostFacts = HostFacts {
    queue: QueueBackend::Compat,
};
pub const NATIVE: HostFacts = HostFacts {
    queue: QueueBackend::Native,
};

/// Every golden case: file stem and the ruleset it holds.
pub fn golden_cases() -> Vec<(&'static str, Ruleset)> {
    let v4 = spec_v4();
    let no_l2 = ClusterSpec {
        egress_mac: None,
        ..spec_v4()
    };
    let single = ClusterSpec {
        tcp_ports: vec![],
        egress_mac: None,
        members: vec![v4.members[0]],
        static_hash: StaticHash {
            index: 0,
            count: 1,
            seed: 0,
        },
        ..spec_v4()
    };
    let one_port = ClusterSpec {
        tcp_ports: vec![8080],
        ..no_l2.clone()
    };
    vec![
        (
            "master-compat",
            tdsc_rules::ruleset(Role::Master, &v4, &COMPAT),
        ),
        (
            "master-native",
            tdsc_rules::ruleset(Role::Master, &v4, &NATIVE),
        ),
        ("member", tdsc_rules::ruleset(Role::Member, &v4, &COMPAT)),
        (
            "member-no-l2",
            tdsc_rules::ruleset(Role::Member, &no_l2, &COMPAT),
        ),
        (
            "member-one-port",
            tdsc_rules::ruleset(Role::Member, &one_port, &COMPAT),
        ),
        (
            "member-single-node-all-ports",
            tdsc_rules::ruleset(Role::Member, &single, &COMPAT),
        ),
        (
            "master-ipv6-compat",
            tdsc_rules::ruleset(Role::Master, &spec_v6(), &COMPAT),
        ),
        (
            "member-ipv6",
            tdsc_rules::ruleset(Role::Member, &spec_v6(), &COMPAT),
        ),
        (
            "master-syn-limit-compat",
            tdsc_rules::ruleset(
                Role::Master,
                &with_syn_limit(v4.clone(), SYN_LIMIT),
                &COMPAT,
            ),
        ),
        (
            "master-ipv6-syn-limit-compat",
            tdsc_rules::ruleset(
                Role::Master,
                // nft's default burst, which it does not print.
                &with_syn_limit(
                    spec_v6(),
                    SynPrefixLimit {
                        burst: 5,
                        ..SYN_LIMIT
                    },
                ),
                &COMPAT,
            ),
        ),
    ]
}

pub fn golden_path(stem: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{stem}.nft"))
}

pub fn golden(stem: &str) -> String {
    let path = golden_path(stem);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    })
}

/// True when the namespace tests can run; prints why not otherwise. Under CI (`CI=true`) a
/// test that cannot do its work fails instead of skipping.
pub fn can_run_netns(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail(test, "needs root (network namespaces and nf_tables)");
        return false;
    }
    true
}

/// Prints a SKIPPED line, or panics under CI (`CI=true`), where no test may pass unrun.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| v == "true") {
        panic!("{test}: {why}, and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// A network namespace with interfaces `eth0` (client) and `eth1` (cluster), deleted on drop,
/// even when the test panics. They are veth pairs (peers `eth0p`, `eth1p` in the same
/// namespace) because this kernel has no dummy driver.
pub struct NetNs {
    pub name: String,
}

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

impl NetNs {
    /// An empty namespace with `lo` up.
    pub fn empty() -> NetNs {
        let name = format!(
            "tdsc-rules-test-{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        // From here on, Drop removes the namespace whatever happens.
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn new() -> NetNs {
        let ns = NetNs::empty();
        for dev in ["eth0", "eth1"] {
            let peer = format!("{dev}p");
            ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
            ns.ip(&["link", "set", dev, "up"]);
            ns.ip(&["link", "set", &peer, "up"]);
        }
        ns
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `nft ARGS` inside the namespace and returns stdout; panics on failure.
    pub fn nft(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, "nft"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Loads `text` with `nft -f -` inside the namespace.
    pub fn nft_load(&self, text: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write nft input");
        let out = child.wait_with_output().expect("wait nft");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs `f` on a fresh thread that has entered this namespace (setns affects only the
    /// calling thread), so a `Firewall` opened inside `f` talks to this namespace's nf_tables.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}", self.name);
        }
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packet counter of the rule whose comment contains `comment`, from an `nft list` text.
pub fn counter_of(listing: &str, comment: &str) -> u64 {
    let line = listing
        .lines()
        .find(|l| l.contains(comment))
        .unwrap_or_else(|| panic!("no rule commented {comment:?} in\n{listing}"));
    let rest = line
        .split("counter packets ")
        .nth(1)
        .unwrap_or_else(|| panic!("no counter in {line}"));
    rest.split(' ')
        .next()
        .unwrap()
        .parse()
        .expect("packet count")
}

/// Internet checksum (RFC 1071) over `data`, starting from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

/// An IPv4 packet (header checksum left 0: the kernel fills it for IP_HDRINCL sockets).
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap();
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A TCP SYN from `src:sport` to `dst:dport` with a correct TCP checksum (a wrong one would be
/// dropped by TCP and make a test pass for the wrong reason).
pub fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.extend_from_slice(&[5 << 4, 0x02]); // data offset 5 words, SYN
    tcp.extend_from_slice(&65535u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo, 0);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4_packet(src, dst, 6, &tcp)
}

/// Sends a complete IPv4 packet through an `IPPROTO_RAW` socket (IP_HDRINCL implied), in the
/// calling thread's namespace, the way the daemon re-injects forwarded SYNs.
pub fn send_raw(packet: &[u8], dst: Ipv4Addr) {
    // SAFETY: plain socket creation; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let addr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap(),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid fd, buffer and address of the right size.
    let n = unsafe {
        libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    assert_eq!(usize::try_from(n).ok(), Some(packet.len()), "sendto: {err}");
}
