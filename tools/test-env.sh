#!/usr/bin/env bash
# Create or reuse the functional-test venv at <repo>/.cache/venv.
# Idempotent: a stamp holding the hash of tests/requirements.txt makes the
# cached case a few milliseconds. Prints the venv's python on stdout.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INSTAR_TEST_VENV:-$repo/.cache/venv}"
req="$repo/tests/requirements.txt"
want="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$venv/bin/python"
    exit 0
fi
echo "test-env: preparing $venv" >&2
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req" >&2
echo "$want" >"$stamp"
echo "$venv/bin/python"
