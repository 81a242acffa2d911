//! Golden rulesets: the generated `nft` text for each case is checked in under
//! `tests/golden/`. Run with `UPDATE_GOLDEN=1` to rewrite the files after an intended change,
//! then review the diff.

mod common;

#[test]
fn golden_rulesets_match() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for (stem, rs) in common::golden_cases() {
        let text = rs.to_nft_text();
        let path = common::golden_path(stem);
        if update {
            std::fs::write(&path, &text).expect("write golden file");
            continue;
        }
        let want = common::golden(stem);
        if text != want {
            failures.push(format!(
                "--- {stem}: expected\n{want}\n+++ {stem}: generated\n{text}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatch (UPDATE_GOLDEN=1 regenerates):\n{}",
        failures.join("\n")
    );
}

#[test]
fn generation_is_deterministic() {
    let a: Vec<String> = common::golden_cases()
        .into_iter()
        .map(|(_, rs)| rs.to_nft_text())
        .collect();
    let b: Vec<String> = common::golden_cases()
        .into_iter()
        .map(|(_, rs)| rs.to_nft_text())
        .collect();
    assert_eq!(a, b);
}
