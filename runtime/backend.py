"""ONNX Runtime graph runners: provider choice, version checks before loading, CPU and CUDA execution.

- Providers: ``"auto"`` takes TensorRT, then CUDA, then CPU, whichever the installed onnxruntime offers;
  naming one that is not installed is an EnvironmentProblem (exit 4) that lists what is installed.
- Versions: the export's ONNX IR version and opset are checked against the installed onnxruntime (table
  below) before any session is created, and ORT's own load failure about them becomes the same error.
- CPU: ``InferenceSession.run`` on numpy arrays.
- CUDA / TensorRT (UNVERIFIED until run on a GPU: no GPU exists where this was written): IO binding, with
  outputs named in ``keep`` (the decoder's present K/V, the visual K/V) left on the device as ``OrtValue``s
  and bound as the next step's inputs; everything else comes back as numpy. This path is used only when
  the session really runs on CUDA (ORT silently falls back to CPU when the CUDA libraries fail to load).
- TensorRT engines are cached in the user cache directory, never inside the export directory, which stays
  unmodified and hash-verifiable. No optimization profiles are set: the EP derives them from the shapes it
  sees and may rebuild engines as the KV cache grows (UNVERIFIED; prefer "cuda" until measured on a GPU).

``OrtGraph.run`` is thread-safe (ONNX Runtime sessions are); every call binds its own inputs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from owl3.artifacts import ArtifactError
from owl3.config import Owl3Config
from owl3.errors import EnvironmentProblem, UsageError
from owl3.runtime.profiles import ProfileLimits, graph_profiles, ort_tensorrt_options

try:
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
except ImportError as exc:  # the CLI turns this into exit 4 with the fix
    raise EnvironmentProblem(
        f"onnxruntime cannot be imported ({exc})",
        where="owl3.runtime",
        fix="pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA, TensorRT)",
    ) from exc

PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")  # also in owl3.runtime.cli, which must not import ORT
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
_FALLBACKS = {TENSORRT: (TENSORRT, CUDA, CPU), CUDA: (CUDA, CPU), CPU: (CPU,)}
GPU_FIX = (
    "install the GPU build of onnxruntime in place of the CPU one: "
    "pip uninstall -y onnxruntime && pip install 'owl3-export[gpu]' (onnxruntime-gpu, with a CUDA driver; "
    "TensorRT also needs the TensorRT libraries), or use --provider cpu"
)

# ONNX Runtime release -> (max ONNX IR version, max ai.onnx opset). 1.0-1.20: the compatibility table at
# https://onnxruntime.ai/docs/reference/compatibility.html; 1.31: measured (its own load errors name the
# limits). A release not listed passes the check (newer releases support more; guessing would refuse
# models that run), and its own load error is translated by ``translate_load_error``.
ORT_SUPPORT: dict[tuple[int, int], tuple[int, int]] = {
    (1, 31): (13, 26),
    (1, 20): (10, 21),
    (1, 19): (10, 21),
    (1, 18): (10, 21),
    (1, 17): (9, 20),
    (1, 16): (9, 19),
    (1, 15): (8, 19),
    (1, 14): (8, 18),
    (1, 13): (8, 17),
    (1, 12): (8, 17),
    (1, 11): (8, 16),
    (1, 10): (8, 15),
    (1, 9): (8, 15),
    (1, 8): (7, 14),
    (1, 7): (7, 13),
    (1, 6): (7, 13),
    (1, 5): (7, 12),
    (1, 4): (7, 12),
    (1, 3): (7, 12),
    (1, 2): (6, 11),
    (1, 1): (6, 11),
    (1, 0): (6, 11),
}
_LOAD_ERRORS = tuple(
    getattr(_ort_state, name)
    for name in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
                 "NotImplemented", "RuntimeException", "EPFail")
    if hasattr(_ort_state, name)
)  # fmt: skip
_IR_MESSAGE = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
_OPSET_MESSAGE = re.compile(r"official support for domain ai\.onnx is till opset (\d+)")


# ---- versions -------------------------------------------------------------------------------------------


def installed_ort_version() -> tuple[int, int]:
    """(major, minor) of the installed onnxruntime."""
    parts = re.findall(r"\d+", ort.__version__)
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def _first_release(index: int, needed: int) -> str:
    """The oldest release in the table whose limit at ``index`` (0 IR, 1 opset) is >= needed."""
    fits = sorted(version for version, limits in ORT_SUPPORT.items() if limits[index] >= needed)
    if fits:
        return _shown(fits[0])
    return f"a release newer than {_shown(max(ORT_SUPPORT))} that supports it"


def _shown(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def check_model_versions(
    ir_version: int, opset: int, *, ort_version: tuple[int, int] | None = None, where: str = "manifest.json"
) -> None:
    """EnvironmentProblem (exit 4) when onnxruntime ``ort_version`` (default: installed) cannot run a model
    of ``ir_version`` / ``opset``. Releases missing from ``ORT_SUPPORT`` pass."""
    version = ort_version or installed_ort_version()
    if version not in ORT_SUPPORT:
        return
    max_ir, max_opset = ORT_SUPPORT[version]
    shown = _shown(version)
    if ir_version > max_ir:
        raise EnvironmentProblem(
            f"the export has ONNX IR version {ir_version} but onnxruntime {shown} supports IR <= {max_ir}",
            where=where,
            fix=f"upgrade onnxruntime to >= {_first_release(0, ir_version)} (pip install -U onnxruntime), "
            f"or re-export with an onnx package that writes IR <= {max_ir}",
        )
    if opset > max_opset:
        raise EnvironmentProblem(
            f"the export uses opset {opset} but onnxruntime {shown} implements opsets <= {max_opset}",
            where=where,
            fix=f"upgrade onnxruntime to >= {_first_release(1, opset)} (pip install -U onnxruntime), "
            f"or re-export with opset <= {max_opset}",
        )


def translate_load_error(exc: Exception, path: Path) -> Exception:
    """ORT's failure to create a session -> EnvironmentProblem (versions, missing kernels) or ArtifactError."""
    message = str(exc)
    version = ort.__version__
    if match := _IR_MESSAGE.search(message):
        return EnvironmentProblem(
            f"the graph has ONNX IR version {match[1]} but onnxruntime {version} supports IR <= {match[2]}",
            where=str(path),
            fix="upgrade onnxruntime (pip install -U onnxruntime), or re-export with an older onnx package",
        )
    if match := _OPSET_MESSAGE.search(message):
        return EnvironmentProblem(
            f"the graph uses an opset newer than onnxruntime {version} supports (<= {match[1]})",
            where=str(path),
            fix=f"upgrade onnxruntime (pip install -U onnxruntime), or re-export with opset <= {match[1]}",
        )
    if isinstance(exc, getattr(_ort_state, "NotImplemented", ())) or "Could not find an implementation" in message:
        return EnvironmentProblem(
            f"onnxruntime {version} lacks an operator the graph needs: {message[-300:]}",
            where=str(path),
            fix="upgrade onnxruntime (pip install -U onnxruntime) or use another --provider",
        )
    return ArtifactError(
        f"onnxruntime {version} could not load the graph: {message[-300:]}",
        where=str(path),
        fix="export again with this version of owl3-export",
    )


