//! Client affinity (IPVS persistence, HAProxy `balance source`): while a client's affinity
//! entry lives, its new connections go to the node that took its last one.
//!
//! Multi-connection protocols need it: iperf3's data connections must reach the node that
//! holds its control connection, FTP's data connection the node with the session, and so on.
//! An entry is keyed by the client's address under a netmask (`[scheduler]
//! affinity_prefix_v4` / `_v6`: a /24 keeps a whole NATed site on one node), names the node
//! that took the client's last connection, and lives for the timeout after that connection's
//! SYN. Every new connection of the client renews it. An entry naming a node that is not
//! eligible (dead, draining, unhealthy, weight 0: `Candidate::eligible`) is ignored, and the policy's
//! choice replaces it.
//!
//! The table is a [`SynRecords`] table keyed by (masked address, port 0) with no ISN: the
//! same fixed-size, set-associative array, allocated once, never allocating per SYN, its
//! memory bounded whatever the number of clients; a live entry pushed out of a full set is
//! counted. The master's table is replicated like the SYN-forward records: every node builds
//! its replica from the same committed record batches (`crate::cluster::takeover::Replica`),
//! so a new master adopts it and a client keeps its node across a takeover.
//!
//! `tdscctl affinity set` changes the settings at run time ([`AffinityChange`]): under Raft
//! the leader commits them as the setting [`AFFINITY_SETTING`] in the text form of
//! [`AffinitySettings::encode`], and every node applies them to its replica and, as master,
//! to its table; a table keeps its live entries across a change (re-keyed under a new
//! prefix). The capacity stays each node's own (`affinity_capacity`): it sizes an allocation.

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

/// The Raft setting that holds the cluster's affinity settings (`tdscctl affinity set`).
pub const AFFINITY_SETTING: &str = "affinity";

impl AffinitySettings {
    /// The text form of the settings (`None`: affinity off), as committed through Raft:
    /// `none` or `client-address timeout_ms=T prefix_v4=A prefix_v6=B`.
    pub fn encode(settings: Option<&AffinitySettings>) -> String {
        match settings {
            None => "none".to_owned(),
            Some(s) => format!(
                "client-address timeout_ms={} prefix_v4={} prefix_v6={}",
                s.timeout.as_millis(),
                s.prefix_v4,
                s.prefix_v6
            ),
        }
    }

    /// Reads [`AffinitySettings::encode`]'s form; the table gets `capacity` entries.
    pub fn decode(text: &str, capacity: usize) -> Result<Option<AffinitySettings>, String> {
        let mut words = text.split(' ');
        match words.next() {
            Some("none") if words.next().is_none() => return Ok(None),
            Some("client-address") => {}
            _ => return Err(format!("{text:?} is not an affinity setting")),
        }
        let mut change = AffinityChange {
            on: true,
            ..AffinityChange::default()
        };
        for w in words {
            let (key, value) = w
                .split_once('=')
                .ok_or_else(|| format!("{w:?} in {text:?} is not key=value"))?;
            let bad = |_| format!("{key}={value:?} in {text:?} is not a number");
            match key {
                "timeout_ms" if change.timeout_ms.is_none() => {
                    change.timeout_ms = Some(value.parse().map_err(bad)?);
                }
                "prefix_v4" if change.prefix_v4.is_none() => {
                    change.prefix_v4 = Some(value.parse().map_err(bad)?);
                }
                "prefix_v6" if change.prefix_v6.is_none() => {
                    change.prefix_v6 = Some(value.parse().map_err(bad)?);
                }
                _ => return Err(format!("{key:?} in {text:?} is unknown or repeated")),
            }
        }
        if change.timeout_ms.is_none() || change.prefix_v4.is_none() || change.prefix_v6.is_none() {
            return Err(format!("{text:?} lacks a key"));
        }
        change.resolve(None, capacity)
    }
}

/// A requested change of the affinity settings (`tdscctl affinity set`): what is not given
/// keeps its current value, or its default when affinity was off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AffinityChange {
    /// `client-address` (true) or `none`.
    pub on: bool,
    pub timeout_ms: Option<u64>,
    pub prefix_v4: Option<u8>,
    pub prefix_v6: Option<u8>,
}

impl AffinityChange {
    /// Parses the mode name.
    pub fn mode(name: &str) -> Result<bool, String> {
        match name {
            "none" => Ok(false),
            "client-address" => Ok(true),
            other => Err(format!(
                "unknown affinity {other:?}; expected \"none\" or \"client-address\""
            )),
        }
    }

    /// The checks that need no current settings (the same as `[scheduler]`'s).
    pub fn validate(&self) -> Result<(), String> {
        use crate::config::MAX_AFFINITY_TIMEOUT_MS;
        if !self.on {
            if self.timeout_ms.is_some() || self.prefix_v4.is_some() || self.prefix_v6.is_some() {
                return Err("timeout and prefixes apply to \"client-address\" only".into());
            }
            return Ok(());
        }
        if let Some(t) = self
            .timeout_ms
            .filter(|t| !(1..=MAX_AFFINITY_TIMEOUT_MS).contains(t))
        {
            return Err(format!(
                "affinity timeout_ms {t} is outside 1..={MAX_AFFINITY_TIMEOUT_MS}"
            ));
        }
        if let Some(p) = self.prefix_v4.filter(|p| !(1..=32).contains(p)) {
            return Err(format!("affinity prefix_v4 {p} is outside 1..=32"));
        }
        if let Some(p) = self.prefix_v6.filter(|p| !(1..=128).contains(p)) {
            return Err(format!("affinity prefix_v6 {p} is outside 1..=128"));
        }
        Ok(())
    }

