"""``owl3-export build-engine``: one TensorRT engine per graph of an export, built on the device that runs them.

UNVERIFIED: TensorRT cannot be installed where this project is developed, so the build itself
(``_build_plan``) is written against the documented Python API of TensorRT 10.3 and 11.x
(``../shared/docs/tensorrt.md``) and has never run. Everything around it is tested here: the readiness
check that refuses graphs the parser would reject (before TensorRT is even imported), the optimization
profiles derived from the runtime's limits, the engine manifest, and the ``trtexec`` / ``polygraphy`` command
lines written beside every engine for users who prefer NVIDIA's tools.

Engines are strongly typed (precision comes from the graphs' types and their fp32 islands; TensorRT 11 has
nothing else), one optimization profile per engine (multiple profiles had an accuracy bug before 10.8), a
workspace limit suited to 8 GB Orin boards, and one timing cache shared by the graphs.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from owl3.artifacts import staged_output, tool_versions, write_manifest
from owl3.config import Owl3Config
from owl3.errors import EnvironmentProblem, InvalidInputError, Owl3Error
from owl3.runtime.engine_check import ENGINE_SCHEMA, current_device
from owl3.runtime.manifest import read_export
from owl3.runtime.profiles import ProfileLimits, Shape, graph_profiles, to_json

DEFAULT_WORKSPACE_MIB = 2048  # leaves room for the weights and KV cache on an 8 GB Orin
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's default; 0-5


class EngineBuildError(Owl3Error):
    """TensorRT rejected a graph or failed to build it (exit 3: the input cannot become an engine)."""

    exit_code = 3


def build_engines(
    export_dir: str | Path,
    output: str | Path,
    *,
    limits: ProfileLimits | None = None,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build ``<graph>.plan`` for every graph of ``export_dir`` into ``output`` (a directory with a manifest)."""
    say = progress or (lambda _message: None)
    export_dir, output = Path(export_dir), Path(output)
    manifest = read_export(export_dir)
    config = Owl3Config.from_hf_json(manifest["config"])
    compute = manifest.get("compute") or manifest["precision"]
    limits = limits or ProfileLimits.for_config(config)
    if not 0 <= optimization_level <= 5:
        raise InvalidInputError(f"optimization level {optimization_level} is outside 0-5", where="--opt-level")
    _refuse_unready(export_dir)
    trt = import_tensorrt()
    profiles = graph_profiles(config, compute, limits)
    device = current_device()
    with staged_output(output, force=force) as staging:
        timing_cache = b""
        engines = {}
        for name, graph in manifest["graphs"].items():
            say(f"building the {name} engine (TensorRT {trt.__version__}); this takes minutes")
            plan, timing_cache = _build_plan(
                trt, export_dir / graph["file"], profiles[name], workspace_mib, optimization_level, timing_cache
            )
            (staging / f"{name}.plan").write_bytes(plan)
            commands = tool_commands(export_dir / graph["file"], profiles[name], workspace_mib, f"{name}.plan")
            (staging / f"{name}.commands.sh").write_text(commands, encoding="utf-8")
            engines[name] = {"file": f"{name}.plan", "source": graph["file"]}
        (staging / "timing.cache").write_bytes(timing_cache)
        write_manifest(staging, {
            "schema": ENGINE_SCHEMA, "schema_version": 1, "status": "ok",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device.to_json(), "engines": engines, "profiles": to_json(profiles),
            "limits": limits.__dict__, "builder": {"strongly_typed": True, "workspace_mib": workspace_mib,
                                                   "optimization_level": optimization_level, "profiles": 1},
            "source": {"path": str(export_dir.resolve()), "precision": manifest["precision"],
                       "flavour": manifest.get("flavour"), "files": _source_files(manifest)},
            "tools": tool_versions(),
        })  # fmt: skip
    say(f"wrote {output}; check it against ONNX Runtime: owl3-export validate (see README, 'On the device')")
    return output


def _source_files(manifest: dict[str, Any]) -> dict[str, Any]:
    """The size and sha256 of every graph file and of its weights (``.onnx.data``): an engine belongs to both."""
    names = [n for g in manifest["graphs"].values() for n in (g["file"], f"{g['file']}.data")]
    return {name: manifest["files"][name] for name in names if name in manifest["files"]}


def _refuse_unready(export_dir: Path) -> None:
    """The readiness check first: graphs TensorRT 10.3 would reject are refused before TensorRT is needed."""
    from owl3.export.trt_check import check_export, format_report

    report = check_export(export_dir, ("10.3",))
    if not report["10.3"]["ready"]:
        raise EngineBuildError(
            "these graphs would be rejected by the TensorRT 10.3 parser:\n" + format_report(report, limit=10),
            where=str(export_dir),
            fix="build engines from a TensorRT-flavour export (DIR-trt of owl3-export --precision ...) or an "
            "fp16 / fp32 export",
        )


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise EnvironmentProblem(
            "TensorRT is not installed here; engines are built on the device that runs them",
            where="build-engine",
            fix="on a Jetson: TensorRT comes with JetPack (python3-libnvinfer; use a venv with "
            "--system-site-packages); on x86: pip install tensorrt-cu12 (or -cu13)",
        ) from exc
    return tensorrt


def _build_plan(
    trt: Any, graph: Path, profile: dict[str, list[Shape]], workspace_mib: int, level: int, timing_cache: bytes
) -> tuple[bytes, bytes]:
    """UNVERIFIED (documented TensorRT 10.3 / 11.x API): parse, configure, build; (plan, timing cache)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):  # from the file: external data resolves beside it
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        described = "; ".join(f"node {e.node()} ({e.node_name()}, {e.node_operator()}): {e.desc()}" for e in errors)
        raise EngineBuildError(f"TensorRT could not parse {graph.name}: {described}", where=str(graph),
                               fix="run owl3-export check-trt on the export and report the finding")  # fmt: skip
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.builder_optimization_level = level
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build {graph.name} (see its log above)", where=str(graph),
                               fix="lower --opt-level or raise --workspace-mib, then report the log")  # fmt: skip
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def tool_commands(graph: Path, profile: dict[str, list[Shape]], workspace_mib: int, plan: str) -> str:
    """A shell script with the equivalent ``trtexec`` build and a ``polygraphy`` engine-vs-ONNX Runtime check."""

    def shapes(k: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[k])}" for name, dims in profile.items())

    onnx = shlex.quote(str(graph))
    trtexec = [
        "trtexec", f"--onnx={onnx}", "--stronglyTyped", f"--minShapes={shapes(0)}", f"--optShapes={shapes(1)}",
        f"--maxShapes={shapes(2)}", f"--memPoolSize=workspace:{workspace_mib}M", "--timingCacheFile=timing.cache",
        f"--saveEngine={plan}", "--skipInference",
    ]  # fmt: skip
    polygraphy = [
        "polygraphy", "run", onnx, "--trt", "--onnxrt", "--strongly-typed",
        "--trt-min-shapes", *shapes(0).split(","), "--trt-opt-shapes", *shapes(1).split(","),
        "--trt-max-shapes", *shapes(2).split(","), "--input-shapes", *shapes(1).split(","),
        "--atol", "1e-2", "--rtol", "1e-2", "--check-error-stat", "median",
    ]  # fmt: skip
    return (
        "#!/bin/sh\n# The same engine with NVIDIA's tools (TensorRT 11's trtexec ignores --stronglyTyped).\n"
        + " ".join(trtexec)
        + "\n# Compare TensorRT with ONNX Runtime on this graph (opt shapes).\n"
        + " ".join(polygraphy)
        + "\n"
    )
