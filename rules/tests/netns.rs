//! Namespace tests: apply rulesets over netlink inside a throw-away network namespace, read
//! them back, and compare what `nft list ruleset` prints with the golden text.
//!
//! They need root; without it each prints why it is skipped and passes. Every namespace is
//! deleted by a Drop guard, also when a test fails.

mod common;

use common::{can_run_netns, golden, NetNs, COMPAT};
use tdsc_rules::{ruleset, Firewall, Role};

/// `nft list ruleset`, which ends without a trailing newline after the last table on nft
/// 1.0.6; normalised to one.
fn listing(ns: &NetNs) -> String {
    let mut text = ns.nft(&["list", "ruleset"]);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

#[test]
fn member_ruleset_lists_exactly_as_golden_and_verifies() {
    if !can_run_netns("member_ruleset_lists_exactly_as_golden_and_verifies") {
        return;
    }
    let ns = NetNs::new();
    let rs = ruleset(Role::Member, &common::spec_v4(), &COMPAT);
    ns.run(move || {
        let mut fw = Firewall::open().expect("open");
        fw.apply(&rs).expect("apply");
        fw.verify(&rs).expect("verify");
    });
    assert_eq!(listing(&ns), golden("member"));
}
