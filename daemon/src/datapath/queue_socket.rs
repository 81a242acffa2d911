//! The NFQUEUE socket: the thin I/O shell around the [`crate::datapath::nfqueue`] codec.
//!
//! One `NETLINK_NETFILTER` socket bound to one queue. What it does that the nfq crate does
//! not:
//!
//! * its receive buffer is sized to the queue (`SO_RCVBUFFORCE`, see [`rcvbuf_for`]): with
//!   the default 208 KiB fewer than 200 queued SYNs fit, and the rest were lost;
//! * overruns are reported, not hidden (`NETLINK_NO_ENOBUFS` stays off): a receive returns
//!   `ENOBUFS` once for every overrun, and the caller counts it;
//! * [`QueueSocket::recv_batch`] takes every datagram waiting, up to [`MAX_BATCH`], in one
//!   `recvmmsg`. `MSG_WAITFORONE` blocks for the first only, so at low load a batch is one SYN
//!   and nothing waits for a batch to fill;
//! * the verdicts of a batch go out in one `send` ([`QueueSocket::send`] of a
//!   [`crate::datapath::nfqueue::VerdictBatch`]).
//!
//! Closing the socket releases the queue (the kernel unbinds it on `NETLINK_URELEASE`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::datapath::nfqueue::{self, Config, Message, CFG_F_FAIL_OPEN, CFG_F_GSO};
use crate::datapath::rawsock::cvt;

/// Datagrams per [`QueueSocket::recv_batch`].
pub const MAX_BATCH: usize = 64;

/// Bytes copied of each queued packet: a whole SYN, TCP Fast Open data included.
pub const COPY_RANGE: u32 = 0xffff;

/// One receive buffer: a queued packet of [`COPY_RANGE`] bytes plus its netlink message and
/// attribute headers (under 200 bytes).
pub const RECV_BUF_LEN: usize = COPY_RANGE as usize + 1024;

/// The receive buffer for a queue of `max_len` packets. The kernel charges each queued SYN's
/// message at its `truesize` (about 1 KiB for a SYN copied whole: a small allocation rounded
/// up, plus `struct sk_buff`), so 2 KiB each leaves room for larger SYNs. The kernel doubles
/// what is asked for; this is what is asked for.
pub fn rcvbuf_for(max_len: u32) -> usize {
    (max_len as usize).saturating_mul(2048).max(1 << 20)
}

/// How to configure the queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions {
    /// Packets the kernel holds for this socket before it drops more (`queue_dropped`).
    pub max_len: u32,
    /// `SO_RCVBUFFORCE` bytes (see [`rcvbuf_for`]).
    pub rcvbuf: usize,
}

/// A netlink socket bound to one NFQUEUE.
#[derive(Debug)]
pub struct QueueSocket {
    fd: OwnedFd,
    queue: u16,
    seq: u32,
    /// Packets that arrived while a configuration request waited for its acknowledgement:
    /// dropped (fail closed; the client retransmits) and counted here.
    pub dropped_during_setup: u64,
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0)
}

