//! What the fuzz targets share: the framing of their inputs and the fixed cluster they run
//! against. `write-seeds` writes the seed corpus with the same framing and fixtures, so the
//! seeds are real encodings the targets accept.

use std::net::IpAddr;

use tdsc_proto::seal::{Keyring, KEY_LEN};
use tdscd::config::Node;

/// The VIP every target checks against.
pub const VIP: &str = "192.0.2.1";
/// The cluster port of the bus target.
pub const PORT: u16 = 7400;
/// The id of the node under test (the others are 2 and 3).
pub const SELF_ID: u32 = 1;
/// The TCP ports the member check accepts.
pub const TCP_PORTS: &[u16] = &[80, 443];

/// Nodes 1, 2 and 3 at 198.51.100.11-13, the lab's addressing.
pub fn nodes() -> Vec<Node> {
    (1..=3)
        .map(|id| Node {
            id,
            address: node_address(id),
        })
        .collect()
}

/// The cluster address of node `id`.
pub fn node_address(id: u32) -> IpAddr {
    format!("198.51.100.1{id}").parse().expect("address")
}

/// The address a frame says it came from: one of the three nodes, or (3) a stranger.
pub fn source(arg: u8) -> IpAddr {
    match arg % 4 {
        3 => "203.0.113.9".parse().expect("address"),
        i => node_address(u32::from(i) + 1),
    }
}

/// The cluster keyring: one key, id 1, which seals and tags.
pub fn keyring() -> Keyring {
    Keyring::new(&[(1, [7; KEY_LEN])], None).expect("keyring")
}

/// One frame of a multi-step input: what to do (`op`), an argument, and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub op: u8,
    pub arg: u8,
    pub data: &'a [u8],
}

/// The frames of an input: `op`, `arg`, a little-endian u16 length, that many bytes; the
/// input ends at the first frame that does not fit.
pub fn frames(mut input: &[u8]) -> impl Iterator<Item = Frame<'_>> {
    std::iter::from_fn(move || {
        let [op, arg, l0, l1, rest @ ..] = input else {
            return None;
        };
        let len = usize::from(u16::from_le_bytes([*l0, *l1]));
        let data = rest.get(..len)?;
        input = &rest[len..];
        Some(Frame {
            op: *op,
            arg: *arg,
            data,
        })
    })
}

/// Appends a frame to an input under construction (the seeds' writer).
pub fn push_frame(out: &mut Vec<u8>, op: u8, arg: u8, data: &[u8]) {
    let len = u16::try_from(data.len()).expect("a frame holds at most 64 KiB");
    out.extend_from_slice(&[op, arg]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(data);
}
