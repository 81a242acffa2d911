//! Pinning the data-path threads (`[threads] data_path_cpu`).
//!
//! Every SYN that reaches user space wakes a blocked thread: the master's queue thread for
//! each dispatched SYN, the member's receive thread for each forwarded one. When that thread
//! last ran on another CPU than the one processing the packet's softirq, the kernel must send
//! an inter-processor interrupt, and on a virtual machine that may mean kicking a halted vCPU
//! out of the hypervisor; `tdsc-lab bench-connect` measures both placements side by side (see
//! `docs/benchmarks.md`, *Connect latency and CPU per SYN*). Pinning the threads to the CPU
//! that takes the client NIC's receive interrupts turns the wake-up into a context switch on
//! the same CPU.

use std::io;

/// Why a CPU cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error("cannot read this process's CPU affinity")]
    Read(#[source] io::Error),
    #[error("CPU {cpu} is not one this process may run on (allowed: {allowed:?})")]
    NotAllowed { cpu: usize, allowed: Vec<usize> },
    #[error("cannot pin thread to CPU {cpu}")]
    Pin {
        cpu: usize,
        #[source]
        source: io::Error,
    },
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Result<Vec<usize>, AffinityError> {
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set; sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it, and CPU_ISSET reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(AffinityError::Read(io::Error::last_os_error()));
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|cpu| libc::CPU_ISSET(*cpu, &set))
            .collect())
    }
}

/// Checks at start-up that `cpu` may be used, so that a typo fails the start and not a
/// thread later.
pub fn check(cpu: usize) -> Result<(), AffinityError> {
    let allowed = allowed_cpus()?;
    if allowed.contains(&cpu) {
        Ok(())
    } else {
        Err(AffinityError::NotAllowed { cpu, allowed })
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), AffinityError> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(AffinityError::Pin {
            cpu,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    }
    // SAFETY: as in `allowed_cpus`; CPU_SET writes within the set (cpu < CPU_SETSIZE), and
    // sched_setaffinity reads exactly size_of::<cpu_set_t>() bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(AffinityError::Pin {
                cpu,
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_cpus_include_the_one_we_run_on_and_exclude_absurd_ones() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        assert!(check(allowed[0]).is_ok());
        let err = check(libc::CPU_SETSIZE as usize - 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not one this process may run on"), "{err}");
    }

    #[test]
    fn pinning_a_thread_moves_it_and_only_it() {
        let cpu = allowed_cpus().unwrap()[0];
        let before = allowed_cpus().unwrap();
        let inside = std::thread::spawn(move || {
            pin_current_thread(cpu).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inside, vec![cpu]);
        assert_eq!(
            allowed_cpus().unwrap(),
            before,
            "the caller's affinity changed"
        );
        assert!(pin_current_thread(libc::CPU_SETSIZE as usize).is_err());
    }
}