    /// The settings after the change, from the `current` ones (a table of `capacity`).
    pub fn resolve(
        &self,
        current: Option<&AffinitySettings>,
        capacity: usize,
    ) -> Result<Option<AffinitySettings>, String> {
        self.validate()?;
        if !self.on {
            return Ok(None);
        }
        let timeout_ms = self.timeout_ms.unwrap_or_else(|| {
            current.map_or(crate::config::DEFAULT_AFFINITY_TIMEOUT_MS, |c| {
                u64::try_from(c.timeout.as_millis()).unwrap_or(u64::MAX)
            })
        });
        Ok(Some(AffinitySettings {
            timeout: Duration::from_millis(timeout_ms),
            prefix_v4: self
                .prefix_v4
                .unwrap_or(current.map_or(32, |c| c.prefix_v4)),
            prefix_v6: self
                .prefix_v6
                .unwrap_or(current.map_or(128, |c| c.prefix_v6)),
            capacity,
        }))
    }
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
    settings: AffinitySettings,
}

impl Affinity {
    pub fn new(settings: &AffinitySettings) -> Self {
        let timeout_ms = u64::try_from(settings.timeout.as_millis()).unwrap_or(u64::MAX);
        Affinity {
            table: SynRecords::new(settings.capacity, timeout_ms),
            settings: *settings,
        }
    }

    /// The settings the table was made with.
    pub fn settings(&self) -> &AffinitySettings {
        &self.settings
    }

    /// A table with `settings` (or none) that keeps the live entries of `old` (re-keyed
    /// under the new prefixes, their stamps kept, so the new timeout counts from each
    /// client's last connection). Allocates: for a settings change, not per SYN.
    pub fn replace(
        old: Option<Affinity>,
        settings: Option<&AffinitySettings>,
        now_ms: u64,
    ) -> Option<Affinity> {
        let mut new = Affinity::new(settings?);
        if let Some(old) = old {
            for e in old.live_entries(now_ms) {
                new.adopt(&e);
            }
        }
        Some(new)
    }

    fn key(&self, client: &IpAddr) -> IpAddr {
        mask(client, self.settings.prefix_v4, self.settings.prefix_v6)
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
    fn settings_round_trip_through_their_text_and_bad_text_is_refused() {
        let s = settings(24);
        let text = AffinitySettings::encode(Some(&s));
        assert_eq!(
            text,
            "client-address timeout_ms=1000 prefix_v4=24 prefix_v6=64"
        );
        assert_eq!(AffinitySettings::decode(&text, 1024), Ok(Some(s)));
        assert_eq!(AffinitySettings::decode("none", 1024), Ok(None));
        for bad in [
            "",
            "none x",
            "sticky",
            "client-address",
            "client-address timeout_ms=1000 prefix_v4=24",
            "client-address timeout_ms=1000 prefix_v4=24 prefix_v6=64 prefix_v6=64",
            "client-address timeout_ms=0 prefix_v4=24 prefix_v6=64",
            "client-address timeout_ms=1000 prefix_v4=33 prefix_v6=64",
            "client-address timeout_ms=x prefix_v4=24 prefix_v6=64",
            "client-address timeout_ms=1000 prefix_v4=24 prefix_v6=64 capacity=9",
        ] {
            assert!(AffinitySettings::decode(bad, 1024).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_change_keeps_what_it_does_not_name() {
        let on = |timeout_ms, prefix_v4| AffinityChange {
            on: true,
            timeout_ms,
            prefix_v4,
            prefix_v6: None,
        };
        let cur = settings(24);
        let r = on(None, Some(16))
            .resolve(Some(&cur), 2048)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.timeout, r.prefix_v4, r.prefix_v6, r.capacity),
            (cur.timeout, 16, 64, 2048)
        );
        let r = on(Some(5), None).resolve(None, 2048).unwrap().unwrap();
        assert_eq!(
            (r.timeout, r.prefix_v4, r.prefix_v6),
            (Duration::from_millis(5), 32, 128)
        );
        let r = on(None, None).resolve(None, 2048).unwrap().unwrap();
        assert_eq!(
            r.timeout.as_millis(),
            300_000,
            "the default when it was off"
        );
        assert_eq!(
            AffinityChange::default().resolve(Some(&cur), 2048),
            Ok(None)
        );
        for bad in [
            AffinityChange {
                timeout_ms: Some(5),
                ..AffinityChange::default()
            },
            on(Some(0), None),
            on(Some(86_400_001), None),
            on(None, Some(0)),
            AffinityChange {
                prefix_v6: Some(129),
                ..on(None, None)
            },
        ] {
            assert!(bad.resolve(Some(&cur), 2048).is_err(), "{bad:?}");
        }
        assert!(AffinityChange::mode("sticky").is_err());
    }

    #[test]
    fn a_replaced_table_keeps_its_live_entries_under_the_new_settings() {
        let mut old = Affinity::new(&settings(32));
        old.renew(&a("192.0.2.101"), 2, 100);
        old.renew(&a("198.51.100.9"), 1, 0);
        let longer = AffinitySettings {
            timeout: Duration::from_millis(5000),
            ..settings(24)
        };
        let t = Affinity::replace(Some(old), Some(&longer), 1050).unwrap();
        assert_eq!(
            t.lookup(&a("192.0.2.7"), 5099),
            Some(2),
            "re-keyed to its /24, new timeout"
        );
        assert_eq!(t.lookup(&a("192.0.2.7"), 5100), None);
        assert_eq!(t.lookup(&a("198.51.100.9"), 1050), None, "it had timed out");
        assert_eq!(t.settings(), &longer);
        assert!(Affinity::replace(Some(t), None, 1100).is_none());
        assert!(
            Affinity::replace(None, Some(&longer), 0)
                .unwrap()
                .live_count(0)
                == 0
        );
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
