//! Writes the seed corpus, `fuzz/corpus/<target>/seed-<n>`, from the project's own encoders
//! (and, for the kernel's replies, their documented layouts). Run from `fuzz/`:
//! `cargo run --example write-seeds`; the files are committed, so run it again only when a
//! format changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use tdsc_election::{RaftCore, RaftSettings};
use tdsc_fuzz::{keyring, push_frame, VIP};
use tdsc_proto::control::{
    Body, Envelope, NodeReport, PeerAddr, Removed, SynRecvAnswer, SynRecvQuery,
};
use tdsc_proto::forward::ForwardHeader;
use tdscd::admin::protocol::{Reply, Request};
use tdscd::datapath::nfqueue::{config, Config};

fn main() -> std::io::Result<()> {
    let root = Path::new("corpus");
    write(root, "forward", &forward())?;
    write(root, "bus", &bus())?;
    write(root, "raft_step", &raft())?;
    write(root, "config", &configs())?;
    write(root, "control", &control())?;
    write(root, "netlink", &netlink())?;
    write(root, "nfqueue", &nfqueue())?;
    Ok(())
}

fn write(root: &Path, target: &str, seeds: &[Vec<u8>]) -> std::io::Result<()> {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir)?;
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s)?;
    }
    println!("{target}: {} seeds", seeds.len());
    Ok(())
}

