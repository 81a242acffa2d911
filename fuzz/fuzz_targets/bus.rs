//! The envelope decoders and the message bus's accept (`tdscd::cluster::bus::Bus::accept`),
//! over a sequence of datagrams into one node's bus.
//!
//! Each frame is one datagram: `arg` picks the source address (bits 0-1: a node or a
//! stranger) and whether it came from the cluster port (bit 2 clear) or another; `op` 0 sends
//! the bytes as they are, `op` 1 seals them first with the cluster key, taking the sealed
//! sender id (u32) and counter (u64, both big-endian) from the front of the bytes, so what
//! follows reaches the envelope decoder and the routing behind it. The plaintext is also
//! decoded as each message a peer sends inside an envelope or a Raft entry, and a decoded
//! envelope must encode back to one that decodes equal.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tdsc_fuzz::{frames, keyring, nodes, source, PORT, SELF_ID};
use tdsc_proto::control::{Envelope, MemberInfo, RaftCommand};
use tdscd::cluster::bus::{Bus, Routes};
use tdscd::cluster::counters::ReportCounters;
use tdscd::cluster::role::RoleCell;
use tdscd::cluster::view::ClusterView;
use tokio::sync::mpsc;

fuzz_target!(|input: &[u8]| {
    let ring = keyring();
    let (raft_tx, mut raft_rx) = mpsc::channel(4);
    let (req_tx, mut req_rx) = mpsc::channel(4);
    let (query_tx, mut query_rx) = mpsc::channel(4);
    let (answer_tx, mut answer_rx) = mpsc::channel(4);
    let (control_tx, mut control_rx) = mpsc::channel(4);
    let (control_answer_tx, mut control_answer_rx) = mpsc::channel(4);
    let mut bus = Bus {
        node_id: SELF_ID,
        port: PORT,
        view: Arc::new(ClusterView::new(&nodes(), SELF_ID)),
        role: Arc::new(RoleCell::default()),
        counters: Arc::new(ReportCounters::default()),
        epoch: Instant::now(),
        notice_interval: Duration::from_millis(200),
        members: None,
        routes: Routes {
            raft: Some(raft_tx),
            raft_requests: Some(req_tx),
            syn_recv_queries: query_tx,
            syn_recv_answers: answer_tx,
            control_requests: control_tx,
            control_answers: control_answer_tx,
        },
        windows: HashMap::new(),
    };
    for f in frames(input) {
        decode_all(f.data);
        let port = if f.arg & 4 == 0 { PORT } else { PORT + 1 };
        let from = SocketAddr::new(source(f.arg), port);
        let mut wire = Vec::new();
        match (f.op, f.data) {
            (1, [s0, s1, s2, s3, c0, c1, c2, c3, c4, c5, c6, c7, payload @ ..]) => {
                let sender = u32::from_be_bytes([*s0, *s1, *s2, *s3]);
                let counter = u64::from_be_bytes([*c0, *c1, *c2, *c3, *c4, *c5, *c6, *c7]);
                decode_all(payload);
                ring.seal(sender, counter, payload, &mut wire);
            }
            _ => wire.extend_from_slice(f.data),
        }
        let outcome = bus.accept(&ring, from, &mut wire);
        if let Some(sender) = outcome.sender {
            let _ = bus.removal_notice(from, sender);
        }
        // The owners take what was routed, so the channels never stay full.
        while raft_rx.try_recv().is_ok() {}
        while req_rx.try_recv().is_ok() {}
        while query_rx.try_recv().is_ok() {}
        while answer_rx.try_recv().is_ok() {}
        while control_rx.try_recv().is_ok() {}
        while control_answer_rx.try_recv().is_ok() {}
    }
});

/// Decodes `bytes` as every message a peer's bytes are decoded as.
fn decode_all(bytes: &[u8]) {
    if let Ok(env) = Envelope::from_bytes(bytes) {
        let again = Envelope::from_bytes(&env.to_bytes()).expect("re-encoded envelope decodes");
        assert_eq!(again, env, "envelope changed in a round trip");
    }
    let _ = RaftCommand::from_bytes(bytes);
    if let Ok(m) = MemberInfo::from_bytes(bytes) {
        let _ = m.ip();
    }
}
