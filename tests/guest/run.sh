#!/usr/bin/env bash
# Real-guest test of `strata serve`: boots a Linux guest in QEMU (TCG) on a vhost-user-blk
# socket served by strata, runs fio with verification, writes a marker and exercises discard and
# write-zeroes inside the guest; meanwhile the host takes a snapshot and grows the disk through
# the control socket, and the guest must see the new capacity live and use it; boots a second
# guest on the same server (reconnect, with packed virtqueues) that reads everything back; then stops the server and
# checks the image (and the snapshot) from the host.
# See tests/guest/README.md.
#
# Usage (as root, or with sudo available, on Debian 12):  bash tests/guest/run.sh
# Exit status 0 on PASS, non-zero on FAIL. Everything it starts is stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE="$HERE/.cache"

# ---- Tunables (environment) ------------------------------------------------------------------
QEMU_TIMEOUT=${QEMU_TIMEOUT:-300}        # seconds per boot (QEMU is killed after that)
FIO_JOB_MB=${FIO_JOB_MB:-32}             # MiB written and verified by each fio job (each phase)
FIO_JOBS=${FIO_JOBS:-2}                  # fio jobs; with 2 vCPUs each job is pinned to one CPU,
                                         # so both virtqueues carry I/O
FIO_QD=${FIO_QD:-32}                     # iodepth of the second (libaio) phase
GUEST_CPUS=${GUEST_CPUS:-2}
NUM_QUEUES=${NUM_QUEUES:-2}
IMAGE_BYTES=$((1 << 30))                 # 1 GiB image
RESIZED_BYTES=$((IMAGE_BYTES + (64 << 20))) # grown live, through the control socket
MARKER_OFFSET=$((700 * 1024 * 1024 + 3 * 4096)) # past the fio area, 4 KiB aligned (O_DIRECT)
MARKER_LEN=$((1024 * 1024))
ZERO_OFFSET=$((800 * 1024 * 1024))       # 3 MiB: discard, write-zeroes and write-zeroes+unmap
BUILD_TIMEOUT=${BUILD_TIMEOUT:-3600}
# STRATA_SCRATCH_PATH: optional `swift build --scratch-path` (default: the package's .build).
# KEEP_WORK=1: keep the temporary directory (image, logs) even on success.
# SHOW_IMAGE=1: print the image's info, snapshots and map at the end (scripts/demo.sh).

