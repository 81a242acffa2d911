//! Long-lived connections that stream both ways, for tests that must show established
//! connections surviving a failover, a node loss or a restart.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};

use crate::netns;

/// What one long-lived connection saw.
#[derive(Debug)]
pub struct StreamResult {
    /// The node that served it (from the echo greeting).
    pub node: u32,
    /// Echo round trips that came back intact.
    pub rounds: u64,
    /// Why it stopped, if it did.
    pub error: Option<String>,
}

/// Opens `n` echo connections to `vip` from namespace `ns` and streams both ways (32 bytes
/// out, the same 32 back, every 20 ms) until `stop`; `progress` counts round trips.
pub fn stream_from(
    ns: &str,
    vip: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<anyhow::Result<Vec<StreamResult>>, netns::NetnsError>> {
    netns::spawn_in(ns, move || {
        let mut conns = Vec::new();
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            s.write_all(b"GET /__echo HTTP/1.0\r\n\r\n")?;
            // Headers and "node=N\n".
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            let greeted = |h: &[u8]| {
                h.windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .is_some_and(|end| h.len() > end + 4 && h.ends_with(b"\n"))
            };
            while !greeted(&head) {
                ensure!(s.read(&mut b)? == 1, "echo connection closed early");
                head.push(b[0]);
            }
            let text = String::from_utf8_lossy(&head);
            let node = text
                .lines()
                .find_map(|l| l.strip_prefix("node="))
                .and_then(|v| v.trim().parse().ok())
                .context("no node= in echo greeting")?;
            conns.push((
                s,
                StreamResult {
                    node,
                    rounds: 0,
                    error: None,
                },
            ));
        }
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (s, r) in conns.iter_mut().filter(|(_, r)| r.error.is_none()) {
                seq += 1;
                let out = [seq.to_be_bytes(); 4].concat();
                let mut back = [0u8; 32];
                let res = s.write_all(&out).and_then(|()| s.read_exact(&mut back));
                match res {
                    Ok(()) if back[..] == out[..] => {
                        r.rounds += 1;
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(()) => r.error = Some("echo came back different".into()),
                    Err(e) => r.error = Some(e.to_string()),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(conns.into_iter().map(|(_, r)| r).collect())
    })
}
