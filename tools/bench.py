#!/usr/bin/env python3
"""Side-by-side benchmark of instar against the real qemu-img.

Runs each command with instar and qemu-img alternately on the same image in
the same run, takes the median of N runs of each, and prints the ratio
instar/qemu-img. Timings on shared machines are noisy: read medians and
ratios, never a single run. Images are generated once under the cache
directory and reused.

Convert rows (qcow2->raw, raw->qcow2, qcow2->qcow2 -c, compressed
qcow2->raw, vmdk->qcow2, vhdx->raw, qcow2->vpc, all of the 1 GiB image with
256 MiB of scattered data) write into a scratch directory, removed after
each run; `cp --sparse=always` of the raw image is the floor. A row whose
reader or writer instar lacks prints "not implemented".

Usage: tools/bench.py [--runs N] [--convert-runs N] [--instar PATH] [--qemu-img PATH] [--only NAME]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
GIB = 1024 * MIB


def sh(*args, **kw):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, **kw)


def make_images(qemu_img: str, qemu_io: str, out: Path) -> dict:
    """Images of the issue's benchmark rows, made once and reused."""
    out.mkdir(parents=True, exist_ok=True)
    images = {}

    # A 1 GiB qcow2 with 256 MiB of data in 1 MiB pieces spread over the disk.
    path = out / "data-1g.qcow2"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        sh(qemu_img, "create", "-q", "-f", "qcow2", str(tmp), "1G")
        cmds = []
        for i in range(256):
            off = i * 4 * MIB
            cmds += ["-c", f"write -P {i % 251 + 1} {off} {MIB}"]
        sh(qemu_io, "-f", "qcow2", *cmds, str(tmp))
        tmp.rename(path)
    images["qcow2 1 GiB with data"] = path

    # Metadata-heavy: 100 GiB virtual, 4 KiB clusters (an L2 table maps
    # only 2 MiB), 4 KiB written every 37 MiB: ~2800 scattered clusters,
    # so map walks thousands of L2 tables and many unallocated L1 entries.
    path = out / "meta-100g-c4k.qcow2"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        sh(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(tmp), "100G")
        cmds = []
        for i in range(100 * 1024 // 37):
            cmds += ["-c", f"write -P {i % 251 + 1} {i * 37 * MIB} 4k"]
        sh(qemu_io, "-f", "qcow2", *cmds, str(tmp))
        tmp.rename(path)
    images["qcow2 100 GiB, 4 KiB clusters, scattered"] = path
    return images


def make_convert_sources(qemu_img: str, out: Path) -> dict:
    """The 1 GiB data image in every source format of the convert rows."""
    base = out / "data-1g.qcow2"
    sources = {"qcow2": base}
    for key, args, name in (
        ("raw", ["-O", "raw"], "data-1g.raw"),
        ("qcow2-c", ["-O", "qcow2", "-c"], "data-1g-c.qcow2"),
        ("vmdk", ["-O", "vmdk"], "data-1g.vmdk"),
        ("vhdx", ["-O", "vhdx"], "data-1g.vhdx"),
    ):
        path = out / name
        if not path.exists():
            tmp = path.with_name("tmp-" + name)
            sh(qemu_img, "convert", *args, str(base), str(tmp))
            tmp.rename(path)
        sources[key] = path
    return sources


def try_run(argv, cwd):
    """(seconds, None) or (None, stderr) when the tool failed."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        return None, r.stderr.decode(errors="replace").strip()
    return elapsed, None


def convert_rows(args, qemu_img: str, cache: Path) -> float:
    """Convert rows: median of --convert-runs alternating runs each."""
    scratch = cache / "bench-out"
    rows = [
        ("convert qcow2 -> raw", ["-O", "raw"], "qcow2", "out.raw"),
        ("convert raw -> qcow2", ["-O", "qcow2"], "raw", "out.qcow2"),
        ("convert qcow2 -> qcow2 -c", ["-O", "qcow2", "-c"], "qcow2", "out.qcow2"),
        ("convert compressed qcow2 -> raw", ["-O", "raw"], "qcow2-c", "out.raw"),
        ("convert vmdk -> qcow2", ["-O", "qcow2"], "vmdk", "out.qcow2"),
        ("convert vhdx -> raw", ["-O", "raw"], "vhdx", "out.raw"),
        ("convert qcow2 -> vpc", ["-O", "vpc"], "qcow2", "out.vpc"),
    ]
    label = " [1 GiB, 256 MiB data]"
    floor = "cp --sparse=always raw (floor)" + label
    rows = [r for r in rows if not args.only or args.only in r[0] + label]
    if not rows and args.only and args.only not in floor:
        return 0.0
    sources = make_convert_sources(qemu_img, cache)
    worst = 0.0

    def fresh():
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)

    for name, opts, src_key, out_name in rows:
        name += label
        src = sources[src_key]
        argv = ["convert", *opts, str(src), str(scratch / out_name)]
        fresh()
        _, err = try_run([args.instar, *argv], scratch)
        if err is not None:
            what = "not implemented" if "not implemented" in err else f"failed: {err.splitlines()[-1]}"
            print(f"{name:<52} {'':>9} {what}")
            continue
        q, i = [], []
        for _ in range(args.convert_runs):
            fresh()
            q.append(time_run([qemu_img, *argv], scratch))
            fresh()
            i.append(time_run([args.instar, *argv], scratch))
        qm, im = statistics.median(q) * 1000, statistics.median(i) * 1000
        worst = max(worst, im / qm)
        print(f"{name:<52} {qm:9.2f} {im:9.2f} {im / qm:7.2f}")
    name = floor
    if not args.only or args.only in name:
        c = []
        for _ in range(args.convert_runs):
            fresh()
            c.append(time_run(["cp", "--sparse=always", str(sources["raw"]), str(scratch / "out.raw")], scratch))
        print(f"{name:<52} {statistics.median(c) * 1000:9.2f}")
    shutil.rmtree(scratch, ignore_errors=True)
    return worst


def time_run(argv, cwd) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, argv))} failed ({r.returncode}): {r.stderr.decode(errors='replace').strip()}")
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=11, help="runs of each tool per row (median is reported; at least 7)")
    ap.add_argument("--instar", default=os.environ.get("INSTAR_BINARY_PATH", str(REPO / "target/release/instar")))
    ap.add_argument("--qemu-img", default=os.environ.get("QEMU_IMG", "qemu-img"))
    ap.add_argument("--cache", default=os.environ.get("INSTAR_CACHE", str(REPO / ".cache")))
    ap.add_argument("--only", help="run only rows whose name contains this text")
    ap.add_argument("--convert-runs", type=int, default=5, help="runs of each tool per convert row (at least 5)")
    args = ap.parse_args()
    if args.runs < 7:
        ap.error("--runs must be at least 7")
    if args.convert_runs < 5:
        ap.error("--convert-runs must be at least 5")
    qemu_img = shutil.which(args.qemu_img) or args.qemu_img
    qemu_io = shutil.which("qemu-io") or str(Path(qemu_img).with_name("qemu-io"))
    # Rows run in the image's directory: make a relative binary path absolute.
    args.instar = str(Path(args.instar).resolve())
    if not Path(args.instar).exists():
        sys.exit(f"bench: instar binary not found at {args.instar} (build with cargo build --release)")

    images = make_images(qemu_img, qemu_io, Path(args.cache) / "bench")
    version = subprocess.run([qemu_img, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"qemu-img: {version}")
    print(f"instar:   {args.instar}")
    print(f"runs per tool per row: {args.runs} (alternating), median in ms\n")

    rows = []
    for image_name, path in images.items():
        for label, extra in (("info", []), ("info --output=json", ["--output=json"])):
            rows.append((f"{label} [{image_name}]", ["info", *extra, path.name], path.parent))
        for label, extra in (("map", []), ("map --output=json", ["--output=json"])):
            rows.append((f"{label} [{image_name}]", ["map", *extra, path.name], path.parent))
        rows.append((f"measure -O qcow2 [{image_name}]", ["measure", "-O", "qcow2", path.name], path.parent))
        rows.append((f"check [{image_name}]", ["check", path.name], path.parent))
    # compare reads every allocated byte of both sides.
    raw = make_convert_sources(qemu_img, Path(args.cache) / "bench")["raw"]
    rows.append(("compare [qcow2 1 GiB with data vs its raw copy]", ["compare", "data-1g.qcow2", raw.name], raw.parent))

    print(f"{'command':<52} {'qemu-img':>9} {'instar':>9} {'ratio':>7}")
    worst = 0.0
    for name, argv, cwd in rows:
        if args.only and args.only not in name:
            continue
        q, i = [], []
        # One warm-up of each so page cache and version caches are equal.
        time_run([qemu_img, *argv], cwd)
        time_run([args.instar, *argv], cwd)
        for _ in range(args.runs):
            q.append(time_run([qemu_img, *argv], cwd))
            i.append(time_run([args.instar, *argv], cwd))
        qm, im = statistics.median(q) * 1000, statistics.median(i) * 1000
        ratio = im / qm
        worst = max(worst, ratio)
        print(f"{name:<52} {qm:9.2f} {im:9.2f} {ratio:7.2f}")
    # --size needs no image: pure arithmetic on both sides.
    if not args.only or "measure" in args.only:
        argv = ["measure", "-O", "qcow2", "--size", "100G"]
        q, i = [], []
        for _ in range(args.runs):
            q.append(time_run([qemu_img, *argv], REPO))
            i.append(time_run([args.instar, *argv], REPO))
        qm, im = statistics.median(q) * 1000, statistics.median(i) * 1000
        worst = max(worst, im / qm)
        print(f"{'measure -O qcow2 --size 100G':<52} {qm:9.2f} {im:9.2f} {im / qm:7.2f}")
    worst = max(worst, convert_rows(args, qemu_img, Path(args.cache) / "bench"))
    print(f"\nworst ratio instar/qemu-img: {worst:.2f}")


if __name__ == "__main__":
    main()
