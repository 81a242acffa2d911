//! `tdsc-lab`: run the tcp-dsc lab by hand.
//!
//! * `tdsc-lab demo` — build the lab, start a 3-node cluster, send HTTP requests to the VIP
//!   from both clients and show which node served how many; then tear everything down.
//! * `tdsc-lab bench-connect` — connect() latency through tcp-dsc vs. a plain server, and the
//!   master's CPU cost per dispatched SYN.
//! * `tdsc-lab bench-dispatch` — SYNs dispatched and lost, and CPU per SYN, at fixed offered
//!   rates, for each NFQUEUE reader (`[threads] queue_io`).
//! * `tdsc-lab bench-flood` — real clients' connects through a spoofed-source SYN flood, with
//!   the per-prefix SYN limit (`[flood]`) off and on.
//! * `tdsc-lab bench-policies` — the paper's Table 4: a CGI workload under open-loop Poisson
//!   arrivals at 70 % and 90 % of capacity, every policy in turn; reply and connect times,
//!   node utilisation, connections per node.
//!
//! * `tdsc-lab --engine docker deploy` — the same topology as real containers from the node
//!   image (`tcp-dsc/node:latest`), on the Docker engine `DOCKER_HOST` names, left running;
//!   `tdsc-lab --engine docker destroy` removes it. See `deploy/containerlab/README.md`.
//!
//! What the namespace engine changes: network namespaces `clab-<lab>-*` (and nothing in the host namespace),
//! processes inside them, and `/tmp/<lab>/`. All of it is removed on exit, on Ctrl-C and on
//! SIGTERM. After a SIGKILL, `ip netns del` each `clab-<lab>-*` namespace by hand (or run the
//! command again: it removes stale namespaces of the same lab first).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use tdsc_lab::cluster::{default_topology_path, Cluster, ClusterOptions};
use tdsc_lab::{bench, policybench};
use tdsc_lab::{load, netns};

