#!/usr/bin/env bash
# Test of the Ansible role deploy/ansible/roles/tcp_dsc.
#
#   tests/scripts/ansible-test.sh [--deb FILE]
#
# 1. ansible-lint is clean and `ansible-playbook --syntax-check site.yml` passes.
# 2. A real run of site.yml against three Debian roots made with debootstrap (one per node,
#    over the community.general.chroot connection), with the example inventory's cluster
#    settings: the package installs, the rendered config passes `tdscd --check-config` with
#    each node's own node_id and all three [[nodes]], the sysctl file is written, tdscd and
#    tdsc-safe-rules are enabled. A second run changes nothing.
# 3. A bad inventory value (a VIP that is no address) fails the run at the template's
#    validation, naming the key, and leaves the good config in place.
#
# Needs root (prints SKIP otherwise). Changes on the host: /var/cache/tdsc-test/ (or
# $TDSC_TEST_CACHE: a venv with ansible from PyPI and cached base roots, kept between runs)
# and temporary roots under /var/tmp, deleted at exit. Nothing is started: the run sets tcp_dsc_service_state to "" and
# tcp_dsc_sysctl_set to false, so the host's kernel is never touched. The last line is
# "ansible: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

. tests/scripts/lib.sh
harness_start ansible-test ansible "$@"

cache=${TDSC_TEST_CACHE:-/var/cache/tdsc-test}
mkdir -p "$cache"

# ---- controller tools, in a venv keyed by the requirements file
req=deploy/ansible/requirements.txt
venv=$cache/ansible-venv
if ! cmp -s "$req" "$venv/.requirements" 2>/dev/null; then
  echo "== installing ansible and ansible-lint into $venv (from PyPI, once)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  cp "$req" "$venv/.requirements"
fi
export PATH="$venv/bin:$PATH"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_CHROOT_DISABLE_ROOT_CHECK=1

# ---- lint and syntax
cd "$repo/deploy/ansible"
check "ansible-lint (production profile) is clean" ansible-lint --profile production
check "ansible-playbook --syntax-check site.yml" ansible-playbook --syntax-check -i inventory.example.yml site.yml
cd "$repo"

# ---- the package
if [ -z "$deb" ]; then
  bash deploy/debian/build-deb.sh --no-build >/dev/null
  deb=$(ls -t "$repo"/target/debian/tcp-dsc_*.deb | head -1)
fi

# ---- base root with what Ansible and systemctl need (python3, python3-apt, systemd), cached
base=$cache/bookworm-minbase
abase=$cache/bookworm-ansible
if [ ! -x "$abase/usr/bin/python3" ] || [ ! -x "$abase/usr/bin/systemctl" ]; then
  if [ ! -x "$base/usr/bin/apt-get" ]; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || { echo "ansible-test: no Debian mirror in the host's apt sources" >&2; exit 1; }
    echo "== debootstrap bookworm (minbase) from $mirror into $base (once)"
    rm -rf "$base.tmp"
    debootstrap --variant=minbase bookworm "$base.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log"; exit 1; }
    mv "$base.tmp" "$base"
  fi
  echo "== adding python3, python3-apt and systemd to a copy of the base root (once)"
  rm -rf "$abase.tmp"
  cp -a "$base" "$abase.tmp"
  cp /etc/resolv.conf "$abase.tmp/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$abase.tmp/usr/sbin/policy-rc.d"
  chmod 755 "$abase.tmp/usr/sbin/policy-rc.d"
  chroot "$abase.tmp" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  chroot "$abase.tmp" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends python3 python3-apt systemd >/dev/null
  mv "$abase.tmp" "$abase"
fi

work=$(mktemp -d /var/tmp/tdsc-ansible-XXXXXX)
trap 'rm -rf "$work"' EXIT
for n in 1 2 3; do
  cp -a "$abase" "$work/node$n"
  cp /etc/resolv.conf "$work/node$n/etc/resolv.conf"
done

# One cluster key for the three nodes (in real use a vault variable).
keyhex=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')

