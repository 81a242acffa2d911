//! Sending batches of HTTP requests from the clients' namespaces, and tallying who served
//! them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::http;
use crate::netns::{self, NetnsError};

/// Per-request timeout (connect, write and read each).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Outcome of a batch.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Replies per serving node id.
    pub by_node: BTreeMap<u32, u64>,
    /// Failed requests, with the first few errors.
    pub failures: u64,
    pub sample_errors: Vec<String>,
}

impl Tally {
    /// Successful requests.
    pub fn ok(&self) -> u64 {
        self.by_node.values().sum()
    }

    fn merge(&mut self, other: Tally) {
        for (node, n) in other.by_node {
            *self.by_node.entry(node).or_default() += n;
        }
        self.failures += other.failures;
        for e in other.sample_errors {
            if self.sample_errors.len() < 5 {
                self.sample_errors.push(e);
            }
        }
    }
}

/// Sends `per_client` sequential GETs to `target` from each namespace in `client_netns`, all
/// clients at once. Stops early (counting nothing more) once `stop` is set.
pub fn run(
    client_netns: &[String],
    target: SocketAddr,
    per_client: u64,
    stop: &Arc<AtomicBool>,
) -> Result<Tally, NetnsError> {
    let handles: Vec<_> = client_netns
        .iter()
        .map(|ns| {
            let stop = Arc::clone(stop);
            netns::spawn_in(ns, move || {
                let mut t = Tally::default();
                for _ in 0..per_client {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match http::get(target, "/", REQUEST_TIMEOUT) {
                        Ok(r) => *t.by_node.entry(r.node).or_default() += 1,
                        Err(e) => {
                            t.failures += 1;
                            if t.sample_errors.len() < 5 {
                                t.sample_errors.push(crate::error_chain(&e));
                            }
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut total = Tally::default();
    for (ns, h) in client_netns.iter().zip(handles) {
        let t = h
            .join()
            .map_err(|_| NetnsError::Panicked { name: ns.clone() })??;
        total.merge(t);
    }
    Ok(total)
}

/// [`run`] on a thread of its own, for traffic that keeps going while a test does something
/// else; set `stop` and join the handle for the tally.
pub fn spawn(
    client_netns: &[String],
    target: SocketAddr,
    per_client: u64,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Tally, NetnsError>> {
    let (clients, stop) = (client_netns.to_vec(), Arc::clone(stop));
    std::thread::spawn(move || run(&clients, target, per_client, &stop))
}

/// Service without node `gone`: `per_client` GETs from each client all succeed and none is
/// served by `gone`. Panics (naming `what`) otherwise; for tests after a node was lost.
pub fn assert_served_without(
    client_netns: &[String],
    target: SocketAddr,
    per_client: u64,
    gone: u32,
    what: &str,
) -> Result<Tally, NetnsError> {
    let t = run(
        client_netns,
        target,
        per_client,
        &Arc::new(AtomicBool::new(false)),
    )?;
    assert_eq!(
        t.failures, 0,
        "{what}: requests failed: {:?}",
        t.sample_errors
    );
    assert_eq!(t.ok(), per_client * client_netns.len() as u64, "{what}");
    assert!(
        !t.by_node.contains_key(&gone),
        "{what}: node {gone} was given connections: {:?}",
        t.by_node
    );
    Ok(t)
}