#[derive(Parser, Debug)]
#[command(about = "The tcp-dsc lab: a 3-node cluster in network namespaces")]
struct Cli {
    /// containerlab topology to realise.
    #[arg(long, global = true, default_value_os_t = default_topology_path())]
    topology: PathBuf,
    /// Lab name (namespaces are called clab-<lab>-<node>); default: the topology's name.
    #[arg(long, global = true)]
    lab_name: Option<String>,
    /// RUST_LOG for the daemons (their logs go to /tmp/<lab>/tdscd-<node>.log).
    #[arg(long, global = true, default_value = "info")]
    daemon_log: String,
    /// How the topology is realised: network namespaces (every command), or containers from
    /// the node image on a Docker engine (`deploy` and `destroy`).
    #[arg(long, global = true, value_enum, default_value_t = Engine::Namespace)]
    engine: Engine,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Namespace,
    Docker,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// (docker engine) Deploy the topology as containers, start the lab's HTTP server on every
    /// cluster node, wait until every daemon answers and one is master, and leave it running.
    Deploy {
        /// Bind every node a copy of its config with `[election] mode = "raft"`.
        #[arg(long)]
        raft: bool,
        /// The docker client.
        #[arg(long, default_value = tdsc_lab::docker::DEFAULT_DOCKER)]
        docker: PathBuf,
    },
    /// (docker engine) Remove what `deploy` made: the lab's containers, its namespace links
    /// and bridge namespaces, and its work directory.
    Destroy {
        /// The docker client.
        #[arg(long, default_value = tdsc_lab::docker::DEFAULT_DOCKER)]
        docker: PathBuf,
    },
    /// Send HTTP requests to the VIP from both clients and show the per-node distribution.
    Demo {
        /// Total number of requests (split evenly between the clients).
        #[arg(long, default_value_t = 600)]
        requests: u64,
        /// Scheduling policy (see docs/operating.md, "Policies"), e.g. round-robin or least-connections.
        #[arg(long, default_value = "round-robin")]
        policy: String,
        /// Master election: raft (the product's default; the demo then also kills the
        /// master's daemon and shows the takeover) or static (node1 is always master).
        #[arg(long, default_value = "raft", value_parser = ["raft", "static"])]
        election: String,
    },
    /// connect() latency via tcp-dsc (master-local vs. forwarded) and to a plain server, and
    /// daemon CPU per dispatched SYN under a SYN flood.
    BenchConnect {
        /// Measured connections to the VIP, and as many to the plain server.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Unmeasured warm-up connections to each target first.
        #[arg(long, default_value_t = 500)]
        warmup: usize,
        /// Crafted SYNs to blast at the VIP for the CPU measurement (0 skips it).
        #[arg(long, default_value_t = 200_000)]
        syns: u64,
        /// Upper bound on the SYN blast's duration, in seconds.
        #[arg(long, default_value_t = 20)]
        max_seconds: u64,
    },
    /// SYNs dispatched per second, SYNs lost, and CPU per SYN (master and whole machine) at
    /// fixed offered rates, for each NFQUEUE reader in turn (issue 12's dispatch benchmark).
    BenchDispatch {
        /// Offered SYN/s, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "50000,100000,200000,400000"
        )]
        rates: Vec<u64>,
        /// Seconds per run.
        #[arg(long, default_value_t = 2)]
        seconds: u64,
        /// Rounds; each starts a cluster per reader, the readers' order alternating.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// `[threads] queue_io` values to compare, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "per-packet,batched")]
        readers: Vec<String>,
        /// Steer the client veths' flows to CPUs (RPS), as the other lab commands do. Off by
        /// default: no connection completes here, and in this VM each steered packet costs
        /// an inter-processor interrupt that is dearer than the dispatch.
        #[arg(long)]
        steer_flows: bool,
        /// Elect the master by Raft, which also replicates the SYN-forward records (the
        /// product's default), instead of the lab's static election.
        #[arg(long)]
        raft: bool,
    },
    /// Real clients' connects through a spoofed-source SYN flood, with the per-prefix SYN
    /// limit (`[flood]`) off and on (issue 12's flood benchmark).
    BenchFlood {
        /// Offered flood SYN/s.
        #[arg(long, default_value_t = 150_000)]
        rate: u64,
        /// Seconds of flood per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Rounds; each starts a cluster per mode, the modes' order alternating.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// With the defence on: `[flood] syn_prefix_rate` (the burst is the same), per /25.
        #[arg(long, default_value_t = 2000)]
        limit: u64,
        /// Elect the master by Raft (the product's default) instead of statically.
        #[arg(long)]
        raft: bool,
    },
    /// Every policy under the same CGI workload (paper Table 4, Fig. 8/9).
    BenchPolicies {
        /// Policies, comma-separated, in order of running.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "static-hash,isn-hash,round-robin,least-connections,power-of-two,least-load"
        )]
        policies: Vec<String>,
        /// Offered loads as fractions of capacity, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0.7,0.9")]
        loads: Vec<f64>,
        /// Seconds per policy and load.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Worker slots per node.
        #[arg(long, default_value_t = 2)]
        slots: u32,
        /// Short service time (ms), long service time (ms), and the long ones' fraction.
        #[arg(long, default_value_t = 20)]
        short_ms: u64,
        #[arg(long, default_value_t = 250)]
        long_ms: u64,
        #[arg(long, default_value_t = 0.15)]
        long_frac: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for summary.csv and util.csv.
        #[arg(long, default_value = "bench-policies-out")]
        out: PathBuf,
        /// Also run the baselines without tcp-dsc: HAProxy leastconn and xt_cluster.
        #[arg(long)]
        baselines: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !netns::is_root() {
        bail!("tdsc-lab needs root: it creates network namespaces (try sudo)");
    }
    // Ctrl-C and SIGTERM only raise this flag: the work loops stop, and the cluster is torn
    // down on the normal path.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\ntdsc-lab: still tearing down, please wait");
            } else {
                eprintln!("\ntdsc-lab: interrupted, tearing down");
            }
        })
        .context("install the Ctrl-C/SIGTERM handler")?;
    }
    match (&cli.command, cli.engine) {
        (Cmd::Deploy { raft, docker }, Engine::Docker) => docker_deploy(&cli, *raft, docker),
        (Cmd::Destroy { docker }, Engine::Docker) => docker_destroy(&cli, docker),
        (Cmd::Deploy { .. } | Cmd::Destroy { .. }, Engine::Namespace) => bail!(
            "the namespace engine's labs live as long as the command that made them \
             (`tdsc-lab demo`); deploy and destroy are for --engine docker"
        ),
        (_, Engine::Docker) => bail!("--engine docker has deploy and destroy only"),
        (_, Engine::Namespace) => namespace_command(&cli, &stop),
    }
}

