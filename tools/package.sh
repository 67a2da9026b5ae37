#!/usr/bin/env bash
# Builds instar's .deb and .rpm from the tree it lives in:
#
#   tools/package.sh            build both, check them, print their paths
#   tools/package.sh --no-check skip lintian and the rpm checks
#   tools/package.sh --deb-only only the .deb (no cargo-generate-rpm: its
#                               first install takes many minutes)
#
# 1. the packaging tools (cargo-deb, cargo-generate-rpm) are installed once
#    with `cargo install --locked` into ${INSTAR_CACHE:-.cache}/tools and
#    reused (cargo-generate-rpm takes ~7 minutes to build);
# 2. a static binary for x86_64-unknown-linux-musl (stripped), checked to
#    have no ELF interpreter, so one package runs on every distribution;
# 3. man pages and completions from the binary's own help (tools/gen-man.py),
#    a DEP-5 copyright file and a Debian changelog;
# 4. cargo deb / cargo generate-rpm with the metadata in
#    crates/instar/Cargo.toml;
# 5. lintian (no errors allowed), rpm -qpi / -K / -qpl against the expected
#    file list.
#
# Output: ${INSTAR_PKG_DIR:-<target dir>/packages}/instar_*.deb, instar-*.rpm
# and SHA256SUMS. See docs/packaging.md.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
CACHE=${INSTAR_CACHE:-$REPO/.cache}
TOOLS=$CACHE/tools
TRIPLE=x86_64-unknown-linux-musl
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
check=1
rpm_too=1
for a in "$@"; do
    case $a in
        --no-check) check=0 ;;
        --deb-only) rpm_too=0 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "package.sh: unknown argument '$a'" >&2; exit 2 ;;
    esac
done
say() { printf 'package.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
t0=$(date +%s)

tools/ensure-toolchain.sh

# --- 1. tools -----------------------------------------------------------
mkdir -p "$TOOLS"
export PATH=$TOOLS/bin:$PATH
install_tool() { # crate version binary
    local have
    have=$("$TOOLS/bin/$3" "${3#cargo-}" --version 2>/dev/null | awk '{print $2}' || true)
    [[ $have == "$2" ]] && return 0
    say "installing $1 $2 into $TOOLS (once; cached)"
    local s=$(date +%s)
    # Own temporary target dir: a shared CARGO_TARGET_DIR would keep the
    # tools' objects next to instar's.
    env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET -u RUSTFLAGS \
        cargo install --locked --quiet --root "$TOOLS" --version "$2" "$1"
    say "installed $1 in $(( $(date +%s) - s )) s"
}
(
    flock 9
    install_tool cargo-deb "$CARGO_DEB_VERSION" cargo-deb
    if ((rpm_too)); then
        install_tool cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION" cargo-generate-rpm
    fi
) 9>"$TOOLS/.lock"

# --- 2. static binary ---------------------------------------------------
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps --locked |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
OUT_BIN=$TARGET_DIR/$TRIPLE/release
s=$(date +%s)
# Stripped by cargo so that the .deb and the .rpm carry the same bytes. The
# guest's nested build (crates/instar-vmm/build.rs) drops CARGO_* variables,
# so neither the triple nor this profile setting reaches it.
CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --target "$TRIPLE" -p instar
say "built $OUT_BIN/instar in $(( $(date +%s) - s )) s"
bin=$OUT_BIN/instar
if readelf -lW "$bin" | grep -q 'Requesting program interpreter'; then
    die "$bin is dynamically linked (has an ELF interpreter); the packages need a static binary"
fi
if readelf -dW "$bin" 2>/dev/null | grep -q '(NEEDED)'; then
    die "$bin needs shared libraries: $(readelf -dW "$bin" | grep NEEDED | tr -s ' ')"
fi
version=$("$bin" --config /dev/null --qemu-version 10.0 --version | sed -n 's/.*(instar \([^)]*\)).*/\1/p')
[[ -n $version ]] || die "cannot read the version from '$bin --version'"

# --- 3. generated files -------------------------------------------------
ASSETS=$OUT_BIN/pkg-assets
rm -rf "$ASSETS"
mkdir -p "$ASSETS"
# Reproducible dates: the last commit's time when there is a git history.
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
    SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
python3 tools/gen-man.py "$bin" "$ASSETS" --version "$version" >&2

cat >"$ASSETS/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: instar
Source: https://github.com/instar-project/instar

Files: *
Copyright: 2026 The instar authors
License: Apache-2.0

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License");
 you may not use this file except in compliance with the License.
 You may obtain a copy of the License at
 .
 http://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software
 distributed under the License is distributed on an "AS IS" BASIS,
 WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
 See the License for the specific language governing permissions and
 limitations under the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0
 can be found in "/usr/share/common-licenses/Apache-2.0".
EOF

maintainer=$(python3 - <<'EOF'
import tomllib
m = tomllib.load(open("crates/instar/Cargo.toml", "rb"))
print(m["package"]["metadata"]["deb"]["maintainer"])
EOF
)
revision=$(python3 - <<'EOF'
import tomllib
m = tomllib.load(open("crates/instar/Cargo.toml", "rb"))
print(m["package"]["metadata"]["deb"].get("revision", "1"))
EOF
)
{
    printf 'instar (%s-%s) unstable; urgency=medium\n\n' "$version" "$revision"
    printf '  * Upstream release %s (static musl build); changes in\n' "$version"
    printf '    /usr/share/doc/instar/changelog.gz.\n\n'
    printf ' -- %s  %s\n' "$maintainer" "$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$ASSETS/changelog.Debian.gz"

# --- 4. packages --------------------------------------------------------
PKG_DIR=${INSTAR_PKG_DIR:-$TARGET_DIR/packages}
mkdir -p "$PKG_DIR"
rm -f "$PKG_DIR"/instar_*.deb "$PKG_DIR"/instar-*.rpm "$PKG_DIR/SHA256SUMS"
s=$(date +%s)
cargo deb -p instar --no-build --no-strip --target "$TRIPLE" --output "$PKG_DIR" >&2
if ((rpm_too)); then
    cargo generate-rpm -p crates/instar --target "$TRIPLE" --output "$PKG_DIR/" \
        --source-date "$SOURCE_DATE_EPOCH" >&2
fi
say "packaged in $(( $(date +%s) - s )) s"
deb=$(ls "$PKG_DIR"/instar_*.deb)
rpm=$( ((rpm_too)) && ls "$PKG_DIR"/instar-*.rpm || true)
(cd "$PKG_DIR" && sha256sum "$(basename "$deb")" ${rpm:+"$(basename "$rpm")"} >SHA256SUMS)

# --- 5. checks ----------------------------------------------------------
if ((check)); then
    tools/test-package-install.sh --check-only "$deb"
    if [[ -n $rpm ]]; then tools/test-package-install.sh --check-only "$rpm"; fi
fi
say "done in $(( $(date +%s) - t0 )) s"
echo "$deb"
if [[ -n $rpm ]]; then echo "$rpm"; fi
