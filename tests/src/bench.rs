//! The connect benchmark (after the TCP-DSC paper's Table 2) and the master's CPU cost per
//! dispatched SYN.
//!
//! 1. **connect() latency.** From the first client, `count` connections to the VIP and
//!    `count` to the baseline server, alternating, after `warmup` unmeasured pairs. Only
//!    `connect()` is timed; each connection then sends a GET whose reply names the serving
//!    node, which classifies a VIP sample as *master-local* (the master kept the SYN) or
//!    *forwarded* (the SYN went to a member over protocol 253).
//! 2. **CPU per SYN.** Crafted SYNs from the client's own address with random source ports
//!    and ISNs, blasted at the VIP through a raw socket (the client's RSTs for the resulting
//!    SYN/ACKs are dropped in its namespace). The master tdscd's `utime + stime` from
//!    `/proc/<pid>/stat` and its `syns_dispatched` counter, before and after, give CPU µs per
//!    dispatched SYN.
//!
//! Both phases are bounded in count and in time, and stop early when `stop` is raised.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, ClusterError};
use crate::netns::{self, NetnsError};
use crate::nft::{self, NftError};
use crate::packet::{RawIpSender, Syn};

/// How long the counters may keep moving after the blast before they are read.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("the topology has no {what}")]
    Missing { what: &'static str },
    #[error("connection {index} to {target}: {reason}")]
    Connect {
        index: usize,
        target: SocketAddr,
        reason: String,
    },
    #[error("cannot read /proc/{pid}/stat: {reason}")]
    ProcStat { pid: u32, reason: String },
    #[error("raw socket: {0}")]
    Raw(#[source] std::io::Error),
    #[error("interrupted")]
    Interrupted,
    #[error("benchmark set-up: {0}")]
    Setup(String),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Measured connections per target.
    pub count: usize,
    /// Unmeasured connections per target first.
    pub warmup: usize,
    /// SYNs to blast for the CPU measurement (0 skips it).
    pub syns: u64,
    /// Upper bound on the blast's duration.
    pub max_duration: Duration,
}

/// Summary of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub mean: f64,
    pub p99: f64,
    pub max: f64,
    /// Connects that took over 100 ms (a lost SYN/ACK or a scheduling stall).
    pub over_100ms: usize,
    /// Connects that took over 1 s: the SYN was retransmitted (Linux's first SYN timeout).
    pub over_1s: usize,
}

impl Summary {
    /// Summarises samples; `None` if there are none.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let over = |limit: Duration| samples.iter().filter(|d| **d > limit).count();
        let (over_100ms, over_1s) = (
            over(Duration::from_millis(100)),
            over(Duration::from_secs(1)),
        );
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "a percentile index, rounded and clamped to the sample"
            )]
            let idx = ((us.len() - 1) as f64 * p).round() as usize;
            us[idx]
        };
        #[allow(
            clippy::cast_precision_loss,
            reason = "sample counts are far below 2^53"
        )]
        let mean = us.iter().sum::<f64>() / us.len() as f64;
        Some(Summary {
            n: us.len(),
            min: us[0],
            p50: pct(0.50),
            mean,
            p99: pct(0.99),
            max: us[us.len() - 1],
            over_100ms,
            over_1s,
        })
    }
}

/// Results of the latency phase.
#[derive(Debug, Clone)]
pub struct LatencyReport {
    pub master_local: Option<Summary>,
    pub forwarded: Option<Summary>,
    pub plain: Option<Summary>,
    pub failed: Failures,
}

/// Connections that failed (connect, request or reply), per target; the benchmark counts
/// them and goes on instead of stopping at the first.
#[derive(Debug, Clone, Default)]
pub struct Failures {
    pub vip: usize,
    pub plain: usize,
    /// The first few errors, for the report.
    pub examples: Vec<String>,
}

impl Failures {
    fn note(&mut self, to_vip: bool, e: &BenchError) {
        *if to_vip {
            &mut self.vip
        } else {
            &mut self.plain
        } += 1;
        if self.examples.len() < 5 {
            self.examples.push(e.to_string());
        }
    }

    fn merge(&mut self, other: Failures) {
        self.vip += other.vip;
        self.plain += other.plain;
        let room = 5usize.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }
}

/// Results of the SYN blast.
#[derive(Debug, Clone)]
pub struct CpuReport {
    pub sent: u64,
    pub send_time: Duration,
    pub dispatched: u64,
    pub cpu: Duration,
}

