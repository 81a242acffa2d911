//! No node ever answers a segment of a connection it does not own (paper §4.2.3), end to end on
//! a 3-node static-election lab (root only; SKIP otherwise). Each test builds its own lab and
//! removes it, also on failure.
//!
//! **Deterministic 4-tuple reuse.** A client binds one fixed source port. Connection 1 from it
//! is steered (weights) to node A and ends in one of the ways below; connection 2 from the same
//! port is then steered to node B. For every ordered pair (A, B) of distinct nodes, the master
//! included: connection 2 completes, moves data both ways and closes, and the client receives
//! no RST and no segment from any node but B (nodes are told apart by their masked source MACs,
//! `02:<id>:<VIP>`). The capture runs on the client's eth0 before its input hook.
//!
//! Endings of connection 1, each leaving A with a different stale state for the 4-tuple:
//! * client abortive close (`SO_LINGER {1, 0}`): A's conntrack entry is CLOSE;
//! * client FIN first: A's socket goes LAST_ACK → CLOSED, its conntrack entry TIME_WAIT;
//! * server FIN first: A keeps a TIME_WAIT *socket* (60 s), which answers any segment of
//!   that 4-tuple that reaches it with an ACK;
//! * server FIN first, the client's reset lost on the way (after it ACKed A's FIN): A keeps
//!   an orphaned FIN_WAIT2 socket (checked with `ss`), which answers the next connection's
//!   segments with an RST;
//! * A's SYN/ACK lost: the client gives up after 300 ms and connects again from the same
//!   port (a new ISN, so the master dispatches it afresh, to B), while A keeps a SYN-RECV
//!   request socket that retransmits its SYN/ACK after 1 s. Connection 2 stays open past
//!   that; a SYN/ACK from A that reached the client would draw its challenge ACK, and A's
//!   answer to that, an RST.
//!
//! The client namespace keeps no TIME_WAIT sockets of its own (`tcp_max_tw_buckets = 0`),
//! so that it may reuse the port at once after a close it initiated, as a client that closes
//! abortively does anyway.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterNode, ClusterOptions};
use tdsc_lab::netns;
use tdsc_lab::packet::{self, flags, Capture};

/// How connection 1 ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    ClientAbort,
    ClientFin,
    ServerFin,
    /// Server FIN first; the client then resets, and an nft rule in the client drops that RST.
    ServerFinResetLost,
    /// A's SYN/ACK is dropped at the client, which gives up and reconnects from the same port.
    SynAckLost,
}

/// One segment from the VIP that the client received.
#[derive(Debug, Clone)]
struct Seen {
    port: u16,
    /// 1 while connection 1 runs and settles, 2 from the first SYN of connection 2 on.
    phase: u8,
    mac: String,
    flags: u8,
    seq: u32,
    ack: u32,
}

fn mac_of(node: &ClusterNode, vip: std::net::Ipv4Addr) -> String {
    let o = vip.octets();
    let id = u8::try_from(node.id).expect("lab ids are small");
    packet::mac_string(&[2, id, o[0], o[1], o[2], o[3]])
}

fn flag_names(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (flags::SYN, 'S'),
        (flags::ACK, '.'),
        (flags::FIN, 'F'),
        (flags::RST, 'R'),
        (flags::PSH, 'P'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    s
}

/// Sets weight 1 on `to` and 0 on every other node (each on its own socket), then waits until
/// the master's view shows exactly that.
fn steer(cluster: &Cluster, to: &ClusterNode) -> anyhow::Result<()> {
    let master = cluster.master()?.clone();
    steer_among(cluster, to, cluster.nodes(), &master)
}

/// [`steer`] among `nodes` only (the live ones), as `master` sees them.
fn steer_among(
    cluster: &Cluster,
    to: &ClusterNode,
    nodes: &[ClusterNode],
    master: &ClusterNode,
) -> anyhow::Result<()> {
    for n in nodes {
        let w = if n.id == to.id { "1" } else { "0" };
        cluster.ctl(&n.name, &["weight", &n.id.to_string(), w])?;
    }
    let start = Instant::now();
    loop {
        let st = cluster.status(&master.name)?;
        let ok = nodes.iter().all(|n| {
            st.nodes
                .iter()
                .find(|s| s.id == n.id)
                .is_some_and(|s| (s.weight == 1) == (n.id == to.id) && s.alive)
        });
        if ok {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "master never showed the weights steering to {}: {:?}",
            to.name,
            st.nodes
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, v: &T) -> anyhow::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("small");
    // SAFETY: `v` is a live value whose size is passed alongside; the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(v).cast(),
            len,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A blocking connect to `vip` from local port `port` (SO_REUSEADDR), with timeouts.
fn connect_from(vip: SocketAddrV4, port: u16, timeout: Duration) -> anyhow::Result<TcpStream> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    setsockopt(&owned, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    setsockopt(&owned, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)?;
    setsockopt(&owned, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    let sa = |a: SocketAddrV4| {
        // SAFETY: sockaddr_in is plain old data; all-zero is valid.
        let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        s.sin_family = libc::sa_family_t::try_from(libc::AF_INET).expect("small");
        s.sin_port = a.port().to_be();
        s.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
        s
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).expect("16");
    let local = sa(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port));
    // SAFETY: `local` is a live sockaddr_in of the size passed.
    let rc = unsafe { libc::bind(owned.as_raw_fd(), std::ptr::from_ref(&local).cast(), len) };
    ensure!(
        rc == 0,
        "bind port {port}: {}",
        std::io::Error::last_os_error()
    );
    let remote = sa(vip);
    // SAFETY: `remote` is a live sockaddr_in of the size passed.
    let rc = unsafe { libc::connect(owned.as_raw_fd(), std::ptr::from_ref(&remote).cast(), len) };
    ensure!(
        rc == 0,
        "connect from port {port}: {}",
        std::io::Error::last_os_error()
    );
    Ok(TcpStream::from(owned))
}

/// Reads until `buf` ends with a line `node=N\n`; returns N.
fn read_node_line(s: &mut TcpStream) -> anyhow::Result<u32> {
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    loop {
        let n = s.read(&mut b).context("read the reply")?;
        ensure!(
            n > 0,
            "EOF before node=: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(rest) = text.split("node=").nth(1) {
            if let Some(id) = rest.split('\n').next().filter(|_| rest.contains('\n')) {
                return id.trim().parse().context("node id");
            }
        }
    }
}

fn read_to_eof(s: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).context("read to EOF")?;
    Ok(out)
}

/// Connection 1, ended as asked; returns the id of the node that served it.
fn first_connection(vip: SocketAddrV4, port: u16, ending: Ending) -> anyhow::Result<u32> {
    let mut s = connect_from(vip, port, Duration::from_secs(5))?;
    match ending {
        Ending::SynAckLost => unreachable!("connection 1 never completes"),
        Ending::ClientAbort | Ending::ClientFin => {
            s.write_all(b"GET /__echo HTTP/1.0\r\n\r\n")?;
            let id = read_node_line(&mut s)?;
            s.write_all(b"ping")?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).context("echo")?;
            if ending == Ending::ClientFin {
                s.shutdown(std::net::Shutdown::Write)?;
                read_to_eof(&mut s)?;
            } else {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: the fd is open (owned by `s`) and `linger` is live, size passed.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        std::ptr::from_ref(&linger).cast(),
                        libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("8"),
                    )
                };
                ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
            }
            Ok(id)
        }
        Ending::ServerFin | Ending::ServerFinResetLost => {
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let reply = read_to_eof(&mut s)?;
            let text = String::from_utf8_lossy(&reply);
            let id = text
                .split("node=")
                .nth(1)
                .and_then(|r| r.split('\n').next())
                .context("node= in the reply")?
                .parse()?;
            if ending == Ending::ServerFinResetLost {
                // ACK A's FIN now (a delayed ACK would die with the abort below, leaving A in
                // FIN_WAIT1 retransmitting its FIN on its own timer, which could reach the
                // client just as connection 2 starts): TCP_QUICKACK sends a pending ACK.
                let one: libc::c_int = 1;
                // SAFETY: the fd is open (owned by `s`) and `one` is live, size passed.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_QUICKACK,
                        std::ptr::from_ref(&one).cast(),
                        libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("4"),
                    )
                };
                ensure!(rc == 0, "TCP_QUICKACK: {}", std::io::Error::last_os_error());
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: as above.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        std::ptr::from_ref(&linger).cast(),
                        libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("8"),
                    )
                };
            }
            Ok(id)
        }
    }
}

