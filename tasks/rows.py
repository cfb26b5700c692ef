"""Rows of a user's data file, each with where it came from (``file:line``), checked for the fields
a task spec uses before any model loads.

Formats by suffix: ``.jsonl`` (one JSON object per line; ``file:line``), ``.json`` (a list of
objects, or ``{"data": [...]}``; ``file record N``), ``.csv`` (a header row; ``file:line``),
``.parquet`` (``file row N``). A Hugging Face dataset (``datasets.load_dataset``) gives
``name split row N``.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rlbench.types import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    data: dict
    where: str  # "data/train.jsonl:12"
    index: int  # 0-based position in its source


def file_hash(path: str | Path) -> str:
    """sha256 of a data file (the first 16 hex digits): recorded in manifest.json."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_file(path: str | Path) -> list[Row]:
    """Every row of a .jsonl/.json/.csv/.parquet file; a row that is not an object is a DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{p}: unknown data format {suffix or '(no suffix)'!r}; use one of {', '.join(SUFFIXES)}")
    rows: list[Row] = []
    if suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{no}: not valid JSON ({e.msg})") from None
                rows.append(_row(obj, f"{p}:{no}", len(rows)))
    elif suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        items = obj.get("data") if isinstance(obj, dict) else obj
        if not isinstance(items, list):
            raise DataError(f"{p}: expected a list of objects (or {{\"data\": [...]}})")
        rows = [_row(o, f"{p} record {i + 1}", i) for i, o in enumerate(items)]
    elif suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for obj in reader:
                rows.append(_row(dict(obj), f"{p}:{reader.line_num}", len(rows)))
    else:
        import pandas as pd

        frame = pd.read_parquet(p)
        rows = [_row(o, f"{p} row {i + 1}", i) for i, o in enumerate(frame.to_dict("records"))]
    if not rows:
        raise DataError(f"{p}: no records")
    return rows


def read_hf(name: str, config: str, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - hub, network and format errors all end here
        raise DataError(f"hf_dataset {name!r} split {split!r}: {type(e).__name__}: {e}") from None
    return [_row(dict(o), f"{name} {split} row {i}", i) for i, o in enumerate(ds)]


def _row(obj, where: str, index: int) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(obj).__name__}")
    return Row(obj, where, index)


def check_fields(rows: list[Row], fields: set[str], used_by: str) -> None:
    """Every row holds every field (not null); the first that does not is a DataError naming
    file:line, the field and the nearest field the row has."""
    for row in rows:
        for name in sorted(fields):
            if row.data.get(name) is None:
                near = difflib.get_close_matches(name, list(row.data), n=1, cutoff=0.5)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise DataError(f"{row.where}: missing field {name!r} ({used_by}){hint} "
                                f"(the row has: {', '.join(sorted(row.data)) or 'nothing'})")
