#!/bin/bash
# Build (or reuse) a minimal distro root holding that distro's real qemu-img,
# so instar's output can be compared with qemu-img versions other than the
# host's. See docs/distro-roots.md.
#
#   tools/distro-root.sh NAME...        build/reuse, print each root's path
#   tools/distro-root.sh --list         known names with suite and mirror
#   tools/distro-root.sh --check NAME   is the suite reachable? (no build)
#   tools/distro-root.sh --rebuild NAME throw the cached root away first
#   tools/distro-root.sh --remove NAME  delete the cached root
#
# Cache: ${INSTAR_CACHE:-$REPO/.cache}/roots/NAME. A root directory exists
# only after a complete build: it is built in NAME.tmp.PID, stamped, then
# renamed. A failed build is deleted and never reused. flock serialises
# concurrent builds of one NAME; different NAMEs may build in parallel.
#
# Mirrors: INSTAR_DEBIAN_MIRROR, INSTAR_DEBIAN_SECURITY_MIRROR,
# INSTAR_UBUNTU_MIRROR override the defaults below (the hosts this machine's
# apt sources and the Ubuntu archive use).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${INSTAR_CACHE:-$REPO/.cache}
ROOTS=$CACHE/roots
DEBIAN_MIRROR=${INSTAR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${INSTAR_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
UBUNTU_MIRROR=${INSTAR_UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}
STAMP=.instar-root-stamp

# name -> "distro suite expected-qemu-series"
declare -A ROOT_TABLE=(
    [debian-bullseye]="debian bullseye 5.2"
    [debian-bookworm]="debian bookworm 7.2"
    [debian-trixie]="debian trixie 10.0"
    [debian-sid]="debian sid 11"
    [ubuntu-focal]="ubuntu focal 4.2"
    [ubuntu-jammy]="ubuntu jammy 6.2"
    [ubuntu-noble]="ubuntu noble 8.2"
    [ubuntu-plucky]="ubuntu plucky 9.2"
    [ubuntu-questing]="ubuntu questing 10.1"
    [ubuntu-resolute]="ubuntu resolute 10.2"
)
ORDER=(ubuntu-focal debian-bullseye ubuntu-jammy debian-bookworm ubuntu-noble
    ubuntu-plucky debian-trixie ubuntu-questing ubuntu-resolute debian-sid)

log() { printf 'distro-root: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_host_tools() {
    local missing=()
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v bwrap >/dev/null || missing+=(bubblewrap)
    command -v dpkg-deb >/dev/null || missing+=(dpkg)
    command -v curl >/dev/null || missing+=(curl)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "need ${missing[*]}; run as root or install them"
    log "installing host tools: ${missing[*]}"
    # apt-get update only when the first install attempt cannot find them.
    apt-get install -y -q "${missing[@]}" >&2 ||
        { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; }
}

parse_name() {
    local entry=${ROOT_TABLE[$1]:-}
    [ -n "$entry" ] || die "unknown root '$1' (try --list)"
    read -r DISTRO SUITE SERIES <<<"$entry"
}

# apt source lines for mmdebstrap: release pocket plus updates and security,
# because distro users run the patched package (CVE backports such as
# CVE-2024-4467 change qemu-img's output without changing X.Y).
sources_for() {
    case $DISTRO in
    debian)
        echo "deb $DEBIAN_MIRROR $SUITE main"
        if [ "$SUITE" != sid ]; then
            echo "deb $DEBIAN_MIRROR $SUITE-updates main"
            echo "deb $DEBIAN_SECURITY_MIRROR $SUITE-security main"
        fi
        ;;
    ubuntu)
        local p
        for p in "" -updates -security; do
            echo "deb $UBUNTU_MIRROR $SUITE$p main universe"
        done
        ;;
    esac
}