fn namespace_command(cli: &Cli, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Deploy { .. } | Cmd::Destroy { .. } => unreachable!("handled in main"),
        Cmd::Demo {
            requests,
            policy,
            election,
        } => demo(cli, *requests, policy, election == "raft", stop),
        Cmd::BenchConnect {
            count,
            warmup,
            syns,
            max_seconds,
        } => {
            let cluster = start(cli, None, false)?;
            let result = run_bench(
                &cluster,
                &bench::BenchOptions {
                    count: *count,
                    warmup: *warmup,
                    syns: *syns,
                    max_duration: std::time::Duration::from_secs(*max_seconds),
                },
                stop,
            );
            finish(cluster, result)
        }
        Cmd::BenchDispatch {
            rates,
            seconds,
            rounds,
            readers,
            steer_flows,
            raft,
        } => bench_dispatch(
            cli,
            &DispatchArgs {
                rates,
                duration: std::time::Duration::from_secs(*seconds),
                rounds: *rounds,
                readers,
                steer_flows: *steer_flows,
                raft: *raft,
            },
            stop,
        ),
        Cmd::BenchFlood {
            rate,
            seconds,
            rounds,
            limit,
            raft,
        } => bench_flood(
            cli,
            &FloodArgs {
                rate: *rate,
                duration: std::time::Duration::from_secs(*seconds),
                rounds: *rounds,
                limit: *limit,
                raft: *raft,
            },
            stop,
        ),
        Cmd::BenchPolicies {
            policies,
            loads,
            seconds,
            slots,
            short_ms,
            long_ms,
            long_frac,
            seed,
            out,
            baselines,
        } => {
            let opts = policybench::PolicyBenchOptions {
                policies: policies.clone(),
                loads: loads.clone(),
                duration: std::time::Duration::from_secs(*seconds),
                slots: *slots,
                short_ms: *short_ms,
                long_ms: *long_ms,
                long_frac: *long_frac,
                seed: *seed,
            };
            let cluster = Cluster::start(&ClusterOptions {
                topology: cli.topology.clone(),
                lab_name: cli.lab_name.clone(),
                policy: Some("round-robin".into()),
                rust_log: cli.daemon_log.clone(),
                remove_stale: true,
                httpd_args: opts.httpd_args(),
                load_files: true,
                ..ClusterOptions::default()
            })?;
            let mut all = Vec::new();
            let result = bench_policies(&cluster, &opts, &mut all, stop);
            finish(cluster, result)?;
            if *baselines && !stop.load(Ordering::Relaxed) {
                println!("\nbaselines without tcp-dsc (servers only, same workload):");
                let mut cluster = Cluster::start(&ClusterOptions {
                    topology: cli.topology.clone(),
                    lab_name: cli.lab_name.clone(),
                    daemons: false,
                    remove_stale: true,
                    httpd_args: opts.httpd_args(),
                    load_files: true,
                    ..ClusterOptions::default()
                })?;
                let result = policybench::run_baselines(&mut cluster, &opts, stop)
                    .map(|r| all.extend(r))
                    .map_err(anyhow::Error::from);
                finish(cluster, result)?;
            }
            report_policies(&opts, &all, out)
        }
    }
}

/// `bench-dispatch`'s arguments.
#[derive(Debug, Clone, Copy)]
struct DispatchArgs<'a> {
    rates: &'a [u64],
    duration: std::time::Duration,
    rounds: usize,
    readers: &'a [String],
    steer_flows: bool,
    raft: bool,
}

