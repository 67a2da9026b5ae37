#!/usr/bin/env python3
"""Generate instar's test corpus: safe images made by qemu-img/qemu-io with
many option combinations, hand-built hostile images, and the shared
real-world samples, plus DIR/manifest.json describing every file.

Usage: python3 tools/gen-corpus.py [--out DIR] [--force] [--jobs N]

See docs/corpus.md. Python 3.11 stdlib only; needs qemu-img and qemu-io.
"""

import argparse
import bz2
import concurrent.futures
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from corpus import binfmt as B  # noqa: E402

# Bump whenever a recipe changes: the suite's cache is keyed on it.
GENERATOR_VERSION = 2

REPO = os.path.dirname(HERE)
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
SECRET = "instar-corpus"
SECRET_OBJ = f"secret,id=s0,data={SECRET}"
# Timeout for every qemu command: hostile images must not hang the build.
CMD_TIMEOUT = 60
INFO_TIMEOUT = 20

K = 1024
M = 1024 * K
G = 1024 * M
T = 1024 * G


class BuildError(Exception):
    pass


class Image:
    """One manifest entry under construction. Commands run with cwd = the
    group directory, so the recorded recipe uses the same relative names."""

    def __init__(self, group, id, fname, category, tier, chain, notes):
        self.group = group
        self.id = id
        self.fname = fname
        self.category = category
        self.tier = tier
        self.chain = list(chain)
        self.notes = notes
        self.recipe = []

    @property
    def path(self):
        return self.group.p(self.fname)

    def run(self, *argv, ok=(0,), record=True):
        argv = [str(a) for a in argv]
        try:
            r = subprocess.run(argv, cwd=self.group.dir, capture_output=True, timeout=CMD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BuildError(f"{self.id}: timeout: {shlex.join(argv)}")
        if r.returncode not in ok:
            raise BuildError(f"{self.id}: rc={r.returncode}: {shlex.join(argv)}: {r.stderr.decode(errors='replace').strip()}")
        if record:
            self.recipe.append(shlex.join(argv))
        return r

    def py(self, desc, fn=None, *args):
        if fn is not None:
            fn(*args)
        self.recipe.append("hand-built: " + desc)

    # Shorthands -------------------------------------------------------
    def create(self, fmt, size, opts=None, fname=None, extra=()):
        argv = [QEMU_IMG, "create", "-q", "-f", fmt]
        if any("secret" in (o or "") for o in [opts]) or fmt == "luks":
            argv += ["--object", SECRET_OBJ]
        if opts:
            argv += ["-o", opts]
        argv += list(extra)
        argv += [fname or self.fname]
        if size is not None:
            argv.append(str(size))
        return self.run(*argv)

    def io(self, fmt, *cmds, fname=None, secret=False):
        argv = [QEMU_IO]
        if secret:
            argv += ["--object", SECRET_OBJ, "--image-opts", f"driver={fmt},file.filename={fname or self.fname},"
                     + ("encrypt.key-secret=s0" if fmt != "luks" else "key-secret=s0")]
        else:
            argv += ["-f", fmt, fname or self.fname]
        for c in cmds:
            argv += ["-c", c]
        return self.run(*argv)

    def convert(self, src_fmt, src, dst_fmt, opts=None, compress=False, fname=None, extra=()):
        argv = [QEMU_IMG, "convert", "-f", src_fmt, "-O", dst_fmt]
        if compress:
            argv.append("-c")
        if dst_fmt == "luks" or (opts and "secret" in opts):
            argv += ["--object", SECRET_OBJ]
        if opts:
            argv += ["-o", opts]
        argv += list(extra)
        argv += [src, fname or self.fname]
        return self.run(*argv)


class Group:
    """A directory of images that are built in order (chains share it)."""

    def __init__(self, gen, rel):
        self.gen = gen
        self.rel = rel
        self.dir = os.path.join(gen.tmp, rel)
        self.final_dir = os.path.join(gen.out, rel)
        os.makedirs(self.dir, exist_ok=True)
        self.images = []
        self.failed = []

    def p(self, fname):
        return os.path.join(self.dir, fname)

    def final(self, fname):
        """Absolute path the file will have once the corpus is in place."""
        return os.path.join(self.final_dir, fname)

    def img(self, id, fname, category, tier="safe", chain=(), notes=""):
        im = Image(self, id, fname, category, tier, chain, notes)
        return _ImgCtx(self, im)


class _ImgCtx:
    """`with g.img(...) as im:` registers the image only if every step of
    its recipe succeeded; a failure is reported and the image dropped."""

    def __init__(self, group, im):
        self.group = group
        self.im = im

    def __enter__(self):
        self.t = time.monotonic()
        return self.im

    def __exit__(self, et, ev, tb):
        self.im.seconds = time.monotonic() - self.t
        if et is None:
            self.group.images.append(self.im)
            return False
        msg = str(ev) if isinstance(ev, BuildError) else "".join(traceback.format_exception(et, ev, tb))
        self.group.failed.append((self.im.id, msg))
        try:
            os.unlink(self.im.path)
        except OSError:
            pass
        return True


GROUPS = []


def group(rel):
    def deco(fn):
        GROUPS.append((rel, fn))
        return fn

    return deco


def w(pat, off, length):
    return f"write -P 0x{pat:02x} {off} {length}"


def std_writes(cluster=64 * K, size=64 * M):
    """Data at the start, straddling the first cluster boundary, in the
    middle and at the very end: the places address arithmetic goes wrong."""
    return [
        w(0x11, 0, 4096),
        w(0x22, cluster - 512, 1024),
        w(0x33, size // 2 + 512, 3072),
        w(0x44, size - 4096, 4096),
    ]


# =================================================================== qcow2

QCOW2_CLUSTERS = [512, 1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 128 * K, 256 * K, 512 * K, 1 * M, 2 * M]


def csz(n):
    return f"{n // M}M" if n >= M and n % M == 0 else (f"{n // K}k" if n >= K else str(n))


def _qcow2_basic(g, compat):
    tag = "v2" if compat == "0.10" else "v3"
    for cs in QCOW2_CLUSTERS:
        size = 64 * M
        with g.img(f"qcow2-{tag}-c{csz(cs)}", f"qcow2-{tag}-c{csz(cs)}.qcow2", "qcow2-cluster-size") as im:
            im.create("qcow2", size, f"compat={compat},cluster_size={cs}")
            im.io("qcow2", *std_writes(cs, size))
        with g.img(f"qcow2-{tag}-c{csz(cs)}-empty", f"qcow2-{tag}-c{csz(cs)}-empty.qcow2", "qcow2-cluster-size") as im:
            im.create("qcow2", 1 * G, f"compat={compat},cluster_size={cs}")


@group("safe/qcow2/basic-v2")
def g_qcow2_v2(g):
    _qcow2_basic(g, "0.10")


@group("safe/qcow2/basic-v3")
def g_qcow2_v3(g):
    _qcow2_basic(g, "1.1")


@group("safe/qcow2/refcount")
def g_qcow2_refcount(g):
    for bits in (1, 2, 4, 8, 16, 32, 64):
        for cs in (512, 64 * K):
            id = f"qcow2-refcount{bits}-c{csz(cs)}"
            with g.img(id, id + ".qcow2", "qcow2-refcount-bits") as im:
                im.create("qcow2", 32 * M, f"compat=1.1,cluster_size={cs},refcount_bits={bits}")
                im.io("qcow2", *std_writes(cs, 32 * M))
    with g.img("qcow2-v2-refcount16", "qcow2-v2-refcount16.qcow2", "qcow2-refcount-bits") as im:
        im.create("qcow2", 32 * M, "compat=0.10,refcount_bits=16")
        im.io("qcow2", w(0x5A, 0, 64 * K))
    # Amend changes the refcount width in place (rewrites the refcount structures).
    for a, b in ((16, 1), (16, 64), (4, 16)):
        id = f"qcow2-refcount{a}-amend-{b}"
        with g.img(id, id + ".qcow2", "qcow2-amend") as im:
            im.create("qcow2", 16 * M, f"compat=1.1,refcount_bits={a}")
            im.io("qcow2", w(0x61, 0, 128 * K), w(0x62, 8 * M, 4096))
            im.run(QEMU_IMG, "amend", "-f", "qcow2", "-o", f"refcount_bits={b}", im.fname)


@group("safe/qcow2/extended-l2")
def g_qcow2_extl2(g):
    for cs in (16 * K, 32 * K, 64 * K, 128 * K, 256 * K, 512 * K, 1 * M, 2 * M):
        sub = cs // 32
        id = f"qcow2-extl2-c{csz(cs)}"
        with g.img(id, id + ".qcow2", "qcow2-extended-l2") as im:
            im.create("qcow2", 64 * M, f"cluster_size={cs},extended_l2=on")
            # Subcluster-granular writes: one subcluster, two straddling, a zeroed one.
            im.io("qcow2", w(0x11, 0, sub), w(0x22, 3 * sub - 512, 1024), f"write -z {5 * sub} {sub}", w(0x33, cs + sub, 4096 if sub < 4096 else sub))
    with g.img("qcow2-extl2-compressed", "qcow2-extl2-compressed.qcow2", "qcow2-extended-l2") as im:
        im.create("qcow2", 16 * M, "cluster_size=64k,extended_l2=on")
        im.io("qcow2", "write -c -P 0x77 0 64k", w(0x78, 128 * K, 2 * K))
    with g.img("qcow2-extl2-zstd", "qcow2-extl2-zstd.qcow2", "qcow2-extended-l2") as im:
        im.create("qcow2", 16 * M, "cluster_size=32k,extended_l2=on,compression_type=zstd")
        im.io("qcow2", "write -c -P 0x79 0 32k", "write -z -u 64k 32k", w(0x7A, 96 * K + 1024, 1024))


def lcg_bytes(seed, n):
    """Deterministic, poorly compressible filler (an LCG, not random)."""
    out = bytearray(n)
    x = seed
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = (x >> 16) & 0xFF
    return bytes(out)


def make_src_raw(path):
    chunks = [
        (0, B.pattern(0x11, 64 * K)),
        (64 * K, lcg_bytes(7, 64 * K)),
        (1 * M - 512, B.pattern(0x22, 1024)),
        (2 * M, b"instar corpus " * 1000),
        (4 * M - 4096, B.pattern(0x44, 4096)),
    ]
    B.write_sparse(path, 4 * M, chunks)


@group("safe/qcow2/compressed")
def g_qcow2_compressed(g):
    with g.img("compress-src-raw", "src.raw", "raw") as im:
        im.py("4 MiB sparse raw: 0x11 x64k at 0, LCG(seed 7) bytes at 64k, 0x22 at 1M-512, text at 2M, 0x44 at end", make_src_raw, im.path)
    for ctype in ("zlib", "zstd"):
        for cs in (4 * K, 64 * K, 2 * M):
            id = f"qcow2-convert-c-{ctype}-c{csz(cs)}"
            with g.img(id, id + ".qcow2", "qcow2-compressed", chain=()) as im:
                im.convert("raw", "src.raw", "qcow2", f"compression_type={ctype},cluster_size={cs}", compress=True)
                im.notes = "converted from src.raw (compress-src-raw)"
        id = f"qcow2-io-c-{ctype}"
        with g.img(id, id + ".qcow2", "qcow2-compressed") as im:
            im.create("qcow2", 16 * M, f"compression_type={ctype}")
            # One cluster per compressed write: qemu compresses the clusters
            # of one request in parallel, so their host order would vary.
            im.io("qcow2", "write -c -P 0x55 0 64k", "write -c -P 0x56 1M 64k", "write -c -P 0x56 1088k 64k", w(0x57, 2 * M, 512))
    with g.img("qcow2-v2-convert-c", "qcow2-v2-convert-c.qcow2", "qcow2-compressed") as im:
        im.convert("raw", "src.raw", "qcow2", "compat=0.10", compress=True)
    with g.img("qcow2-v2-io-c", "qcow2-v2-io-c.qcow2", "qcow2-compressed") as im:
        im.create("qcow2", 16 * M, "compat=0.10,cluster_size=4k")
        im.io("qcow2", "write -c -P 0x58 0 4k", "write -c -P 0x59 8k 4k")
    with g.img("qcow2-c512-compressed", "qcow2-c512-compressed.qcow2", "qcow2-compressed") as im:
        im.create("qcow2", 1 * M, "cluster_size=512")
        im.io("qcow2", "write -c -P 0x5a 0 512", "write -c -P 0x5b 1024 512")
    with g.img("qcow2-compressed-then-overwritten", "qcow2-compressed-overwritten.qcow2", "qcow2-compressed") as im:
        im.create("qcow2", 4 * M, "")
        im.io("qcow2", "write -c -P 0x60 0 64k", w(0x61, 4096, 512))


@group("safe/qcow2/prealloc")
def g_qcow2_prealloc(g):
    for compat in ("0.10", "1.1"):
        tag = "v2" if compat == "0.10" else "v3"
        for mode in ("off", "metadata", "falloc", "full"):
            id = f"qcow2-{tag}-prealloc-{mode}"
            with g.img(id, id + ".qcow2", "qcow2-preallocation") as im:
                im.create("qcow2", 2 * M, f"compat={compat},preallocation={mode}")
                im.io("qcow2", w(0x12, 0, 4096))
    with g.img("qcow2-prealloc-metadata-1G", "qcow2-prealloc-metadata-1G.qcow2", "qcow2-preallocation") as im:
        im.create("qcow2", 1 * G, "preallocation=metadata")
    with g.img("qcow2-prealloc-metadata-c2M", "qcow2-prealloc-metadata-c2M.qcow2", "qcow2-preallocation") as im:
        im.create("qcow2", 256 * M, "preallocation=metadata,cluster_size=2M")
    with g.img("qcow2-prealloc-metadata-extl2", "qcow2-prealloc-metadata-extl2.qcow2", "qcow2-preallocation") as im:
        im.create("qcow2", 64 * M, "preallocation=metadata,extended_l2=on")


def _snap(im, *names):
    for n in names:
        im.run(QEMU_IMG, "snapshot", "-c", n, im.fname)


@group("safe/qcow2/features")
def g_qcow2_features(g):
    for tag, compat in (("v2", "0.10"), ("v3", "1.1")):
        with g.img(f"qcow2-{tag}-zero", f"qcow2-{tag}-zero.qcow2", "qcow2-zero-clusters") as im:
            im.create("qcow2", 8 * M, f"compat={compat}")
            im.io("qcow2", w(0x31, 0, 256 * K), "write -z 64k 64k", "write -z 1M 128k", "write -z 2M 4k")
        with g.img(f"qcow2-{tag}-zero-unmap", f"qcow2-{tag}-zero-unmap.qcow2", "qcow2-zero-clusters") as im:
            im.create("qcow2", 8 * M, f"compat={compat}")
            im.io("qcow2", w(0x32, 0, 512 * K), "write -z -u 64k 128k", "write -z -u 4M 64k")
        with g.img(f"qcow2-{tag}-discard", f"qcow2-{tag}-discard.qcow2", "qcow2-discarded") as im:
            im.create("qcow2", 8 * M, f"compat={compat}")
            im.io("qcow2", w(0x33, 0, 1 * M), "discard 64k 192k", "discard 512k 64k")
        for n in (1, 3):
            id = f"qcow2-{tag}-snapshots{n}"
            with g.img(id, id + ".qcow2", "qcow2-snapshots", notes="snapshot dates and vm-clock vary per run") as im:
                im.create("qcow2", 16 * M, f"compat={compat}")
                for i in range(n):
                    im.io("qcow2", w(0x40 + i, i * 64 * K, 64 * K))
                    _snap(im, f"snap{i}")
                im.io("qcow2", w(0x4F, 0, 4096))
        with g.img(f"qcow2-{tag}-snapshots0", f"qcow2-{tag}-snapshots0.qcow2", "qcow2-snapshots", notes="snapshot created then deleted") as im:
            im.create("qcow2", 16 * M, f"compat={compat}")
            im.io("qcow2", w(0x45, 0, 64 * K))
            _snap(im, "gone")
            im.run(QEMU_IMG, "snapshot", "-d", "gone", im.fname)
    with g.img("qcow2-snapshot-applied", "qcow2-snapshot-applied.qcow2", "qcow2-snapshots", notes="snapshot dates vary") as im:
        im.create("qcow2", 16 * M, "")
        im.io("qcow2", w(0x46, 0, 64 * K))
        _snap(im, "base")
        im.io("qcow2", w(0x47, 0, 64 * K))
        im.run(QEMU_IMG, "snapshot", "-a", "base", im.fname)
    with g.img("qcow2-snapshot-long-name", "qcow2-snapshot-long-name.qcow2", "qcow2-snapshots", notes="snapshot dates vary") as im:
        im.create("qcow2", 4 * M, "")
        _snap(im, "a-rather-long-snapshot-name-" + "x" * 100, "spaces in name", "ünïcödé")
    with g.img("qcow2-lazy-refcounts", "qcow2-lazy-refcounts.qcow2", "qcow2-lazy-refcounts") as im:
        im.create("qcow2", 8 * M, "lazy_refcounts=on")
        im.io("qcow2", w(0x34, 0, 64 * K))
    # Persistent dirty bitmaps via `qemu-img bitmap`.
    with g.img("qcow2-bitmap-one", "qcow2-bitmap-one.qcow2", "qcow2-bitmaps") as im:
        im.create("qcow2", 16 * M, "")
        im.run(QEMU_IMG, "bitmap", "--add", im.fname, "b0")
    with g.img("qcow2-bitmap-disabled", "qcow2-bitmap-disabled.qcow2", "qcow2-bitmaps") as im:
        im.create("qcow2", 16 * M, "")
        im.run(QEMU_IMG, "bitmap", "--add", "--disable", im.fname, "off")
    with g.img("qcow2-bitmap-several", "qcow2-bitmap-several.qcow2", "qcow2-bitmaps") as im:
        im.create("qcow2", 64 * M, "")
        im.run(QEMU_IMG, "bitmap", "--add", "-g", "512", im.fname, "fine")
        im.run(QEMU_IMG, "bitmap", "--add", "-g", "1M", im.fname, "coarse")
        im.run(QEMU_IMG, "bitmap", "--add", "--disable", "-g", "128k", im.fname, "disabled")
        im.run(QEMU_IMG, "bitmap", "--add", im.fname, "b3")
        im.run(QEMU_IMG, "bitmap", "--disable", im.fname, "b3")
    with g.img("qcow2-bitmap-with-data", "qcow2-bitmap-with-data.qcow2", "qcow2-bitmaps", notes="bits set by qemu-io writes while the bitmap is enabled") as im:
        im.create("qcow2", 16 * M, "")
        im.run(QEMU_IMG, "bitmap", "--add", im.fname, "dirty")
        im.io("qcow2", w(0x35, 0, 64 * K), w(0x36, 8 * M, 1 * M))
    with g.img("qcow2-bitmap-merge-clear", "qcow2-bitmap-merge-clear.qcow2", "qcow2-bitmaps") as im:
        im.create("qcow2", 16 * M, "")
        im.run(QEMU_IMG, "bitmap", "--add", im.fname, "a")
        im.io("qcow2", w(0x37, 0, 1 * M))
        im.run(QEMU_IMG, "bitmap", "--add", im.fname, "b")
        im.run(QEMU_IMG, "bitmap", "--merge", "a", im.fname, "b")
        im.run(QEMU_IMG, "bitmap", "--clear", im.fname, "a")
    with g.img("qcow2-bitmap-removed", "qcow2-bitmap-removed.qcow2", "qcow2-bitmaps") as im:
        im.create("qcow2", 16 * M, "")
        im.run(QEMU_IMG, "bitmap", "--add", im.fname, "x")
        im.run(QEMU_IMG, "bitmap", "--remove", im.fname, "x")
    # Amend: compat upgrade/downgrade, lazy refcounts toggle.
    with g.img("qcow2-amend-v2-to-v3", "qcow2-amend-v2-to-v3.qcow2", "qcow2-amend") as im:
        im.create("qcow2", 8 * M, "compat=0.10")
        im.io("qcow2", w(0x38, 0, 64 * K))
        im.run(QEMU_IMG, "amend", "-f", "qcow2", "-o", "compat=1.1", im.fname)
    with g.img("qcow2-amend-v3-to-v2", "qcow2-amend-v3-to-v2.qcow2", "qcow2-amend") as im:
        im.create("qcow2", 8 * M, "compat=1.1")
        im.io("qcow2", w(0x39, 0, 64 * K), "write -z 128k 64k")
        im.run(QEMU_IMG, "amend", "-f", "qcow2", "-o", "compat=0.10", im.fname)
    with g.img("qcow2-amend-lazy-on", "qcow2-amend-lazy-on.qcow2", "qcow2-amend") as im:
        im.create("qcow2", 8 * M, "")
        im.run(QEMU_IMG, "amend", "-f", "qcow2", "-o", "lazy_refcounts=on", im.fname)
    with g.img("qcow2-amend-size", "qcow2-amend-size.qcow2", "qcow2-amend") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x3A, 0, 64 * K))
        im.run(QEMU_IMG, "amend", "-f", "qcow2", "-o", "size=32M", im.fname)
    with g.img("qcow2-resized-grow", "qcow2-resized-grow.qcow2", "qcow2-resize") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x3B, 8 * M - 4096, 4096))
        im.run(QEMU_IMG, "resize", "-f", "qcow2", im.fname, "+1G")
    with g.img("qcow2-resized-shrink", "qcow2-resized-shrink.qcow2", "qcow2-resize") as im:
        im.create("qcow2", 64 * M, "")
        im.io("qcow2", w(0x3C, 0, 64 * K))
        im.run(QEMU_IMG, "resize", "-f", "qcow2", "--shrink", im.fname, "16M")