# The example inventory's cluster settings, with chroot connections instead of SSH.
inv=$work/inventory.yml
cat >"$inv" <<EOF
all:
  children:
    tcp_dsc:
      vars:
        ansible_connection: community.general.chroot
        ansible_python_interpreter: /usr/bin/python3
        tcp_dsc_deb: $deb
        tcp_dsc_vip: 192.0.2.1
        tcp_dsc_cluster_key: "key 1 $keyhex\nsend 1"
        tcp_dsc_tcp_ports: [80, 443]
        tcp_dsc_client_interface: eth0
        tcp_dsc_cluster_interface: eth1
        tcp_dsc_cluster_mac: "02:bf:c0:00:02:01"
        tcp_dsc_election_master: 1
        tcp_dsc_health: { report_interval_ms: 200, dead_after_ms: 1000 }
        tcp_dsc_health_checks:
          - { kind: http, port: 80, path: /healthz, interval_ms: 1000, fall: 2 }
          - { kind: command, name: nginx-unit, command: [/usr/bin/systemctl, is-active, --quiet, nginx] }
        tcp_dsc_shutdown: { drain_timeout_ms: 20000 }
        tcp_dsc_flood: { syn_prefix_rate: 1000, prefix_v4: 25 }
        tcp_dsc_scheduler_extra: { affinity: client-address, affinity_timeout_ms: 60000 }
        tcp_dsc_metrics_port: 9464
        tcp_dsc_service_state: ""
        tcp_dsc_sysctl_set: false
      hosts:
        node1: { ansible_host: $work/node1, tcp_dsc_node_id: 1, tcp_dsc_cluster_address: 198.51.100.11 }
        node2: { ansible_host: $work/node2, tcp_dsc_node_id: 2, tcp_dsc_cluster_address: 198.51.100.12, tcp_dsc_threads: { data_path_cpu: 0 } }
        node3: { ansible_host: $work/node3, tcp_dsc_node_id: 3, tcp_dsc_cluster_address: 198.51.100.13 }
EOF

