#!/usr/bin/env bash
# Continuous data protection under load (issue 7, point 8), in one run on one file system:
#  1. 4K random writes QD32 from the in-repo vhost-user front-end to `strata serve` with no
#     snapshots, one per second and a hundred per second (`--snapshot-every`); the ratio to "none".
#  2. One snapshot of a 4 GiB disk full of data: `strata snapshot create` vs `qemu-img snapshot -c`
#     on qcow2 (internal snapshot), both timed as commands (process start included).
# Prints a markdown table; writes bench/results/cdp-latest.md.
set -euo pipefail
source "$(dirname "$0")/servers.sh" cdp
count=${COUNT:-400000}
rows=()
for every in none 1s 10ms; do
  image="$work/cdp-$every.strata"
  "$strata" create "$image" --size 2G >/dev/null
  args=()
  [ "$every" = none ] || args=(--snapshot-every "$every")
  "$strata" serve "$image" --socket "$work/$every.sock" "${args[@]}" 2>"$work/serve-$every.log" &
  pid=$!
  pids+=("$pid")
  wait_socket "$work/$every.sock"
  iops=$("$strata" vhost-bench --socket "$work/$every.sock" -w --pattern rand -c "$count" -d 32 --output json |
    python3 -c 'import json,sys; print(int(json.load(sys.stdin)["iops"]))')
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  snaps=$("$strata" snapshot list "$image" --output json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  rows+=("$every|$iops|$snaps")
  echo "  snapshots every $every: $iops IOPS, $snaps snapshots taken" >&2
done

# One snapshot of a full 4 GiB disk.
"$strata" create "$work/full.strata" --size 4G >/dev/null
"$strata" bench "$work/full.strata" -w --pattern seq -s 1M -c 4096 -d 8 >/dev/null
qemu-img create -q -f qcow2 "$work/full.qcow2" 4G
qemu-img bench -w -t none -i io_uring -s 1M -c 4096 -d 8 "$work/full.qcow2" >/dev/null
time_ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000000)); }
strata_ms=$(time_ms "$strata" snapshot create "$work/full.strata" one)
qcow2_ms=$(time_ms qemu-img snapshot -c one "$work/full.qcow2")
strata2_ms=$(time_ms "$strata" snapshot create "$work/full.strata" two)
qcow22_ms=$(time_ms qemu-img snapshot -c two "$work/full.qcow2")

out=bench/results/cdp-latest.md
mkdir -p bench/results
{
  echo "# Continuous data protection under load"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- strata serve, 1 queue, 2 GiB image; client: strata vhost-bench, 4K random writes QD32, $count requests"
  echo
  echo "| snapshots | IOPS | ratio to none | snapshots taken |"
  echo "|---|---:|---:|---:|"
  base=""
  for r in "${rows[@]}"; do
    IFS='|' read -r every iops snaps <<<"$r"
    [ -n "$base" ] || base=$iops
    printf '| %s | %s | %.2fx | %s |\n' "$every" "$iops" "$(python3 -c "print($iops/max($base,1))")" "$snaps"
  done
  echo
  echo "One snapshot of a 4 GiB disk full of data (the command, process start included):"
  echo
  echo "| | first | second |"
  echo "|---|---:|---:|"
  echo "| strata snapshot create | ${strata_ms} ms | ${strata2_ms} ms |"
  echo "| qemu-img snapshot -c (qcow2 internal) | ${qcow2_ms} ms | ${qcow22_ms} ms |"
} >"$out"
cat "$out"
