#!/usr/bin/env bash
# Install test of the tcp-dsc Debian package, in a fresh Debian root made with debootstrap.
#
#   tests/scripts/install-test.sh [--deb FILE]
#
# Builds the .deb (deploy/debian/build-deb.sh --no-build: run after `cargo build --release`)
# unless --deb is given, runs lintian on it (no error, no warning left unexplained), then in a
# copy of a cached `debootstrap --variant=minbase bookworm` root: installs it with apt (its
# dependencies come from the Debian mirror of the host's apt sources), checks the files, the
# conffile and the units, runs `tdscd --version` and `tdscd --check-config`, installs the safe
# member ruleset in a throw-away network namespace, upgrades with an edited conffile, then
# removes and purges and checks that nothing is left behind. Then tests/scripts/systemd-test.sh
# boots the same root (plus systemd) as a container and drives the units under systemd.
#
# Needs root (prints SKIP otherwise). Changes on the host: /var/cache/tdsc-test/ (or
# $TDSC_TEST_CACHE: the cached base root, kept between runs; delete it to start afresh) and a
# temporary root under /var/tmp, deleted at exit. The last line is "install: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

. tests/scripts/lib.sh
harness_start install-test install "$@"

# ---- the package and lintian
if [ -z "$deb" ]; then
  bash deploy/debian/build-deb.sh --no-build >/dev/null
  deb=$(ls -t "$repo"/target/debian/tcp-dsc_*.deb | head -1)
fi
echo "== package $deb"
lint=$(lintian --pedantic --display-info "$deb" 2>&1 | grep -v '^running with root privileges' || true)
printf '%s\n' "$lint" | sed 's/^/     lintian: /'
check "lintian reports no error and no unexplained warning" \
  bash -c '! grep -qE "^[EW]: " <<<"$1"' _ "$lint"

# ---- the base root, cached
cache=${TDSC_TEST_CACHE:-/var/cache/tdsc-test}
base=$cache/bookworm-minbase
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
if [ ! -x "$base/usr/bin/apt-get" ]; then
  [ -n "$mirror" ] || { echo "install-test: no Debian mirror in the host's apt sources" >&2; exit 1; }
  echo "== debootstrap bookworm (minbase) from $mirror into $base (once)"
  mkdir -p "$cache"
  rm -rf "$base.tmp"
  debootstrap --variant=minbase bookworm "$base.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log"; exit 1; }
  mv "$base.tmp" "$base"
fi

