#!/usr/bin/env bash
# Snapshot creation cost against the number of existing snapshots (issue 7, point 1):
# for 1, 1k, 100k and 1M existing snapshots, a fresh image is prefilled (`--prefill`), then
#   - one serial client creates SERIAL durable snapshots (each waits for its sync), and
#   - 16 clients create PARALLEL durable snapshots (group commit shares the syncs), and
#   - one client creates SERIAL snapshots without waiting for syncs (--no-wait): the in-memory
#     cost per snapshot, which must not grow with the number of existing snapshots;
# plus the raw write+fdatasync rate of the disk (fio) that bounds the serial client.
# Prints a markdown table and writes it, with the machine, to bench/results/snapshots.md.
#
# Environment: STRATA_BIN (default .build/release/strata), BENCH_DIR (default
# bench/.work-snapshots), COUNTS (default "1 1000 100000 1000000"), SERIAL (2000),
# PARALLEL (20000).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${STRATA_BIN:-.build/release/strata}"
dir="${BENCH_DIR:-bench/.work-snapshots}"
counts="${COUNTS:-1 1000 100000 1000000}"
serial="${SERIAL:-2000}"
parallel="${PARALLEL:-20000}"
out="bench/results/snapshots.md"
[ -x "$bin" ] || swift build -c release --product strata
mkdir -p "$dir" bench/results
trap 'rm -rf "$dir"' EXIT

fsync_rate=$(fio --name=sync --directory="$dir" --rw=write --bs=4k --size=8M --fdatasync=1 --direct=1 \
  --output-format=json 2>/dev/null | jq '.jobs[0].write.iops | floor')

rows=""
for n in $counts; do
  img="$dir/s$n.strata"
  "$bin" create "$img" --size 4G --force >/dev/null
  s=$("$bin" bench snapshots "$img" --prefill "$n" --count "$serial" --clients 1 --output json)
  p=$("$bin" bench snapshots "$img" --count "$parallel" --clients 16 --output json)
  c=$("$bin" bench snapshots "$img" --count "$parallel" --clients 1 --no-wait --output json)
  row=$(jq -r -n --argjson s "$s" --argjson p "$p" --argjson c "$c" --arg n "$n" '
    "| \($n) | \($s.prefill_seconds * 100 | round / 100) | \($s.open_seconds * 1e5 | round / 100) | \($s.catalog_pages_read_at_open) | \($s.list_seconds * 1e5 | round / 100) | \($s.per_second | round) | \($s.no_sync_p50_us * 10 | round / 10) | \($s.no_sync_p99_us * 10 | round / 10) | \($s.no_sync_mean_us * 10 | round / 10) | \($p.per_second | round) | \($p.latency_p50_us | round) | \($p.latency_p99_us | round) | \($p.no_sync_p50_us * 10 | round / 10) | \($p.no_sync_p99_us * 10 | round / 10) | \($c.no_sync_p50_us * 100 | round / 100) | \($c.no_sync_mean_us * 100 | round / 100) | \($c.no_sync_p99_us * 10 | round / 10) | \($c.per_second | round) |"')
  rows+="$row"$'\n'
  rm -f "$img"
done

{
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- disk: $(df --output=source,fstype "$dir" | tail -1 | xargs); 4K write+fdatasync (fio, O_DIRECT): ${fsync_rate}/s"
  echo "- strata: $(git rev-parse --short HEAD); serial runs $serial snapshots, parallel runs $parallel with 16 clients"
  echo
  echo "| existing | prefill s | open ms | pages read at open | list 100 ms | serial durable /s | serial no-sync p50 us | p99 us | mean us | 16 clients durable /s | p50 us | p99 us | no-sync p50 us | no-sync p99 us | no-wait p50 us | mean us | p99 us | no-wait /s |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s' "$rows"
} | tee "$out"
