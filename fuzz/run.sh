#!/usr/bin/env bash
# Runs one libFuzzer target for a bounded time: fuzz/run.sh TARGET SECONDS
# Targets: FuzzRecord FuzzSuperblock FuzzPages FuzzVhostMessage FuzzImageOpen FuzzDescriptorChain FuzzInflight FuzzNBD.
# Crashes land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET SECONDS}
seconds=${2:-60}
command -v swift >/dev/null 2>&1 || export PATH="/opt/swift/usr/bin:$PATH"
swift build -c debug --scratch-path .build-fuzz --sanitize=fuzzer --sanitize=address \
  -Xswiftc -sanitize=fuzzer,address --product "$target"
mkdir -p "corpus/$target" artifacts "corpus-work/$target"
# Seeds are checked in under corpus/; new inputs go to corpus-work/ (ignored by git).
".build-fuzz/debug/$target" "corpus-work/$target" "corpus/$target" \
  -max_total_time="$seconds" -artifact_prefix=artifacts/ -print_final_stats=1