release_url() {
    case $DISTRO in
    debian) echo "$DEBIAN_MIRROR/dists/$SUITE/InRelease" ;;
    ubuntu) echo "$UBUNTU_MIRROR/dists/$SUITE/InRelease" ;;
    esac
}

check_reachable() {
    local url code
    url=$(release_url)
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 "$url" || true)
    if [ "$code" = 200 ]; then
        log "$NAME: $url reachable"
        return 0
    fi
    log "$NAME: $url NOT reachable (HTTP '$code')"
    return 1
}

# The Ubuntu archive key is not in bookworm's archive; Debian ships it in
# trixie's ubuntu-keyring package (ubuntu-archive-keyring is only a
# transitional package there). Fetch it with apt from Debian, so its
# signature is checked with the host's Debian keyring, into the cache.
ubuntu_keyring() {
    local kr=$CACHE/keyrings/ubuntu-archive-keyring.gpg
    if [ -s "$kr" ]; then
        echo "$kr"
        return
    fi
    if [ -s /usr/share/keyrings/ubuntu-archive-keyring.gpg ]; then
        echo /usr/share/keyrings/ubuntu-archive-keyring.gpg
        return
    fi
    local t
    t=$(mktemp -d)
    mkdir -p "$t/lists/partial" "$t/cache/archives/partial" "$CACHE/keyrings"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR trixie main" >"$t/sources.list"
    local o=(-o "Dir::Etc::SourceList=$t/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$t/lists" -o "Dir::Cache=$t/cache"
        -o APT::Sandbox::User=root -q)
    apt-get "${o[@]}" update >&2
    (cd "$t" && apt-get "${o[@]}" download ubuntu-keyring >&2)
    dpkg-deb -x "$t"/ubuntu-keyring_*.deb "$t/x"
    cp "$t/x/usr/share/keyrings/ubuntu-archive-keyring.gpg" "$kr.tmp"
    mv "$kr.tmp" "$kr"
    rm -rf "$t"
    echo "$kr"
}

root_qemu_version() {
    bwrap --ro-bind "$1" / --proc /proc --dev /dev --unshare-all \
        --die-with-parent /usr/bin/qemu-img --version 2>&1 | head -1
}

build_root() {
    local dir=$ROOTS/$NAME tmp=$ROOTS/$NAME.tmp.$$
    local keyring_opts=()
    if [ "$DISTRO" = ubuntu ]; then
        keyring_opts=(--keyring="$(ubuntu_keyring)")
    fi
    check_reachable || return 1
    rm -rf "$tmp"
    mkdir -p "$tmp"
    local start end src=()
    mapfile -t src < <(sources_for)
    start=$(date +%s.%N)
    log "$NAME: mmdebstrap $SUITE (log: $ROOTS/$NAME.log)"
    # Check-Valid-Until off: sid (and the mirror's frozen Release files)
    # carry expiry dates in the past. Docs and locales are excluded to keep
    # the root small; they do not affect qemu-img output. Man pages stay:
    # focal's dash postinst fails when /usr/share/man/man1 is missing.
    local common=(--variant=apt --mode=auto
        --aptopt='Acquire::Check-Valid-Until "false"'
        --aptopt='APT::Install-Recommends "false"'
        --dpkgopt='path-exclude=/usr/share/doc/*'
        --dpkgopt='path-exclude=/usr/share/locale/*'
        --dpkgopt='path-exclude=/usr/share/info/*'
        "${keyring_opts[@]}")
    METHOD=include
    if ! mmdebstrap "${common[@]}" --include=qemu-utils \
        "$SUITE" "$tmp" "${src[@]}" >"$ROOTS/$NAME.log" 2>&1; then
        # The host's apt resolves --include; a suite newer than the host's
        # apt can defeat it (questing: "unmet dependencies" then "Can't call
        # external solver '3.0'"). Retry with the suite's own apt.
        if grep -q 'unmet dependencies' "$ROOTS/$NAME.log"; then
            log "$NAME: host apt could not resolve qemu-utils; retrying with the suite's own apt"
            rm -rf "$tmp"
            mkdir -p "$tmp"
            METHOD=chrooted-apt
            mmdebstrap "${common[@]}" \
                --chrooted-customize-hook='apt-get install -y -q qemu-utils' \
                "$SUITE" "$tmp" "${src[@]}" >>"$ROOTS/$NAME.log" 2>&1 || METHOD=failed
        else
            METHOD=failed
        fi
    fi
    if [ "$METHOD" = failed ]; then
        log "$NAME: mmdebstrap failed; last lines of $ROOTS/$NAME.log:"
        tail -15 "$ROOTS/$NAME.log" >&2
        return 1
    fi
    end=$(date +%s.%N)
    [ -x "$tmp/usr/bin/qemu-img" ] || { log "$NAME: no /usr/bin/qemu-img in root"; return 1; }
    local ver pkg size secs
    ver=$(root_qemu_version "$tmp") || { log "$NAME: qemu-img does not run: $ver"; return 1; }
    case $ver in
    "qemu-img version $SERIES"*) ;;
    *) log "$NAME: note: expected qemu $SERIES, got: $ver" ;;
    esac
    pkg=$(chroot "$tmp" dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || echo unknown)
    size=$(du -sm "$tmp" | cut -f1)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    cat >"$tmp/$STAMP" <<EOF
