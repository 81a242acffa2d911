//! Running one probe: the I/O of a check. Each returns `Ok` or a one-line reason.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::health::spec::Probe;

/// The most of an HTTP answer read for its status line.
const STATUS_LINE_MAX: usize = 512;

/// Runs `probe`, giving up after `timeout`.
pub async fn run(probe: &Probe, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, attempt(probe)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn attempt(probe: &Probe) -> Result<(), String> {
    match probe {
        Probe::Tcp { target } => TcpStream::connect(target)
            .await
            .map(drop)
            .map_err(|e| format!("connect {target}: {e}")),
        Probe::Http {
            target,
            path,
            host,
            expect_status,
        } => {
            let mut s = TcpStream::connect(target)
                .await
                .map_err(|e| format!("connect {target}: {e}"))?;
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: tdscd-health-check\r\n\
                 Connection: close\r\n\r\n"
            );
            s.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send to {target}: {e}"))?;
            let mut buf = vec![0u8; STATUS_LINE_MAX];
            let mut len = 0;
            // Read until the status line is complete, the answer ends, or the buffer is full.
            while len < buf.len() && !buf[..len].contains(&b'\n') {
                let n = s
                    .read(&mut buf[len..])
                    .await
                    .map_err(|e| format!("read from {target}: {e}"))?;
                if n == 0 {
                    break;
                }
                len += n;
            }
            let status = status_code(&buf[..len])
                .ok_or_else(|| format!("{target}{path}: no HTTP status line in the answer"))?;
            if status == *expect_status {
                Ok(())
            } else {
                Err(format!(
                    "{target}{path}: status {status}, expected {expect_status}"
                ))
            }
        }
        Probe::Command { argv } => {
            let (program, args) = argv.split_first().ok_or("empty command")?;
            let status = tokio::process::Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Dropped at the timeout: the child is killed, not left behind.
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("run {program}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{program}: {status}"))
            }
        }
    }
}

/// The status code of an HTTP/1.x answer's status line (`HTTP/1.1 200 OK`).
pub fn status_code(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !(version.starts_with("HTTP/1.") || version == "HTTP/2") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..=599).contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\nServer: x\r\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.1 204\r\n"), Some(204));
        for bad in [
            &b""[..],
            b"SSH-2.0-OpenSSH\r\n",
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 abc OK\r\n",
            b"HTTP/1.1 099 x\r\n",
            b"\xff\xfe",
        ] {
            assert_eq!(status_code(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn probes_against_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for answer in [
                &b"HTTP/1.1 200 OK\r\n\r\n"[..],
                b"HTTP/1.1 503 Busy\r\n\r\n",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = [0u8; 256];
                let _ = s.read(&mut req).await.unwrap();
                s.write_all(answer).await.unwrap();
            }
        });
        let http = |expect_status| Probe::Http {
            target,
            path: "/healthz".to_owned(),
            host: "localhost".to_owned(),
            expect_status,
        };
        let t = Duration::from_secs(2);
        assert_eq!(run(&http(200), t).await, Ok(()));
        let e = run(&http(200), t).await.unwrap_err();
        assert!(e.contains("status 503, expected 200"), "{e}");
        server.await.unwrap();
        // Nothing listens there any more.
        let e = run(&Probe::Tcp { target }, t).await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn commands_by_exit_status_and_killed_at_the_timeout() {
        let cmd = |argv: &[&str]| Probe::Command {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        };
        let t = Duration::from_secs(2);
        assert_eq!(run(&cmd(&["/bin/true"]), t).await, Ok(()));
        assert!(run(&cmd(&["/bin/false"]), t).await.is_err());
        assert!(run(&cmd(&["/nonexistent/x"]), t).await.is_err());
        let start = std::time::Instant::now();
        let e = run(&cmd(&["/bin/sleep", "5"]), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.contains("within 100 ms"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
