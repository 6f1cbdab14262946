#!/usr/bin/env bash
# The cleaner in steady state (issue 7, points 7 and 8), in one run on one file system:
# `strata serve` with its background cleaner and with --no-clean, each on a full disk that the
# in-repo vhost-user front-end overwrites at random (4K, QD32) for ROUNDS slices of SLICE
# requests. After each slice: the slice's IOPS, the image's disk usage (du) and the cleaner's
# totals, from which write amplification = (guest bytes + bytes the cleaner copied) / guest bytes.
# Prints markdown tables; writes bench/results/cleaner-latest.md.
#
#   bash bench/cleaner.sh                       # 512 MiB disk, 16 slices of 65536 writes (8 overwrites)
#   SIZE=256M ROUNDS=4 SLICE=16384 bash bench/cleaner.sh
set -euo pipefail
source "$(dirname "$0")/servers.sh" cleaner
size=${SIZE:-512M}
rounds=${ROUNDS:-16}
slice=${SLICE:-65536}
bytes=$(python3 -c "import sys; u={'K':1<<10,'M':1<<20,'G':1<<30}; s=sys.argv[1]; print(int(s[:-1])*u[s[-1]])" "$size")

status() { # control socket -> "segments_freed blocks_copied"
  python3 - "$1" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"command":"status"}\n')
data = b""
while not data.endswith(b"\n"):
    data += s.recv(65536)
c = json.loads(data).get("cleaner", {})
print(c.get("segments_freed", 0), c.get("blocks_copied", 0))
EOF
}

declare -A final_iops final_du final_wa
tables=()
for mode in clean no-clean; do
  image="$work/$mode.strata"
  "$strata" create "$image" --size "$size" >/dev/null
  "$strata" bench "$image" -w --pattern seq -s 1M -c $((bytes >> 20)) -d 8 >/dev/null # full disk: all live
  args=(--control "$work/$mode.control")
  [ "$mode" = clean ] || args+=(--no-clean)
  "$strata" serve "$image" --socket "$work/$mode.sock" "${args[@]}" 2>"$work/serve-$mode.log" &
  pid=$!
  pids+=("$pid")
  wait_socket "$work/$mode.sock"
  wait_socket "$work/$mode.control"
  table="| slice | guest writes (GiB) | IOPS | disk usage (MiB) | usage / live | segments freed | write amplification |"$'\n'
  table+="|---:|---:|---:|---:|---:|---:|---:|"$'\n'
  iops_sum=0
  for r in $(seq "$rounds"); do
    iops=$("$strata" vhost-bench --socket "$work/$mode.sock" -w --pattern rand -c "$slice" -d 32 --output json |
      python3 -c 'import json,sys; print(int(json.load(sys.stdin)["iops"]))')
    iops_sum=$((iops_sum + iops))
    read -r freed copied < <(status "$work/$mode.control")
    du_bytes=$(($(du -B1 "$image" | cut -f1)))
    guest=$((r * slice * 4096))
    table+=$(python3 -c "
r, guest, iops, du, live, freed, copied = $r, $guest, $iops, $du_bytes, $bytes, $freed, $copied
print(f'| {r} | {guest / 2**30:.2f} | {iops} | {du / 2**20:.0f} | {du / live:.2f}x | {freed} | {(guest + copied * 4096) / guest:.2f} |')")$'\n'
    final_du[$mode]=$du_bytes
    final_wa[$mode]=$(python3 -c "print(f'{($guest + $copied * 4096) / $guest:.2f}')")
    echo "  $mode slice $r: $iops IOPS, du $((du_bytes >> 20)) MiB, $freed segments freed" >&2
  done
  final_iops[$mode]=$((iops_sum / rounds))
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  "$strata" check "$image" >/dev/null
  tables+=("### strata serve ($mode)"$'\n\n'"$table")
done

out=${BENCH_OUT:-bench/results/cleaner-latest.md}
mkdir -p "$(dirname "$out")"
{
  echo "# The cleaner in steady state: random overwrite of a full disk"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- $size disk written full first (all live); then $rounds slices of $slice 4K random writes, QD32,"
  echo "  1 queue, from strata vhost-bench; file system: $(df -T "$work" | awk 'NR==2 {print $2}'); check clean after each run"
  echo
  echo "| | mean IOPS | final disk usage / live | write amplification |"
  echo "|---|---:|---:|---:|"
  for mode in clean no-clean; do
    printf '| %s | %s | %.2fx | %s |\n' "$mode" "${final_iops[$mode]}" \
      "$(python3 -c "print(${final_du[$mode]} / $bytes)")" "${final_wa[$mode]}"
  done
  printf '\nIOPS with the cleaner / without: %.2fx\n\n' "$(python3 -c "print(${final_iops[clean]} / max(${final_iops[no-clean]}, 1))")"
  for t in "${tables[@]}"; do echo "$t"; done
} >"$out"
cat "$out"
