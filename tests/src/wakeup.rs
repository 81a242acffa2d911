//! How long this machine takes to wake a thread blocked on a socket.
//!
//! Every tcp-dsc SYN that leaves the kernel for user space pays one such wake-up: the
//! master's queue thread for every dispatched SYN, and the member's receive thread for every
//! forwarded one. On a virtual machine an idle vCPU must be kicked out of halt first, and that
//! cost, not the work done in user space, dominates the added connect latency. The benchmark
//! prints this figure next to the connect latencies so the two can be compared.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::bench::Summary;

/// One-way wake-up latency: half the round trip of a one-byte ping-pong between two threads
/// blocked in `recv` on a socket pair, `rounds` times after `warmup` unmeasured rounds.
pub fn measure(rounds: usize, warmup: usize) -> std::io::Result<Summary> {
    let (a, b) = UnixDatagram::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; 1];
        loop {
            b.recv(&mut buf)?;
            if buf[0] == 0 {
                return Ok(());
            }
            b.send(&buf)?;
        }
    });
    let mut samples = Vec::with_capacity(rounds);
    let mut buf = [0u8; 1];
    for i in 0..warmup + rounds {
        // A short pause lets the echo thread fall asleep, as a daemon does between SYNs.
        std::thread::sleep(Duration::from_micros(200));
        let t = Instant::now();
        a.send(&[1])?;
        a.recv(&mut buf)?;
        if i >= warmup {
            samples.push(t.elapsed() / 2);
        }
    }
    a.send(&[0])?;
    echo.join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))??;
    Summary::of(&samples).ok_or_else(|| std::io::Error::other("no samples"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_something_plausible() {
        let s = super::measure(50, 5).unwrap();
        assert_eq!(s.n, 50);
        assert!(s.min > 0.0 && s.min <= s.p50 && s.p50 <= s.max, "{s:?}");
    }
}
