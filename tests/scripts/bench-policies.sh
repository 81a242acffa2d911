#!/usr/bin/env bash
# The policy benchmark in one command (paper Table 4, Fig. 8/9): builds, runs
# `tdsc-lab bench-policies --baselines` (every policy, then HAProxy leastconn and xt_cluster,
# at 70 % and 90 % of capacity), then plots into docs/bench-policies/. About 8 minutes.
# Root (namespaces). Installs haproxy, iptables, python3-venv (apt) if missing, and matplotlib
# (pip, in a venv under /tmp).
# Extra arguments go to `tdsc-lab bench-policies` (e.g. --seconds 10).
# What it changes: namespaces clab-polbench-* and /tmp/polbench, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/scripts/deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
# haproxy and iptables (xt_cluster baseline), python3-venv (plots): only what is missing.
missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v iptables >/dev/null || missing+=(iptables)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if [ ! -x /tmp/tdsc-plot-venv/bin/python ]; then
  python3 -m venv /tmp/tdsc-plot-venv
  /tmp/tdsc-plot-venv/bin/pip install -q matplotlib
fi
cargo build --release --workspace
out=docs/bench-policies
mkdir -p "$out"
./target/release/tdsc-lab --lab-name polbench bench-policies --baselines --out "$out" "$@" | tee "$out/output.txt"
/tmp/tdsc-plot-venv/bin/python tests/scripts/plot-bench-policies.py "$out"
