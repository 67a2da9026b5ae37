"""The comparator policy cannot hide a real regression.

A wrapper around the instar under test changes one character of its stdout.
A sub-run of the differential and baseline tests on a few images must then
fail where the same sub-run with the unwrapped binary passed: once against
QEMU_IMG as configured, and once against a QEMU_IMG that reports another
version (so version-specific comparisons take their skip path and only the
portable and baseline-only ones are left to catch it). And the hostile
tier's file-open allowlist catches an instar that reads a host file."""

import json
import os
import subprocess
import sys

import pytest

from baselines import baseline_version, reference_baseline
from harness import REPO, TESTS, QemuVersion, load_baseline, load_manifest, qemu_exec_path



def other_version(v):
    """A version other than QEMU_IMG's whose output layout is the same, so the
    uncorrupted sub-run can pass: 9.2.0 for 10.0.x (identical info output,
    found by diffing builds), otherwise the next micro release."""
    if (v.major, v.minor) == (10, 0):
        return "9.2.0"
    return f"{v.major}.{v.minor}.{v.micro + 1}"

CORRUPT = """#!{python}
import subprocess, sys
r = subprocess.run([{real!r}, *sys.argv[1:]], capture_output=True)
out = bytearray(r.stdout)
for i, c in enumerate(out):
    if 0x30 <= c <= 0x39:  # first digit: a size, a count, an offset
        out[i] = 0x30 + (c - 0x30 + 1) % 10
        break
else:
    for i, c in enumerate(out):
        if chr(c).isalpha():
            out[i] = ord(chr(c).swapcase())
            break
sys.stdout.buffer.write(bytes(out))
sys.stderr.buffer.write(r.stderr)
sys.exit(r.returncode)
"""

FAKE_VERSION = """#!/bin/sh
if [ "$1" = "--version" ]; then
    printf 'qemu-img version {version}\\nCopyright (c) 2003-2024 Fabrice Bellard and the QEMU Project developers\\n'
    exit 0
fi
exec {real} "$@"
"""


def pick_images(cfg):
    _, images = load_manifest(cfg.testdata)
    ok = [i for i in images if i.tier == "safe" and i.expect == "ok"]
    chosen = []
    for fmt in ("qcow2", "raw", "vmdk"):
        for i in ok:
            if i.format == fmt and not i.chain:
                chosen.append(i.id)
                break
    return chosen or [i.id for i in ok[:3]]


def sub_run(cfg, tmp, name, binary, qemu_img, images):
    results = tmp / name
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.update(
        INSTAR_BINARY_PATH=str(binary),
        QEMU_IMG=qemu_img,
        INSTAR_TESTDATA_PATH=str(cfg.testdata),
        INSTAR_TEST_IMAGES=",".join(images),
        INSTAR_TEST_RESULTS_DIR=str(results),
        INSTAR_NO_GENERATE="1",
    )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         str(TESTS / "test_differential.py"), str(TESTS / "test_baselines.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    summary = json.loads((results / "latest.json").read_text())
    return r, summary


@pytest.mark.parametrize("qemu", ["configured", "other-version"])
def test_corrupted_output_fails(cfg, qemu, tmp_path):
    images = pick_images(cfg)
    assert images, "no safe images to run the policy check on"
    wrapper = tmp_path / "instar-corrupt"
    wrapper.write_text(CORRUPT.format(python=sys.executable, real=str(cfg.instar)))
    wrapper.chmod(0o755)
    qemu_img = cfg.qemu_img
    fake_version = other_version(cfg.qemu_version)
    if qemu == "other-version":
        fake = tmp_path / "qemu-img-fake-version"
        real = qemu_exec_path(cfg.qemu_img)
        fake.write_text(FAKE_VERSION.format(version=fake_version, real=real))
        fake.chmod(0o755)
        qemu_img = str(fake)

    control, c_sum = sub_run(cfg, tmp_path, "control", cfg.instar, qemu_img, images)
    broken, b_sum = sub_run(cfg, tmp_path, "corrupt", wrapper, qemu_img, images)

    if qemu == "other-version":
        assert b_sum["qemu_img_version"] == fake_version, b_sum["qemu_img_version"]
        reasons = " ".join(c_sum["skip_reasons"])
        ref = reference_baseline(load_manifest(cfg.testdata)[0])
        fake_v = QemuVersion.parse(fake_version)
        if ref is not None and not fake_v.semver_compatible(baseline_version(load_baseline(ref))):
            assert f"skipped because qemu-img {fake_version} != baseline qemu-img" in reasons, (
                f"version-specific comparisons did not take their skip path: {c_sum['skip_reasons']}"
            )
    newly_failed = sorted(set(b_sum["failed"]) - set(c_sum["failed"]))
    assert broken.returncode != 0, f"corrupted instar passed the suite:\n{broken.stdout[-3000:]}"
    assert newly_failed, (
        "one corrupted character caused no new failure; uncorrupted instar already fails "
        f"{len(c_sum['failed'])} of these tests, so the policy cannot be shown here:\n"
        + control.stdout[-3000:]
    )
    assert any("test_differential" in n for n in newly_failed), newly_failed
    if any(TESTS.glob("expected-outputs/qemu-img-*.json")):
        assert any("test_forced_version" in n for n in newly_failed) or not c_sum["by_suite"].get("baselines"), (
            f"baseline-only comparisons did not catch the corruption: {newly_failed}"
        )


def test_allowlist_catches_an_outside_open(cfg, tmp_path):
    """The hostile tier's strace check is live: an instar that reads a host
    file outside the image's directory must fail it."""
    import shutil

    if not shutil.which("strace"):
        pytest.skip("strace not installed")
    _, images = load_manifest(cfg.testdata)
    hostile = [i.id for i in images if i.tier == "hostile"][:1]
    if not hostile:
        pytest.skip("no hostile image in the corpus")
    leak = tmp_path / "instar-leaky"
    leak.write_text(f'#!/bin/sh\ncat /etc/hostname >/dev/null\nexec {cfg.instar} "$@"\n')
    leak.chmod(0o755)
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env.update(
        INSTAR_BINARY_PATH=str(leak),
        INSTAR_TESTDATA_PATH=str(cfg.testdata),
        INSTAR_TEST_IMAGES=hostile[0],
        INSTAR_TEST_RESULTS_DIR=str(tmp_path / "results"),
        INSTAR_NO_GENERATE="1",
        # The leak happens in the wrapper itself: trace from its execve on.
        INSTAR_TRACED_PROGRAM=str(leak),
    )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_hostile.py"),
         "-k", "test_hostile"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert r.returncode != 0 and "opened outside the allowlist" in r.stdout and "/etc/hostname" in r.stdout, (
        r.stdout[-3000:]
    )
