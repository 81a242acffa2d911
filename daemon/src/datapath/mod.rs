//! The packet path, in the order a new connection's SYN sees it.
//!
//! On the master: the queue thread ([`queue`]) takes the SYN off NFQUEUE, [`classify`] reads
//! it, the [`dispatch`] decision consults the SYN-forward [`records`] and then the [`policy`],
//! and a forward leaves through a [`rawsock`]. On the chosen member: the receive thread
//! ([`receive`]) checks the forward and re-injects the SYN, built by [`inject`], into the local
//! TCP stack. [`affinity`] pins both threads when configured. [`nfqueue`] is the queue protocol as
//! bytes (batched verdicts), not yet used by the queue thread.

pub mod affinity;
pub mod classify;
pub mod dispatch;
pub mod inject;
pub mod nfqueue;
pub mod policy;
pub mod queue;
pub mod rawsock;
pub mod receive;
pub mod records;
