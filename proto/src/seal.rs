//! Cluster authentication, sans-IO: the keyring, the sealing of every UDP cluster message, the
//! tag on every proto-253 forward, and the replay window a receiver keeps per sender.
//!
//! # Why keyed per-packet authentication
//!
//! raft-rs is a crash-fault protocol: it trusts every message it is handed. An IP source
//! address and a claimed node id are not authentication — both are in every config and
//! every datagram — so a host on the cluster segment (or a local process on a node) could
//! otherwise propose members, forge snapshots or keep the cluster electing. Every node holds
//! the same secret keyring (Corosync's `authkey`, memberlist's keyring); every datagram is
//! sealed with it and opened *before any decoding*, so a forged or replayed message never
//! reaches a decoder, let alone Raft.
//!
//! # The sealed datagram
//!
//! ```text
//! 0        1        2                  6                                  14
//! +--------+--------+------------------+----------------------------------+-------------+-----+
//! | ver=1  | key id | sender id (u32)  | counter (u64, per sender)        | ciphertext  | tag |
//! +--------+--------+------------------+----------------------------------+-------------+-----+
//! ```
//!
//! The AEAD is AES-256-GCM (ring). The 14-byte header is the additional data, so the sender
//! id, the key id and the counter are all bound to the message; the 96-bit nonce is
//! `sender id ‖ counter`. A nonce must never repeat under one key: every node id is unique
//! (the config and the membership checks refuse duplicates), and a sender's counter starts
//! at the wall clock in nanoseconds ([`SendCounter::starting_at`]) and only grows, so it
//! also grows across a restart as long as the clock does not step back by more than the
//! previous run's uptime.
//!
//! Message keys and forward keys are derived from each keyring key with HKDF-SHA256 under
//! distinct labels, so the two nonce spaces (datagrams and forwards of one sender) never
//! meet under one AES key.
//!
//! # Why ring
//!
//! ring is small, audited in wide use (rustls), builds from crates.io with only a C
//! compiler (no cmake or Go, unlike aws-lc-rs), and uses AES-NI and CLMUL where the CPU has
//! them: sealing a forward tag costs far below the 0.3 µs budget of the SYN path (see the
//! `seal_bench` example; its latest output is in `docs/benchmarks.md`).
//!
//! # Rotation
//!
//! A keyring holds up to [`MAX_KEYS`] keys, each with an id; a node opens with any of them
//! and seals with the one named `send`. A key is rotated without downtime: add the new key
//! to every node's keyring, then switch every node's `send` to it, then remove the old one.
//!
//! ```
//! use tdsc_proto::seal::{Keyring, ReplayWindow};
//! let ring = Keyring::parse(&Keyring::generate_text(1).unwrap()).unwrap();
//! let mut wire = Vec::new();
//! ring.seal(7, 1_000, b"hello", &mut wire);
//! let mut window = ReplayWindow::default();
//! let opened = ring.open(&mut wire).unwrap();
//! assert_eq!((opened.sender, opened.payload), (7, &b"hello"[..]));
//! window.check_and_set(opened.counter).unwrap();
//! assert!(window.check_and_set(1_000).is_err()); // the same datagram again is a replay
//! ```

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;

/// Length of one keyring key, bytes.
pub const KEY_LEN: usize = 32;
/// Length of the AEAD tag, bytes.
pub const TAG_LEN: usize = 16;
/// At most this many keys in a keyring: the old, the current and the next.
pub const MAX_KEYS: usize = 3;
/// The sealed-datagram format version.
pub const SEAL_VERSION: u8 = 1;
/// Bytes before the ciphertext: version, key id, sender id, counter.
pub const HEADER_LEN: usize = 14;
/// What sealing adds to a payload.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// HKDF salt: names the protocol and its version, so keys derived here serve nothing else.
const HKDF_SALT: &[u8] = b"tcp-dsc seal v1";
/// HKDF label of the datagram key.
const LABEL_MESSAGE: &[u8] = b"cluster datagram";
/// HKDF label of the forward-tag key.
const LABEL_FORWARD: &[u8] = b"proto-253 forward";
/// HKDF label of the TCP Fast Open server key ([`Keyring::tcp_fastopen_key`]): a third
/// output of the same extraction, so it reveals nothing of the cluster key or the AEAD keys.
const LABEL_TCP_FASTOPEN: &[u8] = b"tcp_fastopen_key";