/// `bench-dispatch`: per round, one cluster per reader (the order alternating), every rate in
/// turn; each run's row as it ends, then every (reader, rate) summed over the rounds.
fn bench_dispatch(
    cli: &Cli,
    args: &DispatchArgs<'_>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    use tdsc_lab::dispatchbench::{self, Run};
    let DispatchArgs {
        rates,
        duration,
        rounds,
        readers,
        steer_flows,
        raft,
    } = *args;
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    println!(
        "bench-dispatch: {} rounds x readers {} x offered {:?} SYN/s, {:?} each (after a floor \
         run each); one queue; {cpus} CPUs; flow steering {}; {} election; the master at weight 0 and alone \
         on the client bridge, the members sinking the forwards at ingress \
         (tests/src/dispatchbench.rs)",
        rounds,
        readers.join(", "),
        rates,
        duration,
        if steer_flows { "on" } else { "off" },
        if raft {
            "Raft (records replicated)"
        } else {
            "static"
        }
    );
    let header = format!(
        "{:<10} {:>5} {:>8} {:>8} {:>10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>5}",
        "reader",
        "round",
        "offered",
        "sent/s",
        "dispatch/s",
        "lost%",
        "q.drop",
        "backlog",
        "overrun",
        "rec.ovf",
        "µs tdscd",
        "µs mach",
        "µs floor",
        "µs disp",
        "gen"
    );
    let row = |reader: &str, round: String, r: &Run| {
        format!(
            "{:<10} {:>5} {:>8} {:>8.0} {:>10.0} {:>7.2} {:>7} {:>7} {:>7} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>5}",
            reader,
            round,
            r.rate,
            r.sent_rate(),
            r.dispatched_rate(),
            r.lost_percent(),
            r.queue_dropped,
            r.backlog_dropped,
            r.overruns,
            r.records_unreplicated,
            r.per_syn(r.master_cpu),
            r.per_syn(r.machine_busy),
            r.floor.per_sent(),
            r.dispatch_cost(),
            if r.generator_short() { "SHORT" } else { "ok" }
        )
    };
    println!("{header}");
    let mut all: Vec<(String, Run)> = Vec::new();
    for round in 0..rounds {
        let mut order: Vec<&String> = readers.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for reader in order {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let cluster = Cluster::start(&ClusterOptions {
                topology: cli.topology.clone(),
                lab_name: cli.lab_name.clone(),
                rust_log: cli.daemon_log.clone(),
                remove_stale: true,
                threads_extra: vec![("queue_io".into(), toml::Value::String(reader.clone()))],
                steer_flows,
                raft,
                ..ClusterOptions::default()
            })
            .context("start the cluster")?;
            let result = (|| -> anyhow::Result<()> {
                let master = dispatchbench::prepare(&cluster)?;
                for &rate in rates {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = dispatchbench::run(&cluster, &master, rate, duration, stop)?;
                    println!("{}", row(reader, (round + 1).to_string(), &r));
                    all.push((reader.clone(), r));
                }
                Ok(())
            })();
            let down = cluster.teardown();
            result?;
            down.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    println!("\nSummed over the rounds (µs are CPU time per dispatched SYN; gen SHORT: the generator sent under {:.0} % of the offered rate):", dispatchbench::GENERATOR_SHORT * 100.0);
    println!("{header}");
    let mut summed: Vec<(String, Run)> = Vec::new();
    for reader in readers {
        for &rate in rates {
            let runs: Vec<&Run> = all
                .iter()
                .filter(|(r, run)| r == reader && run.rate == rate)
                .map(|(_, run)| run)
                .collect();
            let Some(first) = runs.first() else { continue };
            let mut sum = (*first).clone();
            for r in &runs[1..] {
                sum.add(r);
            }
            println!("{}", row(reader, "all".into(), &sum));
            summed.push((reader.clone(), sum));
        }
    }
    if let [(a, _), ..] = summed.as_slice() {
        for (b, _) in summed.iter().filter(|(r, _)| r != a).take(1) {
            println!("\nRatios {b} / {a} per offered rate (dispatched SYN/s; whole-machine µs per dispatched SYN, less the floor; tdscd µs per SYN):");
            for &rate in rates {
                let find = |name: &str| {
                    summed
                        .iter()
                        .find(|(r, run)| r == name && run.rate == rate)
                        .map(|(_, run)| run)
                };
                if let (Some(x), Some(y)) = (find(a), find(b)) {
                    println!(
                        "  {rate:>7} offered: dispatched x{:.2}; machine x{:.2}; tdscd x{:.2}; lost {:.2} % -> {:.2} %",
                        y.dispatched_rate() / x.dispatched_rate().max(1e-9),
                        y.dispatch_cost() / x.dispatch_cost().max(1e-9),
                        y.per_syn(y.master_cpu) / x.per_syn(x.master_cpu).max(1e-9),
                        x.lost_percent(),
                        y.lost_percent()
                    );
                }
            }
        }
    }
    Ok(())
}

/// `bench-flood`'s arguments.
#[derive(Debug, Clone, Copy)]
struct FloodArgs {
    rate: u64,
    duration: std::time::Duration,
    rounds: usize,
    limit: u64,
    raft: bool,
}

/// `bench-flood`: per round, one cluster with the defence off and one with it on (the order
/// alternating); a row per run, then both modes over all rounds.
fn bench_flood(cli: &Cli, a: &FloodArgs, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    use tdsc_lab::floodbench::{self, FloodRun};
    println!(
        "bench-flood: {} rounds x defence off/on; a flood of {} SYN/s offered from random \
         addresses of {}/{} for {:?}; both clients connecting meanwhile ({:?} apart); defence \
         on = [flood] syn_prefix_rate = burst = {} per /{}; {} election; flow steering on, \
         as the real connections need (tests/src/floodbench.rs)",
        a.rounds,
        a.rate,
        floodbench::FLOOD_PREFIX,
        floodbench::FLOOD_LEN,
        a.duration,
        floodbench::CONNECT_GAP,
        a.limit,
        floodbench::FLOOD_LEN,
        if a.raft { "Raft" } else { "static" }
    );
    let header = format!(
        "{:<8} {:>5} {:>8} {:>9} {:>10} {:>9} {:>6} {:>8} {:>6} {:>8} {:>8} {:>5}",
        "defence",
        "round",
        "flood/s",
        "sent/s",
        "dispatch/s",
        "limited/s",
        "real",
        "prompt%",
        "failed",
        "p50 ms",
        "p99 ms",
        ">1s"
    );
    let row = |mode: &str, round: String, r: &FloodRun| {
        let secs = r.flood.elapsed.as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^53")]
        let per_s = |n: u64| n as f64 / secs;
        let s = r.summary();
        format!(
            "{:<8} {:>5} {:>8} {:>9.0} {:>10.0} {:>9.0} {:>6} {:>8.2} {:>6} {:>8} {:>8} {:>5}",
            mode,
            round,
            r.rate,
            per_s(r.flood.sent),
            per_s(r.dispatched),
            per_s(r.limited),
            r.connects.len() + r.failed,
            r.prompt_percent(),
            r.failed,
            s.map_or("-".into(), |s| format!("{:.2}", s.p50 / 1000.0)),
            s.map_or("-".into(), |s| format!("{:.2}", s.p99 / 1000.0)),
            s.map_or(0, |s| s.over_1s)
        )
    };
    println!("{header}");
    let modes = ["off", "on"];
    let mut all: Vec<(&str, FloodRun)> = Vec::new();
    for round in 0..a.rounds {
        let mut order = modes.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let flood_extra = if mode == "on" {
                vec![
                    (
                        "syn_prefix_rate".into(),
                        toml::Value::Integer(i64::try_from(a.limit)?),
                    ),
                    (
                        "syn_prefix_burst".into(),
                        toml::Value::Integer(i64::try_from(a.limit)?),
                    ),
                    (
                        "prefix_v4".into(),
                        toml::Value::Integer(i64::from(floodbench::FLOOD_LEN)),
                    ),
                ]
            } else {
                Vec::new()
            };
            let cluster = Cluster::start(&ClusterOptions {
                topology: cli.topology.clone(),
                lab_name: cli.lab_name.clone(),
                rust_log: cli.daemon_log.clone(),
                remove_stale: true,
                raft: a.raft,
                flood_extra,
                ..ClusterOptions::default()
            })
            .context("start the cluster")?;
            let result = floodbench::run(&cluster, a.rate, a.duration, stop);
            let down = cluster.teardown();
            let r = result?;
            down.map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", row(mode, (round + 1).to_string(), &r));
            all.push((mode, r));
        }
    }
    println!("\nBoth modes over all rounds (prompt%: real connects that succeeded without a SYN retransmission, of all tried):");
    println!("{header}");
    for mode in modes {
        let mut runs = all.iter().filter(|(m, _)| *m == mode).map(|(_, r)| r);
        let Some(first) = runs.next() else { continue };
        let mut sum = first.clone();
        for r in runs {
            sum.add(r);
        }
        println!("{}", row(mode, "all".into(), &sum));
    }
    Ok(())
}

fn bench_policies(
    cluster: &Cluster,
    opts: &policybench::PolicyBenchOptions,
    all: &mut Vec<policybench::RunResult>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    println!(
        "bench-policies: {} nodes x {} slots, service {} ms ({:.0} %) / {} ms ({:.0} %), mean {:.1} ms; \
         capacity {:.1} req/s; {} s per run; open-loop Poisson arrivals from {} clients",
        cluster.nodes().len(),
        opts.slots,
        opts.short_ms,
        (1.0 - opts.long_frac) * 100.0,
        opts.long_ms,
        opts.long_frac * 100.0,
        opts.mean_service() * 1000.0,
        f64::from(u32::try_from(cluster.nodes().len()).unwrap_or(0)) * f64::from(opts.slots)
            / opts.mean_service(),
        opts.duration.as_secs(),
        cluster.clients().len()
    );
    println!("{}", policybench::header());
    all.extend(policybench::run(cluster, opts, stop)?);
    Ok(())
}

fn report_policies(
    opts: &policybench::PolicyBenchOptions,
    results: &[policybench::RunResult],
    out: &std::path::Path,
) -> anyhow::Result<()> {
    println!("\nall runs:\n{}", policybench::header());
    for r in results {
        println!("{}", policybench::row(r));
    }
    policybench::write_csv(out, results)
        .with_context(|| format!("write results to {}", out.display()))?;
    for load in &opts.loads {
        let at = |p: &str| {
            results
                .iter()
                .find(|r| r.policy == p && (r.load - load).abs() < 1e-9)
        };
        let rr = at("round-robin");
        println!("\nat {:.0} % of capacity:", load * 100.0);
        if let (Some(rr), Some(sh)) = (rr, at("static-hash")) {
            println!(
                "  round-robin / static-hash reply time: {:.2} (paper: 214.5 / 435.3 = 0.49)",
                rr.reply.mean / sh.reply.mean
            );
        }
        if let (Some(rr), Some(ih)) = (rr, at("isn-hash")) {
            println!(
                "  round-robin / isn-hash reply time:    {:.2}",
                rr.reply.mean / ih.reply.mean
            );
        }
        let best = results
            .iter()
            .filter(|r| {
                (r.load - load).abs() < 1e-9
                    && ![
                        "round-robin",
                        "static-hash",
                        "isn-hash",
                        "haproxy-leastconn",
                        "xt_cluster",
                    ]
                    .contains(&r.policy.as_str())
            })
            .min_by(|a, b| a.reply.mean.total_cmp(&b.reply.mean));
        if let (Some(rr), Some(best)) = (rr, best) {
            println!(
                "  best dynamic ({}) / round-robin reply time: {:.2}",
                best.policy,
                best.reply.mean / rr.reply.mean
            );
        }
        if let (Some(best), Some(hap)) = (best, at("haproxy-leastconn")) {
            println!(
                "  best dynamic ({}) / haproxy-leastconn reply time: {:.2}",
                best.policy,
                best.reply.mean / hap.reply.mean
            );
        }
    }
    println!(
        "\nresults: {}/summary.csv, {}/util.csv",
        out.display(),
        out.display()
    );
    Ok(())
}

fn start(cli: &Cli, policy: Option<&str>, raft: bool) -> anyhow::Result<Cluster> {
    let opts = ClusterOptions {
        topology: cli.topology.clone(),
        lab_name: cli.lab_name.clone(),
        policy: policy.map(str::to_owned),
        raft,
        daemons: true,
        rust_log: cli.daemon_log.clone(),
        remove_stale: true,
        ..ClusterOptions::default()
    };
    println!(
        "Realising the lab from {} as network namespaces, then starting tdscd and an HTTP \
         server on every cluster node ...",
        cli.topology.display()
    );
    let cluster = Cluster::start(&opts).context("start the cluster")?;
    let names: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("{} (id {})", n.name, n.id))
        .collect();
    println!(
        "Lab {:?} is up: cluster nodes {}, VIP {}, master {}.",
        cluster.lab().name(),
        names.join(", "),
        cluster.vip(),
        cluster.master().map(|m| m.name.as_str()).unwrap_or("?"),
    );
    println!(
        "  (namespaces clab-{}-*: try `ip netns exec clab-{}-node1 nft list ruleset` from \
         another shell while it runs)",
        cluster.lab().name(),
        cluster.lab().name()
    );
    Ok(cluster)
}

