//! Application health checks (`[[health.check]]`).
//!
//! Each node checks its own application: a TCP connect, an HTTP request with an expected
//! status, or a command, every `interval_ms`, each probe bounded by `timeout_ms`. After
//! `fall` consecutive failures a node is unhealthy: it takes no new connections (the master
//! does not choose it, itself included), keeps its established ones, and says so in its
//! reports; after `rise` consecutive successes it takes new connections again.
//!
//! [`spec`] validates the configuration, [`state`] is the pure rise/fall logic, [`probe`]
//! runs one probe, and [`task`] owns the checks and publishes the verdict.
//!
//! (`[health] report_interval_ms` and `dead_after_ms` are the liveness of the daemons, in
//! [`crate::cluster::report`]: a node whose reports stop is dead, whatever its checks say.)

pub mod probe;
pub mod spec;
pub mod state;
pub mod task;
