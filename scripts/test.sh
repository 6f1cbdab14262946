#!/usr/bin/env bash
# The test command: installs dependencies, builds everything, runs every test suite, then runs
# the suites that touch real files again on each fallback I/O engine (io_uring is the default).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
swift build --build-tests
swift test --skip-build --parallel
echo "== the C ABI from a C program"
bash Tests/cabi/run.sh
for engine in native threads; do
  echo "== again on the '$engine' engine"
  STRATA_AIO=$engine swift test --skip-build --parallel --filter "StrataCLITests|StrataCoreTests.smoke|StrataCoreTests.queue|StrataIOTests|StrataServeTests"
done