/// Tears down, then reports the run's result; teardown errors are reported too.
fn finish(cluster: Cluster, result: anyhow::Result<()>) -> anyhow::Result<()> {
    println!("Tearing down the lab (processes, namespaces, /tmp files) ...");
    let down = cluster.teardown();
    match (&result, &down) {
        (_, Ok(())) => println!("Done: nothing left behind."),
        (_, Err(e)) => eprintln!("tdsc-lab: {e}"),
    }
    result?;
    down.map_err(|e| anyhow::anyhow!("{e}"))
}

fn demo(
    cli: &Cli,
    requests: u64,
    policy: &str,
    raft: bool,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let election = if raft { "Raft" } else { "static" };
    println!(
        "tcp-dsc demo: one virtual IP served by three nodes; policy {policy}, {election} election.\n"
    );
    let mut cluster = start(cli, Some(policy), raft)?;
    let result = run_demo(&mut cluster, requests, stop).and_then(|()| {
        if raft && !stop.load(Ordering::SeqCst) {
            demo_failover(&mut cluster, requests, stop)
        } else {
            Ok(())
        }
    });
    finish(cluster, result)
}

/// Act two under Raft: SIGKILL the master's daemon while the clients keep sending, show the
/// new master and that no request failed, then restart the old one and show it rejoin.
fn demo_failover(
    cluster: &mut Cluster,
    requests: u64,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let old = cluster.master()?.clone();
    let client_ns = cluster.client_namespaces();
    let target = std::net::SocketAddr::V4(cluster.vip());
    println!(
        "Act two: SIGKILL of the master's daemon ({}, id {}) while both clients keep sending \
         requests, until a second after a new master has taken over ...",
        old.name, old.id
    );
    // Until the act is over (or Ctrl-C, which `stop` also reports).
    let act = Arc::new(AtomicBool::new(false));
    let traffic = load::spawn(&client_ns, target, requests.max(1) * 1000, &act);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let killed = std::time::Instant::now();
    let result = cluster
        .kill_daemon(&old.name)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            Ok(cluster.wait_master(Some(&old.name), std::time::Duration::from_secs(10))?)
        });
    let took = killed.elapsed();
    if result.is_ok() && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    act.store(true, Ordering::SeqCst);
    let tally = traffic
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
    let new = result?;
    println!(
        "  {} (id {}) is master {:.0?} after the kill (Raft leader with a lease; it reconciled \
         the SYN-forward records first).",
        new.name, new.id, took
    );
    println!(
        "  {} of {} requests answered across the failover, {} failed; by node {:?}.",
        tally.ok(),
        tally.ok() + tally.failures,
        tally.failures,
        tally.by_node
    );
    cluster.restart_daemon(&old.name, std::time::Duration::from_secs(15))?;
    cluster.wait_liveness(&new.name, old.id, true)?;
    let back = cluster.status(&old.name)?;
    println!(
        "  {}'s daemon restarted: role {}, following master {:?}, term {}.\n",
        old.name, back.role, back.master_id, back.term
    );
    if tally.failures > 0 {
        bail!("{} request(s) failed across the failover", tally.failures);
    }
    Ok(())
}