/// One connection: times `connect()` alone, then sends a GET and returns the serving node
/// from the reply. Runs in the calling thread's namespace.
pub(crate) fn connect_once(
    target: SocketAddrV4,
    index: usize,
) -> Result<(u32, Duration), BenchError> {
    use std::io::{Read, Write};
    let target = SocketAddr::V4(target);
    let fail = |reason: String| BenchError::Connect {
        index,
        target,
        reason,
    };
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
        .map_err(|e| fail(format!("connect: {e}")))?;
    let took = start.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .and_then(|()| s.set_nodelay(true))
        .and_then(|()| s.write_all(&crate::http::request_bytes("/")))
        .map_err(|e| fail(format!("request: {e}")))?;
    let mut raw = Vec::with_capacity(256);
    s.read_to_end(&mut raw)
        .map_err(|e| fail(format!("reply: {e}")))?;
    let reply = crate::http::parse_reply(target, &raw, took).map_err(|e| fail(e.to_string()))?;
    Ok((reply.node, took))
}

/// `(serving node, connect time)` of each measured connection.
type Samples = Vec<(u32, Duration)>;

/// Alternates connections to `vip` and `plain` (`warmup` unmeasured pairs, then `count`
/// measured ones), so both see the same conditions. Returns the samples of each target and
/// the measured connections that failed (a failed one has no sample).
fn connect_samples(
    vip: SocketAddrV4,
    plain: SocketAddrV4,
    warmup: usize,
    count: usize,
    stop: &AtomicBool,
) -> Result<(Samples, Samples, Failures), BenchError> {
    let (mut v, mut p) = (Vec::with_capacity(count), Vec::with_capacity(count));
    let mut failed = Failures::default();
    for index in 0..warmup + count {
        if stop.load(Ordering::Relaxed) {
            return Err(BenchError::Interrupted);
        }
        for (to_vip, target) in [(true, vip), (false, plain)] {
            match connect_once(target, index) {
                Ok(sample) if index >= warmup => {
                    if to_vip { &mut v } else { &mut p }.push(sample);
                }
                Ok(_) => {}
                Err(e) if index >= warmup => failed.note(to_vip, &e),
                Err(_) => {}
            }
        }
    }
    Ok((v, p, failed))
}

/// Where the latency phases connect from and to.
struct Targets {
    /// The first client's namespace.
    ns: String,
    vip: SocketAddrV4,
    plain: SocketAddrV4,
    master_id: u32,
}

impl Targets {
    fn of(cluster: &Cluster) -> Result<Targets, BenchError> {
        let client = cluster
            .clients()
            .first()
            .ok_or(BenchError::Missing { what: "client" })?;
        Ok(Targets {
            ns: cluster.netns(&client.name),
            vip: cluster.vip(),
            plain: cluster.baseline_addr().ok_or(BenchError::Missing {
                what: "baseline server",
            })?,
            master_id: cluster.master()?.id,
        })
    }
}

/// Phase 1: connect() latency.
pub fn latency(
    cluster: &Cluster,
    opts: &BenchOptions,
    stop: &AtomicBool,
) -> Result<LatencyReport, BenchError> {
    let Targets {
        ns,
        vip,
        plain,
        master_id,
    } = Targets::of(cluster)?;
    let (via_vip, via_plain, failed) = netns::run_in(&ns, || {
        connect_samples(vip, plain, opts.warmup, opts.count, stop)
    })??;
    Ok(LatencyReport::split(
        &via_vip, &via_plain, master_id, failed,
    ))
}

impl LatencyReport {
    /// Splits VIP samples by whether the master served them.
    fn split(
        via_vip: &Samples,
        via_plain: &Samples,
        master_id: u32,
        failed: Failures,
    ) -> LatencyReport {
        let pick = |local: bool| -> Vec<Duration> {
            via_vip
                .iter()
                .filter(|(node, _)| (*node == master_id) == local)
                .map(|(_, d)| *d)
                .collect()
        };
        let plain: Vec<Duration> = via_plain.iter().map(|(_, d)| *d).collect();
        LatencyReport {
            master_local: Summary::of(&pick(true)),
            forwarded: Summary::of(&pick(false)),
            plain: Summary::of(&plain),
            failed,
        }
    }
}

/// utime + stime of a process.
pub fn process_cpu(pid: u32) -> Result<Duration, BenchError> {
    let bad = |reason: String| BenchError::ProcStat { pid, reason };
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| bad(e.to_string()))?;
    // Fields after the `(comm)`, which may itself contain spaces: state is field 3, utime 14
    // and stime 15 (proc(5)).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| bad("no comm".into()))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, BenchError> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("no field {i}")))
    };
    Ok(clock_ticks(ticks(14)? + ticks(15)?))
}

