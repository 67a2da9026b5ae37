#!/usr/bin/env python3
"""Record qemu-img's outputs over the corpus as a baseline.

    QEMU_IMG=/path/to/qemu-img tools/record-baselines.py [--corpus DIR]

Writes tests/expected-outputs/qemu-img-<X.Y.Z>.json for the version QEMU_IMG
reports (a wrapper such as tools/qemu-img-in-root works). Records every
enabled command x mode row of tests/harness.py's table (or every row of the
commands given with --commands), for every safe image of the manifest."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness  # noqa: E402
from baselines import baseline_path, record  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="corpus directory (default INSTAR_TESTDATA_PATH or .cache/corpus)")
    ap.add_argument("--commands", help="commands to record, comma separated (default: the enabled rows)")
    ap.add_argument("--out", help="output file (default tests/expected-outputs/qemu-img-X.Y.Z.json)")
    args = ap.parse_args()
    if args.corpus:
        os.environ["INSTAR_TESTDATA_PATH"] = args.corpus
    # Recording needs no instar binary; only the command table and runner.
    cfg = harness.load_config()
    if cfg.qemu_version is None:
        sys.exit(f"cannot read a version from {cfg.qemu_img} --version: {cfg.qemu_version_text!r}")
    err = harness.ensure_corpus(cfg)
    if err:
        sys.exit(err)
    meta, images = harness.load_manifest(cfg.testdata)
    if args.commands:
        wanted = set(args.commands.split(","))
        modes = [m for m in harness.COMMAND_MODES if m.command in wanted]
    else:
        modes = harness.enabled_modes()
    t0 = time.monotonic()
    print(f"recording qemu-img {cfg.qemu_version} ({cfg.qemu_img}) over {len(images)} images, "
          f"{', '.join(m.key for m in modes)}", file=sys.stderr)
    data = record(cfg, images, modes, log=lambda s: print(s, file=sys.stderr))
    data["corpus_generator_version"] = meta.get("generator_version")
    out = Path(args.out) if args.out else baseline_path(cfg.qemu_version)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    print(f"wrote {out} ({len(data['entries'])} entries, {out.stat().st_size // 1024} KiB, "
          f"{time.monotonic() - t0:.1f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
