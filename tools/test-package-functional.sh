#!/usr/bin/env bash
# The whole functional suite against an installed package, in one distro
# root, compared with that distribution's own qemu-img.
#
#   tools/test-package-functional.sh PACKAGE DISTRO [PYTEST ARGS...]
#
# PACKAGE is a .deb or .rpm (tools/package.sh); DISTRO a root name of
# tools/distro-root.sh (built once, then reused from ${INSTAR_CACHE:-.cache}/roots).
# 1. tools/test-package-install.sh --install-only checks the package and
#    installs it into a fresh copy of the root (dpkg in the root, or
#    rpm --root);
# 2. pytest runs on the host (the project's venv) with
#      INSTAR_BINARY_PATH  a wrapper that runs the root's /usr/bin/instar
#                          inside the root (bwrap, /dev/kvm bound);
#      QEMU_IMG            tools/qemu-img-in-root on the same root;
#    so both programs under comparison run with the root's libraries, and
#    instar finds the root's qemu-img on its PATH (its output profile is
#    that distribution's). Why outside: docs/packaging.md ("Where the tests
#    run").
# 3. writes ${INSTAR_MATRIX_DIR:-.cache/matrix}/DISTRO-KIND.json: the
#    distribution, qemu-img version, passed/failed/skipped, skip reasons
#    (pytest's summary, tests/results format) and exits non-zero on any
#    failure.
# INSTAR_KEEP=1 keeps the work directory (the root with the package).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'test-package-functional: %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
if [[ $# -lt 2 ]]; then
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
PKG=$(realpath "$1")
DISTRO=$2
shift 2
case $PKG in *.deb) kind=deb ;; *.rpm) kind=rpm ;; *) fail "not a .deb or .rpm: $PKG" ;; esac
OUT=${INSTAR_MATRIX_DIR:-$REPO/.cache/matrix}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/instar-functional.XXXXXX")
cleanup() {
    if [[ ${INSTAR_KEEP:-} == 1 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

"$REPO/tools/test-package-install.sh" --install-only "$PKG" "$DISTRO" "$WORK/root"
ROOT=$WORK/root
[[ -x $ROOT/usr/bin/instar ]] || fail "no /usr/bin/instar in the root after the install"

mkdir -p "$WORK/bin"
cat >"$WORK/bin/instar" <<WRAP
#!/bin/sh
INSTAR_DISTRO_ROOT='$ROOT' INSTAR_IN_ROOT_PROGRAM=/usr/bin/instar exec '$REPO/tools/qemu-img-in-root' "\$@"
WRAP
cat >"$WORK/bin/qemu-img" <<WRAP
#!/bin/sh
INSTAR_DISTRO_ROOT='$ROOT' exec '$REPO/tools/qemu-img-in-root' "\$@"
WRAP
chmod 755 "$WORK/bin/instar" "$WORK/bin/qemu-img"
qv=$("$WORK/bin/qemu-img" --version | head -n 1)
iv=$("$WORK/bin/instar" --version | head -n 1)
say "$DISTRO: $qv / $iv"

py=$("$REPO/tools/test-env.sh")
results=$WORK/results
set +e
INSTAR_BINARY_PATH=$WORK/bin/instar QEMU_IMG=$WORK/bin/qemu-img \
    INSTAR_TRACED_PROGRAM=/usr/bin/instar INSTAR_TEST_RESULTS_DIR=$results INSTAR_TEST_DISTRO=$DISTRO INSTAR_TEST_PACKAGE=$(basename "$PKG") \
    "$py" -m pytest "$REPO/tests" -n "${INSTAR_TEST_JOBS:-auto}" -p no:cacheprovider -q "$@" \
    >"$WORK/pytest.log" 2>&1
rc=$?
set -e
tail -n 25 "$WORK/pytest.log" | sed "s/^/  [$DISTRO] /" >&2
[[ -f $results/latest.json ]] || fail "pytest wrote no results (exit $rc); log: $WORK/pytest.log"
dest=$OUT/$DISTRO-$kind.json
cp "$results/latest.json" "$dest"
cp "$WORK/pytest.log" "$OUT/$DISTRO-$kind.log"
say "results: $dest"
((rc == 0)) || fail "$(basename "$PKG") in $DISTRO: pytest exited $rc (log: $OUT/$DISTRO-$kind.log)"
say "PASS $(basename "$PKG") in $DISTRO"
