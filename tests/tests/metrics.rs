//! The Prometheus endpoint end to end: a real Prometheus server (Debian's `prometheus`) in a
//! namespace of its own on the cluster network scrapes every node's `/metrics` (on the node's
//! cluster address, `[metrics] listen`), and its query API returns every node's series, with
//! the dispatch counters rising after 600 requests through the VIP; `promtool check metrics`
//! accepts each node's output; a request for another path is refused and counted.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::{load, netns};

const METRICS_PORT: u16 = 9464;
/// The Prometheus host's address on the cluster network (not a member's).
const PROM_CIDR: &str = "198.51.100.250/24";
const PROM_ADDR: &str = "198.51.100.250:9090";
/// Prometheus is killed by `timeout` after this, whatever happens to the test.
const PROM_LIFETIME_S: u32 = 180;

/// A Prometheus server started for the test: killed, and its storage removed, on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    fn start(ns: &str, targets: &[String]) -> anyhow::Result<Prometheus> {
        let dir = std::env::temp_dir().join(format!("tdsc-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).context("prometheus dir")?;
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tdsc\n    static_configs:\n      - targets: [{list}]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).context("prometheus.yml")?;
        let log = std::fs::File::create(dir.join("prometheus.log")).context("log")?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "timeout", "--signal=KILL"])
            .arg(format!("{PROM_LIFETIME_S}s"))
            .arg("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROM_ADDR}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log")?)
            .stderr(log)
            .spawn()
            .context("start prometheus (tests/scripts/deps.sh installs it)")?;
        Ok(Prometheus { child, dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // `timeout` forwards the signal to prometheus; KILL on `timeout` itself would not.
        // SAFETY: kill(2) on the pid of a child this struct started and has not reaped.
        let _ = unsafe { libc::kill(i32::try_from(self.child.id()).unwrap_or(0), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP/1.0 GET from namespace `ns`: (status code, body).
fn get(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    netns::run_in(ns, move || -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no blank line")?;
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status code")?;
        Ok((code, body.to_owned()))
    })?
}

fn promtool_check(text: &str) -> anyhow::Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run promtool (tests/scripts/deps.sh installs it)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics refused the output: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `query` through the Prometheus API: instance → value.
fn query(ns: &str, q: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let addr: SocketAddr = PROM_ADDR.parse()?;
    let (code, body) = get(ns, addr, &format!("/api/v1/query?query={q}"))?;
    ensure!(code == 200, "query {q}: HTTP {code}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).context("query reply")?;
    let mut out = BTreeMap::new();
    for r in v["data"]["result"].as_array().context("no result")? {
        let instance = r["metric"]["instance"].as_str().unwrap_or("").to_owned();
        let value: f64 = r["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("no value")?;
        out.insert(instance, value);
    }
    Ok(out)
}

/// Polls `query` until `ok` holds for its result, for up to `limit`.
fn wait_query(
    ns: &str,
    q: &str,
    limit: Duration,
    ok: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let deadline = Instant::now() + limit;
    loop {
        let r = query(ns, q).unwrap_or_default();
        if ok(&r) {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("{q}: not as expected within {limit:?}: {r:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn check_tools() -> anyhow::Result<()> {
    for tool in ["prometheus", "promtool"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ensure!(found, "{tool} not found: run tests/scripts/deps.sh");
    }
    Ok(())
}

#[test]
fn prometheus_scrapes_every_node_and_sees_the_dispatch_counters_rise() -> anyhow::Result<()> {
    let Some(_lock) =
        exclusive_lab("prometheus_scrapes_every_node_and_sees_the_dispatch_counters_rise")
    else {
        return Ok(());
    };
    check_tools()?;
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-metrics")),
        policy: Some("round-robin".to_owned()),
        metrics_port: Some(METRICS_PORT),
        ..ClusterOptions::default()
    })
    .context("start the cluster")?;
    let result = run(&mut cluster);
    let down = cluster.teardown().map_err(|e| anyhow::anyhow!("{e}"));
    result.and(down)
}

fn run(cluster: &mut Cluster) -> anyhow::Result<()> {
    let targets: Vec<(String, SocketAddr)> = cluster
        .nodes()
        .iter()
        .map(|n| {
            let a = n.cluster_addr.context("node without a cluster address")?;
            Ok((
                n.name.clone(),
                SocketAddr::V4(SocketAddrV4::new(a, METRICS_PORT)),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let prom_ns = cluster
        .lab_mut()
        .attach_host("prom", "br-cluster", "prom-eth0", PROM_CIDR)?;

    // Each node's own output passes promtool; another path is refused and counted.
    for (name, addr) in &targets {
        let (code, body) = get(&prom_ns, *addr, "/metrics")?;
        ensure!(code == 200, "{name}: HTTP {code}");
        promtool_check(&body).with_context(|| format!("{name}'s /metrics"))?;
        let (code, _) = get(&prom_ns, *addr, "/nope")?;
        ensure!(code == 404, "{name}: /nope answered {code}");
        let (_, body) = get(&prom_ns, *addr, "/metrics")?;
        ensure!(
            body.lines()
                .any(|l| l == "tdsc_metrics_http_refused_total{reason=\"not_found\"} 1"),
            "{name}: the refused request is not counted"
        );
    }

    let instances: Vec<String> = targets.iter().map(|(_, a)| a.to_string()).collect();
    let prom = Prometheus::start(&prom_ns, &instances)?;
    let every_node = |r: &BTreeMap<String, f64>| instances.iter().all(|i| r.contains_key(i));
    let before = wait_query(
        &prom_ns,
        "tdsc_syns_dispatched_total",
        Duration::from_secs(30),
        every_node,
    )
    .with_context(|| format!("prometheus log:\n{}", prom.log()))?;
    let before_total: f64 = before.values().sum();

    let clients = cluster.client_namespaces();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = load::run(&clients, SocketAddr::V4(cluster.vip()), 300, &stop)?;
    ensure!(
        tally.failures == 0 && tally.ok() == 600,
        "requests failed: {:?}",
        tally.sample_errors
    );

    // The master counts every SYN it dispatched; Prometheus sees the rise.
    let after = wait_query(
        &prom_ns,
        "tdsc_syns_dispatched_total",
        Duration::from_secs(20),
        |r| every_node(r) && r.values().sum::<f64>() >= before_total + 600.0,
    )?;
    println!("tdsc_syns_dispatched_total before {before:?}, after {after:?}");
    // Round robin: every node served its third, as its own counters say (the master's
    // accepted locally, the members' re-injected).
    let served = wait_query(
        &prom_ns,
        "tdsc_accepted_locally_total%2Btdsc_reinjected_total",
        Duration::from_secs(20),
        |r| every_node(r) && r.values().all(|v| *v >= 190.0),
    )?;
    println!("served per node: {served:?}");
    // Per-node gauges as every node sees them: three nodes alive from each node's view.
    wait_query(
        &prom_ns,
        "sum+by+(instance)(tdsc_node_alive)",
        Duration::from_secs(10),
        |r| every_node(r) && r.values().all(|v| *v == 3.0),
    )?;
    wait_query(
        &prom_ns,
        "tdsc_queue_batch_size_count",
        Duration::from_secs(10),
        |r| every_node(r) && r.values().any(|v| *v > 0.0),
    )?;
    drop(prom);
    let leftover: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_ours(p))
        .collect();
    ensure!(
        leftover.is_empty(),
        "prometheus storage left behind: {leftover:?}"
    );
    Ok(())
}

fn is_ours(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == format!("tdsc-prometheus-{}", std::process::id()))
}
