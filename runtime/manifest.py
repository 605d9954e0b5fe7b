"""Reading an export directory: the manifest, verified before anything is loaded (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from owl3.artifacts import ArtifactError, read_manifest, verify_files
from owl3.errors import UsageError
from owl3.export.specs import SCHEMA, SCHEMA_VERSION

VERIFY_MODES = ("full", "size")
REQUIRED_KEYS = ("precision", "opset", "ir_version", "config", "graphs", "tokens", "files")


def read_export(directory: Path, verify: str = "full", *, allow_rejected: bool = False) -> dict[str, Any]:
    """The verified manifest of an ONNX export: schema and version, then every file's size (and sha256).

    An export whose accuracy validation failed (``"status": "rejected"``) is refused unless ``allow_rejected``.
    """
    if verify not in VERIFY_MODES:
        raise UsageError(f"verify must be one of {list(VERIFY_MODES)}, found {verify!r}", where="Owl3Session")
    manifest = read_manifest(directory, schema=SCHEMA)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"expected export schema_version {SCHEMA_VERSION}, found {manifest.get('schema_version')!r}",
            where=str(directory / "manifest.json"),
            fix="export again with this version of owl3-export, or use the owl3-export that wrote it",
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(
            f"manifest.json lacks {missing}",
            where=str(directory / "manifest.json"),
            fix="export again with this version of owl3-export",
        )
    if manifest.get("status") == "rejected" and not allow_rejected:
        raise ArtifactError(
            "the export failed its accuracy validation and is marked rejected",
            where=str(directory / "manifest.json"),
            fix="read the manifest's validation section and export again (allow_rejected=True loads it anyway)",
        )
    listed = manifest.get("files", {})
    for graph in manifest.get("graphs", {}).values():
        data = f"{graph['file']}.data"  # external data, when the graph has any
        needed = [graph["file"], data] if (directory / data).exists() else [graph["file"]]
        unlisted = [name for name in needed if name not in listed]
        if unlisted:
            raise ArtifactError(
                f"graph files {unlisted} are not recorded in the manifest, so they cannot be verified",
                where=str(directory / "manifest.json"),
                fix="export again",
            )
    verify_files(directory, manifest, hashes=verify == "full")
    return manifest


def same_signature(entry: Any, expected: dict[str, Any]) -> bool:
    """A manifest graph entry holds the spec's file, inputs and outputs (other keys are informational)."""
    return isinstance(entry, dict) and all(entry.get(key) == value for key, value in expected.items())
