#!/usr/bin/env python3
"""The local distro matrix: the whole functional suite against the
installed packages, one distro root per entry, each against its own
qemu-img; then a summary table.

    tools/matrix.py                       # every entry below
    tools/matrix.py --distros debian-bookworm,ubuntu-noble
    tools/matrix.py --packages DIR        # reuse built packages
    tools/matrix.py -- -k info            # pytest arguments for every entry
    tools/matrix.py --summarize DIR       # only the table, from DIR/*.json
                                          # (the GitHub workflow's summary)

Packages come from tools/package.sh (built unless --packages names a
directory holding instar_*.deb and instar-*.rpm). Each .deb entry runs
tools/test-package-functional.sh PKG DISTRO; the .rpm entry installs the
.rpm with `rpm --root` into the RPM_ROOT root (Fedora/Rocky roots cannot be
made here; the GitHub workflow runs those in containers). Result JSON per
entry in .cache/matrix/; the table is also written to
.cache/matrix/summary.md. Exit status: non-zero if any entry failed.
See docs/packaging.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Ubuntu 20.04 (qemu 4.2) included: the static binary runs there.
DEB_ENTRIES = [
    "debian-bullseye",
    "debian-bookworm",
    "debian-trixie",
    "debian-sid",
    "ubuntu-focal",
    "ubuntu-jammy",
    "ubuntu-noble",
    "ubuntu-questing",
    "ubuntu-resolute",
]
RPM_ROOT = "debian-bookworm"


def find(pkg_dir: Path, pattern: str) -> Path:
    found = sorted(pkg_dir.glob(pattern))
    if not found:
        sys.exit(f"matrix: no {pattern} in {pkg_dir}")
    return found[-1]


def build_packages() -> Path:
    out = subprocess.run(
        [str(REPO / "tools/package.sh"), "--no-check"], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.split()
    debs = [p for p in out if p.endswith(".deb")]
    if not debs:
        sys.exit("matrix: tools/package.sh printed no .deb")
    return Path(debs[0]).parent


def row_from(result: Path, entry: str, rc: int, seconds) -> dict:
    row = {"entry": entry, "rc": rc, "seconds": seconds}
    if result.exists():
        s = json.loads(result.read_text())
        t = s.get("totals", {})
        row.update(
            qemu=s.get("qemu_img_version"),
            passed=t.get("passed", 0),
            failed=t.get("failed", 0) + t.get("error", 0),
            skipped=t.get("skipped", 0),
            xfailed=t.get("xfailed", 0),
        )
        if rc is None:
            row["rc"] = s.get("exit_status", 1)
    elif rc is None:
        row["rc"] = 1
    return row


def table(rows: list) -> str:
    lines = [
        "| entry | qemu-img | passed | failed | skipped | xfailed | time | result |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']} s"
        lines.append(
            f"| {r['entry']} | {r.get('qemu', '?')} | {r.get('passed', '-')} | {r.get('failed', '-')} "
            f"| {r.get('skipped', '-')} | {r.get('xfailed', '-')} | {secs} "
            f"| {'PASS' if r['rc'] == 0 else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--distros", help="comma-separated .deb entries (default: all)")
    ap.add_argument("--no-rpm", action="store_true", help="skip the .rpm entry")
    ap.add_argument("--packages", type=Path, help="directory with built packages")
    ap.add_argument("--summarize", type=Path, metavar="DIR", help="print the table of DIR/*.json")
    ap.add_argument("pytest_args", nargs="*")
    a = ap.parse_args()
    if a.summarize:
        rows = [row_from(p, p.stem, None, None) for p in sorted(a.summarize.glob("*.json"))]
        if not rows:
            print(f"no results in {a.summarize}")
            return 1
        print(table(rows), end="")
        return 0 if all(r["rc"] == 0 for r in rows) else 1
    distros = a.distros.split(",") if a.distros else DEB_ENTRIES
    pkg_dir = a.packages or build_packages()
    deb, rpm = find(pkg_dir, "instar_*.deb"), None
    entries = [(d, deb) for d in distros]
    if not a.no_rpm:
        rpm = find(pkg_dir, "instar-*.rpm")
        entries.append((RPM_ROOT, rpm))
    out_dir = Path(os.environ.get("INSTAR_MATRIX_DIR", REPO / ".cache/matrix"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for distro, pkg in entries:
        kind = pkg.suffix.lstrip(".")
        result = out_dir / f"{distro}-{kind}.json"
        result.unlink(missing_ok=True)
        t0 = time.time()
        rc = subprocess.call(
            [str(REPO / "tools/test-package-functional.sh"), str(pkg), distro, *a.pytest_args]
        )
        rows.append(row_from(result, f"{distro} ({kind})", rc, round(time.time() - t0)))
    text = table(rows)
    (out_dir / "summary.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text, end="")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
