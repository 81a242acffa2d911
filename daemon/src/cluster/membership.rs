//! Who is in the cluster: the Raft membership turned into node addresses and weights, and
//! the checks a `tdscctl node add|remove` must pass before it is proposed. Pure: no I/O.
//!
//! The configuration's `[[nodes]]` is the **bootstrap set**: the voters a node starts with
//! when it has no Raft state yet. From then on membership lives in the Raft log and in
//! `data_dir/raft.state`: `tdscctl node add` proposes a Raft `ConfChange` (AddNode) whose
//! context is a prost [`MemberInfo`] (id, address, weight), `tdscctl node remove` a
//! RemoveNode. When a change commits every node applies it, persists it, and updates its
//! peer table, report destinations, dispatch view and ruleset (member address set and its
//! static-hash bucket) from the [`Members`] this module builds. A restart keeps it: the
//! configuration's list is consulted only for the details of bootstrap voters.

use std::net::IpAddr;

use tdsc_election::Membership;
use tdsc_proto::control::MemberInfo;

use crate::cluster::view::MemberSlot;
use crate::config::{Config, MAX_WEIGHT};

/// One current member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub id: u32,
    pub address: IpAddr,
    pub weight: u32,
    pub voter: bool,
}

/// The current members, sorted by id, as this node has applied them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// Raft log index of the last membership change applied (0: the bootstrap set).
    pub index: u64,
    pub list: Vec<Member>,
}

impl Members {
    /// Every configured node, all voters (static election, or Raft before its state loads).
    pub fn bootstrap(cfg: &Config) -> Self {
        let list = cfg
            .nodes
            .iter()
            .zip(&cfg.weights)
            .map(|(n, w)| Member {
                id: n.id,
                address: n.address,
                weight: *w,
                voter: true,
            })
            .collect();
        Members { index: 0, list }
    }

    /// The members of a Raft membership: a node added at run time has its details in its conf
    /// change context; a bootstrap voter has them in the configuration. A voter with neither
    /// (a configuration that lost a bootstrap node) is left out, and logged.
    pub fn resolve(m: &Membership, cfg: &Config) -> Self {
        let mut list = Vec::new();
        for id in &m.voters {
            let from_ctx = m
                .members
                .get(id)
                .and_then(|ctx| MemberInfo::from_bytes(ctx).ok())
                .and_then(|info| Some((info.ip()?, info.weight.min(MAX_WEIGHT))));
            let from_cfg = || {
                let i = cfg.nodes.iter().position(|n| u64::from(n.id) == *id)?;
                Some((cfg.nodes[i].address, cfg.weights[i]))
            };
            match (u32::try_from(*id).ok(), from_ctx.or_else(from_cfg)) {
                (Some(id), Some((address, weight))) => list.push(Member {
                    id,
                    address,
                    weight,
                    voter: true,
                }),
                _ => tracing::error!(
                    node = id,
                    "voter has no address (not added at run time and not in [[nodes]]); \
                     it is left out of dispatch"
                ),
            }
        }
        list.sort_by_key(|m| m.id);
        Members {
            index: m.index,
            list,
        }
    }

    pub fn get(&self, id: u32) -> Option<&Member> {
        self.list.iter().find(|m| m.id == id)
    }

    pub fn contains(&self, id: u32) -> bool {
        self.get(id).is_some()
    }

    pub fn addresses(&self) -> Vec<IpAddr> {
        self.list.iter().map(|m| m.address).collect()
    }

    pub fn ids(&self) -> Vec<u32> {
        self.list.iter().map(|m| m.id).collect()
    }

    /// This node's static-hash bucket and the bucket count. A node that is not a member
    /// gets index == count: no bucket, so its ruleset drops every undispatched flow (the
    /// members' buckets already cover them all).
    pub fn static_hash(&self, self_id: u32) -> (u32, u32) {
        let count = u32::try_from(self.list.len()).unwrap_or(u32::MAX);
        let index = self
            .list
            .iter()
            .position(|m| m.id == self_id)
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(count);
        (index, count)
    }

    pub fn view_slots(&self) -> Vec<MemberSlot> {
        self.list
            .iter()
            .map(|m| MemberSlot {
                id: m.id,
                address: m.address,
                weight: m.weight,
                voter: m.voter,
            })
            .collect()
    }
}

/// Why a membership request was refused before anything was proposed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembershipError {
    #[error("node id 0 is not a node id (ids start at 1)")]
    ZeroId,
    #[error("node {id} is already a member (address {address})")]
    DuplicateId { id: u32, address: IpAddr },
    #[error("address {address} is already used by node {id}")]
    DuplicateAddress { address: IpAddr, id: u32 },
    #[error("address {address} is not of the cluster network's family ({family}, like this node's {own})")]
    WrongFamily {
        address: IpAddr,
        family: &'static str,
        own: IpAddr,
    },
    #[error(
        "address {address} cannot be a node address (the VIP, unspecified, loopback or multicast)"
    )]
    BadAddress { address: IpAddr },
    #[error("weight {weight} is outside 0..={MAX_WEIGHT}")]
    BadWeight { weight: u32 },
    #[error("node {id} is not a member (members: {members:?})")]
    NotMember { id: u32, members: Vec<u32> },
}

