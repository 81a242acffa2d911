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
//!
//! **CGI mode** (`--cgi-slots N`, for `tdsc-lab bench-policies`) models a CPU-bound CGI host
//! like the paper's: N worker slots; each request waits for a free slot, holds it for a
//! service time drawn from a seeded bimodal distribution (`--short-ms` with probability
//! 1 − `--long-frac`, else `--long-ms`), then answers. The service time is *slept*, not
//! burnt: the lab machine has 2 cores for every node, client and daemon together, so real CPU
//! work would make the nodes share one CPU and measure the host, not the policy. With
//! `--load-file F` the server rewrites F every 20 ms with `<busy + queued> <busy>`: the first
//! number is the load figure tdscd reports (`[scheduler] load_file`), the second the node's
//! utilisation for the benchmark.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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
    /// CGI mode: worker slots (0: off, answer at once).
    #[arg(long, default_value_t = 0)]
    cgi_slots: u32,
    /// CGI mode: short service time, ms.
    #[arg(long, default_value_t = 20)]
    short_ms: u64,
    /// CGI mode: long service time, ms.
    #[arg(long, default_value_t = 250)]
    long_ms: u64,
    /// CGI mode: fraction of requests with the long service time.
    #[arg(long, default_value_t = 0.15)]
    long_frac: f64,
    /// CGI mode: PRNG seed (each node gets seed + id).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write `<busy + queued> <busy>` here every 20 ms.
    #[arg(long)]
    load_file: Option<std::path::PathBuf>,
}

/// The CGI host's worker slots: a counting semaphore that also counts waiters.
#[derive(Debug, Default)]
struct Slots {
    /// (busy, queued)
    state: Mutex<(u32, u32)>,
    freed: Condvar,
}

#[derive(Debug)]
struct Cgi {
    slots: u32,
    short: Duration,
    long: Duration,
    /// `long_frac` scaled to u64::MAX, compared with a uniform draw.
    long_threshold: u64,
    seed: u64,
    next: AtomicU64,
    pool: Slots,
}

impl Cgi {
    fn service_time(&self) -> Duration {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if splitmix(self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) < self.long_threshold {
            self.long
        } else {
            self.short
        }
    }

    fn run(&self) -> Duration {
        let t = self.service_time();
        {
            let mut g = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
            g.1 += 1;
            while g.0 >= self.slots {
                g = self.pool.freed.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.1 -= 1;
            g.0 += 1;
        }
        std::thread::sleep(t);
        let mut g = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        self.pool.freed.notify_one();
        t
    }

    fn figures(&self) -> (u32, u32) {
        let g = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        (g.0 + g.1, g.0)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    let cgi = (args.cgi_slots > 0).then(|| {
        // A probability in [0, 1] scaled onto u64; the float-to-int cast saturates.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "the float-to-int cast saturates, which is what is wanted"
        )]
        let long_threshold = (args.long_frac.clamp(0.0, 1.0) * 18_446_744_073_709_551_615.0) as u64;
        Arc::new(Cgi {
            slots: args.cgi_slots,
            short: Duration::from_millis(args.short_ms),
            long: Duration::from_millis(args.long_ms),
            long_threshold,
            seed: args.seed.wrapping_add(u64::from(args.id)),
            next: AtomicU64::new(0),
            pool: Slots::default(),
        })
    });
    if let Some(path) = args.load_file.clone() {
        let cgi = cgi.clone();
        std::thread::spawn(move || loop {
            let (load, busy) = cgi.as_ref().map_or((0, 0), |c| c.figures());
            // Write then rename, so a reader never sees a half-written file.
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, format!("{load} {busy}\n")).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
            std::thread::sleep(Duration::from_millis(20));
        });
    }
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
        let cgi = cgi.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, id, &served, cgi.as_deref()) {
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

fn serve(
    mut stream: TcpStream,
    id: u32,
    served: &AtomicU64,
    cgi: Option<&Cgi>,
) -> anyhow::Result<()> {
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
        let service = cgi.map(Cgi::run);
        served.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = service {
            // Service time in the reply, so the benchmark can separate waiting from work.
            return write_reply(
                &mut stream,
                &format!("node={id}\nservice_ms={}\n", t.as_millis()),
            );
        }
        format!(
            "node={id}\nlen={}\nfnv={:016x}\n",
            request.len(),
            fnv1a64(request)
        )
    };
    write_reply(&mut stream, &body)
}

fn write_reply(stream: &mut TcpStream, body: &str) -> anyhow::Result<()> {
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(response.as_bytes())
        .context("write response")?;
    Ok(())
}
