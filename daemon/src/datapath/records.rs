//! SYN-forward records (paper §3.5): where each recent SYN went.
//!
//! If a server's SYN/ACK is lost, the client retransmits its SYN. A policy such as round
//! robin would send the copy to another node, which would answer with a different ISN while
//! the first node still holds the connection in SYN-RECV; two nodes could then both reach
//! ESTABLISHED. So the master remembers, for a bounded window, which node took each
//! (client address, client port, ISN), and sends a retransmitted SYN back there.
//!
//! The table is a fixed-size, 4-way set-associative array allocated once: lookups and inserts
//! never allocate, and memory stays bounded under a SYN flood. When a set is full the oldest
//! entry gives way; such evictions of still-live records are counted.
//!
//! The same table, filled from committed Raft entries, is every node's *replica* of the
//! master's records (see `crate::cluster::takeover`): a new master adopts it, plus one record with
//! no known ISN ([`SynRecords::insert_any_isn`]) for each SYN-RECV socket a node holds.
//! The master thread hands each new record to the Raft task as a [`Dispatched`] value
//! through a bounded, preallocated channel.

use std::net::IpAddr;

const WAYS: usize = 4;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// 0 marks an empty slot; real hashes are forced non-zero.
    tag: u64,
    client: u128,
    port: u16,
    node: u16,
    isn: u32,
    /// Milliseconds on the caller's monotonic clock.
    stamp_ms: u64,
    /// The client address is IPv6 (`client` holds the 128 bits), else IPv4 (low 32 bits).
    v6: bool,
    /// Learnt from a SYN-RECV socket: the ISN is unknown, any ISN matches.
    any_isn: bool,
}

/// One new dispatch decision, as the master thread hands it to the Raft task: fixed size,
/// `Copy`, so pushing it into a preallocated channel never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    pub client: IpAddr,
    pub port: u16,
    pub isn: u32,
    /// The chosen node's id (not its view index: ids mean the same on every node).
    pub node_id: u32,
}

/// A live record taken out of a table, to be put into another (takeover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordEntry {
    pub client: IpAddr,
    pub port: u16,
    /// `None`: learnt from a SYN-RECV socket, matches any ISN.
    pub isn: Option<u32>,
    /// View index of the node that holds the connection.
    pub node: u16,
    pub stamp_ms: u64,
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No live record of this client address and port.
    Miss,
    /// The same SYN (same ISN) was sent to this node index within the window.
    Retransmit { node: u16 },
    /// A live record exists, but with another ISN: a new connection reusing the 4-tuple.
    NewIsn,
}

#[derive(Debug)]
pub struct SynRecords {
    slots: Box<[Slot]>,
    sets_mask: usize,
    window_ms: u64,
    /// Live records pushed out by newer ones because their set was full.
    pub evicted_live: u64,
}