/// `ticks` of the kernel's `USER_HZ` clock (the unit of `/proc/<pid>/stat` and `/proc/stat`).
pub(crate) fn clock_ticks(ticks: u64) -> Duration {
    // SAFETY: sysconf(3) has no memory-safety preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Duration::from_micros(ticks * 1_000_000 / hz.max(1))
}

/// Phase 2: CPU per dispatched SYN.
pub fn syn_cpu(
    cluster: &Cluster,
    opts: &BenchOptions,
    stop: &Arc<AtomicBool>,
) -> Result<CpuReport, BenchError> {
    let client = cluster
        .clients()
        .first()
        .ok_or(BenchError::Missing { what: "client" })?;
    let ns = cluster.netns(&client.name);
    nft::drop_outgoing_rsts(&ns)?;
    let master = cluster.master()?.name.clone();
    let pid = cluster.daemon_pid(&master)?;
    let before_cpu = process_cpu(pid)?;
    let before = cluster.status(&master)?.counters.syns_dispatched;

    let src = client.addr;
    let vip = cluster.vip();
    let (count, limit) = (opts.syns, opts.max_duration);
    let stop2 = Arc::clone(stop);
    let (sent, send_time) = netns::run_in(&ns, move || {
        let sender = RawIpSender::new().map_err(BenchError::Raw)?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
        let mut syn = Syn {
            src,
            dst: *vip.ip(),
            sport: 0,
            dport: vip.port(),
            seq: 0,
            payload: Vec::new(),
        };
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < count {
            if sent & 1023 == 0 && (start.elapsed() > limit || stop2.load(Ordering::Relaxed)) {
                break;
            }
            syn.randomise(&mut x);
            match sender.send(&syn.ipv4_packet(), *vip.ip()) {
                Ok(_) => sent += 1,
                // The qdisc is full: give the receivers a moment.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => return Err(BenchError::Raw(e)),
            }
        }
        Ok((sent, start.elapsed()))
    })??;

    // Wait until the master has worked through its queue.
    let mut last = before;
    let settle_start = Instant::now();
    let mut stable = 0;
    while settle_start.elapsed() < SETTLE_TIMEOUT && stable < 3 {
        std::thread::sleep(Duration::from_millis(200));
        let now = cluster.status(&master)?.counters.syns_dispatched;
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
    }
    let after_cpu = process_cpu(pid)?;
    Ok(CpuReport {
        sent,
        send_time,
        dispatched: last.saturating_sub(before),
        cpu: after_cpu.saturating_sub(before_cpu),
    })
}

/// Results of the flooding ablation: master-local connects with the client frames flooded to
/// every node's stack (as in normal operation) and with the other nodes' client-side bridge
/// ports down (only the master's stack sees the frames), interleaved with plain connects.
#[derive(Debug, Clone)]
pub struct FloodReport {
    pub flooded: Option<Summary>,
    pub master_only: Option<Summary>,
    pub plain: Option<Summary>,
    pub failed: Failures,
}

/// Connections per batch of the ablation; batches of the two conditions alternate.
const ABLATION_BATCH: usize = 50;

