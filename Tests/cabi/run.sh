#!/usr/bin/env bash
# Builds libStrataC.so and a C program against include/strata.h, and runs it (see cabi_test.c).
# Usage: bash Tests/cabi/run.sh [swift build flags, e.g. --scratch-path DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
swift build --product StrataC "$@" >/dev/null
lib=$(swift build --show-bin-path "$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -std=c11 -Wall -Wextra -Werror -pthread -I Sources/StrataCABI/include -o "$work/cabi_test" Tests/cabi/cabi_test.c \
  -L "$lib" -lStrataC -Wl,-rpath,"$lib"
"$work/cabi_test" "$work"