cd "$repo/deploy/ansible"
echo "== ansible-playbook site.yml against three debootstrap roots"
check "first run succeeds" ansible-playbook -i "$inv" site.yml
for n in 1 2 3; do
  r=$work/node$n
  check "node$n: tcp-dsc installed" bash -c 'chroot "$1" dpkg-query -W -f="\${Status}" tcp-dsc | grep -q "install ok installed"' _ "$r"
  check "node$n: /usr/sbin/tdscd runs" chroot "$r" /usr/sbin/tdscd --version
  check "node$n: rendered config passes --check-config as node $n of 3" \
    bash -c 'chroot "$1" /usr/sbin/tdscd --config /etc/tdsc/tdsc.toml --check-config | grep -qE "ok \(node $2, 3 bootstrap nodes; .*vip 192\.0\.2\.1, cluster key ids \[1\]\)"' _ "$r" "$n"
  check "node$n: the election keys reach the config (raft, data_dir, timing)" \
    bash -c 'f="$1/etc/tdsc/tdsc.toml"; grep -qx "mode = \"raft\"" "$f" && grep -qx "data_dir = \"/var/lib/tdsc\"" "$f" && grep -qx "election_tick = 10" "$f"' _ "$r"
  check "node$n: [threads] only where the host sets it (node2)" bash -c '
    f="$1/etc/tdsc/tdsc.toml"
    if [ "$2" = 2 ]; then grep -qx "\[threads\]" "$f" && grep -qx "data_path_cpu = 0" "$f"
    else ! grep -q "threads" "$f"; fi' _ "$r" "$n"
  check "node$n: the [flood] keys reach the config" bash -c '
    f="$1/etc/tdsc/tdsc.toml"
    grep -qx "\[flood\]" "$f" && grep -qx "syn_prefix_rate = 1000" "$f" && grep -qx "prefix_v4 = 25" "$f"' _ "$r"
  check "node$n: the affinity keys reach [scheduler]" bash -c '
    f="$1/etc/tdsc/tdsc.toml"
    sed -n "/^\[scheduler\]/,/^\[/p" "$f" | grep -qx "affinity = \"client-address\"" &&
    grep -qx "affinity_timeout_ms = 60000" "$f"' _ "$r"
  check "node$n: two [[health.check]] tables after [health], argv as a TOML array" bash -c '
    f="$1/etc/tdsc/tdsc.toml"
    [ "$(grep -c "^\[\[health\.check\]\]" "$f")" = 2 ] && grep -qx "path = \"/healthz\"" "$f" &&
    grep -qx "command = \[\"/usr/bin/systemctl\", \"is-active\", \"--quiet\", \"nginx\"\]" "$f" &&
    grep -qx "name = \"nginx-unit\"" "$f"' _ "$r"
  check "node$n: [metrics] listens on its cluster address" bash -c '
    f="$1/etc/tdsc/tdsc.toml"
    grep -qx "\[metrics\]" "$f" && grep -qx "listen = \"198.51.100.1$2:9464\"" "$f"' _ "$r" "$n"
  check "node$n: node_id = $n, three [[nodes]] with their addresses" bash -c '
    f="$1/etc/tdsc/tdsc.toml"
    grep -qx "node_id = $2" "$f" && [ "$(grep -c "^\[\[nodes\]\]" "$f")" = 3 ] &&
    grep -qx "address = \"198.51.100.11\"" "$f" && grep -qx "address = \"198.51.100.13\"" "$f"' _ "$r" "$n"
  check "node$n: the cluster key is installed, mode 0600, and named in the config" bash -c '
    [ "$(stat -c %a "$1/etc/tdsc/cluster.key")" = 600 ] && grep -q "^key 1 [0-9a-f]\{64\}$" "$1/etc/tdsc/cluster.key" &&
    grep -qx "key_file = \"/etc/tdsc/cluster.key\"" "$1/etc/tdsc/tdsc.toml"' _ "$r"
  check "node$n: sysctl file" bash -c '
    grep -qx "net.netfilter.nf_conntrack_tcp_loose=0" "$1/etc/sysctl.d/60-tcp-dsc.conf" &&
    grep -qx "net.netfilter.nf_conntrack_tcp_be_liberal=1" "$1/etc/sysctl.d/60-tcp-dsc.conf"' _ "$r"
  check "node$n: tdscd and tdsc-safe-rules enabled" bash -c '
    test -L "$1/etc/systemd/system/multi-user.target.wants/tdscd.service" &&
    test -L "$1/etc/systemd/system/sysinit.target.wants/tdsc-safe-rules.service"' _ "$r"
done
check "second run changes nothing" bash -c '
  out=$(ansible-playbook -i "$1" site.yml) || { printf "%s\n" "$out"; exit 1; }
  printf "%s\n" "$out" | tail -5
  ! printf "%s\n" "$out" | grep -E "^node[0-9].*changed=[1-9]"' _ "$inv"

echo "== a bad inventory value fails, naming the key"
before=$(md5sum <"$work/node1/etc/tdsc/tdsc.toml")
check "a VIP that is no address fails the run at --check-config, naming cluster.vip" bash -c '
  out=$(ansible-playbook -i "$1" site.yml --limit node1 -e tcp_dsc_vip=192.0.2.300 2>&1) && exit 1
  grep -q "cluster.vip" <<<"$out" || { printf "%s\n" "$out" | tail -20; exit 1; }' _ "$inv"
check "the node keeps its good config" bash -c '[ "$(md5sum <"$1")" = "$2" ]' _ "$work/node1/etc/tdsc/tdsc.toml" "$before"
check "a host without tcp_dsc_node_id fails the inventory check" bash -c '
  bad="${1%.yml}-bad.yml"; sed "s/, tcp_dsc_node_id: 2//" "$1" >"$bad"
  out=$(ansible-playbook -i "$bad" site.yml --limit node2 2>&1) && { echo "the run succeeded"; exit 1; }
  grep -q "tcp_dsc_node_id" <<<"$out" || { printf "%s\n" "$out" | tail -20; exit 1; }' _ "$inv"

harness_summary