# ---- providers ------------------------------------------------------------------------------------------


def resolve_providers(provider: str, available: Sequence[str] | None = None) -> list[str]:
    """The provider chain for ``provider`` ("auto" | "cpu" | "cuda" | "tensorrt"), best first, CPU last."""
    if provider not in PROVIDER_CHOICES:
        raise UsageError(
            f"provider must be one of {list(PROVIDER_CHOICES)}, found {provider!r}",
            where="provider",
            fix="use auto, cpu, cuda or tensorrt",
        )
    installed = list(ort.get_available_providers() if available is None else available)
    if provider == "auto":
        return [name for name in (TENSORRT, CUDA, CPU) if name in installed or name == CPU]
    wanted = _PROVIDER_NAMES[provider]
    if wanted not in installed:
        raise EnvironmentProblem(
            f"provider {provider!r} needs {wanted}, but onnxruntime {ort.__version__} offers only {installed}",
            where="onnxruntime",
            fix=GPU_FIX,
        )
    return [name for name in _FALLBACKS[wanted] if name in installed or name == CPU]


def tensorrt_cache_dir(manifest: Mapping[str, Any]) -> Path:
    """A per-export engine cache in the user cache directory (keyed by the graphs' sha256), never the export."""
    from owl3.demo import cache_dir  # torch-free: only the cache location rule

    digest = hashlib.sha256()
    for name in sorted(manifest.get("files", {})):
        if name.endswith(".onnx") or name.endswith(".onnx.data"):
            digest.update(f"{name}:{manifest['files'][name]['sha256']}\n".encode())
    return cache_dir() / "tensorrt-engines" / digest.hexdigest()[:16]


