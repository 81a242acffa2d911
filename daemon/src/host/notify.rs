//! `sd_notify(3)` over `$NOTIFY_SOCKET`: one datagram on a Unix socket, such as `READY=1`.
//!
//! Written here rather than taken from a crate: the protocol is one `sendto` of a text
//! datagram to a path (or, with a leading `@`, an abstract address), about twenty lines with
//! no `unsafe`; the registry's crates for it add file-descriptor passing and `libsystemd`
//! bindings the daemon does not need.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, `STATUS=…`) to the service manager.
/// Returns `Ok(false)` when there is none to tell (`NOTIFY_SOCKET` unset: not started by
/// systemd, or not `Type=notify`).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = address(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))?;
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// `$NOTIFY_SOCKET` as an address: a path, or `@name` for Linux's abstract namespace.
fn address(raw: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match raw {
        [] => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is empty",
        )),
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        _ => SocketAddr::from_pathname(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(raw),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_and_an_abstract_name_are_told_apart() {
        use std::os::linux::net::SocketAddrExt;
        let p = address(b"/run/systemd/notify").unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = address(b"@tdsc-test").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"tdsc-test"[..]));
        assert!(address(b"").is_err());
    }

    /// The datagram reaches a socket bound where `NOTIFY_SOCKET` points, byte for byte.
    #[test]
    fn the_state_arrives_as_one_datagram() {
        let dir = std::env::temp_dir().join(format!("tdsc-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let addr = address(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str())).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(b"READY=1", &addr)
            .unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
