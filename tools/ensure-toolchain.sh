#!/usr/bin/env bash
# Installs what building instar needs on a fresh machine of this kind:
# the Rust targets named in rust-toolchain.toml. Idempotent and quick when
# everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v rustup >/dev/null 2>&1; then
    installed=$(rustup target list --installed 2>/dev/null || true)
    for t in x86_64-unknown-none x86_64-unknown-linux-musl; do
        grep -qx "$t" <<<"$installed" || rustup target add "$t" >&2
    done
fi
