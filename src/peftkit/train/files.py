"""Reading a user's data file into records, with errors that say what is wrong and where.

Formats by suffix: ``.csv`` / ``.tsv``, ``.jsonl`` / ``.ndjson``, ``.json`` (a list of objects),
``.parquet`` (needs ``pyarrow``), ``.txt`` / ``.md`` (one record holding the whole text, for
language modelling). Text must be UTF-8 (a byte-order mark is accepted).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..errors import PeftkitError, did_you_mean, shown


class DataError(PeftkitError, ValueError):
    """A data file is missing, empty, unreadable or lacks what the task needs."""


SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
            ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text", ".md": "text"}


def exists(path: Path) -> bool:
    """Whether `path` exists; a name no file can have (a NUL byte, too long) is a DataError."""
    try:
        return path.exists()
    except (OSError, ValueError) as err:
        raise DataError(f"{shown(str(path))} cannot be a data file's name ({err}).") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}, line {line}); "
                        "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from None


def _csv(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = list(reader)
    except csv.Error as err:
        raise DataError(f"{path} is not valid CSV: {err}.") from None
    if reader.fieldnames is None:
        raise DataError(f"{path} is empty: it has no header row and no data.")
    bad = next((i for i, r in enumerate(rows) if None in r), None)
    if bad is not None:
        raise DataError(f"{path} line {bad + 2}: more values than the {len(reader.fieldnames)} header columns.")
    return rows


def _loads(text: str) -> Any:
    """`json.loads`, raising only ValueError: also for nesting deeper than Python's recursion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:  # the only other one: an integer past Python's str-to-int limit
        raise ValueError("a number has more than 4300 digits") from None


def _why(err: ValueError, line: bool = False) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno}" if line else err.msg
    return str(err)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = _loads(line)
        except ValueError as err:
            raise DataError(f"{path} line {number} is not valid JSON ({_why(err)}); JSONL needs one object per line.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is a JSON {type(row).__name__}, not an object of field: value.")
        rows.append(row)
    return rows


def _json(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    try:
        data = _loads(text)
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({_why(err, line=True)}).") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path} must hold a JSON list of objects (or use JSONL: one object per line).")
    return data


def _parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: `pip install pyarrow` (or convert it to CSV / JSONL).") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several of its own types for damaged files
        raise DataError(f"{path} is not a readable Parquet file ({type(err).__name__}: {err}).") from None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a data file.

    Raises:
        DataError: the file is missing, empty, not UTF-8, malformed, or of an unknown kind.
    """
    path = Path(path)
    if not exists(path):
        raise DataError(f"data file {path} does not exist.")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a CSV / JSONL / JSON / Parquet / text file.")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"cannot tell the format of {path} from its suffix; use one of {', '.join(SUFFIXES)}.")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty.")
    if kind == "text":
        return [{"text": _read_text(path)}]
    rows = {"csv": _csv, "jsonl": _jsonl, "json": _json, "parquet": _parquet}[kind](path)
    if not rows:
        raise DataError(f"data file {path} has no rows.")
    return rows


def columns_of(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in records[:1000] for k in r))


def _shown(cols: list[str], limit: int = 20) -> str:
    names = ", ".join(map(str, cols[:limit]))
    return names if len(cols) <= limit else f"{names}, ... ({len(cols)} columns)"


def pick_field(records: list[dict[str, Any]], source: str, role: str, given: str | None,
               candidates: tuple[str, ...]) -> str:
    """The column playing `role`: `given` if set (must exist), else the first candidate present.

    Raises:
        DataError: naming the columns that exist and the closest one.
    """
    cols = columns_of(records)
    if given is not None and given not in cols:
        raise DataError(f"{source} has no column {given!r} (for the {role}).{did_you_mean(given, cols)} "
                        f"Columns: {_shown(cols)}; set --{role}-field.")
    found = given if given is not None else next((c for c in candidates if c in cols), None)
    if found is None:
        raise DataError(f"{source} has no {role} column (looked for {', '.join(candidates)}). Columns: "
                        f"{_shown(cols)}; name the right one with --{role}-field.")
    missing = next((i for i, r in enumerate(records) if found not in r), None)
    if missing is not None:
        raise DataError(f"{source} record {missing + 1} has no {found!r} field.")
    return found
