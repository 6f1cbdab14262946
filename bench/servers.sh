# Sourced by the server benchmarks (vhost.sh, nbd.sh): the strata binary, a private work directory,
# removed at exit together with every server started (`pids+=($!)`), wait_socket and ratio_table.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
if [ -z "${STRATA_BIN:-}" ]; then
  swift build -c release --product strata >&2
  STRATA_BIN=.build/release/strata
fi
strata=$(realpath "$STRATA_BIN")
qsd=$(command -v qemu-storage-daemon || echo /usr/bin/qemu-storage-daemon)
work=$(mktemp -d "${BENCH_DIR:-$PWD/bench/.work}.$1.XXXX")
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_socket() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1" >&2; return 1; }

# The side-by-side table of "name|strata|qcow2|raw" rows, with the two ratios.
ratio_table() {
  echo "| workload | strata serve | qsd + qcow2 | qsd + raw | strata/qcow2 | strata/raw |"
  echo "|---|---:|---:|---:|---:|---:|"
  for r in "$@"; do
    IFS='|' read -r name a b c <<<"$r"
    printf '| %s | %s | %s | %s | %.2fx | %.2fx |\n' "$name" "$a" "$b" "$c" \
      "$(python3 -c "print($a/max($b,1))")" "$(python3 -c "print($a/max($c,1))")"
  done
}
