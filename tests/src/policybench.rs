//! `tdsc-lab bench-policies`: the paper's Table 4 experiment (§5.3) on the lab.
//!
//! Every node runs `tdsc-lab-httpd` in CGI mode (worker slots, bimodal service time, slept:
//! see that binary's docs) and writes its busy/queued count to a load file that its tdscd
//! reads for `least-load`. Both clients open connections open-loop, with Poisson arrivals, at
//! a rate set as a fraction of the cluster's capacity (nodes × slots / mean service time), as
//! httperf did for the paper. Per request we measure the connect time and the reply time
//! (request sent → first byte of the answer). The policies run one after another on the same
//! cluster, switched with `tdscctl policy set`, each after the cluster has gone idle.
//!
//! Node utilisation is sampled every 100 ms from the load files (busy slots / slots); the
//! report gives, per run, the mean over samples of the minimum, mean and maximum across
//! nodes (paper Fig. 8/9).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, ClusterError};
use crate::http;
use crate::netns::{self, NetnsError};

/// How the benchmark runs.
#[derive(Debug, Clone)]
pub struct PolicyBenchOptions {
    pub policies: Vec<String>,
    /// Offered load as fractions of capacity, e.g. 0.7 and 0.9.
    pub loads: Vec<f64>,
    pub duration: Duration,
    pub slots: u32,
    pub short_ms: u64,
    pub long_ms: u64,
    pub long_frac: f64,
    pub seed: u64,
}

impl PolicyBenchOptions {
    /// Mean service time in seconds.
    pub fn mean_service(&self) -> f64 {
        // Millisecond counts are small; f64 holds them exactly.
        #[allow(
            clippy::cast_precision_loss,
            reason = "counts and milliseconds here are far below 2^53"
        )]
        let (s, l) = (self.short_ms as f64, self.long_ms as f64);
        ((1.0 - self.long_frac) * s + self.long_frac * l) / 1000.0
    }

    /// The arguments that put `tdsc-lab-httpd` in this CGI mode.
    pub fn httpd_args(&self) -> Vec<String> {
        vec![
            "--cgi-slots".into(),
            self.slots.to_string(),
            "--short-ms".into(),
            self.short_ms.to_string(),
            "--long-ms".into(),
            self.long_ms.to_string(),
            "--long-frac".into(),
            self.long_frac.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyBenchError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cluster did not go idle: {0}")]
    NotIdle(String),
    #[error("a client thread panicked")]
    Panicked,
}

/// Mean, median and 99th percentile, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

impl Stats {
    pub fn of(mut v: Vec<f64>) -> Stats {
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        #[allow(
            clippy::cast_precision_loss,
            reason = "counts and milliseconds here are far below 2^53"
        )]
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let at = |q: f64| {
            // An index into a sorted, non-empty sample; rounding and clamping keep it valid.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "an index into a sorted, non-empty sample, rounded and clamped"
            )]
            let i = ((v.len() - 1) as f64 * q).round() as usize;
            v[i.min(v.len() - 1)]
        };
        Stats {
            mean,
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
struct Sample {
    connect: Option<Duration>,
    reply: Option<Duration>,
    node: Option<u32>,
}

/// One (policy, load) run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub policy: String,
    pub load: f64,
    pub rate: f64,
    pub sent: usize,
    pub failures: usize,
    pub connect: Stats,
    pub reply: Stats,
    /// Replies per node id.
    pub per_node: BTreeMap<u32, u64>,
    /// Mean over samples of the min / mean / max utilisation across nodes.
    pub util: (f64, f64, f64),
    /// Utilisation samples: seconds since start, min, mean, max across nodes.
    pub util_series: Vec<(f64, f64, f64, f64)>,
}

