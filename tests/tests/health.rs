//! Application health checks end to end (root only; SKIP otherwise, a failure under
//! `CI=true`). Each test builds its own 3-node lab and removes it, also on failure.
//!
//! Two clients send sequential requests through the VIP (one every 10 ms each at most,
//! bounded in time). The HTTP server of one member is killed and later started again.
//! With a TCP check (`interval_ms = 100`, `timeout_ms = 50`, `fall = 2`, `rise = 2`) the
//! detection window is `fall × interval + timeout` = 250 ms: requests may fail only from
//! the kill until that window (plus one report's delivery) has passed, and none after. The
//! second test runs the same without a check: requests keep failing, which is why the
//! feature exists and how the first test would fail without it. The third fails only the
//! check (a health endpoint on port 81) while the service runs: established connections
//! carry on and new ones go elsewhere.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tdsc_lab::cluster::{exclusive_lab, unique_lab_name, Cluster, ClusterOptions};
use tdsc_lab::{http, netns};

/// `fall × interval + timeout` of the check below.
const WINDOW: Duration = Duration::from_millis(250);
/// What may pass after the window before the master has stopped choosing the node: the
/// report's delivery (sent at once on the change) and requests already in flight.
const SLACK: Duration = Duration::from_millis(250);
const PROPAGATION: Duration = Duration::from_secs(10);
/// Each client's upper bound on requests (the traffic ends well before at 10 ms apiece).
const MAX_REQUESTS: u32 = 3000;

fn check() -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("kind".into(), "tcp".into());
    t.insert("port".into(), 80.into());
    t.insert("interval_ms".into(), 100.into());
    t.insert("timeout_ms".into(), 50.into());
    t.insert("rise".into(), 2.into());
    t.insert("fall".into(), 2.into());
    toml::Value::Array(vec![toml::Value::Table(t)])
}

/// One request's outcome: when it started, and the node that served it (None: failed).
type Outcome = (Instant, Option<u32>);

fn traffic(
    clients: &[String],
    vip: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Result<Vec<Outcome>, netns::NetnsError>>> {
    clients
        .iter()
        .map(|ns| {
            let stop = Arc::clone(stop);
            netns::spawn_in(ns, move || {
                let mut out = Vec::new();
                for _ in 0..MAX_REQUESTS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let t = Instant::now();
                    let r = http::get(vip, "/", Duration::from_secs(1)).ok();
                    out.push((t, r.map(|r| r.node)));
                    std::thread::sleep(Duration::from_millis(10));
                }
                out
            })
        })
        .collect()
}

