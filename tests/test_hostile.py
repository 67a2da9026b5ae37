"""Hostile tier: every hostile image through every enabled command and mode,
under a deadline, an address-space limit and an RSS check, traced with
strace. Pass: a clear one-line error with exit 1, or the same stdout and exit
code as qemu-img. Never a signal, a panic, a hang, or an open() outside the
allowlist (the binary, system libraries and loader config, /dev/kvm, /proc
and /sys facts, and the image's own directory)."""

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import Mode, Result, image_arg, instar_argv, run_qemu, tool_env
from qemu_compat import compare

DEADLINE = float(os.environ.get("INSTAR_TEST_HOSTILE_TIMEOUT", "20"))
# Guest RAM of the micro-VM is an mmap in instar's address space (512 MiB
# measured): the limit leaves room for it while still stopping a runaway
# allocation. test_limits_leave_room proves the limits do not turn every
# run into an error that would pass as "a clear error".
AS_LIMIT_MB = int(os.environ.get("INSTAR_TEST_AS_LIMIT_MB", "2048"))
RSS_LIMIT_MB = int(os.environ.get("INSTAR_TEST_RSS_LIMIT_MB", "1024"))
STRACE = shutil.which("strace")
PRLIMIT = shutil.which("prlimit")

SYSTEM_PREFIXES = (
    "/lib/",
    "/lib64/",
    "/usr/lib/",
    "/usr/lib64/",
    "/usr/share/zoneinfo/",
    "/etc/ld.so.cache",
    "/etc/ld.so.preload",
    "/etc/localtime",
    "/etc/instar/",
    "/dev/kvm",
    "/dev/null",
    "/dev/urandom",
    "/sys/fs/cgroup/",
    "/sys/devices/system/cpu/",
    "/proc/self/",
    "/proc/thread-self/",
)


def run_measured(argv, cwd, env, timeout):
    """Run and reap with wait4, for the peak RSS of the process tree."""
    p = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    bufs = {}

    def drain(name, f):
        bufs[name] = f.read()

    threads = [threading.Thread(target=drain, args=(n, f)) for n, f in (("out", p.stdout), ("err", p.stderr))]
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, kill)
    timer.start()
    t0 = time.monotonic()
    _, status, ru = os.wait4(p.pid, 0)
    timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(5)
    return {
        "rc": None if timed_out.is_set() else p.returncode,
        "stdout": bufs.get("out", b""),
        "stderr": bufs.get("err", b""),
        "seconds": time.monotonic() - t0,
        "maxrss_mb": ru.ru_maxrss / 1024,
    }


_OPEN = re.compile(r'^(\d+)\s+(open|openat|openat2)\((.*)\)\s+=\s+(-?\d+)(?:<(.*)>)?')
_EXEC = re.compile(r'^(\d+)\s+execve\("((?:[^"\\]|\\.)*)".*\)\s+=\s+0$')
_FORK = re.compile(r'^(\d+)\s+(?:clone|clone3|fork|vfork)\(.*\)\s+=\s+(\d+)')

# The program whose opens are checked: the instar binary itself, or, when
# INSTAR_BINARY_PATH is a wrapper (tools/test-package-functional.sh runs the
# packaged binary inside a distro root through bwrap), the program it
# finally executes. Opens by the wrapper and bwrap before that do not count.
TRACED_PROGRAM = os.environ.get("INSTAR_TRACED_PROGRAM")


def opened_paths(log: Path, cwd: Path, program: str):
    """Successful opens from an `strace -f -y` log by `program` (from its
    execve on) and the processes it forks, as absolute paths (the
    kernel-resolved path strace prints after the fd when it has one)."""
    pending = {}
    traced = set()
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"^(\d+)\s+(.*)<unfinished \.\.\.>$", line)
        if m:
            pending[m[1]] = m[2]
            continue
        m = re.match(r"^(\d+)\s+<\.\.\. \w+ resumed>(.*)$", line)
        if m and m[1] in pending:
            line = f"{m[1]} {pending.pop(m[1])}{m[2]}"
        m = _EXEC.match(line)
        if m:
            if m[2] == program:
                traced.add(m[1])
            continue
        m = _FORK.match(line)
        if m:
            if m[1] in traced:
                traced.add(m[2])
            continue
        m = _OPEN.match(line)
        if not m or int(m[4]) < 0 or m[1] not in traced:
            continue
        if m[5]:
            out.append(m[5])
            continue
        args = re.search(r'"((?:[^"\\]|\\.)*)"', m[3])
        if args:
            p = args[1]
            out.append(p if p.startswith("/") else str(cwd / p))
    assert traced, f"the trace shows no execve of {program}: cannot check its opens"
    return out