# ---- Bookkeeping -----------------------------------------------------------------------------
T0=$SECONDS
WORK=""
SERVE_PID=""
QEMU_PID=""     # the `timeout` process wrapping QEMU
results=()
failed=0
log() { printf '[guest-test %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
pass() { results+=("PASS  $*"); log "PASS: $*"; }
fail() { results+=("FAIL  $*"); failed=1; log "FAIL: $*"; }
die() { fail "$*"; exit 1; }

stop_pid() { # stop_pid PID NAME: SIGTERM, then SIGKILL after 10 s
  local pid=$1 name=$2 i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  log "$name (pid $pid) ignored SIGTERM; SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

stop_qemu() {
  [ -n "$QEMU_PID" ] || return 0
  local child
  child=$(cat "/proc/$QEMU_PID/task/$QEMU_PID/children" 2>/dev/null || true)
  stop_pid "$QEMU_PID" "timeout/QEMU"
  for c in $child; do stop_pid "$c" "QEMU"; done
}

show_tail() { # show_tail FILE TITLE [LINES]
  [ -s "$1" ] || return 0
  echo "----- $2 ($1, last ${3:-40} lines) -----" >&2
  tail -n "${3:-40}" "$1" | tr -d '\r' >&2
}

on_exit() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  stop_qemu
  stop_pid "$SERVE_PID" "strata serve"
  [ "$rc" -eq 0 ] || failed=1
  ((${#results[@]})) || results+=("FAIL  (nothing ran)")
  if ((failed)) && [ -n "$WORK" ]; then
    show_tail "$WORK/serve.log" "strata serve log" 60
    for f in "$WORK"/qemu-*.err; do show_tail "$f" "QEMU stderr" 40; done
    for f in "$WORK"/console-*.log; do show_tail "$f" "guest console" 80; done
  fi
  echo "==================== strata guest test summary ====================" >&2
  printf '%s\n' "${results[@]}" >&2
  if ((failed)); then
    echo "RESULT: FAIL   ($((SECONDS - T0)) s; logs and image kept in ${WORK:-<none>})" >&2
    exit 1
  fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then
    echo "RESULT: PASS   ($((SECONDS - T0)) s; work directory kept: $WORK)" >&2
  else
    [ -n "$WORK" ] && rm -rf "$WORK"
    echo "RESULT: PASS   ($((SECONDS - T0)) s)" >&2
  fi
  exit 0
}
trap on_exit EXIT
trap 'fail "interrupted by a signal"; exit 130' INT TERM

# ---- 0. Host dependencies --------------------------------------------------------------------
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
packages=(qemu-system-x86 busybox-static fio kmod cpio zstd xz-utils util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# shellcheck source=../../scripts/setup.sh
source "$ROOT/scripts/setup.sh" # build dependencies of strata; puts swift on PATH
for t in qemu-system-x86_64 fio busybox modinfo cpio zstd timeout; do
  command -v "$t" >/dev/null || [ -x "/bin/$t" ] || die "missing tool: $t"
done

# ---- 1. Build strata -------------------------------------------------------------------------
build_args=(--product strata)
[ -z "${STRATA_SCRATCH_PATH:-}" ] || build_args+=(--scratch-path "$STRATA_SCRATCH_PATH")
log "building strata (swift build ${build_args[*]})"
if ! (cd "$ROOT" && timeout "$BUILD_TIMEOUT" swift build "${build_args[@]}" >"/tmp/strata-guest-build.$$.log" 2>&1); then
  tail -n 40 "/tmp/strata-guest-build.$$.log" >&2
  die "swift build failed (log /tmp/strata-guest-build.$$.log)"
fi
rm -f "/tmp/strata-guest-build.$$.log"
bin_args=(--show-bin-path)
[ -z "${STRATA_SCRATCH_PATH:-}" ] || bin_args+=(--scratch-path "$STRATA_SCRATCH_PATH")
STRATA="$(cd "$ROOT" && swift build "${bin_args[@]}")/strata"
[ -x "$STRATA" ] || die "built binary not found at $STRATA"
pass "build strata ($((SECONDS - T0)) s)"

# ---- 2. Kernel + initrd (cached) -------------------------------------------------------------
# Load order resolved with `modinfo -F depends`; checked again below against the kernel used.
MODULES="virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci virtio_blk"

# The guest's /init (busybox sh). Per-run settings come from /run.conf, in a small cpio archive
# appended to the cached initrd together with /marker.bin.
guest_init() {
  cat <<'INIT'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
say() { echo "GUEST: $*"; }
finish() {
  say "GUEST_DONE"
  sync
  poweroff -f
  sleep 30 # not reached; if poweroff fails, init exits, the kernel panics and QEMU (-no-reboot) exits
  exit 1
}
if [ ! -r /run.conf ]; then say "NO_RUN_CONF"; finish; fi
. /run.conf
say "kernel $(uname -r), $(nproc) cpu(s)"

for m in $MODULES; do
  insmod "/lib/modules/$m.ko" || say "MODULE_FAIL $m"
done
i=0
while [ ! -e /sys/block/vda/size ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -e /sys/block/vda/size ]; then say "NO_VDA"; finish; fi
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done

sectors=$(cat /sys/block/vda/size)
if [ "$sectors" = "$EXPECT_SECTORS" ]; then
  say "CAPACITY_OK sectors=$sectors"
else
  say "CAPACITY_BAD sectors=$sectors expected=$EXPECT_SECTORS"
fi
say "vda: hw queues=$(ls /sys/block/vda/mq 2>/dev/null | wc -l)" \
  "write_cache=\"$(cat /sys/block/vda/queue/write_cache 2>/dev/null)\"" \
  "serial=\"$(cat /sys/block/vda/serial 2>/dev/null)\"" \
  "ro=$(cat /sys/block/vda/ro 2>/dev/null)" \
  "discard_max=$(cat /sys/block/vda/queue/discard_max_bytes 2>/dev/null)" \
  "write_zeroes_max=$(cat /sys/block/vda/queue/write_zeroes_max_bytes 2>/dev/null)"

cd /tmp
pin=""
ncpu=$(nproc)
if [ "$ncpu" -ge 2 ] && [ "$FIO_JOBS" -ge 2 ]; then
  pin="--cpus_allowed=0-$((ncpu - 1)) --cpus_allowed_policy=split"
fi
bs=4096
K=262144
M=1048576
vq_interrupts() { # interrupts per virtqueue (MSI-X vector "virtioN-req.Q"), summed over CPUs
  say "VQ_INTERRUPTS $(grep -E 'virtio[0-9]+-req\.[0-9]+' /proc/interrupts |
    awk '{ n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; printf "%s=%d ", $NF, n }')"
}
read_back() { # read_back OFFSET LENGTH FILE: O_DIRECT read after dropping caches
  sync
  echo 3 >/proc/sys/vm/drop_caches
  dd if=/dev/vda of="$3" bs=$bs skip=$(($1 / bs)) count=$(($2 / bs)) iflag=direct 2>>/tmp/dd.err
}

if [ "$MODE" = write ]; then
  # The job definitions ($FIO_PSYNC, $FIO_QDEPTH) come from run.conf: the second boot and the
  # host replay the same jobs with --verify_only.
  say "fio phase 1: psync, 4 KiB"
  # shellcheck disable=SC2086
  fio --filename=/dev/vda $FIO_PSYNC $pin --direct=1 --do_verify=1 --end_fsync=1
  rc=$?
  if [ $rc -eq 0 ]; then say "FIO_VERIFY_OK"; else say "FIO_VERIFY_FAIL rc=$rc"; fi
  say "fio phase 2: libaio, 4-256 KiB"
  # shellcheck disable=SC2086
  fio --filename=/dev/vda $FIO_QDEPTH $pin --direct=1 --do_verify=1 --end_fsync=1
  rc=$?
  if [ $rc -eq 0 ]; then say "FIO_QD_VERIFY_OK"; else say "FIO_QD_VERIFY_FAIL rc=$rc"; fi
  vq_interrupts

  # The marker: bytes made on the host, written at a known offset and read back with O_DIRECT
  # after dropping caches; the second boot and the host read them again.
  if dd if=/marker.bin of=/dev/vda bs=$bs seek=$((MARKER_OFFSET / bs)) count=$((MARKER_LEN / bs)) \
    oflag=direct conv=notrunc,fsync 2>/tmp/dd.err; then
    read_back "$MARKER_OFFSET" "$MARKER_LEN" /tmp/readback
    if cmp -s /marker.bin /tmp/readback; then
      say "MARKER_READBACK_OK sha256=$(sha256sum </marker.bin | cut -d' ' -f1)"
    else
      say "MARKER_READBACK_BAD marker=$(sha256sum </marker.bin | cut -d' ' -f1) read=$(sha256sum </tmp/readback | cut -d' ' -f1)"
    fi
  else
    say "MARKER_WRITE_FAIL $(cat /tmp/dd.err)"
  fi

  # Discard, write-zeroes (no unmap) and write-zeroes with unmap, each on 512 KiB in the middle
  # of a 1 MiB copy of the marker; the whole 3 MiB must then read as /expect-zero.bin.
  zok=1
  for i in 0 1 2; do
    dd if=/marker.bin of=/dev/vda bs=$bs seek=$(((ZERO_OFFSET + i * M) / bs)) oflag=direct conv=notrunc 2>>/tmp/z.err || zok=0
  done
  blkdiscard -o $((ZERO_OFFSET + K)) -l $((2 * K)) /dev/vda 2>>/tmp/z.err || { zok=0; say "DISCARD_FAIL"; }
  ul-fallocate -z -o $((ZERO_OFFSET + M + K)) -l $((2 * K)) /dev/vda 2>>/tmp/z.err || { zok=0; say "WRITE_ZEROES_FAIL"; }
  ul-fallocate -p -o $((ZERO_OFFSET + 2 * M + K)) -l $((2 * K)) /dev/vda 2>>/tmp/z.err || { zok=0; say "WRITE_ZEROES_UNMAP_FAIL"; }
  read_back "$ZERO_OFFSET" $((3 * M)) /tmp/zread || zok=0
  if [ $zok -eq 1 ] && cmp -s /expect-zero.bin /tmp/zread; then
    say "ZERO_OPS_OK"
  else
    say "ZERO_OPS_BAD $(cmp /expect-zero.bin /tmp/zread 2>&1) $(cat /tmp/z.err | tr '\n' ' ')"
  fi

  # Live resize: the host snapshots and grows the disk through strata's control socket when it
  # sees this line; the new capacity must show up here without a reboot, and its end be usable.
  say "READY_FOR_RESIZE"
  i=0
  while [ "$(cat /sys/block/vda/size)" != "$RESIZED_SECTORS" ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i + 1)); done
  now=$(cat /sys/block/vda/size)
  if [ "$now" = "$RESIZED_SECTORS" ]; then
    say "RESIZE_SEEN sectors=$now"
    tail_offset=$((RESIZED_SECTORS * 512 - MARKER_LEN))
    dd if=/marker.bin of=/dev/vda bs=$bs seek=$((tail_offset / bs)) oflag=direct conv=notrunc,fsync 2>/tmp/dd.err
    read_back "$tail_offset" "$MARKER_LEN" /tmp/tailread
    if cmp -s /marker.bin /tmp/tailread; then say "RESIZE_WRITE_OK"; else say "RESIZE_WRITE_BAD $(cat /tmp/dd.err)"; fi
  else
    say "RESIZE_BAD sectors=$now expected=$RESIZED_SECTORS"
  fi
else
  # Second boot, after the front-end reconnected: everything the first boot wrote reads back.
  say "fio re-verify (read only)"
  # shellcheck disable=SC2086
  fio --filename=/dev/vda $FIO_PSYNC $pin --direct=1 --verify_only && fio --filename=/dev/vda $FIO_QDEPTH $pin --direct=1 --verify_only
  rc=$?
  if [ $rc -eq 0 ]; then say "FIO_REVERIFY_OK"; else say "FIO_REVERIFY_FAIL rc=$rc"; fi
  vq_interrupts
  read_back "$MARKER_OFFSET" "$MARKER_LEN" /tmp/readback
  if cmp -s /marker.bin /tmp/readback; then say "MARKER_REREAD_OK"; else say "MARKER_REREAD_BAD"; fi
  read_back "$ZERO_OFFSET" $((3 * M)) /tmp/zread
  if cmp -s /expect-zero.bin /tmp/zread; then say "ZERO_REREAD_OK"; else say "ZERO_REREAD_BAD"; fi
fi
sync
finish
INIT
}

build_guest() { # build_guest KEY_DIR: downloads the kernel, stages and packs the initrd
  local out=$1 stage tmp deb kdir m f dep lib
  tmp=$(mktemp -d "$CACHE/build.XXXXXX")
  stage="$tmp/stage"
  log "building the guest kernel + initrd in $out (one time; cached)"
  (cd "$tmp" && apt-get download -q "$KPKG" >/dev/null 2>"$tmp/download.err") \
    || { cat "$tmp/download.err" >&2; rm -rf "$tmp"; die "apt-get download $KPKG failed"; }
  deb=$(ls "$tmp"/*.deb)
  dpkg-deb -x "$deb" "$tmp/kernel"
  kdir=$(ls -d "$tmp"/kernel/lib/modules/*/)
  # Merged-/usr layout, like Debian 12, so libraries land on the paths ldd prints.
  mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib/modules,usr/lib64,proc,sys,dev,tmp}
  ln -s usr/bin "$stage/bin"; ln -s usr/sbin "$stage/sbin"
  ln -s usr/lib "$stage/lib"; ln -s usr/lib64 "$stage/lib64"
  # Modules, decompressed; each one's dependencies must come earlier in $MODULES.
  local loaded=" "
  for m in $MODULES; do
    f=$(find "$kdir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n 1)
    [ -n "$f" ] || { rm -rf "$tmp"; die "module $m not found in $KPKG"; }
    case "$f" in
      *.xz) xz -dc "$f" >"$stage/usr/lib/modules/$m.ko" ;;
      *.zst) zstd -qdc "$f" >"$stage/usr/lib/modules/$m.ko" ;;
      *.gz) gzip -dc "$f" >"$stage/usr/lib/modules/$m.ko" ;;
      *) cp "$f" "$stage/usr/lib/modules/$m.ko" ;;
    esac
    for dep in $(modinfo -F depends "$stage/usr/lib/modules/$m.ko" | tr ',' ' '); do
      case "$loaded" in *" $dep "*) ;; *) rm -rf "$tmp"; die "module $m needs $dep, not loaded before it" ;; esac
    done
    loaded="$loaded$m "
  done
  # busybox (static) and its applets.
  cp /bin/busybox "$stage/usr/bin/busybox"
  for f in $("$stage/usr/bin/busybox" --list-full); do # bin/sh, sbin/insmod, usr/bin/awk, ...
    [ -e "$stage/$f" ] || [ -L "$stage/$f" ] || ln -s /usr/bin/busybox "$stage/$f"
  done
  # fio and every library ldd names, at the same paths.
  cp "$(command -v fio)" "$stage/usr/bin/fio"
  for lib in $(ldd "$(command -v fio)" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}'); do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
  done
  # util-linux fallocate (busybox's has no -z/-p): FALLOC_FL_ZERO_RANGE and PUNCH_HOLE on /dev/vda
  # become virtio-blk WRITE_ZEROES without and with the UNMAP flag.
  cp /usr/bin/fallocate "$stage/usr/bin/ul-fallocate"
  for lib in $(ldd /usr/bin/fallocate | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}'); do
    mkdir -p "$stage$(dirname "$lib")"
    [ -e "$stage$lib" ] || cp -L "$lib" "$stage$lib"
  done
  chroot "$stage" /usr/bin/ul-fallocate --version >/dev/null || { rm -rf "$tmp"; die "fallocate does not run in the staged initrd"; }
  chroot "$stage" /usr/bin/fio --version >/dev/null || { rm -rf "$tmp"; die "fio does not run in the staged initrd"; }
  chroot "$stage" /usr/bin/busybox true || { rm -rf "$tmp"; die "busybox does not run in the staged initrd"; }
  guest_init >"$stage/init"
  chmod 755 "$stage/init"
  # zstd: the kernel (CONFIG_RD_ZSTD) unpacks it much faster than gzip under TCG. Padded to a
  # 512-byte multiple so the per-run cpio can be appended (the kernel skips zero padding).
  (cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | zstd -q -T0 -3 >"$tmp/initrd.zst"
  truncate --size=%512 "$tmp/initrd.zst"
  mkdir -p "$out"
  cp "$tmp/kernel/boot/vmlinuz-"* "$out/vmlinuz"
  mv "$tmp/initrd.zst" "$out/initrd.zst"
  echo "$KEY_TEXT" >"$out/key.txt"
  rm -rf "$tmp"
}

