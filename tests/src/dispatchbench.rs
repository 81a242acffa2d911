//! The dispatch benchmark (issue 12): how many SYNs a second the master dispatches, how many
//! it loses, and what each costs, for each NFQUEUE reader (`[threads] queue_io`).
//!
//! One *run* offers crafted SYNs at a fixed rate for a fixed time and reads, before and after:
//!
//! * the master's `syns_dispatched`, its kernel queue drops (`drops.queue_kernel` and
//!   `drops.queue_user`), its reader's overruns (`queue.enobufs`), and the new SYN-forward
//!   records the Raft task had no room for (`records_handoff_overflow`, column `rec.ovf`);
//! * the master tdscd's `utime + stime` ([`crate::bench::process_cpu`]);
//! * the whole machine's busy time from `/proc/stat`: user, system, irq and softirq. Not nice,
//!   so that background work at a lower priority (a build) is left out, and not steal, the
//!   time the hypervisor gave this VM's CPUs to someone else (on this machine up to half of
//!   a CPU even when idle), which no work here did. This kernel has no IRQ time accounting, so softirq work is billed to whichever
//!   task runs: the whole machine is the figure that cannot hide any of it;
//! * the generator thread's own CPU time, and the backlog drops of `/proc/net/softnet_stat`
//!   (packets the lab's fabric lost before any node saw them).
//!
//! The generator sends from random addresses of the first client's /26 ([`CLIENT_SOURCE_LEN`]),
//! random source ports and ISNs, so that nearly every SYN is a new flow to conntrack as a new
//! connection is (nothing answers them: see below),
//! in batches every [`PERIOD`] (one `sendmmsg` per [`MAX_SEND_MANY`]), paced against the
//! clock; it sleeps between batches (with a timer slack of 1 ns), so it does not spin a CPU
//! that the figures would then bill. A run whose generator fell short of the offered rate
//! says so: that rate then measures the generator, not the master.
//!
//! Each run follows a *floor* run at the same rate ([`floor`]): the master drops the SYNs at
//! its client interface's ingress hook instead of queueing them. The floor is what the
//! generator and the lab's fabric up to the master cost; the run less the floor is what
//! dispatching costs ([`Run::dispatch_cost`]). Both measure the machine from just before the
//! generator starts to after the same settling (status polls until the master's counters
//! stand still; the floor polls as often as the quickest run does).
//!
//! What the setup isolates, so that the figures are the master's dispatch and little else:
//!
//! * the master has weight 0, so every SYN is forwarded to a member, and each member drops
//!   the forwards at its cluster interface's ingress hook ([`nft::sink_forwards`]) before
//!   its TCP answers them;
//! * the client bridge's ports to every node but the master (and to the other hosts) are
//!   down, so the client's frames reach the master's stack alone. What every other node pays
//!   for seeing every client frame is issue 13's benchmark, not this one;
//! * the client drops its own RSTs.
//!
//! On this machine the lab's fabric (the client's stack, a veth, the bridge, a veth) costs
//! more per SYN than the dispatch, and with only two CPUs it bounds what one generator can
//! offer: the floor column and the `gen` column say how much.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::bench::{clock_ticks, process_cpu, BenchError};
use crate::cluster::{Cluster, Host};
use crate::netns;
use crate::nft;
use crate::packet::{RawIpSender, Syn, MAX_SEND_MANY};

/// The generator sends one batch per period.
pub const PERIOD: Duration = Duration::from_micros(200);

/// How long the master's counters may keep moving after a run before they are read, how
/// often they are polled meanwhile, and how many unchanged polls end the wait.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
const SETTLE_POLL: Duration = Duration::from_millis(150);
const SETTLE_STABLE: u32 = 2;

/// The cluster's first client, which the generator sends from.
fn first_client(cluster: &Cluster) -> Result<Host, BenchError> {
    cluster
        .clients()
        .first()
        .cloned()
        .ok_or(BenchError::Missing { what: "client" })
}

