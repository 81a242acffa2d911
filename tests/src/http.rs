//! A minimal HTTP/1.0 client for the lab's servers, and the reply format they share.
//!
//! `tdsc-lab-httpd` answers every request with a `text/plain` body of `key=value` lines:
//! `node=<id>` first, then `len=<n>` and `fnv=<hex>`: the length and FNV-1a 64 digest of the
//! request bytes it read (up to the end of the headers), so a test can check that a request
//! carried in a forwarded SYN (TCP Fast Open) arrived intact.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("exchange with {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reply from {addr} has no `node=` line: {reply:?}")]
    BadReply { addr: SocketAddr, reply: String },
}

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Id of the node that served the request (0 for the baseline server).
    pub node: u32,
    /// Length of the request as the server read it.
    pub request_len: Option<usize>,
    /// FNV-1a 64 digest of the request as the server read it.
    pub request_fnv: Option<u64>,
    /// Time spent in `connect()` alone.
    pub connect_time: Duration,
}

/// FNV-1a, 64 bit: a cheap digest to compare request bytes end to end.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The request line and headers a lab client sends.
pub fn request_bytes(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.0\r\nHost: tdsc-lab\r\nUser-Agent: tdsc-lab\r\n\r\n").into_bytes()
}

/// Parses a full HTTP response (status line, headers, body).
pub fn parse_reply(
    addr: SocketAddr,
    raw: &[u8],
    connect_time: Duration,
) -> Result<Reply, HttpError> {
    let text = String::from_utf8_lossy(raw);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let field = |key: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let node = field("node")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| HttpError::BadReply {
            addr,
            reply: text.chars().take(200).collect(),
        })?;
    Ok(Reply {
        node,
        request_len: field("len").and_then(|v| v.parse().ok()),
        request_fnv: field("fnv").and_then(|v| u64::from_str_radix(&v, 16).ok()),
        connect_time,
    })
}

/// One `GET path` over a fresh connection; `connect_time` is measured around `connect()`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Reply, HttpError> {
    let start = Instant::now();
    let s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| HttpError::Connect { addr, source })?;
    let connect_time = start.elapsed();
    s.set_nodelay(true)
        .map_err(|source| HttpError::Io { addr, source })?;
    exchange(s, addr, timeout, &request_bytes(path), connect_time)
}

/// Sends `request` (what the SYN did not carry already) on a connected socket and reads the
/// whole reply, each bounded by `timeout`.
fn exchange(
    mut s: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
    request: &[u8],
    connect_time: Duration,
) -> Result<Reply, HttpError> {
    let io = |source| HttpError::Io { addr, source };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    if !request.is_empty() {
        s.write_all(request).map_err(io)?;
    }
    let mut raw = Vec::with_capacity(256);
    s.read_to_end(&mut raw).map_err(io)?;
    parse_reply(addr, &raw, connect_time)
}

/// `addr` as a `sockaddr_in`.
fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::sa_family_t::try_from(libc::AF_INET).expect("small");
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes(addr.ip().octets());
    sa
}

/// One `GET path` over a connection from the fixed local port `local_port` (bound with
/// `SO_REUSEADDR` before `connect()`); `timeout` bounds the connect (SYN retransmissions
/// included) and each read and write.
pub fn get_from_port(
    addr: SocketAddrV4,
    local_port: u16,
    path: &str,
    timeout: Duration,
) -> Result<Reply, HttpError> {
    let sa_addr = SocketAddr::V4(addr);
    let io = |source| HttpError::Io {
        addr: sa_addr,
        source,
    };
    let owned = tcp_socket_v4().map_err(io)?;
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    let len = |n: usize| libc::socklen_t::try_from(n).expect("small");
    // SAFETY: the option values are live locals whose sizes are passed alongside; the fd is
    // open (owned by `owned`). SO_SNDTIMEO also bounds a blocking connect() on Linux.
    let opts_ok = unsafe {
        libc::setsockopt(
            owned.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            std::ptr::from_ref(&one).cast(),
            len(std::mem::size_of_val(&one)),
        ) == 0
            && libc::setsockopt(
                owned.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::from_ref(&tv).cast(),
                len(std::mem::size_of_val(&tv)),
            ) == 0
    };
    if !opts_ok {
        return Err(io(std::io::Error::last_os_error()));
    }
    let local = sockaddr_in(SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        local_port,
    ));
    let remote = sockaddr_in(addr);
    let sa_len = len(std::mem::size_of::<libc::sockaddr_in>());
    // SAFETY: `local` is a live sockaddr_in of the size passed; the fd is open.
    if unsafe { libc::bind(owned.as_raw_fd(), std::ptr::from_ref(&local).cast(), sa_len) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let start = Instant::now();
    // SAFETY: `remote` is a live sockaddr_in of the size passed; the fd is open.
    if unsafe {
        libc::connect(
            owned.as_raw_fd(),
            std::ptr::from_ref(&remote).cast(),
            sa_len,
        )
    } != 0
    {
        return Err(HttpError::Connect {
            addr: sa_addr,
            source: std::io::Error::last_os_error(),
        });
    }
    let connect_time = start.elapsed();
    exchange(
        TcpStream::from(owned),
        sa_addr,
        timeout,
        &request_bytes(path),
        connect_time,
    )
}

/// A fresh IPv4 TCP socket (close-on-exec), for the requests that need socket options or
/// flags `std::net` does not offer.
fn tcp_socket_v4() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a fresh fd we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One request sent with TCP Fast Open: `sendto(MSG_FASTOPEN)` connects and puts `request`
/// into the SYN (when `net.ipv4.tcp_fastopen` allows it without a cookie, as in the lab's
/// clients); then reads the whole reply.
pub fn get_fastopen(
    addr: SocketAddrV4,
    request: &[u8],
    timeout: Duration,
) -> Result<Reply, HttpError> {
    let sa_addr = SocketAddr::V4(addr);
    let io = |source| HttpError::Io {
        addr: sa_addr,
        source,
    };
    let owned = tcp_socket_v4().map_err(io)?;
    let sa = sockaddr_in(addr);
    let start = Instant::now();
    // SAFETY: `request` and `sa` are live for the call, their sizes passed alongside; the fd
    // is open (owned by `owned`).
    let n = unsafe {
        libc::sendto(
            owned.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            libc::MSG_FASTOPEN,
            std::ptr::from_ref(&sa).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).expect("16"),
        )
    };
    let connect_time = start.elapsed();
    let sent = usize::try_from(n).map_err(|_| HttpError::Connect {
        addr: sa_addr,
        source: std::io::Error::last_os_error(),
    })?;
    exchange(
        TcpStream::from(owned),
        sa_addr,
        timeout,
        &request[sent.min(request.len())..],
        connect_time,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_lab_reply() {
        let addr: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let raw =
            b"HTTP/1.0 200 OK\r\nContent-Length: 27\r\n\r\nnode=3\nlen=60\nfnv=00000000000000ff\n";
        let r = parse_reply(addr, raw, Duration::ZERO).unwrap();
        assert_eq!(r.node, 3);
        assert_eq!(r.request_len, Some(60));
        assert_eq!(r.request_fnv, Some(0xff));
        assert!(parse_reply(addr, b"HTTP/1.0 200 OK\r\n\r\nhello", Duration::ZERO).is_err());
    }

    #[test]
    fn fnv_matches_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
