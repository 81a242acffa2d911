//! This node's load figure for the `least-load` policy.
//!
//! A sampler thread reads the configured [`LoadSource`] every report interval and stores the
//! figure, in milli-units, in this node's own view slot; the report task sends it on. The
//! sampler runs on its own thread because a file on a slow filesystem or an operator's
//! command may block, and reports (liveness!) must never wait for it. If a sample fails the
//! last good figure stays and the failure is logged once per kind.
//!
//! The sampler runs four times per report interval (at most every 50 ms), so the figure a
//! report carries is at most a quarter interval old. This matters: when a report arrives the
//! dispatcher forgets its in-flight count for that node, so a figure sampled long before the
//! report would omit connections dispatched meanwhile and make the node look idle again
//! (measured: with the sample taken only once per interval, `least-load` lost to
//! `least-connections` in the lab benchmark).
//!
//! Note for namespaces: `/proc/loadavg` and `/proc/pressure/cpu` belong to the kernel, not to
//! a network namespace, so nodes sharing one host (the lab) all see the same figure. The lab
//! therefore uses `load_file`, which its CGI server keeps up to date with its own busy-slot
//! and queue count.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::cluster::view::ClusterView;
use crate::config::LoadSource;
use crate::shutdown::StopFlag;

/// Why a sample failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {what}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} printed no non-negative number: {text:?}")]
    NoNumber { what: String, text: String },
}

/// The first whitespace-separated token of `text` as a non-negative decimal, in milli-units,
/// saturating at `u32::MAX`. `"1.25 0.9 …"` → 1250.
pub fn parse_milli(text: &str) -> Option<u32> {
    let v: f64 = text.split_whitespace().next()?.parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let milli = (v * 1000.0).round();
    // Clamped into u32's range first, so the cast only drops the (zero) fraction.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "clamped into u32's range first; the cast only drops the fraction"
    )]
    Some(milli.min(f64::from(u32::MAX)) as u32)
}

/// Takes one sample.
pub fn sample(source: &LoadSource) -> Result<u32, LoadError> {
    let (what, text) = match source {
        LoadSource::Loadavg => {
            let what = "/proc/loadavg".to_owned();
            let text = std::fs::read_to_string(&what).map_err(|source| LoadError::Read {
                what: what.clone(),
                source,
            })?;
            (what, text)
        }
        LoadSource::File(path) => {
            let what = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
                what: what.clone(),
                source,
            })?;
            (what, text)
        }
        LoadSource::Command(cmd) => {
            let what = format!("load_command {cmd:?}");
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map_err(|source| LoadError::Read {
                    what: what.clone(),
                    source,
                })?;
            (what, String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    parse_milli(&text).ok_or(LoadError::NoNumber { what, text })
}

/// Sampling period for a report interval: a quarter of it, at most 50 ms, at least 5 ms.
pub fn sample_period(report_interval: Duration) -> Duration {
    (report_interval / 4).clamp(Duration::from_millis(5), Duration::from_millis(50))
}

/// The sampler thread's body: samples every `interval` until `stop` (seen within one
/// interval, at most 50 ms: see [`sample_period`]).
pub fn run(source: &LoadSource, interval: Duration, view: &ClusterView, stop: &StopFlag) {
    let own = view.own();
    let mut failing = false;
    while !stop.is_set() {
        match sample(source) {
            Ok(v) => {
                own.load.store(v, Relaxed);
                failing = false;
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "load sample failed; keeping the last figure");
                failing = true;
            }
            Err(_) => {}
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_several_times_per_report() {
        assert_eq!(
            sample_period(Duration::from_millis(200)),
            Duration::from_millis(50)
        );
        assert_eq!(
            sample_period(Duration::from_millis(100)),
            Duration::from_millis(25)
        );
        assert_eq!(
            sample_period(Duration::from_secs(5)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn figures_parse_to_milli_units() {
        assert_eq!(parse_milli("1.25 0.90 0.50 2/345 6789\n"), Some(1250));
        assert_eq!(parse_milli("3"), Some(3000));
        assert_eq!(parse_milli("  0.0004"), Some(0));
        assert_eq!(parse_milli("1e12"), Some(u32::MAX));
        assert_eq!(parse_milli("-1"), None);
        assert_eq!(parse_milli("busy"), None);
        assert_eq!(parse_milli(""), None);
        assert_eq!(parse_milli("NaN"), None);
    }

    #[test]
    fn file_and_command_sources_are_read() {
        let dir = std::env::temp_dir().join(format!("tdsc-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("load");
        std::fs::write(&f, "2.5\n").unwrap();
        assert_eq!(sample(&LoadSource::File(f.clone())).unwrap(), 2500);
        assert_eq!(sample(&LoadSource::Command("echo 7".into())).unwrap(), 7000);
        assert!(matches!(
            sample(&LoadSource::Command("echo nothing".into())),
            Err(LoadError::NoNumber { .. })
        ));
        assert!(matches!(
            sample(&LoadSource::File(dir.join("absent"))),
            Err(LoadError::Read { .. })
        ));
        assert!(sample(&LoadSource::Loadavg).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
