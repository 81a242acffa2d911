#!/usr/bin/env bash
# The tcp-dsc package under a real systemd: a container booted with /sbin/init from the install
# test's debootstrap root, the .deb installed in it as a user would, and the units driven with
# systemctl (start, restart, SIGKILL, stop, a reboot, purge).
#
#   tests/scripts/systemd-test.sh --deb FILE        (install-test.sh runs it at its end)
#
# Docker: Debian's docker.io is installed if missing, and one dockerd is started by hand for the
# test with its own networking off (--bridge=none --iptables=false --ip6tables=false
# --ip-masq=false --ip-forward=false) and its data root, exec root, pid file and socket in a
# temporary directory, so that it neither creates a bridge nor touches the host's firewall or
# sysctls. The container runs with --network none; its two links are veth pairs made by the
# test, their other ends in a network namespace of the test's own, on 192.0.2.0/24 and
# 198.51.100.0/24 only. At exit (also on failure) the container, the image, the namespace and
# the daemon are removed and the temporary directory deleted.
#
# Cache: the systemd root (the install test's base root plus systemd and the package's
# dependencies, installed from the host's Debian mirror) is kept in target/tdsc-test/ and made
# again when missing. Needs root; without it prints SKIP, and under CI=true fails. The last line
# is "systemd: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

. tests/scripts/lib.sh
harness_start systemd-test systemd "$@"
[ -n "$deb" ] || { echo "systemd-test: --deb FILE is required" >&2; exit 2; }

# A check that cannot run: fails under CI, skips (loudly) otherwise.
cannot() {
  if [ "${CI:-}" = true ]; then bad "$1 (cannot run, and CI=true forbids skipping)"; else echo "SKIP $1"; fi
  harness_summary
  exit $?
}

# ---- Docker engine (the package, never its service)
docker_install || cannot "docker.io could not be installed (or installed no /usr/bin/docker)"

# ---- the systemd root, cached under the build directory
cache=${TDSC_TEST_CACHE:-/var/cache/tdsc-test}
base=${TDSC_BASE_ROOT:-$cache/bookworm-minbase}
[ -x "$base/usr/bin/apt-get" ] || cannot "no debootstrap root at $base (install-test.sh makes it)"
sdroot=$repo/target/tdsc-test/bookworm-systemd
sdpkgs="systemd systemd-sysv dbus libnftnl11 libmnl0 nftables iproute2 procps"
derived_root "$base" "$sdroot" "$sdpkgs" || cannot "systemd root: apt-get failed"
# A container has no console to log in on, and no hardware to wait for.
for u in getty@tty1.service systemd-udevd.service systemd-udev-trigger.service \
    systemd-networkd-wait-online.service; do
  ln -sf /dev/null "$sdroot/etc/systemd/system/$u"
done

# ---- dockerd, by hand, in a temporary directory
tmp=$(mktemp -d /var/tmp/tdsc-systemd-XXXXXX)
tag=tdsc-sd-$$
image=tdsc-systemd-test:$$
peer=$tag-peer         # the test's network namespace: the far ends of the container's links
ctr=$tag
cleanup() {
  set +e
  if [ -n "$dockerd_pid" ]; then
    "$docker" rm -f "$ctr" >/dev/null 2>&1
    "$docker" rmi -f "$image" >/dev/null 2>&1
  fi
  dockerd_stop
  ip netns del "$peer" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

dockerd_start "$tmp" || cannot "dockerd did not start"
check "dockerd made no bridge" bash -c '! ip link show docker0 >/dev/null 2>&1'

echo "== image from the systemd root, container booting /sbin/init"
tar -C "$sdroot" --exclude=./.tdsc-complete -c . | "$docker" import - "$image" >/dev/null
"$docker" run -d --name "$ctr" --hostname tdsc-node --network none \
  --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined \
  --security-opt apparmor=unconfined -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
  --tmpfs /run --tmpfs /run/lock -e container=docker "$image" /sbin/init >/dev/null
in_ctr() { "$docker" exec "$ctr" "$@"; }
# systemctl is-system-running --wait: running, or degraded (a unit failed): either is booted.
booted() {
  local s
  for _ in $(seq 60); do
    s=$(in_ctr systemctl is-system-running 2>/dev/null || true)
    case "$s" in running|degraded) echo "$s"; return 0 ;; esac
    sleep 0.5
  done
  echo "${s:-no answer}"; return 1
}
state=$(booted) || { "$docker" logs "$ctr" 2>&1 | tail -20; cannot "systemd did not boot in the container ($state)"; }
ok "systemd boots as PID 1 in the container ($state)"

