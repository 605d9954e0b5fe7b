"""MMBench (dev, en or cn) in the official TSV format, with circular evaluation.

``root`` is the TSV file or a directory holding exactly one ``*.tsv``. Columns: ``index, question, hint,
A, B, C, D, (E), answer, category, l2-category, image`` with the image as base64 (or, as VLMEvalKit
writes repeated images, the ``index`` of the row that holds it). ``index, question, A, B, answer, image``
are required; the test split has no ``answer`` and is submission-only.

Circular variants are rows with the same image and question and rotated options. They are grouped as the
mPLUG-Owl3 evaluation does, by (image, question): each group is one scoring unit, correct only when every
variant is (``MMBenchTask.unit_score``). In the official TSV these are the rows whose ``index`` agree
modulo 1,000,000. Missing cells are those pandas reads as NaN (empty, "nan", "N/A", "None", ...): a
missing hint becomes "N/A", missing options are left out.

Prompt (spec §9), with cut::

    <|image|>Context: {hint}\\nQuestion: {question}\\nOptions: A. ...\\nB. ...\\nAnswer with the option’s letter ...
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from owl3.validate.benchmarks.common import ANSWER_WITH_LETTER, DatasetError, find_file, read_table, subset
from owl3.validate.items import Item

MMBENCH_PROMPT = "<|image|>Context: {hint}\nQuestion: {question}\nOptions: {options}\n" + ANSWER_WITH_LETTER
REQUIRED_COLUMNS = ("index", "question", "A", "B", "answer", "image")
OPTION_LETTERS = "ABCDE"
# pandas' default NaN strings: the official scorer reads the TSV with pandas.read_csv.
_MISSING = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
})  # fmt: skip


def load_mmbench(root: Path, *, limit: int | None = None, seed: int = 0, task_name: str = "mmbench") -> list[Item]:
    """MMBench items, one per TSV row; ``limit`` counts questions (units), keeping all their variants."""
    path = find_file(Path(root), ["*.tsv"], "MMBench TSV")
    rows = read_table(path, "\t", REQUIRED_COLUMNS)
    if not rows:
        raise DatasetError("the TSV has a header but no rows", where=str(path), fix="use the official dev TSV")
    indices = [_index(row, n, path) for n, row in enumerate(rows, start=1)]
    if len(set(indices)) != len(indices):
        raise DatasetError("the 'index' column has duplicates", where=str(path), fix="use the official dev TSV")
    images = _resolve_images(rows, indices)
    keys = [(_digest(image), row["question"]) for image, row in zip(images, rows, strict=True)]
    unit_of: dict[tuple[str, str], int] = {}
    for key, index in zip(keys, indices, strict=True):
        unit_of[key] = min(index, unit_of.get(key, index))
    items = []
    for n, (row, index, image, key) in enumerate(zip(rows, indices, images, keys, strict=True), start=1):
        options = _options(row, n, path)
        answer = _cell(row.get("answer"))
        if answer is None or answer.strip() not in set(OPTION_LETTERS[: len(options)]):
            raise DatasetError(
                f"data row {n}: answer {row.get('answer')!r} is not one of the row's option letters",
                where=str(path),
                fix="use the dev TSV (the test split has no answers and is submission-only)",
            )
        items.append(_item(row, index, options, answer.strip(), image, key, unit_of[key], task_name))
    return subset(items, limit, seed)


def _item(
    row: dict[str, str],
    index: int,
    options: list[str],
    answer: str,
    image: str,
    key: tuple[str, str],
    unit: int,
    task: str,
) -> Item:
    hint = _cell(row.get("hint")) or "N/A"
    choices = "\n".join(f"{letter}. {text}" for letter, text in zip(OPTION_LETTERS, options, strict=False))
    category = _cell(row.get("l2-category")) or _cell(row.get("category")) or ""
    data, problem = _decode_base64(image)
    meta = {"index": index, "options": options, "l1_category": _cell(row.get("category")) or ""}
    if problem:
        meta["media_problem"] = problem
    return Item(
        id=str(index),
        task=task,
        prompt=MMBENCH_PROMPT.format(hint=hint, question=row["question"], options=choices),
        answer=answer,
        images=(data,),
        cut=True,
        unit=str(unit),
        cluster=f"image-{key[0][:16]}",
        category=category,
        meta=meta,
    )


def _digest(image: str) -> str:
    return hashlib.sha256(image.encode("utf-8")).hexdigest()


def _cell(value: str | None) -> str | None:
    """A cell's text, or None when pandas would read it as NaN (or the row is short)."""
    return None if value is None or value in _MISSING else value


def _index(row: dict[str, str], line: int, path: Path) -> int:
    try:
        return int(row["index"])
    except (TypeError, ValueError) as exc:
        raise DatasetError(
            f"data row {line}: index {row['index']!r} is not an integer", where=str(path), fix="use the official TSV"
        ) from exc


def _options(row: dict[str, str], line: int, path: Path) -> list[str]:
    """Option texts from A on; a present option after a missing one is an error (letters would shift)."""
    texts = [_cell(row.get(letter)) for letter in OPTION_LETTERS]
    count = next((i for i, t in enumerate(texts) if t is None), len(texts))
    if count < 2 or any(t is not None for t in texts[count:]):
        raise DatasetError(
            f"data row {line}: options must be filled from A without gaps, at least A and B",
            where=str(path),
            fix="use the official TSV",
        )
    return [t for t in texts[:count] if t is not None]


def _resolve_images(rows: list[dict[str, str]], indices: list[int]) -> list[str]:
    """Each row's base64 image; a short integer cell refers to the row with that index (VLMEvalKit)."""
    by_index = {index: row.get("image") or "" for index, row in zip(indices, rows, strict=True)}
    resolved = []
    for row in rows:
        image = row.get("image") or ""
        if len(image) <= 64 and image.isdigit() and int(image) in by_index:
            image = by_index[int(image)]
        resolved.append(image)
    return resolved


def _decode_base64(image: str) -> tuple[bytes, str]:
    """(bytes, "") or (b"", why): a bad image is reported per item by the validator, not here."""
    try:
        data = base64.b64decode(image, validate=False)
    except (binascii.Error, ValueError) as exc:
        return b"", f"the base64 image does not decode ({exc})"
    return data, "" if data else "the image cell is empty"