/// Connection 2: request, data both ways, graceful close. Returns the serving node's id.
/// With `hold`, it idles that long and moves data once more.
fn second_connection(vip: SocketAddrV4, port: u16, hold: Option<Duration>) -> anyhow::Result<u32> {
    let mut s = connect_from(vip, port, Duration::from_secs(5))?;
    s.write_all(b"GET /__echo HTTP/1.0\r\n\r\n")?;
    let id = read_node_line(&mut s)?;
    let data: Vec<u8> = (0..3000u32)
        .map(|i| u8::try_from(i % 251).expect("< 251"))
        .collect();
    for round in 0..if hold.is_some() { 2 } else { 1 } {
        if round > 0 {
            std::thread::sleep(hold.unwrap_or_default());
        }
        s.write_all(&data)?;
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back)
            .with_context(|| format!("echo of 3000 bytes, round {round}"))?;
        ensure!(back == data, "echo differs");
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let rest = read_to_eof(&mut s)?;
    ensure!(rest.is_empty(), "bytes after the echo: {rest:?}");
    Ok(id)
}

/// Records every segment from `vip` that `client` receives on eth0, tagged with the test's
/// current phase, until `stop`.
fn capture_seen(
    client: &str,
    vip_ip: std::net::Ipv4Addr,
    phase: &Arc<AtomicU8>,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Vec<Seen>>>,
) -> std::thread::JoinHandle<Result<std::io::Result<()>, netns::NetnsError>> {
    let (phase, stop, seen) = (phase.clone(), stop.clone(), seen.clone());
    netns::spawn_in(client, move || -> std::io::Result<()> {
        let cap = Capture::open("eth0", Duration::from_millis(50))?;
        let mut buf = vec![0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            if let Some(f) = cap.recv(&mut buf)?.and_then(packet::parse_tcp_frame) {
                if f.src == vip_ip {
                    seen.lock().expect("not poisoned").push(Seen {
                        port: f.dport,
                        phase: phase.load(Ordering::SeqCst),
                        mac: packet::mac_string(&f.src_mac),
                        flags: f.flags,
                        seq: f.seq,
                        ack: f.ack,
                    });
                }
            }
        }
        Ok(())
    })
}

/// The segments of connection 2 on `port` from any node but B (`mac_b`), and any RST.
fn foreign_in_phase_2(seen: &Mutex<Vec<Seen>>, port: u16, mac_b: &str) -> Vec<String> {
    seen.lock()
        .expect("not poisoned")
        .iter()
        .filter(|s| s.port == port && s.phase == 2)
        .filter(|s| s.mac != mac_b || s.flags & flags::RST != 0)
        .map(|s| {
            format!(
                "{} {} seq {} ack {}",
                s.mac,
                flag_names(s.flags),
                s.seq,
                s.ack
            )
        })
        .collect()
}

const LOST_TABLE: &str = "tdsclab_exact";

