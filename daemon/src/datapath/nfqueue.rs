//! The nfnetlink_queue protocol as bytes, sans-IO: the messages that configure a queue, the
//! packets the kernel queues, and batches of verdicts. The shell owns the netlink socket.
//!
//! Why our own codec: the daemon's SYN rate is the cluster's connection rate, and the nfq
//! crate sends one `sendto` per verdict. The kernel accepts several `NFQNL_MSG_VERDICT`
//! messages in one datagram, each with its own verdict and id, so a batch of SYNs costs one
//! system call for all verdicts ([`VerdictBatch`]). Everything here writes into caller-owned
//! buffers and borrows from them when reading: no allocation on the hot path.
//!
//! The layout follows `include/uapi/linux/netfilter/nfnetlink_queue.h` and
//! `include/uapi/linux/netfilter/nfnetlink.h`. Netlink headers and attribute headers are in
//! host byte order; the nfnetlink payload (packet id, verdict, queue number, config values)
//! is big-endian.

/// Netlink message header length (`struct nlmsghdr`).
pub const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg`: family, version, resource id (the queue number, big-endian).
pub const NFGENMSG_LEN: usize = 4;
/// Attribute header length (`struct nlattr`).
pub const NLA_HDRLEN: usize = 4;

/// `NFNL_SUBSYS_QUEUE`: the message type is `subsystem << 8 | message`.
pub const NFNL_SUBSYS_QUEUE: u16 = 3;
/// A queued packet (kernel to user).
pub const NFQNL_MSG_PACKET: u16 = 0;
/// A verdict for one packet (user to kernel).
pub const NFQNL_MSG_VERDICT: u16 = 1;
/// Queue configuration (user to kernel).
pub const NFQNL_MSG_CONFIG: u16 = 2;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// Attribute type bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

// enum nfqnl_attr_type
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CAP_LEN: u16 = 13;
const NFQA_SKB_INFO: u16 = 14;
/// `NFQA_SKB_GSO`: the packet is a GSO aggregate (queued whole because of [`CFG_F_GSO`]).
const NFQA_SKB_GSO: u32 = 1 << 1;

// enum nfqnl_attr_config
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
/// `NFQNL_CFG_CMD_BIND` / `_UNBIND`.
const CMD_BIND: u8 = 1;
const CMD_UNBIND: u8 = 2;
/// `NFQNL_COPY_PACKET`: copy up to `copy_range` bytes of each packet.
const COPY_PACKET: u8 = 2;
/// `NFQA_CFG_F_FAIL_OPEN`: accept packets when the queue is full instead of dropping them.
pub const CFG_F_FAIL_OPEN: u32 = 1 << 0;
/// `NFQA_CFG_F_GSO`: queue GSO packets whole instead of segmenting them first.
pub const CFG_F_GSO: u32 = 1 << 2;

/// `NF_DROP` and `NF_ACCEPT` (`include/uapi/linux/netfilter.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop = 0,
    Accept = 1,
}

/// One packet the kernel queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The queue it came from (`res_id`).
    pub queue: u16,
    /// The id to give the verdict for.
    pub id: u32,
    /// `hw_protocol` (ethertype, e.g. 0x0800), as the kernel sets it.
    pub hw_protocol: u16,
    /// The netfilter hook it was queued at.
    pub hook: u8,
    /// The packet from its network header on, as much as was copied.
    pub payload: &'a [u8],
    /// The original length when the kernel copied less than the whole packet.
    pub cap_len: Option<u32>,
    /// The packet mark, when set.
    pub mark: Option<u32>,
    /// Input interface index.
    pub indev: Option<u32>,
    /// A GSO aggregate (only with [`CFG_F_GSO`]): its checksum may be partial.
    pub gso: bool,
}

/// One netlink message read from the queue socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A queued packet.
    Packet(Packet<'a>),
    /// An acknowledgement (`errno` 0) or an error for the request with this sequence number.
    Ack { seq: u32, errno: i32 },
    /// The kernel dropped messages it could not deliver (`NLMSG_OVERRUN`).
    Overrun,
    /// Anything else (another subsystem's message, NOOP, DONE): skipped.
    Other { kind: u16 },
}

