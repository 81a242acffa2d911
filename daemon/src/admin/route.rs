//! Who must act on a control request: the pure decision behind cluster-wide control.
//!
//! Every node's control socket takes every command. A command is carried out where the state
//! it changes lives, and nowhere else:
//!
//! | request | acts | why |
//! |---|---|---|
//! | `status` | the node asked | its own view |
//! | `weight`, `drain`, `undrain` for node N | node N | a node announces its own weight and drain flag in its reports |
//! | `policy set`, under Raft | the Raft leader | a replicated setting, proposed by the leader |
//! | `policy set`, static election | the static master | the only node that ever dispatches |
//! | `node add`, `node remove` | the Raft leader (under a static election: refused where asked) | a Raft membership change |
//!
//! A request from the local socket that another node must carry out is forwarded once over
//! the cluster channel (`crate::cluster::remote`). A request that arrived from the network is
//! never forwarded again: if this node is not the one that must act (leadership moved, a
//! stale sender), it is refused, so a request travels at most one hop. Both kinds are
//! validated by [`validate`] first, the same check for both, so bad arguments are refused
//! before anything is sent or changed.

use crate::admin::protocol::Request;
use crate::config::{PolicyName, MAX_WEIGHT};
use crate::datapath::sticky::AffinityChange;
use crate::health::spec::TimingChange;

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node's control socket (`tdscctl`).
    Socket,
    /// The cluster channel: another node forwarded it (sealed, from that member's address).
    Peer(u32),
}

/// What this node knows when it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub self_id: u32,
    /// Under Raft (else a static election).
    pub raft: bool,
    /// The master this node follows: under Raft the leader holding the lease; None during an
    /// election.
    pub master: Option<u32>,
    /// The current members' ids.
    pub members: Vec<u32>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Carry it out here.
    Local,
    /// Forward it to this node and relay its answer.
    Forward(u32),
    /// Refuse it, changing nothing.
    Refuse(Refusal),
}

/// Why a request is refused before it is carried out, each counted on its own when the
/// request came from the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its arguments are wrong (the same check wherever it came from).
    #[error("{0}")]
    BadRequest(String),
    /// It names a node that is not a member.
    #[error("node {node} is not a member of the cluster (members: {members:?})")]
    UnknownNode { node: u32, members: Vec<u32> },
    /// It came from a node that is not a current member.
    #[error("request from node {0}, which is not a current member")]
    NotMember(u32),
    /// It came from the network, but this node is not the one that must act.
    #[error("node {this} is not the node that must act on this request ({why}); the sender should retry")]
    NotTarget { this: u32, why: String },
    /// No node is known that could act (an election is in progress).
    #[error("no master is known (election in progress); retry shortly")]
    NoLeader,
}

/// The checks of a request's arguments that need no state: the same for the local socket and
/// the network. State-dependent checks (an id already in use, the last voter) are made by the
/// node that acts, and their refusals travel back with its reason.
pub fn validate(req: &Request) -> Result<(), String> {
    match req {
        Request::Status | Request::ClusterStatus | Request::NodeRemove { .. } => Ok(()),
        Request::PolicySet { policy } => parse_policy(policy).map(|_| ()),
        Request::AffinitySet { .. } => affinity_change(req).map(|_| ()),
        Request::HealthSet { .. } => health_change(req).map(|_| ()),
        Request::Weight { weight, .. } if *weight > MAX_WEIGHT => {
            Err(format!("weight {weight} is outside 0..={MAX_WEIGHT}"))
        }
        Request::Weight { .. } | Request::Drain { .. } | Request::Undrain { .. } => Ok(()),
        Request::NodeAdd {
            id,
            address,
            weight,
        } => {
            if *id == 0 {
                return Err("node id 0 is not allowed (ids start at 1)".into());
            }
            address
                .parse::<std::net::IpAddr>()
                .map_err(|_| format!("{address:?} is not an IP address"))?;
            match weight {
                Some(w) if *w > MAX_WEIGHT => {
                    Err(format!("weight {w} is outside 0..={MAX_WEIGHT}"))
                }
                _ => Ok(()),
            }
        }
    }
}

/// The affinity change an `AffinitySet` asks for, checked.
pub fn affinity_change(req: &Request) -> Result<AffinityChange, String> {
    let Request::AffinitySet {
        affinity,
        timeout_ms,
        prefix_v4,
        prefix_v6,
    } = req
    else {
        return Err("not an affinity request".into());
    };
    let change = AffinityChange {
        on: AffinityChange::mode(affinity)?,
        timeout_ms: *timeout_ms,
        prefix_v4: *prefix_v4,
        prefix_v6: *prefix_v6,
    };
    change.validate()?;
    Ok(change)
}

/// The check (None: all) and timing change a `HealthSet` asks for, checked.
pub fn health_change(req: &Request) -> Result<(Option<String>, TimingChange), String> {
    let Request::HealthSet {
        check,
        interval_ms,
        timeout_ms,
        rise,
        fall,
        ..
    } = req
    else {
        return Err("not a health request".into());
    };
    let change = TimingChange {
        interval_ms: *interval_ms,
        timeout_ms: *timeout_ms,
        rise: *rise,
        fall: *fall,
    };
    change.validate()?;
    Ok((check.clone(), change))
}

