//! What authentication costs on the SYN path and on the control channel, measured side by
//! side in one run: today's forward encoding alone, the same plus a forward tag (and its
//! check at the member), and sealing/opening a report-sized datagram.
//!
//! `cargo run --release -p tdsc-proto --example seal_bench` (no root, no network; prints
//! ns per operation, best of five rounds of 200,000).

use std::hint::black_box;
use std::time::Instant;

use tdsc_proto::forward::ForwardHeader;
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
    let header = ForwardHeader {
        term: 3,
        origin: 1,
        client: "192.0.2.101".parse().expect("address"),
        vip: "192.0.2.1".parse().expect("address"),
    };
    // A SYN with the options Linux sends: 40 bytes of TCP header.
    let mut syn = [0u8; 40];
    syn[12] = 10 << 4;
    syn[13] = 0x02;
    let mut wire = [0u8; 256];

    let encode = best_ns(|_| {
        let n = header
            .encode_packet(black_box(&syn), &mut wire)
            .expect("fits");
        black_box(n);
    });
    let n = header.encode_packet(&syn, &mut wire).expect("fits");
    let encode_and_tag = best_ns(|c| {
        let n = header
            .encode_packet(black_box(&syn), &mut wire)
            .expect("fits");
        black_box(ring.forward_tag(1, c, &wire[..n]));
    });
    let (id, tag) = ring.forward_tag(1, 1, &wire[..n]);
    let mut window = ReplayWindow::default();
    let verify = best_ns(|c| {
        // The same tag each time: verification fails after the first round, but costs the same.
        black_box(
            ring.verify_forward(id, 1, black_box(1), &wire[..n], &tag)
                .ok(),
        );
        black_box(window.check_and_set(c).ok());
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
    println!("  forward encode (today)               {encode:8.1} ns");
    println!(
        "  forward encode + tag (master)        {encode_and_tag:8.1} ns   tag adds {:.1} ns",
        encode_and_tag - encode
    );
    println!("  forward tag check + replay (member)  {verify:8.1} ns");
    println!(
        "  seal a {}-byte report                {seal:8.1} ns",
        report.len()
    );
    println!(
        "  open a {}-byte report                {open:8.1} ns",
        report.len()
    );
}
