#!/usr/bin/env bash
# Builds instar and runs `instar info` on an example image next to the real
# qemu-img, so the two outputs can be compared by eye.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
tools/ensure-toolchain.sh
cargo build --release --locked -p instar
dir="${INSTAR_CACHE:-$repo/.cache}/example"
mkdir -p "$dir"
if [ ! -f "$dir/example.qcow2" ]; then
    qemu-img create -q -f qcow2 "$dir/base.qcow2" 1G
    qemu-io -f qcow2 -c 'write -P 0xab 0 1M' "$dir/base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$dir/example.qcow2"
fi
cd "$dir"
echo "\$ instar info example.qcow2"
"$repo/target/release/instar" info example.qcow2
echo
echo "\$ instar info --backing-chain --output=json example.qcow2"
"$repo/target/release/instar" info --backing-chain --output=json example.qcow2
