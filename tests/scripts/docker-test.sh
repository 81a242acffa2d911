#!/usr/bin/env bash
# The containerlab topology deployed as real containers (tdsc-lab's docker engine) from the node
# image built with deploy/containerlab/Dockerfile, and its smoke test (tests/tests/docker.rs):
# 600 requests through the VIP over every node, then a SIGKILL of the master's tdscd under Raft.
#
#   tests/scripts/docker-test.sh --deb FILE        (test-all.sh runs it last)
#
# Docker: Debian's docker.io is installed if missing (its service never started), and one
# dockerd runs for the test with its own networking off and everything in a temporary directory
# (tests/scripts/lib.sh, dockerd_start). The image's base is the install test's debootstrap root
# with the package's dependencies installed from the host's mirror, cached in
# target/tdsc-test/bookworm-node; the image itself is built with --network none.
#
# The machine-wide lab lock (/run/tdsc-lab.lock) is held from before dockerd starts until after
# it stopped, and passed down to the test (TDSC_LAB_LOCK_FD). At exit, also on failure, the
# test has removed its containers, namespace links and bridge namespaces, and this script
# removes the image, stops dockerd and deletes its directory. Needs root; without it prints
# SKIP, and under CI=true fails. The last line is "docker: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
target=${CARGO_TARGET_DIR:-$repo/target}

. tests/scripts/lib.sh
harness_start docker-test docker "$@"
[ -n "$deb" ] || { echo "docker-test: --deb FILE is required" >&2; exit 2; }

# A check that cannot run: fails under CI, skips (loudly) otherwise.
cannot() {
  if [ "${CI:-}" = true ]; then bad "$1 (cannot run, and CI=true forbids skipping)"; else echo "SKIP $1"; fi
  harness_summary
  exit $?
}

docker_install || cannot "docker.io could not be installed (or installed no /usr/bin/docker)"

# ---- the image's base root and the test binary: before the lock, they need no Docker
cache=${TDSC_TEST_CACHE:-/var/cache/tdsc-test}
base=${TDSC_BASE_ROOT:-$cache/bookworm-minbase}
[ -x "$base/usr/bin/apt-get" ] || cannot "no debootstrap root at $base (install-test.sh makes it)"
noderoot=$repo/target/tdsc-test/bookworm-node
# What the Dockerfile installs besides the .deb, and the .deb's own dependencies.
derived_root "$base" "$noderoot" "libnftnl11 libmnl0 nftables iproute2 procps" \
  || cannot "node base root: apt-get failed"
httpd=$target/release/tdsc-lab-httpd
[ -x "$httpd" ] || cannot "no $httpd (cargo build --release --workspace)"
check "the smoke test builds" cargo test --release -p tdsc-lab --test docker --no-run

# ---- the lab lock, then dockerd
exec 9>/run/tdsc-lab.lock
echo "== waiting for the lab lock"
flock -w 1800 9 || cannot "the lab lock stayed taken for 30 minutes"
locked=$(date +%s)
tmp=$(mktemp -d /var/tmp/tdsc-docker-XXXXXX)
base_image=tdsc-node-base:$$
cleanup() {
  set +e
  if [ -n "$dockerd_pid" ]; then
    # The test removes its own containers; any it could not are removed here with the engine.
    "$docker" ps -aq | xargs -r "$docker" rm -f >/dev/null 2>&1
    "$docker" rmi -f tcp-dsc/node:latest "$base_image" >/dev/null 2>&1
  fi
  dockerd_stop
  rm -rf "$tmp"
  set -e
}
trap cleanup EXIT

dockerd_start "$tmp" || cannot "dockerd did not start"
check "dockerd made no bridge" bash -c '! ip link show docker0 >/dev/null 2>&1'

echo "== the node image from deploy/containerlab/Dockerfile"
tar -C "$noderoot" --exclude=./.tdsc-complete -c . | "$docker" import - "$base_image" >/dev/null
# The build context holds only what the Dockerfile copies (the repository's target/ is large).
ctx=$tmp/context
mkdir -p "$ctx/target/debian" "$ctx/target/release" "$ctx/deploy/containerlab"
cp "$deb" "$ctx/target/debian/tcp-dsc_test_amd64.deb"   # the name the COPY glob wants
cp "$httpd" "$ctx/target/release/"
cp deploy/containerlab/Dockerfile deploy/containerlab/tdsc-node-entrypoint "$ctx/deploy/containerlab/"
check "docker build --network none --build-arg BASE=<the node root> -t tcp-dsc/node:latest" \
  "$docker" build -q --network none --build-arg BASE="$base_image" -t tcp-dsc/node:latest \
    -f "$ctx/deploy/containerlab/Dockerfile" "$ctx"

echo "== deploy tdsc.clab.yml as containers; 600 requests; SIGKILL of the master"
log=$tmp/smoke.log
if TDSC_LAB_LOCK_FD=9 cargo test --release -p tdsc-lab --test docker -- --ignored --test-threads=1 \
    --nocapture >"$log" 2>&1 && grep -q "test result: ok. 1 passed" "$log"; then
  ok "the smoke test on the containers (tests/tests/docker.rs)"
  grep -oE "(600 requests|during the failover): .*" "$log" | sed 's/^/     /'
else
  bad "the smoke test on the containers (tests/tests/docker.rs)"
  # Without the backtrace's frames (RUST_BACKTRACE may be set): the error and the logs.
  grep -vE '^ +([0-9]+: |at )' "$log" | tail -60 | sed 's/^/     | /'
fi

echo "== nothing left behind"
check "no container left by the test" bash -c '[ -z "$("$0" ps -aq)" ]' "$docker"
"$docker" rmi -f tcp-dsc/node:latest "$base_image" >/dev/null
check "no image left" bash -c '[ -z "$("$0" images -aq)" ]' "$docker"
engine=$dockerd_pid
cleanup
check "dockerd stopped" bash -c '! kill -0 "$0" 2>/dev/null' "$engine"
check "no mount and no file of the engine left" bash -c '! grep -q " $0" /proc/mounts && [ ! -e "$0" ]' "$tmp"
check "no namespace of a docker lab left" bash -c '! ip netns list | grep -q "^clab-tdsc-dock-"'
check "no veth of the lab in the host namespace" \
  bash -c '! ip -o link show type veth | grep -qE " (c[12]|plain|n[123])-eth[01]@"'
check "dockerd made no bridge" bash -c '! ip link show docker0 >/dev/null 2>&1'
exec 9>&-
echo "     the lab lock was held for $(( $(date +%s) - locked )) s"

harness_summary