# The container's links: eth0 (clients, 192.0.2.0/24) and eth1 (cluster, 198.51.100.0/24),
# veth pairs whose other ends are in the test's namespace.
links() {
  local pid
  pid=$("$docker" inspect -f '{{.State.Pid}}' "$ctr")
  ip netns list | grep -qw "$peer" || { ip netns add "$peer"; ip -n "$peer" link set lo up; }
  ip -n "$peer" link del c0 2>/dev/null || true
  ip -n "$peer" link del k0 2>/dev/null || true
  ip -n "$peer" link add c0 type veth peer name eth0 netns "$pid"
  ip -n "$peer" link add k0 type veth peer name eth1 netns "$pid"
  ip -n "$peer" addr add 192.0.2.100/24 dev c0
  ip -n "$peer" addr add 198.51.100.100/24 dev k0
  ip -n "$peer" link set c0 up
  ip -n "$peer" link set k0 up
  nsenter -t "$pid" -n ip addr add 198.51.100.11/24 dev eth1
  nsenter -t "$pid" -n ip link set eth0 up
  nsenter -t "$pid" -n ip link set eth1 up
}
links

echo "== install the package"
"$docker" cp "$deb" "$ctr:/tmp/tcp-dsc.deb"
check "apt-get install ./tcp-dsc.deb in the container (dependencies already in the root)" \
  in_ctr env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends /tmp/tcp-dsc.deb
check "neither unit is enabled or started by the install" bash -c '
  ! "$0" exec "$1" systemctl is-enabled -q tdscd.service && ! "$0" exec "$1" systemctl is-active -q tdscd.service' "$docker" "$ctr"
"$docker" exec -i "$ctr" sh -c 'cat >/etc/tdsc/tdsc.toml' <<'EOF'
# One-node static cluster of the systemd test.
node_id = 1
[cluster]
vip = "192.0.2.1"
vip_prefix_len = 24
tcp_ports = [80]
client_interface = "eth0"
cluster_interface = "eth1"
cluster_mac = "02:bf:c0:00:02:01"
[election]
mode = "static"
master = 1
[shutdown]
drain_timeout_ms = 2000
[[nodes]]
id = 1
address = "198.51.100.11"
EOF

check "the package ships no cluster key" in_ctr sh -c '! test -e /etc/tdsc/cluster.key'
check "tdscctl keygen writes the cluster key (mode 0600); tdscd starts with it" \
  in_ctr sh -c 'tdscctl keygen && [ "$(stat -c %a /etc/tdsc/cluster.key)" = 600 ]'

# What tdscd changes, before it runs: the client interface's MAC, the two conntrack sysctls
# and the cluster interface's rp_filter.
host_view() {
  in_ctr sh -c 'printf "vip=%s mac=%s loose=%s liberal=%s rp=%s\n" \
    "$(ip -o addr show dev eth0 | grep -c " 192.0.2.1/24 ")" "$(cat /sys/class/net/eth0/address)" \
    "$(cat /proc/sys/net/netfilter/nf_conntrack_tcp_loose)" "$(cat /proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal)" \
    "$(cat /proc/sys/net/ipv4/conf/eth1/rp_filter)"'
}
rp_of() { sed -n 's/.* rp=\([^ ]*\).*/\1/p' <<<"$1"; }
role() { in_ctr tdscctl --socket /run/tdsc/tdscd.sock status --json 2>/dev/null | sed -n 's/.*"role": *"\([a-z]*\)".*/\1/p'; }
wait_role() {
  for _ in $(seq 100); do [ "$(role)" = "$1" ] && return 0; sleep 0.1; done
  in_ctr journalctl -u tdscd --no-pager -n 20; return 1
}
mainpid() { in_ctr systemctl show -p MainPID --value tdscd.service; }

