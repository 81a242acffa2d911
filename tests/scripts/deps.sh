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
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "deps: cargo not found; install a Rust toolchain (rustup) first" >&2; exit 1; }
