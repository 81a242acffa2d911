#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a short, bounded time (docs/fuzzing.md) and fails if
# any of them finds a crash. Installs cargo-fuzz (pinned) if missing; a tool that cannot be
# installed is a SKIP outside CI and a failure under CI=true.
#
#   tests/scripts/fuzz.sh                   # every target, TDSC_FUZZ_SECONDS (30) each
#   tests/scripts/fuzz.sh forward bus       # only these
#
# Stable toolchain, no sanitizer (`-s none`), debug assertions on (`-a`): see docs/fuzzing.md.
# Builds in fuzz/target (TDSC_FUZZ_TARGET_DIR), never in the workspace's target directory. New
# corpus entries go to fuzz/corpus/<target>/ (git ignores all but the seeds), crashes to
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

CARGO_FUZZ_VERSION=0.13.1
seconds=${TDSC_FUZZ_SECONDS:-30}
target_dir=${TDSC_FUZZ_TARGET_DIR:-$PWD/fuzz/target}

missing() {
  if [ "${CI:-}" = "true" ]; then
    echo "fuzz: FAIL: $1 (CI=true: nothing may pass unrun)" >&2
    exit 1
  fi
  echo "SKIP fuzz: $1"
  exit 0
}

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked ||
    missing "cargo-fuzz $CARGO_FUZZ_VERSION could not be installed"
fi
command -v c++ >/dev/null 2>&1 || missing "no C++ compiler for libFuzzer (apt-get install g++)"

cd fuzz
flags=(-s none -a --target-dir "$target_dir")
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
cargo fuzz build "${flags[@]}"

failed=()
for t in "${targets[@]}"; do
  echo "-- fuzz $t: ${seconds}s"
  mkdir -p "corpus/$t"
  # -timeout: an input that takes longer than 10 s is a hang, reported as a failure.
  if ! cargo fuzz run "${flags[@]}" "$t" -- -max_total_time="$seconds" -timeout=10 \
      -print_final_stats=1 2>"$target_dir/fuzz-$t.log"; then
    tail -n 40 "$target_dir/fuzz-$t.log" >&2
    failed+=("$t")
  fi
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units)' "$target_dir/fuzz-$t.log" || true
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAIL: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
