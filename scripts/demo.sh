#!/usr/bin/env bash
# The main job: build the `strata` tool; create an image, write, snapshot, overwrite, read both
# versions back and check it; then serve an image to a real Linux guest (QEMU under TCG, about
# two minutes) that writes and verifies data with fio while the host snapshots and grows the disk
# through the control socket, and show what the guest left in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
swift build -c release --product strata
strata=".build/release/strata"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
img="$work/demo.strata"

"$strata" create "$img" --size 10G
head -c 1048576 /dev/urandom > "$work/v1.bin"
head -c 1048576 /dev/urandom > "$work/v2.bin"
"$strata" write "$img" --offset 1M --input "$work/v1.bin"
"$strata" snapshot create "$img" before-upgrade
"$strata" write "$img" --offset 1M --input "$work/v2.bin"
"$strata" read "$img" --offset 1M --length 1M --output "$work/head.bin"
"$strata" read "$img" --offset 1M --length 1M --snapshot before-upgrade --output "$work/snap.bin"
cmp "$work/head.bin" "$work/v2.bin" && echo "head reads back the new data"
cmp "$work/snap.bin" "$work/v1.bin" && echo "snapshot 'before-upgrade' still reads the old data"
"$strata" snapshot list "$img"
"$strata" map "$img"
"$strata" info "$img"
"$strata" check "$img"

echo
echo "== serving an image to a Linux guest (QEMU, TCG): tests/guest/run.sh"
SHOW_IMAGE=1 bash tests/guest/run.sh
