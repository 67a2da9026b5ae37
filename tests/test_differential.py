"""Live differential: instar and QEMU_IMG on the same image, same argument,
same working directory. stdout and exit code byte for byte, and the first
line of stderr (after the program-name prefix). Portable: holds on every
qemu-img version, so it is always exact."""

import pytest

from harness import run_instar, run_qemu
from qemu_compat import EXACT, PORTABLE, assert_qemu_compatible


def test_live(cfg, diff_case):
    image, mode, style = diff_case
    expected = run_qemu(cfg, mode, image, style)
    if expected.rc is None:
        pytest.skip(f"qemu-img itself timed out after {cfg.timeout}s")
    if expected.rc < 0:
        # e.g. parallels-empty-1T map: qemu-img aborts on an assertion
        # (the driver's int sector count overflows on a 1 TiB query).
        pytest.skip(f"qemu-img itself died by signal {-expected.rc}")
    actual = run_instar(cfg, mode, image, style)
    assert_qemu_compatible(
        actual,
        expected,
        EXACT,
        category=PORTABLE,
        actual_version=cfg.qemu_version,
        baseline_version=cfg.qemu_version,
        what=f"{image.id} ({image.recipe}) {mode.key}, image named {style}",
    )