before=$(host_view)
echo "     before tdscd: $before"
echo "== enable and start"
check "systemctl enable --now tdscd" in_ctr systemctl enable --now tdscd.service
check "tdscd.service and tdsc-safe-rules.service are active" in_ctr systemctl is-active tdscd.service tdsc-safe-rules.service
check "tdscctl status: master" wait_role master
check "the journal has the daemon's start lines" bash -c '
  j=$("$0" exec "$1" journalctl -u tdscd --no-pager); grep -q "member ruleset installed" <<<"$j" && grep -q "master path ready" <<<"$j"' "$docker" "$ctr"
check "the journal has the safe-rules unit's line" bash -c '
  "$0" exec "$1" journalctl -u tdsc-safe-rules --no-pager | grep -q "member ruleset installed (safe state)"' "$docker" "$ctr"
running=$(host_view)
check "tdscd added the VIP and set the MAC and sysctls: $running" \
  bash -c '[[ "$0" == "vip=1 mac=02:bf:c0:00:02:01 loose=0 liberal=1 rp=1" ]]' "$running"
check "Type=notify: active only after READY=1, with a watchdog" bash -c '
  [ "$("$0" exec "$1" systemctl show -p Type --value tdscd.service)" = notify ] &&
  [ "$("$0" exec "$1" systemctl show -p WatchdogUSec --value tdscd.service)" != 0 ] &&
  "$0" exec "$1" journalctl -u tdscd --no-pager | grep -q "systemd watchdog fed"' "$docker" "$ctr"

echo "== restart, SIGKILL"
pid0=$(mainpid)
check "systemctl restart tdscd" in_ctr systemctl restart tdscd.service
check "restarted (new main pid) and master again" bash -c '[ "$("$0" exec "$1" systemctl show -p MainPID --value tdscd.service)" != "$2" ]' "$docker" "$ctr" "$pid0"
wait_role master >/dev/null || true
pid1=$(mainpid)
check "systemctl kill -s KILL tdscd" in_ctr systemctl kill -s KILL tdscd.service
restarted() {
  for _ in $(seq 100); do
    p=$(mainpid); [ "$p" != 0 ] && [ "$p" != "$1" ] && in_ctr systemctl is-active -q tdscd.service && return 0
    sleep 0.1
  done
  return 1
}
check "Restart=on-failure brought it back (new main pid)" restarted "$pid1"
check "back to its role: master" wait_role master
check "the journal shows the kill and the restart" bash -c '
  "$0" exec "$1" journalctl -u tdscd --no-pager | grep -qE "(status=9/KILL|signal=KILL)"' "$docker" "$ctr"
check "ExecStopPost= undid the killed daemon's host changes from its record" bash -c '
  "$0" exec "$1" journalctl -u tdscd --no-pager | grep -q "undid what an earlier tdscd left on the host"' "$docker" "$ctr"
after_kill=$(host_view)
check "after the SIGKILL and restart: VIP, MAC and sysctls as while running" test "$after_kill" = "$running"

echo "== watchdog: a daemon that stops making progress is restarted"
wait_role master >/dev/null || true
pid2=$(mainpid)
# SIGSTOP freezes every thread, the watchdog feeder's too: no WATCHDOG=1 any more. systemd
# aborts it after WatchdogSec= (SIGABRT is held while stopped; SIGKILL after TimeoutAbortSec=).
check "kill -STOP the daemon" in_ctr kill -STOP "$pid2"
restarted_slowly() {
  for _ in $(seq 600); do
    p=$(mainpid); [ "$p" != 0 ] && [ "$p" != "$1" ] && in_ctr systemctl is-active -q tdscd.service && return 0
    sleep 0.1
  done
  return 1
}
check "the watchdog timed out and Restart=on-failure brought it back" restarted_slowly "$pid2"
check "the journal shows the watchdog timeout" bash -c '
  "$0" exec "$1" journalctl -u tdscd --no-pager | grep -qi "watchdog timeout"' "$docker" "$ctr"
check "back to its role after the watchdog restart: master" wait_role master