mkdir -p "$CACHE"
KMETA=linux-image-cloud-amd64
KIMAGE=$(apt-cache depends "$KMETA" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}' || true)
if [ -z "$KIMAGE" ]; then
  $SUDO apt-get update -qq
  KIMAGE=$(apt-cache depends "$KMETA" | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$KIMAGE" ] || die "cannot resolve $KMETA to a kernel package"
KPKG="$KIMAGE-unsigned"
apt-cache show "$KPKG" >/dev/null 2>&1 || KPKG="$KIMAGE"
KVER=$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2}')
KEY_TEXT="kernel=$KPKG=$KVER busybox=$(dpkg-query -W -f='${Version}' busybox-static) fio=$(dpkg-query -W -f='${Version}' fio) modules=$MODULES init=$(guest_init | sha256sum | cut -c1-16) util-linux=$(dpkg-query -W -f='${Version}' util-linux) fmt=2"
KEY=$(printf '%s' "$KEY_TEXT" | sha256sum | cut -c1-16)
GUEST_DIR="$CACHE/guest-$KEY"
if [ -s "$GUEST_DIR/vmlinuz" ] && [ -s "$GUEST_DIR/initrd.zst" ]; then
  log "using cached guest $GUEST_DIR ($KPKG $KVER)"
else
  for old in "$CACHE"/guest-* "$CACHE"/build.*; do
    if [ -e "$old" ]; then rm -rf "$old"; fi # older guests and interrupted builds
  done
  build_guest "$GUEST_DIR"
