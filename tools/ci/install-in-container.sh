#!/bin/sh
# Inside a CI container (GitHub workflow): install instar's package of KIND
# (deb|rpm) from DIR with the distribution's package manager, plus that
# distribution's qemu-img and what the functional suite needs (Python 3
# with venv, bash, gcc-free). Usage: install-in-container.sh KIND DIR
set -eu
kind=$1
dir=$2
case $kind in
deb)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends qemu-utils python3 python3-venv bash ca-certificates
    apt-get install -y -q "./$(ls "$dir"/instar_*.deb | head -n 1)"
    ;;
rpm)
    dnf install -y -q qemu-img python3 bash
    dnf install -y -q "$(ls "$dir"/instar-*.rpm | head -n 1)"
    ;;
*)
    echo "install-in-container.sh: KIND must be deb or rpm" >&2
    exit 2
    ;;
esac
command -v instar
instar --version
qemu-img --version | head -n 1
