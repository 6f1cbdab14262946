#!/usr/bin/env bash
# The main job for now: build the `strata` tool, create an image, write, snapshot, overwrite,
# read both versions back, and check the image.
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
