#!/usr/bin/env bash
# Continuous data protection under load (issue 7, point 8), in one run on one file system:
#  1. 4K random writes QD32 from the in-repo vhost-user front-end (`strata vhost-bench`) with no
#     snapshots, one per second and a hundred per second, side by side:
#     - `strata serve` taking them itself (`--snapshot-every 1s|10ms`), with `--no-clean` so that
#       the rows differ only by the snapshots (CLEAN=1 keeps the background cleaner on; it reclaims
#       overwritten blocks in the "none" case and backs off when snapshots pin them, bench/cleaner.sh
#       measures it);
#     - qemu-storage-daemon serving qcow2 (vhost-user-blk export, O_DIRECT, io_uring), with a QMP
#       client taking internal snapshots (`blockdev-snapshot-internal-sync`) at 1/s and at 100/s,
#       or as fast as qsd completes them when it cannot keep up.
#     Both disks are SIZE (2G) and written full first (1M sequential), so the random writes overwrite
#     data that the snapshots keep. Each case writes COUNT requests or runs DURATION seconds,
#     whichever ends first, in runs of vhost-bench of about half a second (a server whose rate
#     collapses cannot stall the script; each run gets its own random offsets, see drive);
#     IOPS = requests / the runs' own measured time.
#  2. One snapshot of a 4 GiB disk full of data: `strata snapshot create` vs `qemu-img snapshot -c`
#     on qcow2 (internal snapshot), both timed as commands (process start included).
# Environment: COUNT (400000), DURATION (15 s), SIZE (2G), CLEAN=1, QCOW2_OPTS (qemu-img create -o,
# e.g. lazy_refcounts=on; for the load cases only), STRATA_BIN, BENCH_DIR (see servers.sh).
# Prints a markdown table; writes bench/results/cdp-latest.md.
set -euo pipefail
source "$(dirname "$0")/servers.sh" cdp
count=${COUNT:-400000}
duration=${DURATION:-15}
size=${SIZE:-2G}
bytes=$(numfmt --from=iec "$size")
fill=$((bytes >> 20)) # 1M writes to fill the disk
cases=(none 1s 10ms)
declare -A label=([none]=none [1s]=1/s [10ms]=100/s) interval=([1s]=1 [10ms]=0.01)
ns() { date +%s%N; }

# Write 4K random requests QD32 to a vhost-user socket until COUNT are done or DURATION seconds
# have passed; prints "requests microseconds" (the time vhost-bench measured, summed over runs).
drive() {
  local sock=$1 done_n=0 us=0 n=500 k=0 t0 iops
  t0=$(ns)
  while ((done_n < count)) && (($(ns) - t0 < duration * 1000000000)); do
    ((n <= count - done_n)) || n=$((count - done_n))
    # vhost-bench draws offsets from a fixed seed modulo the span's blocks: a span one block
    # shorter per run gives every run its own offsets instead of repeating the first run's.
    iops=$("$strata" vhost-bench --socket "$sock" -w --pattern rand -c "$n" -d 32 --span $((bytes - 4096 * k)) --output json |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["iops"])')
    done_n=$((done_n + n)) k=$((k + 1))
    us=$((us + $(python3 -c "print(int($n * 1e6 / $iops))")))
    # Next run: about half a second at this rate, at most four times as many requests as this one.
    n=$(python3 -c "print(max(100, min(int($iops / 2), 4 * $n)))")
  done
  echo "$done_n $us"
}

# The QMP client: capabilities, then one internal snapshot every INTERVAL seconds (or back to back
# when a snapshot takes longer) until the file STOP exists; touches STOP.ready after the first one
# and prints JSON: snapshots taken, errors, its run time and the command's latency.
cat >"$work/qmp.py" <<'EOF'
import json, os, socket, sys, time
path, node, prefix, interval, stop = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
f = s.makefile("rw")
def cmd(command, **args):
    f.write(json.dumps({"execute": command, "arguments": args}) + "\n")
    f.flush()
    while True:  # skip events
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r
json.loads(f.readline())  # greeting
r = cmd("qmp_capabilities")
assert "return" in r, r
taken, errors, lat = 0, [], []
t0 = time.monotonic()
due = t0
while not os.path.exists(stop):
    now = time.monotonic()
    if now < due:
        time.sleep(min(due - now, 0.05))
        continue
    a = time.monotonic()
    r = cmd("blockdev-snapshot-internal-sync", device=node, name="%s-%d" % (prefix, taken + len(errors)))
    lat.append(time.monotonic() - a)
    if "error" in r:
        errors.append(r["error"].get("desc", str(r["error"])))
    else:
        taken += 1
        if taken == 1:
            open(stop + ".ready", "w").close()
    due = max(due + interval, time.monotonic())