/// Length of the kernel's TCP Fast Open key (`TCP_FASTOPEN_KEY_LENGTH`: 128-bit SipHash key).
pub const TCP_FASTOPEN_KEY_LEN: usize = 16;

struct FastOpenLen;

impl hkdf::KeyType for FastOpenLen {
    fn len(&self) -> usize {
        TCP_FASTOPEN_KEY_LEN
    }
}

fn derive_fastopen(key: &[u8; KEY_LEN]) -> [u8; TCP_FASTOPEN_KEY_LEN] {
    let labels = [LABEL_TCP_FASTOPEN];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(key);
    let mut out = [0u8; TCP_FASTOPEN_KEY_LEN];
    prk.expand(&labels, FastOpenLen)
        .and_then(|okm| okm.fill(&mut out))
        .expect("16 bytes is a valid HKDF-SHA256 output length");
    out
}

/// `key` as `net.ipv4.tcp_fastopen_key` reads and writes it: four groups of eight hex digits,
/// each the big-endian reading of four key bytes (the kernel parses each group with `%x` into a
/// u32 and prints it back the same way, so the text round-trips).
pub fn format_fastopen_key(key: &[u8; TCP_FASTOPEN_KEY_LEN]) -> String {
    key.chunks(4)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

/// Why a keyring file was refused. The line number is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A line that is neither `key ID HEX`, `send ID`, a comment nor blank.
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: &'static str },
    /// Two keys with one id.
    #[error("key id {id} appears twice")]
    DuplicateId { id: u8 },
    /// More than [`MAX_KEYS`] keys.
    #[error("more than {MAX_KEYS} keys")]
    TooMany,
    /// No key at all.
    #[error("no key")]
    Empty,
    /// `send` names a key that is not there, or several keys and no `send` line.
    #[error(
        "the send key {id:?} is not in the keyring (with several keys, name one with `send ID`)"
    )]
    NoSendKey { id: Option<u8> },
    /// The system's random source failed (key generation only).
    #[error("the system random source failed")]
    Random,
}

/// Why a sealed datagram or a forward tag was refused. Each reason is counted by the caller;
/// nothing about the payload is known yet, so nothing is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Shorter than the header and tag.
    Short,
    /// A format version this build does not speak.
    Version,
    /// Sealed with a key id this keyring does not hold (the wrong or a retired key).
    UnknownKey,
    /// The tag does not verify: forged, corrupted, or sealed with another key of this id.
    BadTag,
}

impl Reject {
    /// A stable name for counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Short => "short",
            Reject::Version => "version",
            Reject::UnknownKey => "unknown_key",
            Reject::BadTag => "bad_tag",
        }
    }
}

/// A datagram that passed [`Keyring::open`]: authentic, not yet checked for replay.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened<'a> {
    /// The key it was sealed with.
    pub key_id: u8,
    /// The sender id bound into it (the caller checks it against the source address).
    pub sender: u32,
    /// The sender's counter (the caller passes it to that sender's [`ReplayWindow`]).
    pub counter: u64,
    /// The plaintext, decrypted in place.
    pub payload: &'a [u8],
}

/// One key: its id, the two AES keys and the TCP Fast Open key derived from it.
struct Entry {
    id: u8,
    fastopen: [u8; TCP_FASTOPEN_KEY_LEN],
    message: LessSafeKey,
    forward: LessSafeKey,
}

/// The cluster's keys. Parsed from the key file; the same on every node (but for `send`
/// during a rotation).
pub struct Keyring {
    entries: Vec<Entry>,
    /// Index into `entries` of the key this node seals with.
    send: usize,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Keyring")
            .field("ids", &self.ids())
            .field("send", &self.send_id())
            .finish()
    }
}

fn derive(key: &[u8; KEY_LEN], label: &'static [u8]) -> LessSafeKey {
    let labels = [label];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(key);
    let okm = prk
        .expand(&labels, &AES_256_GCM)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    LessSafeKey::new(UnboundKey::from(okm))
}

