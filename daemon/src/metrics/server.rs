//! The `/metrics` HTTP server: a small GET-only server on tokio with strict limits (one
//! request per connection, its head within [`MAX_HEAD_BYTES`] and [`REQUEST_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] at once). What to answer is [`crate::metrics::request::answer`]'s
//! decision; what to show is [`crate::metrics::exposition::render`] of one
//! [`crate::metrics::collect`] of the state `status` reads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::request::{answer, head_end, Answer, Refusal, MAX_HEAD_BYTES};
use crate::node::Shared;
use crate::shutdown::Shutdown;

/// Connections served at once; one more gets `503` and is closed. Prometheus scrapes a target
/// one request at a time, so four leave room for a second server and an operator's curl.
pub const MAX_CONNECTIONS: usize = 4;
/// How long a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client has to take the answer (about 20 KiB).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The server's own counts, shown in its output (`tdsc_metrics_http_*`); written by the
/// accept loop and its connection tasks.
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Scrapes answered with the exposition.
    pub served: AtomicU64,
    /// Requests refused, by [`Refusal`] (in [`Refusal::ALL`] order).
    pub refused: [AtomicU64; Refusal::ALL.len()],
}

impl HttpCounters {
    fn refuse(&self, r: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|x| *x == r) {
            self.refused[i].fetch_add(1, Relaxed);
        }
    }

    /// (label, count) for each refusal.
    pub fn refused_snapshot(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL
            .iter()
            .zip(&self.refused)
            .map(|(r, c)| (r.as_str(), c.load(Relaxed)))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} for metrics ([metrics] listen)")]
pub struct ListenError {
    pub address: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics address (before the node reports ready, so a taken port is an error at
/// start, not a silent absence).
pub async fn bind(address: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| ListenError { address, source })
}

/// Serves until `shutdown`, then stops accepting and waits for the connections in hand (each
/// bounded by the timeouts above).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: Shutdown) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    while conns.try_join_next().is_some() {}
                    if conns.len() >= MAX_CONNECTIONS {
                        shared.metrics_http.refuse(Refusal::Busy);
                        // Never wait on this client: one non-blocking write, then close.
                        let _ = stream.try_write(&refusal(Refusal::Busy));
                        continue;
                    }
                    let shared = shared.clone();
                    conns.spawn(async move {
                        if let Err(e) = connection(stream, &shared).await {
                            tracing::debug!(error = %e, "metrics connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = shutdown.requested() => break,
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn connection(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let c = &shared.metrics_http;
    let decided = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Answer::Refuse(Refusal::Timeout),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => Answer::Refuse(Refusal::TooLarge),
        Ok(Ok(Some(head))) => answer(&head),
    };
    let reply = match decided {
        Answer::Metrics {
            head_only,
            openmetrics,
        } => {
            c.served.fetch_add(1, Relaxed);
            let mut body = crate::metrics::exposition::render(&crate::metrics::collect(shared));
            let content_type = if openmetrics {
                OPENMETRICS
            } else {
                body = crate::metrics::exposition::to_classic(&body);
                CLASSIC
            };
            let mut reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if !head_only {
                reply.extend_from_slice(body.as_bytes());
            }
            reply
        }
        Answer::Refuse(r) => {
            c.refuse(r);
            refusal(r)
        }
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "metrics reply not taken"))?
}

/// The OpenMetrics text format `prometheus-client` writes, for clients that accept it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format ([`crate::metrics::exposition::to_classic`]), for the others.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Reads up to the blank line; `None` if none comes within [`MAX_HEAD_BYTES`] (or the client
/// closes first).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Ok(None);
        }
        let room = (MAX_HEAD_BYTES - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn refusal(r: Refusal) -> Vec<u8> {
    let body = r.body();
    format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        r.status(),
        body.len()
    )
    .into_bytes()
}