/// Runs every ordered pair for one ending on a fresh lab; returns the failures found.
fn reuse_across_nodes(test: &str, ending: Ending, base_port: u16) -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab(test) else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-exact")),
        policy: Some("round-robin".to_owned()),
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let client = cluster.client_namespaces()[0].clone();
    netns::sysctl(&client, "net.ipv4.tcp_max_tw_buckets", "0")?;
    let vip = cluster.vip();
    let master = cluster.master()?.clone();
    eprintln!("master: {}", master.name);

    let phase = Arc::new(AtomicU8::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let cap = capture_seen(&client, *vip.ip(), &phase, &stop, &seen);
    std::thread::sleep(Duration::from_millis(100));

    let nodes: Vec<ClusterNode> = cluster.nodes().to_vec();
    let mut failures = Vec::new();
    let mut port = base_port;
    for a in &nodes {
        for b in &nodes {
            if a.id == b.id {
                continue;
            }
            port += 1;
            let pair = format!("{ending:?} A={} B={} port {port}", a.name, b.name);
            phase.store(1, Ordering::SeqCst);
            steer(&cluster, a)?;
            if ending == Ending::SynAckLost {
                // A's SYN/ACK never reaches the client, which gives up before its SYN
                // retransmission (1 s) and connects again from the same port.
                netns::exec(
                    &client,
                    "nft",
                    [format!(
                        "add table inet {LOST_TABLE}; \
                         add chain inet {LOST_TABLE} in {{ type filter hook input priority -400; policy accept; }}; \
                         add rule inet {LOST_TABLE} in tcp dport {port} ether saddr {} tcp flags & (syn | ack) == syn | ack drop",
                        mac_of(a, *vip.ip())
                    )],
                )?;
                let first = netns::run_in(&client, || {
                    connect_from(vip, port, Duration::from_millis(300)).map(drop)
                })?;
                netns::exec(&client, "nft", [format!("delete table inet {LOST_TABLE}")])?;
                if first.is_ok() {
                    failures.push(format!("{pair}: connection 1 completed without a SYN/ACK"));
                    continue;
                }
                steer(&cluster, b)?;
                phase.store(2, Ordering::SeqCst);
                match netns::run_in(&client, || {
                    second_connection(vip, port, Some(Duration::from_millis(1500)))
                })? {
                    Ok(id) if id == b.id => {}
                    other => failures.push(format!(
                        "{pair}: connection 2 {other:?}, wanted node {}",
                        b.id
                    )),
                }
            } else {
                if ending == Ending::ServerFinResetLost {
                    netns::exec(
                        &client,
                        "nft",
                        [format!(
                            "add table inet {LOST_TABLE}; \
                             add chain inet {LOST_TABLE} out {{ type filter hook output priority -400; policy accept; }}; \
                             add rule inet {LOST_TABLE} out tcp sport {port} tcp flags & rst == rst drop"
                        )],
                    )?;
                }
                match netns::run_in(&client, || first_connection(vip, port, ending))? {
                    Ok(id) if id == a.id => {}
                    other => {
                        failures.push(format!(
                            "{pair}: connection 1 {other:?}, wanted node {}",
                            a.id
                        ));
                        continue;
                    }
                }
                // Let connection 1 settle: the last ACKs of the close reach A.
                std::thread::sleep(Duration::from_millis(50));
                if ending == Ending::ServerFinResetLost {
                    // The state this ending is about: A holds an orphaned FIN_WAIT2 socket.
                    let ns = cluster.netns(&a.name);
                    let filter = format!("( sport = :{} and dport = :{port} )", vip.port());
                    let out =
                        netns::exec(&ns, "ss", ["-Htn", "state", "fin-wait-2", filter.as_str()])?;
                    if out.trim().is_empty() {
                        failures.push(format!("{pair}: A holds no FIN_WAIT2 socket for the port"));
                        continue;
                    }
                }
                if ending == Ending::ServerFinResetLost {
                    netns::exec(&client, "nft", [format!("delete table inet {LOST_TABLE}")])?;
                }
                steer(&cluster, b)?;
                phase.store(2, Ordering::SeqCst);
                match netns::run_in(&client, || second_connection(vip, port, None))? {
                    Ok(id) if id == b.id => {}
                    other => failures.push(format!(
                        "{pair}: connection 2 {other:?}, wanted node {}",
                        b.id
                    )),
                }
            }
            // Late answers (an RST to the client's FIN, a TIME_WAIT ack) come within ms.
            std::thread::sleep(Duration::from_millis(150));
            let mac_b = mac_of(b, *vip.ip());
            let foreign = foreign_in_phase_2(&seen, port, &mac_b);
            if !foreign.is_empty() {
                failures.push(format!(
                    "{pair}: segments not from B ({mac_b}) or RSTs: {foreign:?}"
                ));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let cap = cap.join();
    cluster.check_daemons()?;
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))?;
    match cap {
        Ok(Ok(Ok(()))) => {}
        other => bail!("capture: {other:?}"),
    }
    if !failures.is_empty() {
        bail!(
            "{} of 6 pairs failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

#[test]
fn reuse_after_client_abortive_close() -> anyhow::Result<()> {
    reuse_across_nodes(
        "reuse_after_client_abortive_close",
        Ending::ClientAbort,
        42000,
    )
}

#[test]
fn reuse_after_client_fin_first() -> anyhow::Result<()> {
    reuse_across_nodes("reuse_after_client_fin_first", Ending::ClientFin, 42100)
}

#[test]
fn reuse_while_the_old_owner_is_in_time_wait() -> anyhow::Result<()> {
    reuse_across_nodes(
        "reuse_while_the_old_owner_is_in_time_wait",
        Ending::ServerFin,
        42200,
    )
}

#[test]
fn reuse_while_the_old_owner_is_in_fin_wait() -> anyhow::Result<()> {
    reuse_across_nodes(
        "reuse_while_the_old_owner_is_in_fin_wait",
        Ending::ServerFinResetLost,
        42300,
    )
}

#[test]
fn retransmitted_syn_while_the_first_holds_syn_recv() -> anyhow::Result<()> {
    reuse_across_nodes(
        "retransmitted_syn_while_the_first_holds_syn_recv",
        Ending::SynAckLost,
        42400,
    )
}

/// The bridge-side end of `node`'s `iface`: (bridge node, its port), from the topology.
fn bridge_port(cluster: &Cluster, node: &str, iface: &str) -> anyhow::Result<(String, String)> {
    cluster
        .lab()
        .topology()
        .links
        .iter()
        .find_map(|l| {
            let (ours, theirs) = if l.a.node == node {
                (&l.a, &l.b)
            } else {
                (&l.b, &l.a)
            };
            (ours.node == node && ours.interface == iface)
                .then(|| (theirs.node.clone(), theirs.interface.clone()))
        })
        .with_context(|| format!("no link of {node}:{iface}"))
}

/// A late copy of a forwarded SYN. Each connection is steered to a member B; once the client
/// has B's SYN/ACK, the client's own SYN (captured on its bridge port, checksum made whole)
/// is sent again into B's client interface alone: what B sees when the master's forward of a
/// SYN overtakes B's own copy from the bridge flood (the forward needs two daemon wake-ups,
/// the flood only a softirq, but a softirq can wait for `ksoftirqd` on a busy host). B must
/// keep the connection: the request and an echo both ways complete, and B drops no segment
/// of it as not owned. Before the `given` set, the copy took B's ownership mark off and every
/// connection stalled (`not_owned_in` grew by its data and retransmissions).
#[test]
fn a_late_copy_of_a_forwarded_syn_leaves_the_member_its_connection() -> anyhow::Result<()> {
    const ROUNDS: u16 = 4;
    let Some(_lock) =
        exclusive_lab("a_late_copy_of_a_forwarded_syn_leaves_the_member_its_connection")
    else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-late")),
        policy: Some("round-robin".to_owned()),
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let result = (|| -> anyhow::Result<()> {
        let client_host = cluster.clients()[0].name.clone();
        let client = cluster.netns(&client_host);
        let vip = cluster.vip();
        let master = cluster.master()?.clone();
        let member = cluster
            .nodes()
            .iter()
            .find(|n| n.id != master.id)
            .context("a member")?
            .clone();
        steer(&cluster, &member)?;
        let (bridge, client_port) = bridge_port(&cluster, &client_host, "eth0")?;
        let (bridge_b, member_port) = bridge_port(&cluster, &member.name, "eth0")?;
        ensure!(bridge == bridge_b, "client and member on different bridges");
        let bridge_ns = cluster.netns(&bridge);
        let (from_client, to_member) = netns::run_in(&bridge_ns, || -> anyhow::Result<_> {
            Ok((
                Capture::open(&client_port, Duration::from_millis(200))?,
                Capture::open(&member_port, Duration::from_millis(200))?,
            ))
        })??;
        let not_owned = |c: &Cluster| -> anyhow::Result<u64> {
            Ok(c.status(&member.name)?.counters.drops.not_owned_in)
        };
        let before = not_owned(&cluster)?;
        let mut failures = Vec::new();
        for port in 42700..42700 + ROUNDS {
            let stream =
                netns::run_in(&client, || connect_from(vip, port, Duration::from_secs(3)))??;
            // The client's SYN, as its bridge port received it.
            let mut buf = vec![0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(2);
            let syn = loop {
                ensure!(
                    Instant::now() < deadline,
                    "port {port}: the client's SYN not seen"
                );
                let Some(f) = from_client.recv(&mut buf)? else {
                    continue;
                };
                let is_syn = packet::parse_tcp_frame(f).is_some_and(|t| {
                    t.sport == port && t.flags & (flags::SYN | flags::ACK) == flags::SYN
                });
                if is_syn {
                    break f.to_vec();
                }
            };
            to_member.send(&with_tcp_checksum(syn)?)?;
            let mut s = stream;
            let served = (|| -> anyhow::Result<u32> {
                s.write_all(b"GET /__echo HTTP/1.0\r\n\r\n")?;
                let id = read_node_line(&mut s)?;
                s.write_all(b"ping")?;
                let mut b = [0u8; 4];
                s.read_exact(&mut b).context("echo")?;
                ensure!(&b == b"ping", "echo differs: {b:?}");
                Ok(id)
            })();
            match served {
                Ok(id) if id == member.id => {}
                other => {
                    failures.push(format!("port {port}: {other:?}, wanted node {}", member.id))
                }
            }
        }
        let grown = not_owned(&cluster)? - before;
        ensure!(
            failures.is_empty() && grown == 0,
            "{} of {ROUNDS} connections failed after a late copy of their SYN reached {} \
             (its not_owned_in grew by {grown}):\n{}",
            failures.len(),
            member.name,
            failures.join("\n")
        );
        cluster.check_daemons()?;
        Ok(())
    })();
    let teardown = cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"));
    result?;
    teardown
}

/// `frame` (Ethernet, IPv4, TCP) with its TCP checksum computed in full: a veth hands the
/// sender's frames on with only the pseudo-header summed, and a receiver that verifies the
/// checksum (conntrack does) would take the frame as corrupt.
fn with_tcp_checksum(mut frame: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let t = packet::parse_tcp_frame(&frame).context("not IPv4/TCP")?;
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let tcp = 14 + ihl;
    ensure!(
        frame.len() >= 14 + total && total > ihl + 20,
        "truncated frame"
    );
    frame.truncate(14 + total);
    frame[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
    let sum = packet::tcp_checksum_v4(t.src, t.dst, &frame[tcp..]);
    frame[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
    Ok(frame)
}

/// The deterministic reuse across a failover, under Raft. Connection 1 from a fixed port is
/// steered to the master A and ends one way, leaving A its stale state; then A's daemon is
/// SIGKILLed (A's TCP stack and ruleset stay). Once a successor M dispatches, connection 2
/// from the same port is steered to B, M itself for some endings and the remaining member for
/// the others, and must complete, move data both ways and close with no segment from any node
/// but B reaching the client. A's daemon is restarted before the next ending.
#[test]
fn reuse_of_a_killed_masters_ports_after_the_takeover() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("reuse_of_a_killed_masters_ports_after_the_takeover") else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-exrf")),
        policy: Some("round-robin".to_owned()),
        raft: true,
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")?;
    let client = cluster.client_namespaces()[0].clone();
    netns::sysctl(&client, "net.ipv4.tcp_max_tw_buckets", "0")?;
    let vip = cluster.vip();
    let phase = Arc::new(AtomicU8::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let cap = capture_seen(&client, *vip.ip(), &phase, &stop, &seen);
    std::thread::sleep(Duration::from_millis(100));
    let endings = [
        Ending::ClientAbort,
        Ending::ServerFin,
        Ending::ServerFinResetLost,
        Ending::ClientFin,
    ];
    let mut failures = Vec::new();
    let run = |cluster: &mut Cluster, failures: &mut Vec<String>| -> anyhow::Result<()> {
        for (k, ending) in endings.iter().copied().enumerate() {
            let port = 42500 + u16::try_from(k).expect("4 endings");
            let a = cluster
                .wait_master(None, Duration::from_secs(5))
                .context("a master")?;
            steer_among(cluster, &a, cluster.nodes(), &a)?;
            phase.store(1, Ordering::SeqCst);
            if ending == Ending::ServerFinResetLost {
                netns::exec(
                    &client,
                    "nft",
                    [format!(
                        "add table inet {LOST_TABLE}; \
                         add chain inet {LOST_TABLE} out {{ type filter hook output priority -400; policy accept; }}; \
                         add rule inet {LOST_TABLE} out tcp sport {port} tcp flags & rst == rst drop"
                    )],
                )?;
            }
            let first = netns::run_in(&client, || first_connection(vip, port, ending))?;
            std::thread::sleep(Duration::from_millis(50));
            if ending == Ending::ServerFinResetLost {
                netns::exec(&client, "nft", [format!("delete table inet {LOST_TABLE}")])?;
            }
            let pair = format!("{ending:?} A={} port {port}", a.name);
            match first {
                Ok(id) if id == a.id => {}
                other => {
                    failures.push(format!("{pair}: connection 1 {other:?}, wanted {}", a.id));
                    continue;
                }
            }
            cluster.kill_daemon(&a.name)?;
            let m = cluster
                .wait_master(Some(&a.name), Duration::from_secs(5))
                .context("no successor after SIGKILL")?;
            cluster.wait_liveness(&m.name, a.id, false)?;
            let live: Vec<ClusterNode> = cluster
                .nodes()
                .iter()
                .filter(|n| n.id != a.id)
                .cloned()
                .collect();
            let b = if k % 2 == 0 {
                m.clone()
            } else {
                live.iter()
                    .find(|n| n.id != m.id)
                    .context("a third node")?
                    .clone()
            };
            steer_among(cluster, &b, &live, &m)?;
            phase.store(2, Ordering::SeqCst);
            match netns::run_in(&client, || second_connection(vip, port, None))? {
                Ok(id) if id == b.id => {}
                other => failures.push(format!(
                    "{pair} M={} B={}: connection 2 {other:?}, wanted {}",
                    m.name, b.name, b.id
                )),
            }
            std::thread::sleep(Duration::from_millis(150));
            let mac_b = mac_of(&b, *vip.ip());
            let foreign = foreign_in_phase_2(&seen, port, &mac_b);
            if !foreign.is_empty() {
                failures.push(format!(
                    "{pair} M={} B={}: segments not from B ({mac_b}) or RSTs: {foreign:?}",
                    m.name, b.name
                ));
            }
            cluster.restart_daemon(&a.name, Duration::from_secs(15))?;
            cluster.wait_liveness(&m.name, a.id, true)?;
        }
        Ok(())
    };
    let result = run(&mut cluster, &mut failures);
    stop.store(true, Ordering::Relaxed);
    let cap = cap.join();
    let alive = result.and_then(|()| Ok(cluster.check_daemons()?));
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))?;
    alive?;
    match cap {
        Ok(Ok(Ok(()))) => {}
        other => bail!("capture: {other:?}"),
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} endings failed:\n{}",
            failures.len(),
            endings.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// What one client's loop saw.
#[derive(Debug, Default)]
struct LoopTally {
    connects: u64,
    /// connect() itself failed (refused, reset or timed out before the handshake completed).
    connect_failures: u64,
    /// A connection that completed its handshake failed afterwards.
    failures: u64,
    sample_errors: Vec<String>,
    over_100ms: u64,
    over_1s: u64,
    slowest: Duration,
}

/// `n` sequential connects to `vip` from ephemeral ports, or fewer if `stop` is set first.
/// `abortive`: close at once with `SO_LINGER {1, 0}` (the server then reads an RST); otherwise
/// send a request, read the reply to EOF and close (the server closes first).
fn connect_loop(vip: SocketAddrV4, n: u64, abortive: bool, stop: &AtomicBool) -> LoopTally {
    let mut t = LoopTally::default();
    for _ in 0..n {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let start = Instant::now();
        let r = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5));
        let took = start.elapsed();
        t.connects += 1;
        t.slowest = t.slowest.max(took);
        if took > Duration::from_millis(100) {
            t.over_100ms += 1;
        }
        if took > Duration::from_secs(1) {
            t.over_1s += 1;
        }
        let r = match r {
            Ok(s) => s,
            Err(e) => {
                t.connect_failures += 1;
                if t.sample_errors.len() < 5 {
                    t.sample_errors
                        .push(format!("connect, after {took:?}: {e}"));
                }
                continue;
            }
        };
        let outcome = Ok(r).and_then(|mut s: TcpStream| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            if abortive {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: the fd is open (owned by `s`) and `linger` is live, size passed.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        std::ptr::from_ref(&linger).cast(),
                        libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("8"),
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            } else {
                s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut reply = Vec::new();
                s.read_to_end(&mut reply)?;
                if String::from_utf8_lossy(&reply).contains("node=") {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!("reply {reply:?}")))
                }
            }
        });
        if let Err(e) = outcome {
            t.failures += 1;
            if t.sample_errors.len() < 5 {
                t.sample_errors.push(format!("after {took:?}: {e}"));
            }
        }
    }
    t
}

/// Every segment from the VIP a client received, judged against the node that sent the last
/// SYN/ACK to that client port: a segment from any other node is foreign.
#[derive(Debug, Default)]
struct WireTally {
    frames: u64,
    /// RSTs from the port's owner. An abortive client's ACK (sent from the softirq that took
    /// the SYN/ACK) and its RST (sent from the thread) can leave on different CPUs and reach
    /// the owner reordered; the owner's listener then answers the late ACK with an RST that
    /// the client, whose socket is gone, ignores.
    owner_rsts: u64,
    foreign: u64,
    samples: Vec<String>,
}

/// Captures what a client namespace receives from `vip` on eth0 until `stop`, judging every
/// segment against the node that sent the port's last SYN/ACK (see [`WireTally`]).
fn capture_wire(
    ns: &str,
    vip_ip: std::net::Ipv4Addr,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<std::io::Result<WireTally>, netns::NetnsError>> {
    let stop = stop.clone();
    netns::spawn_in(ns, move || -> std::io::Result<WireTally> {
        let cap = Capture::open("eth0", Duration::from_millis(50))?;
        // A lost SYN/ACK would leave a port's previous owner on record.
        cap.set_recv_buffer(64 << 20)?;
        let mut owner: std::collections::HashMap<u16, [u8; 6]> = Default::default();
        let mut t = WireTally::default();
        let mut buf = vec![0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            let Some(f) = cap.recv(&mut buf)?.and_then(packet::parse_tcp_frame) else {
                continue;
            };
            if f.src != vip_ip {
                continue;
            }
            t.frames += 1;
            if f.is_syn_ack() {
                owner.insert(f.dport, f.src_mac);
                continue;
            }
            let rst = f.flags & flags::RST != 0;
            let other = owner.get(&f.dport).is_none_or(|m| *m != f.src_mac);
            t.owner_rsts += u64::from(rst && !other);
            if other {
                t.foreign += 1;
                if t.samples.len() < 10 {
                    t.samples.push(format!(
                        "port {} from {} {} seq {} ack {}",
                        f.dport,
                        packet::mac_string(&f.src_mac),
                        flag_names(f.flags),
                        f.seq,
                        f.ack
                    ));
                }
            }
        }
        Ok(t)
    })
}

/// Steady state, no failover: 20,000 sequential connects with abortive close from client1 and
/// 20,000 with graceful close from client2 at the same time. Ephemeral ports are reused after
/// about 14,000 connects (Linux steps the port by 2 over 32768–60999), so every stale state of
/// the abortive and graceful closes meets a new connection on another node. No connect may
/// fail, none may take a SYN retransmission (1 s), and no node but a connection's owner may
/// send the client anything (the capture cannot tell a reordered segment of the owner's own
/// connection from a stale one, so RSTs from the owner are counted and printed, not failed).
#[test]
fn stress_20000_abortive_and_20000_graceful_connects() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("stress_20000_abortive_and_20000_graceful_connects") else {
        return Ok(());
    };
    let per_client: u64 = std::env::var("TDSC_STRESS_CONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-stress")),
        policy: Some("round-robin".to_owned()),
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let clients = cluster.client_namespaces();
    ensure!(clients.len() == 2, "two clients: {clients:?}");
    let vip = cluster.vip();
    let stop = Arc::new(AtomicBool::new(false));
    let captures: Vec<_> = clients
        .iter()
        .map(|ns| capture_wire(ns, *vip.ip(), &stop))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let loops: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let never = AtomicBool::new(false);
            netns::spawn_in(ns, move || connect_loop(vip, per_client, i == 0, &never))
        })
        .collect();
    let mut tallies = Vec::new();
    for h in loops {
        tallies.push(h.join().map_err(|_| anyhow::anyhow!("loop panicked"))??);
    }
    let took = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut wire = Vec::new();
    for h in captures {
        wire.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("capture panicked"))???,
        );
    }
    let mut status = Vec::new();
    for n in cluster.nodes() {
        status.push((n.name.clone(), cluster.status(&n.name)?.counters));
    }
    cluster.check_daemons()?;
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "{} connects per client in {took:?}\nabortive: {:?}\ngraceful: {:?}\nwire: {:?}\n{status:?}",
        per_client, tallies[0], tallies[1], wire
    );
    for (t, kind) in tallies.iter().zip(["abortive", "graceful"]) {
        ensure!(
            t.failures == 0 && t.connect_failures == 0,
            "{kind}: {} failed connects, {} failed connections, e.g. {:?}",
            t.connect_failures,
            t.failures,
            t.sample_errors
        );
        ensure!(
            t.over_1s == 0,
            "{kind}: {} connects took over 1 s (slowest {:?})",
            t.over_1s,
            t.slowest
        );
    }
    for (name, c) in &status {
        ensure!(
            c.drops.queue_kernel == 0 && c.drops.queue_user == 0,
            "{name}: SYNs lost before the daemon: {:?}",
            c.drops
        );
    }
    for (w, ns) in wire.iter().zip(&clients) {
        ensure!(
            w.foreign == 0,
            "{ns}: {} segments from a non-owner, e.g. {:?}",
            w.foreign,
            w.samples
        );
    }
    Ok(())
}

