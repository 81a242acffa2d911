//! tcp-dsc node daemon.
//!
//! One node's data path, in the order a new connection sees it:
//!
//! 1. The ruleset ([`tdsc_rules`]) sends client SYNs for the VIP to NFQUEUE on the master and
//!    drops them on members.
//! 2. The master's queue thread ([`master`]) classifies each SYN ([`classify`]), asks the
//!    [`dispatch::Dispatcher`] (SYN-forward [`records`] first, then the [`policy`]) and either
//!    accepts it or forwards it as protocol 253 ([`tdsc_proto::forward`]).
//! 3. The chosen member's receive thread ([`member`]) checks the forward and re-injects the
//!    SYN with a fresh checksum ([`inject`]); its TCP stack answers the client directly.
//!
//! The control path runs beside it: the role signal ([`tdsc_election`]) turns the ruleset and
//! the queue thread between master and member; [`report`] exchanges liveness and load; the
//! Raft task ([`raft`]) also owns the cluster's [`membership`], which it applies to the
//! dispatch [`view`] and, through the role task ([`node`]), to the ruleset; the control socket
//! ([`control`], [`status`]) serves `tdscctl`.

pub mod affinity;
pub mod classify;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod host;
pub mod inject;
pub mod load;
pub mod master;
pub mod member;
pub mod membership;
pub mod netlink;
pub mod node;
pub mod policy;
pub mod raft;
pub mod rawsock;
pub mod records;
pub mod report;
pub mod sockdiag;
pub mod status;
pub mod takeover;
pub mod view;
