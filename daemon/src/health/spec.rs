//! `[[health.check]]`: what each application check probes, and how often.
//!
//! Integers are read as i64 so that a negative or oversized value gets an error naming the
//! key and its range, rather than serde's (as everywhere in [`crate::config`]).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// At most this many checks per node (each is one probe per interval).
pub const MAX_CHECKS: usize = 16;
/// `interval_ms` default: HAProxy's `inter` (2 s).
pub const DEFAULT_INTERVAL_MS: i64 = 2_000;
/// `timeout_ms` default.
pub const DEFAULT_TIMEOUT_MS: i64 = 1_000;
/// `rise` default: HAProxy's.
pub const DEFAULT_RISE: i64 = 2;
/// `fall` default: HAProxy's.
pub const DEFAULT_FALL: i64 = 3;
/// Shortest `interval_ms`; a probe more often than this costs more than it tells.
pub const MIN_INTERVAL_MS: i64 = 10;
/// Longest `interval_ms` and `timeout_ms`: an hour.
pub const MAX_INTERVAL_MS: i64 = 3_600_000;
/// Largest `rise` and `fall`.
pub const MAX_RUN: i64 = 100;
/// Longest HTTP `path` and `host`.
const MAX_TEXT: usize = 1024;

/// One `[[health.check]]` table as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub address: Option<String>,
    pub port: Option<i64>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expect_status: Option<i64>,
    pub command: Option<Vec<String>>,
    pub interval_ms: Option<i64>,
    pub timeout_ms: Option<i64>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
}

/// What one check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection to `target` is accepted.
    Tcp { target: SocketAddr },
    /// `GET path` to `target` (HTTP/1.0, `Host: host`) answers with status `expect_status`.
    Http {
        target: SocketAddr,
        path: String,
        host: String,
        expect_status: u16,
    },
    /// The program (run without a shell, stdin/stdout/stderr closed) exits with status 0.
    Command { argv: Vec<String> },
}

/// One validated check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// Unique among the node's checks; names it in `status`, logs and metrics.
    pub name: String,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a failed check back.
    pub rise: u32,
    /// Consecutive failures that fail a passing check.
    pub fall: u32,
}

impl CheckSpec {
    /// The longest a failure of the application can go unnoticed by this check: `fall`
    /// probes, the first of which may start just before the failure, each taking up to the
    /// timeout.
    pub fn detection_window(&self) -> Duration {
        self.interval * self.fall + self.timeout
    }
}

/// A change of a running check's timing (`tdscctl health set`); what is not given stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimingChange {
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

impl TimingChange {
    /// The checks that need no check: something is changed, each value in its key's range.
    pub fn validate(&self) -> Result<(), String> {
        if *self == TimingChange::default() {
            return Err("nothing to change: give interval_ms, timeout_ms, rise or fall".into());
        }
        let within = |key: &str, v: Option<u64>, lo: i64, hi: i64| match v {
            Some(v) if !(lo..=hi).contains(&i64::try_from(v).unwrap_or(i64::MAX)) => {
                Err(format!("{key} {v} is outside {lo}..={hi}"))
            }
            _ => Ok(()),
        };
        within(
            "interval_ms",
            self.interval_ms,
            MIN_INTERVAL_MS,
            MAX_INTERVAL_MS,
        )?;
        within("timeout_ms", self.timeout_ms, 1, MAX_INTERVAL_MS)?;
        within("rise", self.rise.map(u64::from), 1, MAX_RUN)?;
        within("fall", self.fall.map(u64::from), 1, MAX_RUN)?;
        Ok(())
    }

    /// `spec` with the change; refused if the timeout would exceed the interval.
    pub fn apply(&self, spec: &CheckSpec) -> Result<CheckSpec, String> {
        self.validate()?;
        let mut s = spec.clone();
        if let Some(v) = self.interval_ms {
            s.interval = Duration::from_millis(v);
        }
        if let Some(v) = self.timeout_ms {
            s.timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.rise {
            s.rise = v;
        }
        if let Some(v) = self.fall {
            s.fall = v;
        }
        if s.timeout > s.interval {
            return Err(format!(
                "check {:?}: timeout {} ms would exceed its interval {} ms",
                s.name,
                s.timeout.as_millis(),
                s.interval.as_millis()
            ));
        }
        Ok(s)
    }
}

fn bad(i: usize, key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("health.check[{i}].{key}"),
        problem: problem.into(),
    }
}

