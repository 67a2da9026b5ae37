"""Read and write captured qemu-img evidence: one JSON file per version.

    tests/evidence/<version>.json = {
      "version": "<full `qemu-img --version` output>",
      "root": "<where the binary came from>\\n",
      "cases": {"<case>": {"stdout": S, "stderr": S, "rc": N}}
    }

S is a JSON string when the captured bytes are valid UTF-8, else
{"b64": "<base64 of the bytes>"}, so every byte survives a round trip.
Files are written with sorted keys and one key per line so that a changed
case shows up as a small diff.

    import evidence                # with tools/ on sys.path
    ev = evidence.load("10.0.2")  # stdout/stderr as bytes, rc as int
    ev["cases"]["info--raw"]["stdout"]
"""

import base64
import json
import os
import re
from pathlib import Path

EVIDENCE = Path(__file__).resolve().parent.parent / "tests" / "evidence"
STREAMS = ("stdout", "stderr")
# Other JSON files in EVIDENCE; never valid version names.
RESERVED = {"cases", "corpus"}


def encode(data: bytes):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode("ascii")}


def decode(field) -> bytes:
    if isinstance(field, str):
        return field.encode("utf-8")
    return base64.b64decode(field["b64"], validate=True)


def path(version, evidence=EVIDENCE) -> Path:
    return Path(evidence) / f"{version}.json"


def vkey(name):
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", name)
    return tuple(int(x) for x in m.groups()) if m else (999,)


def versions(evidence=EVIDENCE):
    """Captured version names, oldest first."""
    names = (p.stem for p in Path(evidence).glob("*.json") if p.stem not in RESERVED)
    return sorted(names, key=lambda n: (vkey(n), n))


def load_raw(version, evidence=EVIDENCE) -> dict:
    """The file as stored (stream fields still encoded)."""
    return json.loads(path(version, evidence).read_text(encoding="utf-8"))


def load(version, evidence=EVIDENCE) -> dict:
    """One version's evidence, with stdout/stderr as bytes and rc as int."""
    doc = load_raw(version, evidence)
    doc["cases"] = {
        name: {"stdout": decode(c["stdout"]), "stderr": decode(c["stderr"]), "rc": int(c["rc"])}
        for name, c in doc["cases"].items()
    }
    return doc


def dumps(version_text: str, root: str, cases: dict) -> str:
    """Serialise; `cases` maps name -> {"stdout": bytes, "stderr": bytes, "rc": int}."""
    doc = {
        "version": version_text,
        "root": root,
        "cases": {
            name: {"stdout": encode(c["stdout"]), "stderr": encode(c["stderr"]), "rc": int(c["rc"])}
            for name, c in cases.items()
        },
    }
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def save(version, version_text: str, root: str, cases: dict, evidence=EVIDENCE) -> Path:
    """Write atomically, so an interrupted capture leaves the old file intact."""
    if version in RESERVED or "/" in version:
        raise ValueError(f"not a usable evidence name: {version!r}")
    out = path(version, evidence)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(version_text, root, cases), encoding="utf-8")
    tmp.replace(out)
    return out