fi
pass "guest kernel + initrd ($KPKG $KVER; $(du -h "$GUEST_DIR/initrd.zst" | cut -f1) initrd)"

# ---- 3. Image and server ---------------------------------------------------------------------
WORK=$(mktemp -d /tmp/strata-guest.XXXXXX)
IMG="$WORK/disk.strata"
SOCK="$WORK/vhost.sock"
CONTROL="$WORK/control.sock"
DISK_BYTES=$IMAGE_BYTES # what the guest must see at boot; RESIZED_BYTES after the live resize
timeout 60 "$STRATA" create "$IMG" --size "$IMAGE_BYTES" >/dev/null || die "strata create failed"
"$STRATA" serve "$IMG" --socket "$SOCK" --num-queues "$NUM_QUEUES" --control "$CONTROL" --packed-ring \
  --snapshot-every 5s --snapshot-keep 3 >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
log "strata serve started (pid $SERVE_PID), log $WORK/serve.log"
for _ in $(seq 1 300); do
  [ -S "$SOCK" ] && break
  kill -0 "$SERVE_PID" 2>/dev/null || break
  sleep 0.1
done
[ -S "$SOCK" ] || die "strata serve did not create $SOCK"
pass "strata serve listening on the socket ($NUM_QUEUES queues)"

