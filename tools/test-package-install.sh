#!/usr/bin/env bash
# Install smoke test for instar's packages.
#
#   tools/test-package-install.sh PACKAGE DISTRO   install into a fresh copy
#                                                  of a distro root, run it
#   tools/test-package-install.sh --check-only PACKAGE
#                                                  check the package file only
#   tools/test-package-install.sh --install-only PACKAGE DISTRO DEST
#                                                  checks and install, no
#                                                  smoke: leave the root at
#                                                  DEST (for the full suite,
#                                                  tools/test-package-functional.sh)
#
# PACKAGE is a .deb or an .rpm from tools/package.sh; DISTRO a root name of
# tools/distro-root.sh (built or reused under ${INSTAR_CACHE:-.cache}/roots).
#
# Package checks (both modes): the file list and every file's mode against
# the expected list (a man page per implemented command, asked from the
# packaged binary itself), the binary is static, and the metadata:
# .deb: dpkg-deb fields; with --check-only (or INSTAR_LINTIAN=1) also
# lintian with no errors (skipped with a note when lintian is not installed;
# INSTAR_REQUIRE_LINTIAN=1 makes that fail);
# .rpm: rpm -qpi fields, rpm -K digests, rpm -qpl, no requirements but
# rpmlib's.
#
# Install smoke: the root is copied (the cached root is never changed); a
# .deb is installed with the root's own dpkg (chroot), an .rpm with the
# host's `rpm --root DIR --dbpath /var/lib/rpm -ivh --nodeps`. Then every
# packaged file must exist with its mode, and inside the root (bwrap,
# /dev/kvm bound, no network) `instar --help`, `--version` and, on images
# the root's own qemu-img creates, `info` (human, json, --backing-chain, a
# missing file), `check` and `map` must print exactly what the root's
# qemu-img prints (stdout, stderr, exit status). A command instar does not
# implement yet must be refused with one `instar:` line and exit 1.
# INSTAR_KEEP=1 keeps the work directory.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'test-package-install: %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

check_only=0
install_only=0
case ${1:-} in
--check-only) check_only=1; shift ;;
--install-only) install_only=1; shift ;;
esac
if ((check_only)) && [[ $# -ne 1 ]] || ((install_only)) && [[ $# -ne 3 ]] ||
    ((!check_only && !install_only)) && [[ $# -ne 2 ]]; then
    sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
PKG=$(realpath "$1")
DISTRO=${2:-}
DEST=${3:-}
[[ -f $PKG ]] || fail "no such package: $1"
case $PKG in
    *.deb) kind=deb ;;
    *.rpm) kind=rpm ;;
    *) fail "not a .deb or .rpm: $PKG" ;;
esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/instar-pkgtest.XXXXXX")
cleanup() {
    if [[ ${INSTAR_KEEP:-} == 1 ]]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || fail "'$1' is missing (apt-get install $2)"; }
need readelf binutils
if [[ $kind == rpm ]]; then need rpm rpm; need rpm2cpio rpm; fi

# --- the package's file list: "MODE PATH" lines, and its binary ----------
mkdir -p "$WORK/pkg"
if [[ $kind == deb ]]; then
    dpkg-deb --contents "$PKG" | awk '$1 !~ /^d/ {
        m = 0; p = $1
        for (i = 2; i <= 10; i++) { m = m * 2 + (substr(p, i, 1) != "-") }
        path = $6; sub(/^\./, "", path); printf "%04o %s\n", m, path }' | sort -k2 >"$WORK/files"
    dpkg-deb --fsys-tarfile "$PKG" | tar -xO ./usr/bin/instar >"$WORK/pkg/instar" ||
        fail "no ./usr/bin/instar in $PKG"
else
    rpm -qp --qf '[%{FILEMODES:octal} %{FILENAMES}\n]' "$PKG" |
        awk '{ n = length($1); if (substr($1, 1, n - 4) != "40") print substr($1, n - 3) " " $2 }' |
        sort -k2 >"$WORK/files"
    # rpm2cpio 4.18 exits 1 on cargo-generate-rpm's packages although it
    # writes the whole archive (payload size bookkeeping); the parser below
    # checks the archive itself.
    { rpm2cpio "$PKG" || true; } | python3 -c '
import sys
data = sys.stdin.buffer.read(); off = 0
while True:
    h = data[off:off + 110]
    if len(h) < 110 or h[:6] not in (b"070701", b"070702"): sys.exit("bad cpio")
    size = int(h[54:62], 16); nlen = int(h[94:102], 16)
    name = data[off + 110:off + 110 + nlen - 1].decode()
    start = (off + 110 + nlen + 3) & ~3
    if name == "TRAILER!!!": sys.exit("no /usr/bin/instar in the payload")
    if name.lstrip(".") == "/usr/bin/instar":
        open(sys.argv[1], "wb").write(data[start:start + size]); break
    off = (start + size + 3) & ~3
