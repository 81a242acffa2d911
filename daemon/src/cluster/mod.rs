//! The control path: who is master, who is a member, and what every node knows of the others.
//!
//! The Raft task ([`raft`]) elects the master and replicates [`membership`], settings and the
//! SYN-forward records; a new master adopts them at [`takeover`]. Liveness and load travel in
//! [`report`]s. What the threads share without locks is the cluster [`view`]. The cluster key
//! ([`keyfile`]) is read and checked here.

pub mod keyfile;
pub mod membership;
pub mod raft;
pub mod report;
pub mod takeover;
pub mod view;
