# Shared harness of the shell test scripts (install-test.sh, ansible-test.sh). Source it after
# `set -euo pipefail`; it defines:
#   harness_start NAME LABEL "$@"  parses --deb FILE into $deb, prints SKIP and exits 0 when not
#                                  root (fails under CI=true); NAME names the script in errors, LABEL starts the
#                                  summary line ("LABEL: N passed, N failed")
#   ok / bad DESCRIPTION           count one result
#   check DESCRIPTION COMMAND...   run the command, count it, show the output's tail on failure
#   harness_summary                print the summary line and return non-zero on any failure

passed=0
failed=0
deb=""
harness_label=""

harness_start() {
  local name=$1
  harness_label=$2
  shift 2
  while [ $# -gt 0 ]; do
    case "$1" in
      --deb) deb=$(realpath "$2"); shift 2 ;;
      *) echo "$name: unknown argument $1" >&2; exit 2 ;;
    esac
  done
  if [ "$(id -u)" != 0 ]; then
    # Under CI a check that cannot do its work fails; it never passes with SKIP.
    if [ "${CI:-}" = true ]; then
      echo "FAIL $name: needs root (debootstrap, chroot), and CI=true forbids skipping" >&2
      echo "$harness_label: 0 passed, 1 failed"
      exit 1
    fi
    echo "SKIP $name: needs root (debootstrap, chroot)"
    echo "$harness_label: 0 passed, 0 failed, 1 skipped"
    exit 0
  fi
}

ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
check() {
  local what=$1; shift
  local out
  if out=$("$@" 2>&1); then ok "$what"; else bad "$what"; printf '%s\n' "$out" | sed 's/^/     | /' | tail -25; fi
}

harness_summary() {
  echo "$harness_label: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

# ---- Docker, for the container tests (systemd-test.sh, docker-test.sh)
#   docker_install              installs Debian's docker.io if dockerd is missing, never starting
#                               its service; fails if there is still no dockerd or /usr/bin/docker
#   dockerd_start DIR           starts one dockerd by hand with its own networking off and its data
#                               root, exec root, pid file and socket in DIR; exports DOCKER_HOST;
#                               fails (with the log's tail) if it does not answer within 30 s
#   dockerd_stop                stops that dockerd and unmounts what it left under DIR; the
#                               caller removes its containers and images first and DIR after
#   derived_root BASE DEST PKGS a copy of the debootstrap root BASE with the Debian packages PKGS
#                               installed from the host's mirror, cached at DEST (made again when
#                               PKGS changes); fails with the apt log's tail
# Never start dockerd without those flags here: it would create docker0 on 172.17.0.0/16, set
# the host's FORWARD policy to DROP and add NAT rules (docs/platform.md). The tests' only
# networks are the veths and bridges they make, on the documentation ranges.
docker=/usr/bin/docker   # the docker.io client, whatever else is on PATH
dockerd_pid=""
dockerd_dir=""

docker_install() {
  if ! command -v dockerd >/dev/null 2>&1; then
    echo "== installing docker.io (its service is not started)"
    # No service may start on install: Debian's docker.service would start dockerd with its
    # default bridge and iptables rules. policy-rc.d forbids it (kept if one exists already).
    local own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
      own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null; } \
      || true
    if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  fi
  command -v dockerd >/dev/null 2>&1 && [ -x "$docker" ]
}

dockerd_start() {
  dockerd_dir=$1
  export DOCKER_HOST=unix://$dockerd_dir/docker.sock
  echo "== dockerd (no bridge, no iptables, no ip-forward) in $dockerd_dir"
  dockerd --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
    --data-root "$dockerd_dir/data" --exec-root "$dockerd_dir/exec" --pidfile "$dockerd_dir/docker.pid" \
    --host "$DOCKER_HOST" >"$dockerd_dir/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 150); do
    "$docker" info >/dev/null 2>&1 && return 0
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.2
  done
  tail -20 "$dockerd_dir/dockerd.log"
  return 1
}

dockerd_stop() {
  if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
    kill "$dockerd_pid"
    for _ in $(seq 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$dockerd_pid" 2>/dev/null || true
  fi
  dockerd_pid=""
  # Mounts dockerd may have left (overlay layers, its netns files) before DIR goes.
  if [ -n "$dockerd_dir" ]; then
    grep -o " $dockerd_dir[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  fi
}

derived_root() {
  local base=$1 dest=$2 pkgs=$3 rc=0
  # The marker holds the package list: a changed list makes the root again.
  [ "$(cat "$dest/.tdsc-complete" 2>/dev/null)" = "$pkgs" ] && return 0
  echo "== root: $base + $pkgs -> $dest (once)"
  # A run killed while building left proc mounted there: never rm -rf into it.
  umount -l "$dest/proc" 2>/dev/null || true
  rm -rf "$dest"
  mkdir -p "$dest"
  cp -a "$base/." "$dest/"
  cp /etc/resolv.conf "$dest/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$dest/usr/sbin/policy-rc.d" && chmod 755 "$dest/usr/sbin/policy-rc.d"
  mount -t proc proc "$dest/proc"
  in_root() { chroot "$dest" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
  # shellcheck disable=SC2086 # the package list is split on purpose
  { in_root apt-get update -qq && in_root apt-get install -y -qq --no-install-recommends $pkgs; } \
    >"$dest.log" 2>&1 || rc=$?
  in_root apt-get clean || true
  umount -l "$dest/proc"
  rm -f "$dest/usr/sbin/policy-rc.d"
  : >"$dest/etc/resolv.conf"
  if [ "$rc" != 0 ]; then tail -20 "$dest.log"; rm -rf "$dest"; return 1; fi
  echo "$pkgs" >"$dest/.tdsc-complete"
}
