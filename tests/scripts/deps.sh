#!/usr/bin/env bash
# Installs what building and testing tcp-dsc needs on a fresh Debian 12 machine (as root).
# Idempotent: installs only what is missing, and runs `apt-get update` only then.
set -euo pipefail

pkgs=(
  libnftnl-dev libmnl-dev pkg-config   # nftnl/mnl crates link against libnftnl and libmnl
  nftables                             # `nft`: golden-ruleset comparison and client-side counters in tests
  iptables                             # its xtables extensions let `nft list` show the compat NFQUEUE target (else: nothing)
  iproute2 procps kmod                 # ip netns / veth / bridge, sysctl
  ca-certificates curl
  iperf3                               # client affinity test: a real multi-connection protocol through the VIP
  g++                                  # fuzz targets: libfuzzer-sys builds libFuzzer (C++)
  dpkg-dev lintian                     # the .deb: dpkg-shlibdeps for cargo-deb, lintian
  debootstrap                          # install tests: a fresh Debian root
  python3-venv                         # Ansible role test: ansible-core and ansible-lint in a venv
  prometheus                           # metrics test: a real Prometheus scrapes the lab, promtool checks the output
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No package installed here may start a service on this host (Debian's prometheus would
  # enable and start prometheus.service on :9090): policy-rc.d refuses every start for the
  # length of this install, unless the host already has a policy of its own.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
  # A unit enabled at boot would still start it later.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled prometheus >/dev/null 2>&1; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "deps: cargo not found; install a Rust toolchain (rustup) first" >&2; exit 1; }
