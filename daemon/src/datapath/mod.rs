//! The packet path, in the order a new connection's SYN sees it.
//!
//! On the master: the queue thread ([`queue`]) takes the SYN off NFQUEUE and hands it to the
//! sans-IO [`syn_path`] core, which checks the lease, lets [`classify`] read it, asks the
//! [`dispatch`] decision (the SYN-forward [`records`], then the [`policy`]) and encodes the
//! forward; the queue thread sends a forward through a [`rawsock`]. On the chosen member: the
//! receive thread ([`receive`]) checks the forward and re-injects the SYN, built by [`inject`],
//! into the local TCP stack. [`sticky`] is client affinity, consulted by the dispatcher after
//! the records; [`affinity`] pins both threads when configured. [`nfqueue`] is
//! the queue protocol as bytes (batched verdicts) and [`queue_socket`] the socket that speaks
//! it.

pub mod affinity;
pub mod classify;
pub mod dispatch;
pub mod inject;
pub mod nfqueue;
pub mod policy;
pub mod queue;
pub mod queue_socket;
pub mod rawsock;
pub mod receive;
pub mod records;
pub mod sticky;
pub mod syn_path;
