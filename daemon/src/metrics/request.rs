//! The `/metrics` server's request check, pure: the bytes of a request head (up to the blank
//! line) → what to answer. Only `GET /metrics` (or `HEAD`) is served; everything else gets a
//! clear HTTP error, counted by the shell ([`crate::metrics::server`]).

/// The longest request head read, blank line included. Prometheus sends about 300 bytes
/// (request line, Host, User-Agent, Accept, Accept-Encoding, the scrape-timeout header).
pub const MAX_HEAD_BYTES: usize = 2048;

/// What to answer a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `GET /metrics`: the exposition (`head_only` for `HEAD`), in OpenMetrics if the client
    /// accepts it (Prometheus does), else in the classic text format.
    Metrics { head_only: bool, openmetrics: bool },
    /// A refusal, with its status line and counter.
    Refuse(Refusal),
}

/// Why a request was refused; each is one counter (`tdsc_metrics_http_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not an HTTP/1.x request line, or not UTF-8.
    BadRequest,
    /// A method other than GET or HEAD.
    Method,
    /// A path other than `/metrics`.
    NotFound,
    /// No blank line within [`MAX_HEAD_BYTES`].
    TooLarge,
    /// The head did not arrive in time (`crate::metrics::server::REQUEST_TIMEOUT`).
    Timeout,
    /// All connection slots were busy.
    Busy,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::BadRequest,
        Refusal::Method,
        Refusal::NotFound,
        Refusal::TooLarge,
        Refusal::Timeout,
        Refusal::Busy,
    ];

    /// The counter's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Method => "method",
            Refusal::NotFound => "not_found",
            Refusal::TooLarge => "too_large",
            Refusal::Timeout => "timeout",
            Refusal::Busy => "busy",
        }
    }

    /// The HTTP status line's code and reason.
    pub fn status(self) -> &'static str {
        match self {
            Refusal::BadRequest => "400 Bad Request",
            Refusal::Method => "405 Method Not Allowed",
            Refusal::NotFound => "404 Not Found",
            Refusal::TooLarge => "431 Request Header Fields Too Large",
            Refusal::Timeout => "408 Request Timeout",
            Refusal::Busy => "503 Service Unavailable",
        }
    }

    /// The one-line body saying what is served.
    pub fn body(self) -> &'static str {
        match self {
            Refusal::BadRequest => "not an HTTP/1.x request\n",
            Refusal::Method => "only GET and HEAD are served\n",
            Refusal::NotFound => "only /metrics is served\n",
            Refusal::TooLarge => "request head over 2048 bytes\n",
            Refusal::Timeout => "request head not received within 2 s\n",
            Refusal::Busy => "too many scrapes at once; try again\n",
        }
    }
}

/// The end of the head (the index after its blank line) in what has arrived so far.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Decides on a complete head (`head` ends with its blank line). The request line decides;
/// of the headers only `Accept` is read, for the format.
pub fn answer(head: &[u8]) -> Answer {
    let Ok(text) = std::str::from_utf8(head) else {
        return Answer::Refuse(Refusal::BadRequest);
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Answer::Refuse(Refusal::BadRequest);
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Answer::Refuse(Refusal::BadRequest);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Answer::Refuse(Refusal::Method),
    };
    // A query string (Prometheus sends none, curl users may) does not change what is served.
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Answer::Refuse(Refusal::NotFound);
    }
    let openmetrics = text.split("\r\n").skip(1).any(|h| {
        h.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    Answer::Metrics {
        head_only,
        openmetrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSIC: Answer = Answer::Metrics {
        head_only: false,
        openmetrics: false,
    };

    #[test]
    fn requests_are_answered_by_their_request_line() {
        let cases: &[(&[u8], Answer)] = &[
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", CLASSIC),
            (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", CLASSIC),
            (
                b"HEAD /metrics HTTP/1.1\r\n\r\n",
                Answer::Metrics { head_only: true, openmetrics: false },
            ),
            (
                b"GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
                Answer::Metrics { head_only: false, openmetrics: true },
            ),
            (b"GET /metrics HTTP/1.1\r\nAccept: text/plain\r\n\r\n", CLASSIC),
            (
                b"POST /metrics HTTP/1.1\r\n\r\n",
                Answer::Refuse(Refusal::Method),
            ),
            (
                b"DELETE /metrics HTTP/1.1\r\n\r\n",
                Answer::Refuse(Refusal::Method),
            ),
            (b"GET / HTTP/1.1\r\n\r\n", Answer::Refuse(Refusal::NotFound)),
            (
                b"GET /metricsx HTTP/1.1\r\n\r\n",
                Answer::Refuse(Refusal::NotFound),
            ),
            (
                b"GET /metrics HTTP/2.0\r\n\r\n",
                Answer::Refuse(Refusal::BadRequest),
            ),
            (b"GET /metrics\r\n\r\n", Answer::Refuse(Refusal::BadRequest)),
            (
                b"GET  /metrics HTTP/1.1\r\n\r\n",
                Answer::Refuse(Refusal::BadRequest),
            ),
            (
                b"GET metrics HTTP/1.1\r\n\r\n",
                Answer::Refuse(Refusal::BadRequest),
            ),
            (
                b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
                Answer::Refuse(Refusal::BadRequest),
            ),
            (b"\r\n\r\n", Answer::Refuse(Refusal::BadRequest)),
        ];
        for (head, want) in cases {
            assert_eq!(answer(head), *want, "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn the_head_ends_after_its_blank_line() {
        assert_eq!(head_end(b"GET /metrics HTTP/1.1\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
    }

    #[test]
    fn every_refusal_has_a_distinct_label_and_an_error_status() {
        let labels: std::collections::BTreeSet<_> =
            Refusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        for r in Refusal::ALL {
            assert!(
                r.status().starts_with('4') || r.status().starts_with('5'),
                "{r:?}"
            );
        }
    }
}