@group("safe/qcow2/sizes")
def g_qcow2_sizes(g):
    for label, size, opts in (
        ("0", 0, ""),
        ("512", 512, ""),
        ("1", 1, ""),
        ("1023999", 1023999, ""),
        ("1G", 1 * G, ""),
        ("1T", 1 * T, ""),
        ("64T", 64 * T, ""),
        ("256T-c2M", 256 * T, "cluster_size=2M"),
        ("1023999-c512", 1023999, "cluster_size=512"),
        ("v2-1023999", 1023999, "compat=0.10"),
    ):
        id = f"qcow2-size-{label}"
        with g.img(id, id + ".qcow2", "qcow2-virtual-size") as im:
            im.create("qcow2", size, opts)
            if size >= 4096:
                end = size - size % 512 - 512
                im.io("qcow2", w(0x71, 0, 512), w(0x72, end, 512))


@group("safe/qcow2/offsets")
def g_qcow2_offsets(g):
    # 512-byte clusters: one L2 table maps 64 clusters = 32 KiB.
    with g.img("qcow2-offsets-c512", "qcow2-offsets-c512.qcow2", "qcow2-offsets", notes="L2 table covers 32 KiB") as im:
        im.create("qcow2", 4 * M, "cluster_size=512")
        im.io("qcow2", w(0x01, 0, 1), w(0x02, 511, 2), w(0x03, 32 * K - 256, 512), w(0x04, 64 * K - 1, 1), w(0x05, 96 * K, 32 * K), w(0x06, 4 * M - 1, 1))
    with g.img("qcow2-offsets-c4k", "qcow2-offsets-c4k.qcow2", "qcow2-offsets", notes="L2 table covers 2 MiB") as im:
        im.create("qcow2", 16 * M, "cluster_size=4k")
        im.io("qcow2", w(0x07, 2 * M - 2048, 4096), w(0x08, 4 * M - 4096, 8192), w(0x09, 6 * M + 100, 10000), w(0x0A, 16 * M - 512, 512))
    with g.img("qcow2-offsets-c64k-l2", "qcow2-offsets-c64k-l2.qcow2", "qcow2-offsets", notes="L2 table covers 512 MiB") as im:
        im.create("qcow2", 2 * G, "")
        im.io("qcow2", w(0x0B, 512 * M - 32 * K, 64 * K), w(0x0C, 1 * G - 512, 1024), w(0x0D, 2 * G - 64 * K, 64 * K))
    with g.img("qcow2-offsets-c2M", "qcow2-offsets-c2M.qcow2", "qcow2-offsets") as im:
        im.create("qcow2", 1 * G, "cluster_size=2M")
        im.io("qcow2", w(0x0E, 2 * M - 512, 1024), w(0x0F, 512 * M, 512), w(0x10, 1 * G - 512, 512))
    with g.img("qcow2-offsets-sparse-many", "qcow2-offsets-sparse-many.qcow2", "qcow2-offsets") as im:
        im.create("qcow2", 1 * G, "cluster_size=4k")
        im.io("qcow2", *[w(0x80 + i, i * (1 * G // 32) + i * 512, 512) for i in range(32)])
    with g.img("qcow2-offsets-v2-c1k", "qcow2-offsets-v2-c1k.qcow2", "qcow2-offsets", notes="L2 table covers 128 KiB") as im:
        im.create("qcow2", 8 * M, "compat=0.10,cluster_size=1k")
        im.io("qcow2", w(0x11, 128 * K - 512, 1024), w(0x12, 256 * K - 1024, 2048), w(0x13, 8 * M - 1024, 1024))
    with g.img("qcow2-offsets-odd-end", "qcow2-offsets-odd-end.qcow2", "qcow2-offsets", notes="virtual size not a multiple of the cluster size") as im:
        im.create("qcow2", 1 * M + 512 * 3, "")
        im.io("qcow2", w(0x14, 1 * M, 1536))
    with g.img("qcow2-full-write", "qcow2-full-write.qcow2", "qcow2-offsets", notes="every cluster allocated") as im:
        im.create("qcow2", 1 * M, "cluster_size=4k")
        im.io("qcow2", w(0x15, 0, 1 * M))


def _set_incompat(path, bits):
    B.qcow2_set_bits(path, B.Q2_INCOMPAT, bits)


def _leak(path):
    q = B.Qcow2(path)
    size = os.path.getsize(path)
    n = size // q.cluster_size
    B.append(path, b"\0" * q.cluster_size)
    q.set_refcount16(n, 1)


def _refcount_zero(path):
    q = B.Qcow2(path)
    l2e = B.get(path, q.l2_entry_offset(0), ">Q")[0]
    data = (l2e & 0x00FFFFFFFFFFFE00) >> q.cluster_bits
    q.set_refcount16(data, 0)


def _refcount_two(path):
    q = B.Qcow2(path)
    l2e = B.get(path, q.l2_entry_offset(0), ">Q")[0]
    data = (l2e & 0x00FFFFFFFFFFFE00) >> q.cluster_bits
    q.set_refcount16(data, 2)


def _l2_unaligned(path):
    q = B.Qcow2(path)
    off = q.l2_entry_offset(0)
    v = B.get(path, off, ">Q")[0]
    B.patch(path, off, ">Q", v | 0x200)


def _l2_shared(path):
    """Make guest cluster 1 point at the same host cluster as cluster 0."""
    q = B.Qcow2(path)
    v = B.get(path, q.l2_entry_offset(0), ">Q")[0]
    B.patch(path, q.l2_entry_offset(q.cluster_size), ">Q", v)


@group("safe/qcow2/check")
def g_qcow2_check(g):
    with g.img("qcow2-dirty", "qcow2-dirty.qcow2", "qcow2-dirty-bit", notes="incompatible bit 0 set without lazy_refcounts") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x21, 0, 64 * K))
        im.py("set incompatible_features bit 0 (dirty) at offset 72", _set_incompat, im.path, 1)
    with g.img("qcow2-lazy-dirty", "qcow2-lazy-dirty.qcow2", "qcow2-dirty-bit", notes="lazy_refcounts=on with the dirty bit set") as im:
        im.create("qcow2", 8 * M, "lazy_refcounts=on")
        im.io("qcow2", w(0x22, 0, 64 * K))
        im.py("set incompatible_features bit 0 (dirty)", _set_incompat, im.path, 1)
    with g.img("qcow2-lazy-dirty-leak", "qcow2-lazy-dirty-leak.qcow2", "qcow2-dirty-bit", notes="dirty + lazy refcounts + a leaked cluster") as im:
        im.create("qcow2", 8 * M, "lazy_refcounts=on")
        im.io("qcow2", w(0x23, 0, 64 * K))
        im.py("append a cluster and give it refcount 1; set dirty bit", lambda p: (_leak(p), _set_incompat(p, 1)), im.path)
    with g.img("qcow2-corrupt", "qcow2-corrupt.qcow2", "qcow2-corrupt-bit") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x24, 0, 64 * K))
        im.py("set incompatible_features bit 1 (corrupt)", _set_incompat, im.path, 2)
    with g.img("qcow2-corrupt-dirty", "qcow2-corrupt-dirty.qcow2", "qcow2-corrupt-bit") as im:
        im.create("qcow2", 8 * M, "lazy_refcounts=on")
        im.py("set incompatible_features bits 0 and 1", _set_incompat, im.path, 3)
    with g.img("qcow2-leak", "qcow2-leak.qcow2", "qcow2-check", notes="one leaked cluster (refcount 1, no reference)") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x25, 0, 64 * K))
        im.py("append one zero cluster and set its refcount to 1", _leak, im.path)
    with g.img("qcow2-leak-v2", "qcow2-leak-v2.qcow2", "qcow2-check") as im:
        im.create("qcow2", 8 * M, "compat=0.10")
        im.io("qcow2", w(0x26, 0, 64 * K))
        im.py("append one zero cluster and set its refcount to 1", _leak, im.path)
    with g.img("qcow2-refcount-zero", "qcow2-refcount-zero.qcow2", "qcow2-check", notes="data cluster refcount 0 but referenced") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x27, 0, 64 * K))
        im.py("set the refcount of guest cluster 0's host cluster to 0", _refcount_zero, im.path)
    with g.img("qcow2-refcount-high", "qcow2-refcount-high.qcow2", "qcow2-check", notes="data cluster refcount 2, one reference") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x28, 0, 64 * K))
        im.py("set the refcount of guest cluster 0's host cluster to 2", _refcount_two, im.path)
    with g.img("qcow2-l2-unaligned", "qcow2-l2-unaligned.qcow2", "qcow2-check", notes="L2 entry offset not cluster aligned") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x29, 0, 64 * K))
        im.py("OR 0x200 into the L2 entry of guest cluster 0", _l2_unaligned, im.path)
    with g.img("qcow2-l2-shared", "qcow2-l2-shared.qcow2", "qcow2-check", notes="two L2 entries share one host cluster with refcount 1") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0x2A, 0, 64 * K))
        im.py("copy the L2 entry of guest cluster 0 into guest cluster 1", _l2_shared, im.path)


