#!/usr/bin/env python3
"""Capture how real qemu-img versions print, for instar's version profiles.

    tools/capture-evidence.py corpus            make the mini-corpus (host qemu-img)
    tools/capture-evidence.py capture ROOT...   record every case with each root's
                                                qemu-img (ROOT `host` = /usr/bin/qemu-img)
    tools/capture-evidence.py diff              write tests/evidence/DIFFS.md
    tools/capture-evidence.py all               corpus, capture all built roots, diff
    tools/capture-evidence.py convert DIR...    old per-file directories -> <DIR>.json

Evidence lands in one file per version, tests/evidence/<X.Y.Z>.json: full
`qemu-img --version`, where the binary came from, and every case's stdout,
stderr and exit code (format and loader: tools/evidence.py). Images are
not committed: tests/evidence/corpus.json holds the recipe of each one, and
tests/evidence/cases.json the command line of each case, so both can be
regenerated. The corpus lives at a fixed path (CORPUS_DIR) because absolute
paths show up in the output.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence  # noqa: E402  (tools/evidence.py, also used by tests)

REPO = Path(__file__).resolve().parent.parent
EVIDENCE = REPO / "tests" / "evidence"
WRAPPER = REPO / "tools" / "qemu-img-in-root"
CORPUS_DIR = Path("/tmp/instar-evidence/corpus")
HOST_QEMU_IMG = "/usr/bin/qemu-img"
HOST_QEMU_IO = "/usr/bin/qemu-io"

# Oldest first: the order consecutive-version diffs are taken in.
ROOT_ORDER = [
    "ubuntu-focal",
    "debian-bullseye",
    "ubuntu-jammy",
    "debian-bookworm",
    "ubuntu-noble",
    "ubuntu-plucky",
    "debian-trixie",
    "ubuntu-questing",
    "ubuntu-resolute",
    "debian-sid",
]

SECRET = "secret,id=sec0,data=instar"
DATA = ["write -P 0x11 0 64k", "write -P 0x22 1M 128k", "write -P 0x33 40M 64k"]


def qi(*args):
    return ["QEMU_IMG", *args]


def qio(fmt, img, cmds):
    out = ["QEMU_IO", "-f", fmt]
    for c in cmds:
        out += ["-c", c]
    return out + [img]


def conv(fmt, out, *opts):
    return qi("convert", "-f", "raw", "-O", fmt, *opts, "raw.img", out)


# id -> files it makes, recipe (run in CORPUS_DIR), fields that change on
# every regeneration (values then differ between capture runs, never between
# versions of one run: all versions read the same files).
CORPUS = [
    ("raw", ["raw.img"], [qi("create", "-q", "-f", "raw", "raw.img", "64M"), qio("raw", "raw.img", DATA)], []),
    ("odd-raw", ["odd.raw"], [["truncate", "-s", "1023999", "odd.raw"]], []),
    (
        "qcow2-v3",
        ["qcow2-v3.qcow2"],
        [
            qi("create", "-q", "-f", "qcow2", "qcow2-v3.qcow2", "64M"),
            qio("qcow2", "qcow2-v3.qcow2", DATA + ["write -z 2M 64k"]),
        ],
        [],
    ),
    (
        "qcow2-v2",
        ["qcow2-v2.qcow2"],
        [
            qi("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "qcow2-v2.qcow2", "64M"),
            qio("qcow2", "qcow2-v2.qcow2", DATA),
        ],
        [],
    ),
    ("empty-1g", ["empty.qcow2"], [qi("create", "-q", "-f", "qcow2", "empty.qcow2", "1G")], []),
    (
        "base",
        ["base.qcow2"],
        [qi("create", "-q", "-f", "qcow2", "base.qcow2", "64M"), qio("qcow2", "base.qcow2", DATA)],
        [],
    ),
    (
        "overlay",
        ["overlay.qcow2"],
        [
            qi("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "overlay.qcow2"),
            qio("qcow2", "overlay.qcow2", ["write -P 0x44 512k 64k"]),
        ],
        [],
    ),
    (
        "overlay2",
        ["overlay2.qcow2"],
        [
            qi("create", "-q", "-f", "qcow2", "-b", "overlay.qcow2", "-F", "qcow2", "overlay2.qcow2"),
            qio("qcow2", "overlay2.qcow2", ["write -P 0x55 2M 64k"]),
        ],
        [],
    ),
    (
        "overlay-v2",
        ["overlay-v2.qcow2"],
        [qi("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", "overlay-v2.qcow2")],
        [],
    ),
    (
        "overlay-raw",
        ["overlay-raw.qcow2"],
        [qi("create", "-q", "-f", "qcow2", "-b", "raw.img", "-F", "raw", "overlay-raw.qcow2")],
        [],
    ),
    (
        "overlay-abs",
        ["overlay-abs.qcow2"],
        [qi("create", "-q", "-f", "qcow2", "-b", str(CORPUS_DIR / "base.qcow2"), "-F", "qcow2", "overlay-abs.qcow2")],
        [],
    ),
    (
        "overlay-missing",
        ["overlay-missing.qcow2"],
        [qi("create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "overlay-missing.qcow2", "64M")],
        [],
    ),
    (
        "snap",
        ["snap.qcow2"],
        [
            qi("create", "-q", "-f", "qcow2", "snap.qcow2", "64M"),
            qio("qcow2", "snap.qcow2", DATA[:1]),
            qi("snapshot", "-c", "snap1", "snap.qcow2"),
            qio("qcow2", "snap.qcow2", DATA[1:]),
            qi("snapshot", "-c", "second-snapshot", "snap.qcow2"),
        ],
        ["snapshot DATE column, date-sec, date-nsec: creation time"],
    ),
    (
        "bitmaps",
        ["bitmaps.qcow2"],
        [
            qi("create", "-q", "-f", "qcow2", "bitmaps.qcow2", "64M"),
            qi("bitmap", "--add", "bitmaps.qcow2", "b0"),
            qi("bitmap", "--add", "-g", "131072", "bitmaps.qcow2", "b1"),
            qi("bitmap", "--disable", "bitmaps.qcow2", "b1"),
            qio("qcow2", "bitmaps.qcow2", DATA),
        ],
        [],
    ),
    (
        "luks-qcow2",
        ["luks.qcow2"],
        [
            qi(
                "create", "-q", "--object", SECRET, "-f", "qcow2",
                "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                "luks.qcow2", "64M",
            )
        ],
        ["LUKS uuid (random)", "LUKS iters / master-key-iters (benchmarked from iter-time)"],
    ),
    (
        "luks-raw",
        ["luks.luks"],
        [qi("create", "-q", "--object", SECRET, "-f", "luks", "-o", "key-secret=sec0,iter-time=10", "luks.luks", "64M")],
        ["LUKS uuid (random)", "LUKS iters / master-key-iters (benchmarked from iter-time)"],
    ),
    ("vmdk-mono", ["vmdk-mono.vmdk"], [conv("vmdk", "vmdk-mono.vmdk", "-o", "subformat=monolithicSparse")], ["vmdk cid (random)"]),
    (
        "vmdk-2gb",
        ["vmdk-2gb.vmdk", "vmdk-2gb-s001.vmdk", "vmdk-2gb-s002.vmdk"],
        [
            qi("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "vmdk-2gb.vmdk", "3G"),
            qio("vmdk", "vmdk-2gb.vmdk", ["write -P 0x11 0 64k", "write -P 0x22 2560M 64k"]),
        ],
        ["vmdk cid (random)"],
    ),
    ("vmdk-stream", ["vmdk-stream.vmdk"], [conv("vmdk", "vmdk-stream.vmdk", "-o", "subformat=streamOptimized")], ["vmdk cid (random)"]),
    ("vpc-dynamic", ["vpc-dynamic.vhd"], [conv("vpc", "vpc-dynamic.vhd", "-o", "subformat=dynamic")], []),
    ("vpc-fixed", ["vpc-fixed.vhd"], [conv("vpc", "vpc-fixed.vhd", "-o", "subformat=fixed")], []),
    ("vhdx", ["vhdx.vhdx"], [conv("vhdx", "vhdx.vhdx")], []),
    ("vdi", ["vdi.vdi"], [conv("vdi", "vdi.vdi")], []),
    ("qed", ["qed.qed"], [conv("qed", "qed.qed")], []),
    ("parallels", ["parallels.img"], [conv("parallels", "parallels.img")], []),
    ("qcow", ["qcow.qcow"], [conv("qcow", "qcow.qcow")], []),
    (
        "datafile",
        ["datafile.qcow2", "datafile.data"],
        [
            qi("create", "-q", "-f", "qcow2", "-o", "data_file=datafile.data,data_file_raw=on", "datafile.qcow2", "64M"),
            qio("qcow2", "datafile.qcow2", DATA),
        ],
        [],
    ),
    (
        "bigger",
        ["bigger.qcow2"],
        [qi("create", "-q", "-f", "qcow2", "-b", "raw.img", "-F", "raw", "bigger.qcow2", "128M")],
        [],
    ),
    # Refcount damage in a copy of qcow2-v3 (clusters: 0 header, 1 refcount
    # table, 2 refcount block at 0x20000 with 16-bit entries, 3 L1, 4 L2,
    # 5-8 data). PATCH FILE OFFSET HEX writes bytes in place.
    (
        "leaks",
        ["leaks.qcow2"],
        [["cp", "qcow2-v3.qcow2", "leaks.qcow2"], ["PATCH", "leaks.qcow2", "0x20012", "0001"],
         ["truncate", "-s", "655360", "leaks.qcow2"]],
        [],
    ),
    (
        "corrupt",
        ["corrupt.qcow2"],
        [["cp", "qcow2-v3.qcow2", "corrupt.qcow2"], ["PATCH", "corrupt.qcow2", "0x2000a", "0000"]],
        [],
    ),
    (
        "corrupt-leaks",
        ["corrupt-leaks.qcow2"],
        [["cp", "qcow2-v3.qcow2", "corrupt-leaks.qcow2"], ["PATCH", "corrupt-leaks.qcow2", "0x2000a", "0000"],
         ["PATCH", "corrupt-leaks.qcow2", "0x20012", "0001"], ["truncate", "-s", "655360", "corrupt-leaks.qcow2"]],
        [],
    ),
    ("compressed", ["compressed.qcow2"], [qi("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "raw.img", "compressed.qcow2")], []),
]

# Images that every standard case runs on: id -> file name given to qemu-img.
IMAGES = {cid: files[0] for cid, files, _, _ in CORPUS}

STANDARD = [
    ("info", ["info"]),
    ("info-json", ["info", "--output=json"]),
    ("info-bc", ["info", "--backing-chain"]),
    ("info-bc-json", ["info", "--backing-chain", "--output=json"]),
    ("check", ["check"]),
    ("check-json", ["check", "--output=json"]),
    ("map", ["map"]),
    ("map-json", ["map", "--output=json"]),
    ("measure-qcow2", ["measure", "-O", "qcow2"]),
    ("measure-qcow2-json", ["measure", "--output=json", "-O", "qcow2"]),
    ("measure-raw", ["measure", "-O", "raw"]),
    ("measure-raw-json", ["measure", "--output=json", "-O", "raw"]),
]

C = str(CORPUS_DIR)
KEYED = "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0"
EXTRA = [
    # Absolute paths: `image:` line, backing `(actual path: ...)`, children.
    ("abs-info-raw", ["info", f"{C}/raw.img"], ""),
    ("abs-info-overlay", ["info", f"{C}/overlay.qcow2"], ""),
    ("abs-info-json-overlay", ["info", "--output=json", f"{C}/overlay.qcow2"], ""),
    ("abs-info-bc-overlay2", ["info", "--backing-chain", f"{C}/overlay2.qcow2"], ""),
    ("abs-info-bc-json-overlay2", ["info", "--backing-chain", "--output=json", f"{C}/overlay2.qcow2"], ""),
    ("abs-info-datafile", ["info", f"{C}/datafile.qcow2"], ""),
    ("abs-info-json-datafile", ["info", "--output=json", f"{C}/datafile.qcow2"], ""),
    ("abs-info-vmdk-2gb", ["info", f"{C}/vmdk-2gb.vmdk"], ""),
    ("abs-info-overlay-abs", ["info", f"{C}/overlay-abs.qcow2"], ""),
    ("abs-map-json-overlay2", ["map", "--output=json", f"{C}/overlay2.qcow2"], ""),
    ("abs-check-overlay", ["check", f"{C}/overlay.qcow2"], ""),
    # Snapshots.
    ("snapshot-list", ["snapshot", "-l", "snap.qcow2"], "DATE column volatile"),
    # Explicit formats and options.
    ("info-f-qcow2-on-raw", ["info", "-f", "qcow2", "raw.img"], ""),
    ("info-f-raw-on-qcow2", ["info", "-f", "raw", "qcow2-v3.qcow2"], ""),
    ("info-U", ["info", "-U", "qcow2-v3.qcow2"], ""),
    ("info-output-space-json", ["info", "--output", "json", "raw.img"], ""),
    ("map-start-len", ["map", "--output=json", "--start-offset=1M", "--max-length=2M", "qcow2-v3.qcow2"], ""),
    ("check-mapped", ["check", "--output=json", "-f", "qcow2", "qcow2-v3.qcow2"], ""),
    ("luks-info-key", ["info", "--object", SECRET, "--image-opts", KEYED], "LUKS uuid/iters volatile"),
    ("luks-check-key", ["check", "--object", SECRET, "--image-opts", KEYED], ""),
    ("luks-map-key", ["map", "--output=json", "--object", SECRET, "--image-opts", KEYED], ""),
    ("measure-size", ["measure", "--size", "1G", "-O", "qcow2"], ""),
    ("measure-size-json", ["measure", "--output=json", "--size", "1G", "-O", "qcow2"], ""),
    ("measure-vmdk-target", ["measure", "-O", "vmdk", "raw.img"], ""),
    ("measure-opts", ["measure", "-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on", "qcow2-v3.qcow2"], ""),
    # compare
    ("compare-identical", ["compare", "raw.img", "qcow2-v3.qcow2"], ""),
    ("compare-identical-fmt", ["compare", "-f", "raw", "-F", "qcow2", "raw.img", "qcow2-v3.qcow2"], ""),
    ("compare-mismatch", ["compare", "raw.img", "overlay.qcow2"], ""),
    ("compare-quiet-mismatch", ["compare", "-q", "raw.img", "overlay.qcow2"], ""),
    ("compare-strict", ["compare", "-s", "raw.img", "qcow2-v3.qcow2"], ""),
    ("compare-size", ["compare", "raw.img", "empty.qcow2"], ""),
    ("compare-strict-size", ["compare", "-s", "raw.img", "empty.qcow2"], ""),
    ("compare-bigger", ["compare", "raw.img", "bigger.qcow2"], ""),
    ("compare-strict-bigger", ["compare", "-s", "raw.img", "bigger.qcow2"], ""),
    ("compare-quiet-identical", ["compare", "-q", "raw.img", "qcow2-v3.qcow2"], ""),
    ("check-quiet-corrupt-leaks", ["check", "-q", "corrupt-leaks.qcow2"], ""),
    ("compare-chain", ["compare", "base.qcow2", "overlay-v2.qcow2"], ""),
    ("compare-missing", ["compare", "raw.img", "nonexistent.img"], ""),
    # Usage and open errors.
    ("err-info-nofile", ["info"], ""),
    ("err-info-twofiles", ["info", "raw.img", "qcow2-v3.qcow2"], ""),
    ("err-info-xml", ["info", "--output=xml", "raw.img"], ""),
    ("err-info-bogus", ["info", "--bogus", "raw.img"], ""),
    ("err-info-short-bogus", ["info", "-Z", "raw.img"], ""),
    ("err-unknown-command", ["bogus"], ""),
    ("err-no-command", [], ""),
    ("err-check-nofile", ["check"], ""),
    ("err-map-nofile", ["map"], ""),
    ("err-measure-noargs", ["measure"], ""),
    ("err-compare-onefile", ["compare", "raw.img"], ""),
    ("err-info-nonexistent", ["info", "nonexistent.img"], ""),
    ("err-info-badfmt", ["info", "-f", "foo", "raw.img"], ""),
    ("err-info-dir", ["info", "."], ""),
    ("err-check-missing-backing", ["check", "overlay-missing.qcow2"], ""),
    ("err-map-missing-backing", ["map", "overlay-missing.qcow2"], ""),
    ("err-info-bc-missing-backing", ["info", "--backing-chain", "overlay-missing.qcow2"], ""),
    ("err-luks-check-nokey", ["check", "luks.qcow2"], ""),
    ("err-create-badsize", ["create", "-f", "qcow2", "/tmp/instar-evidence/never.qcow2", "1Q"], ""),
    ("err-map-bad-output", ["map", "--output=xml", "raw.img"], ""),
    ("err-check-bad-output", ["check", "--output=xml", "qcow2-v3.qcow2"], ""),
    ("info-limits", ["info", "--limits", "qcow2-v3.qcow2"], "option new in 10.2"),
    ("info-limits-json", ["info", "--limits", "--output=json", "qcow2-v3.qcow2"], "option new in 10.2"),
    ("version", ["--version"], ""),
    ("version-short", ["-V"], ""),
    ("help", ["--help"], "full help; the first 3 lines are the usage header"),
    ("help-h", ["-h"], ""),
    ("info-help", ["info", "--help"], ""),
    ("check-help", ["check", "--help"], ""),
]

# Cases run with qemu-img's argv[0] set to a full path, to show which
# messages print argv[0] verbatim.
ARGV0_CASES = [
    ("argv0-err-info-nofile", ["info"]),
    ("argv0-err-info-bogus", ["info", "--bogus", "raw.img"]),
    ("argv0-err-unknown-command", ["bogus"]),
    ("argv0-help-head", ["--help"]),
]


def all_cases():
    cases = {}
    for img_id, img in IMAGES.items():
        for name, args in STANDARD:
            cases[f"{name}--{img_id}"] = {"argv": args + [img], "argv0": "qemu-img"}
    for name, args, note in EXTRA:
        cases[name] = {"argv": args, "argv0": "qemu-img"}
        if note:
            cases[name]["note"] = note
    for name, args in ARGV0_CASES:
        cases[name] = {"argv": args, "argv0": "/usr/bin/qemu-img"}
    return cases


# Lines whose values are random or time-dependent in the corpus. They are
# equal across versions within one capture run but change on regeneration.
VOLATILE = {
    "snapshot human rows (DATE)": r"^\S+\s+\S+\s+\d.*\d{4}-\d\d-\d\d \d\d:\d\d:\d\d",
    "snapshot json date-sec/date-nsec": r'"date-(sec|nsec)": \d+',
    "vmdk cid": r'^\s*cid: \d+$|"cid": \d+',
    "luks uuid": r"uuid: [0-9a-f-]{36}|\"uuid\": \"[0-9a-f-]{36}\"",
    "luks iters": r"iters: \d+|\"(master-key-)?iters\": \d+|master key iters: \d+",
    "disk size (filesystem-dependent, not random)": r"^disk size: |\"actual-size\": \d+|^ *disk size: ",
}


def run(cmd, cwd, env=None, timeout=120):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=timeout)


def make_corpus(_args):
    if CORPUS_DIR.exists():
        shutil.rmtree(CORPUS_DIR)
    CORPUS_DIR.mkdir(parents=True)
    env = dict(os.environ, TZ="UTC", LANG="C.UTF-8")
    manifest = {
        "corpus_dir": str(CORPUS_DIR),
        "made_with": run([HOST_QEMU_IMG, "--version"], "/").stdout.decode().splitlines()[0],
        "note": "QEMU_IMG/QEMU_IO = host qemu-img/qemu-io; commands run in corpus_dir with TZ=UTC. "
        "sha256 of images with volatile fields changes on every regeneration.",
        "images": [],
    }
    for cid, files, recipe, volatile in CORPUS:
        for step in recipe:
            if step[0] == "PATCH":
                with open(CORPUS_DIR / step[1], "r+b") as f:
                    f.seek(int(step[2], 0))
                    f.write(bytes.fromhex(step[3]))
                continue
            cmd = [HOST_QEMU_IMG if a == "QEMU_IMG" else HOST_QEMU_IO if a == "QEMU_IO" else a for a in step]
            r = run(cmd, CORPUS_DIR, env)
            if r.returncode != 0:
                sys.exit(f"corpus {cid}: {' '.join(cmd)} failed: {r.stderr.decode()}")
        entry = {"id": cid, "files": {}, "recipe": [" ".join(shlex_quote(a) for a in s) for s in recipe]}
        for f in files:
            p = CORPUS_DIR / f
            entry["files"][f] = {
                "size": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
        if volatile:
            entry["volatile"] = volatile
        manifest["images"].append(entry)
    EVIDENCE.mkdir(parents=True, exist_ok=True)
    (EVIDENCE / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_cases()
    print(f"corpus: {len(CORPUS)} images in {CORPUS_DIR}")


def write_cases():
    (EVIDENCE / "cases.json").write_text(
        json.dumps({"cwd": str(CORPUS_DIR), "env": {"TZ": "UTC", "LANG": "C.UTF-8"},
                    "volatile_patterns": VOLATILE, "cases": all_cases()}, indent=2) + "\n"
    )


def shlex_quote(a):
    import shlex

    return shlex.quote(a)


def runner(root, argv0):
    """Command prefix running qemu-img of `root` with the given argv[0]."""
    if root == "host":
        return ["bash", "-c", 'exec -a "$0" /usr/bin/qemu-img "$@"', argv0], {}
    return [str(WRAPPER)], {"INSTAR_DISTRO_ROOT": root, "INSTAR_QEMU_IMG_ARGV0": argv0,
                            "INSTAR_DISTRO_ROOT_NO_BUILD": "1"}


def version_of(root):
    pre, extra = runner(root, "qemu-img")
    r = run(pre + ["--version"], "/", dict(os.environ, **extra))
    out = r.stdout.decode()
    m = re.match(r"qemu-img version (\d+\.\d+\.\d+)", out)
    if not m:
        sys.exit(f"{root}: cannot read version: {out!r} {r.stderr!r}")
    return m.group(1), out


def capture(args):
    if not CORPUS_DIR.exists():
        sys.exit("no corpus: run `tools/capture-evidence.py corpus` first")
    cases = all_cases()
    write_cases()
    for root in args.roots:
        ver, full = version_of(root)
        label = args.name or ver
        if label in evidence.RESERVED:
            sys.exit(f"{label}: name reserved for {label}.json")
        out = evidence.path(label, EVIDENCE)
        if out.exists():
            prev = (evidence.load_raw(label, EVIDENCE).get("root") or root).split()[0]
            if prev != root and not args.force:
                sys.exit(f"{out} already holds evidence from {prev}; use --name")
        stamp = ""
        if root == "host":
            q = run(["dpkg-query", "-W", "-f=${Version}", "qemu-utils"], "/")
            stamp = f" qemu-utils {q.stdout.decode() or '?'} (/usr/bin/qemu-img of this machine)"
        else:
            sf = cache_dir() / "roots" / root / ".instar-root-stamp"
            st = dict(l.split("=", 1) for l in sf.read_text().splitlines() if "=" in l)
            stamp = f" qemu-utils {st.get('qemu_utils', '?')} ({st.get('suite', '?')})"
        got = {}
        for name, case in cases.items():
            pre, extra = runner(root, case["argv0"])
            env = dict(os.environ, TZ="UTC", LANG="C.UTF-8", **extra)
            env.pop("LC_ALL", None)
            r = run(pre + case["argv"], CORPUS_DIR, env)
            # The sandbox, not qemu-img, failed: never record that as evidence.
            if re.search(rb"^(bwrap|qemu-img-in-root):", r.stderr, re.M):
                sys.exit(f"{root} {name}: wrapper failure: {r.stderr.decode(errors='replace')}")
            got[name] = {"stdout": r.stdout, "stderr": r.stderr, "rc": r.returncode}
        # Written only when every case ran: a failed capture keeps the old file.
        evidence.save(label, full, f"{root}{stamp}\n", got, EVIDENCE)
        print(f"{root}: {ver}: {len(cases)} cases -> {out.relative_to(REPO)}")


def convert(args):
    """Turn directories of the old layout (<case>.stdout/.stderr/.rc, VERSION,
    ROOT) into <dir>.json next to them; the directories are left alone."""
    for d in map(Path, args.dirs):
        if not (d / "VERSION").is_file():
            sys.exit(f"{d}: no VERSION file, not an evidence directory")
        cases = {}
        for f in sorted(d.glob("*.rc")):
            name = f.name[: -len(".rc")]
            rc = f.read_text()
            if not re.fullmatch(r"-?\d+\n", rc):
                sys.exit(f"{f}: unexpected exit code text {rc!r}")
            cases[name] = {
                "stdout": (d / f"{name}.stdout").read_bytes(),
                "stderr": (d / f"{name}.stderr").read_bytes(),
                "rc": int(rc),
            }
        root = (d / "ROOT").read_text() if (d / "ROOT").exists() else ""
        out = evidence.save(d.name, (d / "VERSION").read_text(), root, cases, d.parent)
        print(f"{d}: {len(cases)} cases -> {out}")


def text(data):
    """What the old per-file reader saw (text mode: bad bytes replaced,
    universal newlines), so DIFFS.md does not change with the storage."""
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def hunks(ta, tb):
    """Changed regions of two texts as (removed lines, added lines)."""
    import difflib

    a, b = ta.splitlines(), tb.splitlines()
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            out.append((tuple(a[i1:i2]), tuple(b[j1:j2])))
    return out


def diff(_args):
    """Group identical changes across cases so every distinct change shows once."""
    vers = evidence.versions(EVIDENCE)
    loaded = {v: evidence.load(v, EVIDENCE)["cases"] for v in vers}
    cases = all_cases()

    def streams(v, name):
        c = loaded[v].get(name)
        if c is None:
            return {"stdout": "", "stderr": "", "rc": ""}
        return {"stdout": text(c["stdout"]), "stderr": text(c["stderr"]), "rc": f"{c['rc']}\n"}

    lines = [
        "# Differences between consecutive qemu-img versions (generated)",
        "",
        "Generated by `tools/capture-evidence.py diff` from the `<version>.json`",
        "files in this directory; README.md has the curated summary. For each pair",
        "of consecutive versions, every distinct changed region (`-` old lines, `+`",
        "new lines) is shown once, with the cases (`<case>.<stream>`) where it",
        "occurs. Help and version output is listed last per section.",
        "",
    ]
    # Partition view: per case, versions with equal output share a letter.
    parts = {}
    for name in cases:
        seen, labels = {}, []
        for v in vers:
            c = loaded[v].get(name)
            key = (c["stdout"], c["stderr"], c["rc"]) if c else None
            labels.append(seen.setdefault(key, chr(ord("A") + len(seen))))
        parts.setdefault("".join(labels), []).append(name)
    lines.append("## Which versions agree")
    lines.append("")
    lines.append("One letter per version, in this order: " + " ".join(vers) + ".")
    lines.append("Equal letters = byte-identical stdout, stderr and exit code for that case.")
    lines.append("")
    lines.append("```")
    for pat, names in sorted(parts.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"{pat} {len(names):3d}  " + " ".join(names))
    lines.append("```")
    lines.append("")
    for a, b in zip(vers, vers[1:]):
        groups = {}
        ncases = 0
        for name in cases:
            hit = False
            sa, sb = streams(a, name), streams(b, name)
            for ext in ("stdout", "stderr", "rc"):
                ta, tb = sa[ext], sb[ext]
                if ta == tb:
                    continue
                hit = True
                for h in hunks(ta, tb):
                    groups.setdefault(h, []).append(f"{name}.{ext}")
            ncases += hit
        lines.append(f"## {a} -> {b}: {ncases} of {len(cases)} cases differ, {len(groups)} distinct changes")
        lines.append("")

        def is_help(item):
            return all(re.match(r"(argv0-)?(help|version|.*-help)", c) for c in item[1])

        for (old, new), where in sorted(groups.items(), key=lambda kv: (is_help(kv), -len(kv[1]))):
            shown = ", ".join(where[:8]) + (f", ... ({len(where)} in all)" if len(where) > 8 else "")
            lines.append(f"- in {shown}")
            lines.append("")
            lines.append("```diff")
            lines.extend("-" + l for l in old[:40])
            if len(old) > 40:
                lines.append(f"-... ({len(old) - 40} more lines)")
            lines.extend("+" + l for l in new[:40])
            if len(new) > 40:
                lines.append(f"+... ({len(new) - 40} more lines)")
            lines.append("```")
            lines.append("")
    (EVIDENCE / "DIFFS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {EVIDENCE / 'DIFFS.md'} ({len(vers)} versions)")


def cache_dir():
    return Path(os.environ.get("INSTAR_CACHE") or REPO / ".cache")


def built_roots():
    cache = cache_dir() / "roots"
    return [r for r in ROOT_ORDER if (cache / r / ".instar-root-stamp").exists()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("corpus").set_defaults(fn=make_corpus)
    c = sub.add_parser("capture")
    c.add_argument("roots", nargs="+")
    c.add_argument("--name", help="evidence name, file <name>.json (default: X.Y.Z)")
    c.add_argument("--force", action="store_true")
    c.set_defaults(fn=capture)
    sub.add_parser("diff").set_defaults(fn=diff)
    v = sub.add_parser("convert")
    v.add_argument("dirs", nargs="+")
    v.set_defaults(fn=convert)
    a = sub.add_parser("all")
    a.set_defaults(fn=None)
    args = ap.parse_args()
    if args.cmd == "all":
        make_corpus(args)
        args.roots, args.name, args.force = built_roots(), None, True
        capture(args)
        diff(args)
    else:
        args.fn(args)


if __name__ == "__main__":
    main()
