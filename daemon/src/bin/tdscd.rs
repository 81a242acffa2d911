//! `tdscd`: run one tcp-dsc node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tdsc_rules::{ruleset, Firewall, HostFacts, QueueBackend, Role};
use tdscd::config::Config;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "tcp-dsc node daemon: one node of a distributed single-IP TCP cluster"
)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, default_value = "/etc/tdsc/tdsc.toml")]
    config: PathBuf,
    /// Validate the configuration and exit: 0 when valid.
    #[arg(long)]
    check_config: bool,
    /// Install the member ruleset (the safe state: no client SYN accepted, no RST for foreign
    /// segments) and exit. Leaves out the netdev egress table, whose device may not exist yet.
    /// Touches neither VIP, MAC nor sysctls, except to undo what a tdscd that did not stop
    /// cleanly recorded in its host state file (`[control] host_state`). Run at boot before
    /// the network comes up (tdsc-safe-rules.service) and after the daemon stops.
    #[arg(long, conflicts_with_all = ["check_config", "remove_rules"])]
    install_member_rules: bool,
    /// Delete tcp-dsc's nftables tables (`inet tdsc`, `netdev tdsc`) and exit; no other table
    /// is touched. Succeeds when they are absent. First undoes what a tdscd that did not stop
    /// cleanly recorded in its host state file: `[control] host_state` of the configuration
    /// if it can be read, else the default, /run/tdsc/host.state. A missing or broken
    /// configuration never keeps the tables in the kernel.
    #[arg(long, conflicts_with = "check_config")]
    remove_rules: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    log_panics();
    // Removing our tables needs nothing from the configuration, so a broken or missing file
    // never keeps them in the kernel (package removal runs this).
    if args.remove_rules {
        let state = Config::load(&args.config)
            .map(|c| c.host_state)
            .unwrap_or_else(|_| PathBuf::from(tdscd::host::state::DEFAULT_STATE_FILE));
        let host = undo_host_state(&state);
        let rules = match remove_rules() {
            Ok(()) => {
                println!("tdscd: tcp-dsc tables removed");
                true
            }
            Err(e) => {
                eprintln!("tdscd: {}", chain(&e));
                false
            }
        };
        return if host && rules {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tdscd: {}: {}", args.config.display(), chain(&e));
            return ExitCode::from(2);
        }
    };
    // The ruleset generator has its own invariants (interface names, addresses, hash
    // buckets); check them now so --check-config catches everything start-up would.
    if let Err(e) = tdscd::node::cluster_spec(&cfg).validate() {
        eprintln!("tdscd: {}: {}", args.config.display(), chain(&e));
        return ExitCode::from(2);
    }
    if args.install_member_rules {
        // The host first (a crashed daemon's VIP must go), then the rules whatever happened:
        // a host state problem never keeps the node out of the safe state.
        let host = undo_host_state(&cfg.host_state);
        let rules = match install_member_rules(&cfg) {
            Ok(()) => {
                println!("tdscd: member ruleset installed (safe state)");
                true
            }
            Err(e) => {
                eprintln!("tdscd: {}", chain(&e));
                false
            }
        };
        return if host && rules {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if args.check_config {
        let nodes = match cfg.election {
            tdscd::config::ElectionMode::Raft { ref data_dir, .. } => format!(
                "{} bootstrap nodes; membership after the first start is kept in {}",
                cfg.nodes.len(),
                data_dir.join(tdscd::cluster::raft::STATE_FILE).display()
            ),
            tdscd::config::ElectionMode::Static { .. } => format!("{} nodes", cfg.nodes.len()),
        };
        // The key file as start-up reads it. An absent one is said, not failed: the package
        // ships none, and the configuration is checked before the key is copied in.
        let key = match tdscd::cluster::keyfile::load(&cfg.key_file) {
            Ok(ring) => format!("cluster key ids {:?}", ring.ids()),
            Err(tdscd::cluster::keyfile::KeyFileError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                eprintln!(
                    "tdscd: warning: {} does not exist yet: tdscd will not start without it (tdscctl keygen)",
                    cfg.key_file.display()
                );
                "no cluster key yet".to_owned()
            }
            Err(e) => {
                eprintln!("tdscd: {}", chain(&e));
                return ExitCode::from(2);
            }
        };
        println!(
            "{}: ok (node {}, {nodes}, vip {}, {key})",
            args.config.display(),
            cfg.node_id,
            cfg.vip
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tdscd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(tdscd::node::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tdscd: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Every panic, in any thread, is logged as one error line naming the thread and the place
/// before the default hook runs. In a release build (`panic = "abort"`) the process then
/// aborts, and systemd restarts it; in a debug build the supervisor stops the node.
fn log_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            location = info.location().map(ToString::to_string).unwrap_or_default(),
            "panic: {message}; the daemon stops (systemd restarts it)"
        );
        default(info);
    }));
}

/// Undoes what a tdscd that did not stop cleanly recorded in its host state file; false (after
/// saying why) when that failed or the file is unreadable, which is then left in place.
fn undo_host_state(path: &std::path::Path) -> bool {
    match tdscd::host::setup::undo_recorded(path) {
        Ok(tdscd::host::setup::Recorded::Nothing) => true,
        Ok(tdscd::host::setup::Recorded::Undone { restored }) => {
            println!(
                "tdscd: {}: undid what an earlier tdscd left on the host ({restored} changes put back)",
                path.display()
            );
            true
        }
        Err(e) => {
            eprintln!("tdscd: {}", chain(&e));
            false
        }
    }
}

/// Deletes our tables (`inet tdsc`, `netdev tdsc`) in one atomic netlink batch.
fn remove_rules() -> Result<(), tdsc_rules::Error> {
    Firewall::open()?.remove()
}

/// Installs the member ruleset without the egress table in one atomic netlink batch and reads
/// it back.
fn install_member_rules(cfg: &Config) -> Result<(), tdsc_rules::Error> {
    let mut fw = Firewall::open()?;
    let mut spec = tdscd::node::cluster_spec(cfg);
    // The egress device may not exist this early at boot; the daemon adds the table itself.
    spec.egress_mac = None;
    // The member ruleset has no queue rule, so the queue backend does not matter: no probe.
    let facts = HostFacts {
        queue: QueueBackend::Compat,
    };
    let rs = ruleset(Role::Member, &spec, &facts);
    fw.apply(&rs)?;
    fw.verify(&rs)
}

/// The whole error chain, once: "outer: inner: root cause".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