/// Phase 1b: how much of the master-local overhead is the lab's flooding of every client frame
/// through every node's network stack, one after another in one kernel. The other nodes get
/// weight 0 (so every connection is master-local), then batches with their client-side bridge
/// ports up and down alternate; each batch interleaves VIP and plain connects. Weights and
/// ports are restored before returning, whatever happened.
pub fn flood_ablation(
    cluster: &Cluster,
    opts: &BenchOptions,
    stop: &AtomicBool,
) -> Result<FloodReport, BenchError> {
    let master = cluster.master()?.clone();
    let others: Vec<_> = cluster
        .nodes()
        .iter()
        .filter(|n| n.id != master.id)
        .cloned()
        .collect();
    // Bridge-side ports of the other nodes' eth0 (the client segment).
    let topo = cluster.lab().topology();
    let mut ports = Vec::new();
    for n in &others {
        for l in topo.links_of(&n.name) {
            let (mine, theirs) = if l.a.node == n.name {
                (&l.a, &l.b)
            } else {
                (&l.b, &l.a)
            };
            if mine.interface == "eth0" {
                ports.push((topo.netns_name(&theirs.node), theirs.interface.clone()));
            }
        }
    }
    let set_ports = |state: &str| -> Result<(), BenchError> {
        for (ns, port) in &ports {
            netns::ip(["-n", ns.as_str(), "link", "set", port.as_str(), state])?;
        }
        Ok(())
    };
    // The weights to restore, as the master sees them now.
    let before = cluster.status(&master.name)?.nodes;
    let weight_of = |id: u32| {
        before
            .iter()
            .find(|s| s.id == id)
            .map_or(1, |s| s.weight)
            .to_string()
    };
    let set_weights = |zero: bool| -> Result<(), BenchError> {
        for n in &others {
            let (id, w) = (
                n.id.to_string(),
                if zero { "0".into() } else { weight_of(n.id) },
            );
            cluster.ctl(&n.name, &["weight", id.as_str(), w.as_str()])?;
        }
        Ok(())
    };
    set_weights(true)?;
    // Reports carry the weights to the master.
    std::thread::sleep(Duration::from_secs(1));
    let Targets { ns, vip, plain, .. } = Targets::of(cluster)?;
    let batches = opts.count.div_ceil(ABLATION_BATCH).max(1);
    let run = || -> Result<FloodReport, BenchError> {
        let (mut flooded, mut master_only, mut plains) = (Vec::new(), Vec::new(), Vec::new());
        let mut failed = Failures::default();
        for b in 0..2 * batches {
            let isolate = b % 2 == 1;
            set_ports(if isolate { "down" } else { "up" })?;
            let (v, p, f) = netns::run_in(&ns, || {
                connect_samples(vip, plain, ABLATION_BATCH / 5, ABLATION_BATCH, stop)
            })??;
            failed.merge(f);
            if let Some((node, _)) = v.iter().find(|(node, _)| *node != master.id) {
                return Err(BenchError::Connect {
                    index: 0,
                    target: SocketAddr::V4(vip),
                    reason: format!("node {node} served a connection despite weight 0"),
                });
            }
            let into = if isolate {
                &mut master_only
            } else {
                &mut flooded
            };
            into.extend(v.into_iter().map(|(_, d)| d));
            plains.extend(p.into_iter().map(|(_, d)| d));
        }
        Ok(FloodReport {
            flooded: Summary::of(&flooded),
            master_only: Summary::of(&master_only),
            plain: Summary::of(&plains),
            failed,
        })
    };
    let result = run();
    let restored = set_ports("up")
        .and_then(|()| set_weights(false))
        .and_then(|()| wait_weights(cluster, &master.name, &before));
    let report = result?;
    restored?;
    Ok(report)
}

/// Waits (at most 5 s) until `master` sees every node's weight as in `want`: weights travel in
/// the nodes' reports, so a phase that follows must not start before they arrive.
fn wait_weights(
    cluster: &Cluster,
    master: &str,
    want: &[crate::status::NodeStatus],
) -> Result<(), BenchError> {
    let start = Instant::now();
    loop {
        let now = cluster.status(master)?.nodes;
        let same = want
            .iter()
            .all(|w| now.iter().any(|n| n.id == w.id && n.weight == w.weight));
        if same || start.elapsed() > Duration::from_secs(5) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Results of the placement comparison: the same connects with the scheduler placing every
/// thread, and with the client's thread and every daemon's data-path threads (`tdsc-master`,
/// `tdsc-member`) pinned to one CPU, in alternating batches.
#[derive(Debug, Clone)]
pub struct PlacementReport {
    pub cpu: usize,
    pub placed: LatencyReport,
    pub colocated: LatencyReport,
}

/// Sets the CPU affinity of thread `tid` (of any process) to `cpus`.
fn set_thread_affinity(tid: u32, cpus: &[usize]) -> std::io::Result<()> {
    let tid = libc::pid_t::try_from(tid).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set; CPU_SET writes
    // within it (indices are checked against CPU_SETSIZE first), and sched_setaffinity reads
    // exactly size_of::<cpu_set_t>() bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(std::io::ErrorKind::InvalidInput.into());
            }
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `(thread id, thread name)` of every thread of a process.
fn threads(pid: u32) -> Result<Vec<(u32, String)>, BenchError> {
    let bad = |reason: String| BenchError::ProcStat { pid, reason };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| bad(e.to_string()))? {
        let entry = entry.map_err(|e| bad(e.to_string()))?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) {
            out.push((tid, comm.trim().to_owned()));
        }
    }
    Ok(out)
}

fn all_threads(pid: u32) -> Result<Vec<u32>, BenchError> {
    Ok(threads(pid)?.into_iter().map(|(tid, _)| tid).collect())
}