def _provider_entries(
    chain: Sequence[str], manifest: Mapping[str, Any], profile: dict[str, list[tuple[int, ...]]] | None = None
) -> list[Any]:
    """Provider names with their options. TensorRT: engine and timing caches and the graph's explicit profile
    shapes (without them engines rebuild as shapes grow); precision comes from the graphs' types (strongly
    typed Q/DQ and fp16 graphs), so fp16 is enabled only for float fp16 exports."""
    entries: list[Any] = []
    for name in chain:
        if name == TENSORRT:  # UNVERIFIED until run on a GPU with TensorRT
            cache = tensorrt_cache_dir(manifest)
            cache.mkdir(parents=True, exist_ok=True)
            options = {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
                "trt_fp16_enable": manifest.get("precision") == "fp16",
                **(ort_tensorrt_options(profile) if profile else {}),
            }
            entries.append((name, options))
        else:
            entries.append(name)
    return entries


def session_config(flavour: str | None) -> dict[str, str]:
    """ONNX Runtime session entries an export's flavour needs. The TensorRT flavour runs on ONNX Runtime to
    validate what TensorRT will compute, so ONNX Runtime's own Q/DQ fusions stay off: they would turn
    DequantizeLinear -> MatMul into MatMulNBits with int8 activations, and W8A8 Q/DQ into an integer kernel
    that saturates on AVX2 CPUs without VNNI (measured: 18% error on full-range INT8 weights)."""
    if flavour != "tensorrt":
        return {}
    return {"session.disable_quant_qdq": "1", "session.qdq_matmulnbits_accuracy_level": "0"}


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}  # fmt: skip


# ---- graphs ---------------------------------------------------------------------------------------------


class OrtGraph:
    """One exported graph on one InferenceSession. ``device`` is "cpu" or "cuda" (the active provider's)."""

    def __init__(self, name: str, session: ort.InferenceSession, device: str) -> None:
        self.name = name
        self.session = session
        self.device = device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def check_signature(self, inputs: Sequence[str], outputs: Sequence[str], where: str) -> None:
        """ArtifactError when the graph's input/output names are not the spec's."""
        if list(inputs) != self.input_names or list(outputs) != self.output_names:
            raise ArtifactError(
                f"graph {self.name} has inputs {self.input_names} and outputs {self.output_names}, "
                f"expected {list(inputs)} and {list(outputs)}",
                where=where,
                fix="export again with this version of owl3-export",
            )

    def run(self, feeds: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
        """Run with ``feeds`` (numpy arrays, or device OrtValues from an earlier ``keep``) -> outputs by name.

        On CPU every output is numpy. On CUDA outputs named in ``keep`` stay on the device as OrtValues.
        """
        if self.device == "cpu":
            return dict(zip(self.output_names, self.session.run(None, dict(feeds)), strict=True))
        return self.bind({}).run(feeds, keep)  # CUDA IO binding (UNVERIFIED until run on a GPU)

    def bind(self, buffers: Mapping[str, tuple[str, Any]]) -> Binding:
        """An IO binding of this graph kept across runs, with ``buffers`` {input name: (output name, OrtValue)}
        bound to both the input and the output, so every run updates them in place (the fused decoder's KV
        cache). CPU and CUDA alike (CUDA UNVERIFIED)."""
        return Binding(self, buffers)


class Binding:
    """One IO binding of a graph for a series of runs (``OrtGraph.bind``): the shared buffers are bound once
    (a request's 48 cache buffers, both ways), each run binds only its own feeds and outputs. ONNX Runtime
    copies nothing when a bound input and output are the same memory."""

    def __init__(self, graph: OrtGraph, buffers: Mapping[str, tuple[str, Any]]) -> None:
        self.graph = graph
        self.io = graph.session.io_binding()
        for name, (output, buffer) in buffers.items():
            self.io.bind_ortvalue_input(name, buffer)
            self.io.bind_ortvalue_output(output, buffer)
        self.shared = len(buffers)
        shared = {output for output, _ in buffers.values()}
        self.others = [name for name in graph.output_names if name not in shared]
        self.dtypes = {o.name: ORT_DTYPES.get(o.type) for o in graph.session.get_outputs()}

    def run(
        self, feeds: Mapping[str, Any], keep: Collection[str] = (), shapes: Mapping[str, Sequence[int]] | None = None
    ) -> dict[str, Any]:
        """Run with ``feeds`` (numpy arrays or device OrtValues) -> the outputs that are not shared buffers: numpy,
        or OrtValues on the device for names in ``keep``. An output whose shape ``shapes`` gives is written
        straight into a new numpy array; when all are, the run reads nothing back from the binding (which
        would wrap every bound output, the 48 buffers included: 0.25 ms of a 20 ms int4 step)."""
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                self.io.bind_ortvalue_input(name, value)
            else:
                self.io.bind_cpu_input(name, np.ascontiguousarray(value))
        direct = {}
        for name in self.others:  # a fresh output at every run: the caller keeps the last one
            shape = (shapes or {}).get(name)
            if shape is not None and name not in keep and self.dtypes[name] is not None:
                direct[name] = array = np.empty(tuple(shape), self.dtypes[name])
                self.io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            else:
                self.io.bind_output(name, self.graph.device if name in keep else "cpu")
        self.graph.session.run_with_iobinding(self.io)
        if len(direct) == len(self.others):
            return direct
        values = self.io.get_outputs()[self.shared :]  # in binding order: the buffers first, then the others
        read = {name: value if name in keep else value.numpy() for name, value in zip(self.others, values, strict=True)}
        return {**read, **direct}


@dataclass(frozen=True)
class OrtBackend:
    """The loaded graphs by name, the requested provider and the providers ORT really activated."""

    graphs: dict[str, OrtGraph]
    provider: str
    active_providers: tuple[str, ...]

    @property
    def device(self) -> str:
        return _device(self.active_providers)

    def buffer(self, values: np.ndarray) -> ort.OrtValue:
        """A buffer owned by ONNX Runtime on this backend's device, holding ``values`` (the fused decoder's
        in-place KV cache). Not ``ortvalue_from_numpy``: that OrtValue does not keep its array alive, and the
        freed memory gets reused under it. CUDA UNVERIFIED."""
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(values.shape), values.dtype, self.device, 0)
        value.update_inplace(np.ascontiguousarray(values))
        return value


