#!/usr/bin/env bash
# Builds the tcp-dsc Debian package from the workspace: target/debian/tcp-dsc_<version>_<arch>.deb
# Usage: deploy/debian/build-deb.sh [--no-build]   (--no-build: reuse target/release binaries)
# Installs cargo-deb (from crates.io, into ~/.cargo/bin) when missing; dpkg-shlibdeps
# (dpkg-dev) computes the shared-library dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  echo "build-deb: installing cargo-deb $CARGO_DEB_VERSION (compiles once, a few minutes)" >&2
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi
# --strip: [profile.release] keeps line tables (debug = 1) for backtraces in development;
# the package ships stripped binaries, as Debian policy asks.
exec cargo deb -p tdscd --strip "$@"
