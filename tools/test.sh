#!/usr/bin/env bash
# The one test command: Rust tests, then the functional suite.
#
#   tools/test.sh                 # everything
#   tools/test.sh -k qcow2        # extra arguments go to pytest
#   INSTAR_SKIP_CARGO_TEST=1 tools/test.sh
#
# Builds the release binary when INSTAR_BINARY_PATH is unset and it is
# missing, prepares the venv (tools/test-env.sh) and the corpus (the suite
# runs tools/gen-corpus.py, a no-op when cached), then runs pytest in
# parallel. Results: tests/results/latest.json. See docs/testing.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
tools/ensure-toolchain.sh

if [[ -z "${INSTAR_BINARY_PATH:-}" ]]; then
    bin="${CARGO_TARGET_DIR:-$repo/target}/release/instar"
    # a no-op when nothing changed; never test a stale binary
    cargo build --release -p instar
    export INSTAR_BINARY_PATH="$bin"
fi

if [[ "${INSTAR_SKIP_CARGO_TEST:-0}" != 1 ]]; then
    cargo test --workspace
fi

py="$(tools/test-env.sh)"
exec "$py" -m pytest tests -n "${INSTAR_TEST_JOBS:-auto}" -p no:cacheprovider "$@"