# Per-run files, appended to the cached initrd as an uncompressed cpio archive.
mkdir -p "$WORK/run-cpio"
head -c "$MARKER_LEN" /dev/urandom >"$WORK/marker.bin"
cp "$WORK/marker.bin" "$WORK/run-cpio/marker.bin"
# fio jobs, run in the guest on /dev/vda and replayed on the host with --verify_only.
# Phase 1 (as specified): psync, 4 KiB random writes, FIO_JOBS jobs side by side from offset 0.
FIO_PSYNC="--name=v --rw=randwrite --bs=4k --size=${FIO_JOB_MB}M --numjobs=$FIO_JOBS"
FIO_PSYNC+=" --offset_increment=${FIO_JOB_MB}M --ioengine=psync --verify=crc32c --randseed=1234"
FIO_PSYNC+=" --verify_state_save=0 --group_reporting"
# Phase 2: libaio at queue depth FIO_QD, 4-256 KiB requests (multi-segment, indirect
# descriptors), in the next FIO_JOBS x FIO_JOB_MB MiB.
FIO_QDEPTH="--name=q --rw=randwrite --bsrange=4k-256k --size=${FIO_JOB_MB}M --numjobs=$FIO_JOBS"
FIO_QDEPTH+=" --offset=$((FIO_JOBS * FIO_JOB_MB))M --offset_increment=${FIO_JOB_MB}M"
FIO_QDEPTH+=" --ioengine=libaio --iodepth=$FIO_QD --verify=crc32c --randseed=5678"
FIO_QDEPTH+=" --verify_state_save=0 --group_reporting"
((2 * FIO_JOBS * FIO_JOB_MB * 1024 * 1024 <= MARKER_OFFSET)) || die "fio area overlaps the marker"
# What the 3 MiB zero-ops area must read as: the marker three times, with 512 KiB of zeros at
# 256 KiB into each copy.
for i in 0 1 2; do
  head -c 262144 "$WORK/marker.bin"
  head -c 524288 /dev/zero
  tail -c 262144 "$WORK/marker.bin"