/// Kills a member's application under traffic and starts it again; returns every request's
/// outcome, the kill's instant, the restart's instant and the member's id.
fn kill_and_restart(
    cluster: &mut Cluster,
    checked: bool,
) -> anyhow::Result<(Vec<Outcome>, Instant, Instant, u32)> {
    let master = cluster.master()?.name.clone();
    let victim = cluster
        .nodes()
        .iter()
        .find(|n| n.name != master)
        .context("no member")?
        .clone();
    cluster.wait_master_status("every node healthy", PROPAGATION, |s| {
        s.nodes.len() == 3 && s.nodes.iter().all(|n| n.healthy && n.alive)
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = traffic(
        &cluster.client_namespaces(),
        SocketAddr::V4(cluster.vip()),
        &stop,
    );
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    cluster.kill_httpd(&victim.name)?;
    if checked {
        cluster.wait_master_status("the master to see the member unhealthy", PROPAGATION, |s| {
            s.nodes.iter().any(|n| n.id == victim.id && !n.healthy)
        })?;
        eprintln!(
            "master saw node {} unhealthy after {:?}",
            victim.id,
            killed.elapsed()
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let restarted = Instant::now();
    cluster.restart_httpd(&victim.name, PROPAGATION)?;
    if checked {
        cluster.wait_master_status("the member healthy again", PROPAGATION, |s| {
            s.nodes.iter().any(|n| n.id == victim.id && n.healthy)
        })?;
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    cluster.check_daemons()?;
    Ok((all, killed, restarted, victim.id))
}

#[test]
fn a_dead_application_leaves_dispatch_within_the_detection_window_and_returns() -> anyhow::Result<()>
{
    let Some(_lock) =
        exclusive_lab("a_dead_application_leaves_dispatch_within_the_detection_window_and_returns")
    else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-health")),
        policy: Some("round-robin".to_owned()),
        health_extra: vec![("check".to_owned(), check())],
        ..ClusterOptions::default()
    })?;
    let (all, killed, restarted, victim) = kill_and_restart(&mut cluster, true)?;
    let failed: Vec<Duration> = all
        .iter()
        .filter(|(_, n)| n.is_none())
        .map(|(t, _)| t.saturating_duration_since(killed))
        .collect();
    eprintln!(
        "{} requests, {} failed, at {:?} after the kill",
        all.len(),
        failed.len(),
        failed
    );
    ensure!(
        all.iter().all(|(t, n)| n.is_some() || *t >= killed),
        "a request failed before the application was killed"
    );
    ensure!(
        failed.iter().all(|d| *d <= WINDOW + SLACK),
        "requests failed after the detection window ({WINDOW:?} + {SLACK:?}): {failed:?}"
    );
    // Requests start at most every 10 ms per client: a bound on what the window can hold.
    let bound = 2 * ((WINDOW + SLACK).as_millis() / 10 + 1) as usize;
    ensure!(
        failed.len() <= bound,
        "{} failures, more than {bound}",
        failed.len()
    );
    let back = all
        .iter()
        .filter(|(t, n)| *t > restarted && *n == Some(victim))
        .count();
    ensure!(
        back > 0,
        "node {victim} got no connection after its application came back"
    );
    let st = cluster.status(&cluster.node_by_id(victim).context("victim")?.name.clone())?;
    let h = st.health.context("status shows no health")?;
    ensure!(h.healthy, "{h:?}");
    let c = &h.checks[0];
    ensure!(c.downs == 1 && c.failures >= 2, "{c:?}");
    ensure!(
        c.last_failure
            .as_deref()
            .is_some_and(|r| r.contains("refused")),
        "{c:?}"
    );
    cluster.teardown()?;
    Ok(())
}

#[test]
fn without_a_health_check_a_dead_application_keeps_getting_connections() -> anyhow::Result<()> {
    let Some(_lock) =
        exclusive_lab("without_a_health_check_a_dead_application_keeps_getting_connections")
    else {
        return Ok(());
    };
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-nohealth")),
        policy: Some("round-robin".to_owned()),
        ..ClusterOptions::default()
    })?;
    let (all, killed, restarted, _) = kill_and_restart(&mut cluster, false)?;
    let late = all
        .iter()
        .filter(|(t, n)| n.is_none() && *t > killed + WINDOW + SLACK && *t < restarted)
        .count();
    let during = all
        .iter()
        .filter(|(t, _)| *t > killed + WINDOW + SLACK && *t < restarted)
        .count();
    eprintln!("{late} of {during} requests failed after the window without a check");
    ensure!(
        late * 5 >= during,
        "only {late} of {during} requests failed after the window without a check"
    );
    cluster.teardown()?;
    Ok(())
}

/// A TCP listener on 127.0.0.1:81 in namespace `ns`, standing for an application's health
/// endpoint (its service on port 80 is not touched), until `stop`.
fn health_endpoint(
    ns: &str,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<std::io::Result<()>, netns::NetnsError>> {
    let stop = Arc::clone(stop);
    netns::spawn_in(ns, move || {
        let l = std::net::TcpListener::bind("127.0.0.1:81")?;
        l.set_nonblocking(true)?;
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// A node whose check fails while its service still runs: its established connections carry
/// on (echo streams opened before stream on, none broken), it gets none of 90 new
/// connections, and none of them fails; once the check passes again it takes its share.
/// (With `eligible()` ignoring the verdict it would get a third of them.)
#[test]
fn an_unhealthy_node_keeps_its_established_connections_and_gets_no_new_ones() -> anyhow::Result<()>
{
    let Some(_lock) =
        exclusive_lab("an_unhealthy_node_keeps_its_established_connections_and_gets_no_new_ones")
    else {
        return Ok(());
    };
    let mut t = toml::Table::new();
    t.insert("kind".into(), "tcp".into());
    t.insert("port".into(), 81.into());
    t.insert("interval_ms".into(), 100.into());
    t.insert("timeout_ms".into(), 50.into());
    t.insert("fall".into(), 2.into());
    let mut cluster = Cluster::start(&ClusterOptions {
        lab_name: Some(unique_lab_name("tdsc-hkeep")),
        policy: Some("round-robin".to_owned()),
        health_extra: vec![(
            "check".to_owned(),
            toml::Value::Array(vec![toml::Value::Table(t)]),
        )],
        ..ClusterOptions::default()
    })?;
    let result = keeps_established(&mut cluster);
    cluster.teardown()?;
    result
}

fn keeps_established(cluster: &mut Cluster) -> anyhow::Result<()> {
    let master = cluster.master()?.name.clone();
    let victim = cluster
        .nodes()
        .iter()
        .find(|n| n.name != master)
        .context("no member")?
        .clone();
    let mut endpoints = Vec::new();
    let mut victim_stop = Arc::new(AtomicBool::new(false));
    let all_stop = Arc::new(AtomicBool::new(false));
    for n in cluster.nodes() {
        let stop = if n.name == victim.name {
            &victim_stop
        } else {
            &all_stop
        };
        endpoints.push(health_endpoint(&cluster.netns(&n.name), stop));
    }
    let outcome = (|| {
        cluster.wait_master_status("every node healthy", PROPAGATION, |s| {
            s.nodes.len() == 3 && s.nodes.iter().all(|n| n.healthy && n.alive)
        })?;
        let vip = SocketAddr::V4(cluster.vip());
        let clients = cluster.client_namespaces();
        let streams_stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let streams = tdsc_lab::streams::stream_from(
            &clients[0],
            vip,
            6,
            Arc::clone(&streams_stop),
            Arc::clone(&progress),
        );
        std::thread::sleep(Duration::from_millis(500));

        // The victim's health endpoint goes; its service stays.
        victim_stop.store(true, Ordering::Relaxed);
        cluster.wait_master_status("the master to see the member unhealthy", PROPAGATION, |s| {
            s.nodes.iter().any(|n| n.id == victim.id && !n.healthy)
        })?;
        let before = progress.load(Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let tally = tdsc_lab::load::run(&clients, vip, 45, &stop)?;
        ensure!(tally.failures == 0, "{:?}", tally.sample_errors);
        ensure!(
            tally.by_node.get(&victim.id).copied().unwrap_or(0) == 0,
            "the unhealthy node {} got new connections: {:?}",
            victim.id,
            tally.by_node
        );
        std::thread::sleep(Duration::from_millis(300));
        ensure!(
            progress.load(Ordering::Relaxed) > before,
            "the streams stopped moving"
        );
        streams_stop.store(true, Ordering::Relaxed);
        let results = streams
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))???;
        let on_victim: Vec<_> = results.iter().filter(|r| r.node == victim.id).collect();
        ensure!(
            !on_victim.is_empty(),
            "no stream landed on node {}: {results:?}",
            victim.id
        );
        ensure!(
            results.iter().all(|r| r.error.is_none() && r.rounds > 0),
            "an established connection broke: {results:?}"
        );

        // Back: the node takes its share again.
        victim_stop = Arc::new(AtomicBool::new(false));
        endpoints.push(health_endpoint(&cluster.netns(&victim.name), &victim_stop));
        cluster.wait_master_status("the member healthy again", PROPAGATION, |s| {
            s.nodes.iter().any(|n| n.id == victim.id && n.healthy)
        })?;
        let tally = tdsc_lab::load::run(&clients, vip, 45, &stop)?;
        ensure!(tally.failures == 0, "{:?}", tally.sample_errors);
        let back = tally.by_node.get(&victim.id).copied().unwrap_or(0);
        ensure!(
            (25..=35).contains(&back),
            "node {} took {back} of 90 once healthy: {:?}",
            victim.id,
            tally.by_node
        );
        cluster.check_daemons()?;
        Ok(())
    })();
    victim_stop.store(true, Ordering::Relaxed);
    all_stop.store(true, Ordering::Relaxed);
    for e in endpoints {
        e.join()
            .map_err(|_| anyhow::anyhow!("endpoint thread panicked"))???;
    }
    outcome
}