lat.sort()
print(json.dumps({"taken": taken, "errors": len(errors), "first_error": errors[0] if errors else None,
                  "seconds": round(time.monotonic() - t0, 2),
                  "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else 0,
                  "max_ms": round(1000 * lat[-1], 1) if lat else 0}))
EOF

declare -A s_iops s_snaps s_secs s_req q_iops q_snaps q_secs q_req q_lat q_size
iops_of() { python3 -c "print(int($1 * 1e6 / max($2, 1)))"; }

for every in "${cases[@]}"; do
  image="$work/cdp-$every.strata"
  "$strata" create "$image" --size "$size" >/dev/null
  "$strata" bench "$image" -w --pattern seq -s 1M -c "$fill" -d 8 >/dev/null
  args=()
  [ "${CLEAN:-0}" = 1 ] || args=(--no-clean)
  [ "$every" = none ] || args+=(--snapshot-every "$every")
  t0=$(ns)
  "$strata" serve "$image" --socket "$work/$every.sock" "${args[@]}" 2>"$work/serve-$every.log" &
  pid=$!
  pids+=("$pid")
  wait_socket "$work/$every.sock"
  r=$(drive "$work/$every.sock")
  read -r req us <<<"$r"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  t1=$(ns)
  s_req[$every]=$req
  s_iops[$every]=$(iops_of "$req" "$us")
  s_secs[$every]=$(python3 -c "print(round(($t1 - $t0) / 1e9, 1))")
  s_snaps[$every]=$("$strata" snapshot list "$image" --output json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  rm -f "$image"
  echo "  strata, snapshots $every: ${s_iops[$every]} IOPS ($req requests), ${s_snaps[$every]} snapshots in ${s_secs[$every]} s" >&2
done

for every in "${cases[@]}"; do
  image="$work/cdp-$every.qcow2"
  qemu-img create -q -f qcow2 ${QCOW2_OPTS:+-o "$QCOW2_OPTS"} "$image" "$size"
  qemu-img bench -w -t none -i io_uring -s 1M -c "$fill" -d 8 "$image" >/dev/null
  sock="$work/qsd-$every.sock" mon="$work/qmp-$every.sock" stop="$work/stop-$every"
  t0=$(ns)
  "$qsd" --blockdev "driver=file,node-name=f,filename=$image,cache.direct=on,aio=io_uring" \
    --blockdev "driver=qcow2,node-name=d,file=f" \
    --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
    --chardev "socket,id=m,path=$mon,server=on,wait=off" --monitor chardev=m \
    2>"$work/qsd-$every.log" &
  pid=$!
  pids+=("$pid")
  wait_socket "$sock"
  wait_socket "$mon"
  if [ "$every" != none ]; then
    python3 "$work/qmp.py" "$mon" d "cdp-$every" "${interval[$every]}" "$stop" >"$work/qmp-$every.json" &
    qmp=$!
    for _ in $(seq 100); do [ -e "$stop.ready" ] && break; sleep 0.1; done
  fi
  r=$(drive "$sock")
  read -r req us <<<"$r"
  if [ "$every" != none ]; then
    touch "$stop"
    wait "$qmp"
    q_lat[$every]=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("p50 %s ms, max %s ms%s" % (r["p50_ms"], r["max_ms"], "; %d errors, first: %s" % (r["errors"], r["first_error"]) if r["errors"] else ""))' "$work/qmp-$every.json")
  fi
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  t1=$(ns)
  q_req[$every]=$req
  q_iops[$every]=$(iops_of "$req" "$us")
  q_secs[$every]=$(python3 -c "print(round(($t1 - $t0) / 1e9, 1))")
  q_snaps[$every]=$(qemu-img snapshot -l "$image" | tail -n +3 | wc -l)
  q_size[$every]=$(du -h --apparent-size "$image" | cut -f1)
  rm -f "$image"
  echo "  qcow2, snapshots $every: ${q_iops[$every]} IOPS ($req requests), ${q_snaps[$every]} snapshots in ${q_secs[$every]} s${q_lat[$every]:+ (${q_lat[$every]})}" >&2
done

# One snapshot of a full 4 GiB disk.
"$strata" create "$work/full.strata" --size 4G >/dev/null
"$strata" bench "$work/full.strata" -w --pattern seq -s 1M -c 4096 -d 8 >/dev/null
qemu-img create -q -f qcow2 "$work/full.qcow2" 4G
qemu-img bench -w -t none -i io_uring -s 1M -c 4096 -d 8 "$work/full.qcow2" >/dev/null
time_ms() { local t0 t1; t0=$(ns); "$@" >/dev/null; t1=$(ns); echo $(((t1 - t0) / 1000000)); }
strata_ms=$(time_ms "$strata" snapshot create "$work/full.strata" one)
qcow2_ms=$(time_ms qemu-img snapshot -c one "$work/full.qcow2")
strata2_ms=$(time_ms "$strata" snapshot create "$work/full.strata" two)
qcow22_ms=$(time_ms qemu-img snapshot -c two "$work/full.qcow2")

ratio() { python3 -c "print('%.2fx' % ($1 / max($2, 1)))"; }
rate() { python3 -c "print('%d (%.1f/s)' % ($1, $1 / max($2, 0.001)))"; }
out=bench/results/cdp-latest.md
mkdir -p bench/results
{
  echo "# Continuous data protection under load"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg); $("$qsd" --version | head -1)"
  echo "- $size disks written full first (1M sequential), 1 queue each; client: strata vhost-bench, 4K random writes QD32,"
  echo "  $count requests or $duration s per case, whichever ends first"
  echo "- strata: \`strata serve $([ "${CLEAN:-0}" = 1 ] || echo "--no-clean ")--snapshot-every 1s|10ms\`; qcow2: qemu-storage-daemon vhost-user-blk export (O_DIRECT, io_uring),"
  echo "  internal snapshots by a QMP client (\`blockdev-snapshot-internal-sync\`), paced at 1/s and 100/s, back to back when slower;"
  echo "  qcow2 created with ${QCOW2_OPTS:-default options (64 KiB clusters, lazy_refcounts=off)}"
  echo
  echo "| snapshots | strata IOPS | strata vs none | strata snapshots taken | qcow2 IOPS | qcow2 vs none | qcow2 snapshots taken | strata/qcow2 IOPS |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for every in "${cases[@]}"; do
    echo "| ${label[$every]} | ${s_iops[$every]} | $(ratio "${s_iops[$every]}" "${s_iops[none]}") | $(rate "${s_snaps[$every]}" "${s_secs[$every]}") | ${q_iops[$every]} | $(ratio "${q_iops[$every]}" "${q_iops[none]}") | $(rate "${q_snaps[$every]}" "${q_secs[$every]}") | $(ratio "${s_iops[$every]}" "${q_iops[$every]}") |"
  done
  echo
  echo "Requests written per case (strata / qcow2): $(for e in "${cases[@]}"; do printf '%s %s / %s; ' "${label[$e]}" "${s_req[$e]}" "${q_req[$e]}"; done)"
  echo "Snapshot rates are over each server's lifetime, start to kill (strata / qsd): $(for e in "${cases[@]}"; do printf '%s %s / %s s; ' "${label[$e]}" "${s_secs[$e]}" "${q_secs[$e]}"; done)"
  echo "qcow2 image size at the end: $(for e in "${cases[@]}"; do printf '%s %s; ' "${label[$e]}" "${q_size[$e]}"; done)"
  echo "blockdev-snapshot-internal-sync latency: 1/s ${q_lat[1s]}; 100/s ${q_lat[10ms]}."
  echo
  echo "One snapshot of a 4 GiB disk full of data (the command, process start included):"
  echo
  echo "| | first | second |"
  echo "|---|---:|---:|"
  echo "| strata snapshot create | ${strata_ms} ms | ${strata2_ms} ms |"
  echo "| qemu-img snapshot -c (qcow2 internal) | ${qcow2_ms} ms | ${qcow22_ms} ms |"
} >"$out"
cat "$out"