/// Thread ids of a process's threads named `tdsc-master` or `tdsc-member`.
fn data_path_threads(pid: u32) -> Result<Vec<u32>, BenchError> {
    let tids: Vec<u32> = threads(pid)?
        .into_iter()
        .filter(|(_, name)| matches!(name.as_str(), "tdsc-master" | "tdsc-member"))
        .map(|(tid, _)| tid)
        .collect();
    let bad = |reason: String| BenchError::ProcStat { pid, reason };
    if tids.len() != 2 {
        return Err(bad(format!("expected 2 data-path threads, found {tids:?}")));
    }
    Ok(tids)
}

/// Phase 1c: the connects of phase 1, scheduler-placed and co-located on `cpu`, alternating in
/// batches. Co-located pins what `[threads] data_path_cpu` pins (the daemons' queue and
/// forward-receive threads), the HTTP servers (cluster nodes and baseline alike), and the
/// client's connecting thread, whose CPU runs the softirq of its packets through the lab's
/// veths. Affinities are restored (to every CPU) before returning.
pub fn placement(
    cluster: &Cluster,
    opts: &BenchOptions,
    cpu: usize,
    stop: &AtomicBool,
) -> Result<PlacementReport, BenchError> {
    let all: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let mut tids = Vec::new();
    for n in cluster.nodes() {
        tids.extend(data_path_threads(cluster.daemon_pid(&n.name)?)?);
    }
    // The HTTP servers too, on the cluster nodes and the baseline alike: the application
    // shares the CPU as it would on a tuned server.
    let servers = cluster
        .nodes()
        .iter()
        .map(|n| n.name.clone())
        .chain(cluster.baseline().map(|b| b.name.clone()));
    for name in servers {
        let pid = cluster
            .lab()
            .pid(&format!("httpd-{name}"))
            .map_err(ClusterError::from)?;
        tids.extend(all_threads(pid)?);
    }
    let pin_daemons = |cpus: &[usize]| -> Result<(), BenchError> {
        for &t in &tids {
            set_thread_affinity(t, cpus).map_err(BenchError::Raw)?;
        }
        Ok(())
    };
    let Targets {
        ns,
        vip,
        plain,
        master_id,
    } = Targets::of(cluster)?;
    let batches = opts.count.div_ceil(ABLATION_BATCH).max(1);
    let run = || -> Result<PlacementReport, BenchError> {
        let mut samples: [(Samples, Samples, Failures); 2] = Default::default();
        for b in 0..2 * batches {
            let colocate = b % 2 == 1;
            let one = [cpu];
            pin_daemons(if colocate { &one } else { &all })?;
            let (v, p, f) = netns::run_in(&ns, || {
                if colocate {
                    crate::wakeup::pin_current_thread(cpu).map_err(BenchError::Raw)?;
                }
                connect_samples(vip, plain, ABLATION_BATCH / 5, ABLATION_BATCH, stop)
            })??;
            let slot = &mut samples[usize::from(colocate)];
            slot.0.extend(v);
            slot.1.extend(p);
            slot.2.merge(f);
        }
        let [placed, colocated] = samples;
        Ok(PlacementReport {
            cpu,
            placed: LatencyReport::split(&placed.0, &placed.1, master_id, placed.2),
            colocated: LatencyReport::split(&colocated.0, &colocated.1, master_id, colocated.2),
        })
    };
    let result = run();
    let restored = pin_daemons(&all);
    let report = result?;
    restored?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_slow_connects_past_each_limit() {
        let ms = |v: u64| Duration::from_millis(v);
        let s = Summary::of(&[
            ms(1),
            ms(100),
            ms(101),
            ms(999),
            ms(1000),
            ms(1001),
            ms(3005),
        ])
        .expect("samples");
        assert_eq!(s.n, 7);
        assert_eq!((s.over_100ms, s.over_1s), (5, 2), "limits are exclusive");
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn failures_add_up_and_keep_five_examples() {
        let e = |i| BenchError::Connect {
            index: i,
            target: SocketAddr::V4(SocketAddrV4::new(std::net::Ipv4Addr::new(192, 0, 2, 1), 80)),
            reason: "connect: reset".into(),
        };
        let (mut a, mut b) = (Failures::default(), Failures::default());
        for i in 0..4 {
            a.note(true, &e(i));
            b.note(i % 2 == 0, &e(10 + i));
        }
        a.merge(b);
        assert_eq!((a.vip, a.plain), (6, 2));
        assert_eq!(a.examples.len(), 5);
        assert!(a.examples[4].contains("connection 10"), "{:?}", a.examples);
    }
}
