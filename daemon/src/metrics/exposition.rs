//! One scrape as Prometheus text (the OpenMetrics text format of `prometheus-client`): a pure
//! function of a [`Scrape`], the value [`crate::admin::server::status`] builds plus the few
//! figures `status` does not show (lease, histograms). Names are `tdsc_…`; the operator's
//! table of them is in `docs/operating.md` (*Metrics*).

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::admin::protocol::Status;
use crate::cluster::counters::HistogramSnapshot;

/// What one scrape shows; read once, then rendered.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// What `tdscctl status` would show now.
    pub status: Status,
    /// Milliseconds of election lease left (0: none; `u64::MAX`: a static election's, which
    /// does not end).
    pub lease_remaining_ms: u64,
    /// Packets per receive of the batched queue reader.
    pub queue_batch_sizes: HistogramSnapshot,
    /// Milliseconds each takeover took.
    pub takeover_ms: HistogramSnapshot,
    /// Scrapes the metrics server answered (before this one).
    pub http_served: u64,
    /// Requests it refused, by reason label (`crate::metrics::request::Refusal`).
    pub http_refused: Vec<(&'static str, u64)>,
}

/// The Prometheus text for `scrape`, ending with `# EOF`.
pub fn render(scrape: &Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Collect(scrape.clone())));
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail; an Err here would be a bug in the encoder.
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// The classic Prometheus text format (0.0.4) of `openmetrics` (what [`render`] returns), for
/// clients that do not ask for OpenMetrics, such as `promtool check metrics` and older
/// scrapers: `prometheus-client` writes only OpenMetrics, whose counter family `x` has samples
/// `x_total`, where the classic format names the family `x_total` too. So: a counter
/// family's HELP and TYPE lines get `_total`, and the `# UNIT` and `# EOF` lines, which the
/// classic format lacks, go. Samples are the same in both.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|r| r.split_once(' '))
                    .map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Collect(Scrape);

