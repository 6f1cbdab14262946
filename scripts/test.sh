#!/usr/bin/env bash
# The test command: installs dependencies, builds everything, runs every test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
swift build --build-tests
swift test --skip-build --parallel
