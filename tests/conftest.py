"""pytest wiring: configuration checks, corpus generation, test
parametrization from the manifest x the command table, and the JSON results
summary (tests/results/latest.json)."""

from __future__ import annotations

import collections
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import PATH_STYLES, enabled_modes, load_config, load_manifest  # noqa: E402


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    cfg = load_config()
    config._instar_started = time.time()
    if _is_worker(config):
        return
    if not cfg.instar.is_file() or not os.access(cfg.instar, os.X_OK):
        raise pytest.UsageError(
            f"instar binary not found or not executable: {cfg.instar}\n"
            "Build it (cargo build --release -p instar) or set INSTAR_BINARY_PATH "
            "to the binary under test."
        )
    if not cfg.qemu_img_resolved:
        raise pytest.UsageError(
            f"qemu-img not found: QEMU_IMG={cfg.qemu_img!r}. The live differential needs the "
            "qemu-img to compare with; set QEMU_IMG to it (or a wrapper script)."
        )
    if cfg.qemu_version is None:
        raise pytest.UsageError(
            f"cannot read the version of QEMU_IMG={cfg.qemu_img}: {cfg.qemu_version_text!r}"
        )
    err = harness.ensure_corpus(cfg)
    if err:
        raise pytest.UsageError(err)


# --------------------------------------------------------------------------
# parametrization


_MANIFEST_CACHE = {}


def manifest():
    cfg = load_config()
    if "m" not in _MANIFEST_CACHE:
        _MANIFEST_CACHE["m"] = load_manifest(cfg.testdata)
    return _MANIFEST_CACHE["m"]


def safe_images():
    return [i for i in manifest()[1] if i.tier == "safe"]


def hostile_images():
    return [i for i in manifest()[1] if i.tier == "hostile"]


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    modes = enabled_modes()
    if "diff_case" in names:
        cases, ids = [], []
        for img in safe_images():
            for m in modes:
                if not m.applies_to(img):
                    continue
                for style in PATH_STYLES:
                    if not harness.style_applies(img, style):
                        continue
                    cases.append((img, m, style))
                    ids.append(f"{m.key}-{style}-{img.id}")
        metafunc.parametrize("diff_case", cases, ids=ids)
    if "hostile_case" in names:
        cases = [(i, m) for i in hostile_images() for m in modes if m.applies_to(i)]
        metafunc.parametrize("hostile_case", cases, ids=[f"{m.key}-{i.id}" for i, m in cases])
    if "safe_image" in names:
        imgs = safe_images()
        metafunc.parametrize("safe_image", imgs, ids=[i.id for i in imgs])
    if "baseline_case" in names:
        # (baseline file, image, mode) for every recorded version
        from baselines import forced_cases

        cases = forced_cases(safe_images(), modes)
        metafunc.parametrize("baseline_case", cases, ids=[c.id for c in cases])
    if "autodetect_case" in names:
        from baselines import autodetect_cases

        cases = autodetect_cases(safe_images(), modes, manifest()[0])
        metafunc.parametrize("autodetect_case", cases, ids=[c.id for c in cases])


