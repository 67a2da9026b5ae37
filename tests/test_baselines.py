"""instar against recorded qemu-img outputs (tests/expected-outputs).

- test_forced_version: baseline-only. `instar --qemu-version V` must give the
  bytes qemu-img V gave, for every recorded V, whatever qemu-img is
  installed here.
- test_autodetect: version-specific. instar left to detect the version of
  QEMU_IMG must match the reference baseline when QEMU_IMG is that version
  (semver-compatible: same X.Y); otherwise it skips, naming both versions.
"""

import pytest

from baselines import RECORD_STYLE, expected_result, tolerance_for
from harness import run_instar
from qemu_compat import BASELINE_ONLY, VERSION_SPECIFIC, Tolerance, assert_qemu_compatible


def _check(cfg, case, category, forced):
    if case.entry is None:
        pytest.skip(f"no baseline entry for {case.image.id} {case.mode.key} in {case.file.name}")
    tol, why = tolerance_for(case)
    if why:
        pytest.skip(why)
    if category == VERSION_SPECIFIC and tol.kind in ("exact", "field-subset"):
        # held exact (up to the recorded volatile fields) on the same X.Y
        tol = Tolerance("semver-compatible", tol.ignore, tol.reason)
    actual = run_instar(
        cfg, case.mode, case.image, RECORD_STYLE, qemu_version=case.version.short if forced else None
    )
    assert_qemu_compatible(
        actual,
        expected_result(case),
        tol,
        category=category,
        actual_version=case.version if forced else cfg.qemu_version,
        baseline_version=case.version,
        what=f"{case.image.id} {case.mode.key} vs {case.file.name}",
    )


def test_forced_version(cfg, baseline_case):
    _check(cfg, baseline_case, BASELINE_ONLY, forced=True)


def test_autodetect(cfg, autodetect_case):
    _check(cfg, autodetect_case, VERSION_SPECIFIC, forced=False)