done >"$WORK/expect-zero.bin"
cp "$WORK/expect-zero.bin" "$WORK/run-cpio/expect-zero.bin"
make_initrd() { # make_initrd MODE: the cached initrd plus a cpio with run.conf and the data files
  cat >"$WORK/run-cpio/run.conf" <<EOF
MODE=$1
MODULES="$MODULES"
EXPECT_SECTORS=$((DISK_BYTES / 512))
RESIZED_SECTORS=$((RESIZED_BYTES / 512))
FIO_JOBS=$FIO_JOBS
FIO_PSYNC="$FIO_PSYNC"
FIO_QDEPTH="$FIO_QDEPTH"
MARKER_OFFSET=$MARKER_OFFSET
MARKER_LEN=$MARKER_LEN
ZERO_OFFSET=$ZERO_OFFSET
EOF
  (cd "$WORK/run-cpio" && printf '%s\n' run.conf marker.bin expect-zero.bin | cpio -o -H newc --quiet) >"$WORK/run-$1.cpio"
  cat "$GUEST_DIR/initrd.zst" "$WORK/run-$1.cpio" >"$WORK/initrd-$1"
}

# ---- 4. Boot the guest (twice) -----------------------------------------------------------------
# A dead back-end leaves the guest hanging rather than failing: watch for it.
VHOST_ERR='vhost|Unexpected end-of-file|Failed to set msg fds|Failed to read msg header'
console=""
RESIZED=0
on_console() { # on_console NAME CONSOLE_FILE: what the host does when the guest asks for it
  [ "$1" = first ] && [ "$RESIZED" = 0 ] && grep -q 'GUEST: READY_FOR_RESIZE' "$2" || return 0
  RESIZED=1
  if "$STRATA" snapshot create "$IMG" guest-wrote --control "$CONTROL" >"$WORK/control.log" 2>&1; then
    pass "control socket: snapshot 'guest-wrote' taken while the guest runs"
  else
    fail "control socket: snapshot failed: $(tail -n 2 "$WORK/control.log" | tr '\n' ' ')"
  fi
  if "$STRATA" resize "$IMG" "$RESIZED_BYTES" --control "$CONTROL" >>"$WORK/control.log" 2>&1; then
    DISK_BYTES=$RESIZED_BYTES
    pass "control socket: disk grown to $RESIZED_BYTES bytes while the guest runs"
  else
    fail "control socket: resize failed: $(tail -n 2 "$WORK/control.log" | tr '\n' ' ')"
  fi
}
boot_guest() { # boot_guest NAME MODE [RING]: runs QEMU to completion; sets $console to what the guest printed
  local name=$1 mode=$2 ring=${3:-split} t0=$SECONDS rc=0 abort_reason="" out="$WORK/console-$1.log" err="$WORK/qemu-$1.err"
  make_initrd "$mode"
  log "boot '$name' (TCG, $GUEST_CPUS vCPUs, $ring virtqueues, timeout ${QEMU_TIMEOUT}s); console $out"
  timeout -k 10 "$QEMU_TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp "$GUEST_CPUS" -m 512 \
    -object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem \
    -chardev socket,id=c0,path="$SOCK" \
    -device vhost-user-blk-pci,chardev=c0,num-queues="$NUM_QUEUES",packed=$([ "$ring" = packed ] && echo on || echo off) \
    -kernel "$GUEST_DIR/vmlinuz" -initrd "$WORK/initrd-$mode" \
    -append "console=ttyS0 panic=-1 quiet" \
    -nographic -no-reboot -nic none \
    </dev/null >"$out" 2>"$err" &
  QEMU_PID=$!
  while kill -0 "$QEMU_PID" 2>/dev/null; do
    if ! kill -0 "$SERVE_PID" 2>/dev/null; then
      abort_reason="strata serve exited while the guest was running"
    elif grep -qiE "$VHOST_ERR" "$err" 2>/dev/null; then
      sleep 2 # let the rest of the messages arrive
      abort_reason="QEMU reported vhost-user errors: $(grep -iE "$VHOST_ERR" "$err" | head -n 3 | tr '\n' ' ')"
    elif grep -q 'Kernel panic' "$out" 2>/dev/null && ! grep -q 'GUEST: GUEST_DONE' "$out"; then
      sleep 2
      abort_reason="guest kernel panic"
    fi
    if [ -n "$abort_reason" ]; then
      log "aborting boot '$name': $abort_reason"
      stop_qemu
      break
    fi
    on_console "$name" "$out"
    sleep 1
  done
  wait "$QEMU_PID" || rc=$?
  QEMU_PID=""
  BOOT_SECS=$((SECONDS - t0))
  tr -d '\r' <"$out" | grep '^GUEST: ' | sed "s/^/  [$name] /" >&2 || true
  [ -z "$abort_reason" ] || fail "boot '$name': $abort_reason"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    fail "boot '$name': QEMU timed out after ${QEMU_TIMEOUT}s (guest hung?)"
  elif [ -z "$abort_reason" ] && [ "$rc" -ne 0 ]; then
    fail "boot '$name': QEMU exited with status $rc: $(head -n 3 "$err" | tr '\n' ' ')"
  fi
  if [ -z "$abort_reason" ] && grep -qiE "$VHOST_ERR" "$err"; then
    fail "boot '$name': QEMU stderr has vhost-user errors: $(grep -iE "$VHOST_ERR" "$err" | head -n 3 | tr '\n' ' ')"
  fi
  console=$(tr -d '\r' <"$out")
  local bad
  bad=$(grep -E '^GUEST: [A-Z0-9_]*(_BAD|_FAIL|NO_VDA|NO_RUN_CONF)' <<<"$console" | tr '\n' ' ' || true)
  [ -z "$bad" ] || fail "boot '$name': guest reported: $bad"
}
check_guest() { # check_guest TOKEN DESCRIPTION
  if grep -q "^GUEST: $1" <<<"$console"; then pass "$2"; else fail "$2 (no $1 on the console)"; fi
}
check_vqs() { # with vCPUs >= queues and one pinned fio job per CPU, every virtqueue carries requests
  [ "$GUEST_CPUS" -ge "$NUM_QUEUES" ] && [ "$FIO_JOBS" -ge "$NUM_QUEUES" ] && [ "$NUM_QUEUES" -ge 2 ] || return 0
  local vqs busy
  vqs=$(grep '^GUEST: VQ_INTERRUPTS' <<<"$console" | head -n 1 | sed 's/^GUEST: VQ_INTERRUPTS *//; s/ *$//' || true)
  busy=$(tr ' ' '\n' <<<"$vqs" | awk -F= '$2 > 0' | wc -l)
  if [ "$busy" -ge "$NUM_QUEUES" ]; then
    pass "$1: all $NUM_QUEUES virtqueues completed requests (interrupts: $vqs)"
  else
    fail "$1: only $busy of $NUM_QUEUES virtqueues completed requests (interrupts: ${vqs:-none found})"
  fi
}

