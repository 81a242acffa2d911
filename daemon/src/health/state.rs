//! The rise/fall state of each check and of the node: pure, fed one probe result at a time.

/// A check's verdict on the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No probe has finished yet.
    Unknown,
    Passing,
    Failing,
}

/// What one probe result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// The check now passes (its first result, or `rise` successes after failing).
    Up,
    /// The check now fails (its first result, or `fall` failures after passing).
    Down,
}

/// One check's state.
///
/// A check starts [`Verdict::Unknown`], which counts as failing: a node whose application
/// has not answered yet takes no connections. The first result decides at once (a node
/// starting with a working application is not held back for `rise` probes); after that,
/// `fall` consecutive failures turn a passing check to failing and `rise` consecutive
/// successes turn it back, as in HAProxy and keepalived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckState {
    rise: u32,
    fall: u32,
    verdict: Verdict,
    /// Consecutive results that disagree with `verdict`.
    against: u32,
    /// The reason of the last failed probe, kept after the check recovers.
    pub last_failure: Option<String>,
    pub probes: u64,
    pub failures: u64,
}

impl CheckState {
    pub fn new(rise: u32, fall: u32) -> Self {
        CheckState {
            rise: rise.max(1),
            fall: fall.max(1),
            verdict: Verdict::Unknown,
            against: 0,
            last_failure: None,
            probes: 0,
            failures: 0,
        }
    }

    /// New run lengths (`tdscctl health set`); the verdict and the current run stay, and a
    /// run already as long as the new length decides with the next result.
    pub fn set_runs(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    pub fn passing(&self) -> bool {
        self.verdict == Verdict::Passing
    }

    /// Feeds one probe's result: `Ok` or the failure's reason.
    pub fn record(&mut self, result: Result<(), String>) -> Change {
        self.probes += 1;
        let ok = result.is_ok();
        if let Err(reason) = result {
            self.failures += 1;
            self.last_failure = Some(reason);
        }
        match (self.verdict, ok) {
            (Verdict::Unknown, true) => {
                self.verdict = Verdict::Passing;
                self.against = 0;
                Change::Up
            }
            (Verdict::Unknown, false) => {
                self.verdict = Verdict::Failing;
                self.against = 0;
                Change::Down
            }
            (Verdict::Passing, true) | (Verdict::Failing, false) => {
                self.against = 0;
                Change::None
            }
            // A result against the verdict: `fall` failures or `rise` successes in a row
            // turn it.
            (Verdict::Passing, false) | (Verdict::Failing, true) => {
                let (run, next, change) = if ok {
                    (self.rise, Verdict::Passing, Change::Up)
                } else {
                    (self.fall, Verdict::Failing, Change::Down)
                };
                self.against += 1;
                if self.against >= run {
                    self.verdict = next;
                    self.against = 0;
                    change
                } else {
                    Change::None
                }
            }
        }
    }
}

/// The node is healthy when every check passes (and when it has none).
pub fn node_healthy<'a>(checks: impl IntoIterator<Item = &'a CheckState>) -> bool {
    checks.into_iter().all(CheckState::passing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> Result<(), String> {
        Err("refused".to_owned())
    }

    #[test]
    fn the_first_result_decides_then_fall_and_rise_apply() {
        let mut c = CheckState::new(2, 3);
        assert_eq!(c.verdict(), Verdict::Unknown);
        assert!(!node_healthy([&c]), "unknown counts as failing");
        assert_eq!(c.record(Ok(())), Change::Up);
        assert_eq!(c.record(fail()), Change::None);
        assert_eq!(c.record(fail()), Change::None);
        assert_eq!(c.record(Ok(())), Change::None, "a success resets the run");
        assert_eq!(c.record(fail()), Change::None);
        assert_eq!(c.record(fail()), Change::None);
        assert!(c.passing());
        assert_eq!(c.record(fail()), Change::Down, "third failure in a row");
        assert_eq!(c.record(Ok(())), Change::None);
        assert_eq!(c.record(fail()), Change::None);
        assert_eq!(c.record(Ok(())), Change::None);
        assert_eq!(c.record(Ok(())), Change::Up, "second success in a row");
        assert_eq!((c.probes, c.failures), (11, 6));
        assert_eq!(c.last_failure.as_deref(), Some("refused"));
    }

    #[test]
    fn a_first_failure_fails_at_once_and_fall_one_is_immediate() {
        let mut c = CheckState::new(1, 1);
        assert_eq!(c.record(fail()), Change::Down);
        assert_eq!(c.record(Ok(())), Change::Up);
        assert_eq!(c.record(fail()), Change::Down);
    }

    #[test]
    fn shorter_runs_apply_from_the_next_result() {
        let mut c = CheckState::new(2, 5);
        c.record(Ok(()));
        c.record(fail());
        c.record(fail());
        c.set_runs(2, 2);
        assert!(c.passing(), "a change of fall alone decides nothing");
        assert_eq!(c.record(fail()), Change::Down, "third failure, fall now 2");
    }

    #[test]
    fn the_node_needs_every_check() {
        let mut a = CheckState::new(1, 1);
        let mut b = CheckState::new(1, 1);
        assert!(node_healthy(std::iter::empty()));
        a.record(Ok(()));
        assert!(!node_healthy([&a, &b]));
        b.record(Ok(()));
        assert!(node_healthy([&a, &b]));
        b.record(fail());
        assert!(!node_healthy([&a, &b]));
    }
}
