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