boot_guest first write
check_guest CAPACITY_OK "boot 1: capacity = image size ($((IMAGE_BYTES / 512)) sectors)"
check_guest FIO_VERIFY_OK "boot 1: fio psync randwrite 4 KiB, ${FIO_JOBS}x${FIO_JOB_MB} MiB, O_DIRECT, crc32c verify, end fsync"
check_guest FIO_QD_VERIFY_OK "boot 1: fio libaio iodepth $FIO_QD randwrite 4-256 KiB, ${FIO_JOBS}x${FIO_JOB_MB} MiB, crc32c verify, end fsync"
check_vqs "boot 1"
check_guest MARKER_READBACK_OK "boot 1: marker ($MARKER_LEN bytes at $MARKER_OFFSET) written and read back"
check_guest ZERO_OPS_OK "boot 1: discard, write-zeroes, write-zeroes+unmap (3 x 512 KiB) read back as zeros"
check_guest RESIZE_SEEN "boot 1: the guest saw the live resize ($((RESIZED_BYTES / 512)) sectors, CONFIG_CHANGE_MSG)"
check_guest RESIZE_WRITE_OK "boot 1: the guest wrote and read back the last MiB of the grown disk"
check_guest GUEST_DONE "boot 1: guest finished and powered off (${BOOT_SECS}s in QEMU)"

# The server must survive the front-end's disconnect and serve the next connection.
if kill -0 "$SERVE_PID" 2>/dev/null && [ -S "$SOCK" ]; then
  pass "strata serve still running and listening after the guest disconnected"
  boot_guest second verify packed
  check_guest CAPACITY_OK "boot 2 (reconnect, packed virtqueues): capacity = the grown image size"
  check_guest FIO_REVERIFY_OK "boot 2 (reconnect): fio --verify_only of both boot-1 phases"
  check_vqs "boot 2 (reconnect)"
  check_guest MARKER_REREAD_OK "boot 2 (reconnect): marker reads back"
  check_guest ZERO_REREAD_OK "boot 2 (reconnect): discard/write-zeroes area reads back"
  check_guest GUEST_DONE "boot 2 (reconnect): guest finished and powered off (${BOOT_SECS}s in QEMU)"
else
  fail "strata serve is not listening any more after the guest disconnected"
fi

# ---- 5. Stop the server ----------------------------------------------------------------------
if kill -0 "$SERVE_PID" 2>/dev/null; then
  kill -TERM "$SERVE_PID"
  for _ in $(seq 1 300); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$SERVE_PID" 2>/dev/null; then
    fail "strata serve still running 30 s after SIGTERM"
    stop_pid "$SERVE_PID" "strata serve"
  fi
fi
serve_rc=0
wait "$SERVE_PID" || serve_rc=$?
SERVE_PID=""
if [ "$serve_rc" -eq 0 ]; then pass "strata serve exited 0 on SIGTERM"; else fail "strata serve exit status $serve_rc (expected 0)"; fi
if [ -e "$SOCK" ] || [ -e "$CONTROL" ]; then fail "strata serve left a socket behind"; else pass "strata serve removed its sockets"; fi
if grep -qE '(^| )(error|critical)( |:)' "$WORK/serve.log"; then
  fail "strata serve logged errors: $(grep -E '(^| )(error|critical)( |:)' "$WORK/serve.log" | head -n 3 | tr '\n' ' ')"
