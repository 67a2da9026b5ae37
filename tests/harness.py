"""Shared machinery of the functional suite: configuration from the
environment, the corpus manifest, the table of commands x output modes, and
running instar / qemu-img the same way. tools/record-baselines.py imports it
too, so recording and checking can never drift apart."""

from __future__ import annotations

import atexit
import dataclasses
import fnmatch
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
BASELINE_DIR = TESTS / "expected-outputs"

# Both tools see the same environment: a fixed zone because snapshot dates
# are printed in local time, the C locale so nothing is translated.
FIXED_ENV = {"TZ": "UTC", "LC_ALL": "C", "LANG": "C"}


# --------------------------------------------------------------------------
# qemu-img versions


VERSION_RE = re.compile(r"^qemu-img version (\d+)\.(\d+)\.(\d+)(?: \((.*)\))?\s*$")


@dataclasses.dataclass(frozen=True)
class QemuVersion:
    major: int
    minor: int
    micro: int
    pkg: str = ""  # distro suffix, e.g. "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"

    @classmethod
    def parse(cls, text: str) -> "QemuVersion":
        for line in text.splitlines():
            m = VERSION_RE.match(line.strip())
            if m:
                return cls(int(m[1]), int(m[2]), int(m[3]), m[4] or "")
        m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?$", text.strip())
        if m:
            return cls(int(m[1]), int(m[2]), int(m[3] or 0))
        raise ValueError(f"no qemu-img version in {text!r}")

    @property
    def key(self) -> tuple:
        return (self.major, self.minor, self.micro)

    @property
    def short(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"

    def __str__(self) -> str:
        return self.short + (f" ({self.pkg})" if self.pkg else "")

    def same_build(self, other: "QemuVersion") -> bool:
        return self == other

    def semver_compatible(self, other: "QemuVersion") -> bool:
        # qemu changes output layout only in major.minor releases; a micro
        # release or a distro rebuild of the same X.Y is held to the same bytes.
        return (self.major, self.minor) == (other.major, other.minor)


# --------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class Config:
    instar: Path
    qemu_img: str  # as given (may be a wrapper script)
    qemu_img_resolved: Optional[str]
    qemu_version: Optional[QemuVersion]
    qemu_version_text: str
    testdata: Path
    timeout: float
    pass_qemu_version: bool
    shim_dir: Path

    def describe(self) -> dict:
        return {
            "instar_binary": str(self.instar),
            "qemu_img": self.qemu_img,
            "qemu_img_resolved": self.qemu_img_resolved,
            "qemu_img_version": str(self.qemu_version) if self.qemu_version else None,
            "qemu_img_version_text": self.qemu_version_text,
            "testdata": str(self.testdata),
            "instar_gets_qemu_version_flag": self.pass_qemu_version,
            # Set by tools/test-package-functional.sh for matrix entries.
            "distribution": os.environ.get("INSTAR_TEST_DISTRO"),
            "package": os.environ.get("INSTAR_TEST_PACKAGE"),
        }


def _which(cmd: str) -> Optional[str]:
    if "/" in cmd:
        p = Path(cmd)
        return str(p.resolve()) if p.exists() else None
    found = shutil.which(cmd)
    return str(Path(found).resolve()) if found else None


def qemu_version_of(qemu_img: str) -> tuple[Optional[QemuVersion], str]:
    try:
        r = subprocess.run(
            [qemu_img, "--version"],
            capture_output=True,
            timeout=60,
            env={**os.environ, **FIXED_ENV},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot run {qemu_img} --version: {e}"
    text = r.stdout.decode("utf-8", "replace")
    try:
        return QemuVersion.parse(text), text.splitlines()[0] if text else ""
    except ValueError:
        return None, text.strip()


def qemu_exec_path(qemu_img: str) -> str:
    """Absolute path to run QEMU_IMG by, symlinks kept (a wrapper may read its
    argv[0]); never a bare name, which the PATH shim would shadow."""
    if "/" in qemu_img:
        return str(Path(qemu_img).absolute())
    return shutil.which(qemu_img) or qemu_img


@functools.lru_cache(maxsize=1)
def load_config() -> Config:
    instar = Path(os.environ.get("INSTAR_BINARY_PATH", REPO / "target/release/instar"))
    testdata = Path(os.environ.get("INSTAR_TESTDATA_PATH", REPO / ".cache/corpus"))
    qemu_img = os.environ.get("QEMU_IMG", "qemu-img")
    resolved = _which(qemu_img)
    version, text = qemu_version_of(qemu_img) if resolved else (None, "")
    # instar finds "its" qemu-img on PATH: put QEMU_IMG there first, so the
    # version instar detects is the one it is compared with.
    shim = Path(tempfile.mkdtemp(prefix="instar-qemu-shim-"))
    atexit.register(shutil.rmtree, shim, True)
    if resolved:
        # a script, not a symlink: wrappers such as qemu-img@ROOT read argv[0]
        target = qemu_exec_path(qemu_img)
        (shim / "qemu-img").write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (shim / "qemu-img").chmod(0o755)
    default = _which("qemu-img")
    flag = os.environ.get("INSTAR_PASS_QEMU_VERSION", "auto")
    if flag == "always":
        pass_flag = True
    elif flag == "never":
        pass_flag = False
    else:
        pass_flag = resolved != default
    return Config(
        instar=instar.absolute(),
        qemu_img=qemu_img,
        qemu_img_resolved=resolved,
        qemu_version=version,
        qemu_version_text=text,
        testdata=testdata.absolute(),
        timeout=float(os.environ.get("INSTAR_TEST_TIMEOUT", "30")),
        pass_qemu_version=pass_flag,
        shim_dir=shim,
    )


def tool_env(cfg: Config, extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update(FIXED_ENV)
    env["PATH"] = f"{cfg.shim_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------
# corpus


@dataclasses.dataclass(frozen=True)
class Image:
    id: str
    path: str  # relative to the corpus root
    format: Optional[str]
    tier: str
    category: str
    recipe: str
    sha256: str
    chain: tuple
    expect: str
    notes: str
    root: Path

    @property
    def abspath(self) -> Path:
        return self.root / self.path

    @property
    def dir(self) -> Path:
        return self.abspath.parent


def load_manifest(root: Path) -> tuple[dict, list[Image]]:
    data = json.loads((root / "manifest.json").read_text())
    images = []
    for e in data.get("images", []):
        images.append(
            Image(
                id=e["id"],
                path=e["path"],
                format=e.get("format"),
                tier=e.get("tier", "safe"),
                category=e.get("category", ""),
                recipe=e.get("recipe", ""),
                sha256=e.get("sha256", ""),
                chain=tuple(e.get("chain") or ()),
                expect=e.get("expect", "ok"),
                notes=e.get("notes", ""),
                root=root,
            )
        )
    wanted = os.environ.get("INSTAR_TEST_IMAGES")
    if wanted:
        pats = [p for p in wanted.split(",") if p]
        images = [i for i in images if any(fnmatch.fnmatchcase(i.id, p) for p in pats)]
    return data, images


def ensure_corpus(cfg: Config) -> Optional[str]:
    """Run the corpus generator (a no-op when its cache is fresh). Returns an
    error text when no manifest can be had."""
    gen = REPO / "tools/gen-corpus.py"
    if gen.exists() and os.environ.get("INSTAR_NO_GENERATE") != "1":
        env = dict(os.environ)
        # The corpus is defined by the local qemu-img; a QEMU_IMG pointing at
        # another distribution's binary is for comparing, not for making.
        env.pop("QEMU_IMG", None)
        r = subprocess.run(
            [sys.executable, str(gen), "--out", str(cfg.testdata)],
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            return f"tools/gen-corpus.py --out {cfg.testdata} failed (exit {r.returncode}):\n{r.stderr[-3000:]}"
    if not (cfg.testdata / "manifest.json").exists():
        return (
            f"no corpus manifest at {cfg.testdata}/manifest.json: set INSTAR_TESTDATA_PATH "
            "or provide tools/gen-corpus.py"
        )
    return None


# --------------------------------------------------------------------------
# the table of commands x output modes
#
# Adding a command is adding rows here (and flipping `enabled` once instar
# implements it). Every live-differential, baseline, hostile and oslo test is
# generated from the enabled rows.


@dataclasses.dataclass(frozen=True)
class Mode:
    command: str
    mode: str
    args: tuple = ()
    enabled: bool = True
    # image -> does this row make sense for it (e.g. `-f FMT` needs a format)
    applies: Optional[Callable[[Image], bool]] = None
    # (image, image argument) -> argv after the program name; default
    # `command *args IMAGE`. Two-image commands (compare) override it.
    argv: Optional[Callable[[Image, str], list]] = None
    # stdout fields that change from run to run of qemu-img itself
    volatile: tuple = ()

    @property
    def key(self) -> str:
        return f"{self.command}-{self.mode}"

    def build(self, image: Image, image_arg: str) -> list:
        if self.argv:
            return list(self.argv(image, image_arg))
        return [self.command, *self.args, image_arg]

    def applies_to(self, image: Image) -> bool:
        return self.applies(image) if self.applies else True


# `map` covers raw and qcow2 (instar refuses other formats with one
# `instar: map is not implemented` line). Chains that pass through another
# format are left out by path.
MAP_FORMATS = ("raw", "qcow2")
MAP_OTHER_FORMAT_CHAINS = ("hostile/backing-loop/mixed.",)
MAP_FORMATS += ("qed", "qcow", "parallels", "bochs", "cloop", "dmg", "luks")
MAP_FORMATS += ("vmdk", "vpc", "vhdx", "vdi")


# The heavy write-and-judge sweeps (convert, compare against a conversion)
# run on one image per (tier, format, category) unless this is set: every
# image is about an hour on 2 cores, over CI's budget. tools/matrix.py and
# release checks set it (docs/testing.md).
EXHAUSTIVE = os.environ.get("INSTAR_TEST_EXHAUSTIVE") == "1"


def one_per_category(images):
    """The first image of each (tier, format, category), in order."""
    seen, out = set(), []
    for i in images:
        key = (i.tier, i.format, i.category)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def map_implemented(image: Image) -> bool:
    return image.format in MAP_FORMATS and not image.path.startswith(MAP_OTHER_FORMAT_CHAINS)


@functools.lru_cache(maxsize=4)
def _manifest_formats(root: Path) -> dict:
    data = json.loads((root / "manifest.json").read_text())
    return {e["id"]: (e.get("format"), tuple(e.get("chain") or ())) for e in data.get("images", [])}


def measure_rows_apply(image: Image) -> bool:
    """qemu opens a qcow2's external data file by its stored name relative
    to the current directory; instar's file gate resolves it relative to
    the image (as for backing files), so the `root` naming differs. Left
    out until the gate models it (map has the same open)."""
    return image.category != "qcow2-data-file"


# `check` covers qcow2 and the formats qemu has no check for (exit 63);
# qed, vdi, vhdx, vmdk and parallels are refused with one `instar:` line.
CHECK_FORMATS = ("qcow2", "raw", "vpc", "bochs", "cloop", "dmg", "luks", "qcow")
# qemu's check opens the backing chain and the data file (relative to the
# cwd) and reads the snapshot table leniently; instar does none of these yet.
CHECK_OTHER_CATEGORIES = (
    "backing-loop",
    "backing-outside-dir",
    "datafile-outside-dir",
    "qcow2-data-file",
    "snapshot-table-attack",
)
CHECK_OTHER_IMAGES = (
    "hostile/compression-bomb/bomb-dmg-bzip2.dmg",  # qemu's module warning
    "hostile/header-extension-overflow/hext-backing-name-nul.qcow2",  # backing open
    "hostile/tables-past-eof/eof-qcow2-snapshots.qcow2",  # lenient snapshot table
)


def check_implemented(image: Image) -> bool:
    return (
        image.format in CHECK_FORMATS
        and image.category not in CHECK_OTHER_CATEGORIES
        and image.path not in CHECK_OTHER_IMAGES
    )


def measure_walkable(image: Image) -> bool:
    """`measure -O qcow2` reads allocation through the map walk, which knows
    raw and qcow2 (chains of them included); other sources are refused
    with one `instar:` line until their block status exists."""
    if not measure_rows_apply(image):
        return False
    formats = _manifest_formats(image.root)
    fmt, chain, seen = image.format, image.chain, set()
    while True:
        if fmt not in ("raw", "qcow2"):
            return False
        if not chain:
            return True
        nxt = chain[0]
        if nxt in seen or nxt not in formats:
            return False
        seen.add(nxt)
        fmt, chain = formats[nxt]


COMMAND_MODES = [
    Mode("info", "human"),
    Mode("info", "json", ("--output=json",)),
    Mode(
        "info",
        "fmt-human",
        enabled=False,
        applies=lambda i: bool(i.format),
        argv=lambda i, a: ["info", "-f", i.format, a],
    ),
    Mode("info", "chain-human", ("--backing-chain",), enabled=False),
    Mode("info", "chain-json", ("--backing-chain", "--output=json"), enabled=False),
    Mode("check", "human", applies=lambda i: check_implemented(i)),
    Mode("check", "json", ("--output=json",), applies=lambda i: check_implemented(i)),
    Mode("map", "human", applies=lambda i: map_implemented(i)),
    Mode("map", "json", ("--output=json",), applies=lambda i: map_implemented(i)),
    Mode(
        "measure",
        "qcow2-human",
        applies=lambda i: measure_walkable(i),
        argv=lambda i, a: ["measure", "-O", "qcow2", a],
    ),
    Mode(
        "measure",
        "qcow2-json",
        applies=lambda i: measure_walkable(i),
        argv=lambda i, a: ["measure", "--output=json", "-O", "qcow2", a],
    ),
    Mode(
        "measure",
        "raw-human",
        applies=lambda i: measure_rows_apply(i),
        argv=lambda i, a: ["measure", "-O", "raw", a],
    ),
    Mode(
        "measure",
        "raw-json",
        applies=lambda i: measure_rows_apply(i),
        argv=lambda i, a: ["measure", "--output=json", "-O", "raw", a],
    ),
]


def enabled_modes() -> list[Mode]:
    """INSTAR_TEST_COMMANDS selects rows: `info`, `info:json`, `check,map`,
    or `all`; default the rows marked enabled."""
    sel = os.environ.get("INSTAR_TEST_COMMANDS")
    if not sel:
        return [m for m in COMMAND_MODES if m.enabled]
    if sel == "all":
        return list(COMMAND_MODES)
    out = []
    for item in sel.split(","):
        cmd, _, mode = item.partition(":")
        out += [m for m in COMMAND_MODES if m.command == cmd and (not mode or m.mode == mode)]
    return out


# How the image is named on the command line; the cwd is always the image's
# directory except for `root`, which names it from the corpus root (a path
# with a directory part, which changes how relative backing files resolve).
PATH_STYLES = ("rel", "abs", "root")


def style_applies(image: Image, style: str) -> bool:
    """`root` only where other files are resolved relative to the image
    (backing chains, data files, vmdk extents): elsewhere it repeats `rel`
    with a longer name, and the suite must stay fast on 2 cores."""
    if style != "root":
        return True
    c = image.category
    return bool(image.chain) or image.format == "vmdk" or any(
        k in c for k in ("chain", "data-file", "vmdk", "real-world")
    )


def image_arg(image: Image, style: str) -> tuple[str, Path]:
    if style == "rel":
        return image.abspath.name, image.dir
    if style == "abs":
        return str(image.abspath), image.dir
    if style == "root":
        return image.path, image.root
    raise ValueError(style)


# --------------------------------------------------------------------------
# running


# qemu's module loader hints at a missing distro package (e.g. Ubuntu's
# qemu-block-extra) before the real output: a fact of that installation, not
# of the image, and nothing instar could know. Skipped on both sides.
MODULE_HINT = re.compile(r"^[^\s:]+: module \S+ not found, do you want to install \S+ package\?$")


@dataclasses.dataclass
class Result:
    stdout: bytes
    stderr: bytes
    rc: Optional[int]  # None: timed out; negative: killed by that signal
    seconds: float = 0.0
    argv: tuple = ()
    cwd: str = ""

    @property
    def stderr_first(self) -> str:
        """The first stderr line that is about the image."""
        text = self.stderr.decode("utf-8", "backslashreplace")
        for line in text.splitlines():
            if not MODULE_HINT.match(line):
                return line
        return ""

    def to_record(self) -> dict:
        return {
            "stdout": self.stdout.decode("utf-8", "surrogateescape"),
            "rc": self.rc,
            "stderr1": self.stderr_first,
        }

    @classmethod
    def from_record(cls, rec: dict) -> "Result":
        return cls(
            stdout=rec["stdout"].encode("utf-8", "surrogateescape"),
            stderr=(rec.get("stderr1", "") + "\n").encode() if rec.get("stderr1") else b"",
            rc=rec["rc"],
        )


def run(argv: list, cwd: Path, env: dict, timeout: float, prefix: tuple = ()) -> Result:
    """Run with a deadline; the whole process group dies at the deadline."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        [*prefix, *map(str, argv)],
        cwd=str(cwd),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = None
    return Result(out, err, rc, time.monotonic() - t0, tuple(map(str, argv)), str(cwd))


def qemu_argv(cfg: Config, args: list) -> list:
    # absolute: the tools run in the image's directory
    return [qemu_exec_path(cfg.qemu_img), *args]


def instar_argv(cfg: Config, args: list, qemu_version: Optional[str] = None) -> list:
    """`qemu_version` forces a profile; otherwise the flag is passed only when
    QEMU_IMG is not the qemu-img instar would find by itself."""
    pre = []
    if qemu_version:
        pre = ["--qemu-version", qemu_version]
    elif cfg.pass_qemu_version and cfg.qemu_version:
        pre = ["--qemu-version", cfg.qemu_version.short]
    return [str(cfg.instar), *pre, *args]


def run_qemu(cfg: Config, mode: Mode, image: Image, style: str) -> Result:
    arg, cwd = image_arg(image, style)
    return run(qemu_argv(cfg, mode.build(image, arg)), cwd, tool_env(cfg), cfg.timeout)


def run_instar(
    cfg: Config, mode: Mode, image: Image, style: str, qemu_version: Optional[str] = None
) -> Result:
    arg, cwd = image_arg(image, style)
    return run(
        instar_argv(cfg, mode.build(image, arg), qemu_version), cwd, tool_env(cfg), cfg.timeout
    )


# --------------------------------------------------------------------------
# baselines


def baseline_key(image_id: str, mode: Mode) -> str:
    return f"{image_id}|{mode.command}|{mode.mode}"


def baseline_files() -> list[Path]:
    return sorted(BASELINE_DIR.glob("qemu-img-*.json"))


def load_baseline(path: Path) -> dict:
    return json.loads(path.read_text())