/// The generator at `rate` for `duration` in `client`'s namespace, from its
/// [`CLIENT_SOURCE_LEN`] prefix to the VIP.
fn offer(
    cluster: &Cluster,
    client: &Host,
    rate: u64,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<Generated, BenchError> {
    let vip = cluster.vip();
    let sources = Sources::Spoofed {
        prefix: client.addr,
        len: CLIENT_SOURCE_LEN,
    };
    netns::run_in(&cluster.netns(&client.name), || {
        generate(sources, *vip.ip(), vip.port(), rate, duration, stop)
    })?
}

/// Where the generator's SYNs come from: the first client's /26, spoofed (in the lab
/// 192.0.2.64/26, which holds neither the VIP nor the plain server).
pub const CLIENT_SOURCE_LEN: u8 = 26;

/// The client and cluster interfaces of the lab's nodes.
const CLIENT_IF: &str = "eth0";
const CLUSTER_IF: &str = "eth1";

/// A run's generator is the limit if it sent less than this share of the offered SYNs.
pub const GENERATOR_SHORT: f64 = 0.97;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Run {
    /// Offered SYN/s.
    pub rate: u64,
    /// SYNs the generator sent, and in how long.
    pub sent: u64,
    pub send_time: Duration,
    /// The generator thread's own CPU time.
    pub generator_cpu: Duration,
    /// The master's `syns_dispatched`.
    pub dispatched: u64,
    /// New SYN-forward records not replicated for want of room (`records_handoff_overflow`;
    /// only with a Raft election).
    pub records_unreplicated: u64,
    /// The master's kernel queue drops (queue full, socket full) and reader overruns.
    pub queue_dropped: u64,
    pub overruns: u64,
    /// Packets the machine's receive backlogs dropped (`/proc/net/softnet_stat`).
    pub backlog_dropped: u64,
    /// The master tdscd's CPU time.
    pub master_cpu: Duration,
    /// The whole machine's busy time (all CPUs), and its softirq part.
    pub machine_busy: Duration,
    pub machine_softirq: Duration,
    /// The floor run just before this one ([`floor`]).
    pub floor: Floor,
}

/// A floor run: the same generator at the same rate, with the master dropping the SYNs at its
/// client interface's ingress hook, so nothing is queued or dispatched: what the generator,
/// the client's stack and the bridge cost (the other nodes are off the bridge, see
/// [`prepare`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Floor {
    pub sent: u64,
    pub send_time: Duration,
    pub machine_busy: Duration,
}

impl Floor {
    /// The machine's busy time per SYN sent, in µs.
    #[must_use]
    pub fn per_sent(&self) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^53")]
        let n = self.sent.max(1) as f64;
        self.machine_busy.as_secs_f64() * 1e6 / n
    }
}

impl Run {
    /// Adds `other`'s counts and times to these (its rate and anything else left alone): the
    /// sum of several runs at one rate reads as one long run.
    pub fn add(&mut self, other: &Run) {
        self.sent += other.sent;
        self.send_time += other.send_time;
        self.generator_cpu += other.generator_cpu;
        self.dispatched += other.dispatched;
        self.records_unreplicated += other.records_unreplicated;
        self.queue_dropped += other.queue_dropped;
        self.overruns += other.overruns;
        self.backlog_dropped += other.backlog_dropped;
        self.master_cpu += other.master_cpu;
        self.machine_busy += other.machine_busy;
        self.machine_softirq += other.machine_softirq;
        self.floor.sent += other.floor.sent;
        self.floor.send_time += other.floor.send_time;
        self.floor.machine_busy += other.floor.machine_busy;
    }

    /// SYNs sent that the master did not dispatch, in % of those sent.
    #[must_use]
    pub fn lost_percent(&self) -> f64 {
        percent(self.sent.saturating_sub(self.dispatched), self.sent)
    }

    /// SYNs the generator sent per second.
    #[must_use]
    pub fn sent_rate(&self) -> f64 {
        per_second(self.sent, self.send_time)
    }

    /// SYNs dispatched per second of sending.
    #[must_use]
    pub fn dispatched_rate(&self) -> f64 {
        per_second(self.dispatched, self.send_time)
    }