/// Reads `<load> <busy>` from a load file.
fn read_busy(path: &PathBuf) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Waits until no node has a busy or queued request.
fn wait_idle(cluster: &Cluster, timeout: Duration) -> Result<(), PolicyBenchError> {
    let files: Vec<PathBuf> = cluster
        .nodes()
        .iter()
        .filter_map(|n| n.load_file.clone())
        .collect();
    let start = Instant::now();
    loop {
        let figures: Vec<_> = files.iter().map(read_busy).collect();
        if figures.iter().all(|f| matches!(f, Some((0, _)))) {
            // One more report interval, so the master's view is idle too.
            std::thread::sleep(Duration::from_millis(500));
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(PolicyBenchError::NotIdle(format!("{figures:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// xorshift64* for arrival times; seeded per client and run.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        // The top 53 bits make an exact f64 in [0, 1).
        #[allow(
            clippy::cast_precision_loss,
            reason = "counts and milliseconds here are far below 2^53"
        )]
        let u = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        u
    }

    /// Exponential inter-arrival time for `rate` per second.
    fn exp(&mut self, rate: f64) -> Duration {
        Duration::from_secs_f64(-(1.0 - self.uniform()).ln() / rate)
    }
}

fn one_request(vip: SocketAddr) -> Sample {
    let mut s = Sample {
        connect: None,
        reply: None,
        node: None,
    };
    let t0 = Instant::now();
    let Ok(mut stream) = TcpStream::connect_timeout(&vip, Duration::from_secs(10)) else {
        return s;
    };
    s.connect = Some(t0.elapsed());
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    if stream.write_all(&http::request_bytes("/cgi")).is_err() {
        return s;
    }
    let sent = Instant::now();
    let mut buf = [0u8; 1024];
    let mut raw = Vec::new();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.reply.is_none() {
                    s.reply = Some(sent.elapsed());
                }
                raw.extend_from_slice(&buf[..n]);
            }
            Err(_) => {
                s.reply = None;
                return s;
            }
        }
    }
    s.node = http::parse_reply(vip, &raw, Duration::ZERO)
        .ok()
        .map(|r| r.node);
    if s.node.is_none() {
        s.reply = None;
    }
    s
}

/// Open-loop Poisson arrivals from one client namespace for `duration`.
fn client_load(
    ns: &str,
    vip: SocketAddr,
    rate: f64,
    duration: Duration,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Vec<Sample>, NetnsError>> {
    netns::spawn_in(ns, move || {
        let mut rng = Rng(seed | 1);
        let start = Instant::now();
        let mut next = Duration::ZERO;
        let mut handles = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            next += rng.exp(rate);
            if next > duration {
                break;
            }
            let now = start.elapsed();
            if next > now {
                std::thread::sleep(next - now);
            }
            // Threads inherit the namespace of the thread that creates them.
            handles.push(std::thread::spawn(move || one_request(vip)));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or(Sample {
                    connect: None,
                    reply: None,
                    node: None,
                })
            })
            .collect()
    })
}

/// Runs every policy at every load on one cluster (started with the options' httpd args and
/// load files), printing a line per run.
pub fn run(
    cluster: &Cluster,
    opts: &PolicyBenchOptions,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<RunResult>, PolicyBenchError> {
    let master = cluster.master()?.name.clone();
    let vip = SocketAddr::V4(cluster.vip());
    let mut results = Vec::new();
    for (li, load) in opts.loads.iter().enumerate() {
        for policy in &opts.policies {
            if stop.load(Ordering::Relaxed) {
                return Ok(results);
            }
            cluster.ctl(&master, &["policy", "set", policy])?;
            wait_idle(cluster, Duration::from_secs(60))?;
            let r = measure(cluster, opts, policy, *load, li, vip, stop)?;
            println!("{}", row(&r));
            results.push(r);
        }
    }
    Ok(results)
}

fn capacity(cluster: &Cluster, opts: &PolicyBenchOptions) -> f64 {
    #[allow(
        clippy::cast_precision_loss,
        reason = "counts and milliseconds here are far below 2^53"
    )]
    let nodes = cluster.nodes().len() as f64;
    nodes * f64::from(opts.slots) / opts.mean_service()
}

