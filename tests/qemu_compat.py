"""The comparator policy: every assertion that depends on qemu-img's output
goes through `assert_qemu_compatible`.

Categories (what the expected side is):
- portable: instar against the qemu-img running right now (QEMU_IMG). Holds
  on every version, always exact: this is what catches regressions.
- version-specific: instar with its auto-detected profile against a baseline
  recorded on one qemu-img version. On another version it applies the
  tolerance (semver-compatible: same X.Y is held exact) or skips with a log
  line naming both versions, so a new distro cannot cause a mismatch storm.
- baseline-only: instar forced to `--qemu-version V` against the baseline
  recorded on V. Applies wherever it runs, whatever qemu-img is installed.

Tolerances: exact, semver-compatible, field-subset (listed volatile fields
masked, everything else exact), skip (always skip, with the reason logged).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Optional

import pytest

from harness import QemuVersion, Result

PORTABLE = "portable"
VERSION_SPECIFIC = "version-specific"
BASELINE_ONLY = "baseline-only"

# Field name -> regexes whose group 1 is kept and the rest of the match
# masked. Each covers the human and the JSON spelling.
VOLATILE_FIELDS = {
    # vmdk content ids are random per `qemu-img create`
    "cid": [r"^(\s*(?:parent )?cid: )\d+$", r'("(?:parent-)?cid": )\d+'],
    # snapshot dates are the creation time
    "date": [
        r"()\d{4}-\d\d-\d\d \d\d:\d\d:\d\d",
        r'("date-(?:sec|nsec)": )\d+',
    ],
    # LUKS headers: a random uuid and benchmark-dependent iteration counts
    "luks-uuid": [r"(uuid: )[0-9a-f-]{36}", r'("uuid": ")[0-9a-f-]{36}(")'],
    "luks-iters": [r"^(\s*(?:master key )?iters: )\d+$", r'("(?:master-key-)?iters": )\d+'],
    # measure of a raw file with fallocated (unwritten) extents: qemu asks
    # SEEK_DATA, whose answer for unwritten extents depends on the page
    # cache, so the recorded `required` can differ on the same bytes
    "required-size": [r"^(required size: )\d+$", r'("required": )\d+'],
    # st_blocks depends on the filesystem the corpus sits on
    "disk-size": [r"^(\s*disk size: ).*$", r'("actual-size": )\d+'],
    # not a stdout field: the first stderr line is not compared
    "stderr": [],
    # paths of the machine that recorded a baseline
    "path": [r"^(\s*(?:image|filename): ).*$", r'("(?:filename|full-backing-filename)": ).*?(,?)$'],
}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    kind: str  # exact | semver-compatible | field-subset | skip
    ignore: tuple = ()  # field-subset: names from VOLATILE_FIELDS
    reason: str = ""

    def __post_init__(self):
        assert self.kind in ("exact", "semver-compatible", "field-subset", "skip"), self.kind
        for f in self.ignore:
            assert f in VOLATILE_FIELDS, f

    def to_record(self) -> dict:
        d = {"kind": self.kind}
        if self.ignore:
            d["ignore"] = list(self.ignore)
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_record(cls, d: Optional[dict]) -> "Tolerance":
        if not d:
            return EXACT
        return cls(d["kind"], tuple(d.get("ignore", ())), d.get("reason", ""))

    def plus(self, *fields: str) -> "Tolerance":
        """The same tolerance with more masked fields (field-subset)."""
        ign = tuple(dict.fromkeys(self.ignore + fields))
        kind = "field-subset" if self.kind == "exact" else self.kind
        return Tolerance(kind, ign, self.reason)


EXACT = Tolerance("exact")
SEMVER = Tolerance("semver-compatible")


def mask(text: str, fields) -> str:
    for f in fields:
        for rx in VOLATILE_FIELDS[f]:
            text = re.sub(rx, lambda m: m.group(1) + "<" + f + ">" + (m.group(2) if m.re.groups > 1 else ""), text, flags=re.M)
    return text


_PREFIX = re.compile(r"^[^\s:/]+: ")


def normalize_stderr_first(line: str) -> str:
    """qemu-img prefixes errors with basename(argv[0]); a wrapper or the name
    `instar` must not count as a difference. Everything after it must."""
    return _PREFIX.sub("PROG: ", line, count=1)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _shown(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def compare(actual: Result, expected: Result, ignore=()) -> list[str]:
    """Differences as readable text; empty when equal."""
    problems = []
    if actual.rc != expected.rc:
        problems.append(f"exit code: instar {actual.rc}, expected {expected.rc}")
    a_out, e_out = mask(_text(actual.stdout), ignore), mask(_text(expected.stdout), ignore)
    if a_out != e_out:
        # shown with bytes that are not UTF-8 as \xNN: the report must be
        # valid UTF-8 to travel between xdist workers
        a_show, e_show = _shown(a_out), _shown(e_out)
        diff = difflib.unified_diff(
            e_show.splitlines(keepends=True),
            a_show.splitlines(keepends=True),
            "expected stdout",
            "instar stdout",
        )
        d = "".join(x if x.endswith("\n") else x + "\\ no newline at end\n" for x in diff)
        if not d:
            d = f"(differ only in bytes not shown) expected={e_show!r} instar={a_show!r}\n"
        problems.append("stdout differs:\n" + d)
    a_err = normalize_stderr_first(actual.stderr_first)
    e_err = normalize_stderr_first(expected.stderr_first)
    if a_err != e_err and "stderr" not in ignore:
        problems.append(f"stderr first line:\n  expected: {e_err!r}\n  instar:   {a_err!r}")
    return problems


def assert_qemu_compatible(
    actual: Result,
    baseline: Result,
    tolerance: Tolerance = EXACT,
    *,
    category: str,
    actual_version: Optional[QemuVersion],
    baseline_version: Optional[QemuVersion],
    what: str = "",
) -> None:
    """Fail with a diff when `actual` is not what `baseline` allows; skip (with
    a reason naming both versions) when the policy says the comparison does
    not apply. `actual_version` is the qemu-img instar is meant to imitate."""
    assert category in (PORTABLE, VERSION_SPECIFIC, BASELINE_ONLY), category
    if actual.rc is None:
        pytest.fail(f"{what}: instar timed out ({actual.seconds:.1f}s): {' '.join(actual.argv)}")
    if tolerance.kind == "skip":
        pytest.skip(f"skipped by tolerance: {tolerance.reason or 'no reason recorded'}")
    if category == VERSION_SPECIFIC and actual_version != baseline_version:
        compatible = (
            actual_version is not None
            and baseline_version is not None
            and actual_version.semver_compatible(baseline_version)
        )
        if not (tolerance.kind == "semver-compatible" and compatible):
            pytest.skip(
                f"skipped because qemu-img {actual_version} != baseline qemu-img {baseline_version}"
            )
    problems = compare(actual, baseline, tolerance.ignore)
    if problems:
        ctx = f"{what}\n" if what else ""
        ctx += f"  command: (cd {actual.cwd} && {' '.join(actual.argv)})\n"
        ctx += f"  comparison: {category}, tolerance {tolerance.kind}"
        if tolerance.ignore:
            ctx += f" ignoring {', '.join(tolerance.ignore)}"
        ctx += f"; qemu-img {baseline_version}\n"
        pytest.fail(ctx + "\n".join(problems), pytrace=False)