/// Why bytes from the socket could not be read as netlink messages. The rest of that datagram
/// is skipped; the shell counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("netlink message header truncated or length out of bounds")]
    Header,
    #[error("queued packet without the nfgenmsg header")]
    Nfgen,
    #[error("attribute truncated or length out of bounds")]
    Attribute,
    #[error("queued packet without a packet header")]
    NoPacketHeader,
    #[error("queued packet without a payload")]
    NoPayload,
    #[error("error message with code {code}, which is no negated errno")]
    Errno { code: i32 },
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_ne(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

fn u32_ne(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn u32_be(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// Iterates the netlink messages in one datagram from the queue socket.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

/// Iterator over the messages of one datagram; stops after the first error.
#[derive(Debug)]
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let buf = self.rest;
        if buf.len() < NLMSG_HDRLEN {
            self.rest = &[];
            return Some(Err(ParseError::Header));
        }
        let len = u32_ne(&buf[0..4]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            self.rest = &[];
            return Some(Err(ParseError::Header));
        }
        self.rest = buf.get(align4(len)..).unwrap_or(&[]);
        let kind = u16_ne(&buf[4..6]);
        let seq = u32_ne(&buf[8..12]);
        let body = &buf[NLMSG_HDRLEN..len];
        Some(match kind {
            NLMSG_ERROR => match body.get(..4) {
                // The kernel sends a negative errno; 0 is an acknowledgement. `i32::MIN` has
                // no errno to negate to.
                Some(e) => {
                    let code = i32::from_ne_bytes([e[0], e[1], e[2], e[3]]);
                    code.checked_neg()
                        .map(|errno| Message::Ack { seq, errno })
                        .ok_or(ParseError::Errno { code })
                }
                None => Err(ParseError::Header),
            },
            NLMSG_OVERRUN => Ok(Message::Overrun),
            NLMSG_NOOP | NLMSG_DONE => Ok(Message::Other { kind }),
            k if k == (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET) => {
                parse_packet(body).map(Message::Packet)
            }
            _ => Ok(Message::Other { kind }),
        })
    }
}

fn parse_packet(body: &[u8]) -> Result<Packet<'_>, ParseError> {
    let nfgen = body.get(..NFGENMSG_LEN).ok_or(ParseError::Nfgen)?;
    let queue = u16::from_be_bytes([nfgen[2], nfgen[3]]);
    let mut attrs = &body[NFGENMSG_LEN..];
    let (mut header, mut payload) = (None, None);
    let mut p = Packet {
        queue,
        id: 0,
        hw_protocol: 0,
        hook: 0,
        payload: &[],
        cap_len: None,
        mark: None,
        indev: None,
        gso: false,
    };
    while !attrs.is_empty() {
        if attrs.len() < NLA_HDRLEN {
            return Err(ParseError::Attribute);
        }
        let len = usize::from(u16_ne(&attrs[0..2]));
        if len < NLA_HDRLEN || len > attrs.len() {
            return Err(ParseError::Attribute);
        }
        let value = &attrs[NLA_HDRLEN..len];
        match u16_ne(&attrs[2..4]) & NLA_TYPE_MASK {
            // struct nfqnl_msg_packet_hdr { __be32 packet_id; __be16 hw_protocol; __u8 hook; }
            NFQA_PACKET_HDR if value.len() >= 7 => header = Some(value),
            NFQA_PACKET_HDR => return Err(ParseError::Attribute),
            NFQA_PAYLOAD => payload = Some(value),
            NFQA_MARK => p.mark = u32_be(value),
            NFQA_IFINDEX_INDEV => p.indev = u32_be(value),
            NFQA_CAP_LEN => p.cap_len = u32_be(value),
            NFQA_SKB_INFO => p.gso = u32_be(value).is_some_and(|f| f & NFQA_SKB_GSO != 0),
            _ => {}
        }
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    let h = header.ok_or(ParseError::NoPacketHeader)?;
    p.id = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    p.hw_protocol = u16::from_be_bytes([h[4], h[5]]);
    p.hook = h[6];
    p.payload = payload.ok_or(ParseError::NoPayload)?;
    Ok(p)
}

/// The buffer is too small for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("netlink buffer full")]
pub struct Full;

/// Writes netlink messages one after another into a caller-owned buffer.
#[derive(Debug)]
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    /// Starts a message; returns its offset for [`Writer::finish`].
    fn begin(
        &mut self,
        msg: u16,
        flags: u16,
        seq: u32,
        family: u8,
        queue: u16,
    ) -> Result<usize, Full> {
        let start = self.len;
        let kind = NFNL_SUBSYS_QUEUE << 8 | msg;
        let mut h = [0u8; NLMSG_HDRLEN + NFGENMSG_LEN];
        h[4..6].copy_from_slice(&kind.to_ne_bytes());
        h[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        h[8..12].copy_from_slice(&seq.to_ne_bytes());
        // nlmsg_pid 0: the kernel. nfgenmsg: family, NFNETLINK_V0, queue (big-endian).
        h[16] = family;
        h[18..20].copy_from_slice(&queue.to_be_bytes());
        self.put(&h)?;
        Ok(start)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), Full> {
        let end = self.len + bytes.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(Full)?
            .copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    fn attr(&mut self, kind: u16, value: &[u8]) -> Result<(), Full> {
        let len = NLA_HDRLEN + value.len();
        let padded = align4(len);
        let end = self.len + padded;
        let dst = self.buf.get_mut(self.len..end).ok_or(Full)?;
        let len16 = u16::try_from(len).map_err(|_| Full)?;
        dst[0..2].copy_from_slice(&len16.to_ne_bytes());
        dst[2..4].copy_from_slice(&kind.to_ne_bytes());
        dst[NLA_HDRLEN..len].copy_from_slice(value);
        dst[len..].fill(0);
        self.len = end;
        Ok(())
    }

    fn finish(&mut self, start: usize) {
        let len = u32::try_from(self.len - start).expect("a netlink message is below 4 GiB");
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Several verdicts in one datagram: one `NFQNL_MSG_VERDICT` message per packet, each with
/// its own verdict and, optionally, mark. Writes into a caller-owned buffer, so a batch of
/// any size up to the buffer costs one `sendmsg` and no allocation.
#[derive(Debug)]
pub struct VerdictBatch<'a> {
    w: Writer<'a>,
    count: usize,
}

/// Bytes one verdict takes in a [`VerdictBatch`] with a mark (without: 8 fewer).
pub const VERDICT_MSG_LEN: usize = NLMSG_HDRLEN + NFGENMSG_LEN + 12 + 8;

impl<'a> VerdictBatch<'a> {
    /// An empty batch writing into `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            w: Writer { buf, len: 0 },
            count: 0,
        }
    }

    /// Appends the verdict for packet `id` of `queue`. On [`Full`] nothing is appended: send
    /// the batch and start another.
    pub fn push(
        &mut self,
        queue: u16,
        id: u32,
        verdict: Verdict,
        mark: Option<u32>,
    ) -> Result<(), Full> {
        let before = self.w.len;
        let r = (|| {
            // AF_UNSPEC: a verdict is not per family.
            let start = self.w.begin(NFQNL_MSG_VERDICT, 0, 0, 0, queue)?;
            let mut hdr = [0u8; 8];
            hdr[0..4].copy_from_slice(&(verdict as u32).to_be_bytes());
            hdr[4..8].copy_from_slice(&id.to_be_bytes());
            self.w.attr(NFQA_VERDICT_HDR, &hdr)?;
            if let Some(mark) = mark {
                self.w.attr(NFQA_MARK, &mark.to_be_bytes())?;
            }
            self.w.finish(start);
            Ok(())
        })();
        match r {
            Ok(()) => self.count += 1,
            Err(Full) => self.w.len = before,
        }
        r
    }

    /// The datagram to send.
    pub fn bytes(&self) -> &[u8] {
        &self.w.buf[..self.w.len]
    }

    /// Verdicts in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when no verdict was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Empties the batch, keeping the buffer.
    pub fn clear(&mut self) {
        self.w.len = 0;
        self.count = 0;
    }
}

/// What to configure on a queue; [`config`] writes the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    /// Bind this socket to the queue for `family` (`AF_INET`, `AF_INET6`).
    Bind { family: u8 },
    /// Release the queue.
    Unbind,
    /// Copy up to `range` bytes of each packet.
    CopyPacket { range: u32 },
    /// Queue at most this many packets; more are dropped (and counted by the kernel).
    MaxLen(u32),
    /// Set `flags` within `mask` (e.g. [`CFG_F_GSO`]).
    Flags { flags: u32, mask: u32 },
}