/// One run: open-loop arrivals at `load` × capacity to `target` for the configured duration,
/// with utilisation sampled meanwhile; `label` names the run.
fn measure(
    cluster: &Cluster,
    opts: &PolicyBenchOptions,
    label: &str,
    load: f64,
    li: usize,
    target: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> Result<RunResult, PolicyBenchError> {
    let vip = target;
    let policy = label;
    let clients: Vec<String> = cluster
        .clients()
        .iter()
        .map(|c| cluster.netns(&c.name))
        .collect();
    let files: Vec<PathBuf> = cluster
        .nodes()
        .iter()
        .filter_map(|n| n.load_file.clone())
        .collect();
    let capacity = capacity(cluster, opts);
    let rate = capacity * load;
    #[allow(
        clippy::cast_precision_loss,
        reason = "counts and milliseconds here are far below 2^53"
    )]
    let per_client = rate / clients.len() as f64;
    // The same arrival sequence for every policy at one load: only the policy differs.
    let handles: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(ci, ns)| {
            let (li, ci) = (
                u64::try_from(li).unwrap_or(0),
                u64::try_from(ci).unwrap_or(0),
            );
            let seed = opts.seed ^ (li << 32) ^ (ci + 1).wrapping_mul(0x9e37_79b9);
            client_load(ns, vip, per_client, opts.duration, seed, Arc::clone(stop))
        })
        .collect();
    // Utilisation sampler on this thread while the clients run.
    let start = Instant::now();
    let mut series = Vec::new();
    while start.elapsed() < opts.duration && !stop.load(Ordering::Relaxed) {
        let busy: Vec<f64> = files
            .iter()
            .map(|f| read_busy(f).map_or(0.0, |(_, b)| f64::from(b) / f64::from(opts.slots)))
            .collect();
        let min = busy.iter().copied().fold(f64::INFINITY, f64::min);
        let max = busy.iter().copied().fold(0.0, f64::max);
        #[allow(
            clippy::cast_precision_loss,
            reason = "counts and milliseconds here are far below 2^53"
        )]
        let mean = busy.iter().sum::<f64>() / busy.len().max(1) as f64;
        series.push((start.elapsed().as_secs_f64(), min, mean, max));
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut samples = Vec::new();
    for h in handles {
        samples.extend(h.join().map_err(|_| PolicyBenchError::Panicked)??);
    }
    let failures = samples.iter().filter(|s| s.reply.is_none()).count();
    let mut per_node = BTreeMap::new();
    for s in &samples {
        if let Some(n) = s.node {
            *per_node.entry(n).or_insert(0u64) += 1;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    #[allow(
        clippy::cast_precision_loss,
        reason = "counts and milliseconds here are far below 2^53"
    )]
    let avg = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        series.iter().map(f).sum::<f64>() / series.len().max(1) as f64
    };
    let r = RunResult {
        policy: policy.to_owned(),
        load,
        rate,
        sent: samples.len(),
        failures,
        connect: Stats::of(samples.iter().filter_map(|s| s.connect).map(ms).collect()),
        reply: Stats::of(samples.iter().filter_map(|s| s.reply).map(ms).collect()),
        per_node,
        util: (avg(|s| s.1), avg(|s| s.2), avg(|s| s.3)),
        util_series: series,
    };
    Ok(r)
}

