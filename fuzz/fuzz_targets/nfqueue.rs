//! The queue socket's datagrams (`tdscd::datapath::nfqueue::messages`): every message of one
//! datagram is parsed, and each queued packet is given its verdict in a batch, as the master
//! thread does. Properties: nothing panics; the iterator ends, after at most one item per
//! netlink header the datagram can hold (plus one error); each verdict fits the batch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tdscd::datapath::nfqueue::{
    messages, Message, Verdict, VerdictBatch, NLMSG_HDRLEN, VERDICT_MSG_LEN,
};

fuzz_target!(|input: &[u8]| {
    let limit = input.len() / NLMSG_HDRLEN + 1;
    let mut buf = vec![0u8; VERDICT_MSG_LEN * limit];
    let mut batch = VerdictBatch::new(&mut buf);
    let mut items = 0;
    for m in messages(input) {
        items += 1;
        assert!(items <= limit, "more messages than the datagram can hold");
        if let Ok(Message::Packet(p)) = m {
            batch
                .push(p.queue, p.id, Verdict::Drop, p.mark)
                .expect("the batch has room for every packet");
        }
    }
});
