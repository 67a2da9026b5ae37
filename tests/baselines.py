"""Recorded qemu-img outputs (tests/expected-outputs/qemu-img-<X.Y.Z>.json):
reading them into test cases, and the recording used by
tools/record-baselines.py.

One file per qemu-img version: the version line, the corpus it saw (sha256
and st_blocks per image), and per `image|command|mode` the stdout, exit
code, first stderr line, and a tolerance when the output holds volatile
fields. Recorded with the image named relative to its directory (cwd = its
directory), so no machine path is in it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import json
import os
from pathlib import Path
from typing import Optional

from harness import (
    BASELINE_DIR,
    Config,
    Image,
    Mode,
    QemuVersion,
    Result,
    baseline_files,
    baseline_key,
    run_qemu,
)
from qemu_compat import EXACT, VOLATILE_FIELDS, Tolerance, mask

RECORD_STYLE = "rel"
CORPUS_PLACEHOLDER = "@CORPUS@"


def expected_result(case: "BaselineCase") -> Result:
    rec = dict(case.entry)
    root = str(case.image.root)
    for k in ("stdout", "stderr1"):
        if k in rec:
            rec[k] = rec[k].replace(CORPUS_PLACEHOLDER, root)
    return Result.from_record(rec)


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def baseline_version(data: dict) -> QemuVersion:
    return QemuVersion.parse(data["version_line"])


@dataclasses.dataclass(frozen=True)
class BaselineCase:
    id: str
    file: Path
    image: Image
    mode: Mode

    @property
    def data(self) -> dict:
        return _load(self.file)

    @property
    def version(self) -> QemuVersion:
        return baseline_version(self.data)

    @property
    def entry(self) -> Optional[dict]:
        return self.data["entries"].get(baseline_key(self.image.id, self.mode))

    @property
    def image_meta(self) -> Optional[dict]:
        return self.data["images"].get(self.image.id)


def forced_cases(images, modes) -> list[BaselineCase]:
    out = []
    for f in baseline_files():
        v = baseline_version(_load(f)).short
        for img in images:
            for m in modes:
                if m.applies_to(img):
                    out.append(BaselineCase(f"{v}-{m.key}-{img.id}", f, img, m))
    return out


def reference_baseline(manifest_meta: dict) -> Optional[Path]:
    """The baseline of the qemu-img that defines the corpus (the manifest's
    qemu_img_version), else the newest recorded."""
    files = baseline_files()
    if not files:
        return None
    want = str(manifest_meta.get("qemu_img_version") or "")
    for f in files:
        if want and baseline_version(_load(f)).short == QemuVersion.parse(want).short:
            return f
    return max(files, key=lambda f: baseline_version(_load(f)).key)


def autodetect_cases(images, modes, manifest_meta) -> list[BaselineCase]:
    ref = reference_baseline(manifest_meta)
    if ref is None:
        return []
    return [
        BaselineCase(f"{m.key}-{img.id}", ref, img, m)
        for img in images
        for m in modes
        if m.applies_to(img)
    ]


@functools.lru_cache(maxsize=None)
def _generator_version(root: Path):
    try:
        return json.loads((root / "manifest.json").read_text()).get("generator_version")
    except (OSError, ValueError):
        return None


def tolerance_for(case: BaselineCase) -> tuple[Tolerance, Optional[str]]:
    """The entry's tolerance adjusted to this corpus: (tolerance, skip reason).

    Same image bytes: the recorded tolerance. Other bytes from the same
    generator version (same recipes; ids, UUIDs, timestamps and LUKS salts
    differ from run to run): the recorded volatile fields are masked, the
    rest is still exact. Another generator version: skip, re-record.
    Another filesystem (other st_blocks): disk sizes are masked."""
    entry, meta = case.entry, case.image_meta
    tol = Tolerance.from_record(entry.get("tolerance")) if entry else EXACT
    if meta is None:
        return tol, f"image {case.image.id} not in baseline {case.file.name} (re-record it)"
    if meta.get("sha256") != case.image.sha256:
        recorded = case.data.get("corpus_generator_version")
        current = _generator_version(case.image.root)
        if recorded != current:
            return tol, (
                f"baseline {case.file.name} was recorded on corpus generator {recorded}, "
                f"the corpus is generator {current}: re-record baselines"
            )
        tol = tol.plus("disk-size")
    if image_blocks(case.image) != meta.get("blocks"):
        tol = tol.plus("disk-size")
    return tol, None


def image_blocks(image: Image) -> dict:
    out = {}
    for p in sorted(image.dir.iterdir()) if image.dir.is_dir() else []:
        # the image and its companions (extents, data files) share its stem
        if p.is_file() and p.name.startswith(image.abspath.stem):
            out[p.name] = os.stat(p).st_blocks
    return out


def detect_volatile(stdout: str) -> tuple:
    """Fields of this output that differ between two creations of the same
    recipe: masked when the corpus is regenerated."""
    found = []
    for name in ("cid", "date", "luks-uuid", "luks-iters"):
        if mask(stdout, [name]) != stdout:
            found.append(name)
    return tuple(found)


def record(cfg: Config, images, modes, log=print) -> dict:
    v = cfg.qemu_version
    data = {
        "version_line": cfg.qemu_version_text,
        "qemu_img_version": str(v),
        "recorded": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "qemu_img": os.path.basename(cfg.qemu_img),
        "path_style": RECORD_STYLE,
        "modes": [m.key for m in modes],
        "images": {},
        "entries": {},
    }
    jobs = []
    for img in images:
        if img.tier != "safe":
            # only safe images are checked against baselines, and hostile
            # ones may print facts of the recording machine (/etc/passwd)
            continue
        data["images"][img.id] = {"sha256": img.sha256, "blocks": image_blocks(img)}
        jobs += [(img, m) for m in modes if m.applies_to(img)]

    def one(job):
        img, m = job
        return img, m, run_qemu(cfg, m, img, RECORD_STYLE)

    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        for img, m, r in pool.map(one, jobs):
            if r.rc is None:
                log(f"  {img.id} {m.key}: qemu-img timed out, not recorded")
                continue
            rec = r.to_record()
            # images with absolute backing or data-file paths print where the
            # corpus lies; the checker puts its own corpus root back
            for k in ("stdout", "stderr1"):
                rec[k] = rec[k].replace(str(cfg.testdata), CORPUS_PLACEHOLDER)
            vol = tuple(dict.fromkeys(m.volatile + detect_volatile(rec["stdout"])))
            if vol:
                rec["tolerance"] = Tolerance("field-subset", vol, "volatile: " + ", ".join(vol)).to_record()
            data["entries"][baseline_key(img.id, m)] = rec
    return data


def baseline_path(v: QemuVersion) -> Path:
    return BASELINE_DIR / f"qemu-img-{v.short}.json"


assert set(VOLATILE_FIELDS) >= {"cid", "date", "disk-size"}
