#!/usr/bin/env bash
# NBD side by side, in one run on one file system: `strata serve --nbd` vs qemu-storage-daemon's
# NBD export of qcow2 and of raw, all driven by the same third-party client (fio's nbd engine,
# libnbd). Prints a markdown table with ratios; writes bench/results/nbd-latest.md.
#
#   bash bench/nbd.sh                   # 2 GiB disks, 5 s per case, best of 2
#   SIZE=1G RUNTIME=3 REPS=1 bash bench/nbd.sh
set -euo pipefail
source "$(dirname "$0")/servers.sh" nbd
size=${SIZE:-2G}
runtime=${RUNTIME:-5}
reps=${REPS:-2}

"$strata" create "$work/disk.strata" --size "$size" --force >/dev/null
"$strata" serve "$work/disk.strata" --nbd "unix:$work/strata.nbd" 2>"$work/serve.log" &
pids+=($!)
wait_socket "$work/strata.nbd"
start_qsd() { # name format file
  "$qsd" --blockdev "driver=file,node-name=f,filename=$3,cache.direct=on,aio=io_uring" \
    --blockdev "driver=$2,node-name=d,file=f" \
    --nbd-server "addr.type=unix,addr.path=$work/$1.nbd" \
    --export "type=nbd,id=e,node-name=d,name=,writable=on" 2>"$work/$1.log" &
  pids+=($!)
  wait_socket "$work/$1.nbd"
}
qemu-img create -f qcow2 "$work/disk.qcow2" "$size" >/dev/null
start_qsd qcow2 qcow2 "$work/disk.qcow2"
qemu-img create -f raw "$work/disk.raw" "$size" >/dev/null
start_qsd raw raw "$work/disk.raw"

uri() { echo "nbd+unix:///?socket=$work/$1.nbd"; }
# One fio run; prints IOPS (4K) or MB/s (1M).
run_fio() { # target rw bs [extra fio options...]
  local target=$1 rw=$2 bs=$3
  shift 3
  fio --name=b --ioengine=nbd --uri="$(uri "$target")" --rw="$rw" --bs="$bs" --iodepth=32 --size="$size" \
    --time_based --runtime="$runtime" --ramp_time=1 --randrepeat=0 --output-format=json "$@" |
    python3 -c '
import json, sys
text = sys.stdin.read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
print(int(side["iops"]) if sys.argv[1] == "4k" else round(side["bw_bytes"] / 1e6))' "$bs"
}

# Fill every disk first so that reads touch data and writes overwrite (qcow2 allocates clusters
# on first write; this measures its steady state, which is its best case).
for s in strata qcow2 raw; do
  fio --name=fill --ioengine=nbd --uri="$(uri $s)" --rw=write --bs=1M --iodepth=8 --size="$size" >/dev/null
done

rows=()
for spec in "4K randwrite QD32:randwrite:4k" "4K randread QD32:randread:4k" \
  "1M seq write QD32 (MB/s):write:1m" "1M seq read QD32 (MB/s):read:1m"; do
  IFS=: read -r name rw bs <<<"$spec"
  declare -A best=([strata]=0 [qcow2]=0 [raw]=0)
  for _ in $(seq "$reps"); do
    for s in strata qcow2 raw; do
      v=$(run_fio "$s" "$rw" "$bs")
      ((v > best[$s])) && best[$s]=$v
    done
  done
  line="$name|${best[strata]}|${best[qcow2]}|${best[raw]}"
  echo "  $line" >&2
  rows+=("$line")
done

out=${BENCH_OUT:-bench/results/nbd-latest.md}
mkdir -p "$(dirname "$out")"
{
  echo "# NBD: strata serve --nbd vs qemu-storage-daemon --export type=nbd"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- $(qemu-storage-daemon --version | head -1); $(fio --version); file system: $(df -T "$work" | awk 'NR==2 {print $2}')"
  echo "- $size disks filled first; fio --ioengine=nbd over a Unix socket, one connection, QD32,"
  echo "  ${runtime} s per case (after 1 s ramp), best of $reps; qsd: cache.direct=on, aio=io_uring"
  echo
  ratio_table "${rows[@]}"
} >"$out"
cat "$out"