def _device(active: Sequence[str]) -> str:
    return "cuda" if active and active[0] in (TENSORRT, CUDA) else "cpu"


def load_backend(
    directory: Path,
    manifest: Mapping[str, Any],
    provider: str = "auto",
    *,
    intra_op_threads: int | None = None,
    profile_limits: ProfileLimits | None = None,
) -> OrtBackend:
    """Create one session per graph of the (already verified) export in ``directory``.

    Checks the manifest's IR version and opset first; external data resolves next to each ``.onnx`` file.
    """
    check_model_versions(int(manifest["ir_version"]), int(manifest["opset"]), where=str(directory / "manifest.json"))
    chain = resolve_providers(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fallbacks are checked below, not logged as warnings
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise UsageError(f"intra_op_threads must be >= 1, found {intra_op_threads}", where="Owl3Session")
        options.intra_op_num_threads = intra_op_threads
    for key, value in session_config(manifest.get("flavour")).items():
        options.add_session_config_entry(key, value)
    profiles = {}
    if TENSORRT in chain and profile_limits is not None:  # the TensorRT EP's explicit shapes, per graph
        compute = manifest.get("compute") or manifest["precision"]
        config = Owl3Config.from_hf_json(manifest["config"])
        profiles = graph_profiles(config, compute, profile_limits, bool(manifest.get("fused")))
    sessions = {}
    for name, graph in manifest["graphs"].items():
        path = directory / graph["file"]
        entries = _provider_entries(chain, manifest, profiles.get(name))
        try:
            sessions[name] = ort.InferenceSession(str(path), options, providers=entries)
        except _LOAD_ERRORS as exc:
            raise translate_load_error(exc, path) from exc
    active = tuple(next(iter(sessions.values())).get_providers()) if sessions else (CPU,)
    if provider in ("cuda", "tensorrt") and active[0] != _PROVIDER_NAMES[provider]:
        raise EnvironmentProblem(
            f"{_PROVIDER_NAMES[provider]} is installed but did not start; onnxruntime fell back to {list(active)}",
            where="onnxruntime",
            fix="install the CUDA and cuDNN (and TensorRT) versions this onnxruntime-gpu was built for, "
            "or use --provider cpu",
        )
    graphs = {name: OrtGraph(name, session, _device(active)) for name, session in sessions.items()}
    return OrtBackend(graphs=graphs, provider=provider, active_providers=active)
