#!/usr/bin/env bash
# vhost-user-blk side by side, in one run on one file system: `strata serve` vs
# qemu-storage-daemon serving qcow2 and raw, all driven by the same in-repo front-end
# (`strata vhost-bench`). Prints a markdown table with ratios; writes bench/results/vhost-latest.md.
set -euo pipefail
source "$(dirname "$0")/servers.sh" vhost
size=${SIZE:-2G}
count=${COUNT:-40000}

start_strata() {
  "$strata" create "$work/disk.strata" --size "$size" --force >/dev/null
  "$strata" serve "$work/disk.strata" --socket "$work/strata.sock" --num-queues 2 2>"$work/serve.log" &
  pids+=($!)
  wait_socket "$work/strata.sock"
}
start_qsd() { # name format file
  "$qsd" --blockdev "driver=file,node-name=f,filename=$3,cache.direct=on,aio=io_uring" \
    --blockdev "driver=$2,node-name=d,file=f" \
    --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$work/$1.sock,writable=on,num-queues=2" \
    2>"$work/$1.log" &
  pids+=($!)
  wait_socket "$work/$1.sock"
}

start_strata
qemu-img create -f qcow2 "$work/disk.qcow2" "$size" >/dev/null
start_qsd qcow2 qcow2 "$work/disk.qcow2"
qemu-img create -f raw "$work/disk.raw" "$size" >/dev/null
start_qsd raw raw "$work/disk.raw"

# Fill every disk first so that reads touch data.
for s in strata qcow2 raw; do
  "$strata" vhost-bench --socket "$work/$s.sock" -w --pattern seq -s 1M -c $(( $(numfmt --from=iec "$size") >> 20 )) -d 8 >/dev/null
done

# Each cell is the median of ROUNDS runs; within a round the three servers run back to back,
# so a burst of noise on this shared machine hits one round of all three, not one server.
rounds=${ROUNDS:-3}
rows=()
for op in read write; do
  for qd in 1 32; do
    for q in 1 2; do
      n=$count; [ "$qd" = 1 ] && n=$((count / 4))
      flag=""; [ "$op" = write ] && flag="-w"
      declare -A runs=()
      for r in $(seq "$rounds"); do
        for s in strata qcow2 raw; do
          iops=$("$strata" vhost-bench --socket "$work/$s.sock" $flag --pattern rand -c "$n" -d "$qd" --queues "$q" \
            --output json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["iops"]))')
          runs[$s]="${runs[$s]:-} $iops"
        done
        echo "  4K rand$op QD$qd ${q}q round $r:${runs[strata]##* } ${runs[qcow2]##* } ${runs[raw]##* }" >&2
      done
      line="4K rand$op QD$qd ${q}q"
      for s in strata qcow2 raw; do
        line="$line|$(python3 -c 'import statistics,sys; print(int(statistics.median(map(int, sys.argv[1:]))))' ${runs[$s]})"
      done
      unset runs
      rows+=("$line")
    done
  done
done

out=bench/results/vhost-latest.md
mkdir -p bench/results
{
  echo "# vhost-user-blk: strata serve vs qemu-storage-daemon"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; kernel $(uname -r); $(qemu-storage-daemon --version | head -1)"
  echo "- $size disks filled first; client: strata vhost-bench (the in-repo front-end), 4 KiB random requests"
  echo "- each cell: the median IOPS of $rounds rounds (the three servers back to back in each round)"
  echo
  ratio_table "${rows[@]}"
} >"$out"
cat "$out"