fn family(a: &IpAddr) -> &'static str {
    if a.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Checks `node add` against the current members and returns the context to propose.
pub fn check_add(
    members: &Members,
    cfg: &Config,
    id: u32,
    address: IpAddr,
    weight: u32,
) -> Result<MemberInfo, MembershipError> {
    if id == 0 {
        return Err(MembershipError::ZeroId);
    }
    if let Some(m) = members.get(id) {
        return Err(MembershipError::DuplicateId {
            id,
            address: m.address,
        });
    }
    if let Some(m) = members.list.iter().find(|m| m.address == address) {
        return Err(MembershipError::DuplicateAddress { address, id: m.id });
    }
    let own = cfg.self_address();
    if address.is_ipv4() != own.is_ipv4() {
        return Err(MembershipError::WrongFamily {
            address,
            family: family(&own),
            own,
        });
    }
    if address == cfg.vip
        || address.is_unspecified()
        || address.is_loopback()
        || address.is_multicast()
    {
        return Err(MembershipError::BadAddress { address });
    }
    if weight > MAX_WEIGHT {
        return Err(MembershipError::BadWeight { weight });
    }
    Ok(MemberInfo::new(id, address, weight))
}

/// Checks `node remove`: the node must be a member. (Raft refuses the last voter and the
/// leader itself; see `tdsc_election::ProposeError`.)
pub fn check_remove(members: &Members, id: u32) -> Result<(), MembershipError> {
    if members.contains(id) {
        Ok(())
    } else {
        Err(MembershipError::NotMember {
            id,
            members: members.ids(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn cfg() -> Config {
        Config::parse(
            r#"
node_id = 2
[cluster]
vip = "192.0.2.1"
client_interface = "eth0"
cluster_interface = "eth1"
[[nodes]]
id = 1
address = "198.51.100.11"
[[nodes]]
id = 2
address = "198.51.100.12"
weight = 5
[[nodes]]
id = 3
address = "198.51.100.13"
"#,
        )
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn resolve_takes_contexts_first_then_the_bootstrap_set() {
        let c = cfg();
        let mut ctx = BTreeMap::new();
        ctx.insert(4, MemberInfo::new(4, ip("198.51.100.14"), 7).to_bytes());
        let m = Membership {
            index: 9,
            voters: vec![1, 2, 4],
            members: ctx,
        };
        let r = Members::resolve(&m, &c);
        assert_eq!(r.index, 9);
        assert_eq!(r.ids(), vec![1, 2, 4], "node 3 was removed");
        assert_eq!(r.get(2).unwrap().weight, 5, "weight from [[nodes]]");
        assert_eq!(r.get(4).unwrap().address, ip("198.51.100.14"));
        assert_eq!(r.get(4).unwrap().weight, 7);
        assert_eq!(r.static_hash(2), (1, 3));
        assert_eq!(r.static_hash(3), (3, 3), "a removed node has no bucket");
    }

    #[test]
    fn bad_additions_are_refused_with_the_reason() {
        let c = cfg();
        let m = Members::bootstrap(&c);
        type Row = (
            &'static str,
            u32,
            &'static str,
            u32,
            Option<MembershipError>,
        );
        let table: Vec<Row> = vec![
            ("good", 4, "198.51.100.14", 1, None),
            ("id 0", 0, "198.51.100.14", 1, Some(MembershipError::ZeroId)),
            (
                "duplicate id",
                3,
                "198.51.100.14",
                1,
                Some(MembershipError::DuplicateId {
                    id: 3,
                    address: ip("198.51.100.13"),
                }),
            ),
            (
                "duplicate address",
                4,
                "198.51.100.13",
                1,
                Some(MembershipError::DuplicateAddress {
                    address: ip("198.51.100.13"),
                    id: 3,
                }),
            ),
            (
                "other family",
                4,
                "2001:db8::14",
                1,
                Some(MembershipError::WrongFamily {
                    address: ip("2001:db8::14"),
                    family: "IPv4",
                    own: ip("198.51.100.12"),
                }),
            ),
            (
                "the VIP",
                4,
                "192.0.2.1",
                1,
                Some(MembershipError::BadAddress {
                    address: ip("192.0.2.1"),
                }),
            ),
            (
                "weight",
                4,
                "198.51.100.14",
                1001,
                Some(MembershipError::BadWeight { weight: 1001 }),
            ),
        ];
        for (what, id, addr, w, want) in table {
            let got = check_add(&m, &c, id, ip(addr), w).err();
            assert_eq!(got, want, "{what}");
        }
        assert_eq!(
            check_remove(&m, 9),
            Err(MembershipError::NotMember {
                id: 9,
                members: vec![1, 2, 3]
            })
        );
        assert_eq!(check_remove(&m, 3), Ok(()));
    }
}