fn run_demo(cluster: &mut Cluster, requests: u64, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    if stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    let clients: Vec<String> = cluster.clients().iter().map(|c| c.name.clone()).collect();
    let per_client = requests / clients.len().max(1) as u64;
    let target = std::net::SocketAddr::V4(cluster.vip());
    println!(
        "\nSending {} HTTP GETs to {target}: {per_client} sequential requests from each of {} \
         at the same time ...",
        per_client * clients.len() as u64,
        clients.join(" and ")
    );
    let client_ns: Vec<String> = clients.iter().map(|c| cluster.netns(c)).collect();
    let started = std::time::Instant::now();
    let tally = load::run(&client_ns, target, per_client, stop)?;
    let elapsed = started.elapsed();
    cluster.check_daemons()?;

    println!(
        "\n{} of {} requests answered in {:.2?}. Each reply names the node that served it:\n",
        tally.ok(),
        tally.ok() + tally.failures,
        elapsed
    );
    println!("  {:<8} {:>4} {:>8} {:>7}", "node", "id", "served", "share");
    let total = tally.ok().max(1);
    for node in cluster.nodes() {
        let n = tally.by_node.get(&node.id).copied().unwrap_or(0);
        #[allow(
            clippy::cast_precision_loss,
            reason = "request counts are far below 2^53"
        )]
        let share = 100.0 * n as f64 / total as f64;
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a share of 0..=100 % makes at most 40 bar characters"
        )]
        let bar = "#".repeat((share / 2.5).round() as usize);
        println!(
            "  {:<8} {:>4} {:>8} {:>6.1}%  {bar}",
            node.name, node.id, n, share
        );
    }
    for (id, n) in &tally.by_node {
        if cluster.node_by_id(*id).is_none() {
            println!("  (unknown node id {id}: {n} replies)");
        }
    }
    if tally.failures > 0 {
        println!("\n  {} request(s) failed, e.g.:", tally.failures);
        for e in &tally.sample_errors {
            println!("    {e}");
        }
    }

    let master = cluster.master()?.name.clone();
    let s = cluster.status(&master)?;
    let c = s.counters;
    println!(
        "\nThe master ({master}, role {:?}) saw every SYN and decided who gets it:",
        s.role
    );
    println!(
        "  SYNs dispatched {:>6}   kept and accepted locally {:>6}   forwarded (proto 253) {:>6}",
        c.syns_dispatched, c.accepted_locally, c.forwarded_out
    );
    println!(
        "  retransmitted SYNs recognised {:>4}   forward send errors {:>4}",
        c.retransmit_hits, c.forward_send_errors
    );
    for node in cluster.nodes().to_vec() {
        if node.name == master {
            continue;
        }
        if let Ok(m) = cluster.status(&node.name) {
            println!(
                "  {} ({}): received {} forwarded SYNs, re-injected {}, rejected {}",
                node.name,
                m.role,
                m.counters.received_forwarded,
                m.counters.reinjected,
                m.counters.forward_rejected.total()
            );
        }
    }
    println!();
    if tally.failures > 0 {
        bail!("{} request(s) failed", tally.failures);
    }
    Ok(())
}