@group("safe/qcow2/luks")
def g_qcow2_luks(g):
    variants = [
        ("default", ""),
        ("aes128-cbc-essiv", "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"),
        ("aes256-xts-sha512", "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts,encrypt.hash-alg=sha512"),
        ("twofish128-cbc-plain", "encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain"),
        ("serpent256-xts", "encrypt.cipher-alg=serpent-256"),
    ]
    for label, opts in variants:
        id = f"qcow2-luks-{label}"
        full = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10" + ("," + opts if opts else "")
        with g.img(id, id + ".qcow2", "qcow2-luks", notes=f"LUKS salts, master key and uuid are random; passphrase '{SECRET}'") as im:
            im.create("qcow2", 16 * M, full)
            im.io("qcow2", w(0x91, 0, 64 * K), w(0x92, 1 * M, 4096), secret=True)
    with g.img("qcow2-aes-legacy", "qcow2-aes-legacy.qcow2", "qcow2-aes", notes=f"legacy AES-CBC; key '{SECRET}'") as im:
        im.create("qcow2", 16 * M, "encrypt.format=aes,encrypt.key-secret=s0")
    with g.img("qcow2-aes-legacy-v2", "qcow2-aes-legacy-v2.qcow2", "qcow2-aes") as im:
        im.create("qcow2", 16 * M, "compat=0.10,encrypt.format=aes,encrypt.key-secret=s0")