' "$WORK/pkg/instar" || fail "cannot extract /usr/bin/instar from $PKG"
fi
chmod 755 "$WORK/pkg/instar"

readelf -h "$WORK/pkg/instar" 2>/dev/null | grep -q 'Machine:.*X86-64' ||
    fail "the packaged /usr/bin/instar is not an x86-64 ELF file"
if readelf -lW "$WORK/pkg/instar" | grep -q 'program interpreter'; then
    fail "the packaged /usr/bin/instar is dynamically linked"
fi

# Expected files. Man pages: one for instar and one per command the
# packaged binary implements (its --help marks the others).
help=$("$WORK/pkg/instar" --config /dev/null --qemu-version 10.0 --help) ||
    fail "the packaged instar --help failed"
mapfile -t implemented < <(sed -n '/^Recognized commands/,/^Supported/p' <<<"$help" |
    grep -E '^  [a-z]+ - ' | grep -v 'not implemented yet' | awk '{print $1}')
((${#implemented[@]})) || fail "the packaged binary lists no implemented command"
{
    echo "0755 /usr/bin/instar"
    echo "0644 /usr/share/man/man1/instar.1.gz"
    for c in "${implemented[@]}"; do echo "0644 /usr/share/man/man1/instar-$c.1.gz"; done
    echo "0644 /usr/share/bash-completion/completions/instar"
    echo "0644 /usr/share/doc/instar/README.md"
    if [[ $kind == deb ]]; then
        echo "0644 /usr/share/zsh/vendor-completions/_instar"
        echo "0644 /usr/share/doc/instar/copyright"
        echo "0644 /usr/share/doc/instar/changelog.gz"
        echo "0644 /usr/share/doc/instar/changelog.Debian.gz"
    else
        echo "0644 /usr/share/zsh/site-functions/_instar"
        echo "0644 /usr/share/licenses/instar/LICENSE"
        echo "0644 /usr/share/doc/instar/CHANGELOG.md"
    fi
} | sort -k2 >"$WORK/expected"
if ! diff -u "$WORK/expected" "$WORK/files" >"$WORK/files.diff"; then
    cat "$WORK/files.diff" >&2
    fail "the package's files or modes differ from the expected list (- expected, + packaged)"
fi
say "$(wc -l <"$WORK/files") files with the expected modes in $(basename "$PKG")"

field_is() { # name actual expected
    [[ $2 == "$3" ]] || fail "$kind field $1 is '$2', expected '$3'"
}
if [[ $kind == deb ]]; then
    f() { dpkg-deb --field "$PKG" "$1"; }
    field_is Package "$(f Package)" instar
    field_is Architecture "$(f Architecture)" amd64
    field_is Depends "$(f Depends)" ""
    field_is Suggests "$(f Suggests)" qemu-utils
    [[ $(f Description) == *qemu-img* ]] || fail "Description does not say what instar is"
    [[ -n $(f Maintainer) ]] || fail "no Maintainer"
    [[ $(f Homepage) == https://* ]] || fail "the .deb's Homepage is '$(f Homepage)'"
    if ((!check_only)) && [[ ${INSTAR_LINTIAN:-} != 1 ]]; then
        : # ~30 s; tools/package.sh runs it once (--check-only)
    elif command -v lintian >/dev/null; then
        # Root builds: lintian refuses to run as root without this.
        if ! lintian --allow-root --fail-on error --tag-display-limit 0 "$PKG" >"$WORK/lintian" 2>&1; then
            cat "$WORK/lintian" >&2
            fail "lintian reports errors"
        fi
        say "lintian: no errors ($(grep -c . "$WORK/lintian" || true) lines: warnings/info below)"
        sed 's/^/  /' "$WORK/lintian" >&2
    elif [[ ${INSTAR_REQUIRE_LINTIAN:-} == 1 ]]; then
        fail "lintian is not installed (apt-get install lintian)"
    else
        say "lintian not installed: skipped (INSTAR_REQUIRE_LINTIAN=1 to require it)"
    fi
else
    rpm -qpi "$PKG" >"$WORK/rpm-qpi" 2>&1 || fail "rpm -qpi failed: $(cat "$WORK/rpm-qpi")"
    q() { rpm -qp --qf "%{$1}" "$PKG"; }
    field_is Name "$(q NAME)" instar
    field_is Arch "$(q ARCH)" x86_64
    field_is License "$(q LICENSE)" Apache-2.0
    [[ $(q URL) == https://* ]] || fail "rpm URL is '$(q URL)'"
    [[ $(q SUMMARY) == *qemu-img* ]] || fail "rpm Summary does not say what instar is"
    k=$(rpm -K "$PKG" 2>&1) || fail "rpm -K: $k"
    [[ $k == *"digests OK"* || $k == *"digests signatures OK"* ]] || fail "rpm -K: $k"
    if rpm -qpR "$PKG" | grep -v '^rpmlib(' | grep -q .; then
        fail "the rpm requires more than rpmlib features: $(rpm -qpR "$PKG" | tr '\n' ' ')"
    fi
    say "rpm -qpi, -K ($k), -qpl, -qpR checked"
fi
if ((check_only)); then
    say "PASS (package checks) $(basename "$PKG")"
    exit 0
fi

# --- install into a fresh copy of the root -------------------------------
need bwrap bubblewrap
[[ -c /dev/kvm ]] || fail "/dev/kvm is missing: instar needs KVM"
src=$("$REPO/tools/distro-root.sh" "$DISTRO" | tail -n 1) || fail "cannot build or find the root '$DISTRO'"
[[ -d $src ]] || fail "tools/distro-root.sh printed no root directory for '$DISTRO'"
ROOT=$WORK/root
s=$(date +%s)
cp -a --reflink=auto "$src" "$ROOT"
rm -f "$ROOT/.instar-root-stamp"
# The cached roots are minimal (dpkg path-exclude drops docs and man pages);
# a user's system installs them, and the test must see every file.
if [[ -d $ROOT/etc/dpkg/dpkg.cfg.d ]]; then
    sed -i '/^path-exclude/d' "$ROOT"/etc/dpkg/dpkg.cfg.d/*
fi
if [[ $kind == deb ]]; then
    cp "$PKG" "$ROOT/tmp/instar.deb"
    # The root's own dpkg: it must understand the package format.
    bwrap --bind "$ROOT" / --dev /dev --proc /proc --unshare-net --die-with-parent \
        --setenv PATH /usr/sbin:/usr/bin:/sbin:/bin \
        dpkg -i /tmp/instar.deb >"$WORK/install.log" 2>&1 ||
        { cat "$WORK/install.log" >&2; fail "dpkg -i in $DISTRO failed"; }
    rm -f "$ROOT/tmp/instar.deb"
else
    rpm --root "$ROOT" --dbpath /var/lib/rpm -ivh --nodeps "$PKG" >"$WORK/install.log" 2>&1 ||
        { cat "$WORK/install.log" >&2; fail "rpm -ivh --root in $DISTRO failed"; }
    rpm --root "$ROOT" --dbpath /var/lib/rpm -V instar >&2 || fail "rpm -V instar in the root failed"
fi
say "installed $(basename "$PKG") into a copy of $DISTRO in $(( $(date +%s) - s )) s"

while read -r mode path; do
    [[ -f $ROOT$path ]] || fail "$path is missing after the install"
    have=$(stat -c '%04a' "$ROOT$path")
    [[ $have == "$mode" ]] || fail "$path has mode $have after the install, expected $mode"
done <"$WORK/expected"
for gz in "$ROOT"/usr/share/man/man1/instar*.gz; do
    gzip -t "$gz" || fail "broken man page $gz"
done
if ((install_only)); then
    [[ ! -e $DEST ]] || fail "$DEST exists"
    mv "$ROOT" "$DEST"
    say "installed into $DEST"
    exit 0
fi

# --- run it inside the root ---------------------------------------------
printf '%s\n' "${implemented[@]}" >"$WORK/implemented"
cp "$REPO/tools/package-smoke.sh" "$WORK/smoke.sh"
mkdir -p "$WORK/smoke" "$ROOT/smoke"
touch "$ROOT/smoke.sh" # mount points in the read-only root
cp "$WORK/implemented" "$WORK/smoke/implemented"
s=$(date +%s)
set +e
bwrap --ro-bind "$ROOT" / --dev /dev --dev-bind /dev/kvm /dev/kvm --proc /proc \
    --tmpfs /tmp --bind "$WORK/smoke" /smoke --ro-bind "$WORK/smoke.sh" /smoke.sh \
    --unshare-all --die-with-parent --clearenv \
    --setenv HOME /tmp --setenv LANG C.UTF-8 --setenv TZ "${TZ:-UTC}" \
    sh /smoke.sh 2>&1 | sed "s/^/  [$DISTRO] /" >&2
rc=${PIPESTATUS[0]}
set -e
((rc == 0)) || fail "$(basename "$PKG") in $DISTRO (see the lines above; INSTAR_KEEP=1 keeps $WORK)"
say "PASS $(basename "$PKG") in $DISTRO ($(( $(date +%s) - s )) s in the root)"