fi

# ---- 6. Host-side checks of the image ---------------------------------------------------------
if timeout 120 "$STRATA" read "$IMG" --offset "$MARKER_OFFSET" --length "$MARKER_LEN" --output "$WORK/host-read.bin" 2>"$WORK/host-read.err"; then
  if cmp -s "$WORK/marker.bin" "$WORK/host-read.bin"; then
    pass "host: strata read of the marker matches byte for byte"
  else
    fail "host: marker differs: $(cmp "$WORK/marker.bin" "$WORK/host-read.bin" 2>&1 | head -n 1); sha256 $(sha256sum <"$WORK/marker.bin" | cut -c1-16) vs $(sha256sum <"$WORK/host-read.bin" | cut -c1-16)"
  fi
else
  fail "host: strata read failed: $(head -n 3 "$WORK/host-read.err" | tr '\n' ' ')"
fi
if timeout 120 "$STRATA" read "$IMG" --offset "$ZERO_OFFSET" --length $((3 * MARKER_LEN)) --output "$WORK/host-zero.bin" 2>"$WORK/host-read.err"; then
  if cmp -s "$WORK/expect-zero.bin" "$WORK/host-zero.bin"; then
    pass "host: discard/write-zeroes area matches byte for byte"
  else
    fail "host: discard/write-zeroes area differs: $(cmp "$WORK/expect-zero.bin" "$WORK/host-zero.bin" 2>&1 | head -n 1)"
  fi
else
  fail "host: strata read of the zero-ops area failed: $(head -n 3 "$WORK/host-read.err" | tr '\n' ' ')"
fi
if timeout 120 "$STRATA" read "$IMG" --snapshot guest-wrote --offset "$MARKER_OFFSET" --length "$MARKER_LEN" --output "$WORK/snap-read.bin" 2>"$WORK/host-read.err" \
  && cmp -s "$WORK/marker.bin" "$WORK/snap-read.bin"; then
  pass "host: snapshot 'guest-wrote' holds the marker the guest wrote before it"
else
  fail "host: snapshot 'guest-wrote' does not hold the marker: $(head -n 2 "$WORK/host-read.err" | tr '\n' ' ')"
fi
if timeout 120 "$STRATA" read "$IMG" --offset $((RESIZED_BYTES - MARKER_LEN)) --length "$MARKER_LEN" --output "$WORK/tail-read.bin" 2>"$WORK/host-read.err" \
  && cmp -s "$WORK/marker.bin" "$WORK/tail-read.bin"; then
  pass "host: the last MiB of the grown disk holds what the guest wrote there"
else
  fail "host: the grown disk's last MiB differs: $(head -n 2 "$WORK/host-read.err" | tr '\n' ' ')"
fi
auto=$("$STRATA" snapshot list "$IMG" --output json 2>/dev/null | grep -c '"auto-' || true)
if [ "$auto" -ge 1 ] && [ "$auto" -le 3 ]; then
  pass "host: $auto periodic snapshot(s) kept (--snapshot-every 5s --snapshot-keep 3)"
else
  fail "host: expected 1 to 3 periodic snapshots, found $auto"
fi
check_rc=0
timeout 300 "$STRATA" check "$IMG" >"$WORK/check.log" 2>&1 || check_rc=$?
if [ "$check_rc" -eq 0 ]; then pass "host: strata check exits 0"; else fail "host: strata check exit status $check_rc: $(tail -n 5 "$WORK/check.log" | tr '\n' ' ')"; fi
# Replay the guest's fio jobs against a raw copy: every block fio wrote must hold what it wrote.
if timeout 300 "$STRATA" convert "$IMG" "$WORK/disk.raw" >"$WORK/convert.log" 2>&1; then
  for phase in PSYNC QDEPTH; do
    jobvar=FIO_$phase
    # shellcheck disable=SC2086
    if timeout 300 fio --filename="$WORK/disk.raw" ${!jobvar} --verify_only >"$WORK/fio-replay-$phase.log" 2>&1; then
      pass "host: fio --verify_only replay of the guest's $phase phase on a raw copy"
    else
      fail "host: fio --verify_only replay of the $phase phase failed: $(grep -iE 'verify|bad|err' "$WORK/fio-replay-$phase.log" | head -n 3 | tr '\n' ' ')"
    fi
  done
  rm -f "$WORK/disk.raw"
else
  fail "host: strata convert to raw failed: $(tail -n 3 "$WORK/convert.log" | tr '\n' ' ')"
fi
if [ "${SHOW_IMAGE:-0}" = 1 ]; then
  echo "==================== the image the guest used ====================" >&2
  "$STRATA" info "$IMG" >&2
  "$STRATA" snapshot list "$IMG" >&2
  "$STRATA" map "$IMG" >"$WORK/map.txt" && head -n 20 "$WORK/map.txt" >&2
fi
log "done"