fn ranged(
    i: usize,
    key: &str,
    v: Option<i64>,
    default: i64,
    lo: i64,
    hi: i64,
) -> Result<i64, ConfigError> {
    let v = v.unwrap_or(default);
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(bad(i, key, format!("{v} is outside {lo}..={hi}")))
    }
}

fn millis(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

/// Validates every `[[health.check]]` (index `i` names it in errors as `health.check[i]`).
pub fn validate(raw: &[RawCheck]) -> Result<Vec<CheckSpec>, ConfigError> {
    if raw.len() > MAX_CHECKS {
        return Err(ConfigError::Invalid {
            key: "health.check".to_owned(),
            problem: format!("{} checks; at most {MAX_CHECKS}", raw.len()),
        });
    }
    let mut names = BTreeSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let spec = one(i, r)?;
        if !names.insert(spec.name.clone()) {
            return Err(bad(
                i,
                "name",
                format!("{:?} names another check too", spec.name),
            ));
        }
        out.push(spec);
    }
    Ok(out)
}

fn one(i: usize, r: &RawCheck) -> Result<CheckSpec, ConfigError> {
    let kind = r
        .kind
        .as_deref()
        .ok_or_else(|| bad(i, "kind", "missing; \"tcp\", \"http\" or \"command\""))?;
    let net_only = |key: &str, set: bool| -> Result<(), ConfigError> {
        if set {
            return Err(bad(i, key, format!("does not apply to kind = {kind:?}")));
        }
        Ok(())
    };
    let target = |default_name: &str| -> Result<SocketAddr, ConfigError> {
        let address: IpAddr = match &r.address {
            None => Ipv4Addr::LOCALHOST.into(),
            Some(a) => a
                .parse()
                .map_err(|_| bad(i, "address", format!("{a:?} is not an IP address")))?,
        };
        if address.is_unspecified() || address.is_multicast() {
            return Err(bad(i, "address", format!("{address} cannot be probed")));
        }
        let port = r.port.ok_or_else(|| {
            bad(
                i,
                "port",
                format!("missing (a {default_name} check connects to it)"),
            )
        })?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(i, "port", format!("{port} is outside 1..=65535")))?;
        Ok(SocketAddr::new(address, port))
    };
    let probe = match kind {
        "tcp" => {
            net_only("path", r.path.is_some())?;
            net_only("host", r.host.is_some())?;
            net_only("expect_status", r.expect_status.is_some())?;
            net_only("command", r.command.is_some())?;
            Probe::Tcp {
                target: target("tcp")?,
            }
        }
        "http" => {
            net_only("command", r.command.is_some())?;
            let target = target("http")?;
            let path = r.path.clone().unwrap_or_else(|| "/".to_owned());
            if !path.starts_with('/') || path.len() > MAX_TEXT || !printable(&path) {
                return Err(bad(
                    i,
                    "path",
                    format!(
                        "{path:?} is not an absolute path of printable characters without spaces"
                    ),
                ));
            }
            let host = match &r.host {
                Some(h) => h.clone(),
                None => match target.ip() {
                    IpAddr::V4(a) => a.to_string(),
                    IpAddr::V6(a) => format!("[{a}]"),
                },
            };
            if host.is_empty() || host.len() > MAX_TEXT || !printable(&host) {
                return Err(bad(i, "host", format!("{host:?} is not a host name")));
            }
            let status = r.expect_status.unwrap_or(200);
            let expect_status = u16::try_from(status)
                .ok()
                .filter(|s| (100..=599).contains(s))
                .ok_or_else(|| bad(i, "expect_status", format!("{status} is outside 100..=599")))?;
            Probe::Http {
                target,
                path,
                host,
                expect_status,
            }
        }
        "command" => {
            for (key, set) in [
                ("address", r.address.is_some()),
                ("port", r.port.is_some()),
                ("path", r.path.is_some()),
                ("host", r.host.is_some()),
                ("expect_status", r.expect_status.is_some()),
            ] {
                net_only(key, set)?;
            }
            let argv = r.command.clone().unwrap_or_default();
            let Some(program) = argv.first() else {
                return Err(bad(
                    i,
                    "command",
                    "missing or empty; e.g. [\"/usr/bin/systemctl\", \"is-active\", \"nginx\"]",
                ));
            };
            if !PathBuf::from(program).is_absolute() {
                return Err(bad(
                    i,
                    "command",
                    format!("{program:?} is not an absolute path (no shell and no PATH search)"),
                ));
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(bad(i, "command", "an argument contains a NUL byte"));
            }
            Probe::Command { argv }
        }
        other => {
            return Err(bad(
                i,
                "kind",
                format!("unknown kind {other:?}; expected \"tcp\", \"http\" or \"command\""),
            ))
        }
    };
    let interval = ranged(
        i,
        "interval_ms",
        r.interval_ms,
        DEFAULT_INTERVAL_MS,
        MIN_INTERVAL_MS,
        MAX_INTERVAL_MS,
    )?;
    let timeout = ranged(
        i,
        "timeout_ms",
        r.timeout_ms,
        DEFAULT_TIMEOUT_MS.min(interval),
        1,
        interval,
    )?;
    let rise = ranged(i, "rise", r.rise, DEFAULT_RISE, 1, MAX_RUN)?;
    let fall = ranged(i, "fall", r.fall, DEFAULT_FALL, 1, MAX_RUN)?;
    let name = match &r.name {
        Some(n)
            if n.is_empty()
                || n.len() > 64
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) =>
        {
            return Err(bad(
                i,
                "name",
                format!("{n:?}: 1 to 64 of A-Z a-z 0-9 - _ . :"),
            ));
        }
        Some(n) => n.clone(),
        None => match &probe {
            Probe::Tcp { target } => format!("tcp:{}", target.port()),
            Probe::Http { target, .. } => format!("http:{}", target.port()),
            Probe::Command { .. } => format!("command:{i}"),
        },
    };
    Ok(CheckSpec {
        name,
        probe,
        interval: millis(interval),
        timeout: millis(timeout),
        rise: u32::try_from(rise).unwrap_or(1),
        fall: u32::try_from(fall).unwrap_or(1),
    })
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Vec<CheckSpec>, ConfigError> {
        #[derive(Deserialize)]
        struct T {
            check: Vec<RawCheck>,
        }
        let t: T = toml::from_str(text).expect("toml");
        validate(&t.check)
    }

    fn err(text: &str) -> String {
        check(text).expect_err("should be refused").to_string()
    }

    #[test]
    fn a_timing_change_keeps_what_it_does_not_name_and_refuses_what_cannot_be() {
        let c = check("[[check]]\nkind = \"tcp\"\nport = 80\n").unwrap();
        let faster = TimingChange {
            interval_ms: Some(100),
            timeout_ms: Some(50),
            ..TimingChange::default()
        };
        let s = faster.apply(&c[0]).unwrap();
        assert_eq!(
            (s.interval, s.timeout, s.rise, s.fall),
            (Duration::from_millis(100), Duration::from_millis(50), 2, 3)
        );
        let e = TimingChange {
            interval_ms: Some(100),
            ..TimingChange::default()
        }
        .apply(&c[0])
        .unwrap_err();
        assert!(
            e.contains("timeout 1000 ms would exceed its interval 100 ms"),
            "{e}"
        );
        for (bad, says) in [
            (TimingChange::default(), "nothing to change"),
            (
                TimingChange {
                    interval_ms: Some(9),
                    ..faster
                },
                "interval_ms 9 is outside 10..=",
            ),
            (
                TimingChange {
                    timeout_ms: Some(0),
                    ..faster
                },
                "timeout_ms 0 is outside 1..=",
            ),
            (
                TimingChange {
                    rise: Some(0),
                    ..faster
                },
                "rise 0 is outside 1..=100",
            ),
            (
                TimingChange {
                    fall: Some(101),
                    ..faster
                },
                "fall 101 is outside 1..=100",
            ),
            (
                TimingChange {
                    interval_ms: Some(u64::MAX),
                    ..faster
                },
                "is outside 10..=3600000",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn each_kind_with_its_defaults() {
        let c = check(
            "[[check]]\nkind = \"tcp\"\nport = 80\n\
             [[check]]\nkind = \"http\"\nport = 8080\naddress = \"::1\"\npath = \"/healthz\"\n\
             [[check]]\nname = \"nginx\"\nkind = \"command\"\ncommand = [\"/bin/true\"]\ninterval_ms = 500\n",
        )
        .unwrap();
        assert_eq!(c[0].name, "tcp:80");
        assert_eq!(
            c[0].probe,
            Probe::Tcp {
                target: "127.0.0.1:80".parse().unwrap()
            }
        );
        assert_eq!(
            (c[0].interval, c[0].timeout, c[0].rise, c[0].fall),
            (Duration::from_secs(2), Duration::from_secs(1), 2, 3)
        );
        assert_eq!(c[0].detection_window(), Duration::from_secs(7));
        assert_eq!(
            c[1].probe,
            Probe::Http {
                target: "[::1]:8080".parse().unwrap(),
                path: "/healthz".to_owned(),
                host: "[::1]".to_owned(),
                expect_status: 200
            }
        );
        assert_eq!(c[2].name, "nginx");
        // The timeout defaults to no more than the interval.
        assert_eq!(c[2].timeout, Duration::from_millis(500));
    }

    #[test]
    fn bad_checks_are_refused_naming_the_key() {
        for (text, key) in [
            ("[[check]]\nport = 80", "health.check[0].kind"),
            (
                "[[check]]\nkind = \"udp\"\nport = 80",
                "health.check[0].kind",
            ),
            ("[[check]]\nkind = \"tcp\"", "health.check[0].port"),
            (
                "[[check]]\nkind = \"tcp\"\nport = 0",
                "health.check[0].port",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 70000",
                "health.check[0].port",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\naddress = \"x\"",
                "health.check[0].address",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\naddress = \"0.0.0.0\"",
                "health.check[0].address",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\npath = \"/\"",
                "health.check[0].path",
            ),
            (
                "[[check]]\nkind = \"http\"\nport = 80\npath = \"x\"",
                "health.check[0].path",
            ),
            (
                "[[check]]\nkind = \"http\"\nport = 80\npath = \"/a b\"",
                "health.check[0].path",
            ),
            (
                "[[check]]\nkind = \"http\"\nport = 80\nhost = \"a\\r\\nX: y\"",
                "health.check[0].host",
            ),
            (
                "[[check]]\nkind = \"http\"\nport = 80\nexpect_status = 99",
                "health.check[0].expect_status",
            ),
            ("[[check]]\nkind = \"command\"", "health.check[0].command"),
            (
                "[[check]]\nkind = \"command\"\ncommand = []",
                "health.check[0].command",
            ),
            (
                "[[check]]\nkind = \"command\"\ncommand = [\"true\"]",
                "health.check[0].command",
            ),
            (
                "[[check]]\nkind = \"command\"\ncommand = [\"/bin/true\"]\nport = 1",
                "health.check[0].port",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\ninterval_ms = 5",
                "health.check[0].interval_ms",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\ninterval_ms = 100\ntimeout_ms = 200",
                "health.check[0].timeout_ms",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\nrise = 0",
                "health.check[0].rise",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\nfall = -1",
                "health.check[0].fall",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\nname = \"a b\"",
                "health.check[0].name",
            ),
            (
                "[[check]]\nkind = \"tcp\"\nport = 80\n[[check]]\nkind = \"tcp\"\nport = 80",
                "health.check[1].name",
            ),
        ] {
            let msg = err(text);
            assert!(msg.starts_with(key), "{text:?}: {msg}");
        }
        let many =
            "[[check]]\nkind = \"command\"\ncommand = [\"/bin/true\"]\n".repeat(MAX_CHECKS + 1);
        assert!(err(&many).starts_with("health.check:"));
    }

    #[test]
    fn unknown_keys_are_a_syntax_error() {
        assert!(toml::from_str::<RawCheck>("kind = \"tcp\"\nprot = 80").is_err());
    }
}