fn row(name: &str, s: Option<bench::Summary>) -> String {
    match s {
        Some(s) => format!(
            "  {name:<16} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>6} {:>4}",
            s.n, s.min, s.p50, s.mean, s.p99, s.max, s.over_100ms, s.over_1s
        ),
        None => format!("  {name:<16} {:>6}   (no samples)", 0),
    }
}

/// The failed connections of a table, under it (failed ones have no latency sample).
fn print_failures(f: &bench::Failures) {
    println!(
        "  failed connections: {} to the VIP, {} to the plain server",
        f.vip, f.plain
    );
    for e in &f.examples {
        println!("    {e}");
    }
}

fn ratio(a: Option<bench::Summary>, b: Option<bench::Summary>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.p50 > 0.0 && b.mean > 0.0 => {
            format!("p50 {:.2}x, mean {:.2}x", a.p50 / b.p50, a.mean / b.mean)
        }
        _ => "n/a".into(),
    }
}

/// Runs both benchmark phases and prints the tables.
fn run_bench(
    cluster: &Cluster,
    opts: &bench::BenchOptions,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let client = cluster.clients().first().map(|c| c.name.clone());
    println!(
        "\nconnect() latency from {} to the VIP {} and to the plain server {} \
         ({} measured connects each, after {} warm-up):",
        client.as_deref().unwrap_or("?"),
        cluster.vip(),
        cluster
            .baseline_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        opts.count,
        opts.warmup
    );
    let lat = bench::latency(cluster, opts, stop)?;
    println!(
        "  {:<16} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>4}",
        "µs", "n", "min", "p50", "mean", "p99", "max", ">100ms", ">1s"
    );
    println!("{}", row("master-local", lat.master_local));
    println!("{}", row("forwarded", lat.forwarded));
    println!("{}", row("plain", lat.plain));
    print_failures(&lat.failed);
    println!(
        "  ratios: forwarded/plain {}; master-local/plain {}",
        ratio(lat.forwarded, lat.plain),
        ratio(lat.master_local, lat.plain)
    );
    let wake = tdsc_lab::wakeup::measure(2000, 100)?;
    println!("{}", row("thread wake-up", Some(wake)));
    println!(
        "  (one blocked thread woken through a socket on this machine: a dispatched SYN pays one, \
         a forwarded SYN two)"
    );
    println!(
        "\nWhere the master-local overhead goes: the other nodes at weight 0, batches of {} \
         connects with their client-side bridge ports up (every client frame flooded through \
         all three stacks, as above) and down (only the master's stack), alternating:",
        50
    );
    let flood = bench::flood_ablation(cluster, opts, stop)?;
    println!("{}", row("flooded", flood.flooded));
    println!("{}", row("master only", flood.master_only));
    println!("{}", row("plain", flood.plain));
    print_failures(&flood.failed);
    println!(
        "  ratios: flooded/plain {}; master-only/plain {}; flooded/master-only {}",
        ratio(flood.flooded, flood.plain),
        ratio(flood.master_only, flood.plain),
        ratio(flood.flooded, flood.master_only)
    );
    let cpu = 0;
    println!(
        "\nPlacement: the same connects, in alternating batches of 50, with the scheduler placing \
         every thread and co-located on CPU {cpu}: the client's thread (whose CPU runs its \
         packets' softirq), the HTTP servers, and every daemon's data-path threads, as \
         [threads] data_path_cpu pins them:"
    );
    let place = bench::placement(cluster, opts, cpu, stop)?;
    for (name, r) in [("placed", &place.placed), ("co-located", &place.colocated)] {
        println!("{}", row(&format!("{name} local"), r.master_local));
        println!("{}", row(&format!("{name} fwd"), r.forwarded));
        println!("{}", row(&format!("{name} plain"), r.plain));
        print_failures(&r.failed);
    }
    println!(
        "  ratios: co-located/placed master-local {}; forwarded {}",
        ratio(place.colocated.master_local, place.placed.master_local),
        ratio(place.colocated.forwarded, place.placed.forwarded)
    );
    let same = tdsc_lab::wakeup::measure_pinned(2000, 100, (cpu, cpu))?;
    println!("{}", row("wake same CPU", Some(same)));
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        let cross = tdsc_lab::wakeup::measure_pinned(2000, 100, (cpu, cpu + 1))?;
        println!("{}", row("wake cross CPU", Some(cross)));
    }
    if opts.syns == 0 {
        return Ok(());
    }
    println!(
        "\nSYN flood: up to {} crafted SYNs (random source ports) to the VIP, at most {:?} ...",
        opts.syns, opts.max_duration
    );
    let cpu = bench::syn_cpu(cluster, opts, stop)?;
    #[allow(
        clippy::cast_precision_loss,
        reason = "request counts are far below 2^53"
    )]
    let (rate, per_syn) = (
        cpu.sent as f64 / cpu.send_time.as_secs_f64().max(1e-9),
        cpu.cpu.as_secs_f64() * 1e6 / (cpu.dispatched.max(1) as f64),
    );
    println!(
        "  sent {} SYNs in {:.2?} ({:.0} SYN/s offered); master dispatched {} ({} not \
         dispatched: lost before or in the queue, or let through by fail-open)",
        cpu.sent,
        cpu.send_time,
        rate,
        cpu.dispatched,
        cpu.sent.saturating_sub(cpu.dispatched)
    );
    println!(
        "  master tdscd CPU (utime+stime): {:.3?} => {per_syn:.2} µs per dispatched SYN",
        cpu.cpu
    );
    Ok(())
}