fn nonce(sender: u32, counter: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[..4].copy_from_slice(&sender.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn parse_hex_key(s: &str) -> Option<[u8; KEY_LEN]> {
    if s.len() != 2 * KEY_LEN || !s.is_ascii() {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// The TCP Fast Open server keys a node installs (`net.ipv4.tcp_fastopen_key`): the kernel
/// issues cookies with the primary and accepts cookies of the primary or the backup.
/// Secret, as the cluster key; `Debug` shows only the key ids they come from.
#[derive(Clone, PartialEq, Eq)]
pub struct FastOpenKeys {
    /// The cluster key id the primary is derived from (the key this node seals with).
    pub primary_id: u8,
    primary: [u8; TCP_FASTOPEN_KEY_LEN],
    /// The cluster key id and derived key of the backup, when the keyring holds another key.
    backup: Option<(u8, [u8; TCP_FASTOPEN_KEY_LEN])>,
}

impl FastOpenKeys {
    /// The cluster key id the backup is derived from, if any.
    pub fn backup_id(&self) -> Option<u8> {
        self.backup.map(|(id, _)| id)
    }

    /// The primary key alone.
    pub fn primary(&self) -> [u8; TCP_FASTOPEN_KEY_LEN] {
        self.primary
    }

    /// The text `net.ipv4.tcp_fastopen_key` takes and shows: the primary, then a comma and the
    /// backup if there is one.
    pub fn sysctl_text(&self) -> String {
        let mut text = format_fastopen_key(&self.primary);
        if let Some((_, b)) = &self.backup {
            text.push(',');
            text.push_str(&format_fastopen_key(b));
        }
        text
    }
}

impl std::fmt::Debug for FastOpenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastOpenKeys")
            .field("primary_id", &self.primary_id)
            .field("backup_id", &self.backup_id())
            .finish()
    }
}

impl Keyring {
    /// The TCP Fast Open server key every node holding this keyring derives alike (from the
    /// key this node seals with). Secret, as the cluster key.
    pub fn tcp_fastopen_key(&self) -> [u8; TCP_FASTOPEN_KEY_LEN] {
        self.entries[self.send].fastopen
    }

    /// The TCP Fast Open keys to install: the primary from the key this node seals with, the
    /// backup from the keyring's other key with the highest id. During a rotation (both keys
    /// in every node's file, `send` switched node by node) a node that has switched and one
    /// that has not each accept the other's cookies: one's primary is the other's backup.
    pub fn tcp_fastopen_keys(&self) -> FastOpenKeys {
        let backup = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.send)
            .max_by_key(|(_, e)| e.id)
            .map(|(_, e)| (e.id, e.fastopen));
        FastOpenKeys {
            primary_id: self.send_id(),
            primary: self.tcp_fastopen_key(),
            backup,
        }
    }

    /// Builds a keyring from raw keys. `send` names the sealing key; with one key it may be
    /// `None`.
    pub fn new(keys: &[(u8, [u8; KEY_LEN])], send: Option<u8>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::TooMany);
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(keys.len());
        for (id, key) in keys {
            if entries.iter().any(|e| e.id == *id) {
                return Err(KeyError::DuplicateId { id: *id });
            }
            entries.push(Entry {
                id: *id,
                fastopen: derive_fastopen(key),
                message: derive(key, LABEL_MESSAGE),
                forward: derive(key, LABEL_FORWARD),
            });
        }
        let send = match send {
            Some(id) => entries
                .iter()
                .position(|e| e.id == id)
                .ok_or(KeyError::NoSendKey { id: Some(id) })?,
            None if entries.len() == 1 => 0,
            None => return Err(KeyError::NoSendKey { id: None }),
        };
        Ok(Self { entries, send })
    }

    /// Parses a key file:
    ///
    /// ```text
    /// # tcp-dsc cluster keyring (keep it secret: mode 0600)
    /// key 1 <64 hex digits>
    /// key 2 <64 hex digits>
    /// send 2
    /// ```
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        let mut send = None;
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let words: Vec<&str> = content.split_whitespace().collect();
            let syntax = |reason| KeyError::Syntax { line, reason };
            match words.as_slice() {
                ["key", id, hex] => {
                    let id: u8 = id.parse().map_err(|_| syntax("the key id is not 0-255"))?;
                    let key = parse_hex_key(hex).ok_or(syntax("a key is 64 hex digits"))?;
                    if keys.len() == MAX_KEYS {
                        return Err(KeyError::TooMany);
                    }
                    keys.push((id, key));
                }
                ["send", id] => {
                    if send.is_some() {
                        return Err(syntax("a second `send` line"));
                    }
                    send = Some(id.parse().map_err(|_| syntax("the key id is not 0-255"))?);
                }
                _ => return Err(syntax("expected `key ID HEX` or `send ID`")),
            }
        }
        Self::new(&keys, send)
    }

    /// A new key file holding one fresh random key with this id (`tdscctl keygen`).
    pub fn generate_text(id: u8) -> Result<String, KeyError> {
        use ring::rand::SecureRandom;
        let mut key = [0u8; KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| KeyError::Random)?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!(
            "# tcp-dsc cluster keyring: the same on every node; keep it secret (mode 0600).\n\
             # Rotation: add a new `key`, then change `send` everywhere, then remove the old key.\n\
             key {id} {hex}\nsend {id}\n"
        ))
    }

    /// The key ids held, in file order.
    pub fn ids(&self) -> Vec<u8> {
        self.entries.iter().map(|e| e.id).collect()
    }

    /// The id of the key this node seals with.
    pub fn send_id(&self) -> u8 {
        self.entries[self.send].id
    }

    fn entry(&self, id: u8) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Seals `payload` from `sender` with its next `counter` into `out` (cleared first):
    /// header, ciphertext, tag. Reuses `out`'s allocation.
    pub fn seal(&self, sender: u32, counter: u64, payload: &[u8], out: &mut Vec<u8>) {
        let entry = &self.entries[self.send];
        out.clear();
        out.reserve(OVERHEAD + payload.len());
        out.push(SEAL_VERSION);
        out.push(entry.id);
        out.extend_from_slice(&sender.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(payload);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        let tag = entry
            .message
            .seal_in_place_separate_tag(nonce(sender, counter), Aad::from(&*header), body)
            .expect("a datagram is far below AES-GCM's length limit");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens a sealed datagram in place. Checks only authenticity; the caller then checks the
    /// sender id against the source and the counter against that sender's [`ReplayWindow`].
    pub fn open<'a>(&self, buf: &'a mut [u8]) -> Result<Opened<'a>, Reject> {
        if buf.len() < OVERHEAD {
            return Err(Reject::Short);
        }
        if buf[0] != SEAL_VERSION {
            return Err(Reject::Version);
        }
        let key_id = buf[1];
        let entry = self.entry(key_id).ok_or(Reject::UnknownKey)?;
        let sender = u32::from_be_bytes(buf[2..6].try_into().expect("4 bytes"));
        let counter = u64::from_be_bytes(buf[6..14].try_into().expect("8 bytes"));
        let (header, body) = buf.split_at_mut(HEADER_LEN);
        let payload = entry
            .message
            .open_in_place(nonce(sender, counter), Aad::from(&*header), body)
            .map_err(|_| Reject::BadTag)?;
        Ok(Opened {
            key_id,
            sender,
            counter,
            payload,
        })
    }

    /// The tag of a proto-253 forward: a GMAC over `data` (the forward header and segment)
    /// under the forward key, with nonce `origin ‖ counter`. Returns the sending key's id and
    /// the tag.
    pub fn forward_tag(&self, origin: u32, counter: u64, data: &[u8]) -> (u8, [u8; TAG_LEN]) {
        let entry = &self.entries[self.send];
        let tag = entry
            .forward
            .seal_in_place_separate_tag(nonce(origin, counter), Aad::from(data), &mut [])
            .expect("a forward is far below AES-GCM's length limit");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        (entry.id, out)
    }

    /// Verifies a forward's tag (in constant time). The caller then checks `counter` against
    /// the origin's forward [`ReplayWindow`].
    pub fn verify_forward(
        &self,
        key_id: u8,
        origin: u32,
        counter: u64,
        data: &[u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Reject> {
        let entry = self.entry(key_id).ok_or(Reject::UnknownKey)?;
        let mut tag = *tag;
        entry
            .forward
            .open_in_place(nonce(origin, counter), Aad::from(data), &mut tag)
            .map(|_| ())
            .map_err(|_| Reject::BadTag)
    }
}

/// A sender's message counter: starts at the wall clock in nanoseconds, so that it keeps
/// growing across a restart, and only grows.
#[derive(Debug)]
pub struct SendCounter {
    next: u64,
}

impl SendCounter {
    /// A counter whose first value is `unix_nanos` (the caller reads the clock once at start).
    pub fn starting_at(unix_nanos: u64) -> Self {
        Self { next: unix_nanos }
    }

    /// The next counter value, or `None` once the counter space is spent (after 584 years
    /// of nanoseconds): a nonce is never used twice, so the sender must then stop.
    #[allow(
        clippy::should_implement_trait,
        reason = "not an iterator: it is never consumed, and is polled once per message"
    )]
    pub fn next(&mut self) -> Option<u64> {
        let c = self.next;
        self.next = self.next.checked_add(1)?;
        Some(c)
    }
}

