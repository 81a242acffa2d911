#!/usr/bin/env bash
# The main job: bring up a local 3-node tcp-dsc cluster in network namespaces, send real HTTP
# traffic from two clients to the cluster IP, print which node served what, kill the elected
# master's daemon under traffic and show the takeover, tear it all down.
# Needs root. Installs its own dependencies. Extra arguments go to `tdsc-lab demo`
# (e.g. --requests 3000 --policy least-connections --election static).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/scripts/deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --workspace --release --quiet
exec target/release/tdsc-lab demo "$@"