fn lab_topology(cli: &Cli) -> anyhow::Result<tdsc_lab::topology::Topology> {
    let topo = tdsc_lab::topology::Topology::load(&cli.topology)?;
    Ok(match &cli.lab_name {
        Some(name) => topo.renamed(name)?,
        None => topo,
    })
}

/// `--engine docker deploy`: the lab as containers, left running.
fn docker_deploy(cli: &Cli, raft: bool, docker: &std::path::Path) -> anyhow::Result<()> {
    let topo = lab_topology(cli)?;
    // The topology binds the lab's cluster key from beside it (git-ignored): made here once,
    // as `tdscctl keygen` would.
    for name in topo.nodes_with_role(tdsc_lab::topology::Role::ClusterNode) {
        if let Some(key) = topo.nodes[name].bind_for(tdsc_lab::docker::KEY_PATH) {
            if !key.exists() {
                tdsc_lab::cluster::write_key_file(key, 1)?;
                println!("Wrote a new cluster key {} (mode 0600).", key.display());
            }
        }
    }
    println!(
        "Deploying {} as containers (engine: {}) ...",
        cli.topology.display(),
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "the default socket".into())
    );
    let cluster =
        tdsc_lab::docker::DockerCluster::deploy(&tdsc_lab::docker::DockerClusterOptions {
            topology: cli.topology.clone(),
            lab_name: cli.lab_name.clone(),
            docker: docker.to_owned(),
            raft,
            ..tdsc_lab::docker::DockerClusterOptions::default()
        })
        .context("deploy the lab as containers")?;
    let master = cluster.wait_master(None, std::time::Duration::from_secs(5))?;
    let lab = cluster.lab().topology().name.clone();
    println!(
        "Lab {lab:?} is up: containers clab-{lab}-*, VIP {}, master {}. Try\n  \
         docker exec clab-{lab}-{} tdscctl --socket /run/tdsc/tdscd.sock status\n\
         and remove it with `tdsc-lab --engine docker destroy`.",
        cluster.vip(),
        master.name,
        master.name
    );
    cluster.keep();
    Ok(())
}

/// `--engine docker destroy`: whatever `deploy` left for this lab name.
fn docker_destroy(cli: &Cli, docker: &std::path::Path) -> anyhow::Result<()> {
    let topo = lab_topology(cli)?;
    tdsc_lab::docker::destroy(&topo, &tdsc_lab::docker::Docker::new(docker))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let workdir = std::env::temp_dir().join(&topo.name);
    if workdir.exists() {
        std::fs::remove_dir_all(&workdir)
            .with_context(|| format!("remove {}", workdir.display()))?;
    }
    println!("Lab {:?} destroyed: nothing left but the image.", topo.name);
    Ok(())
}