/// A NAT gateway's view: 8 threads from one address, each cycling its own 8 of 64 explicit
/// source ports, each connection a request and its reply, for 20 s (`TDSC_NAT_SECS`) with
/// round robin, so that every port is reused within milliseconds on whichever node comes
/// next; then 20 s more with every connection steered to the master, so that nearly every SYN
/// meets the master's TIME_WAIT socket of the same 4-tuple. No request may fail. (The second
/// phase is what found the master's NFQUEUE ACCEPT resetting about one connection in 300k;
/// see `tdscd::datapath::syn_path`.) A connect the client's own stack refuses because the previous connection on that
/// port is still closing locally (EADDRNOTAVAIL) is counted and retried on the next port, as a
/// gateway would; it never reaches the cluster.
#[test]
fn nat_like_client_reuses_64_ports_from_8_threads() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("nat_like_client_reuses_64_ports_from_8_threads") else {
        return Ok(());
    };
    let secs: u64 = std::env::var("TDSC_NAT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-nat")),
        policy: Some("round-robin".to_owned()),
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let client = cluster.client_namespaces()[0].clone();
    let vip = cluster.vip();
    let mut phases = Vec::new();
    phases.push(("round robin", nat_phase(&client, vip, secs)?));
    let master = cluster.master()?.clone();
    steer(&cluster, &master)?;
    phases.push(("all to the master", nat_phase(&client, vip, secs)?));
    let mut drops = Vec::new();
    for n in cluster.nodes() {
        drops.push((n.name.clone(), cluster.status(&n.name)?.counters.drops));
    }
    cluster.check_daemons()?;
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("{drops:?}");
    for (what, (ok, busy, failed)) in &phases {
        eprintln!(
            "{what}: {ok} requests served, {busy} ports busy locally, {} failed",
            failed.len()
        );
    }
    for (what, (ok, _, failed)) in &phases {
        ensure!(*ok > 0, "{what}: nothing served");
        ensure!(
            failed.is_empty(),
            "{what}: {} of {} requests failed, e.g. {:?}",
            failed.len(),
            ok + failed.len() as u64,
            &failed[..failed.len().min(5)]
        );
    }
    Ok(())
}

