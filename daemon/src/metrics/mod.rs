//! Prometheus metrics: `GET /metrics` on `[metrics] listen` (off unless set).
//!
//! One scrape reads the same state `tdscctl status` reads, through
//! [`crate::admin::server::status`] (no second copy of any counter), plus the lease and the two
//! histograms of atomics (`crate::cluster::counters::Histogram`) that `status` does not show;
//! [`exposition`] turns that into text, [`request`] decides what to answer a request, and
//! [`server`] is the tokio shell. Nothing here runs on the per-SYN path: the queue reader
//! observes one batch size per receive, the takeover one duration per takeover.

pub mod exposition;
pub mod request;
pub mod server;

use crate::cluster::counters::{BATCH_SIZE_BOUNDS, TAKEOVER_MS_BOUNDS};
use crate::node::Shared;

/// Reads one scrape's worth of state.
pub fn collect(s: &Shared) -> exposition::Scrape {
    let until = s.role.lease_until_ms();
    exposition::Scrape {
        status: crate::admin::server::status(s),
        lease_remaining_ms: if until == u64::MAX {
            u64::MAX
        } else {
            until.saturating_sub(s.role.now_ms())
        },
        queue_batch_sizes: s.counters.queue_batch_sizes.snapshot(&BATCH_SIZE_BOUNDS),
        takeover_ms: s.records.takeover_ms.snapshot(&TAKEOVER_MS_BOUNDS),
        http_served: s
            .metrics_http
            .served
            .load(std::sync::atomic::Ordering::Relaxed),
        http_refused: s.metrics_http.refused_snapshot(),
    }
}