/// 64-bit words in the replay bitmap.
const WINDOW_WORDS: usize = 32;
/// How far behind the newest counter an older one is still accepted once (RFC 6479's layout,
/// as WireGuard uses it: one word of the bitmap is always the one being cleared).
pub const REPLAY_WINDOW: u64 = 64 * (WINDOW_WORDS as u64 - 1);

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// This counter was accepted before.
    Duplicate,
    /// More than [`REPLAY_WINDOW`] behind the newest accepted counter.
    TooOld,
}

/// A sliding replay window over one sender's counters (RFC 6479). Reordering within the
/// window is accepted once; duplicates and counters older than the window are refused. Feed
/// it only authenticated counters, or a forger could slide it.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// The newest accepted counter.
    newest: u64,
    /// Bit `c % 64` of word `(c / 64) % WINDOW_WORDS` is set when counter `c` was accepted.
    bitmap: [u64; WINDOW_WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            newest: 0,
            bitmap: [0; WINDOW_WORDS],
        }
    }
}

impl ReplayWindow {
    /// Accepts `counter` once; refuses duplicates and counters older than the window.
    pub fn check_and_set(&mut self, counter: u64) -> Result<(), Replay> {
        if counter <= self.newest && self.newest - counter >= REPLAY_WINDOW {
            return Err(Replay::TooOld);
        }
        let index = counter / 64;
        if counter > self.newest {
            // Clear the words between the old newest and the new one (all, after a long jump).
            let current = self.newest / 64;
            let steps = (index - current).min(WINDOW_WORDS as u64);
            for step in 1..=steps {
                self.bitmap[word(current + step)] = 0;
            }
            self.newest = counter;
        }
        let (w, bit) = (word(index), 1u64 << (counter % 64));
        if self.bitmap[w] & bit != 0 {
            return Err(Replay::Duplicate);
        }
        self.bitmap[w] |= bit;
        Ok(())
    }

