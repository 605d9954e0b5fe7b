"""TensorRT engine directories: plan headers, the device, and the compatibility check made before any
deserialization (torch-free and TensorRT-free: all of it runs and is tested without TensorRT).

A plan runs only on the TensorRT version and GPU family it was built with, and TensorRT's own refusal is the
unhelpful "Version tag does not match". So before deserializing, the runtime reads each plan's header (bytes
0-3 the tag ``0x74727466`` "ftrt", bytes 24-27 major, minor, patch, build: what ``trtexec
--getPlanVersionOnly`` prints), compares it and the engine manifest (TensorRT version, GPU compute capability,
L4T release) with this device, and refuses with exit 4 and the command that rebuilds the engines here.
``read_engines`` also refuses (exit 3) engines that were not built from the export they are loaded with.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl3.artifacts import ArtifactError, read_manifest
from owl3.errors import EnvironmentProblem, InvalidInputError

PLAN_TAG = 0x74727466  # "ftrt" as a little-endian uint32
ENGINE_SCHEMA = "owl3-export/tensorrt-engines"
ENGINE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PlanVersion:
    major: int
    minor: int
    patch: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}.{self.build}"

    @property
    def release(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def read_plan_header(path: Path) -> PlanVersion:
    """The TensorRT version a serialized plan was built with, from its first 28 bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(28)
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read the engine plan: {exc}", where=str(path), fix="build the engines again"
        ) from exc
    if len(head) < 28 or int.from_bytes(head[:4], "little") != PLAN_TAG:
        raise InvalidInputError(
            "not a TensorRT plan (missing the 'ftrt' tag) or truncated",
            where=str(path),
            fix="build the engines again with owl3-export build-engine",
        )
    return PlanVersion(*head[24:28])


@dataclass(frozen=True)
class Device:
    """This machine as an engine sees it. ``None`` where it cannot be read (no GPU, no TensorRT)."""

    tensorrt: str | None  # "10.3.0"
    gpu: str | None  # "Orin (nvgpu)"
    compute_capability: str | None  # "8.7"
    l4t: str | None  # "36.4.3" on a Jetson

    def to_json(self) -> dict[str, Any]:
        return {"tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability,
                "l4t": self.l4t}  # fmt: skip


def read_l4t_release(path: Path = Path("/etc/nv_tegra_release")) -> str | None:
    """``# R36 (release), REVISION: 4.3, ...`` -> "36.4.3"; None off a Jetson."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def query_gpu() -> tuple[str | None, str | None]:
    """(name, compute capability) of GPU 0 from nvidia-smi; (None, None) without one."""
    if shutil.which("nvidia-smi") is None:
        return None, None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None, None
    if not out or "," not in out[0]:
        return None, None
    name, capability = (part.strip() for part in out[0].split(",", 1))
    return name, capability


def current_device() -> Device:
    try:
        import tensorrt

        version = str(tensorrt.__version__)
    except ImportError:
        version = None
    name, capability = query_gpu()
    return Device(version, name, capability, read_l4t_release())


def compatibility_problems(manifest: dict[str, Any], directory: Path, device: Device) -> list[str]:
    """Why the engines of ``directory`` (manifest already read) cannot run on ``device``; empty when they can."""
    built = manifest.get("device", {})
    problems = []
    if device.tensorrt is None:
        problems.append("TensorRT is not installed here")
    for engine in manifest.get("engines", {}).values():
        version = read_plan_header(directory / engine["file"])
        if device.tensorrt is not None and _release(device.tensorrt) != version.release:
            problems.append(f"{engine['file']} was built with TensorRT {version}, this device has {device.tensorrt}")
        if _release(str(built.get("tensorrt"))) != version.release:
            problems.append(f"{engine['file']} header says TensorRT {version}, its manifest {built.get('tensorrt')}")
    if device.compute_capability and built.get("compute_capability") != device.compute_capability:
        problems.append(
            f"built for compute capability {built.get('compute_capability')} ({built.get('gpu')}), this GPU is "
            f"{device.compute_capability} ({device.gpu})"
        )
    if built.get("l4t") and device.l4t and built["l4t"].split(".")[:2] != device.l4t.split(".")[:2]:
        problems.append(f"built on L4T {built['l4t']} (JetPack), this device runs L4T {device.l4t}")
    return problems


def _release(version: str) -> str:
    """ "10.3.0.26" -> "10.3.0": plans are tied to the release; the build number does not matter."""
    return ".".join(version.split(".")[:3])


def check_engines(manifest: dict[str, Any], directory: Path, device: Device | None = None) -> None:
    """EnvironmentProblem (exit 4) naming what differs and how to rebuild, before any plan is deserialized."""
    problems = compatibility_problems(manifest, directory, device or current_device())
    if problems:
        source = manifest.get("source", {}).get("path", "EXPORT_DIR")
        raise EnvironmentProblem(
            "these TensorRT engines cannot run here: " + "; ".join(problems),
            where=str(directory),
            fix=f"rebuild them on this device: owl3-export build-engine {source} --output {directory} --force",
        )


def read_engines(engine_dir: Path, export_manifest: Mapping[str, Any], export_dir: Path) -> dict[str, Any]:
    """The engine manifest, refused (ArtifactError) unless it is ours, built, and built from this export."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir, schema=ENGINE_SCHEMA)
    where = str(engine_dir / "manifest.json")
    if manifest.get("schema_version") != ENGINE_SCHEMA_VERSION or manifest.get("status") != "ok":
        raise ArtifactError(
            f"expected engines of schema_version {ENGINE_SCHEMA_VERSION} with status ok, found "
            f"{manifest.get('schema_version')!r} / {manifest.get('status')!r}",
            where=where,
            fix=f"build them again: owl3-export build-engine {export_dir} --output {engine_dir} --force",
        )
    problems = source_mismatches(manifest, export_manifest)
    if problems:
        built_from = manifest.get("source", {}).get("path", "another export")
        raise ArtifactError(
            "these engines were not built from this export's graphs: " + "; ".join(problems),
            where=where,
            fix=f"pass the export they were built from ({built_from}), or build engines from this one: "
            f"owl3-export build-engine {export_dir} --output DIR",
        )
    return manifest


def source_mismatches(manifest: Mapping[str, Any], export_manifest: Mapping[str, Any]) -> list[str]:
    """How the engines' source graphs differ from the export's: graph names, files, sha256 of every file the
    engine manifest recorded as its source."""
    engines, graphs = manifest.get("engines", {}), export_manifest.get("graphs", {})
    if set(engines) != set(graphs):
        return [f"engines for {sorted(engines)}, the export has graphs {sorted(graphs)}"]
    problems = [
        f"engine {name} was built from {entry.get('source')}, the export's graph file is {graphs[name]['file']}"
        for name, entry in engines.items()
        if entry.get("source") != graphs[name]["file"]
    ]
    recorded = manifest.get("source", {}).get("files", {})
    files = export_manifest.get("files", {})
    for graph in graphs.values():
        if graph["file"] not in recorded:
            problems.append(f"the engine manifest records no sha256 for {graph['file']}")
    for name, record in recorded.items():
        ours = files.get(name, {}).get("sha256")
        if ours != record.get("sha256"):
            problems.append(f"{name}: engines built from sha256 {str(record.get('sha256'))[:12]}..., "
                            f"this export's is {str(ours)[:12]}...")  # fmt: skip
    return problems