name=$NAME
suite=$SUITE
method=$METHOD
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$secs
size_mb=$size
qemu_utils=$pkg
qemu_img_version=$ver
sources=$(printf '%s; ' "${src[@]}")
EOF
    rm -rf "$dir"
    mv "$tmp" "$dir"
    log "$NAME: built in ${secs}s, ${size} MB, $ver"
}

ensure_root() {
    NAME=$1
    parse_name "$NAME"
    mkdir -p "$ROOTS"
    local dir=$ROOTS/$NAME
    exec 9>"$ROOTS/.$NAME.lock"
    flock 9
    if [ "${REBUILD:-0}" = 1 ]; then
        rm -rf "$dir"
    fi
    # A directory without the stamp is a leftover of an interrupted build
    # (or someone's manual copy): never trust it.
    if [ -d "$dir" ] && [ ! -f "$dir/$STAMP" ]; then
        log "$NAME: $dir has no stamp; removing"
        rm -rf "$dir"
    fi
    rm -rf "$ROOTS/$NAME".tmp.* 2>/dev/null || true
    if [ ! -f "$dir/$STAMP" ]; then
        need_host_tools
        if ! build_root; then
            rm -rf "$ROOTS/$NAME.tmp.$$"
            flock -u 9
            return 1
        fi
    fi
    flock -u 9
    echo "$dir"
}

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

main() {
    [ $# -gt 0 ] || { usage >&2; exit 2; }
    local rc=0 n
    case $1 in
    -h | --help) usage; exit 0 ;;
    --list)
        for n in "${ORDER[@]}"; do
            parse_name "$n"
            local state=missing
            [ -f "$ROOTS/$n/$STAMP" ] && state="built: $(sed -n 's/^qemu_img_version=//p' "$ROOTS/$n/$STAMP")"
            printf '%-16s %-7s %-9s qemu %-5s %s\n' "$n" "$DISTRO" "$SUITE" "$SERIES" "$state"
        done
        exit 0
        ;;
    --check)
        shift
        need_host_tools
        for n in "$@"; do
            NAME=$n
            parse_name "$n"
            check_reachable || rc=1
        done
        exit $rc
        ;;
    --remove)
        shift
        for n in "$@"; do parse_name "$n"; rm -rf "${ROOTS:?}/$n"; done
        exit 0
        ;;
    --rebuild) REBUILD=1; shift ;;
    esac
    for n in "$@"; do
        ensure_root "$n" || rc=1
    done
    exit $rc
}

main "$@"