impl prometheus_client::collector::Collector for Collect {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.0.status;
        let c = &s.counters;
        for (name, help, v) in [
            (
                "tdsc_syns_dispatched",
                "SYNs taken off the queue and given to the policy (master).",
                c.syns_dispatched,
            ),
            (
                "tdsc_forwarded_out",
                "Dispatched SYNs sent to another node as proto-253.",
                c.forwarded_out,
            ),
            (
                "tdsc_accepted_locally",
                "Dispatched SYNs accepted by the master itself.",
                c.accepted_locally,
            ),
            (
                "tdsc_retransmit_hits",
                "Retransmitted SYNs sent where their first copy went.",
                c.retransmit_hits,
            ),
            (
                "tdsc_dropped_no_node",
                "SYNs dropped because no node was eligible.",
                c.dropped_no_node,
            ),
            (
                "tdsc_dropped_not_master",
                "SYNs queued while this node was not master; dropped.",
                c.dropped_not_master,
            ),
            (
                "tdsc_queue_rejected",
                "Queued packets that were not a dispatchable SYN.",
                c.queue_rejected,
            ),
            (
                "tdsc_forward_send_errors",
                "Forwards whose send failed.",
                c.forward_send_errors,
            ),
            (
                "tdsc_received_forwarded",
                "Valid forwarded SYNs received from the master.",
                c.received_forwarded,
            ),
            (
                "tdsc_reinjected",
                "Forwarded SYNs written into the local TCP stack.",
                c.reinjected,
            ),
            (
                "tdsc_reinject_errors",
                "Forwarded SYNs whose re-injection failed.",
                c.reinject_errors,
            ),
            (
                "tdsc_records_evicted_live",
                "Live SYN-forward records pushed out by a full table.",
                c.records_evicted_live,
            ),
            (
                "tdsc_records_handoff_overflow",
                "New records not handed to Raft: the hand-off was full.",
                c.records_handoff_overflow,
            ),
            (
                "tdsc_affinity_hits",
                "New connections sent to the node their client's affinity entry named.",
                c.affinity_hits,
            ),
            (
                "tdsc_affinity_evicted_live",
                "Live client-affinity entries pushed out by a full table.",
                c.affinity_evicted_live,
            ),
            (
                "tdsc_reports_sent",
                "Reports sent on the cluster socket.",
                c.reports_sent,
            ),
            (
                "tdsc_reports_received",
                "Cluster datagrams accepted.",
                c.reports_received,
            ),
            (
                "tdsc_reports_rejected",
                "Cluster datagrams refused (sum of tdsc_cluster_dropped_total).",
                c.reports_rejected,
            ),
            (
                "tdsc_queue_received",
                "Packets the queue reader took off NFQUEUE.",
                c.queue.received,
            ),
            (
                "tdsc_queue_batches",
                "Queue receives that returned packets.",
                c.queue.batches,
            ),
            (
                "tdsc_queue_enobufs",
                "Queue socket overruns reported to the reader.",
                c.queue.enobufs,
            ),
            (
                "tdsc_queue_verdict_errors",
                "Verdicts the kernel refused.",
                c.queue.verdict_errors,
            ),
            (
                "tdsc_queue_malformed",
                "Queue datagrams that did not parse or were cut short.",
                c.queue.malformed,
            ),
            (
                "tdsc_records_proposed",
                "SYN-forward records this node proposed while master.",
                s.records.proposed_records,
            ),
            (
                "tdsc_records_proposed_batches",
                "Record batches this node proposed while master.",
                s.records.proposed_batches,
            ),
            (
                "tdsc_records_applied",
                "Records applied to this node's replica.",
                s.records.applied_records,
            ),
            (
                "tdsc_records_applied_batches",
                "Record batches applied to this node's replica.",
                s.records.applied_batches,
            ),
            (
                "tdsc_records_discarded_not_leader",
                "Record hand-offs drained while not leader.",
                s.records.discarded_not_leader,
            ),
            (
                "tdsc_syn_recv_queries_answered",
                "SYN-RECV queries this node answered for a new master.",
                s.records.queries_answered,
            ),
        ] {
            counter(&mut enc, name, help, v)?;
        }
        let r = &c.forward_rejected;
        counter_by(
            &mut enc,
            "tdsc_forward_rejected",
            "Forwards refused, by reason.",
            "reason",
            &[
                ("malformed", r.malformed),
                ("unknown_peer", r.unknown_peer),
                ("wrong_vip", r.wrong_vip),
                ("not_syn", r.not_syn),
                ("bad_port", r.bad_port),
                ("stale_term", r.stale_term),
                ("bad_tag", r.bad_tag),
                ("unknown_key", r.unknown_key),
                ("replay", r.replay),
                ("ruleset_foreign", r.ruleset_foreign),
            ],
        )?;
        let d = &c.cluster_dropped;
        counter_by(
            &mut enc,
            "tdsc_cluster_dropped",
            "Cluster datagrams refused, by reason.",
            "reason",
            &[
                ("source_port", d.source_port),
                ("bad_header", d.bad_header),
                ("unknown_key", d.unknown_key),
                ("bad_tag", d.bad_tag),
                ("unknown_sender", d.unknown_sender),
                ("replay", d.replay),
                ("undecodable", d.undecodable),
                ("no_owner", d.no_owner),
            ],
        )?;
        let k = &c.drops;
        counter_by(
            &mut enc,
            "tdsc_drops",
            "Packets dropped outside the daemon's code, by where.",
            "where",
            &[
                ("queue_kernel", k.queue_kernel),
                ("queue_user", k.queue_user),
                ("not_owned_in", k.not_owned_in),
                ("not_owned_out", k.not_owned_out),
                ("untracked_in", k.untracked_in),
                ("untracked_out", k.untracked_out),
                ("control_port_foreign", k.control_port_foreign),
                ("control_port_local", k.control_port_local),
                ("syn_prefix_limited", k.syn_prefix_limited),
                ("listen_overflows", k.listen_overflows),
                ("listen_drops", k.listen_drops),
                ("conntrack_insert_failed", k.conntrack_insert_failed),
                ("conntrack_drop", k.conntrack_drop),
            ],
        )?;
        counter_by(
            &mut enc,
            "tdsc_control_refused",
            "Control-socket requests and sessions refused, by reason.",
            "reason",
            &[
                ("oversize", c.control.oversize),
                ("over_cap", c.control.over_cap),
            ],
        )?;
        let rc = &c.remote_control;
        counter_by(
            &mut enc,
            "tdsc_remote_control",
            "Control requests over the cluster channel: forwarded from here or served here, by event.",
            "event",
            &[
                ("forwarded", rc.forwarded),
                ("timeouts", rc.timeouts),
                ("forward_busy", rc.forward_busy),
                ("stray_answers", rc.stray_answers),
                ("served", rc.served),
                ("bad_request", rc.bad_request),
                ("not_member", rc.not_member),
                ("not_target", rc.not_target),
                ("busy", rc.busy),
                ("failed", rc.failed),
            ],
        )?;
        if let Some(h) = s.health.as_ref().filter(|h| !h.checks.is_empty()) {
            let per_check = |f: &dyn Fn(&crate::health::task::CheckSnapshot) -> u64| {
                h.checks
                    .iter()
                    .map(|k| (k.name.as_str(), f(k)))
                    .collect::<Vec<_>>()
            };
            counter_by(
                &mut enc,
                "tdsc_health_check_probes",
                "Probes of this node's application, by check.",
                "check",
                &per_check(&|k| k.probes),
            )?;
            counter_by(
                &mut enc,
                "tdsc_health_check_failures",
                "Failed probes of this node's application, by check.",
                "check",
                &per_check(&|k| k.failures),
            )?;
            counter_by(
                &mut enc,
                "tdsc_health_check_downs",
                "Times a check turned from passing to failing, by check.",
                "check",
                &per_check(&|k| k.downs),
            )?;
            gauge_family(
                &mut enc,
                "tdsc_health_check_passing",
                "1 while the check passes (0 also before its first probe).",
                &h.checks
                    .iter()
                    .map(|k| {
                        (
                            vec![("check", k.name.clone())],
                            f64::from(u8::from(k.passing == Some(true))),
                        )
                    })
                    .collect::<Vec<_>>(),
            )?;
        }

