//! A minimal netlink client for the two requests the daemon makes outside nftables: adding
//! or removing the VIP (rtnetlink) and counting sockets (sock_diag). Messages are built as
//! plain bytes; only the socket calls are unsafe.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const NLMSG_HDRLEN: usize = 16;
/// Address families as the one-byte fields of ifaddrmsg and inet_diag carry them.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
const _: () =
    assert!(libc::AF_INET == AF_INET as libc::c_int && libc::AF_INET6 == AF_INET6 as libc::c_int);
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_EXCL: u16 = 0x200;

#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends an attribute (type, payload) to a message under construction.
pub fn put_attr(msg: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).expect("attribute fits in u16");
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(payload);
    msg.resize(align4(msg.len()), 0);
}

impl Netlink {
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is new and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { fd, seq: 1 })
    }

    /// Sends one request: `body` is everything after the netlink header.
    fn send(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
        let len = u32::try_from(NLMSG_HDRLEN + body.len()).expect("message fits in u32");
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: msg is valid for reads of its length; the kernel is the destination
        // because an unbound netlink socket sends to pid 0 by default.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    fn recv_into(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs())
    }

    /// A request answered by an ACK (or an error).
    pub fn request_ack(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        let seq = self.send(kind, flags | NLM_F_REQUEST | NLM_F_ACK, body)?;
        self.replies(seq, 8192, ack_reply)
    }

    /// A dump request; `each` sees the body of every reply message.
    pub fn dump(&mut self, kind: u16, body: &[u8], mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let seq = self.send(kind, NLM_F_REQUEST | NLM_F_DUMP, body)?;
        self.replies(seq, 32768, |kind, msg| dump_reply(kind, msg, &mut each))
    }

    /// Reads replies to request `seq` and hands each message's type and body to `on`, until
    /// `on` returns the outcome. Messages of other requests are skipped.
    fn replies(
        &mut self,
        seq: u32,
        buf_len: usize,
        mut on: impl FnMut(u16, &[u8]) -> Option<io::Result<()>>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; buf_len];
        loop {
            let n = self.recv_into(&mut buf)?;
            if let Some(outcome) = datagram_replies(&buf[..n], seq, &mut on) {
                return outcome;
            }
        }
    }
}

/// Hands the type and body of every message of request `seq` in one received datagram to
/// `on`, until `on` returns the outcome; `None` when the datagram ended first (the reply goes
/// on in the next one). A length that does not fit the datagram ends it with an error. Pure:
/// the fuzz target `netlink` feeds it arbitrary datagrams.
pub fn datagram_replies(
    datagram: &[u8],
    seq: u32,
    on: &mut impl FnMut(u16, &[u8]) -> Option<io::Result<()>>,
) -> Option<io::Result<()>> {
    let n = datagram.len();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= n {
        let (len, kind, mseq) = header(&datagram[at..n]);
        if len < NLMSG_HDRLEN || at + len > n {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad netlink message length",
            )));
        }
        if mseq == seq {
            if let Some(outcome) = on(kind, &datagram[at + NLMSG_HDRLEN..at + len]) {
                return Some(outcome);
            }
        }
        at += align4(len);
    }
    None
}

/// The outcome of a request answered by an ACK, once its reply message of type `kind`
/// arrived; `None` for any other message.
pub fn ack_reply(kind: u16, msg: &[u8]) -> Option<io::Result<()>> {
    (kind == NLMSG_ERROR).then(|| errno_of(msg))
}

/// The outcome of a dump request once a message of type `kind` ends it (done or an error);
/// every other message is handed to `each` and the dump goes on (`None`).
pub fn dump_reply(kind: u16, msg: &[u8], each: &mut impl FnMut(&[u8])) -> Option<io::Result<()>> {
    match kind {
        NLMSG_DONE => Some(Ok(())),
        NLMSG_ERROR => Some(errno_of(msg)),
        _ => {
            each(msg);
            None
        }
    }
}

fn header(b: &[u8]) -> (usize, u16, u32) {
    let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes"));
    let kind = u16::from_ne_bytes(b[4..6].try_into().expect("2 bytes"));
    let seq = u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes"));
    (usize::try_from(len).unwrap_or(0), kind, seq)
}

fn errno_of(body: &[u8]) -> io::Result<()> {
    let code = body
        .get(0..4)
        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .unwrap_or(-libc::EPROTO);
    match code {
        0 => Ok(()),
        // The kernel sends a negative errno; `i32::MIN` has none to negate to.
        c => Err(c.checked_neg().map_or_else(
            || {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "netlink error code out of range",
                )
            },
            io::Error::from_raw_os_error,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `NLMSG_ERROR` reply to request `seq` carrying `code` (the kernel's negative errno, 0
    /// for an acknowledgement) and the request's header.
    fn error_msg(seq: u32, code: i32) -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HDRLEN + 4 + NLMSG_HDRLEN];
        let len = u32::try_from(m.len()).unwrap();
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m[16..20].copy_from_slice(&code.to_ne_bytes());
        m
    }

    fn ack(datagram: &[u8]) -> Option<io::Result<()>> {
        datagram_replies(datagram, 2, &mut ack_reply)
    }

    #[test]
    fn an_acknowledgement_and_an_error_end_the_request() {
        assert!(matches!(ack(&error_msg(2, 0)), Some(Ok(()))));
        let e = ack(&error_msg(2, -libc::EEXIST)).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        // Another request's reply is skipped: the answer is still to come.
        assert!(ack(&error_msg(3, 0)).is_none());
    }

    /// Found by the `netlink` fuzz target: `i32::MIN` has no errno to negate to (the
    /// negation overflowed: a panic with overflow checks, `i32::MIN` itself without).
    #[test]
    fn an_error_code_without_an_errno_is_invalid_data() {
        let e = ack(&error_msg(2, i32::MIN)).unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn a_length_beyond_the_datagram_is_invalid_data() {
        let mut m = error_msg(2, 0);
        m[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        let e = ack(&m).unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
