#!/usr/bin/env bash
# Runs every tcp-dsc test: lint, docs, unit, golden, fuzz, the package, Ansible, the namespace
# end-to-end tests and the container tests. Needs root for the namespace tests: they print SKIP
# otherwise, and fail under CI=true, where nothing may pass unrun. Installs its own dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/scripts/deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

# Leftovers from an interrupted earlier run would clash with fresh labs. Test labs embed the
# creating process's pid in their names (clab-tdsc-e2e-<pid>-<n>-node1, tdsc-rules-test-<pid>-<n>):
# only those whose process is gone are removed, so a colleague's running lab survives. The
# demo lab (clab-tdsc-node1, ...) is removed only when no tdsc-lab demo is running.
stale_namespace() {
  local ns=$1 pid
  pid=$(sed -nE 's/^(clab-)?tdsc-[a-z][a-z0-9]*(-[a-z][a-z0-9]*)?-([0-9]+)-[0-9]+(-.*)?$/\3/p' <<<"$ns")
  if [ -n "$pid" ]; then
    ! kill -0 "$pid" 2>/dev/null
  else
    ! pgrep -x tdsc-lab >/dev/null
  fi
}
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^(clab-tdsc|tdsc-)' || true); do
  stale_namespace "$ns" || { echo "keeping $ns: its lab is still running"; continue; }
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
done

echo "== format and lints"
cargo fmt --all -- --check
# The fuzz crate is a workspace of its own (docs/fuzzing.md): formatted too; fuzz.sh builds it.
(cd fuzz && cargo fmt --all -- --check)
# clippy also checks the MSRV: `incompatible_msrv` refuses std APIs newer than the workspace
# rust-version that every crate inherits.
cargo clippy --workspace --all-targets --release -- -D warnings

echo "== docs (warnings are errors: broken intra-doc links fail here)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --release

echo "== build"
cargo build --workspace --release

echo "== unit, fixture and golden tests"
cargo test --workspace --release --exclude tdsc-lab

echo "== fuzz: every target for a short bounded time (docs/fuzzing.md)"
bash tests/scripts/fuzz.sh

echo "== Debian package: build, lintian, install/upgrade/remove/purge in a debootstrap root"
bash deploy/debian/build-deb.sh --no-build
deb=$(ls -t target/debian/tcp-dsc_*.deb | head -1)
bash tests/scripts/install-test.sh --deb "$deb"

echo "== Ansible role: ansible-lint, syntax check, a real run against three debootstrap roots"
bash tests/scripts/ansible-test.sh --deb "$deb"

echo "== namespace end-to-end tests (one lab at a time)"
cargo test --release -p tdsc-lab -- --test-threads=1

echo "== the containerlab topology as containers: node image, docker engine, smoke test"
bash tests/scripts/docker-test.sh --deb "$deb"