/// Writes one configuration request (with an acknowledgement asked for) for `queue` into
/// `buf`; returns its length.
pub fn config(buf: &mut [u8], queue: u16, seq: u32, what: Config) -> Result<usize, Full> {
    let mut w = Writer { buf, len: 0 };
    let family = match what {
        Config::Bind { family } => family,
        _ => 0,
    };
    let start = w.begin(NFQNL_MSG_CONFIG, NLM_F_ACK, seq, family, queue)?;
    match what {
        // struct nfqnl_msg_config_cmd { __u8 command; __u8 _pad; __be16 pf; }
        Config::Bind { family } => {
            w.attr(NFQA_CFG_CMD, &[CMD_BIND, 0, 0, family])?;
        }
        Config::Unbind => w.attr(NFQA_CFG_CMD, &[CMD_UNBIND, 0, 0, 0])?,
        // struct nfqnl_msg_config_params { __be32 copy_range; __u8 copy_mode; } (packed)
        Config::CopyPacket { range } => {
            let r = range.to_be_bytes();
            w.attr(NFQA_CFG_PARAMS, &[r[0], r[1], r[2], r[3], COPY_PACKET])?;
        }
        Config::MaxLen(n) => w.attr(NFQA_CFG_QUEUE_MAXLEN, &n.to_be_bytes())?,
        Config::Flags { flags, mask } => {
            w.attr(NFQA_CFG_MASK, &mask.to_be_bytes())?;
            w.attr(NFQA_CFG_FLAGS, &flags.to_be_bytes())?;
        }
    }
    w.finish(start);
    Ok(w.len)
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Queue messages as the kernel writes them, built field by field.

    use super::*;

    /// A `NFQNL_MSG_PACKET` for `queue` carrying `payload` with packet id `id`.
    pub(crate) fn packet_msg(
        queue: u16,
        id: u32,
        payload: &[u8],
        skb_info: Option<u32>,
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 256 + payload.len()];
        let mut w = Writer {
            buf: &mut buf,
            len: 0,
        };
        // The kernel sends with NLM_F_REQUEST clear; the parser does not look at flags.
        let start = w.begin(NFQNL_MSG_PACKET, 0, 0, 2, queue).unwrap();
        let mut hdr = [0u8; 7];
        hdr[..4].copy_from_slice(&id.to_be_bytes());
        hdr[4..6].copy_from_slice(&0x0800u16.to_be_bytes());
        hdr[6] = 1; // NF_INET_LOCAL_IN
        w.attr(NFQA_PACKET_HDR, &hdr).unwrap();
        w.attr(NFQA_MARK, &7u32.to_be_bytes()).unwrap();
        w.attr(NFQA_IFINDEX_INDEV, &3u32.to_be_bytes()).unwrap();
        if let Some(info) = skb_info {
            w.attr(NFQA_SKB_INFO, &info.to_be_bytes()).unwrap();
        }
        w.attr(NFQA_PAYLOAD, payload).unwrap();
        w.finish(start);
        let n = w.len;
        buf.truncate(n);
        buf
    }

    /// An `NLMSG_ERROR` for request `seq` with `errno` (0: an acknowledgement).
    pub(crate) fn ack_msg(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HDRLEN + 4 + NLMSG_HDRLEN];
        let len = u32::try_from(m.len()).unwrap();
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m[16..20].copy_from_slice(&(-errno).to_ne_bytes());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    const SYN: &[u8] = &[0x45, 0, 0, 40, 1, 2, 3, 4, 5, 6, 7, 8, 9];

    #[test]
    fn a_queued_packet_parses_with_its_attributes() {
        let m = packet_msg(5, 0xdead_beef, SYN, Some(NFQA_SKB_GSO));
        let got: Vec<_> = messages(&m).collect();
        assert_eq!(
            got,
            vec![Ok(Message::Packet(Packet {
                queue: 5,
                id: 0xdead_beef,
                hw_protocol: 0x0800,
                hook: 1,
                payload: SYN,
                cap_len: None,
                mark: Some(7),
                indev: Some(3),
                gso: true,
            }))]
        );
    }

    #[test]
    fn several_messages_in_one_datagram_all_parse() {
        let mut dgram = packet_msg(0, 1, SYN, None);
        dgram.extend(packet_msg(0, 2, &SYN[..5], None));
        dgram.extend(ack_msg(9, 0));
        dgram.extend(ack_msg(10, libc::ENOBUFS));
        let got: Vec<_> = messages(&dgram).map(Result::unwrap).collect();
        assert!(matches!(
            got[0],
            Message::Packet(Packet {
                id: 1,
                gso: false,
                ..
            })
        ));
        assert!(
            matches!(got[1], Message::Packet(Packet { id: 2, payload, .. }) if payload.len() == 5)
        );
        assert_eq!(got[2], Message::Ack { seq: 9, errno: 0 });
        assert_eq!(
            got[3],
            Message::Ack {
                seq: 10,
                errno: libc::ENOBUFS
            }
        );
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let m = packet_msg(0, 1, SYN, Some(0));
        for n in 0..m.len() {
            let mut cut = m[..n].to_vec();
            if n >= 4 {
                // Also claim the truncated length, so the attribute walk sees the cut.
                let len = u32::try_from(n).unwrap();
                cut[0..4].copy_from_slice(&len.to_ne_bytes());
            }
            let got: Vec<_> = messages(&cut).collect();
            // Either an error, or (cut only in the final padding) the whole packet: never a
            // packet with part of its payload.
            for r in got {
                if let Ok(Message::Packet(p)) = r {
                    assert_eq!(p.payload, SYN, "{n} bytes");
                }
            }
            if n > 0 && n < m.len() - 3 {
                assert!(
                    messages(&cut).any(|r| r.is_err()),
                    "{n} bytes parsed without error"
                );
            }
        }
    }

    /// Found by the `nfqueue` fuzz target: `i32::MIN` has no errno to negate to (the negation
    /// overflowed: a panic with overflow checks, an `Ack` with `i32::MIN` without).
    #[test]
    fn an_error_code_without_an_errno_is_refused() {
        let mut m = ack_msg(5, 0);
        m[16..20].copy_from_slice(&i32::MIN.to_ne_bytes());
        assert_eq!(
            messages(&m).next(),
            Some(Err(ParseError::Errno { code: i32::MIN }))
        );
        assert_eq!(
            messages(&ack_msg(5, 17)).next(),
            Some(Ok(Message::Ack { seq: 5, errno: 17 }))
        );
    }

    #[test]
    fn garbage_lengths_are_refused() {
        let mut m = packet_msg(0, 1, SYN, None);
        m[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(messages(&m).next(), Some(Err(ParseError::Header)));
        let mut m = packet_msg(0, 1, SYN, None);
        // The first attribute claims more than the message holds.
        let at = NLMSG_HDRLEN + NFGENMSG_LEN;
        m[at..at + 2].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert_eq!(messages(&m).next(), Some(Err(ParseError::Attribute)));
        let mut m = packet_msg(0, 1, SYN, None);
        m[at..at + 2].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(messages(&m).next(), Some(Err(ParseError::Attribute)));
    }

    /// Reads a verdict batch back: (queue, id, verdict, mark) per message.
    fn read_verdicts(buf: &[u8]) -> Vec<(u16, u32, u32, Option<u32>)> {
        let mut out = Vec::new();
        let mut rest = buf;
        while !rest.is_empty() {
            let len = u32_ne(&rest[0..4]) as usize;
            assert_eq!(
                u16_ne(&rest[4..6]),
                NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT
            );
            assert_eq!(u16_ne(&rest[6..8]) & NLM_F_REQUEST, NLM_F_REQUEST);
            let queue = u16::from_be_bytes([rest[18], rest[19]]);
            let mut attrs = &rest[NLMSG_HDRLEN + NFGENMSG_LEN..len];
            let (mut id, mut verdict, mut mark) = (0, 0, None);
            while !attrs.is_empty() {
                let alen = usize::from(u16_ne(&attrs[0..2]));
                let v = &attrs[NLA_HDRLEN..alen];
                match u16_ne(&attrs[2..4]) {
                    NFQA_VERDICT_HDR => {
                        verdict = u32_be(v).unwrap();
                        id = u32_be(&v[4..]).unwrap();
                    }
                    NFQA_MARK => mark = u32_be(v),
                    other => panic!("unexpected attribute {other}"),
                }
                attrs = &attrs[align4(alen)..];
            }
            out.push((queue, id, verdict, mark));
            rest = &rest[align4(len)..];
        }
        out
    }

    #[test]
    fn a_batch_keeps_each_verdict_and_mark() {
        let mut buf = [0u8; 4 * VERDICT_MSG_LEN];
        let mut b = VerdictBatch::new(&mut buf);
        assert!(b.is_empty());
        b.push(0, 1, Verdict::Accept, None).unwrap();
        b.push(0, 2, Verdict::Drop, None).unwrap();
        b.push(1, 3, Verdict::Accept, Some(0x53)).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(
            read_verdicts(b.bytes()),
            vec![(0, 1, 1, None), (0, 2, 0, None), (1, 3, 1, Some(0x53))]
        );
        b.clear();
        assert!(b.bytes().is_empty());
    }

    #[test]
    fn a_full_batch_refuses_whole_verdicts_only() {
        let mut buf = [0u8; VERDICT_MSG_LEN + 10];
        let mut b = VerdictBatch::new(&mut buf);
        b.push(0, 1, Verdict::Accept, Some(1)).unwrap();
        let before = b.bytes().len();
        assert_eq!(b.push(0, 2, Verdict::Accept, Some(1)), Err(Full));
        assert_eq!((b.len(), b.bytes().len()), (1, before));
        assert_eq!(read_verdicts(b.bytes()), vec![(0, 1, 1, Some(1))]);
    }

    #[test]
    fn config_requests_have_the_kernel_layout() {
        let mut buf = [0u8; 64];
        let n = config(&mut buf, 0x0102, 7, Config::Bind { family: 2 }).unwrap();
        assert_eq!(n, NLMSG_HDRLEN + NFGENMSG_LEN + 8);
        assert_eq!(u32_ne(&buf[0..4]) as usize, n);
        assert_eq!(
            u16_ne(&buf[4..6]),
            NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG
        );
        assert_eq!(u16_ne(&buf[6..8]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_ne(&buf[8..12]), 7);
        assert_eq!(
            &buf[16..20],
            &[2, 0, 1, 2],
            "family, version 0, queue 0x0102 big-endian"
        );
        // Attribute length 8 and type NFQA_CFG_CMD (host order), then command, pad, pf (big-endian).
        assert_eq!(u16_ne(&buf[20..22]), 8);
        assert_eq!(u16_ne(&buf[22..24]), NFQA_CFG_CMD);
        assert_eq!(&buf[24..28], &[CMD_BIND, 0, 0, 2]);
        let n = config(&mut buf, 0, 8, Config::CopyPacket { range: 0xffff }).unwrap();
        // A 5-byte value: attribute length 9, padded to 12.
        assert_eq!(n, NLMSG_HDRLEN + NFGENMSG_LEN + 12);
        assert_eq!(&buf[24..29], &[0, 0, 0xff, 0xff, COPY_PACKET]);
        assert_eq!(&buf[29..32], &[0, 0, 0], "padding is zeroed");
        let n = config(
            &mut buf,
            0,
            9,
            Config::Flags {
                flags: CFG_F_GSO,
                mask: CFG_F_GSO,
            },
        )
        .unwrap();
        assert_eq!(n, NLMSG_HDRLEN + NFGENMSG_LEN + 16);
        assert_eq!(&buf[24..28], &CFG_F_GSO.to_be_bytes());
        assert_eq!(config(&mut [0u8; 10], 0, 1, Config::Unbind), Err(Full));
    }
}