# =================================================================== chains


def _drop_backing_fmt(path):
    q = B.Qcow2(path)
    q.rewrite_exts([e for e in q.exts if e[0] != B.EXT_BACKING_FORMAT])


def chain(rel):
    return group("safe/chains/" + rel)


@chain("qcow2-over-raw")
def g_chain_qr(g):
    with g.img("chain-qr-base", "base.raw", "backing-chain") as im:
        im.create("raw", 8 * M)
        im.io("raw", w(0xB1, 0, 1 * M), w(0xB2, 8 * M - 4096, 4096))
    with g.img("chain-qr-top", "top.qcow2", "backing-chain", chain=["chain-qr-base"]) as im:
        im.create("qcow2", None, extra=["-b", "base.raw", "-F", "raw"])
        im.io("qcow2", w(0xB3, 512 * K, 64 * K))
    with g.img("chain-qr-top-v2", "top-v2.qcow2", "backing-chain", chain=["chain-qr-base"]) as im:
        im.create("qcow2", None, "compat=0.10", extra=["-b", "base.raw", "-F", "raw"])
        im.io("qcow2", w(0xB4, 0, 4096))
    with g.img("chain-qr-top-nofmt", "top-nofmt.qcow2", "backing-chain", chain=["chain-qr-base"], notes="backing format extension removed: qemu probes") as im:
        im.create("qcow2", None, extra=["-b", "base.raw", "-F", "raw"])
        im.py("remove the backing-format header extension", _drop_backing_fmt, im.path)
    with g.img("chain-qr-top-bigger", "top-bigger.qcow2", "backing-chain", chain=["chain-qr-base"], notes="overlay larger than its backing file") as im:
        im.create("qcow2", 64 * M, extra=["-b", "base.raw", "-F", "raw"])
        im.io("qcow2", w(0xB5, 32 * M, 4096))
    with g.img("chain-qr-top-smaller", "top-smaller.qcow2", "backing-chain", chain=["chain-qr-base"], notes="overlay smaller than its backing file") as im:
        im.create("qcow2", 1 * M, extra=["-b", "base.raw", "-F", "raw"])
    with g.img("chain-qr-top-extl2", "top-extl2.qcow2", "backing-chain", chain=["chain-qr-base"]) as im:
        im.create("qcow2", None, "extended_l2=on", extra=["-b", "base.raw", "-F", "raw"])
        im.io("qcow2", w(0xB6, 2048, 2048), w(0xB7, 70 * K, 1024))
    with g.img("chain-qr-top-abs", "top-abs.qcow2", "backing-chain", chain=["chain-qr-base"], notes="absolute backing path: depends on where the corpus lives") as im:
        im.create("qcow2", None, extra=["-b", "base.raw", "-F", "raw"])
        im.io("qcow2", w(0xB8, 0, 4096))
        im.run(QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-b", g.final("base.raw"), "-F", "raw", im.fname)
    with g.img("chain-qr-top-abs-nofmt", "top-abs-nofmt.qcow2", "backing-chain", chain=["chain-qr-base"], notes="absolute backing path, no backing format") as im:
        im.create("qcow2", None, extra=["-b", "base.raw", "-F", "raw"])
        im.run(QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-b", g.final("base.raw"), "-F", "raw", im.fname)
        im.py("remove the backing-format header extension", _drop_backing_fmt, im.path)
    with g.img("chain-qr-top-dotslash", "top-dotslash.qcow2", "backing-chain", chain=["chain-qr-base"]) as im:
        im.create("qcow2", 8 * M, extra=["-u", "-b", "./base.raw", "-F", "raw"])


def _depth_chain(g, prefix, fmts):
    """Build base -> ... -> top, each level writing its own pattern."""
    prev = None
    ids = []
    for depth, fmt in enumerate(fmts):
        fname = f"l{depth}.{fmt}"
        id = f"{prefix}-l{depth}"
        with g.img(id, fname, "backing-chain", chain=ids[-1:], notes="CID is random per run" if fmt == "vmdk" else "") as im:
            if prev is None:
                im.create(fmt, 16 * M)
            else:
                im.create(fmt, None, extra=["-b", prev[1], "-F", prev[0]])
            im.io(fmt, w(0xC0 + depth, depth * 64 * K, 64 * K), w(0xD0 + depth, 16 * M - (depth + 1) * 4096, 512))
        prev = (fmt, fname)
        ids.append(id)


@chain("depth2-qcow2")
def g_chain_d2(g):
    _depth_chain(g, "chain-d2", ["qcow2", "qcow2"])


@chain("depth3-mixed")
def g_chain_d3(g):
    _depth_chain(g, "chain-d3", ["raw", "qcow2", "qcow2"])


@chain("depth4-mixed")
def g_chain_d4(g):
    _depth_chain(g, "chain-d4", ["raw", "qcow2", "qed", "qcow2"])


@chain("depth4-qcow2")
def g_chain_d4q(g):
    _depth_chain(g, "chain-d4q", ["qcow2", "qcow2", "qcow2", "qcow2"])


@chain("qed")
def g_chain_qed(g):
    _depth_chain(g, "chain-qed", ["qcow2", "qed"])
    with g.img("chain-qed-raw-base", "base.raw", "backing-chain") as im:
        im.create("raw", 16 * M)
        im.io("raw", w(0xC8, 0, 64 * K))
    with g.img("chain-qed-over-raw", "over-raw.qed", "backing-chain", chain=["chain-qed-raw-base"], notes="qed records a raw backing file as a no-probe feature flag") as im:
        im.create("qed", None, extra=["-b", "base.raw", "-F", "raw"])
        im.io("qed", w(0xC9, 64 * K, 4096))


@chain("qcow1")
def g_chain_qcow1(g):
    _depth_chain(g, "chain-qcow1", ["raw", "qcow"])


@chain("vmdk")
def g_chain_vmdk(g):
    _depth_chain(g, "chain-vmdk", ["vmdk", "vmdk", "vmdk"])


@chain("subdir")
def g_chain_subdir(g):
    os.makedirs(g.p("base"), exist_ok=True)
    with g.img("chain-subdir-base", "base/base.qcow2", "backing-chain") as im:
        im.create("qcow2", 8 * M)
        im.io("qcow2", w(0xE1, 0, 64 * K))
    with g.img("chain-subdir-top", "top.qcow2", "backing-chain", chain=["chain-subdir-base"], notes="backing in a subdirectory") as im:
        im.create("qcow2", None, extra=["-b", "base/base.qcow2", "-F", "qcow2"])
        im.io("qcow2", w(0xE2, 64 * K, 64 * K))


@chain("snapshot-overlay")
def g_chain_snap(g):
    with g.img("chain-snap-base", "base.qcow2", "backing-chain") as im:
        im.create("qcow2", 8 * M)
        im.io("qcow2", w(0xE3, 0, 128 * K))
    with g.img("chain-snap-top", "top.qcow2", "backing-chain", chain=["chain-snap-base"], notes="overlay with an internal snapshot; dates vary") as im:
        im.create("qcow2", None, extra=["-b", "base.qcow2", "-F", "qcow2"])
        im.io("qcow2", w(0xE4, 0, 4096))
        _snap(im, "s1")


@chain("rebased")
def g_chain_rebased(g):
    with g.img("chain-rebased-a", "a.qcow2", "backing-chain") as im:
        im.create("qcow2", 8 * M)
        im.io("qcow2", w(0xE5, 0, 64 * K))
    with g.img("chain-rebased-b", "b.qcow2", "backing-chain") as im:
        im.create("qcow2", 8 * M)
        im.io("qcow2", w(0xE6, 64 * K, 64 * K))
    with g.img("chain-rebased-top", "top.qcow2", "backing-chain", chain=["chain-rebased-b"], notes="safe rebase from a.qcow2 to b.qcow2") as im:
        im.create("qcow2", None, extra=["-b", "a.qcow2", "-F", "qcow2"])
        im.io("qcow2", w(0xE7, 128 * K, 4096))
        im.run(QEMU_IMG, "rebase", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", im.fname)
    with g.img("chain-commit-base", "commit-base.qcow2", "backing-chain", notes="received the overlay's data via qemu-img commit") as bm:
        bm.create("qcow2", 8 * M)
        bm.io("qcow2", w(0xE8, 0, 64 * K))
    with g.img("chain-commit-top", "commit-top.qcow2", "backing-chain", chain=["chain-commit-base"], notes="emptied by qemu-img commit") as im:
        im.create("qcow2", None, extra=["-b", "commit-base.qcow2", "-F", "qcow2"])
        im.io("qcow2", w(0xE9, 64 * K, 64 * K))
        im.run(QEMU_IMG, "commit", "-f", "qcow2", im.fname)
        bm.recipe += im.recipe


@group("safe/datafile")
def g_datafile(g):
    for raw in ("off", "on"):
        id = f"qcow2-datafile-raw-{raw}"
        with g.img(id + "-data", f"{id}.data", "qcow2-data-file", notes="external data file") as dm:
            pass
        with g.img(id, id + ".qcow2", "qcow2-data-file", chain=[id + "-data"]) as im:
            im.create("qcow2", 8 * M, f"data_file={id}.data,data_file_raw={raw}")
            im.io("qcow2", w(0xA1, 0, 64 * K), w(0xA2, 4 * M + 512, 4096), "write -z 1M 64k")
            dm.recipe = list(im.recipe)
    with g.img("qcow2-datafile-abs-data", "abs.data", "qcow2-data-file") as dm:
        pass
    with g.img("qcow2-datafile-abs", "abs.qcow2", "qcow2-data-file", chain=["qcow2-datafile-abs-data"], notes="absolute data file path: depends on where the corpus lives") as im:
        im.create("qcow2", 8 * M, "data_file=abs.data,data_file_raw=on")
        im.io("qcow2", w(0xA3, 0, 4096))
        im.run(QEMU_IMG, "amend", "-f", "qcow2", "-o", f"data_file={g.final('abs.data')}", im.fname)
        dm.recipe = list(im.recipe)
    with g.img("qcow2-datafile-extl2-data", "extl2.data", "qcow2-data-file") as dm:
        pass
    with g.img("qcow2-datafile-extl2", "extl2.qcow2", "qcow2-data-file", chain=["qcow2-datafile-extl2-data"]) as im:
        im.create("qcow2", 8 * M, "data_file=extl2.data,extended_l2=on")
        im.io("qcow2", w(0xA4, 4096, 2048))
        dm.recipe = list(im.recipe)
    with g.img("qcow2-datafile-base", "dfbase.qcow2", "qcow2-data-file") as im:
        im.create("qcow2", 8 * M)
        im.io("qcow2", w(0xA5, 0, 1 * M))
    with g.img("qcow2-datafile-overlay-data", "overlay.data", "qcow2-data-file") as dm:
        pass
    with g.img("qcow2-datafile-overlay", "overlay.qcow2", "qcow2-data-file", chain=["qcow2-datafile-overlay-data", "qcow2-datafile-base"], notes="data file plus backing file") as im:
        im.create("qcow2", None, "data_file=overlay.data", extra=["-b", "dfbase.qcow2", "-F", "qcow2"])
        im.io("qcow2", w(0xA6, 512 * K, 64 * K))
        dm.recipe = list(im.recipe)
    with g.img("qcow2-datafile-prealloc-data", "prealloc.data", "qcow2-data-file") as dm:
        pass
    with g.img("qcow2-datafile-prealloc", "prealloc.qcow2", "qcow2-data-file", chain=["qcow2-datafile-prealloc-data"]) as im:
        im.create("qcow2", 4 * M, "data_file=prealloc.data,data_file_raw=on,preallocation=metadata")
        dm.recipe = list(im.recipe)


# =================================================================== vmdk

VMDK_SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]
VMDK_SHORT = {"monolithicSparse": "ms", "monolithicFlat": "mf", "twoGbMaxExtentSparse": "2gs", "twoGbMaxExtentFlat": "2gf", "streamOptimized": "so"}


def _vmdk(g, id, size, opts, category="vmdk", writes=True, notes="CID is random per run"):
    """Create one vmdk (in its own files) and register its extent files."""
    before = set(os.listdir(g.dir))
    fname = id + ".vmdk"
    with g.img(id, fname, category, notes=notes) as im:
        sub = dict(kv.split("=", 1) for kv in opts.split(",") if kv).get("subformat", "monolithicSparse")
        if sub == "streamOptimized":
            src = id + "-src.raw"
            B.write_sparse(g.p(src), size, [(0, B.pattern(0x61, 64 * K)), (size // 2, B.pattern(0x62, 4096)), (size - 512, B.pattern(0x63, 512))])
            im.py(f"{src}: sparse raw of {size} bytes, 0x61 x64k at 0, 0x62 x4k at size/2, 0x63 x512 at end (deleted after)")
            im.convert("raw", src, "vmdk", opts)
            os.unlink(g.p(src))
        else:
            im.create("vmdk", size, opts)
            if writes:
                im.io("vmdk", w(0x61, 0, 64 * K), w(0x62, size // 2 - 512, 4096), w(0x63, size - 512, 512))
    after = sorted(set(os.listdir(g.dir)) - before - {fname})
    if im not in g.images:
        return
    ext_ids = []
    for i, ef in enumerate(after):
        eid = f"{id}-extent{i}"
        with g.img(eid, ef, "vmdk-extent", notes=f"extent file of {id}") as em:
            em.recipe = list(im.recipe)
        ext_ids.append(eid)
    im.chain = ext_ids


@group("safe/vmdk/subformats")
def g_vmdk_sub(g):
    for sub in VMDK_SUBFORMATS:
        for adapter in ("ide", "lsilogic", "buslogic", "legacyESX"):
            _vmdk(g, f"vmdk-{VMDK_SHORT[sub]}-{adapter}", 16 * M, f"subformat={sub},adapter_type={adapter}")
        _vmdk(g, f"vmdk-{VMDK_SHORT[sub]}-compat6", 16 * M, f"subformat={sub},compat6=on")


@group("safe/vmdk/multi-extent")
def g_vmdk_multi(g):
    for sub in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        _vmdk(g, f"vmdk-{VMDK_SHORT[sub]}-5G", 5 * G, f"subformat={sub}", notes="3 extents; CID random")
        _vmdk(g, f"vmdk-{VMDK_SHORT[sub]}-4G-exact", 4 * G, f"subformat={sub}", notes="2 full extents; CID random")
    _vmdk(g, "vmdk-ms-5G", 5 * G, "subformat=monolithicSparse")
    _vmdk(g, "vmdk-mf-3G", 3 * G, "subformat=monolithicFlat", writes=True)


@group("safe/vmdk/options")
def g_vmdk_opts(g):
    for hw in ("4", "6", "7", "21"):
        _vmdk(g, f"vmdk-hwversion{hw}", 16 * M, f"hwversion={hw}")
    _vmdk(g, "vmdk-toolsversion", 16 * M, "toolsversion=12345")
    _vmdk(g, "vmdk-zeroed-grain", 16 * M, "zeroed_grain=on")
    with g.img("vmdk-zeroed-grain-z", "vmdk-zeroed-grain-z.vmdk", "vmdk", notes="CID random") as im:
        im.create("vmdk", 16 * M, "zeroed_grain=on")
        im.io("vmdk", w(0x64, 0, 128 * K), "write -z 64k 64k")
    _vmdk(g, "vmdk-mf-prealloc-full", 2 * M, "subformat=monolithicFlat,preallocation=full")
    _vmdk(g, "vmdk-ms-prealloc-full", 2 * M, "subformat=monolithicSparse,preallocation=full")
    _vmdk(g, "vmdk-ms-odd-size", 1023999, "")
    _vmdk(g, "vmdk-ms-1T", 1 * T, "", writes=False)
    _vmdk(g, "vmdk-so-empty", 64 * M, "subformat=streamOptimized")
    _vmdk(g, "vmdk-ms-512", 512, "", writes=False)


# =================================================================== other formats


@group("safe/vpc")
def g_vpc(g):
    sizes = [("10M", 10 * M), ("127M", 127 * M), ("1023999", 1023999), ("1G", 1 * G)]
    for sub in ("dynamic", "fixed"):
        for force in ("off", "on"):
            for label, size in sizes:
                id = f"vpc-{sub}-force{force}-{label}"
                with g.img(id, id + ".vhd", "vpc", notes="footer timestamp and UUID vary per run") as im:
                    im.create("vpc", size, f"subformat={sub},force_size={force}")
                    im.io("vpc", w(0x65, 0, 4096), w(0x66, min(2 * M, size - size % 512) - 1024, 1024))
    with g.img("vpc-dynamic-huge", "vpc-dynamic-huge.vhd", "vpc", notes="timestamp/UUID vary") as im:
        im.create("vpc", 127 * G, "")


@group("safe/vhdx")
def g_vhdx(g):
    for bs in ("1M", "2M", "8M", "32M", "256M"):
        id = f"vhdx-dynamic-bs{bs}"
        with g.img(id, id + ".vhdx", "vhdx", notes="GUIDs vary per run") as im:
            im.create("vhdx", 1 * G, f"block_size={bs}")
            im.io("vhdx", w(0x67, 0, 64 * K), w(0x68, 1 * G - 4096, 4096))
    for ls in ("1M", "4M", "8M"):
        id = f"vhdx-log{ls}"
        with g.img(id, id + ".vhdx", "vhdx", notes="GUIDs vary") as im:
            im.create("vhdx", 64 * M, f"log_size={ls}")
    with g.img("vhdx-fixed", "vhdx-fixed.vhdx", "vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 8 * M, "subformat=fixed")
        im.io("vhdx", w(0x69, 0, 4096))
    with g.img("vhdx-fixed-bs1M", "vhdx-fixed-bs1M.vhdx", "vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 4 * M, "subformat=fixed,block_size=1M")
    with g.img("vhdx-block-state-zero-off", "vhdx-bsz-off.vhdx", "vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 64 * M, "block_state_zero=off")
        im.io("vhdx", w(0x6A, 32 * M, 4096))
    with g.img("vhdx-odd-size", "vhdx-odd-size.vhdx", "vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 1023999, "")
    with g.img("vhdx-1T", "vhdx-1T.vhdx", "vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 1 * T, "")
    with g.img("vhdx-dynamic-many", "vhdx-dynamic-many.vhdx", "vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 256 * M, "block_size=1M")
        im.io("vhdx", *[w(0x10 + i, i * 16 * M + 512 * i, 4096) for i in range(16)])


@group("safe/vdi")
def g_vdi(g):
    for static in ("off", "on"):
        for label, size in (("1M", 1 * M), ("4M", 4 * M), ("1023999", 1023999)):
            id = f"vdi-static{static}-{label}"
            with g.img(id, id + ".vdi", "vdi", notes="UUIDs vary per run") as im:
                im.create("vdi", size, f"static={static}")
                if size >= 1 * M:
                    im.io("vdi", w(0x6B, 0, 4096), w(0x6C, size - 512 - size % 512, 512))
    with g.img("vdi-dynamic-1G", "vdi-dynamic-1G.vdi", "vdi", notes="UUIDs vary") as im:
        im.create("vdi", 1 * G, "")
        im.io("vdi", w(0x6D, 1 * M - 512, 1024), w(0x6E, 512 * M, 4096))
    with g.img("vdi-dynamic-64G", "vdi-dynamic-64G.vdi", "vdi", notes="UUIDs vary") as im:
        im.create("vdi", 64 * G, "")


@group("safe/qed")
def g_qed(g):
    for cs in ("4k", "64k", "256k", "1M"):
        for ts in (1, 4, 16):
            id = f"qed-c{cs}-t{ts}"
            # qemu-img creates table_size=1 images that it then refuses to
            # open ("QED table offset is invalid"): kept, without data.
            with g.img(id, id + ".qed", "qed", notes="qemu cannot open its own table_size=1 images" if ts == 1 else "") as im:
                im.create("qed", 64 * M, f"cluster_size={cs},table_size={ts}")
                if ts > 1:
                    im.io("qed", w(0x6F, 0, 4096), w(0x70, 32 * M - 512, 1024))
    with g.img("qed-zero", "qed-zero.qed", "qed") as im:
        im.create("qed", 16 * M, "")
        im.io("qed", w(0x71, 0, 256 * K), "write -z 64k 64k")
    with g.img("qed-odd-size", "qed-odd-size.qed", "qed") as im:
        im.create("qed", 1023999, "")


@group("safe/qcow1")
def g_qcow1(g):
    for label, size in (("1M", 1 * M), ("64M", 64 * M), ("1023999", 1023999), ("1T", 1 * T)):
        id = f"qcow1-{label}"
        with g.img(id, id + ".qcow", "qcow") as im:
            im.create("qcow", size, "")
            if size <= 64 * M:
                im.io("qcow", w(0x72, 0, 4096), w(0x73, 512 * K - 512, 1024))
    with g.img("qcow1-aes", "qcow1-aes.qcow", "qcow", notes=f"legacy AES key '{SECRET}'") as im:
        im.create("qcow", 16 * M, "encrypt.format=aes,encrypt.key-secret=s0")
    with g.img("qcow1-convert", "qcow1-convert.qcow", "qcow") as im:
        make_src_raw(g.p("q1src.raw"))
        im.py("q1src.raw: same content as compress-src-raw (deleted after)")
        im.convert("raw", "q1src.raw", "qcow")
        os.unlink(g.p("q1src.raw"))


@group("safe/parallels")
def g_parallels(g):
    for cs in ("4k", "64k", "1M"):
        id = f"parallels-c{cs}"
        with g.img(id, id + ".hds", "parallels") as im:
            im.create("parallels", 64 * M, f"cluster_size={cs}")
            im.io("parallels", w(0x74, 0, 4096), w(0x75, 32 * M - 512, 1024))
    for mode in ("falloc", "full"):
        id = f"parallels-prealloc-{mode}"
        with g.img(id, id + ".hds", "parallels") as im:
            im.create("parallels", 2 * M, f"preallocation={mode}")
    with g.img("parallels-empty-1T", "parallels-empty-1T.hds", "parallels") as im:
        im.create("parallels", 1 * T, "")
    with g.img("parallels-odd-size", "parallels-odd-size.hds", "parallels") as im:
        im.create("parallels", 1023999, "")


@group("safe/luks")
def g_luks(g):
    variants = [
        ("default", ""),
        ("aes128-cbc-essiv", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256"),
        ("twofish256", "cipher-alg=twofish-256"),
        ("serpent128-cbc", "cipher-alg=serpent-128,cipher-mode=cbc"),
        # aes-192/cbc/plain64/sha384 makes qemu-img 10.0.2 abort (assertion
        # in crypto/block.c), so it is not in the list.
        ("aes192-xts-sha384", "cipher-alg=aes-192,hash-alg=sha384"),
    ]
    for label, opts in variants:
        id = f"luks-{label}"
        with g.img(id, id + ".luks", "luks", notes=f"salts/uuid random; passphrase '{SECRET}'") as im:
            im.create("luks", 4 * M, "key-secret=s0,iter-time=10" + ("," + opts if opts else ""))
            im.io("luks", w(0x76, 0, 4096), w(0x77, 4 * M - 512, 512), secret=True)
    with g.img("luks-odd-size", "luks-odd-size.luks", "luks", notes="salts random") as im:
        im.create("luks", 1023999, "key-secret=s0,iter-time=10")


def _mbr_disk(path):
    size = 16 * M
    m = B.mbr([(0x83, 2048, 8192, True), (0x82, 10240, 4096, False), (0x07, 14336, size // 512 - 14336, False)])
    B.write_sparse(path, size, [(0, m), (2048 * 512, B.pattern(0xA0, 4096)), (10240 * 512, B.pattern(0xA1, 512))])


def _gpt_disk(path, sectors):
    primary, backup, boff = B.gpt(sectors, [(B.GPT_ESP, 2048, 4095, "EFI System"), (B.GPT_LINUX, 4096, sectors - 34, "root")])
    B.write_sparse(path, sectors * 512, [(0, primary), (boff, backup), (2048 * 512, B.pattern(0xA2, 4096))])


@group("safe/raw")
def g_raw(g):
    for label, size in (("0", 0), ("512", 512), ("1", 1), ("1023999", 1023999), ("1G-sparse", 1 * G), ("1T-sparse", 1 * T), ("4T-sparse", 4 * T)):
        id = f"raw-{label}"
        with g.img(id, id + ".img", "raw") as im:
            im.create("raw", size)
            if size >= 4096:
                im.io("raw", w(0x78, 0, 512), w(0x79, size - size % 512 - 512, 512), w(0x7A, size // 2, 512))
    for mode in ("falloc", "full"):
        with g.img(f"raw-prealloc-{mode}", f"raw-prealloc-{mode}.img", "raw") as im:
            im.create("raw", 1 * M, f"preallocation={mode}")
    with g.img("raw-mbr", "raw-mbr.img", "raw-partitioned") as im:
        im.py("16 MiB sparse disk; MBR with 3 partitions (0x83 boot @2048, 0x82 @10240, 0x07 @14336); patterns in partitions", _mbr_disk, im.path)
    with g.img("raw-gpt", "raw-gpt.img", "raw-partitioned") as im:
        im.py("32 MiB sparse disk; protective MBR + primary/backup GPT, ESP @2048 and Linux @4096", _gpt_disk, im.path, 32 * M // 512)
    with g.img("raw-gpt-odd", "raw-gpt-odd.img", "raw-partitioned", notes="GPT on a disk of 1023999 bytes truncated to whole sectors") as im:
        im.py("GPT on 1999 sectors", _gpt_disk, im.path, 1999)
    with g.img("raw-mbr-only-sig", "raw-mbr-only-sig.img", "raw-partitioned") as im:
        im.py("512 bytes: empty MBR with only the 55aa signature", B.write, im.path, B.mbr([]))
    with g.img("raw-text", "raw-text.img", "raw") as im:
        im.py("4 KiB of ASCII text", B.write, im.path, (b"this is plain text, not a disk image\n" * 111)[:4096])


CONVERT_TARGETS = [
    ("raw", "raw", ""),
    ("qcow2", "qcow2", ""),
    ("qcow2-c", "qcow2", "compress"),
    ("qcow2-v2", "qcow2", "compat=0.10"),
    ("qcow", "qcow", ""),
    ("qed", "qed", ""),
    ("vdi", "vdi", ""),
    ("vpc", "vpc", ""),
    ("vpc-fixed", "vpc", "subformat=fixed"),
    ("vhdx", "vhdx", ""),
    ("vmdk", "vmdk", ""),
    ("vmdk-so", "vmdk", "subformat=streamOptimized"),
    ("vmdk-c", "vmdk", "compress,subformat=streamOptimized"),
    ("parallels", "parallels", ""),
    ("luks", "luks", "key-secret=s0,iter-time=10"),
]


@group("safe/convert")
def g_convert(g):
    with g.img("convert-src", "src.qcow2", "convert") as im:
        im.create("qcow2", 8 * M, "")
        im.io("qcow2", w(0xF1, 0, 128 * K), w(0xF2, 1 * M - 512, 1024), "write -z 2M 64k", w(0xF3, 4 * M, 4096), w(0xF4, 8 * M - 512, 512))
    for label, fmt, opts in CONVERT_TARGETS:
        compress = "compress" in opts
        opts = ",".join(o for o in opts.split(",") if o and o != "compress")
        id = f"convert-to-{label}"
        with g.img(id, f"{id}.{fmt}", "convert", notes="converted from src.qcow2 (convert-src)" + ("; random ids/salts" if fmt in ("vdi", "vpc", "vhdx", "vmdk", "luks") else "")) as im:
            im.convert("qcow2", "src.qcow2", fmt, opts or None, compress=compress)
    for fmt in ("vdi", "vpc", "vhdx", "qed", "parallels"):
        id = f"convert-back-from-{fmt}"
        with g.img(id, id + ".qcow2", "convert", notes=f"qcow2 converted from convert-to-{fmt}") as im:
            im.convert(fmt, f"convert-to-{fmt}.{fmt}", "qcow2", compress=True)


# =================================================================== real-world


def real_world(gen):
    src = os.environ.get("INSTAR_SHARED_TESTDATA") or os.path.join(REPO, "..", "shared", "testdata")
    rw = os.path.join(src, "real-world") if os.path.isdir(os.path.join(src, "real-world")) else src
    files = sorted(f for f in os.listdir(rw) if f.endswith(".bz2")) if os.path.isdir(rw) else []
    if not files:
        print(f"gen-corpus: no real-world samples under {rw}; skipping them", file=sys.stderr)
        return []
    g = Group(gen, "real-world")
    for f in files:
        name = f[:-4]
        with g.img("real-world-" + name.replace(".", "-"), name, "real-world", notes="QEMU iotests sample image (GPL-2.0 test data)") as im:
            with bz2.open(os.path.join(rw, f)) as fi:
                copy_sparse(fi, im.path)
            im.recipe.append(f"bzcat {f} > {name}")
    return [g]


# =================================================================== driver


class Gen:
    def __init__(self, out, jobs):
        self.out = os.path.abspath(out)
        self.jobs = jobs
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".corpus-build-", dir=parent)


def run_group(gen, rel, fn):
    g = Group(gen, rel)
    t = time.monotonic()
    try:
        fn(g)
    except Exception:
        g.failed.append((rel, traceback.format_exc()))
    g.seconds = time.monotonic() - t
    return g


def probe(path, cwd):
    """What qemu-img info makes of the file: (format or None, error line)."""
    try:
        r = subprocess.run([QEMU_IMG, "info", "--output=json", os.path.basename(path)], cwd=cwd, capture_output=True, timeout=INFO_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {INFO_TIMEOUT}s"
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        return None, err[0] if err else f"rc={r.returncode}"
    try:
        return json.loads(r.stdout)["format"], None
    except (ValueError, KeyError):
        return None, "unparsable JSON"


# Files up to this apparent size get a plain sha256 of their content.
# Hashing the zeros of a multi-GiB sparse file costs seconds per GiB, so
# bigger files get "sparse-sha256:<hex>" (see block_digest).
FULL_HASH_LIMIT = 1 * G
BLOCK = 1 * M


def _data_blocks(f, size):
    """Yield (offset, bytes) of 1 MiB-aligned blocks that may hold data,
    seeking over holes where the filesystem reports them."""
    fd = f.fileno()
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        pos = data - data % BLOCK
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        while pos < hole:
            f.seek(pos)
            b = f.read(BLOCK)
            if not b:
                return
            yield pos, b
            pos += len(b)


def block_digest(path):
    """sha256 over (offset u64 BE, bytes) of every 1 MiB-aligned block that
    is not all zeros, then the file size (u64 BE). Depends only on the
    content, not on how the file is allocated."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    zero = bytes(BLOCK)
    with open(path, "rb") as f:
        for off, b in _data_blocks(f, size):
            if b != zero[: len(b)]:
                h.update(off.to_bytes(8, "big"))
                h.update(b)
    h.update(size.to_bytes(8, "big"))
    return "sparse-sha256:" + h.hexdigest()


def sha256_sparse(path):
    """Plain sha256 of the file content; zeros of holes come from memory."""
    size = os.path.getsize(path)
    if size > FULL_HASH_LIMIT:
        return block_digest(path)
    h = hashlib.sha256()
    zero = bytes(BLOCK)
    pos = 0
    with open(path, "rb") as f:
        for off, b in _data_blocks(f, size):
            while pos < off:
                n = min(BLOCK, off - pos)
                h.update(zero[:n])
                pos += n
            h.update(b)
            pos = off + len(b)
    while pos < size:
        n = min(BLOCK, size - pos)
        h.update(zero[:n])
        pos += n
    return h.hexdigest()


def copy_sparse(fi, path):
    """Copy a stream to `path`, leaving holes for all-zero 64 KiB blocks."""
    zero = bytes(64 * K)
    with open(path, "wb") as fo:
        while True:
            b = fi.read(64 * K)
            if not b:
                break
            if b == zero[: len(b)]:
                fo.seek(len(b), os.SEEK_CUR)
            else:
                fo.write(b)
        fo.truncate(fo.tell())


def qemu_img_version():
    r = subprocess.run([QEMU_IMG, "--version"], capture_output=True, text=True)
    return r.stdout.splitlines()[0] if r.stdout else ""


def is_cached(out):
    mf = os.path.join(out, "manifest.json")
    try:
        with open(mf) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    if m.get("generator_version") != GENERATOR_VERSION:
        return False
    return all(os.path.lexists(os.path.join(out, i["path"])) for i in m.get("images", []))


MARKER = ".instar-corpus"


def default_out():
    return os.environ.get("INSTAR_TESTDATA_PATH") or os.path.join(REPO, ".cache", "corpus")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default $INSTAR_TESTDATA_PATH or <repo>/.cache/corpus)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cached corpus is current")
    ap.add_argument("--jobs", type=int, default=2, help="parallel build groups (default 2)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any recipe failed (default: warn; other qemu versions lack some options)")
    args = ap.parse_args()
    out = os.path.abspath(args.out or default_out())
    if not args.force and is_cached(out):
        print(f"gen-corpus: {out} is current (generator_version {GENERATOR_VERSION})")
        return 0
    for tool in (QEMU_IMG, QEMU_IO):
        if shutil.which(tool) is None:
            print(f"gen-corpus: {tool} not found", file=sys.stderr)
            return 2
    # Never delete a directory this script did not make.
    ours = any(os.path.exists(os.path.join(out, f)) for f in (MARKER, "manifest.json"))
    if os.path.isdir(out) and os.listdir(out) and not ours:
        print(f"gen-corpus: {out} exists and is not a corpus made by this script (no {MARKER}); refusing to replace it", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    gen = Gen(out, max(1, args.jobs))
    with open(os.path.join(gen.tmp, MARKER), "w") as f:
        f.write("made by tools/gen-corpus.py; the whole directory is replaced on rebuild\n")
    from corpus import hostile

    # LUKS creation spends seconds calibrating PBKDF: start those first.
    todo = list(GROUPS) + [(rel, fn) for rel, fn in hostile.GROUPS]
    todo.sort(key=lambda t: 0 if ("luks" in t[0] or "truncated" in t[0]) else 1)
    groups = []
    errors = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=gen.jobs) as ex:
            futs = {ex.submit(run_group, gen, rel, fn): rel for rel, fn in todo}
            for fut in concurrent.futures.as_completed(futs):
                try:
                    groups.append(fut.result())
                except Exception:
                    errors.append((futs[fut], traceback.format_exc()))
        groups += real_world(gen)
    except BaseException:
        shutil.rmtree(gen.tmp, ignore_errors=True)
        raise
    if os.environ.get("GEN_CORPUS_TIMING"):
        for g in sorted(groups, key=lambda g: -getattr(g, "seconds", 0))[:15]:
            print(f"gen-corpus: {getattr(g, 'seconds', 0):6.1f}s {g.rel}", file=sys.stderr)
        ims = sorted((im for g in groups for im in g.images), key=lambda im: -getattr(im, "seconds", 0))
        for im in ims[:25]:
            print(f"gen-corpus: {im.seconds:6.1f}s {im.id}", file=sys.stderr)
    for g in groups:
        for id, msg in g.failed:
            errors.append((id, msg))
    for what, msg in errors:
        print(f"gen-corpus: WARNING: {what} not built: {msg}", file=sys.stderr)

    images = []
    for g in sorted(groups, key=lambda g: g.rel):
        for im in g.images:
            if os.path.lexists(im.path):
                images.append(im)
            else:
                errors.append((im.id, "file missing after build"))
    ids = [im.id for im in images]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        shutil.rmtree(gen.tmp, ignore_errors=True)
        raise SystemExit(f"gen-corpus: duplicate ids {sorted(dup)}")
    known = set(ids)
    for im in images:
        im.chain = [c for c in im.chain if c in known]

    # Swap the new tree in. Absolute references point at `out`, so the
    # qemu-img probe runs after the rename; the manifest is written last and
    # is what marks the corpus complete.
    t1 = time.monotonic()
    print(f"gen-corpus: built in {t1 - t0:.1f}s; probing with qemu-img info", file=sys.stderr)
    old = None
    if os.path.lexists(out):
        old = out + f".old-{os.getpid()}"
        os.rename(out, old)
    os.rename(gen.tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)

    def describe(im):
        rel = os.path.join(im.group.rel, im.fname)
        full = os.path.join(out, rel)
        fmt, err = probe(full, os.path.dirname(full))
        notes = im.notes
        if err:
            notes = (notes + "; " if notes else "") + "qemu-img info: " + err
        return {
            "id": im.id,
            "path": rel,
            "format": fmt,
            "tier": im.tier,
            "category": im.category,
            "recipe": " && ".join(im.recipe) if im.recipe else "hand-built",
            "sha256": sha256_sparse(full) if os.path.isfile(full) else None,
            "chain": im.chain,
            "expect": "error" if err else "ok",
            "notes": notes,
        }

    with concurrent.futures.ThreadPoolExecutor(max_workers=gen.jobs) as ex:
        entries = list(ex.map(describe, images))
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "qemu_img_version": qemu_img_version(),
        "images": entries,
    }
    tmpm = os.path.join(out, f".manifest.json.{os.getpid()}")
    with open(tmpm, "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.rename(tmpm, os.path.join(out, "manifest.json"))
    n_safe = sum(1 for e in entries if e["tier"] == "safe")
    n_host = len(entries) - n_safe
    cats = sorted({e["category"] for e in entries if e["tier"] == "hostile"})
    n_ok = sum(1 for e in entries if e["expect"] == "ok")
    print(
        f"gen-corpus: {len(entries)} images ({n_safe} safe, {n_host} hostile in {len(cats)} categories); "
        f"qemu-img info ok on {n_ok}, error on {len(entries) - n_ok}; {len(errors)} recipe failures; "
        f"{time.monotonic() - t0:.1f}s -> {out}"
    )
    return 1 if (errors and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