/// What the NAT-like threads saw.
#[derive(Debug, Default)]
struct NatTally {
    ok: u64,
    /// Connects the client's own stack refused (EADDRNOTAVAIL): never reached the cluster.
    busy: u64,
    /// connect() failed otherwise (refused, reset, timed out before the handshake completed).
    connect_failed: Vec<String>,
    /// Connections that completed their handshake and then failed.
    failed: Vec<String>,
}

/// The NAT-like load from `client` until `stop`: 8 threads, each cycling its own 8 of 64
/// explicit source ports, each connection a request and its reply.
fn nat_load(client: &str, vip: SocketAddrV4, stop: &Arc<AtomicBool>) -> anyhow::Result<NatTally> {
    const BASE: u16 = 43000;
    let threads: Vec<_> = (0..8u16)
        .map(|t| {
            let stop = stop.clone();
            netns::spawn_in(client, move || {
                let mut tally = NatTally::default();
                let mut k = 0u16;
                while !stop.load(Ordering::Relaxed) {
                    let port = BASE + t + 8 * (k % 8);
                    k = k.wrapping_add(1);
                    match tdsc_lab::http::get_from_port(vip, port, "/", Duration::from_secs(5)) {
                        Ok(_) => tally.ok += 1,
                        Err(tdsc_lab::http::HttpError::Connect { source, .. })
                            if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
                        {
                            tally.busy += 1;
                        }
                        Err(e @ tdsc_lab::http::HttpError::Connect { .. }) => tally
                            .connect_failed
                            .push(format!("port {port}: {}", tdsc_lab::error_chain(&e))),
                        Err(e) => tally
                            .failed
                            .push(format!("port {port}: {}", tdsc_lab::error_chain(&e))),
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = NatTally::default();
    for h in threads {
        let t = h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        all.ok += t.ok;
        all.busy += t.busy;
        all.connect_failed.extend(t.connect_failed);
        all.failed.extend(t.failed);
    }
    Ok(all)
}

/// One phase of the NAT-like load, `secs` long: requests served, ports the client's own
/// stack still held, and the failures (connects and connections alike).
fn nat_phase(
    client: &str,
    vip: SocketAddrV4,
    secs: u64,
) -> anyhow::Result<(u64, u64, Vec<String>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let t = nat_load(client, vip, &stop);
    stop.store(true, Ordering::Relaxed);
    let _ = timer.join();
    let mut t = t?;
    t.failed.append(&mut t.connect_failed);
    Ok((t.ok, t.busy, t.failed))
}

/// The NAT-like load on client1, and the abortive and graceful connect loops on client2, on a
/// Raft lab while the master's daemon is killed (SIGKILL) and a new master takes over. During
/// the takeover connects wait (a SYN the dead master queued is lost and retransmitted after
/// 1 s), so connects may be slow and a few may time out; those are printed. A connection that
/// completed its handshake must never fail, no node but a connection's owner may send a client
/// anything, and the NAT-like client (graceful closes only) receives no RST at all.
#[test]
fn nat_like_and_stress_loads_lose_no_connection_across_a_sigkill_failover() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("nat_like_and_stress_loads_across_a_sigkill_failover") else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-exfo")),
        policy: Some("round-robin".to_owned()),
        raft: true,
        ..ClusterOptions::default()
    })
    .context("start the raft cluster")?;
    let clients = cluster.client_namespaces();
    ensure!(clients.len() == 2, "two clients: {clients:?}");
    let vip = cluster.vip();
    let old = cluster.master()?.clone();
    let stop_capture = Arc::new(AtomicBool::new(false));
    let captures: Vec<_> = clients
        .iter()
        .map(|ns| capture_wire(ns, *vip.ip(), &stop_capture))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let stop = Arc::new(AtomicBool::new(false));
    let nat = {
        let (client, stop) = (clients[0].clone(), stop.clone());
        std::thread::spawn(move || nat_load(&client, vip, &stop))
    };
    let loops: Vec<_> = [true, false]
        .into_iter()
        .map(|abortive| {
            let stop = stop.clone();
            netns::spawn_in(&clients[1], move || {
                connect_loop(vip, u64::MAX, abortive, &stop)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    cluster.kill_daemon(&old.name)?;
    let new = cluster
        .wait_master(Some(&old.name), Duration::from_secs(5))
        .context("no new master after SIGKILL");
    let settled = new
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|n| Ok(cluster.wait_liveness(&n.name, old.id, false)?));
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let nat = nat
        .join()
        .map_err(|_| anyhow::anyhow!("NAT load panicked"))??;
    let mut tallies = Vec::new();
    for h in loops {
        tallies.push(h.join().map_err(|_| anyhow::anyhow!("loop panicked"))??);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop_capture.store(true, Ordering::Relaxed);
    let mut wire = Vec::new();
    for h in captures {
        wire.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("capture panicked"))???,
        );
    }
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))?;
    let new = new?;
    settled?;
    eprintln!(
        "master {} killed, {} took over\nNAT-like: {} served, {} ports busy locally, \
         {} connects failed {:?}, {} connections failed {:?}\nabortive: {:?}\ngraceful: {:?}\n\
         wire: {wire:?}",
        old.name,
        new.name,
        nat.ok,
        nat.busy,
        nat.connect_failed.len(),
        &nat.connect_failed[..nat.connect_failed.len().min(3)],
        nat.failed.len(),
        &nat.failed[..nat.failed.len().min(5)],
        tallies[0],
        tallies[1]
    );
    ensure!(nat.ok > 0, "NAT-like: nothing served");
    ensure!(
        nat.failed.is_empty(),
        "NAT-like: {} connections failed after their handshake, e.g. {:?}",
        nat.failed.len(),
        &nat.failed[..nat.failed.len().min(5)]
    );
    for (t, kind) in tallies.iter().zip(["abortive", "graceful"]) {
        ensure!(t.connects > t.connect_failures, "{kind}: nothing connected");
        ensure!(
            t.failures == 0,
            "{kind}: {} connections failed after their handshake, e.g. {:?}",
            t.failures,
            t.sample_errors
        );
    }
    for (w, ns) in wire.iter().zip(&clients) {
        ensure!(
            w.foreign == 0,
            "{ns}: {} segments from a non-owner, e.g. {:?}",
            w.foreign,
            w.samples
        );
    }
    ensure!(
        wire[0].owner_rsts == 0,
        "the NAT-like client (graceful closes only) received {} RSTs",
        wire[0].owner_rsts
    );
    Ok(())
}

/// The kernel's TCP counters of a namespace (`Tcp:` and `TcpExt:` of `/proc/net/snmp` and
/// `/proc/net/netstat`, read inside it), by name.
fn tcp_counters(ns: &str) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut all = std::collections::BTreeMap::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let text = netns::exec(ns, "cat", [file])?;
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some((kind, names)), Some((_, values))) =
                (names.split_once(':'), values.split_once(':'))
            else {
                continue;
            };
            if kind != "Tcp" && kind != "TcpExt" {
                continue;
            }
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if let Ok(v) = v.parse::<u64>() {
                    all.insert(n.to_owned(), v);
                }
            }
        }
    }
    Ok(all)
}