echo "== stop"
check "systemctl stop tdscd" in_ctr systemctl stop tdscd.service
stopped=$(host_view)
# The safe-rules unit set the sysctls to 0 and 1 before tdscd first ran (by design: the
# member ruleset relies on them), so those are what tdscd found and leaves.
check "VIP gone after crash, restart and stop: $stopped" bash -c '[[ "$0" == vip=0\ * ]]' "$stopped"
mac_of() { sed -n 's/.* mac=\([^ ]*\).*/\1/p' <<<"$1"; }
check "eth0 has its MAC from before tdscd again ($(mac_of "$before"))" \
  test "$(mac_of "$stopped")" = "$(mac_of "$before")"
check "sysctls as the safe-rules unit left them (0, 1), rp_filter as before tdscd ($(rp_of "$before"))" \
  bash -c '[[ "$0" == *"loose=0 liberal=1 rp=$1" ]]' "$stopped" "$(rp_of "$before")"
check "no host state record left" in_ctr test ! -e /run/tdsc/host.state
check "member rules left in place (the safe state)" bash -c '
  r=$("$0" exec "$1" nft list table inet tdsc) && grep -q "drop" <<<"$r" && ! grep -q "queue" <<<"$r"' "$docker" "$ctr"
check "tdsc-safe-rules.service still active" in_ctr systemctl is-active tdsc-safe-rules.service

echo "== systemd-analyze security"
for u in tdscd.service tdsc-safe-rules.service; do
  score=$(in_ctr systemd-analyze security --no-pager "$u" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: *//p')
  echo "     $u: $score"
  check "systemd-analyze security $u gives a score" test -n "$score"
done

echo "== reboot (container restart): the safe rules before the network"
in_ctr systemctl start tdscd.service || true
"$docker" restart -t 30 "$ctr" >/dev/null
state=$(booted) || true
check "systemd boots again ($state)" bash -c '[[ "$0" == running || "$0" == degraded ]]' "$state"
check "after boot, before any link exists: member ruleset installed" bash -c '
  r=$("$0" exec "$1" nft list table inet tdsc) && grep -q "drop" <<<"$r" && ! grep -q "queue" <<<"$r"' "$docker" "$ctr"
check "tdsc-safe-rules.service is ordered before network-pre.target" bash -c '
  "$0" exec "$1" systemctl show -p Before --value tdsc-safe-rules.service | tr " " "\n" | grep -qx network-pre.target' "$docker" "$ctr"
check "and became active before network-pre.target was reached" bash -c '
  a=$("$0" exec "$1" systemctl show -p ActiveEnterTimestampMonotonic --value tdsc-safe-rules.service)
  b=$("$0" exec "$1" systemctl show -p ActiveEnterTimestampMonotonic --value network-pre.target)
  [ "$a" -gt 0 ] && [ "$b" -gt 0 ] && [ "$a" -le "$b" ]' "$docker" "$ctr"
# The links die with the container's network namespace at every restart: give them again,
# then tdscd (which failed without eth0) starts as after a boot with the network up.
links
in_ctr systemctl reset-failed tdscd.service >/dev/null 2>&1 || true
check "with the links back, tdscd starts and is master" bash -c '
  "$0" exec "$1" systemctl restart tdscd.service' "$docker" "$ctr"
check "tdscctl status after the reboot: master" wait_role master

echo "== purge"
check "apt-get purge tcp-dsc" in_ctr env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tcp-dsc
check "purge stopped both units" bash -c '
  ! "$0" exec "$1" systemctl is-active -q tdscd.service && ! "$0" exec "$1" systemctl is-active -q tdsc-safe-rules.service' "$docker" "$ctr"
check "purge left no tcp-dsc table" bash -c '! "$0" exec "$1" nft list tables | grep -q tdsc' "$docker" "$ctr"
gone=$(host_view)
check "and no VIP ($gone)" bash -c '[[ "$0" == vip=0\ * ]]' "$gone"
check "purge deleted /etc/tdsc, /var/lib/tdsc and /run/tdsc" in_ctr sh -c '! test -e /etc/tdsc && ! test -e /var/lib/tdsc && ! test -e /run/tdsc'
check "systemd no longer knows the units" bash -c '
  ! "$0" exec "$1" systemctl cat tdscd.service >/dev/null 2>&1' "$docker" "$ctr"

# The containerlab node image is built and deployed by docker-test.sh.

harness_summary
