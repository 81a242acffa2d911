//! Netlink replies as the daemon reads them (`tdscd::host::netlink::datagram_replies`), and
//! the sock_diag dump messages inside them (`tdscd::host::sockdiag`).
//!
//! Each frame is one received datagram for request sequence number 2 (the first a socket
//! sends): `op` 0 reads it as the answer to a request with an acknowledgement, any other as
//! a sock_diag dump, each message's body checked against the VIP (IPv4 if `arg` is even,
//! IPv6 otherwise) as `SockDiag::count` and `syn_recv_peers` do. Frames after the one that
//! ended the reply start a new request.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use tdsc_fuzz::{frames, VIP};
use tdscd::host::netlink::{ack_reply, datagram_replies, dump_reply};
use tdscd::host::sockdiag::{local_is, remote_of};

/// The sequence number of a socket's first request (`Netlink::send` starts at 1 and adds 1).
pub const SEQ: u32 = 2;

fuzz_target!(|input: &[u8]| {
    let vips: [IpAddr; 2] = [
        VIP.parse().expect("vip"),
        "2001:db8::1".parse().expect("vip"),
    ];
    for f in frames(input) {
        if f.op == 0 {
            let _ = datagram_replies(f.data, SEQ, &mut ack_reply);
        } else {
            let vip = vips[usize::from(f.arg % 2)];
            let mut each = |msg: &[u8]| {
                let _ = local_is(msg, &vip);
                let _ = remote_of(msg);
            };
            let _ = datagram_replies(f.data, SEQ, &mut |kind, msg| {
                dump_reply(kind, msg, &mut each)
            });
        }
    }
});
