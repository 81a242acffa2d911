//! Client affinity (IPVS persistence, HAProxy `balance source`): while a client's affinity
//! entry lives, its new connections go to the node that took its last one.
//!
//! Multi-connection protocols need it: iperf3's data connections must reach the node that
//! holds its control connection, FTP's data connection the node with the session, and so on.
//! An entry is keyed by the client's address under a netmask (`[scheduler]
//! affinity_netmask_v4` / `_v6`: a /24 keeps a whole NATed site on one node), names the node
//! that took the client's last connection, and lives for the timeout after that connection's
//! SYN. Every new connection of the client renews it. An entry naming a node that is not
//! eligible (dead, draining, weight 0: `Candidate::eligible`) is ignored, and the policy's
//! choice replaces it.
//!
//! The table is a [`SynRecords`] table keyed by (masked address, port 0) with no ISN: the
//! same fixed-size, set-associative array, allocated once, never allocating per SYN, its
//! memory bounded whatever the number of clients; a live entry pushed out of a full set is
//! counted. The master's table is replicated like the SYN-forward records: every node builds
//! its replica from the same committed record batches (`crate::cluster::takeover::Replica`),
//! so a new master adopts it and a client keeps its node across a takeover.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::datapath::records::{Lookup, RecordEntry, SynRecords};

/// `[scheduler] affinity = "client-address"` and its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffinitySettings {
    /// How long an entry lives after the client's last new connection.
    pub timeout: Duration,
    /// Prefix length an IPv4 client address is masked to (32: each address alone).
    pub prefix_v4: u8,
    /// Prefix length an IPv6 client address is masked to (128: each address alone).
    pub prefix_v6: u8,
    /// Entries the table holds (rounded up to a power of two).
    pub capacity: usize,
}

/// The client address as an affinity key: masked to the configured prefix.
pub fn mask(client: &IpAddr, prefix_v4: u8, prefix_v6: u8) -> IpAddr {
    match client {
        IpAddr::V4(a) => {
            let bits = u32::from(*a);
            let kept = u32::MAX
                .checked_shl(32 - u32::from(prefix_v4.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & kept))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(*a);
            let kept = u128::MAX
                .checked_shl(128 - u32::from(prefix_v6.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & kept))
        }
    }
}

/// The client-affinity table (see the module docs). Node indices are the cluster view's.
#[derive(Debug)]
pub struct Affinity {
    table: SynRecords,
    prefix_v4: u8,
    prefix_v6: u8,
}

impl Affinity {
    pub fn new(settings: &AffinitySettings) -> Self {
        let timeout_ms = u64::try_from(settings.timeout.as_millis()).unwrap_or(u64::MAX);
        Affinity {
            table: SynRecords::new(settings.capacity, timeout_ms),
            prefix_v4: settings.prefix_v4,
            prefix_v6: settings.prefix_v6,
        }
    }

    fn key(&self, client: &IpAddr) -> IpAddr {
        mask(client, self.prefix_v4, self.prefix_v6)
    }

    /// The node index this client's live entry names, if any.
    pub fn lookup(&self, client: &IpAddr, now_ms: u64) -> Option<u16> {
        match self.table.lookup(&self.key(client), 0, 0, now_ms) {
            Lookup::Retransmit { node } => Some(node),
            Lookup::Miss | Lookup::NewIsn => None,
        }
    }

    /// The client's new connection went to `node`: its entry names it and lives the timeout
    /// from now.
    pub fn renew(&mut self, client: &IpAddr, node: u16, now_ms: u64) {
        let key = self.key(client);
        self.table.insert_any_isn(&key, 0, node, now_ms);
    }

    /// Puts an entry taken from another table (a replica), keeping its stamp.
    pub fn adopt(&mut self, e: &RecordEntry) {
        self.table.adopt(&RecordEntry {
            client: self.key(&e.client),
            port: 0,
            isn: None,
            ..*e
        });
    }

    /// Live entries (for a takeover). Allocates.
    pub fn live_entries(&self, now_ms: u64) -> Vec<RecordEntry> {
        self.table.live_entries(now_ms)
    }

    pub fn live_count(&self, now_ms: u64) -> usize {
        self.table.live_count(now_ms)
    }

    /// Live entries pushed out by newer ones since the last call.
    pub fn take_evictions(&mut self) -> u64 {
        std::mem::take(&mut self.table.evicted_live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(prefix_v4: u8) -> AffinitySettings {
        AffinitySettings {
            timeout: Duration::from_millis(1000),
            prefix_v4,
            prefix_v6: 64,
            capacity: 1024,
        }
    }

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn masks_to_the_prefix() {
        assert_eq!(mask(&a("192.0.2.101"), 24, 128), a("192.0.2.0"));
        assert_eq!(mask(&a("192.0.2.101"), 32, 128), a("192.0.2.101"));
        assert_eq!(mask(&a("192.0.2.101"), 0, 128), a("0.0.0.0"));
        assert_eq!(mask(&a("2001:db8::1:2"), 32, 64), a("2001:db8::"));
        assert_eq!(mask(&a("2001:db8::1:2"), 32, 128), a("2001:db8::1:2"));
        assert_eq!(mask(&a("2001:db8::1:2"), 32, 0), a("::"));
    }

    #[test]
    fn an_entry_lives_the_timeout_after_the_last_connection() {
        let mut t = Affinity::new(&settings(32));
        let c = a("192.0.2.101");
        assert_eq!(t.lookup(&c, 0), None);
        t.renew(&c, 2, 0);
        assert_eq!(t.lookup(&c, 999), Some(2));
        t.renew(&c, 2, 900);
        assert_eq!(t.lookup(&c, 1899), Some(2), "renewed by the new connection");
        assert_eq!(t.lookup(&c, 1900), None, "timed out");
        assert_eq!(t.lookup(&a("192.0.2.102"), 10), None, "another client");
    }

    #[test]
    fn a_netmask_groups_clients() {
        let mut t = Affinity::new(&settings(24));
        t.renew(&a("192.0.2.101"), 1, 0);
        assert_eq!(t.lookup(&a("192.0.2.7"), 1), Some(1), "same /24");
        assert_eq!(t.lookup(&a("198.51.100.7"), 1), None);
        assert_eq!(t.live_count(1), 1);
    }

    #[test]
    fn adopted_entries_keep_their_stamp() {
        let mut t = Affinity::new(&settings(32));
        t.adopt(&RecordEntry {
            client: a("192.0.2.101"),
            port: 40000,
            isn: Some(7),
            node: 1,
            stamp_ms: 500,
        });
        assert_eq!(t.lookup(&a("192.0.2.101"), 1499), Some(1));
        assert_eq!(t.lookup(&a("192.0.2.101"), 1500), None);
        let live = t.live_entries(600);
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].port, live[0].isn), (0, None));
    }

    #[test]
    fn memory_is_bounded_and_evictions_counted() {
        let mut t = Affinity::new(&AffinitySettings {
            capacity: 4,
            ..settings(32)
        });
        for i in 0..64u8 {
            t.renew(&IpAddr::from([192, 0, 2, i]), 0, 10);
        }
        assert!(t.live_count(10) <= 4);
        assert!(t.take_evictions() >= 60);
        assert_eq!(t.take_evictions(), 0);
    }
}
