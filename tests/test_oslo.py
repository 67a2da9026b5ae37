"""Cross-validation with oslo.utils' format_inspector (what OpenStack uses
to vet uploads): for every safe image, instar's format, virtual size and
safety facts agree with the inspector's, except the divergences recorded as
data in tests/oslo_divergences.json (each with its reason and which side is
right)."""

import fnmatch
import json
import logging
from pathlib import Path

import pytest

from harness import Mode, run_instar

fi = pytest.importorskip(
    "oslo_utils.imageutils.format_inspector",
    reason="oslo.utils[image-inspection] not installed (tools/test-env.sh installs it)",
)
logging.getLogger("oslo_utils.imageutils.format_inspector").setLevel(logging.CRITICAL)

DIVERGENCES = json.loads((Path(__file__).parent / "oslo_divergences.json").read_text())["divergences"]
INFO_JSON = Mode("info", "json", ("--output=json",))
# format_inspector's names for what qemu-img calls raw or vpc
OSLO_TO_QEMU = {"vhd": "vpc", "gpt": "raw", "iso": "raw", "raw": "raw"}
VMDK_SAFE_SUBFORMATS = ("monolithicSparse", "streamOptimized")


def oslo_facts(path: Path) -> dict:
    try:
        insp = fi.detect_file_format(str(path))
    except fi.ImageFormatError as e:
        return {"format": f"error: {e}"}
    name = str(insp)
    facts = {"format": OSLO_TO_QEMU.get(name, name), "oslo_format": name}
    if name not in ("raw", "gpt", "iso"):
        facts["virtual_size"] = insp.virtual_size
    failures = {}
    try:
        insp.safety_check()
    except fi.SafetyCheckFailed as e:
        failures = {k: str(v) for k, v in e.failures.items()}
    except fi.ImageFormatError as e:
        failures = {"format_error": str(e)}
    facts["backing_file"] = "backing_file" in failures
    facts["data_file"] = "data_file" in failures
    if name == "vmdk":
        d = failures.get("descriptor", "")
        facts["vmdk_unsupported_subformat"] = d == "Unsupported subformat"
        facts["vmdk_unsafe_extents"] = d == "Invalid extent filenames found"
    facts["failures"] = sorted(failures)
    return facts


def instar_facts(info: dict) -> dict:
    facts = {"format": info.get("format"), "virtual_size": info.get("virtual-size")}
    facts["backing_file"] = "backing-filename" in info
    spec = (info.get("format-specific") or {}).get("data") or {}
    facts["data_file"] = "data-file" in spec
    if info.get("format") == "vmdk":
        facts["vmdk_unsupported_subformat"] = spec.get("create-type") not in VMDK_SAFE_SUBFORMATS
        # run with the image named relative to its directory, extent names
        # print as the descriptor has them
        facts["vmdk_unsafe_extents"] = any("/" in e.get("filename", "") for e in spec.get("extents", []))
    return facts


def divergence(image, fact):
    for d in DIVERGENCES:
        if fact in d["facts"] and any(
            fnmatch.fnmatchcase(image.id, p) or fnmatch.fnmatchcase(image.category, p)
            for p in d["match"]
        ):
            return d
    return None


def test_oslo_agrees(cfg, safe_image):
    img = safe_image
    r = run_instar(cfg, INFO_JSON, img, "rel")
    if r.rc != 0:
        pytest.skip(f"instar info fails on this image (exit {r.rc}): nothing to cross-check")
    info = json.loads(r.stdout)
    mine = instar_facts(info)
    theirs = oslo_facts(img.abspath)
    problems, known = [], []
    for fact in ("format", "virtual_size", "backing_file", "data_file",
                 "vmdk_unsupported_subformat", "vmdk_unsafe_extents"):
        if fact not in mine or fact not in theirs:
            continue
        if fact == "virtual_size" and (mine["format"] != theirs["format"] or theirs[fact] == 0):
            continue  # other formats' sizes are not comparable; 0 is the inspector's "unknown"
        if mine[fact] != theirs[fact]:
            d = divergence(img, fact)
            msg = f"{fact}: instar {mine[fact]!r}, format_inspector {theirs[fact]!r}"
            if d:
                known.append(f"{msg} (known: {d['reason']}; right: {d['right']})")
            else:
                problems.append(msg)
    assert not problems, (
        f"{img.id} ({img.recipe}) disagrees with oslo.utils format_inspector "
        f"(failures {theirs.get('failures')}):\n  " + "\n  ".join(problems)
        + "\nIf this is a real divergence, record it in tests/oslo_divergences.json."
    )
