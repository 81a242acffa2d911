//! tcp-dsc node daemon.
//!
//! One node's data path, in the order a new connection sees it:
//!
//! 1. The ruleset ([`tdsc_rules`]) sends client SYNs for the VIP to NFQUEUE on the master and
//!    drops them on members.
//! 2. The master's queue thread ([`datapath::queue`]) classifies each SYN ([`datapath::classify`]), asks the
//!    [`datapath::dispatch::Dispatcher`] (SYN-forward [`datapath::records`] first, then the [`datapath::policy`]) and either
//!    re-injects it into its own stack through a raw socket or forwards it as protocol 253
//!    ([`tdsc_proto::forward`]).
//! 3. The chosen member's receive thread ([`datapath::receive`]) checks the forward and re-injects the
//!    SYN with a fresh checksum ([`datapath::inject`]); its TCP stack answers the client directly.
//!
//! The control path runs beside it: the role signal ([`tdsc_election`]) turns the ruleset and
//! the queue thread between master and member, one step of a [`cluster::role`] plan at a time;
//! [`cluster::report`] exchanges liveness and load over the cluster socket, whose receive loop
//! ([`cluster::bus`]) routes every message to its owner; the Raft task ([`cluster::raft`]) also
//! owns the cluster's [`cluster::membership`], which it applies to the dispatch
//! [`cluster::view`] and, through the role task ([`node`]), to the ruleset; the control socket
//! ([`admin`]) serves `tdscctl`, and
//! [`metrics`] serves Prometheus. Every thread and task is owned by a handle that stops it
//! cooperatively and joins it ([`shutdown`]).

pub mod admin;
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod health;
pub mod host;
pub mod metrics;
pub mod node;
pub mod shutdown;
pub mod watchdog;
