"""Stage artifacts: versioned directories with a ``manifest.json`` written last (torch-free).

Every stage (export, and later quantize, engine build, validation) writes into a staging directory beside
its output and renames it into place only when complete, with the manifest as the last file. A directory
without a valid manifest is never treated as a result; an existing output is replaced only with
``force=True`` and never when it is not one of ours. Every file is recorded with its sha256 and size, and
readers verify them before loading anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from owl3.errors import InvalidInputError, ResourceError, UsageError

MANIFEST = "manifest.json"
PRODUCER = "owl3-export"
_CHUNK = 8 << 20


class ArtifactError(InvalidInputError):
    """An artifact directory is missing its manifest, is of another kind, or fails verification."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def source_record(model_dir: Path) -> dict[str, Any]:
    """The input checkpoint of a stage: its path and the sha256 and size of every file (code files excluded)."""
    files = {p.name: file_record(p) for p in sorted(Path(model_dir).iterdir()) if p.is_file() and p.suffix != ".py"}
    return {"path": str(Path(model_dir).resolve()), "files": files}


def is_ours(directory: Path) -> bool:
    """True when ``directory`` holds a manifest written by this tool."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("producer") == PRODUCER


def check_free_disk(directory: Path, needed_bytes: int) -> None:
    """Preflight: ResourceError (exit 5) when the file system of ``directory`` lacks ``needed_bytes``."""
    probe = directory if directory.exists() else directory.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise ResourceError(
            f"about {needed_bytes / 2**30:.2f} GiB of free disk needed, {free / 2**30:.2f} GiB available",
            where=str(directory),
            fix="free disk space or choose another --output",
        )


@contextmanager
def staged_output(final: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside ``final``; on success rename it into place atomically.

    The caller writes every file, then the manifest last (``write_manifest``). On any error the staging
    directory is removed and ``final`` is untouched. Disk full becomes ResourceError (exit 5).
    """
    final = Path(final)
    refuse_overwrite(final, force=force)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield staging
        if not (staging / MANIFEST).is_file():
            raise RuntimeError("a stage finished without writing its manifest")
        _replace(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ResourceError(
                "the disk filled up while writing", where=str(final), fix="free disk space and run again"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def refuse_overwrite(final: Path, *, force: bool) -> None:
    if not final.exists():
        return
    if final.is_dir() and not any(final.iterdir()):
        return
    if not final.is_dir() or not is_ours(final):
        raise UsageError(
            "refusing to touch an existing path that is not an owl3-export artifact",
            where=str(final),
            fix="choose another --output",
        )
    if not force:
        raise UsageError(
            "the output directory already holds an artifact",
            where=str(final),
            fix="pass --force to replace it, or choose another --output",
        )


def _replace(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an old artifact there is moved aside first and removed after."""
    old = None
    if final.exists():
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        else:
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(final, old)
    os.rename(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Record every file of ``directory`` (sha256, size) and write manifest.json last, atomically."""
    files = {
        str(path.relative_to(directory)): file_record(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    full = {"producer": PRODUCER, **manifest, "files": files}
    temporary = directory / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(full, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temporary, directory / MANIFEST)
    return full


def read_manifest(directory: Path, *, schema: str) -> dict[str, Any]:
    """The manifest of an artifact of kind ``schema``; ArtifactError when absent, broken or of another kind."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            "expected an owl3-export artifact with manifest.json, found none",
            where=str(directory),
            fix="point to a directory written by owl3-export (an interrupted run leaves none: run it again)",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"manifest.json is not valid JSON: {exc}", where=str(path), fix="export again") from exc
    if not isinstance(manifest, dict) or manifest.get("producer") != PRODUCER or manifest.get("schema") != schema:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise ArtifactError(
            f"expected an artifact of kind {schema!r}, found {found!r}",
            where=str(path),
            fix="point to the right directory",
        )
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Check every file the manifest lists: present, same size, same sha256 (unless ``hashes=False``)."""
    problems = []
    for name, record in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != record["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {record['size']}")
        elif hashes and sha256_file(path) != record["sha256"]:
            problems.append(f"{name} does not match its sha256")
    if problems:
        raise ArtifactError(
            "artifact files differ from the manifest: " + "; ".join(problems),
            where=str(directory),
            fix="the directory was modified or copied incompletely: export again",
        )


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("owl3-export", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
