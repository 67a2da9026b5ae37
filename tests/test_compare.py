"""`compare`: instar and QEMU_IMG on the same pair of images, same
arguments, same working directory; stdout, stderr and exit code byte for
byte.

Pairs: every corpus image that instar can walk (raw and qcow2, chains of
them, hostile ones included) against itself and against its `qemu-img
convert -O raw` copy (plain and `-s`), and a set of built pairs: qcow2 vs
raw, compressed vs plain, chain vs flattened, different sizes, a known
difference, strict mode, unopenable files, `-q` and `-p`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import harness
from harness import (
    load_config,
    load_manifest,
    map_implemented,
    measure_rows_apply,
    instar_argv,
    qemu_argv,
    run,
    tool_env,
)

_CFG = load_config()


def _corpus_images():
    try:
        _, images = load_manifest(_CFG.testdata)
    except OSError:
        return []
    images = [i for i in images if map_implemented(i) and measure_rows_apply(i)]
    return images if harness.EXHAUSTIVE else harness.one_per_category(images)


def both(cfg, args, cwd):
    env = tool_env(cfg)
    q = run(qemu_argv(cfg, args), cwd, env, cfg.timeout)
    if q.rc is None:
        pytest.skip("qemu-img timed out")
    if q.rc < 0:
        pytest.skip(f"qemu-img itself crashed (signal {-q.rc})")
    i = run(instar_argv(cfg, args), cwd, env, cfg.timeout)
    return q, i


# What instar refuses on purpose (files outside the image's directory and
# allow_paths, chains deeper than max_chain_depth): one line, exit 2.
POLICY = (b"instar refuses '", b"is deeper than max_chain_depth", b"(MAX_OPEN_FILES)")

# Not compare's: how the file gate words a protocol backing name, and
# qemu-img's own overflow on a 2^31-sector parallels image (see
# known_divergences.json for map).
OTHER = {
    "bod-nbd-unix": "the gate words a refused nbd: backing name differently",
    "bod-json-file": "the gate opens json: backing names as plain names",
    "bod-file-proto": "the gate opens file: backing names as plain names",
    "bod-http": "the gate opens http: backing names as plain names",
    "parallels-empty-1T": "qemu-img's parallels block status overflows on 2^31 sectors",
}


def corpus_same(image, q, i, what):
    if image.id in OTHER:
        pytest.skip(OTHER[image.id])
    refused = (
        image.tier == "hostile"
        and i.rc == 2
        and i.stdout == b""
        and i.stderr.count(b"\n") == 1
        and any(p in i.stderr for p in POLICY)
    )
    if refused and (i.rc, i.stdout, i.stderr) != (q.rc, q.stdout, q.stderr):
        pytest.xfail(f"refused by policy: {i.stderr.decode(errors='replace').strip()}")
    assert_same(q, i, what)


def _prog(r):
    # Usage errors name the program as invoked (getopt's argv[0]).
    return r.stderr.replace(r.argv[0].encode(), b"PROG")


def assert_same(q, i, what):
    assert (i.rc, i.stdout, _prog(i)) == (q.rc, q.stdout, _prog(q)), (
        f"{what}\nqemu-img rc={q.rc} stdout={q.stdout!r} stderr={q.stderr!r}\n"
        f"instar   rc={i.rc} stdout={i.stdout!r} stderr={i.stderr!r}"
    )


def qemu_img(cfg, *args, cwd=None):
    subprocess.run(
        qemu_argv(cfg, list(args)), check=True, cwd=cwd, env=tool_env(cfg), capture_output=True
    )


def qemu_io(cfg, image, *cmds, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True, env=tool_env(cfg))


IMAGES = _corpus_images()


@pytest.mark.parametrize("image", IMAGES, ids=[i.id for i in IMAGES])
def test_corpus_self(cfg, image):
    q, i = both(cfg, ["compare", image.abspath.name, image.abspath.name], image.dir)
    corpus_same(image, q, i, f"compare {image.path} with itself")


@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
@pytest.mark.parametrize("image", IMAGES, ids=[i.id for i in IMAGES])
def test_corpus_vs_raw(cfg, image, strict, tmp_path):
    raw = tmp_path / "converted.raw"
    conv = run(
        qemu_argv(cfg, ["convert", "-O", "raw", image.abspath.name, str(raw)]),
        image.dir,
        tool_env(cfg),
        cfg.timeout,
    )
    if conv.rc != 0:
        pytest.skip("qemu-img cannot convert it")
    args = ["compare", *(["-s"] if strict else []), image.abspath.name, str(raw)]
    q, i = both(cfg, args, image.dir)
    corpus_same(image, q, i, f"compare {image.path} with its raw conversion")


# --------------------------------------------------------------------------
# built pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Images built with the real qemu-img and qemu-io, named by role."""
    cfg = _CFG
    d = tmp_path_factory.mktemp("compare")
    q = lambda *a: qemu_img(cfg, *a, cwd=d)  # noqa: E731
    q("create", "-q", "-f", "qcow2", "a.qcow2", "4M")
    qemu_io(cfg, d / "a.qcow2", "write -P 1 0 1M", "write -P 2 2M 64k", "write -z 3M 64k")
    q("convert", "-O", "raw", "a.qcow2", "a.raw")
    q("convert", "-O", "qcow2", "a.qcow2", "a-copy.qcow2")
    q("convert", "-c", "-O", "qcow2", "a.qcow2", "a-comp.qcow2")
    # One byte differs in the second sector of the data.
    (d / "b.raw").write_bytes((d / "a.raw").read_bytes())
    with open(d / "b.raw", "r+b") as f:
        f.seek(1500)
        f.write(b"x")
        # and a non-zero byte where a.qcow2 is unallocated
    (d / "c.raw").write_bytes((d / "a.raw").read_bytes())
    with open(d / "c.raw", "r+b") as f:
        f.seek(1536 * 1024 + 700)
        f.write(b"y")
    # Larger images: zero tail, non-zero tail.
    (d / "big-zero.raw").write_bytes((d / "a.raw").read_bytes() + bytes(1 << 20))
    (d / "big-data.raw").write_bytes((d / "a.raw").read_bytes() + bytes(4096) + b"z" * 512)
    q("create", "-q", "-f", "qcow2", "big.qcow2", "6M")
    qemu_io(cfg, d / "big.qcow2", "write -P 1 0 1M", "write -P 2 2M 64k", "write -P 9 5M 4k")
    q("create", "-q", "-f", "qcow2", "small.qcow2", "1M")
    # A chain and its flattened copy; the overlay is larger than its base.
    q("create", "-q", "-f", "qcow2", "base.qcow2", "2M")
    qemu_io(cfg, d / "base.qcow2", "write -P 5 0 2M")
    q("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "4M")
    qemu_io(cfg, d / "top.qcow2", "write -P 6 64k 64k", "write -z 1M 64k")
    q("convert", "-O", "qcow2", "top.qcow2", "flat.qcow2")
    q("convert", "-O", "raw", "top.qcow2", "flat.raw")
    # Empty and sparse.
    q("create", "-q", "-f", "qcow2", "empty.qcow2", "4M")
    q("create", "-q", "-f", "raw", "empty.raw", "4M")
    (d / "odd.raw").write_bytes(b"\1" * 1000)
    (d / "odd2.raw").write_bytes(b"\1" * 999 + b"\2")
    (d / "notqcow.txt").write_bytes(b"hello\n")
    return d


PAIR_ARGS = [
    ["a.qcow2", "a.qcow2"],
    ["a.qcow2", "a.raw"],
    ["a.raw", "a.qcow2"],
    ["-s", "a.qcow2", "a.raw"],
    ["-s", "a.qcow2", "a-copy.qcow2"],
    ["-s", "a.raw", "a.raw"],
    ["a.qcow2", "a-comp.qcow2"],
    ["-s", "a.qcow2", "a-comp.qcow2"],
    ["-s", "a-comp.qcow2", "a-comp.qcow2"],
    ["a-comp.qcow2", "b.raw"],
    ["a.qcow2", "b.raw"],
    ["b.raw", "a.qcow2"],
    ["a.qcow2", "c.raw"],
    ["c.raw", "a.qcow2"],
    ["-q", "a.qcow2", "b.raw"],
    ["-q", "a.qcow2", "a.raw"],
    ["-p", "a.qcow2", "a.raw"],
    ["-p", "a.qcow2", "b.raw"],
    ["-p", "a.raw", "big-zero.raw"],
    ["-p", "-q", "a.qcow2", "a.raw"],
    ["a.raw", "big-zero.raw"],
    ["big-zero.raw", "a.raw"],
    ["a.raw", "big-data.raw"],
    ["-s", "a.raw", "big-zero.raw"],
    ["a.qcow2", "big.qcow2"],
    ["big.qcow2", "a.qcow2"],
    ["small.qcow2", "big.qcow2"],
    ["top.qcow2", "flat.qcow2"],
    ["top.qcow2", "flat.raw"],
    ["-s", "top.qcow2", "flat.qcow2"],
    ["-s", "top.qcow2", "top.qcow2"],
    ["base.qcow2", "top.qcow2"],
    ["empty.qcow2", "empty.raw"],
    ["-s", "empty.qcow2", "empty.raw"],
    ["-s", "empty.qcow2", "empty.qcow2"],
    ["empty.qcow2", "a.qcow2"],
    ["odd.raw", "odd2.raw"],
    ["odd.raw", "odd.raw"],
    ["-f", "raw", "-F", "raw", "a.qcow2", "a.raw"],
    ["-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"],
    ["-F", "qcow2", "a.qcow2", "a.raw"],
    ["-f", "vmdk", "a.qcow2", "a.raw"],
    ["missing.qcow2", "a.raw"],
    ["a.raw", "missing.qcow2"],
    ["-p", "missing.qcow2", "a.raw"],
    ["notqcow.txt", "a.raw"],
    ["-f", "qcow2", "notqcow.txt", "a.raw"],
    ["-T", "bogus", "a.raw", "a.raw"],
    ["-T", "none", "-U", "a.raw", "a.raw"],
    ["a.raw"],
    ["a.raw", "a.raw", "a.raw"],
    ["-x", "a.raw", "a.raw"],
    ["-f"],
    ["--strict", "--a-format=qcow2", "--b-format", "raw", "a.qcow2", "a.raw"],
    ["--progress", "--quiet", "a.qcow2", "b.raw"],
]


@pytest.mark.parametrize("args", PAIR_ARGS, ids=[" ".join(a) for a in PAIR_ARGS])
def test_pair(cfg, pairs, args):
    q, i = both(cfg, ["compare", *args], pairs)
    assert_same(q, i, f"compare {' '.join(args)}")