/// A TCP header with `flags` to `port`.
fn segment(port: u16, flags: u8) -> [u8; 20] {
    let mut seg = [0u8; 20];
    seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
    seg[2..4].copy_from_slice(&port.to_be_bytes());
    seg[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = flags;
    seg
}

fn forward_bytes(
    term: u64,
    origin: u32,
    counter: u64,
    client: &str,
    vip: &str,
    flags: u8,
) -> Vec<u8> {
    let h = ForwardHeader {
        term,
        origin,
        counter,
        client: client.parse().expect("client"),
        vip: vip.parse().expect("vip"),
    };
    let mut buf = vec![0u8; 256];
    let n = h
        .encode_packet(&segment(80, flags), &keyring(), &mut buf)
        .expect("encodes");
    buf.truncate(n);
    buf
}

/// Forwards from node 2 (source index 1): accepted, replayed, a new term, another VIP, an
/// IPv6 forward, a SYN/ACK; with and without re-tagging.
fn forward() -> Vec<Vec<u8>> {
    const SYN: u8 = 0x02;
    let good = forward_bytes(3, 2, 10, "192.0.2.101", VIP, SYN);
    let mut replay = Vec::new();
    push_frame(&mut replay, 3 << 1, 1, &good);
    push_frame(&mut replay, 3 << 1, 1, &good);
    push_frame(
        &mut replay,
        3 << 1,
        1,
        &forward_bytes(4, 2, 1, "192.0.2.101", VIP, SYN),
    );
    push_frame(
        &mut replay,
        4 << 1,
        1,
        &forward_bytes(3, 2, 11, "192.0.2.101", VIP, SYN),
    );
    let mut others = Vec::new();
    push_frame(
        &mut others,
        1,
        1,
        &forward_bytes(1, 2, 1, "2001:db8::65", "2001:db8::1", SYN),
    );
    push_frame(
        &mut others,
        1,
        1,
        &forward_bytes(1, 2, 2, "192.0.2.101", "192.0.2.2", SYN),
    );
    push_frame(
        &mut others,
        1,
        1,
        &forward_bytes(1, 2, 3, "192.0.2.101", VIP, SYN | 0x10),
    );
    push_frame(
        &mut others,
        1,
        2,
        &forward_bytes(1, 3, 1, "192.0.2.102", VIP, SYN),
    );
    push_frame(&mut others, 0, 3, &good);
    vec![replay, others]
}

/// Sealed envelopes of every kind from node 2, one unsealed, one from the wrong port.
fn bus() -> Vec<Vec<u8>> {
    let env = |body| {
        Envelope {
            from: 2,
            term: 1,
            body: Some(body),
        }
        .to_bytes()
    };
    let sealed = |counter: u64, payload: &[u8]| {
        let mut d = 2u32.to_be_bytes().to_vec();
        d.extend_from_slice(&counter.to_be_bytes());
        d.extend_from_slice(payload);
        d
    };
    let report = env(Body::Report(NodeReport {
        established: 7,
        syn_recv: 1,
        seq: 1,
        draining: false,
        load: 1500,
        weight: Some(2),
        unhealthy: false,
    }));
    let mut a = Vec::new();
    push_frame(&mut a, 1, 1, &sealed(100, &report));
    push_frame(&mut a, 1, 1, &sealed(100, &report));
    push_frame(
        &mut a,
        1,
        1,
        &sealed(101, &env(Body::Raft(vec![8, 3, 16, 1]))),
    );
    push_frame(
        &mut a,
        1,
        1,
        &sealed(
            102,
            &env(Body::Removed(Removed {
                index: 9,
                voters: vec![2, 3],
            })),
        ),
    );
    push_frame(
        &mut a,
        1,
        1,
        &sealed(103, &env(Body::SynRecvQuery(SynRecvQuery { nonce: 5 }))),
    );
    push_frame(
        &mut a,
        1,
        1,
        &sealed(
            104,
            &env(Body::SynRecvAnswer(SynRecvAnswer {
                nonce: 5,
                sockets: vec![PeerAddr {
                    addr: vec![192, 0, 2, 101],
                    port: 40000,
                }],
                truncated: false,
            })),
        ),
    );
    let mut b = Vec::new();
    push_frame(&mut b, 0, 1, &report);
    push_frame(&mut b, 1, 1 | 4, &sealed(1, &report));
    push_frame(&mut b, 1, 2, &sealed(1, &report));
    vec![a, b]
}

/// What node 1 of a three-node group hears while the group elects a leader and replicates a
/// proposal, interleaved with its ticks; once as the group runs, once with node 1 campaigning.
fn raft() -> Vec<Vec<u8>> {
    const SETTINGS: RaftSettings = RaftSettings {
        tick_ms: 10,
        election_tick: 10,
        heartbeat_tick: 3,
    };
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let voters = [1u64, 2, 3];
    let mut nodes: BTreeMap<u64, RaftCore> = voters
        .iter()
        .map(|&id| {
            (
                id,
                RaftCore::new(id, &voters, SETTINGS, None, 0, &log).expect("core"),
            )
        })
        .collect();
    let mut seed = Vec::new();
    let mut now = 0;
    for round in 0..60u64 {
        now += SETTINGS.tick_ms;
        for n in nodes.values_mut() {
            n.tick(now);
        }
        push_frame(&mut seed, 1, 0, &[]);
        if round == 40 {
            for n in nodes.values_mut() {
                let _ = n.propose(b"records".to_vec());
            }
        }
        // Deliver until quiet: every message to node 1 also goes into the seed.
        for _ in 0..4 {
            let mut wire = Vec::new();
            for (&id, n) in nodes.iter_mut() {
                let out = n.ready();
                for (to, bytes) in out.messages {
                    wire.push((id, to, bytes));
                }
                // A disk that writes at once: the job's messages, then the core is told.
                if let Some(job) = out.persist {
                    for (to, bytes) in job.messages {
                        wire.push((id, to, bytes));
                    }
                    n.persisted(job.number);
                }
            }
            for (from, to, bytes) in wire {
                if to == 1 && seed.len() < 16 * 1024 {
                    push_frame(&mut seed, 0, u8::try_from(from).expect("small id"), &bytes);
                }
                if let Some(n) = nodes.get_mut(&to) {
                    let _ = n.step(from, &bytes, now);
                }
            }
        }
    }
    vec![seed]
}

fn configs() -> Vec<Vec<u8>> {
    let shipped = include_str!("../../deploy/debian/tdsc.toml");
    let static_mode = shipped
        .replace("mode = \"raft\"", "mode = \"static\"\nmaster = 1")
        .replace(
            "tcp_ports = [80, 443]",
            "tcp_ports = [443, 80]\ncluster_mac = \"02:bf:c0:00:02:01\"",
        );
    vec![shipped.as_bytes().to_vec(), static_mode.into_bytes()]
}

fn control() -> Vec<Vec<u8>> {
    let requests = [
        Request::Status,
        Request::PolicySet {
            policy: "least-connections".into(),
        },
        Request::Weight { node: 2, weight: 3 },
        Request::Drain { node: 2 },
        Request::Undrain { node: 2 },
        Request::NodeAdd {
            id: 4,
            address: "198.51.100.14".into(),
            weight: Some(2),
        },
        Request::NodeRemove { id: 4 },
    ];
    let mut lines = String::new();
    for r in &requests {
        lines.push_str(&serde_json::to_string(r).expect("encodes"));
        lines.push('\n');
    }
    let replies = [
        Reply::Error {
            error: "not the leader".into(),
        },
        Reply::Done {
            done: "node 2 drained".into(),
        },
    ];
    let mut reply_lines = String::new();
    for r in &replies {
        reply_lines.push_str(&serde_json::to_string(r).expect("encodes"));
        reply_lines.push('\n');
    }
    vec![lines.into_bytes(), reply_lines.into_bytes()]
}

/// A netlink message (`struct nlmsghdr`, host byte order) of `kind` for `seq`.
fn nlmsg(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + body.len()).expect("small");
    let mut m = Vec::new();
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m.resize(m.len().div_ceil(4) * 4, 0);
    m
}

