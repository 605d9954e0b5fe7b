"""Shared pieces of the benchmark loaders: the dataset error, annotation-file reading, subsets, id hashes.

Loaders read annotation files eagerly and strictly (a malformed file is a ``DatasetError`` naming the file
and what is missing) but never decode media: items carry paths (or encoded bytes) and a missing or broken
image is reported later, per item, by the validator.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from owl3.errors import InvalidInputError
from owl3.validate.items import Item

ANSWER_WITH_LETTER = "Answer with the option’s letter from the given choices directly."  # typographic ’ (spec §9)
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTERS = "ABCDEFGHIJ"


class DatasetError(InvalidInputError):
    """A benchmark annotation file is missing, unreadable or lacks what the official format has (exit 3)."""


# ---- annotation files -------------------------------------------------------------------------------------


def find_file(root: Path, patterns: Sequence[str], what: str) -> Path:
    """The one file under ``root`` matching ``patterns`` (``root`` itself when it is a file).

    Raises DatasetError when none or several match, listing what was looked for and found.
    """
    if root.is_file():
        return root
    if not root.is_dir():
        raise DatasetError(f"the {what} directory does not exist", where=str(root), fix="pass the dataset directory")
    found = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(
            f"no {what} found (looked for {', '.join(patterns)})", where=str(root), fix=f"put the {what} there"
        )
    names = ", ".join(p.name for p in found)
    raise DatasetError(f"several {what} candidates: {names}", where=str(root), fix="pass the file itself as root")


def first_dir(root: Path, names: Sequence[str]) -> Path:
    """The first existing directory ``root/name``; ``root`` when none exists (media are checked later)."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


def read_json(path: Path) -> Any:
    """Parse a JSON file; DatasetError (with the line) when it is unreadable or not JSON."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise DatasetError(f"the file cannot be read ({exc})", where=str(path), fix="check the path") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"the file is not valid JSON ({exc})", where=str(path), fix=_REDOWNLOAD) from exc


def read_jsonl(path: Path) -> list[Any]:
    """Parse a JSON-lines file (blank lines skipped); DatasetError naming the bad line."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"line {number} is not valid JSON ({exc})", where=str(path), fix=_REDOWNLOAD) from exc
    return records


def read_table(path: Path, delimiter: str, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file as dicts, checking its header has ``required``; fields may be large (base64)."""
    previous = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # MMBench's base64 images exceed the 128 KiB default
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # tolerate a BOM
            reader = csv.DictReader(f, delimiter=delimiter)
            rows = list(reader)
            header = reader.fieldnames or []
    except OSError as exc:
        raise DatasetError(f"the file cannot be read ({exc})", where=str(path), fix="check the path") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"the file is not a valid table ({exc})", where=str(path), fix=_REDOWNLOAD) from exc
    finally:
        csv.field_size_limit(previous)
    if not header:
        raise DatasetError("the file is empty (no header row)", where=str(path), fix=_REDOWNLOAD)
    require_columns(header, required, path)
    for line, row in enumerate(rows, start=1):
        if None in row or None in row.values():
            raise DatasetError(
                f"data row {line} has a different number of fields than the header ({len(header)})",
                where=str(path),
                fix=_REDOWNLOAD,
            )
    return rows


def require_columns(header: Iterable[str], required: Sequence[str], path: Path) -> None:
    """DatasetError listing every required column the file's header lacks."""
    missing = [c for c in required if c not in set(header)]
    if missing:
        raise DatasetError(
            f"missing column(s) {', '.join(missing)}; the official format has {', '.join(required)}",
            where=str(path),
            fix=_REDOWNLOAD,
        )


def require_keys(record: Any, keys: Sequence[str], path: Path, what: str) -> dict[str, Any]:
    """``record`` as a dict having every key of ``keys``; DatasetError naming the record and the missing keys."""
    if not isinstance(record, dict):
        raise DatasetError(f"{what} is a {type(record).__name__}, not an object", where=str(path), fix=_REDOWNLOAD)
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(f"{what} lacks key(s) {', '.join(missing)}", where=str(path), fix=_REDOWNLOAD)
    return record


def require_list(value: Any, path: Path, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise DatasetError(f"{what} is not a list", where=str(path), fix=_REDOWNLOAD)
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"the file cannot be read ({exc})", where=str(path), fix="check the path") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"the file is not UTF-8 text ({exc})", where=str(path), fix=_REDOWNLOAD) from exc


_REDOWNLOAD = "use the benchmark's official annotation file (re-download it if it was edited or truncated)"


# ---- subsets and ids --------------------------------------------------------------------------------------


def subset(items: Sequence[Item], size: int | None, seed: int) -> list[Item]:
    """A seeded, deterministic subset of ``size`` scoring units, stratified by category.

    Whole units are kept (every circular variant of an MMBench question). Each category gets a share
    proportional to its unit count (largest remainders), at least one unit when ``size`` allows it; inside
    a category the units are drawn with ``random.Random(f"{seed}:{category}")`` from the sorted unit ids,
    so the result does not depend on file order or PYTHONHASHSEED. Items keep their input order. ``size``
    None or at least the number of units returns every item.
    """
    if size is not None and size < 1:
        raise DatasetError(f"a subset needs at least 1 unit, asked for {size}", where="subset", fix="pass limit >= 1")
    units = _units_by_category(items)
    total = sum(len(u) for u in units.values())
    if size is None or size >= total:
        return list(items)
    chosen: set[str] = set()
    for category, count in _allocate(units, size).items():
        pool = sorted(units[category])
        chosen.update(random.Random(f"{seed}:{category}").sample(pool, count))
    return [item for item in items if item.unit in chosen]


def _units_by_category(items: Sequence[Item]) -> dict[str, list[str]]:
    """Unit ids per category; a unit's category is its first item's."""
    seen: dict[str, str] = {}
    for item in items:
        seen.setdefault(item.unit, item.category)
    by_category: dict[str, list[str]] = {}
    for unit, category in seen.items():
        by_category.setdefault(category, []).append(unit)
    return by_category


def _allocate(units: dict[str, list[str]], size: int) -> dict[str, int]:
    """Units per category: proportional quotas, floored, at least 1 each, then largest remainders."""
    total = sum(len(u) for u in units.values())
    categories = sorted(units)
    if size < len(categories):  # cannot cover every category: the largest ones, ties by name
        largest = sorted(categories, key=lambda c: (-len(units[c]), c))[:size]
        return dict.fromkeys(largest, 1)
    quota = {c: size * len(units[c]) / total for c in categories}
    alloc = {c: min(len(units[c]), max(1, int(quota[c]))) for c in categories}
    while sum(alloc.values()) < size:  # give to the largest unmet remainder
        open_ = [c for c in categories if alloc[c] < len(units[c])]
        best = max(open_, key=lambda c: (quota[c] - alloc[c], -categories.index(c)))
        alloc[best] += 1
    while sum(alloc.values()) > size:  # the minimum of 1 overshot: take from the most over-served
        donors = [c for c in categories if alloc[c] > 1]
        worst = min(donors, key=lambda c: (quota[c] - alloc[c], categories.index(c)))
        alloc[worst] -= 1
    return alloc


def id_list_hash(items: Iterable[Item]) -> str:
    """sha256 (hex) of the sorted distinct unit ids, one per line: names the exact subset in a report."""
    units = sorted({item.unit for item in items})
    return hashlib.sha256("\n".join(units).encode("utf-8")).hexdigest()