def allowed(path: str, binary: Path, image_dir: Path) -> bool:
    if path in (str(binary), str(binary.resolve())):
        return True
    if path.startswith(SYSTEM_PREFIXES) or re.match(r"^/proc/\d+/", path):
        return True
    real = os.path.realpath(path)
    for d in {str(image_dir), os.path.realpath(image_dir)}:
        if real == d or real.startswith(d.rstrip("/") + "/"):
            return True
    return False


def limited_argv(cfg, image, mode, log):
    prefix = []
    if PRLIMIT:
        prefix += [PRLIMIT, f"--as={AS_LIMIT_MB * 1024 * 1024}", "--"]
    if STRACE:
        prefix += [STRACE, "-f", "-qq", "-y", "-e", "trace=open,openat,openat2,execve,clone,clone3,fork,vfork", "-o", str(log)]
    arg, _ = image_arg(image, "rel")
    # The profile is given, so instar has no reason to spawn qemu-img.
    argv = instar_argv(cfg, mode.build(image, arg), qemu_version=cfg.qemu_version.short)
    return prefix, argv


KNOWN = json.loads((Path(__file__).parent / "known_divergences.json").read_text())["divergences"]


def known_divergence(image_id, mode, qemu_version):
    """The recorded divergence for this image, mode and qemu-img version."""
    for d in KNOWN:
        if (
            any(fnmatch.fnmatch(image_id, g) for g in d["match"])
            and f"{mode.command} {mode.mode}" in d["modes"]
            and any(v == "*" or qemu_version.startswith(v) for v in d["qemu_versions"])
        ):
            return d
    return None


def test_limits_leave_room(cfg, tmp_path):
    """Under the hostile tier's limits and tracing, a plain image still works."""
    from conftest import safe_images

    ok = [i for i in safe_images() if i.expect == "ok" and i.format == "qcow2" and not i.chain]
    if not ok:
        pytest.skip("no plain qcow2 image in the corpus")
    image, mode = ok[0], Mode("info", "human")
    prefix, argv = limited_argv(cfg, image, mode, tmp_path / "strace.log")
    r = run_measured([*prefix, *argv], image.dir, tool_env(cfg), DEADLINE)
    q = run_qemu(cfg, mode, image, "rel")
    assert (r["rc"], r["stdout"]) == (q.rc, q.stdout), (
        f"instar fails on a safe image under the hostile limits (--as={AS_LIMIT_MB} MiB): "
        f"{r['stderr'][-500:]!r}; raise INSTAR_TEST_AS_LIMIT_MB if the guest grew"
    )


def test_hostile(cfg, hostile_case, tmp_path):
    image, mode = hostile_case
    cwd = image.dir
    log = tmp_path / "strace.log"
    prefix, argv = limited_argv(cfg, image, mode, log)
    r = run_measured([*prefix, *argv], cwd, tool_env(cfg), DEADLINE)
    cmd = f"(cd {cwd} && {' '.join(argv)})"
    err = r["stderr"].decode("utf-8", "backslashreplace")
    out = r["stdout"].decode("utf-8", "backslashreplace")
    assert r["rc"] is not None, f"hang: no exit within {DEADLINE}s: {cmd}"
    assert r["rc"] >= 0 and r["rc"] < 128, f"killed by a signal (exit {r['rc']}): {cmd}\n{err[-2000:]}"
    assert "panicked" not in err and r["rc"] != 101, f"panic: {cmd}\n{err[-2000:]}"
    assert r["maxrss_mb"] <= RSS_LIMIT_MB, f"peak RSS {r['maxrss_mb']:.0f} MiB > {RSS_LIMIT_MB}: {cmd}"

    # safety first: the allowlist is checked before the output
    if STRACE:
        program = TRACED_PROGRAM or str(cfg.instar)
        bad = [p for p in opened_paths(log, cwd, program) if not allowed(p, cfg.instar, image.dir)]
        assert not bad, f"opened outside the allowlist: {sorted(set(bad))}\n{cmd}"

    lines = err.splitlines()
    clear_error = r["rc"] == 1 and out == "" and len(lines) == 1 and 0 < len(lines[0]) <= 1000
    if not clear_error:
        # portable comparison with the live qemu-img (stderr may differ: a
        # hostile image is allowed its own clear error)
        q = run_qemu(cfg, mode, image, "rel")
        mine = Result(r["stdout"], b"", r["rc"])
        problems = compare(mine, Result(q.stdout, b"", q.rc))
        known = known_divergence(image.id, mode, cfg.qemu_version.short)
        if known and problems:
            pytest.xfail(f"known divergence (tests/known_divergences.json): {known['reason']}")
        assert not known, (
            f"{image.id} {mode.command} {mode.mode} no longer diverges: remove its entry from tests/known_divergences.json"
        )
        assert not problems, (
            f"neither a one-line error with exit 1 nor qemu-img's output: {cmd}\n"
            f"instar stderr: {err[:1000]!r}\n" + "\n".join(problems)
        )

    if not STRACE:
        pytest.skip("strace not installed: the file-open allowlist was not checked")