/// `struct inet_diag_msg` of `family` in `state`, local `src`, remote `dst:dport`.
fn diag_msg(family: u8, state: u8, src: &IpAddr, dst: &IpAddr, dport: u16) -> Vec<u8> {
    let addr = |a: &IpAddr| -> [u8; 16] {
        match (a, family) {
            (IpAddr::V4(v), 2) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v.octets());
                b
            }
            (IpAddr::V4(v), _) => v.to_ipv6_mapped().octets(),
            (IpAddr::V6(v), _) => v.octets(),
        }
    };
    let mut m = vec![family, state, 0, 0];
    m.extend_from_slice(&80u16.to_be_bytes());
    m.extend_from_slice(&dport.to_be_bytes());
    m.extend_from_slice(&addr(src));
    m.extend_from_slice(&addr(dst));
    m.extend_from_slice(&[0u8; 8 + 5 * 4]); // interface, cookie, expires, queues, uid, inode
    m
}

fn netlink() -> Vec<Vec<u8>> {
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    let vip: IpAddr = VIP.parse().expect("vip");
    let client: IpAddr = "192.0.2.101".parse().expect("client");
    let error = |errno: i32| {
        let mut body = (-errno).to_ne_bytes().to_vec();
        body.extend_from_slice(&nlmsg(0, 2, &[])[..16]);
        nlmsg(NLMSG_ERROR, 2, &body)
    };
    let mut acks = Vec::new();
    push_frame(&mut acks, 0, 0, &error(0));
    push_frame(&mut acks, 0, 0, &error(libc_eexist()));
    let mut dump = nlmsg(
        SOCK_DIAG_BY_FAMILY,
        2,
        &diag_msg(2, 1, &vip, &client, 40000),
    );
    dump.extend(nlmsg(
        SOCK_DIAG_BY_FAMILY,
        2,
        &diag_msg(10, 3, &vip, &client, 40001),
    ));
    dump.extend(nlmsg(
        SOCK_DIAG_BY_FAMILY,
        1,
        &diag_msg(2, 3, &vip, &client, 40002),
    ));
    dump.extend(nlmsg(NLMSG_DONE, 2, &0i32.to_ne_bytes()));
    let v6: IpAddr = "2001:db8::1".parse().expect("vip");
    let v6_client: IpAddr = "2001:db8::65".parse().expect("client");
    let mut dumps = Vec::new();
    push_frame(&mut dumps, 1, 0, &dump);
    push_frame(
        &mut dumps,
        1,
        1,
        &nlmsg(
            SOCK_DIAG_BY_FAMILY,
            2,
            &diag_msg(10, 3, &v6, &v6_client, 40003),
        ),
    );
    push_frame(&mut dumps, 1, 1, &error(libc_eexist()));
    vec![acks, dumps]
}

/// `EEXIST`, what adding an address twice answers.
fn libc_eexist() -> i32 {
    17
}

/// Queued packets as the kernel writes them (`NFQNL_MSG_PACKET` with the packet header,
/// mark, input interface, skb info and payload attributes), an acknowledgement and an error
/// after a configuration request, in one datagram and in several.
fn nfqueue() -> Vec<Vec<u8>> {
    let attr = |kind: u16, value: &[u8]| {
        let len = u16::try_from(4 + value.len()).expect("small");
        let mut a = len.to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().div_ceil(4) * 4, 0);
        a
    };
    let packet = |id: u32, gso: bool| {
        let mut body = vec![2, 0, 0, 0]; // nfgenmsg: AF_INET, version 0, queue 0
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&0x0800u16.to_be_bytes());
        hdr.push(1);
        body.extend(attr(1, &hdr));
        body.extend(attr(3, &7u32.to_be_bytes()));
        body.extend(attr(5, &3u32.to_be_bytes()));
        body.extend(attr(14, &(if gso { 2u32 } else { 0 }).to_be_bytes()));
        let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[192, 0, 2, 101]);
        ip.extend_from_slice(&[192, 0, 2, 1]);
        ip.extend_from_slice(&segment(80, 0x02));
        body.extend(attr(10, &ip));
        nlmsg(3 << 8, 0, &body)
    };
    let ack = |seq: u32, errno: i32| {
        let mut body = (-errno).to_ne_bytes().to_vec();
        let mut req = [0u8; 64];
        let n = config(&mut req, 0, seq, Config::Bind { family: 2 }).expect("fits");
        body.extend_from_slice(&req[..16.min(n)]);
        nlmsg(2, seq, &body)
    };
    let mut batch = packet(1, false);
    batch.extend(packet(2, true));
    batch.extend(ack(5, 0));
    vec![packet(1, false), batch, ack(6, 1)]
}
