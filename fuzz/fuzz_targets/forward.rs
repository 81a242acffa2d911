//! The forward decoder and the member check (`tdscd::datapath::receive::check`), over a
//! sequence of forwards into one member's replay windows.
//!
//! Each frame is one received forward: `arg` picks the outer source address (a node or a
//! stranger), `op` bit 0 asks the target to re-tag the payload with the cluster key first (so
//! mutated headers get past the tag and reach the checks behind it), `op >> 1` is the
//! highest term the member knows. Properties: nothing panics; a decoded header re-encodes to
//! the bytes it came from; a forward the check accepted is refused when sent again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tdsc_fuzz::{frames, keyring, nodes, source, SELF_ID, TCP_PORTS, VIP};
use tdsc_proto::forward::{ForwardPacket, MAX_HEADER_LEN};
use tdsc_proto::seal::TAG_LEN;
use tdscd::cluster::view::ClusterView;
use tdscd::datapath::receive::{check, Expect, ForwardWindows, Rejection};

/// Offsets in the forward header (proto/src/forward.rs): origin, counter, key id.
const ORIGIN: std::ops::Range<usize> = 12..16;
const COUNTER: std::ops::Range<usize> = 16..24;
const KEY_ID: usize = 24;

fuzz_target!(|input: &[u8]| {
    let ring = keyring();
    let view = ClusterView::new(&nodes(), SELF_ID);
    let expect = Expect {
        vip: VIP.parse().expect("vip"),
        ports: TCP_PORTS,
        keyring: &ring,
    };
    let mut windows = ForwardWindows::new(view.nodes.len());
    for f in frames(input) {
        let mut payload = f.data.to_vec();
        if f.op & 1 == 1 && payload.len() >= KEY_ID + 1 + TAG_LEN {
            retag(&ring, &mut payload);
        }
        let known_term = u64::from(f.op >> 1);
        if let Ok(p) = ForwardPacket::decode(&payload) {
            let mut header = [0u8; MAX_HEADER_LEN];
            let n = p
                .header
                .encode_into(p.key_id, &mut header)
                .expect("header fits");
            assert_eq!(&header[..n], &payload[..n], "decode and encode disagree");
        }
        let src = source(f.arg);
        let accepted = check(&view, &expect, &mut windows, known_term, src, &payload).is_ok();
        if accepted {
            let again = check(&view, &expect, &mut windows, known_term, src, &payload);
            assert_eq!(
                again.err(),
                Some(Rejection::Replay),
                "a replay was accepted"
            );
        }
    }
});

/// Writes the cluster key's id and a valid tag over the payload's header and segment.
fn retag(ring: &tdsc_proto::seal::Keyring, payload: &mut [u8]) {
    payload[KEY_ID] = ring.send_id();
    let origin = u32::from_be_bytes(payload[ORIGIN].try_into().expect("4 bytes"));
    let counter = u64::from_be_bytes(payload[COUNTER].try_into().expect("8 bytes"));
    let body = payload.len() - TAG_LEN;
    let (_, tag) = ring.forward_tag(origin, counter, &payload[..body]);
    payload[body..].copy_from_slice(&tag);
}
