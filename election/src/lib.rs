//! Who is master.
//!
//! The rest of the daemon never asks *how* the master was chosen; it watches a [`RoleSignal`]
//! and reacts to each new [`Leadership`] value: it swaps its ruleset between master and member
//! and starts or idles its SYN dispatcher. Today the value comes from configuration
//! ([`StaticElection`]); the Raft election will publish into the same signal.
//!
//! ```
//! use tdsc_election::{Role, StaticElection};
//! let signal = StaticElection { node_id: 2, master: 1 }.start();
//! let now = *signal.subscribe().borrow();
//! assert_eq!(now.role, Role::Member);
//! assert_eq!(now.master_id, Some(1));
//! ```

use tokio::sync::watch;

/// A node's part in dispatching new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes client SYNs off the queue and dispatches them.
    Master,
    /// Drops client SYNs; accepts only SYNs forwarded by the master.
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Member => "member",
        }
    }
}

/// One published decision: this node's role, who the master is, and in which term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub role: Role,
    /// `None` while no master is known (during an election): nobody dispatches then.
    pub master_id: Option<u32>,
    /// Election term; a static configuration is term 1 forever.
    pub term: u64,
}

impl Leadership {
    /// The state every daemon starts in, before any election result: a member that knows no
    /// master. It is the safe state (no SYN is accepted from the client interface).
    pub const fn unknown() -> Self {
        Leadership {
            role: Role::Member,
            master_id: None,
            term: 0,
        }
    }
}

/// The role signal: one writer (the election), many readers (rules, dispatcher, status).
#[derive(Debug)]
pub struct RoleSignal {
    tx: watch::Sender<Leadership>,
}

impl RoleSignal {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Leadership::unknown());
        RoleSignal { tx }
    }

    /// Publishes a decision. Readers see only changes.
    pub fn publish(&self, l: Leadership) {
        self.tx.send_if_modified(|cur| {
            let changed = *cur != l;
            *cur = l;
            changed
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Leadership {
        *self.tx.borrow()
    }
}

impl Default for RoleSignal {
    fn default() -> Self {
        Self::new()
    }
}

/// `[election] mode = "static"`: the configured master is master, forever, in term 1.
#[derive(Debug, Clone, Copy)]
pub struct StaticElection {
    pub node_id: u32,
    pub master: u32,
}

impl StaticElection {
    pub fn decide(&self) -> Leadership {
        Leadership {
            role: if self.node_id == self.master {
                Role::Master
            } else {
                Role::Member
            },
            master_id: Some(self.master),
            term: 1,
        }
    }

    /// A signal that already carries the static decision.
    pub fn start(&self) -> RoleSignal {
        let s = RoleSignal::new();
        s.publish(self.decide());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_election_picks_the_configured_master() {
        let m = StaticElection {
            node_id: 3,
            master: 3,
        }
        .decide();
        assert_eq!(m.role, Role::Master);
        assert_eq!(m.master_id, Some(3));
        let s = StaticElection {
            node_id: 1,
            master: 3,
        }
        .decide();
        assert_eq!(s.role, Role::Member);
    }

    #[test]
    fn readers_see_changes_only() {
        let sig = RoleSignal::new();
        let mut rx = sig.subscribe();
        assert_eq!(*rx.borrow_and_update(), Leadership::unknown());
        sig.publish(Leadership::unknown());
        assert!(!rx.has_changed().unwrap());
        let m = Leadership {
            role: Role::Master,
            master_id: Some(1),
            term: 2,
        };
        sig.publish(m);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), m);
        assert_eq!(sig.current(), m);
    }
}
