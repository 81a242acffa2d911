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
/// blocked in `recv` on a socket pair, `rounds` times after `warmup` unmeasured rounds. The
/// scheduler places the threads.
pub fn measure(rounds: usize, warmup: usize) -> std::io::Result<Summary> {
    ping_pong(rounds, warmup, None)
}

/// The same with the two threads pinned: `(sender CPU, echo CPU)`. Equal CPUs measure a
/// same-CPU wake-up (a context switch); different ones a cross-CPU wake-up (an inter-processor
/// interrupt, which on a virtual machine may have to kick a halted vCPU).
pub fn measure_pinned(
    rounds: usize,
    warmup: usize,
    cpus: (usize, usize),
) -> std::io::Result<Summary> {
    ping_pong(rounds, warmup, Some(cpus))
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set; CPU_SET writes
    // within it (it checks the index against the set's size), and sched_setaffinity reads
    // exactly size_of::<cpu_set_t>() bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn ping_pong(
    rounds: usize,
    warmup: usize,
    cpus: Option<(usize, usize)>,
) -> std::io::Result<Summary> {
    // A thread of its own, so pinning never outlives the measurement.
    std::thread::spawn(move || {
        if let Some((mine, _)) = cpus {
            pin_current_thread(mine)?;
        }
        rounds_on_this_thread(rounds, warmup, cpus.map(|c| c.1))
    })
    .join()
    .map_err(|_| std::io::Error::other("measuring thread panicked"))?
}

fn rounds_on_this_thread(
    rounds: usize,
    warmup: usize,
    echo_cpu: Option<usize>,
) -> std::io::Result<Summary> {
    let (a, b) = UnixDatagram::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(cpu) = echo_cpu {
            pin_current_thread(cpu)?;
        }
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

    #[test]
    fn pinned_on_one_cpu_works_and_a_missing_cpu_is_an_error() {
        let s = super::measure_pinned(20, 2, (0, 0)).unwrap();
        assert_eq!(s.n, 20);
        assert!(super::measure_pinned(2, 0, (0, libc::CPU_SETSIZE as usize - 1)).is_err());
    }
}