impl QueueSocket {
    /// Opens a socket, binds it to `queue` and configures the queue: whole packets, `max_len`,
    /// GSO packets queued whole (`NFQA_CFG_F_GSO`: the SYN path rewrites every checksum
    /// anyway), fail-open off (a full queue drops, it never lets a SYN through behind the
    /// policy's back). Any refusal by the kernel is an error naming the request.
    pub fn open(queue: u16, opts: &QueueOptions) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        })?;
        // SAFETY: fd is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain old data; zero (port id 0: the kernel picks one) is
        // valid.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).unwrap_or(0);
        // SAFETY: sa is a valid sockaddr_nl for the length given.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(sa).cast(),
                socklen::<libc::sockaddr_nl>(),
            )
        })?;
        let mut s = QueueSocket {
            fd,
            queue,
            seq: 0,
            dropped_during_setup: 0,
        };
        s.set_rcvbuf(opts.rcvbuf)?;
        let steps = [
            (
                "bind",
                Config::Bind {
                    family: u8::try_from(libc::AF_INET).unwrap_or(2),
                },
            ),
            ("copy range", Config::CopyPacket { range: COPY_RANGE }),
            ("queue length", Config::MaxLen(opts.max_len)),
            (
                "flags",
                Config::Flags {
                    flags: CFG_F_GSO,
                    mask: CFG_F_GSO | CFG_F_FAIL_OPEN,
                },
            ),
        ];
        for (what, cfg) in steps {
            s.request(cfg).map_err(|e| {
                io::Error::new(e.kind(), format!("queue {queue}: {what} refused: {e}"))
            })?;
        }
        Ok(s)
    }

    /// `SO_RCVBUFFORCE` (root may exceed `net.core.rmem_max`); `SO_RCVBUF` where that is
    /// refused, which the kernel caps at `rmem_max`.
    fn set_rcvbuf(&self, bytes: usize) -> io::Result<()> {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: v is a c_int that outlives the call.
            let r = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    std::ptr::addr_of!(v).cast(),
                    socklen::<libc::c_int>(),
                )
            };
            if r == 0 {
                return Ok(());
            }
        }
        Err(io::Error::last_os_error())
    }

    /// The receive buffer the kernel granted (twice what was asked: it counts overhead).
    pub fn rcvbuf(&self) -> io::Result<usize> {
        let mut v: libc::c_int = 0;
        let mut len = socklen::<libc::c_int>();
        // SAFETY: v and len outlive the call and describe a c_int.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                std::ptr::addr_of_mut!(v).cast(),
                &mut len,
            )
        })?;
        Ok(usize::try_from(v).unwrap_or(0))
    }

    /// Sends one configuration request and waits for its acknowledgement.
    fn request(&mut self, what: Config) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = [0u8; 64];
        let n = nfqueue::config(&mut req, self.queue, seq, what)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.send(&req[..n])?;
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let mut verdicts = [0u8; nfqueue::VERDICT_MSG_LEN];
        loop {
            // SAFETY: buf is valid for writes of its length.
            let r =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let len = match usize::try_from(r) {
                Ok(len) => len,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            for msg in nfqueue::messages(&buf[..len]) {
                match msg.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
                    Message::Ack { seq: s, errno } if s == seq => {
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(errno))
                        };
                    }
                    Message::Packet(p) => {
                        let mut v = nfqueue::VerdictBatch::new(&mut verdicts);
                        if v.push(p.queue, p.id, nfqueue::Verdict::Drop, None).is_ok() {
                            self.send(v.bytes())?;
                        }
                        self.dropped_during_setup += 1;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends one datagram to the kernel (a verdict batch, a request).
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: bytes is valid for reads of its length. An unconnected netlink socket
            // sends to the kernel (port id 0).
            let r =
                unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives every datagram waiting, up to [`MAX_BATCH`], blocking until the first. Returns
    /// how many; `rx.datagram(i)` reads each. `ENOBUFS` (the socket overran: the kernel
    /// dropped packets it could not deliver, counted as `queue_user_dropped`) and `EINTR` come
    /// back as errors for the caller to count or to check its stop flag.
    pub fn recv_batch(&self, rx: &mut RecvBatch) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are plain old data; zero is a valid (empty) value.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdr: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        for (i, b) in rx.bufs.iter_mut().enumerate() {
            iov[i] = libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            };
            hdr[i].msg_hdr.msg_iov = std::ptr::addr_of_mut!(iov[i]);
            hdr[i].msg_hdr.msg_iovlen = 1;
        }
        let vlen = u32::try_from(rx.bufs.len()).unwrap_or(0);
        // SAFETY: each hdr points at one iovec describing one of rx's buffers, all valid for
        // writes of their length for the call; no timeout is passed.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                hdr.as_mut_ptr(),
                vlen,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let n = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
        for (i, h) in hdr.iter().take(n).enumerate() {
            rx.lens[i] = h.msg_len as usize;
            if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                rx.truncated += 1;
            }
        }
        Ok(n)
    }
}

/// The receive buffers of [`QueueSocket::recv_batch`], allocated once.
#[derive(Debug)]
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    lens: Vec<usize>,
    /// Datagrams longer than a buffer (cannot happen with [`RECV_BUF_LEN`]; counted if it
    /// does: the parser then refuses the cut message).
    pub truncated: u64,
}

impl RecvBatch {
    /// `n` buffers (at most [`MAX_BATCH`]). Zeroed allocations: pages the kernel never writes
    /// stay unbacked.
    pub fn new(n: usize) -> Self {
        let n = n.clamp(1, MAX_BATCH);
        RecvBatch {
            bufs: (0..n)
                .map(|_| vec![0u8; RECV_BUF_LEN].into_boxed_slice())
                .collect(),
            lens: vec![0; n],
            truncated: 0,
        }
    }

    /// Datagram `i` of the last receive.
    pub fn datagram(&self, i: usize) -> &[u8] {
        let len = self.lens[i].min(self.bufs[i].len());
        &self.bufs[i][..len]
    }
}
