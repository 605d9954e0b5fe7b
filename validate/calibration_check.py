"""Calibration and evaluation must not overlap: a quantized arm's calibration ids and media (hashed into its
checkpoint's manifest) against the items and media of every benchmark subset being evaluated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from owl3.errors import UsageError
from owl3.validate.backends import Backend
from owl3.validate.items import id_hash, item_key, media_hashes
from owl3.validate.validator import BenchmarkRun


def calibration_overlaps(backends: Sequence[Backend], runs: Sequence[BenchmarkRun]) -> dict[str, dict[str, Any]]:
    """{arm name: its calibration summary and per-benchmark overlap} for every arm that carries a calibration
    record (quantized checkpoints); ``overlap`` maps a benchmark to {"items": n, "media": m} where non-zero."""
    records = {b.name: r for b in backends if (r := getattr(b, "calibration", None))}
    if not records:
        return {}
    run_items = {run.name: {id_hash(item_key(item)) for item in run.items} for run in runs}
    run_media = {run.name: {h for item in run.items for h in media_hashes(item)} for run in runs}
    out = {}
    for name, record in records.items():
        ids, media = set(record.get("id_hashes", ())), set(record.get("media_hashes", ()))
        overlap = {
            run.name: {"items": len(run_items[run.name] & ids), "media": len(run_media[run.name] & media)}
            for run in runs
            if run_items[run.name] & ids or run_media[run.name] & media
        }
        out[name] = {
            "arm": name,
            "samples": record.get("samples"),
            "source": record.get("source"),
            "ids_sha256": record.get("ids_sha256"),
            "overlap": overlap,
        }
    return out


def refuse_overlap(overlaps: dict[str, dict[str, Any]], allow: bool) -> None:
    """UsageError (exit 2) when an evaluation subset overlaps an arm's calibration set, unless ``allow``."""
    found = [
        f"{arm}: {bench} shares {o['items']} items and {o['media']} images"
        for arm, info in overlaps.items()
        for bench, o in info["overlap"].items()
    ]
    for info in overlaps.values():
        info["allowed"] = bool(info["overlap"]) and allow
    if found and not allow:
        raise UsageError(
            "evaluation subsets overlap the calibration set (" + "; ".join(found) + ")",
            where="--benchmark / calibration manifest",
            fix="evaluate on items outside the calibration set, or pass --allow-calibration-overlap "
            "to evaluate anyway (the reports are marked)",
        )