def _labels(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    mode = None
    for key in ("diff_case", "hostile_case", "baseline_case", "autodetect_case"):
        if key in params:
            v = params[key]
            # an empty parametrization leaves a NotSet placeholder
            mode = v[1] if isinstance(v, tuple) else getattr(v, "mode", None)
    suite = Path(str(item.fspath)).stem.removeprefix("test_")
    return suite, mode


def pytest_collection_modifyitems(session, config, items):
    # Labels travel with each report to the xdist controller.
    for item in items:
        suite, mode = _labels(item)
        item.user_properties.append(("suite", suite))
        if mode is not None:
            item.user_properties.append(("command", mode.command))
            item.user_properties.append(("mode", mode.mode))


@pytest.fixture(scope="session")
def cfg():
    return load_config()


# --------------------------------------------------------------------------
# results summary


class _Results:
    def __init__(self):
        self.outcomes = {}  # nodeid -> (outcome, props, skip reason)

    def add(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = report.outcome
            reason = None
            if hasattr(report, "wasxfail"):
                # a recorded known divergence: counted apart, with its reason
                outcome, reason = "xfailed", report.wasxfail
            elif report.skipped:
                lr = report.longrepr
                reason = lr[2] if isinstance(lr, tuple) else str(lr)
                reason = reason.removeprefix("Skipped: ")
            elif report.failed and report.when == "setup":
                outcome = "error"
            self.outcomes[report.nodeid] = (outcome, dict(report.user_properties), reason)
        elif report.when == "teardown" and report.failed:
            old = self.outcomes.get(report.nodeid, (None, dict(report.user_properties), None))
            self.outcomes[report.nodeid] = ("error", old[1], old[2])


_RESULTS = _Results()


def pytest_runtest_logreport(report):
    _RESULTS.add(report)


def _generic_reason(reason: str) -> str:
    # One line per kind of skip, not per image.
    return re.sub(r"\[[^\]]*\]", "[...]", reason or "")


def _instar_version(cfg):
    try:
        r = subprocess.run(
            [str(cfg.instar), "--version"], capture_output=True, text=True, timeout=30
        )
        return r.stdout.strip().splitlines()[0] if r.stdout.strip() else f"(exit {r.returncode})"
    except Exception as e:  # noqa: BLE001 - any failure is just recorded
        return f"(cannot run: {e})"


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if _is_worker(config):
        return
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        # An empty run must never look like a green one.
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        config._instar_no_tests = True
    cfg = load_config()
    by_cm = collections.defaultdict(collections.Counter)
    by_suite = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    totals = collections.Counter()
    skips = collections.Counter()
    failed = []
    skipped_tests = {}
    known = {}
    for nodeid, (outcome, props, reason) in sorted(_RESULTS.outcomes.items()):
        totals[outcome] += 1
        cm = f"{props.get('command', '-')} {props.get('mode', '-')}"
        by_cm[cm][outcome] += 1
        by_suite[props.get("suite", "?")][cm][outcome] += 1
        if outcome == "skipped":
            skips[_generic_reason(reason)] += 1
            skipped_tests[nodeid] = reason
        if outcome == "xfailed":
            known[nodeid] = reason
        if outcome in ("failed", "error"):
            failed.append(nodeid)
    started = getattr(config, "_instar_started", time.time())
    try:
        gen = manifest()[0]
        corpus = {
            "path": str(cfg.testdata),
            "generator_version": gen.get("generator_version"),
            "qemu_img_version": gen.get("qemu_img_version"),
            "images": len(manifest()[1]),
        }
    except Exception as e:  # noqa: BLE001
        corpus = {"path": str(cfg.testdata), "error": str(e)}
    summary = {
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "seconds": round(time.time() - started, 2),
        "exit_status": int(session.exitstatus),
        **cfg.describe(),
        "instar_version": _instar_version(cfg) if cfg.instar.exists() else None,
        "corpus": corpus,
        "enabled_modes": [m.key for m in enabled_modes()],
        "totals": dict(totals),
        "by_command_mode": {k: dict(v) for k, v in sorted(by_cm.items())},
        "by_suite": {s: {k: dict(v) for k, v in sorted(d.items())} for s, d in sorted(by_suite.items())},
        "skip_reasons": dict(skips.most_common()),
        "failed": failed,
        "skipped": skipped_tests,
        "known_divergences": known,
    }
    out = Path(os.environ.get("INSTAR_TEST_RESULTS_DIR", harness.TESTS / "results"))
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(summary, indent=1, sort_keys=False) + "\n"
    (out / f"summary-{stamp}.json").write_text(text)
    (out / "latest.json").write_text(text)
    config._instar_summary = (out / "latest.json", summary)


def pytest_report_header(config):
    cfg = load_config()
    return [
        f"instar: {cfg.instar}",
        f"qemu-img: {cfg.qemu_img} -> {cfg.qemu_img_resolved} (version {cfg.qemu_version})",
        f"corpus: {cfg.testdata}",
        "modes: " + ", ".join(m.key for m in enabled_modes()),
    ]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if getattr(config, "_instar_no_tests", False):
        terminalreporter.write_line(
            "ERROR: no tests were collected (empty corpus, INSTAR_TEST_IMAGES or "
            "INSTAR_TEST_COMMANDS selecting nothing?); failing instead of exit 5.",
            red=True,
        )
    s = getattr(config, "_instar_summary", None)
    if not s:
        return
    path, summary = s
    terminalreporter.section("instar summary")
    terminalreporter.write_line(f"qemu-img {summary['qemu_img_version']} ({summary['qemu_img']})")
    for suite, per in summary["by_suite"].items():
        for cm, counts in per.items():
            label = suite if cm == "- -" else f"{suite} {cm}"
            terminalreporter.write_line(f"  {label:<28} {dict(counts)}")
    for reason, n in list(summary["skip_reasons"].items())[:15]:
        terminalreporter.write_line(f"  skipped x{n}: {reason}")
    terminalreporter.write_line(f"results: {path}")