/// The two baselines without tcp-dsc, on a cluster started without daemons (servers and load
/// files only):
///
/// * `haproxy-leastconn`: HAProxy in TCP mode with `balance leastconn` in a namespace of its
///   own on the client bridge (front 192.0.2.50), proxying to per-node addresses
///   192.0.2.11-13 — the representative-node design: one extra hop and one point of failure.
/// * `xt_cluster`: the kernel's static distributed clustering. Every node holds the VIP and
///   the cluster MAC (source MAC masked on egress, as tcp-dsc does, so the learning bridge
///   floods), and a mangle rule drops every flow that `-m cluster` (a Jenkins hash of the
///   *client address* only) does not assign to the node.
pub fn run_baselines(
    cluster: &mut Cluster,
    opts: &PolicyBenchOptions,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<RunResult>, PolicyBenchError> {
    let nodes: Vec<(String, u32)> = cluster
        .nodes()
        .iter()
        .map(|n| (cluster.netns(&n.name), n.id))
        .collect();
    let port = cluster.vip().port();
    let total = nodes.len().to_string();
    // HAProxy.
    let mut cfg = format!(
        "global\n  maxconn 8192\ndefaults\n  mode tcp\n  timeout connect 10s\n  \
         timeout client 60s\n  timeout server 60s\nfrontend front\n  bind 192.0.2.50:{port}\n  \
         default_backend cgi\nbackend cgi\n  balance leastconn\n"
    );
    for (ns, id) in &nodes {
        sh(ns, &format!("ip addr add 192.0.2.1{id}/24 dev eth0"))?;
        cfg.push_str(&format!("  server n{id} 192.0.2.1{id}:{port}\n"));
    }
    let hns = cluster
        .lab_mut()
        .attach_host("haproxy", "br-client", "hap0", "192.0.2.50/24")
        .map_err(ClusterError::from)?;
    let cfg_path = cluster.lab().workdir().join("haproxy.cfg");
    std::fs::write(&cfg_path, cfg).map_err(|e| PolicyBenchError::NotIdle(e.to_string()))?;
    let mut haproxy = std::process::Command::new("ip")
        .args(["netns", "exec", &hns, "haproxy", "-db", "-f"])
        .arg(&cfg_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| PolicyBenchError::NotIdle(format!("cannot start haproxy: {e}")))?;
    std::thread::sleep(Duration::from_millis(500));
    let front = SocketAddr::from(([192, 0, 2, 50], port));
    let mut results = Vec::new();
    let mut outcome = Ok(());
    for (li, load) in opts.loads.iter().enumerate() {
        if let Err(e) = wait_idle(cluster, Duration::from_secs(60)) {
            outcome = Err(e);
            break;
        }
        match measure(cluster, opts, "haproxy-leastconn", *load, li, front, stop) {
            Ok(r) => {
                println!("{}", row(&r));
                results.push(r);
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    outcome?;

    // xt_cluster.
    let vip = cluster.vip();
    for (i, (ns, id)) in nodes.iter().enumerate() {
        sh(ns, "ip link set eth0 address 02:bf:c0:00:02:01")?;
        sh(ns, &format!("ip addr add {}/24 dev eth0", vip.ip()))?;
        sh(
            ns,
            &format!(
                "nft add table netdev xtc && nft add chain netdev xtc egress \
                 '{{ type filter hook egress device eth0 priority 0; }}' && \
                 nft add rule netdev xtc egress ether saddr set 02:{id:02x}:c0:00:02:01"
            ),
        )?;
        sh(
            ns,
            &format!(
                "iptables -t mangle -A PREROUTING -i eth0 -d {ip} -m cluster \
                 --cluster-total-nodes {total} --cluster-local-node {n} \
                 --cluster-hash-seed 0xdeadbeef -j MARK --set-mark 0xffff && \
                 iptables -t mangle -A PREROUTING -i eth0 -d {ip} -m mark ! --mark 0xffff -j DROP",
                ip = vip.ip(),
                n = i + 1
            ),
        )?;
    }
    for (li, load) in opts.loads.iter().enumerate() {
        wait_idle(cluster, Duration::from_secs(60))?;
        let r = measure(
            cluster,
            opts,
            "xt_cluster",
            *load,
            li,
            SocketAddr::V4(vip),
            stop,
        )?;
        println!("{}", row(&r));
        results.push(r);
    }
    Ok(results)
}

fn sh(ns: &str, cmd: &str) -> Result<(), PolicyBenchError> {
    netns::exec(ns, "sh", ["-c", cmd])?;
    Ok(())
}

/// The table header matching [`row`].
pub fn header() -> String {
    format!(
        "| {:<20} | {:>4} | {:>5} | {:>5} | {:>4} | {:>24} | {:>24} | {:>17} | {:<16} |\n|{}",
        "policy",
        "load",
        "req/s",
        "sent",
        "fail",
        "connect ms mean/p50/p99",
        "reply ms mean/p50/p99",
        "util min/mean/max",
        "replies per node",
        "---|".repeat(9)
    )
}

pub fn row(r: &RunResult) -> String {
    let nodes: Vec<String> = r.per_node.values().map(u64::to_string).collect();
    format!(
        "| {:<20} | {:>3.0}% | {:>5.1} | {:>5} | {:>4} | {:>7.2} {:>7.2} {:>8.2} | {:>7.1} {:>7.1} {:>8.1} | {:>5.2} {:>5.2} {:>5.2} | {:<16} |",
        r.policy,
        r.load * 100.0,
        r.rate,
        r.sent,
        r.failures,
        r.connect.mean,
        r.connect.p50,
        r.connect.p99,
        r.reply.mean,
        r.reply.p50,
        r.reply.p99,
        r.util.0,
        r.util.1,
        r.util.2,
        nodes.join(" / ")
    )
}

/// Writes `summary.csv` (one line per run) and `util.csv` (utilisation samples) into `dir`.
pub fn write_csv(dir: &std::path::Path, results: &[RunResult]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut summary = String::from(
        "policy,load,rate,sent,failures,connect_mean,connect_p50,connect_p99,reply_mean,reply_p50,reply_p99,util_min,util_mean,util_max,per_node\n",
    );
    let mut util = String::from("policy,load,t,min,mean,max\n");
    for r in results {
        let nodes: Vec<String> = r.per_node.values().map(u64::to_string).collect();
        summary.push_str(&format!(
            "{},{},{:.2},{},{},{:.3},{:.3},{:.3},{:.2},{:.2},{:.2},{:.3},{:.3},{:.3},{}\n",
            r.policy,
            r.load,
            r.rate,
            r.sent,
            r.failures,
            r.connect.mean,
            r.connect.p50,
            r.connect.p99,
            r.reply.mean,
            r.reply.p50,
            r.reply.p99,
            r.util.0,
            r.util.1,
            r.util.2,
            nodes.join(" ")
        ));
        for (t, lo, mean, hi) in &r.util_series {
            util.push_str(&format!(
                "{},{},{t:.2},{lo:.3},{mean:.3},{hi:.3}\n",
                r.policy, r.load
            ));
        }
    }
    std::fs::write(dir.join("summary.csv"), summary)?;
    std::fs::write(dir.join("util.csv"), util)
}
