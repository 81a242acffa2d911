//! What authentication costs on the SYN path and on the control channel, measured side by
//! side in one run: per forward, the encoding without and with its tag on the master and the
//! decoding without and with the tag check and replay window at the member; and
//! sealing/opening a report-sized datagram.
//!
//! `cargo run --release -p tdsc-proto --example seal_bench` (no root, no network; prints
//! ns per operation, best of five rounds of 200,000).

use std::hint::black_box;
use std::time::Instant;

use tdsc_proto::forward::{ForwardHeader, ForwardPacket};
use tdsc_proto::seal::{Keyring, ReplayWindow, KEY_LEN};

const ROUNDS: usize = 5;
const PER_ROUND: u32 = 200_000;

fn best_ns(mut f: impl FnMut(u64)) -> f64 {
    let mut best = f64::MAX;
    let mut counter = 0u64;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..PER_ROUND {
            counter += 1;
            f(counter);
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / f64::from(PER_ROUND));
    }
    best
}

fn main() {
    let ring = Keyring::new(&[(1, [7u8; KEY_LEN])], None).expect("one key");
    let mut header = ForwardHeader {
        term: 3,
        origin: 1,
        counter: 1,
        client: "192.0.2.101".parse().expect("address"),
        vip: "192.0.2.1".parse().expect("address"),
    };
    // A SYN with the options Linux sends: 40 bytes of TCP header.
    let mut syn = [0u8; 40];
    syn[12] = 10 << 4;
    syn[13] = 0x02;
    let mut wire = [0u8; 256];

    // The master: header and segment alone, then with the tag (what `SynPath::on_syn` writes).
    let encode = best_ns(|c| {
        header.counter = c;
        let n = header
            .encode_untagged(1, black_box(&syn), &mut wire)
            .expect("fits");
        black_box(n);
    });
    let encode_and_tag = best_ns(|c| {
        header.counter = c;
        let n = header
            .encode_packet(black_box(&syn), &ring, &mut wire)
            .expect("fits");
        black_box(n);
    });

    // The member: decode alone, then decode, tag check and replay window (what
    // `tdscd::datapath::receive::check` adds). One genuine forward, checked over and over: the
    // tag verifies every time; the window is fed a fresh counter each time.
    header.counter = 1;
    let n = header.encode_packet(&syn, &ring, &mut wire).expect("fits");
    let decode = best_ns(|_| {
        black_box(ForwardPacket::decode(black_box(&wire[..n])).is_ok());
    });
    let mut window = ReplayWindow::default();
    let verify = best_ns(|c| {
        let p = ForwardPacket::decode(black_box(&wire[..n])).expect("decodes");
        assert!(p.verify(&ring).is_ok());
        black_box(window.check_and_set(c).is_ok());
    });

    let report = [0x5au8; 120];
    let mut sealed = Vec::with_capacity(256);
    let seal = best_ns(|c| {
        ring.seal(2, c, black_box(&report), &mut sealed);
        black_box(sealed.len());
    });
    ring.seal(2, 1, &report, &mut sealed);
    let mut buf = sealed.clone();
    let open = best_ns(|_| {
        buf.copy_from_slice(&sealed);
        black_box(ring.open(&mut buf).map(|o| o.payload.len()).ok());
    });

    println!("seal_bench: ns per operation, best of {ROUNDS} x {PER_ROUND} (AES-256-GCM, ring)");
    println!("  master, per forward: encode without tag   {encode:8.1} ns");
    println!(
        "  master, per forward: encode with tag      {encode_and_tag:8.1} ns   tag adds {:.1} ns",
        encode_and_tag - encode
    );
    println!("  member, per forward: decode without tag   {decode:8.1} ns");
    println!(
        "  member, per forward: decode, tag, replay  {verify:8.1} ns   check adds {:.1} ns",
        verify - decode
    );
    println!(
        "  seal a {}-byte report                     {seal:8.1} ns",
        report.len()
    );
    println!(
        "  open a {}-byte report                     {open:8.1} ns",
        report.len()
    );
}