        counter(
            &mut enc,
            "tdsc_metrics_http_served",
            "Scrapes this endpoint answered before this one.",
            self.0.http_served,
        )?;
        counter_by(
            &mut enc,
            "tdsc_metrics_http_refused",
            "Requests this endpoint refused, by reason.",
            "reason",
            &self.0.http_refused,
        )?;

        // Gauges of this node.
        let labels = |pairs: &[(&'static str, &str)]| -> Labels {
            pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
        };
        gauge_family(
            &mut enc,
            "tdsc_info",
            "This node's identity and fixed settings (value 1).",
            &[(
                labels(&[
                    ("node_id", &s.node_id.to_string()),
                    ("vip", &s.vip),
                    ("queue_backend", &s.queue_backend),
                    ("queue_io", &c.queue.io),
                    ("l2_mode", &s.l2_mode),
                ]),
                1.0,
            )],
        )?;
        gauge_family(
            &mut enc,
            "tdsc_policy_info",
            "The dispatch policy in force (value 1).",
            &[(labels(&[("policy", &s.policy)]), 1.0)],
        )?;
        gauge_family(
            &mut enc,
            "tdsc_role",
            "This node's role: 1 for the one it has, 0 for the other.",
            &[
                (
                    labels(&[("role", "master")]),
                    f64::from(u8::from(s.role == "master")),
                ),
                (
                    labels(&[("role", "member")]),
                    f64::from(u8::from(s.role != "master")),
                ),
            ],
        )?;
        gauge(
            &mut enc,
            "tdsc_term",
            "The highest election term this node knows.",
            None,
            as_f64(s.term),
        )?;
        gauge(
            &mut enc,
            "tdsc_master_id",
            "The master's node id as this node knows it (-1: none).",
            None,
            s.master_id.map_or(-1.0, f64::from),
        )?;
        gauge(
            &mut enc,
            "tdsc_member",
            "1 while this node is a member of the cluster.",
            None,
            f64::from(u8::from(s.member)),
        )?;
        gauge(
            &mut enc,
            "tdsc_voters",
            "Voting members of the Raft group.",
            None,
            as_f64(u64::try_from(s.voters.len()).unwrap_or(u64::MAX)),
        )?;
        // A static election's lease does not end: no sample (OpenMetrics spells infinity
        // `+Inf`, which the encoder does not write).
        if self.0.lease_remaining_ms != u64::MAX {
            gauge(
                &mut enc,
                "tdsc_lease_remaining",
                "Election lease left (0: none; absent under a static election).",
                Some(Unit::Seconds),
                as_f64(self.0.lease_remaining_ms) / 1000.0,
            )?;
        }
        gauge(
            &mut enc,
            "tdsc_queue_batch_max",
            "The largest queue batch so far, in packets.",
            None,
            as_f64(c.queue.batch_max),
        )?;
        gauge(
            &mut enc,
            "tdsc_queue_rcvbuf",
            "The queue socket's receive buffer.",
            Some(Unit::Bytes),
            as_f64(c.queue.rcvbuf),
        )?;
        gauge(
            &mut enc,
            "tdsc_records_replica_live",
            "Live records in this node's replica.",
            None,
            as_f64(s.records.replica_live),
        )?;
        if let Some(a) = &s.affinity {
            gauge(
                &mut enc,
                "tdsc_affinity_replica_live",
                "Live client-affinity entries in this node's replica.",
                None,
                as_f64(a.replica_live),
            )?;
        }

        // Gauges per node, as this node sees them.
        let per_node = |f: &dyn Fn(&crate::admin::protocol::NodeStatus) -> f64| {
            s.nodes
                .iter()
                .map(|n| (vec![("node", n.id.to_string())], f(n)))
                .collect::<Vec<_>>()
        };
        gauge_family(
            &mut enc,
            "tdsc_node_alive",
            "1 while the node is heard from (this node: always).",
            &per_node(&|n| f64::from(u8::from(n.alive))),
        )?;
        gauge_family(
            &mut enc,
            "tdsc_node_draining",
            "1 while the node is drained.",
            &per_node(&|n| f64::from(u8::from(n.draining))),
        )?;
        gauge_family(
            &mut enc,
            "tdsc_node_healthy",
            "1 while every health check of the node's application passes, as it reported.",
            &per_node(&|n| f64::from(u8::from(n.healthy))),
        )?;
        gauge_family(
            &mut enc,
            "tdsc_node_weight",
            "The node's weight (0: no new connections).",
            &per_node(&|n| f64::from(n.weight)),
        )?;
        gauge_family(
            &mut enc,
            "tdsc_node_load",
            "The node's load figure, as last reported.",
            &per_node(&|n| f64::from(n.load) / 1000.0),
        )?;
        gauge_family(
            &mut enc,
            "tdsc_node_connections",
            "ESTABLISHED connections on the VIP, as last reported.",
            &per_node(&|n| f64::from(n.connections)),
        )?;
        gauge_family(
            &mut enc,
            "tdsc_node_syn_recv",
            "SYN-RECV sockets on the VIP, as last reported.",
            &per_node(&|n| f64::from(n.syn_recv)),
        )?;
        gauge_family(
            &mut enc,
            "tdsc_node_voter",
            "1 while the node is a voting member.",
            &per_node(&|n| f64::from(u8::from(n.voter))),
        )?;
        let heard: Vec<_> = s
            .nodes
            .iter()
            .filter_map(|n| {
                n.last_report_ms_ago
                    .map(|ms| (vec![("node", n.id.to_string())], as_f64(ms) / 1000.0))
            })
            .collect();
        gauge_family_unit(
            &mut enc,
            "tdsc_node_last_report_age",
            "Time since the node's last report reached this node.",
            Some(Unit::Seconds),
            &heard,
        )?;

        histogram(
            &mut enc,
            "tdsc_queue_batch_size",
            "Packets per receive of the queue reader.",
            None,
            &self.0.queue_batch_sizes,
            1.0,
        )?;
        histogram(
            &mut enc,
            "tdsc_takeover_duration",
            "How long each takeover took before dispatching.",
            Some(Unit::Seconds),
            &self.0.takeover_ms,
            1000.0,
        )?;
        Ok(())
    }
}

