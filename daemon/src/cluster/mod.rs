//! The control path: who is master, who is a member, and what every node knows of the others.
//!
//! The Raft task ([`raft`]) elects the master and replicates [`membership`], settings and the
//! SYN-forward records; a new master adopts them at [`takeover`]. Liveness and load travel in
//! [`report`]s. All of these messages share one UDP socket, whose receive loop ([`bus`])
//! opens the seal of every datagram (the cluster key, [`keyfile`]), checks its sender and replay
//! window, and routes each message to its owner. What the threads share
//! without locks is the cluster [`view`], the [`role`] cell and the [`counters`]. The cluster
//! key file is read and checked by [`keyfile`]. Control requests that another node must carry
//! out travel over the same socket ([`remote`]).

pub mod bus;
pub mod counters;
pub mod keyfile;
pub mod membership;
pub mod raft;
pub mod raft_disk;
pub mod remote;
pub mod report;
pub mod role;
pub mod takeover;
pub mod view;