    /// The generator fell short of the offered rate.
    #[must_use]
    pub fn generator_short(&self) -> bool {
        #[allow(clippy::cast_precision_loss, reason = "rates are far below 2^53")]
        let offered = self.rate as f64;
        self.sent_rate() < offered * GENERATOR_SHORT
    }

    /// What dispatching cost the whole machine per dispatched SYN, in µs: this run's busy
    /// time less the floor's busy time per SYN for as many SYNs as this run sent.
    #[must_use]
    pub fn dispatch_cost(&self) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^53")]
        let (sent, n) = (self.sent as f64, self.dispatched.max(1) as f64);
        (self.machine_busy.as_secs_f64() * 1e6 - self.floor.per_sent() * sent) / n
    }

    /// `cpu` per dispatched SYN, in µs.
    #[must_use]
    pub fn per_syn(&self, cpu: Duration) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^53")]
        let n = self.dispatched.max(1) as f64;
        cpu.as_secs_f64() * 1e6 / n
    }
}

#[allow(clippy::cast_precision_loss, reason = "counts are far below 2^53")]
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

#[allow(clippy::cast_precision_loss, reason = "counts are far below 2^53")]
fn per_second(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// Sets up a started cluster for the runs (see the module docs): the master's weight 0, the
/// members' sinks, the client's RST drop. Returns the master's name.
pub fn prepare(cluster: &Cluster) -> Result<String, BenchError> {
    let client = cluster
        .clients()
        .first()
        .ok_or(BenchError::Missing { what: "client" })?;
    nft::drop_outgoing_rsts(&cluster.netns(&client.name))?;
    let master = cluster.master()?.clone();
    for n in cluster.nodes().iter().filter(|n| n.id != master.id) {
        nft::sink_forwards(&cluster.netns(&n.name), CLUSTER_IF)?;
    }
    isolate(cluster, &client.name, &master.name)?;
    let id = master.id.to_string();
    cluster.ctl(&master.name, &["weight", id.as_str(), "0"])?;
    // The weight reaches the policy with the master's own next report.
    let start = Instant::now();
    loop {
        let w = cluster
            .status(&master.name)?
            .nodes
            .iter()
            .find(|n| n.id == master.id)
            .map(|n| n.weight);
        if w == Some(0) {
            return Ok(master.name);
        }
        if start.elapsed() > Duration::from_secs(5) {
            return Err(BenchError::Setup(format!(
                "{} did not see its own weight 0 within 5 s",
                master.name
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes down every port of the client's bridge but the client's and the master's, so the
/// client's frames reach the master's stack alone (see the module docs). Returns how many.
fn isolate(cluster: &Cluster, client: &str, master: &str) -> Result<usize, BenchError> {
    let topo = cluster.lab().topology();
    let bridge = topo
        .links_of(client)
        .find_map(|l| {
            let other = if l.a.node == client { &l.b } else { &l.a };
            topo.nodes
                .get(&other.node)
                .is_some_and(|n| n.kind == crate::topology::Kind::Bridge)
                .then(|| other.node.clone())
        })
        .ok_or(BenchError::Missing {
            what: "bridge for the client",
        })?;
    let mut down = 0;
    for l in topo.links_of(&bridge) {
        let (port, far) = if l.a.node == bridge {
            (&l.a, &l.b)
        } else {
            (&l.b, &l.a)
        };
        if far.node == client || far.node == master {
            continue;
        }
        let ns = topo.netns_name(&bridge);
        netns::ip([
            "-n",
            ns.as_str(),
            "link",
            "set",
            port.interface.as_str(),
            "down",
        ])?;
        down += 1;
    }
    Ok(down)
}

/// The counters one run reads before and after.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    dispatched: u64,
    records_unreplicated: u64,
    queue_dropped: u64,
    overruns: u64,
    master_cpu: Duration,
    machine: MachineTimes,
    backlog_dropped: u64,
}

impl Snapshot {
    /// Takes the counters; the machine's times are read first when `machine_first` (after a
    /// run, so that reading the rest is not billed to it) and last otherwise (before one).
    fn take(
        cluster: &Cluster,
        master: &str,
        pid: u32,
        machine_first: bool,
    ) -> Result<Snapshot, BenchError> {
        let early = if machine_first {
            Some(MachineTimes::read()?)
        } else {
            None
        };
        let c = cluster.status(master)?.counters;
        Ok(Snapshot {
            dispatched: c.syns_dispatched,
            records_unreplicated: c.records_handoff_overflow,
            queue_dropped: c.drops.queue_kernel + c.drops.queue_user,
            overruns: c.queue.enobufs,
            master_cpu: process_cpu(pid)?,
            backlog_dropped: backlog_dropped()?,
            machine: match early {
                Some(m) => m,
                None => MachineTimes::read()?,
            },
        })
    }
}

/// The floor at `rate` SYN/s for `duration` (see [`Floor`]); the master's ingress drop is
/// removed again whatever happens.
pub fn floor(
    cluster: &Cluster,
    master: &str,
    rate: u64,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<Floor, BenchError> {
    let client = first_client(cluster)?;
    let vip = cluster.vip();
    let ns = cluster.netns(master);
    nft::sink_syns(&ns, CLIENT_IF, vip)?;
    let measured = (|| -> Result<Floor, BenchError> {
        let before = MachineTimes::read()?;
        let generated = offer(cluster, &client, rate, duration, stop)?;
        // As much settling as the quickest run has: SETTLE_STABLE + 1 polls.
        for _ in 0..=SETTLE_STABLE {
            std::thread::sleep(SETTLE_POLL);
            cluster.status(master)?;
        }
        let machine = MachineTimes::read()?.since(&before);
        Ok(Floor {
            sent: generated.sent,
            send_time: generated.elapsed,
            machine_busy: machine.busy,
        })
    })();
    let removed = nft::unsink_syns(&ns);
    let f = measured?;
    removed?;
    Ok(f)
}

/// One run at `rate` SYN/s for `duration` against a [`prepare`]d cluster, after its floor.
pub fn run(
    cluster: &Cluster,
    master: &str,
    rate: u64,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<Run, BenchError> {
    let client = first_client(cluster)?;
    let floor = floor(cluster, master, rate, duration, stop)?;
    let pid = cluster.daemon_pid(master)?;
    let before = Snapshot::take(cluster, master, pid, false)?;
    let generated = offer(cluster, &client, rate, duration, stop)?;
    // Wait until the master has worked through its queue.
    let (mut last, mut stable) = (before.dispatched, 0);
    let settle = Instant::now();
    while settle.elapsed() < SETTLE_TIMEOUT && stable < SETTLE_STABLE {
        std::thread::sleep(SETTLE_POLL);
        let now = cluster.status(master)?.counters.syns_dispatched;
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
    }
    let after = Snapshot::take(cluster, master, pid, true)?;
    let machine = after.machine.since(&before.machine);
    Ok(Run {
        rate,
        sent: generated.sent,
        send_time: generated.elapsed,
        generator_cpu: generated.cpu,
        dispatched: after.dispatched.saturating_sub(before.dispatched),
        records_unreplicated: after
            .records_unreplicated
            .saturating_sub(before.records_unreplicated),
        queue_dropped: after.queue_dropped.saturating_sub(before.queue_dropped),
        overruns: after.overruns.saturating_sub(before.overruns),
        backlog_dropped: after.backlog_dropped.saturating_sub(before.backlog_dropped),
        master_cpu: after.master_cpu.saturating_sub(before.master_cpu),
        machine_busy: machine.busy,
        machine_softirq: machine.softirq,
        floor,
    })
}

/// What the generator did.
#[derive(Debug, Clone, Copy)]
pub struct Generated {
    pub sent: u64,
    pub elapsed: Duration,
    /// The generator thread's CPU time.
    pub cpu: Duration,
}

/// Where the generator's SYNs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sources {
    /// One address (the namespace's own), random ports.
    One(Ipv4Addr),
    /// Random addresses of a prefix (spoofed), random ports.
    Spoofed { prefix: Ipv4Addr, len: u8 },
}

impl Sources {
    fn pick(self, random: u32) -> Ipv4Addr {
        match self {
            Sources::One(a) => a,
            Sources::Spoofed { prefix, len } => {
                let host_mask = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                Ipv4Addr::from((u32::from(prefix) & !host_mask) | (random & host_mask))
            }
        }
    }
}

/// Sends SYNs from `src` to `dst:dport` at `rate` a second for `duration` (or until `stop`),
/// in the calling thread's namespace. See the module docs for the pacing.
pub fn generate(
    src: Sources,
    dst: Ipv4Addr,
    dport: u16,
    rate: u64,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<Generated, BenchError> {
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes plain integers and changes only this thread.
    unsafe {
        libc::prctl(
            libc::PR_SET_TIMERSLACK,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        );
    }
    let sender = RawIpSender::new().map_err(BenchError::Raw)?;
    let cpu_before = thread_cpu();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()) ^ rate;
    let mut syn = Syn {
        src: src.pick(0),
        dst,
        sport: 0,
        dport,
        seq: 0,
        payload: Vec::new(),
    };
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(MAX_SEND_MANY);
    let mut sent = 0u64;
    let start = Instant::now();
    let mut due_at = start;
    loop {
        let now = Instant::now();
        let elapsed = now - start;
        if elapsed >= duration || stop.load(Ordering::Relaxed) {
            break;
        }
        if now < due_at {
            std::thread::sleep(due_at - now);
            continue;
        }
        // What the clock says should have been sent by now, at most one call's worth more.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a count of SYNs, far below 2^53"
        )]
        let due = (elapsed.as_secs_f64() * rate as f64) as u64;
        let want = usize::try_from(due.saturating_sub(sent))
            .unwrap_or(MAX_SEND_MANY)
            .min(MAX_SEND_MANY);
        if want == 0 {
            due_at = now + PERIOD;
            continue;
        }
        batch.clear();
        for _ in 0..want {
            let bits = syn.randomise(&mut x);
            syn.src = src.pick(u32::from_le_bytes([bits[4], bits[5], bits[6], bits[7]]));
            batch.push(syn.ipv4_packet());
        }
        match sender.send_many(&batch, dst) {
            Ok(n) => sent += n as u64,
            // The qdisc is full: give the receivers a moment.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => return Err(BenchError::Raw(e)),
        }
        // Caught up: the next batch is due one period on.
        if sent >= due {
            due_at = Instant::now() + PERIOD;
        }
    }
    Ok(Generated {
        sent,
        elapsed: start.elapsed(),
        cpu: thread_cpu().saturating_sub(cpu_before),
    })
}

/// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu() -> Duration {
    // SAFETY: timespec is plain old data; clock_gettime writes exactly one into `ts`.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts);
        ts
    };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The machine's CPU time from the `cpu` line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTimes {
    /// user + system + irq + softirq (not nice, not steal).
    pub busy_ticks: u64,
    pub softirq_ticks: u64,
}

/// Busy time between two [`MachineTimes`].
#[derive(Debug, Clone, Copy)]
pub struct MachineDelta {
    pub busy: Duration,
    pub softirq: Duration,
}

impl MachineTimes {
    /// Reads `/proc/stat`.
    pub fn read() -> Result<MachineTimes, BenchError> {
        let text = std::fs::read_to_string("/proc/stat").map_err(|e| BenchError::ProcStat {
            pid: 0,
            reason: format!("/proc/stat: {e}"),
        })?;
        MachineTimes::parse(&text).ok_or_else(|| BenchError::ProcStat {
            pid: 0,
            reason: "/proc/stat has no cpu line".into(),
        })
    }

    /// Parses the aggregate `cpu` line (proc(5)): user nice system idle iowait irq softirq
    /// steal ...
    #[must_use]
    pub fn parse(text: &str) -> Option<MachineTimes> {
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        Some(MachineTimes {
            busy_ticks: at(0) + at(2) + at(5) + at(6),
            softirq_ticks: at(6),
        })
    }

    fn since(&self, earlier: &MachineTimes) -> MachineDelta {
        MachineDelta {
            busy: clock_ticks(self.busy_ticks.saturating_sub(earlier.busy_ticks)),
            softirq: clock_ticks(self.softirq_ticks.saturating_sub(earlier.softirq_ticks)),
        }
    }
}

/// Packets dropped by the receive backlogs of all CPUs (second column of
/// `/proc/net/softnet_stat`, hexadecimal; the file is the same in every namespace).
pub fn backlog_dropped() -> Result<u64, BenchError> {
    let text =
        std::fs::read_to_string("/proc/net/softnet_stat").map_err(|e| BenchError::ProcStat {
            pid: 0,
            reason: format!("/proc/net/softnet_stat: {e}"),
        })?;
    Ok(parse_softnet_dropped(&text))
}

/// The sum of the second column of `softnet_stat` text.
#[must_use]
pub fn parse_softnet_dropped(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_is_everything_but_idle_iowait_nice_and_steal() {
        let text = "cpu  100 2 30 5000 7 0 11 1 0 0\ncpu0 50 1 15 2500 3 0 5 0 0 0\n";
        assert_eq!(
            MachineTimes::parse(text),
            Some(MachineTimes {
                busy_ticks: 100 + 30 + 11,
                softirq_ticks: 11,
            })
        );
        assert_eq!(MachineTimes::parse("intr 1 2 3\n"), None);
        assert_eq!(MachineTimes::parse("cpu  1 x 3\n"), None);
    }

    #[test]
    fn softnet_drops_sum_the_second_column_of_every_cpu() {
        let text = "0000a1b2 00000010 00000000 00000000\n0000ffff 0000000a 00000001 00000000\n";
        assert_eq!(parse_softnet_dropped(text), 0x10 + 0x0a);
        assert_eq!(parse_softnet_dropped(""), 0);
    }

    fn run_of(rate: u64, sent: u64, dispatched: u64, secs: u64) -> Run {
        Run {
            rate,
            sent,
            send_time: Duration::from_secs(secs),
            generator_cpu: Duration::ZERO,
            dispatched,
            records_unreplicated: 0,
            queue_dropped: 0,
            overruns: 0,
            backlog_dropped: 0,
            master_cpu: Duration::from_millis(200),
            machine_busy: Duration::ZERO,
            machine_softirq: Duration::ZERO,
            floor: Floor::default(),
        }
    }

    #[test]
    fn a_run_knows_its_loss_its_cost_and_whether_the_generator_kept_up() {
        let r = run_of(100_000, 200_000, 150_000, 2);
        assert!((r.lost_percent() - 25.0).abs() < 1e-9);
        assert!((r.dispatched_rate() - 75_000.0).abs() < 1e-6);
        assert!((r.per_syn(r.master_cpu) - 200_000.0 / 150_000.0).abs() < 1e-9);
        assert!(!r.generator_short());
        assert!(run_of(100_000, 190_000, 190_000, 2).generator_short());
        assert!((run_of(1, 0, 0, 1).lost_percent()).abs() < 1e-9);
    }

    #[test]
    fn spoofed_sources_stay_inside_their_prefix() {
        let flood = Sources::Spoofed {
            prefix: Ipv4Addr::new(192, 0, 2, 200),
            len: 25,
        };
        assert_eq!(flood.pick(0), Ipv4Addr::new(192, 0, 2, 128));
        assert_eq!(flood.pick(u32::MAX), Ipv4Addr::new(192, 0, 2, 255));
        assert_eq!(flood.pick(5), Ipv4Addr::new(192, 0, 2, 133));
        let one = Sources::One(Ipv4Addr::new(192, 0, 2, 101));
        assert_eq!(one.pick(12345), Ipv4Addr::new(192, 0, 2, 101));
    }

    #[test]
    fn the_dispatch_cost_is_the_run_less_the_floor_for_as_many_syns() {
        let mut r = run_of(100_000, 200_000, 100_000, 2);
        r.machine_busy = Duration::from_millis(3000);
        // 10 µs per SYN sent on the floor: 2 s of the run's 3 s.
        r.floor = Floor {
            sent: 100_000,
            send_time: Duration::from_secs(1),
            machine_busy: Duration::from_millis(1000),
        };
        assert!((r.dispatch_cost() - 10.0).abs() < 1e-9);
    }
}