/// Exact for every value below 2^53, which every count and id here is in practice.
fn as_f64(v: u64) -> f64 {
    // Lossless below 2^53; a count that large is off by less than a part in 10^15.
    #[allow(
        clippy::cast_precision_loss,
        reason = "a gauge is f64; exact below 2^53"
    )]
    let f = v as f64;
    f
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = ConstCounter::new(v);
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

fn counter_by(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in values {
        let set = [(label, *value)];
        ConstCounter::new(*v).encode(m.encode_family(&set)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let m = ConstGauge::new(v);
    m.encode(enc.encode_descriptor(name, help, unit.as_ref(), m.metric_type())?)
}

fn gauge_family(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    gauge_family_unit(enc, name, help, None, series)
}

fn gauge_family_unit(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    series: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A histogram whose bounds are in its snapshot's unit; each is divided by `scale` (1000 to
/// turn milliseconds into seconds).
fn histogram(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    h: &HistogramSnapshot,
    scale: f64,
) -> Result<(), std::fmt::Error> {
    let mut buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|(b, c)| (as_f64(*b) / scale, *c))
        .collect();
    // prometheus-client writes the bucket bounded by f64::MAX as `le="+Inf"`.
    buckets.push((f64::MAX, h.over));
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Histogram)?;
    m.encode_histogram::<()>(as_f64(h.sum) / scale, h.count(), &buckets, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::{Counters, NodeStatus};

    fn node(id: u32, alive: bool, connections: u32) -> NodeStatus {
        NodeStatus {
            id,
            address: format!("198.51.100.{id}"),
            alive,
            draining: id == 3,
            healthy: id != 2,
            weight: id,
            load: 1500,
            connections,
            syn_recv: 0,
            is_self: id == 1,
            voter: true,
            last_report_ms_ago: (id != 1).then_some(250),
        }
    }

    fn scrape() -> Scrape {
        let mut counters = Counters {
            syns_dispatched: 600,
            forwarded_out: 400,
            ..Counters::default()
        };
        counters.forward_rejected.bad_tag = 7;
        counters.drops.syn_prefix_limited = 9;
        counters.queue.io = "batched".into();
        let batches = crate::cluster::counters::Histogram::<2>::default();
        for v in [1, 1, 2, 5] {
            batches.observe(&[1, 2], v);
        }
        Scrape {
            status: Status {
                node_id: 1,
                role: "master".into(),
                master_id: Some(1),
                term: 4,
                leader_id: Some(1),
                member: true,
                voters: vec![1, 2, 3],
                membership_index: 0,
                policy: "round-robin".into(),
                vip: "192.0.2.1".into(),
                tcp_ports: vec![80],
                queue_backend: "compat".into(),
                l2_mode: "masked-mac".into(),
                nodes: vec![node(1, true, 5), node(2, true, 6), node(3, false, 0)],
                counters,
                records: Default::default(),
                cluster_key: Default::default(),
                affinity: None,
                health: Some(crate::health::task::HealthSnapshot {
                    healthy: false,
                    checks: vec![crate::health::task::CheckSnapshot {
                        name: "http:80".into(),
                        probe: "http 127.0.0.1:80/".into(),
                        passing: Some(false),
                        last_failure: Some("refused".into()),
                        probes: 12,
                        failures: 4,
                        downs: 1,
                        interval_ms: 2000,
                        timeout_ms: 1000,
                        rise: 2,
                        fall: 3,
                    }],
                }),
            },
            lease_remaining_ms: 1500,
            queue_batch_sizes: batches.snapshot(&[1, 2]),
            takeover_ms: HistogramSnapshot::default(),
            http_served: 3,
            http_refused: vec![("not_found", 2)],
        }
    }

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }

    #[test]
    fn status_counters_gauges_and_histograms_are_in_the_text() {
        let t = render(&scrape());
        has(&t, "# TYPE tdsc_syns_dispatched counter");
        has(&t, "tdsc_syns_dispatched_total 600");
        has(&t, "tdsc_forwarded_out_total 400");
        has(&t, "tdsc_forward_rejected_total{reason=\"bad_tag\"} 7");
        has(&t, "tdsc_drops_total{where=\"syn_prefix_limited\"} 9");
        has(&t, "tdsc_role{role=\"master\"} 1.0");
        has(&t, "tdsc_role{role=\"member\"} 0.0");
        has(&t, "tdsc_term 4.0");
        has(&t, "tdsc_policy_info{policy=\"round-robin\"} 1.0");
        has(&t, "tdsc_lease_remaining_seconds 1.5");
        has(&t, "tdsc_node_alive{node=\"3\"} 0.0");
        has(&t, "tdsc_node_connections{node=\"2\"} 6.0");
        has(&t, "tdsc_node_draining{node=\"3\"} 1.0");
        has(&t, "tdsc_node_healthy{node=\"2\"} 0.0");
        has(&t, "tdsc_node_healthy{node=\"1\"} 1.0");
        has(&t, "tdsc_health_check_probes_total{check=\"http:80\"} 12");
        has(&t, "tdsc_health_check_failures_total{check=\"http:80\"} 4");
        has(&t, "tdsc_health_check_passing{check=\"http:80\"} 0.0");
        has(&t, "tdsc_remote_control_total{event=\"forwarded\"} 0");
        has(&t, "tdsc_node_load{node=\"1\"} 1.5");
        has(&t, "tdsc_node_last_report_age_seconds{node=\"2\"} 0.25");
        has(
            &t,
            "tdsc_metrics_http_refused_total{reason=\"not_found\"} 2",
        );
        // Cumulative buckets: 1, 1 | 2 | 5 over the last bound.
        has(&t, "tdsc_queue_batch_size_bucket{le=\"1.0\"} 2");
        has(&t, "tdsc_queue_batch_size_bucket{le=\"2.0\"} 3");
        has(&t, "tdsc_queue_batch_size_bucket{le=\"+Inf\"} 4");
        has(&t, "tdsc_queue_batch_size_count 4");
        has(&t, "tdsc_queue_batch_size_sum 9.0");
        assert!(t.ends_with("# EOF\n"), "no EOF marker");
        // Self is never "last heard".
        assert!(!t.contains("tdsc_node_last_report_age_seconds{node=\"1\"}"));
    }

    #[test]
    fn the_classic_format_names_counter_families_with_total_and_has_no_unit_or_eof() {
        let t = to_classic(&render(&scrape()));
        has(&t, "# HELP tdsc_syns_dispatched_total SYNs taken off the queue and given to the policy (master).");
        has(&t, "# TYPE tdsc_syns_dispatched_total counter");
        has(&t, "tdsc_syns_dispatched_total 600");
        has(&t, "# TYPE tdsc_term gauge");
        has(&t, "# TYPE tdsc_lease_remaining_seconds gauge");
        has(&t, "tdsc_lease_remaining_seconds 1.5");
        has(&t, "# TYPE tdsc_queue_batch_size histogram");
        assert!(!t.contains("# UNIT") && !t.contains("# EOF"), "{t}");
        // Every TYPE line has its HELP line just before it.
        let lines: Vec<&str> = t.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or("");
                assert!(
                    i > 0 && lines[i - 1].starts_with(&format!("# HELP {name} ")),
                    "{l}"
                );
            }
        }
    }

    #[test]
    fn a_static_lease_has_no_sample() {
        let mut s = scrape();
        s.lease_remaining_ms = u64::MAX;
        assert!(!render(&s).contains("tdsc_lease_remaining_seconds "));
    }
}