/// Parses a policy name, or says which names there are.
pub fn parse_policy(policy: &str) -> Result<PolicyName, String> {
    PolicyName::parse(policy).ok_or_else(|| {
        let names: Vec<_> = PolicyName::ALL.iter().map(|(n, _)| *n).collect();
        format!(
            "unknown policy {policy:?}; expected one of {}",
            names.join(", ")
        )
    })
}

/// The node that must carry out `req`, or why nobody can. None: the node asked (status).
fn target(req: &Request, f: &Facts) -> Result<Option<u32>, Refusal> {
    let leader = || f.master.map(Some).ok_or(Refusal::NoLeader);
    match req {
        Request::Status | Request::ClusterStatus => Ok(None),
        Request::Weight { node, .. }
        | Request::Drain { node }
        | Request::Undrain { node }
        | Request::HealthSet { node, .. } => {
            if f.members.contains(node) {
                Ok(Some(*node))
            } else {
                Err(Refusal::UnknownNode {
                    node: *node,
                    members: f.members.clone(),
                })
            }
        }
        Request::PolicySet { .. } | Request::AffinitySet { .. } => leader(),
        // Under a static election the node asked refuses them itself (no Raft).
        Request::NodeAdd { .. } | Request::NodeRemove { .. } if !f.raft => Ok(None),
        Request::NodeAdd { .. } | Request::NodeRemove { .. } => leader(),
    }
}