fn key_of(addr: &IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

impl SynRecords {
    /// `capacity` is rounded up to a power of two of at least one set.
    pub fn new(capacity: usize, window_ms: u64) -> Self {
        let sets = (capacity / WAYS).max(1).next_power_of_two();
        SynRecords {
            slots: vec![Slot::default(); sets * WAYS].into_boxed_slice(),
            sets_mask: sets - 1,
            window_ms,
            evicted_live: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn set(&self, client: u128, port: u16) -> (u64, usize) {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "folding 128 bits into 64 on purpose"
        )]
        let h = crate::datapath::policy::mix64(
            (client as u64) ^ ((client >> 64) as u64) ^ (u64::from(port) << 32),
        );
        let tag = h | 1;
        // The mask keeps the index within the table; truncation on 32-bit targets is harmless.
        #[allow(
            clippy::cast_possible_truncation,
            reason = "masked to the set count right after"
        )]
        let set = (h >> 16) as usize & self.sets_mask;
        (tag, set * WAYS)
    }

    fn live(&self, s: &Slot, now_ms: u64) -> bool {
        s.tag != 0 && now_ms.saturating_sub(s.stamp_ms) < self.window_ms
    }

    pub fn lookup(&self, client: &IpAddr, port: u16, isn: u32, now_ms: u64) -> Lookup {
        let c = key_of(client);
        let (tag, base) = self.set(c, port);
        for s in &self.slots[base..base + WAYS] {
            if s.tag == tag && s.client == c && s.port == port && self.live(s, now_ms) {
                return if s.any_isn || s.isn == isn {
                    Lookup::Retransmit { node: s.node }
                } else {
                    Lookup::NewIsn
                };
            }
        }
        Lookup::Miss
    }

    /// Records that this SYN went to `node`, replacing any record of the same client address
    /// and port.
    pub fn insert(&mut self, client: &IpAddr, port: u16, isn: u32, node: u16, now_ms: u64) {
        self.put(client, port, Some(isn), node, now_ms);
    }

    /// Records that `node` holds a handshake from this client address and port whose ISN is
    /// not known (a SYN-RECV socket): a SYN from there with any ISN goes to `node` within
    /// the window. A new connection reusing the port within the window goes there too, which
    /// is harmless: that node answers it like any other.
    pub fn insert_any_isn(&mut self, client: &IpAddr, port: u16, node: u16, now_ms: u64) {
        self.put(client, port, None, node, now_ms);
    }

    /// Puts a record taken from another table, keeping its stamp.
    pub fn adopt(&mut self, e: &RecordEntry) {
        self.put(&e.client, e.port, e.isn, e.node, e.stamp_ms);
    }

    /// Live records, oldest first is not guaranteed. Allocates: for takeover, not per SYN.
    pub fn live_entries(&self, now_ms: u64) -> Vec<RecordEntry> {
        self.slots
            .iter()
            .filter(|s| self.live(s, now_ms))
            .map(|s| RecordEntry {
                client: if s.v6 {
                    IpAddr::from(s.client.to_be_bytes())
                } else {
                    // IPv4 keys hold the address in the low 32 bits.
                    #[allow(
                        clippy::cast_possible_truncation,
                        reason = "IPv4 keys hold the address in the low 32 bits"
                    )]
                    IpAddr::from((s.client as u32).to_be_bytes())
                },
                port: s.port,
                isn: (!s.any_isn).then_some(s.isn),
                node: s.node,
                stamp_ms: s.stamp_ms,
            })
            .collect()
    }

    fn put(&mut self, client: &IpAddr, port: u16, isn: Option<u32>, node: u16, now_ms: u64) {
        let c = key_of(client);
        let (tag, base) = self.set(c, port);
        let mut victim = base;
        let mut victim_stamp = u64::MAX;
        for i in base..base + WAYS {
            let s = &self.slots[i];
            if s.tag == tag && s.client == c && s.port == port {
                victim = i;
                victim_stamp = 0;
                break;
            }
            if !self.live(s, now_ms) {
                if victim_stamp != 0 {
                    victim = i;
                    victim_stamp = 0;
                }
            } else if s.stamp_ms < victim_stamp {
                victim = i;
                victim_stamp = s.stamp_ms;
            }
        }
        if victim_stamp != 0 && victim_stamp != u64::MAX {
            self.evicted_live += 1;
        }
        self.slots[victim] = Slot {
            tag,
            client: c,
            port,
            node,
            isn: isn.unwrap_or(0),
            stamp_ms: now_ms,
            v6: client.is_ipv6(),
            any_isn: isn.is_none(),
        };
    }

    /// Live records, for status and for replication to a future master.
    pub fn live_count(&self, now_ms: u64) -> usize {
        self.slots.iter().filter(|s| self.live(s, now_ms)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn retransmit_new_isn_and_expiry() {
        let mut r = SynRecords::new(1024, 1000);
        assert_eq!(r.lookup(&a(101), 40000, 7, 0), Lookup::Miss);
        r.insert(&a(101), 40000, 7, 2, 0);
        assert_eq!(
            r.lookup(&a(101), 40000, 7, 999),
            Lookup::Retransmit { node: 2 }
        );
        assert_eq!(r.lookup(&a(101), 40000, 8, 10), Lookup::NewIsn);
        assert_eq!(r.lookup(&a(101), 40001, 7, 10), Lookup::Miss);
        assert_eq!(r.lookup(&a(102), 40000, 7, 10), Lookup::Miss);
        assert_eq!(
            r.lookup(&a(101), 40000, 7, 1000),
            Lookup::Miss,
            "window over"
        );
        r.insert(&a(101), 40000, 9, 1, 2000);
        assert_eq!(
            r.lookup(&a(101), 40000, 9, 2001),
            Lookup::Retransmit { node: 1 }
        );
        assert_eq!(r.live_count(2001), 1, "same key replaced, not duplicated");
    }

    /// A flood of distinct SYNs keeps memory fixed and the newest records findable.
    #[test]
    fn flood_is_bounded_and_recent_records_survive() {
        let mut r = SynRecords::new(1024, 60_000);
        let cap = r.capacity();
        for i in 0..100_000u32 {
            let port = u16::try_from(i % 60000).unwrap();
            let addr = IpAddr::from((0xc000_0200u32 + (i / 60000)).to_be_bytes());
            r.insert(&addr, port, i, 1, u64::from(i));
        }
        assert_eq!(r.capacity(), cap);
        assert!(r.live_count(100_000) <= cap);
        assert!(r.evicted_live > 0);
        // The last few inserts are all still there.
        for i in 99_990..100_000u32 {
            let port = u16::try_from(i % 60000).unwrap();
            let addr = IpAddr::from((0xc000_0200u32 + (i / 60000)).to_be_bytes());
            assert_eq!(
                r.lookup(&addr, port, i, 100_000),
                Lookup::Retransmit { node: 1 }
            );
        }
    }

    #[test]
    fn any_isn_records_match_every_isn_and_entries_round_trip() {
        let mut r = SynRecords::new(1024, 1000);
        r.insert_any_isn(&a(101), 40000, 2, 10);
        assert_eq!(
            r.lookup(&a(101), 40000, 12345, 20),
            Lookup::Retransmit { node: 2 }
        );
        assert_eq!(r.lookup(&a(101), 40001, 12345, 20), Lookup::Miss);
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        r.insert(&v6, 1, 9, 1, 30);
        let mut got = r.live_entries(40);
        got.sort_by_key(|e| e.stamp_ms);
        assert_eq!(
            got,
            vec![
                RecordEntry {
                    client: a(101),
                    port: 40000,
                    isn: None,
                    node: 2,
                    stamp_ms: 10
                },
                RecordEntry {
                    client: v6,
                    port: 1,
                    isn: Some(9),
                    node: 1,
                    stamp_ms: 30
                },
            ]
        );
        let mut other = SynRecords::new(1024, 1000);
        for e in &got {
            other.adopt(e);
        }
        assert_eq!(
            other.lookup(&v6, 1, 9, 1029),
            Lookup::Retransmit { node: 1 }
        );
        assert_eq!(other.lookup(&v6, 1, 9, 1030), Lookup::Miss, "stamp kept");
        assert_eq!(r.live_entries(1010).len(), 1, "the first expired");
    }

    #[test]
    fn ipv6_clients_are_distinct() {
        let mut r = SynRecords::new(1024, 1000);
        let x: IpAddr = "2001:db8::1:65".parse().unwrap();
        let y: IpAddr = "2001:db8::2:65".parse().unwrap();
        r.insert(&x, 1, 1, 0, 0);
        assert_eq!(r.lookup(&y, 1, 1, 0), Lookup::Miss);
        assert_eq!(r.lookup(&x, 1, 1, 0), Lookup::Retransmit { node: 0 });
    }
}