    /// The newest counter accepted so far.
    pub fn newest(&self) -> u64 {
        self.newest
    }
}

fn word(index: u64) -> usize {
    // The modulus is below WINDOW_WORDS, which fits in usize.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "reduced modulo WINDOW_WORDS first"
    )]
    let w = (index % WINDOW_WORDS as u64) as usize;
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: [u8; KEY_LEN] = [1; KEY_LEN];
    const K2: [u8; KEY_LEN] = [2; KEY_LEN];

    fn ring(keys: &[(u8, [u8; KEY_LEN])], send: Option<u8>) -> Keyring {
        Keyring::new(keys, send).unwrap()
    }

    #[test]
    fn the_fastopen_key_is_the_same_for_one_key_differs_for_another_and_is_not_the_key() {
        let a = ring(&[(1, K1)], None).tcp_fastopen_key();
        assert_eq!(a, ring(&[(1, K1), (2, K2)], Some(1)).tcp_fastopen_key());
        assert_ne!(a, ring(&[(1, K1), (2, K2)], Some(2)).tcp_fastopen_key());
        assert_ne!(a[..], K1[..TCP_FASTOPEN_KEY_LEN]);
        // HKDF-SHA256(salt "tcp-dsc seal v1", ikm K1, info "tcp_fastopen_key"), first 16
        // bytes, computed independently (Python's hmac): pinned, so a change of derivation
        // (which would break cookies across a rolling upgrade) is seen.
        assert_eq!(
            format_fastopen_key(&a),
            "adbc6319-c5376d03-0893bf1b-f7d234ae"
        );
        let text = format_fastopen_key(&[
            0x01, 0x02, 0x03, 0x04, 0xa0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
        ]);
        assert_eq!(text, "01020304-a0000000-00000000-ffffffff");
    }

    #[test]
    fn fastopen_keys_pair_the_send_key_with_the_other_key_so_a_rotation_keeps_cookies_valid() {
        let one = ring(&[(1, K1)], None).tcp_fastopen_keys();
        assert_eq!((one.primary_id, one.backup_id()), (1, None));
        assert_eq!(one.sysctl_text(), "adbc6319-c5376d03-0893bf1b-f7d234ae");
        let old = ring(&[(1, K1), (2, K2)], Some(1)).tcp_fastopen_keys();
        let new = ring(&[(1, K1), (2, K2)], Some(2)).tcp_fastopen_keys();
        assert_eq!((old.primary_id, old.backup_id()), (1, Some(2)));
        assert_eq!((new.primary_id, new.backup_id()), (2, Some(1)));
        // Each accepts what the other issues.
        let (o, n) = (old.sysctl_text(), new.sysctl_text());
        let (o1, o2) = o.split_once(',').unwrap();
        let (n1, n2) = n.split_once(',').unwrap();
        assert_eq!((o1, o2), (n2, n1));
        assert_eq!(o1, "adbc6319-c5376d03-0893bf1b-f7d234ae");
        // Of several other keys, the highest id is the backup.
        let three = ring(&[(3, [3; KEY_LEN]), (1, K1), (2, K2)], Some(1)).tcp_fastopen_keys();
        assert_eq!(three.backup_id(), Some(3));
        assert!(!format!("{three:?}").contains("adbc"), "Debug shows no key");
    }

    #[test]
    fn seal_open_round_trip_binds_sender_counter_and_key() {
        let r = ring(&[(1, K1)], None);
        let mut wire = Vec::new();
        r.seal(3, 42, b"report", &mut wire);
        assert_eq!(wire.len(), b"report".len() + OVERHEAD);
        assert_ne!(
            &wire[HEADER_LEN..HEADER_LEN + 6],
            b"report",
            "payload is encrypted"
        );
        let opened = r
            .open(&mut wire.clone())
            .map(|o| (o.key_id, o.sender, o.counter, o.payload.to_vec()));
        assert_eq!(opened, Ok((1, 3, 42, b"report".to_vec())));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let r = ring(&[(1, K1)], None);
        let mut wire = Vec::new();
        r.seal(3, 42, b"a report of some length", &mut wire);
        for i in 0..wire.len() {
            for bit in 0..8 {
                let mut w = wire.clone();
                w[i] ^= 1 << bit;
                let got = r.open(&mut w).map(|_| ());
                let want = match i {
                    0 => Reject::Version,
                    1 => Reject::UnknownKey,
                    _ => Reject::BadTag,
                };
                assert_eq!(got, Err(want), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn short_and_empty_datagrams_are_refused() {
        let r = ring(&[(1, K1)], None);
        for n in 0..OVERHEAD {
            assert_eq!(
                r.open(&mut vec![SEAL_VERSION; n]),
                Err(Reject::Short),
                "{n} bytes"
            );
        }
        // An empty payload seals and opens.
        let mut wire = Vec::new();
        r.seal(1, 0, b"", &mut wire);
        assert_eq!(r.open(&mut wire).unwrap().payload, b"");
    }

    #[test]
    fn a_different_key_with_the_same_id_is_a_bad_tag() {
        let a = ring(&[(1, K1)], None);
        let b = ring(&[(1, K2)], None);
        let mut wire = Vec::new();
        a.seal(1, 5, b"x", &mut wire);
        assert_eq!(b.open(&mut wire).map(|_| ()), Err(Reject::BadTag));
    }

    #[test]
    fn rotation_add_switch_retire_keeps_every_pair_talking() {
        // Step 0: everyone on key 1.
        let old = ring(&[(1, K1)], None);
        // Step 1: key 2 added everywhere, still sending with 1.
        let added = ring(&[(1, K1), (2, K2)], Some(1));
        // Step 2: nodes switch one by one to sending with 2.
        let switched = ring(&[(1, K1), (2, K2)], Some(2));
        // Step 3: key 1 retired.
        let retired = ring(&[(2, K2)], None);
        let talks = |from: &Keyring, to: &Keyring| {
            let mut wire = Vec::new();
            from.seal(1, 9, b"hb", &mut wire);
            to.open(&mut wire).is_ok()
        };
        // During each step, nodes one step apart understand each other both ways.
        for (a, b) in [(&old, &added), (&added, &switched), (&switched, &retired)] {
            assert!(talks(a, b) && talks(b, a));
        }
        // Skipping a step breaks: a node on the old key alone cannot open key-2 traffic.
        assert!(!talks(&switched, &old));
        let mut wire = Vec::new();
        switched.seal(1, 9, b"hb", &mut wire);
        assert_eq!(old.open(&mut wire).map(|_| ()), Err(Reject::UnknownKey));
    }

    #[test]
    fn forward_tags_verify_and_bind_origin_counter_and_data() {
        let r = ring(&[(4, K1)], None);
        let data = b"forward header and segment";
        let (id, tag) = r.forward_tag(2, 77, data);
        assert_eq!(id, 4);
        assert_eq!(r.verify_forward(id, 2, 77, data, &tag), Ok(()));
        assert_eq!(r.verify_forward(id, 3, 77, data, &tag), Err(Reject::BadTag));
        assert_eq!(r.verify_forward(id, 2, 78, data, &tag), Err(Reject::BadTag));
        assert_eq!(
            r.verify_forward(id, 2, 77, b"forward header and segmenT", &tag),
            Err(Reject::BadTag)
        );
        assert_eq!(
            r.verify_forward(5, 2, 77, data, &tag),
            Err(Reject::UnknownKey)
        );
        // The datagram key and the forward key differ: a forward tag is no datagram tag.
        let mut wire = Vec::new();
        r.seal(2, 77, b"", &mut wire);
        assert_ne!(&wire[HEADER_LEN..], &tag[..]);
    }

    #[test]
    fn key_files_parse_and_bad_ones_name_the_line() {
        let text = Keyring::generate_text(7).unwrap();
        let r = Keyring::parse(&text).unwrap();
        assert_eq!((r.ids(), r.send_id()), (vec![7], 7));
        assert!(!format!("{r:?}").contains(&text[text.find("key 7 ").unwrap() + 6..][..8]));
        let hex = "ab".repeat(KEY_LEN);
        let two = format!("key 1 {hex}\nkey 2 {hex}\n");
        assert_eq!(
            Keyring::parse(&two).unwrap_err(),
            KeyError::NoSendKey { id: None }
        );
        assert_eq!(
            Keyring::parse(&format!("{two}send 2")).unwrap().send_id(),
            2
        );
        assert_eq!(
            Keyring::parse(&format!("{two}send 3")).unwrap_err(),
            KeyError::NoSendKey { id: Some(3) }
        );
        assert_eq!(
            Keyring::parse(&format!("key 1 {hex}\nkey 1 {hex}\n")).unwrap_err(),
            KeyError::DuplicateId { id: 1 }
        );
        assert_eq!(
            Keyring::parse(&format!("{two}key 3 {hex}\nkey 4 {hex}\nsend 1")).unwrap_err(),
            KeyError::TooMany
        );
        assert_eq!(
            Keyring::parse("# nothing\n\n").unwrap_err(),
            KeyError::Empty
        );
        assert!(matches!(
            Keyring::parse(&format!("\nkey 1 {}\n", &hex[1..])),
            Err(KeyError::Syntax { line: 2, .. })
        ));
        assert!(matches!(
            Keyring::parse(&format!("key 256 {hex}")),
            Err(KeyError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            Keyring::parse("send 1\nsend 1"),
            Err(KeyError::Syntax { line: 2, .. })
        ));
        assert!(matches!(
            Keyring::parse("secret"),
            Err(KeyError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            Keyring::parse(&format!("key 1 {}", "zz".repeat(KEY_LEN))),
            Err(KeyError::Syntax { .. })
        ));
        // Two generated keys differ.
        assert_ne!(
            Keyring::generate_text(1).unwrap(),
            Keyring::generate_text(1).unwrap()
        );
    }

    #[test]
    fn replay_window_accepts_once_and_reorders_within_the_window() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check_and_set(0), Ok(()));
        assert_eq!(w.check_and_set(0), Err(Replay::Duplicate));
        assert_eq!(w.check_and_set(5), Ok(()));
        assert_eq!(w.check_and_set(3), Ok(()), "late but inside the window");
        assert_eq!(w.check_and_set(3), Err(Replay::Duplicate));
        assert_eq!(w.check_and_set(5), Err(Replay::Duplicate));
        assert_eq!(w.newest(), 5);
    }

    #[test]
    fn replay_window_edges() {
        let mut w = ReplayWindow::default();
        let top = 10_000;
        assert_eq!(w.check_and_set(top), Ok(()));
        // The oldest counter still inside the window, and the first one outside it.
        assert_eq!(w.check_and_set(top - (REPLAY_WINDOW - 1)), Ok(()));
        assert_eq!(
            w.check_and_set(top - (REPLAY_WINDOW - 1)),
            Err(Replay::Duplicate)
        );
        assert_eq!(w.check_and_set(top - REPLAY_WINDOW), Err(Replay::TooOld));
        assert_eq!(w.check_and_set(0), Err(Replay::TooOld));
        // Every counter of the window, accepted once in any order, then refused.
        let mut w = ReplayWindow::default();
        w.check_and_set(top).unwrap();
        for c in (top - REPLAY_WINDOW + 1..top).rev() {
            assert_eq!(w.check_and_set(c), Ok(()), "{c}");
        }
        for c in top - REPLAY_WINDOW + 1..=top {
            assert_eq!(w.check_and_set(c), Err(Replay::Duplicate), "{c}");
        }
    }

    #[test]
    fn replay_window_slides_and_forgets_cleared_words() {
        let mut w = ReplayWindow::default();
        // Counters one word apart: sliding must clear the reused words, so a new counter that
        // lands on a word used long ago is not taken for a duplicate.
        for c in (0..10 * REPLAY_WINDOW).step_by(64) {
            assert_eq!(w.check_and_set(c), Ok(()), "{c}");
        }
        // A jump by more than the whole bitmap clears everything.
        let far = 1 << 40;
        assert_eq!(w.check_and_set(far), Ok(()));
        assert_eq!(w.check_and_set(far - 1), Ok(()));
        assert_eq!(
            w.check_and_set(far - 64 * WINDOW_WORDS as u64),
            Err(Replay::TooOld)
        );
        // The top of the counter space.
        assert_eq!(w.check_and_set(u64::MAX), Ok(()));
        assert_eq!(w.check_and_set(u64::MAX), Err(Replay::Duplicate));
        assert_eq!(w.check_and_set(u64::MAX - 1), Ok(()));
    }

    #[test]
    fn a_restarted_sender_counts_on_from_the_clock() {
        let mut before = SendCounter::starting_at(1_000_000);
        let mut w = ReplayWindow::default();
        for _ in 0..100 {
            w.check_and_set(before.next().unwrap()).unwrap();
        }
        // Restarted a millisecond later: its counters are newer than all it sent before.
        let mut after = SendCounter::starting_at(2_000_000);
        assert_eq!(w.check_and_set(after.next().unwrap()), Ok(()));
        // The last value is never handed out twice: the counter ends instead.
        let mut top = SendCounter::starting_at(u64::MAX - 1);
        assert_eq!((top.next(), top.next()), (Some(u64::MAX - 1), None));
    }
}