/// Decides where `req` (from `origin`) is carried out.
pub fn route(req: &Request, origin: Origin, f: &Facts) -> Route {
    if let Err(e) = validate(req) {
        return Route::Refuse(Refusal::BadRequest(e));
    }
    if let Origin::Peer(from) = origin {
        if !f.members.contains(&from) {
            return Route::Refuse(Refusal::NotMember(from));
        }
        if matches!(req, Request::ClusterStatus) {
            return Route::Refuse(Refusal::BadRequest(
                "a cluster status is asked of one node's socket, not forwarded".into(),
            ));
        }
    }
    let target = match target(req, f) {
        Ok(t) => t,
        Err(e) => return Route::Refuse(e),
    };
    match (target, origin) {
        (None, _) => Route::Local,
        (Some(t), _) if t == f.self_id => Route::Local,
        (Some(t), Origin::Socket) => Route::Forward(t),
        (Some(t), Origin::Peer(_)) => Route::Refuse(Refusal::NotTarget {
            this: f.self_id,
            why: format!("node {t} must act on it"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(self_id: u32, master: Option<u32>) -> Facts {
        Facts {
            self_id,
            raft: true,
            master,
            members: vec![1, 2, 3],
        }
    }

    fn weight(node: u32, weight: u32) -> Request {
        Request::Weight { node, weight }
    }

    fn affinity(mode: &str, timeout_ms: Option<u64>, prefix_v4: Option<u8>) -> Request {
        Request::AffinitySet {
            affinity: mode.into(),
            timeout_ms,
            prefix_v4,
            prefix_v6: None,
        }
    }

    fn health(node: u32, interval_ms: Option<u64>, fall: Option<u32>) -> Request {
        Request::HealthSet {
            node,
            check: None,
            interval_ms,
            timeout_ms: None,
            rise: None,
            fall,
        }
    }

    fn add(id: u32, address: &str, weight: Option<u32>) -> Request {
        Request::NodeAdd {
            id,
            address: address.into(),
            weight,
        }
    }

    #[test]
    fn weight_drain_and_health_go_to_the_node_they_name() {
        let f = facts(2, Some(1));
        assert_eq!(
            route(&health(3, Some(100), None), Origin::Socket, &f),
            Route::Forward(3)
        );
        assert_eq!(
            route(&health(2, None, Some(2)), Origin::Socket, &f),
            Route::Local
        );
        assert_eq!(route(&weight(2, 5), Origin::Socket, &f), Route::Local);
        assert_eq!(route(&weight(3, 5), Origin::Socket, &f), Route::Forward(3));
        assert_eq!(
            route(&Request::Drain { node: 1 }, Origin::Socket, &f),
            Route::Forward(1)
        );
        assert_eq!(
            route(&Request::Undrain { node: 3 }, Origin::Socket, &f),
            Route::Forward(3)
        );
        // Not where the master is: the named node.
        assert_eq!(
            route(&Request::Drain { node: 2 }, Origin::Socket, &f),
            Route::Local
        );
    }

    #[test]
    fn raft_changes_go_to_the_leader() {
        let f = facts(2, Some(3));
        let policy = Request::PolicySet {
            policy: "least-load".into(),
        };
        assert_eq!(route(&policy, Origin::Socket, &f), Route::Forward(3));
        assert_eq!(
            route(&Request::NodeRemove { id: 1 }, Origin::Socket, &f),
            Route::Forward(3)
        );
        assert_eq!(
            route(&add(4, "198.51.100.14", None), Origin::Socket, &f),
            Route::Forward(3)
        );
        let sticky = affinity("client-address", Some(60_000), None);
        assert_eq!(route(&sticky, Origin::Socket, &f), Route::Forward(3));
        let leader = facts(3, Some(3));
        assert_eq!(route(&policy, Origin::Socket, &leader), Route::Local);
        assert_eq!(route(&sticky, Origin::Socket, &leader), Route::Local);
        assert_eq!(
            route(&Request::NodeRemove { id: 1 }, Origin::Socket, &leader),
            Route::Local
        );
        assert_eq!(
            route(&policy, Origin::Socket, &facts(2, None)),
            Route::Refuse(Refusal::NoLeader)
        );
    }

    #[test]
    fn under_a_static_election_policy_goes_to_the_master_and_membership_stays() {
        let f = Facts {
            raft: false,
            ..facts(2, Some(1))
        };
        let policy = Request::PolicySet {
            policy: "round-robin".into(),
        };
        assert_eq!(route(&policy, Origin::Socket, &f), Route::Forward(1));
        assert_eq!(
            route(&affinity("none", None, None), Origin::Socket, &f),
            Route::Forward(1)
        );
        // Refused by the node asked (membership needs Raft), not forwarded.
        assert_eq!(
            route(&Request::NodeRemove { id: 3 }, Origin::Socket, &f),
            Route::Local
        );
    }

    #[test]
    fn status_is_always_local_and_cluster_status_only_from_the_socket() {
        let f = facts(2, Some(1));
        assert_eq!(route(&Request::Status, Origin::Socket, &f), Route::Local);
        assert_eq!(route(&Request::Status, Origin::Peer(1), &f), Route::Local);
        assert_eq!(
            route(&Request::ClusterStatus, Origin::Socket, &f),
            Route::Local
        );
        assert!(matches!(
            route(&Request::ClusterStatus, Origin::Peer(1), &f),
            Route::Refuse(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_is_sent_from_either_origin() {
        let f = facts(2, Some(1));
        let bad = [
            weight(3, MAX_WEIGHT + 1),
            Request::PolicySet {
                policy: "fastest".into(),
            },
            add(0, "198.51.100.14", None),
            add(4, "198.51.100.400", None),
            add(4, "198.51.100.14", Some(MAX_WEIGHT + 1)),
            affinity("sticky", None, None),
            affinity("none", Some(1000), None),
            affinity("client-address", Some(0), None),
            affinity("client-address", None, Some(33)),
            health(3, None, None),
            health(3, Some(5), None),
            health(3, None, Some(0)),
        ];
        for req in &bad {
            for origin in [Origin::Socket, Origin::Peer(1)] {
                assert!(
                    matches!(
                        route(req, origin, &f),
                        Route::Refuse(Refusal::BadRequest(_))
                    ),
                    "{req:?} from {origin:?}"
                );
            }
        }
        let Route::Refuse(e) = route(&bad[0], Origin::Socket, &f) else {
            panic!("refused")
        };
        assert_eq!(
            e.to_string(),
            format!("weight 1001 is outside 0..={MAX_WEIGHT}")
        );
        // The edge itself passes.
        assert_eq!(
            route(&weight(3, MAX_WEIGHT), Origin::Socket, &f),
            Route::Forward(3)
        );
    }

    #[test]
    fn an_unknown_node_is_refused_naming_the_members() {
        let f = facts(2, Some(1));
        let r = route(&Request::Drain { node: 9 }, Origin::Socket, &f);
        assert_eq!(
            r,
            Route::Refuse(Refusal::UnknownNode {
                node: 9,
                members: vec![1, 2, 3]
            })
        );
        let Route::Refuse(e) = r else { panic!() };
        assert_eq!(
            e.to_string(),
            "node 9 is not a member of the cluster (members: [1, 2, 3])"
        );
    }

    #[test]
    fn a_request_from_the_network_is_never_forwarded_again() {
        // Node 2 got a policy set from node 3, but node 1 leads (leadership moved).
        let f = facts(2, Some(1));
        let policy = Request::PolicySet {
            policy: "round-robin".into(),
        };
        assert!(matches!(
            route(&policy, Origin::Peer(3), &f),
            Route::Refuse(Refusal::NotTarget { this: 2, .. })
        ));
        assert!(matches!(
            route(&weight(3, 1), Origin::Peer(3), &f),
            Route::Refuse(Refusal::NotTarget { this: 2, .. })
        ));
        assert_eq!(route(&weight(2, 1), Origin::Peer(3), &f), Route::Local);
        let leader = facts(1, Some(1));
        assert_eq!(route(&policy, Origin::Peer(3), &leader), Route::Local);
    }

    #[test]
    fn a_request_from_a_non_member_is_refused() {
        let f = facts(2, Some(2));
        assert_eq!(
            route(&weight(2, 1), Origin::Peer(7), &f),
            Route::Refuse(Refusal::NotMember(7))
        );
        assert_eq!(
            route(&Request::Status, Origin::Peer(7), &f),
            Route::Refuse(Refusal::NotMember(7))
        );
    }
}