/// The counters that grew between `before` and `after`, as `name +delta`.
fn grown(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> Vec<String> {
    after
        .iter()
        .filter_map(|(n, v)| {
            let d = v.saturating_sub(before.get(n).copied().unwrap_or(0));
            (d > 0).then(|| format!("{n} +{d}"))
        })
        .collect()
}

/// Investigation, not a proof (ignored in CI): the NAT-like load, `TDSC_NAT_SECS` (default
/// 60) seconds against each target in turn on one lab: the plain baseline server (no
/// tcp-dsc), then all connections steered to the master (SYNs re-injected by the master's
/// daemon), then all to one member (forwarded SYNs). Prints each target's served and failed
/// requests and the TCP counters that grew on the serving host, so a rare reset can be
/// charged to tcp-dsc or to the kernel's TIME_WAIT reuse under this load.
/// `cargo test --release -p tdsc-lab --test exactness nat_like_load_per_target -- --ignored --nocapture`
#[test]
#[ignore = "investigation: minutes long; prints figures and fails on any failed request"]
fn nat_like_load_per_target() -> anyhow::Result<()> {
    let Some(_lock) = exclusive_lab("nat_like_load_per_target") else {
        return Ok(());
    };
    let secs: u64 = std::env::var("TDSC_NAT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-nat")),
        policy: Some("round-robin".to_owned()),
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let client = cluster.client_namespaces()[0].clone();
    let vip = cluster.vip();
    let master = cluster.master()?.clone();
    let member = cluster
        .nodes()
        .iter()
        .find(|n| n.id != master.id)
        .context("a member")?
        .clone();
    let plain = cluster
        .baseline_addr()
        .context("the lab has a baseline server")?;
    let plain_ns = cluster.netns(&cluster.baseline().context("baseline")?.name.clone());
    let mut lines = Vec::new();
    let mut failures = 0;
    for target in ["plain", "master", "member"] {
        let (addr, ns) = match target {
            "plain" => (plain, plain_ns.clone()),
            "master" => {
                steer(&cluster, &master)?;
                (vip, cluster.netns(&master.name))
            }
            _ => {
                steer(&cluster, &member)?;
                (vip, cluster.netns(&member.name))
            }
        };
        let before = tcp_counters(&ns)?;
        let (ok, busy, failed) = nat_phase(&client, addr, secs)?;
        let after = tcp_counters(&ns)?;
        failures += failed.len();
        lines.push(format!(
            "{target}: {ok} served, {busy} busy, {} failed {:?}\n  {target} grew: {}",
            failed.len(),
            &failed[..failed.len().min(3)],
            grown(&before, &after).join(", ")
        ));
    }
    cluster.check_daemons()?;
    cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"))?;
    for l in &lines {
        println!("{l}");
    }
    // With flows steered (as here) no target fails a request: the figures above say where a
    // failure came from when one does.
    ensure!(
        failures == 0,
        "{failures} requests failed: {}",
        lines.join("\n")
    );
    Ok(())
}
