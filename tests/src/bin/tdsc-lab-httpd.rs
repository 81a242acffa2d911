//! `tdsc-lab-httpd --listen ADDR:PORT --id N [--fastopen]`: the lab's HTTP server.
//!
//! Threaded (one thread per connection), it answers any request with
//! `node=N\nlen=<request bytes>\nfnv=<FNV-1a 64 of the request, hex>\n` and closes the
//! connection (HTTP/1.0 semantics, `Connection: close` for 1.1 clients). A request for
//! `/__served` answers `served=<count>\n` instead, where count is the number of other requests
//! served so far; it is not counted itself. A request for `/__echo` answers the headers and
//! `node=N\n`, then echoes every byte the client sends until it closes: the long-lived,
//! two-way connection of the failover tests (counted as one request). With `--fastopen` the listener sets
//! `TCP_FASTOPEN`, so data in a SYN is accepted when `net.ipv4.tcp_fastopen` allows it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tdsc_lab::http::fnv1a64;

/// Largest request read; enough for the lab's GETs.
const MAX_REQUEST: usize = 8192;

/// Queue length of pending TFO requests on the listener (TCP_FASTOPEN's argument).
const TFO_QUEUE: libc::c_int = 256;

#[derive(Parser, Debug)]
#[command(about = "The tcp-dsc lab's HTTP server: answers every request with node=<id>")]
struct Args {
    /// Address and port to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Node id to report in every reply.
    #[arg(long)]
    id: u32,
    /// Set TCP_FASTOPEN on the listener.
    #[arg(long)]
    fastopen: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    if args.fastopen {
        set_fastopen(&listener).context("set TCP_FASTOPEN on the listener")?;
    }
    eprintln!(
        "tdsc-lab-httpd: node {} listening on {}{}",
        args.id,
        args.listen,
        if args.fastopen { " (TFO)" } else { "" }
    );
    let served = Arc::new(AtomicU64::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tdsc-lab-httpd: accept: {e}");
                continue;
            }
        };
        let served = Arc::clone(&served);
        let id = args.id;
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, id, &served) {
                eprintln!("tdsc-lab-httpd: {e:#}");
            }
        });
    }
    Ok(())
}

fn set_fastopen(listener: &TcpListener) -> std::io::Result<()> {
    let qlen: libc::c_int = TFO_QUEUE;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("4 fits");
    // SAFETY: the fd is a valid socket owned by `listener`; the option value points at a live
    // c_int whose size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            std::ptr::from_ref(&qlen).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn serve(mut stream: TcpStream, id: u32, served: &AtomicU64) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    // Read until the end of the headers (or the peer stops sending).
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).context("read request")?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    if len == 0 {
        // A readiness probe: connected and closed without a request. Not counted.
        return Ok(());
    }
    let request = &buf[..len];
    let path = std::str::from_utf8(request)
        .ok()
        .and_then(|r| r.split_whitespace().nth(1))
        .unwrap_or("/");
    if path == "/__echo" {
        served.fetch_add(1, Ordering::Relaxed);
        stream.write_all(format!("HTTP/1.0 200 OK\r\n\r\nnode={id}\n").as_bytes())?;
        // Idle gaps are up to the test; only a closed or reset connection ends the echo.
        stream.set_read_timeout(None)?;
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).context("echo read")?;
            if n == 0 {
                return Ok(());
            }
            stream.write_all(&chunk[..n]).context("echo write")?;
        }
    }
    let body = if path == "/__served" {
        format!("served={}\n", served.load(Ordering::Relaxed))
    } else {
        served.fetch_add(1, Ordering::Relaxed);
        format!(
            "node={id}\nlen={}\nfnv={:016x}\n",
            request.len(),
            fnv1a64(request)
        )
    };
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(response.as_bytes())
        .context("write response")?;
    Ok(())
}
