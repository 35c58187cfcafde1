"""A bench folder (``--out``) and the records in it.

```
<out>/bench.json                 the settings (their identity decides what may continue the folder)
<out>/base.json                  the untrained model's task metric and forgetting-measure value
<out>/records/<entry>-seed<N>.json   one per finished run, written atomically as soon as it finishes
<out>/runs/<entry>-seed<N>/      the training run's folder (adapter/, run.json, metrics.jsonl)
<out>/results.md, results.csv    the aggregate (mean ± std over seeds)
<out>/plots/*.png                quality vs trainable parameters, gain vs forgetting, memory and time
```

A record present means its run is done: a bench started again with the same settings skips it. A
folder holding a bench with other settings, or files that are not a bench's, is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.atomic import write_json
from ..errors import PeftkitError
from .spec import RunSpec

FORMAT = 1
SETTINGS_FILE = "bench.json"
BASE_FILE = "base.json"
RECORDS = "records"
RUNS = "runs"
OUTPUTS = (SETTINGS_FILE, BASE_FILE, RECORDS, RUNS, "results.md", "results.csv", "plots")


class BenchError(PeftkitError, OSError):
    """A bench folder that cannot be used: another bench's, not a bench's, or unreadable."""


def record_path(out: Path, spec: RunSpec, seed: int) -> Path:
    return out / RECORDS / f"{spec.slug}-seed{seed}.json"


def run_dir(out: Path, spec: RunSpec, seed: int) -> Path:
    return out / RUNS / f"{spec.slug}-seed{seed}"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is none (absent, unreadable or not an object)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def check_folder(out: Path, identity: dict[str, Any]) -> bool:
    """Whether `out` already holds this bench (True) or is new or empty (False).

    Raises:
        BenchError: `out` is a file, holds another bench's settings, or holds files that are not a bench's.
    """
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file; give a folder for the bench's outputs.")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    doc = read_json(out / SETTINGS_FILE)
    if doc is None:
        stray = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)[:3]
        raise BenchError(f"--out {out} holds files that are not a bench's ({', '.join(stray) or SETTINGS_FILE + ' missing'}"
                         "); choose an empty or new folder.")
    theirs = doc.get("identity") or {}
    diff = next((k for k in sorted(set(identity) | set(theirs)) if theirs.get(k) != identity.get(k)), None)
    if diff is not None:
        raise BenchError(f"--out {out} holds a bench with other settings ({diff}: {theirs.get(diff)!r} there, "
                         f"{identity.get(diff)!r} now); choose another --out, or repeat that bench's settings to "
                         "continue it.")
    return True


def write_settings(out: Path, identity: dict[str, Any], extra: dict[str, Any]) -> None:
    write_json(out / SETTINGS_FILE, {"format": FORMAT, "identity": identity, **extra}, indent=1, default=str)


def load_record(path: Path, spec: RunSpec | None = None) -> dict[str, Any] | None:
    """The finished record in `path` (None: not there yet). A record of another entry under the same
    file name is an error, not a skip."""
    doc = read_json(path)
    if doc is None:
        return None
    if spec is not None and doc.get("label") != spec.label:
        raise BenchError(f"{path} records {doc.get('label')!r}, not {spec.label!r} (two entries share a file name); "
                         "rename one entry's options, or use another --out.")
    return doc


def save_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record, indent=1, default=str)