root=$(mktemp -d /var/tmp/tdsc-install-XXXXXX)
cleanup() {
  umount -l "$root/proc" 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT
cp -a "$base/." "$root/"
mount -t proc proc "$root/proc"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# No service may start inside the root (policy-rc.d, and no systemd running there).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }

# Everything in the root before the package, to compare with after purge. Package databases,
# apt's caches and logs change by design and are left out.
snapshot() {
  (cd "$root" && find . -xdev \( -path ./proc -o -path ./dev -o -path ./tmp -o -path ./run \
      -o -path ./var/lib/dpkg -o -path ./var/lib/apt -o -path ./var/cache -o -path ./var/log \
      -o -path ./etc/resolv.conf -o -path ./etc/ld.so.cache \) -prune -o -print | sort)
}
snapshot >"$root.before"
trap 'cleanup; rm -f "$root.before"' EXIT

echo "== install"
cp "$deb" "$root/tmp/tcp-dsc.deb"
in_root apt-get update -qq >/dev/null 2>&1 || true
check "apt-get install ./tcp-dsc.deb (dependencies from the mirror)" \
  in_root apt-get install -y -qq --no-install-recommends /tmp/tcp-dsc.deb
check "dependencies installed: libnftnl11 libmnl0" \
  in_root dpkg-query -W -f='${Status}\n' libnftnl11 libmnl0

mode() { stat -c '%a %U' "$root$1" 2>/dev/null; }
for f in /usr/sbin/tdscd /usr/bin/tdscctl; do
  check "$f installed, mode 755 root" test "$(mode "$f")" = "755 root"
done
for f in /etc/tdsc/tdsc.toml /usr/lib/systemd/system/tdscd.service \
  /usr/lib/systemd/system/tdsc-safe-rules.service /usr/share/doc/tcp-dsc/copyright \
  /usr/share/doc/tcp-dsc/changelog.Debian.gz /usr/share/doc/tcp-dsc/README.md \
  /usr/share/doc/tcp-dsc/operating.md; do
  check "$f installed, mode 644 root" test "$(mode "$f")" = "644 root"
done
check "/etc/tdsc/tdsc.toml is a conffile" \
  bash -c 'chroot "$1" dpkg-query -W -f="\${Conffiles}\n" tcp-dsc | grep -q "^ /etc/tdsc/tdsc.toml "' _ "$root"
check "units are not enabled on install (the example config is not this cluster)" \
  bash -c '! find "$1/etc/systemd/system" -name "tdsc*" 2>/dev/null | grep -q .' _ "$root"
check "the package ships no cluster key (every cluster makes its own)" \
  bash -c '! test -e "$1/etc/tdsc/cluster.key" && ! dpkg-deb -c "$2" | grep -q "cluster.key"' _ "$root" "$deb"
check "binaries are stripped" \
  bash -c 'file -b "$1/usr/sbin/tdscd" 2>/dev/null | grep -q ", stripped" || ! readelf -S "$1/usr/sbin/tdscd" | grep -q "\.debug_line"' _ "$root"

echo "== run inside the root"
version=$(in_root tdscd --version 2>&1 || true)
check "tdscd --version runs: $version" bash -c '[[ "$1" =~ ^tdscd\ [0-9]+\.[0-9]+\.[0-9]+ ]]' _ "$version"
check "tdscctl --version runs" in_root tdscctl --version
check "tdscd --check-config /etc/tdsc/tdsc.toml" in_root tdscd --config /etc/tdsc/tdsc.toml --check-config
check "--check-config rejects a bad file, naming the key" bash -c '
  sed "s/^vip = .*/vip = \"192.0.2.300\"/" "$1/etc/tdsc/tdsc.toml" >"$1/tmp/bad.toml"
  out=$(chroot "$1" tdscd --config /tmp/bad.toml --check-config 2>&1) && exit 1
  grep -q "cluster.vip" <<<"$out"' _ "$root"
check "--check-config refuses a cluster key that others can read" bash -c '
  sed "s|^# key_file = .*|key_file = \"/tmp/open.key\"|" "$1/etc/tdsc/tdsc.toml" >"$1/tmp/open.toml"
  grep -q "^key_file = \"/tmp/open.key\"" "$1/tmp/open.toml" || exit 1
  echo "send 1" >"$1/tmp/open.key"; chmod 644 "$1/tmp/open.key"
  out=$(chroot "$1" tdscd --config /tmp/open.toml --check-config 2>&1) && exit 1
  rm -f "$1/tmp/open.key" "$1/tmp/open.toml"
  grep -q "chmod 600" <<<"$out"' _ "$root"
# The boot unit's command, with the packaged binary and libraries, in a new network namespace
# (unshare -n): the host's own firewall is never touched.
check "tdsc-safe-rules.service's commands, in a throw-away netns: member ruleset and sysctls" bash -c '
  unit="$1/usr/lib/systemd/system/tdsc-safe-rules.service"
  start=$(sed -n "s/^ExecStart=//p" "$unit"); post=$(sed -n "s/^ExecStartPost=//p" "$unit")
  [ -n "$start" ] && [ -n "$post" ] || exit 1
  unshare -n chroot "$1" /bin/sh -c "$start >/dev/null && eval \"\$0\" &&
    cat /proc/sys/net/netfilter/nf_conntrack_tcp_loose /proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal" "$post" \
    >"$1/tmp/sysctl.txt" || exit 1
  [ "$(tr "\n" " " <"$1/tmp/sysctl.txt")" = "0 1 " ] || { cat "$1/tmp/sysctl.txt"; exit 1; }
  unshare -n bash -c "chroot \"\$0\" $start >/dev/null && nft list ruleset" "$1" >"$1/tmp/rules.txt" &&
  grep -q "tcp flags syn / fin,syn,rst,ack counter packets 0 bytes 0 drop" "$1/tmp/rules.txt" &&
  ! grep -q "queue" "$1/tmp/rules.txt"' _ "$root"
if command -v systemd-analyze >/dev/null 2>&1; then
  # The minbase root has no systemd; the host's units (targets) are lent through
  # SYSTEMD_UNIT_PATH from /tmp, which the snapshot ignores. Unknown keys only warn, so any
  # output at all fails the check.
  check "systemd-analyze verify of both units in the root: no warning" bash -c '
    mkdir -p "$1/tmp/sdunits" && cp -a /usr/lib/systemd/system/. "$1/tmp/sdunits/"
    out=$(SYSTEMD_UNIT_PATH=/tmp/sdunits: systemd-analyze verify --root="$1" \
      tdscd.service tdsc-safe-rules.service 2>&1); rc=$?
    rm -rf "$1/tmp/sdunits"
    printf "%s\n" "$out"
    [ "$rc" = 0 ] && [ -z "$out" ]' _ "$root"
fi

echo "== upgrade with an edited conffile"
sed -i 's/^node_id = 1$/node_id = 2/' "$root/etc/tdsc/tdsc.toml"
up=$(mktemp -d)
dpkg-deb -R "$deb" "$up/pkg"
sed -i 's/^Version: .*/&+up1/' "$up/pkg/DEBIAN/control"
printf '# changed upstream\n' >>"$up/pkg/etc/tdsc/tdsc.toml"
dpkg-deb --root-owner-group -b "$up/pkg" "$root/tmp/tcp-dsc-up.deb" >/dev/null
rm -rf "$up"
check "upgrade (dpkg --force-confold) succeeds" \
  in_root dpkg -i --force-confold /tmp/tcp-dsc-up.deb
check "the operator's edit survives the upgrade" grep -q '^node_id = 2$' "$root/etc/tdsc/tdsc.toml"
check "the new upstream conffile is beside it as .dpkg-dist" \
  grep -q 'changed upstream' "$root/etc/tdsc/tdsc.toml.dpkg-dist"
check "the edited config still passes --check-config (node 2)" \
  bash -c 'chroot "$1" tdscd --config /etc/tdsc/tdsc.toml --check-config | grep -q "node 2"' _ "$root"

echo "== remove"
mkdir -p "$root/var/lib/tdsc" && echo raft >"$root/var/lib/tdsc/state"   # as the daemon would
check "apt-get remove tcp-dsc" in_root apt-get remove -y -qq tcp-dsc
for f in /usr/sbin/tdscd /usr/bin/tdscctl /usr/lib/systemd/system/tdscd.service \
  /usr/lib/systemd/system/tdsc-safe-rules.service /usr/share/doc/tcp-dsc; do
  check "remove deleted $f" test ! -e "$root$f"
done
check "remove keeps the conffile" test -f "$root/etc/tdsc/tdsc.toml"
check "remove keeps the state directory" test -f "$root/var/lib/tdsc/state"
check "package state is config-files" \
  bash -c 'chroot "$1" dpkg-query -W -f="\${db:Status-Status}" tcp-dsc | grep -qx config-files' _ "$root"

echo "== purge"
check "apt-get purge tcp-dsc" in_root apt-get purge -y -qq tcp-dsc
check "and its automatic dependencies" in_root apt-get autoremove --purge -y -qq
check "purge deleted /etc/tdsc" test ! -e "$root/etc/tdsc"
check "purge deleted /var/lib/tdsc" test ! -e "$root/var/lib/tdsc"
check "dpkg no longer knows tcp-dsc" bash -c '! chroot "$1" dpkg-query -W tcp-dsc 2>/dev/null' _ "$root"
rm -f "$root/tmp/"*.deb "$root/tmp/"*.toml "$root/tmp/rules.txt" "$root/tmp/sysctl.txt"
diff_out=$(diff "$root.before" <(snapshot) || true)
check "nothing is left behind: the root's files are those before the install" test -z "$diff_out"
[ -z "$diff_out" ] || printf '%s\n' "$diff_out" | head -30 | sed 's/^/     | /'

echo "== containerlab node image"
check "every COPY source of deploy/containerlab/Dockerfile exists" bash -c '
  cd "$1" && for src in $(awk "/^COPY/ {print \$2}" deploy/containerlab/Dockerfile); do
    compgen -G "$src" >/dev/null || { echo "missing: $src"; exit 1; }; done' _ "$repo"
check "the image entrypoint waits for the links and the cluster address, then runs cmd" \
  unshare -n sh -c '(sleep 0.3; ip link add eth0 type veth peer name eth1 &&
      ip addr add 198.51.100.11/24 dev eth1) &
    out=$(CLAB_INTFS_WITH_MGMT=2 TDSC_WAIT_ADDRESSES=198.51.100.11 "$0" sh -c \
      "ip -o addr show | grep -q \" 198.51.100.11/\" && echo ready")
    [ "$out" = ready ]' "$repo/deploy/containerlab/tdsc-node-entrypoint"

echo "== the package under a real systemd (tests/scripts/systemd-test.sh, in a container)"
if TDSC_BASE_ROOT=$base bash tests/scripts/systemd-test.sh --deb "$deb"; then
  ok "the package under systemd: every check passed"
else
  bad "the package under systemd: see its failures above"
fi

harness_summary
