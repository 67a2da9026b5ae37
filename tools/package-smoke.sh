#!/bin/sh
# The install smoke test, run INSIDE a system where the package and that
# system's qemu-img are installed: a distro root (tools/test-package-install.sh
# runs it there under bwrap with /dev/kvm) or a container of the GitHub
# workflow. Needs a writable /smoke holding `implemented` (the commands the
# packaged --help lists as implemented, one per line); images are made there
# by the system's own qemu-img. Exit 0 when every case is identical.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /smoke
fail() { echo "FAIL: $*"; exit 1; }
[ "$(command -v instar)" = /usr/bin/instar ] || fail "instar is not /usr/bin/instar on PATH ($(command -v instar))"
instar --help >help.out 2>help.err || fail "instar --help exited $?: $(cat help.err)"
grep -q '^Recognized commands' help.out || fail "instar --help has no command list"
q=$(qemu-img --version | head -n 1)
i=$(instar --version | head -n 1)
case "$i" in "${q% (*} (instar "*) ;; *) fail "instar --version says '$i' for '$q'" ;; esac
if command -v bash >/dev/null; then
    bash -c '. /usr/share/bash-completion/completions/instar && complete -p instar' >/dev/null ||
        fail "the bash completion does not load"
fi

# Images made here by this distribution's own qemu-img.
mkdir img && cd img
qemu-img create -q -f raw base.raw 4M
qemu-img create -q -f qcow2 plain.qcow2 16M
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 8M
qemu-img create -q -f qcow2 -b base.raw -F raw overlay.qcow2 4M 2>/dev/null ||
    qemu-img create -q -f qcow2 -b base.raw overlay.qcow2 4M
# RHEL-family builds may not create these formats (driver whitelist):
# such images are left out, not failed.
for x in vmdk:disk.vmdk vpc:disk.vhd vdi:disk.vdi; do
    qemu-img create -q -f "${x%%:*}" "${x#*:}" 8M 2>/dev/null || echo "note: this qemu-img cannot create ${x%%:*} images"
done
qemu-io -f qcow2 -c 'write -P 7 64k 128k' plain.qcow2 >/dev/null
qemu-io -f raw -c 'write -P 3 0 64k' base.raw >/dev/null
qemu-img snapshot -c first plain.qcow2
n=0; bad=0
run() { # name command...
    n=$((n + 1))
    instar "$@" >"../out/$n.instar.out" 2>"../out/$n.instar.err"; echo $? >"../out/$n.instar.rc"
    qemu-img "$@" >"../out/$n.qemu.out" 2>"../out/$n.qemu.err"; echo $? >"../out/$n.qemu.rc"
    for x in out err rc; do
        if ! cmp -s "../out/$n.instar.$x" "../out/$n.qemu.$x"; then
            echo "DIFF ($x): $*"
            diff "../out/$n.qemu.$x" "../out/$n.instar.$x" | head -n 20
            bad=$((bad + 1))
            break
        fi
    done
}
mkdir ../out
for f in base.raw plain.qcow2 v2.qcow2 overlay.qcow2 disk.vmdk disk.vhd disk.vdi; do
    [ -f "$f" ] || continue
    run info "$f"
    run info --output=json "$f"
done
run info --backing-chain overlay.qcow2
run info --output=json --backing-chain overlay.qcow2
run info missing.qcow2
refused=0
for c in check map; do
    if grep -qx "$c" /smoke/implemented; then
        run "$c" plain.qcow2
        run "$c" --output=json plain.qcow2
        run "$c" overlay.qcow2
    else
        # --help lists it as not implemented: it must say so, not run.
        out=$(instar "$c" plain.qcow2 2>&1); rc=$?
        if [ $rc -eq 1 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] &&
            case "$out" in instar:*) true ;; *) false ;; esac; then
            refused=$((refused + 1))
        else
            echo "DIFF: 'instar $c' is 'not implemented yet' in --help but exited $rc: $(printf '%s' "$out" | head -c 200)"
            bad=$((bad + 1))
        fi
    fi
done
echo "compared $n cases with $q: $((n - bad)) identical, $bad different; $refused commands refused as not implemented"
[ $bad -eq 0 ]
