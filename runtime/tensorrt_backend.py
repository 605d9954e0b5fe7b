"""TensorRT engines (``owl3-export build-engine``) behind the interface of the ONNX Runtime backend.

``load_engine_backend`` returns a ``TrtBackend`` whose ``graphs`` answer ``run(feeds, keep)`` as ``OrtGraph``
does, so ``Owl3Session(export_dir, engines=DIR)`` runs the same decoding loop on them. Before anything is
imported or deserialized it checks, without TensorRT: the engine manifest (schema, status, every file's size
and sha256), that the engines were built from *this* export's graphs (their sha256), and the plan headers
and the device (``engine_check.check_engines``: exit 4 saying what to rebuild, instead of TensorRT's "version
tag does not match"). Then it imports TensorRT and cuda-python (exit 4 with the install line when absent),
deserializes each plan and checks its I/O tensors (names, direction, dtype) against the export's graphs.

Execution (UNVERIFIED: written against the documented TensorRT 10.3 / 11.x Python API, never run; no GPU or
TensorRT exists where this was written): one ``IExecutionContext`` and CUDA stream per concurrent call, lent by
a small pool (created on demand up to ``max_contexts``, returned after each call); ``set_input_shape`` for
every input, output shapes from the context, device buffers, ``set_tensor_address``, ``execute_async_v3``.
Outputs named in ``keep`` stay on the device as ``DeviceTensor``s and are fed back without a copy (present
K/V -> next step's past, visual K/V -> every decoder step); the others come back as numpy. Empty tensors
(a past length of 0, no visual memory) own no memory and are bound to distinct non-null addresses, as
TensorRT requires for empty bindings. Shapes outside the engine's optimization profile are refused before
TensorRT sees them.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from owl3.artifacts import ArtifactError, verify_files
from owl3.errors import EnvironmentProblem, PromptError, UsageError
from owl3.runtime.cuda_memory import Cuda, DeviceTensor, import_cudart
from owl3.runtime.engine_check import Device, check_engines, read_engines
from owl3.runtime.profiles import ProfileLimits
from owl3.runtime.request import RequestLimits

DEFAULT_MAX_CONTEXTS = 2  # each context holds activation memory sized for the profile's maximum shapes
EMPTY_STRIDE = 256  # bytes between the addresses bound to empty tensors (TensorRT's alignment)
TENSORRT_FIX = (
    "on a Jetson TensorRT comes with JetPack (python3-libnvinfer; a venv needs --system-site-packages); "
    "on x86: pip install tensorrt-cu12 (or -cu13), the version the engines were built with"
)
T = TypeVar("T")


# ---- the engine directory, checked without TensorRT ------------------------------------------------------


def io_mismatches(engine_io: Mapping[str, tuple[bool, str]], graph: Mapping[str, Any]) -> list[str]:
    """How an engine's I/O tensors ({name: (is_input, numpy dtype name)}) differ from the export's graph entry
    (its ``inputs`` / ``outputs``: name, dtype, shape)."""
    expected = {t["name"]: (True, t["dtype"]) for t in graph["inputs"]}
    expected.update({t["name"]: (False, t["dtype"]) for t in graph["outputs"]})
    problems = []
    if set(engine_io) != set(expected):
        missing, extra = sorted(set(expected) - set(engine_io)), sorted(set(engine_io) - set(expected))
        problems.append(f"tensors missing from the engine {missing}, unexpected {extra}")
    for name in sorted(set(engine_io) & set(expected)):
        (is_input, dtype), (want_input, want_dtype) = engine_io[name], expected[name]
        if is_input != want_input:
            problems.append(f"{name} is an {'input' if is_input else 'output'} of the engine, not of the graph")
        elif dtype != want_dtype:
            problems.append(f"{name} is {dtype} in the engine, {want_dtype} in the graph")
    return problems


def outside_profile(shapes: Mapping[str, tuple[int, ...]], profile: Mapping[str, Sequence[Sequence[int]]]) -> list[str]:
    """The inputs whose shape lies outside the engine's optimization profile ({name: [min, opt, max]})."""
    problems = []
    for name, (low, _opt, high) in profile.items():
        shape = shapes.get(name)
        if shape is None:
            continue
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
            problems.append(f"{name} {list(shape)} (the engine takes {list(low)} to {list(high)})")
    return problems


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise EnvironmentProblem(
            f"TensorRT cannot be imported ({exc}); the engines run only where TensorRT is installed",
            where="owl3.runtime (TensorRT engines)",
            fix=TENSORRT_FIX,
        ) from exc
    return tensorrt


# ---- execution contexts ----------------------------------------------------------------------------------


class ContextPool(Generic[T]):
    """Objects lent one per call (a TensorRT context with its stream): created on demand, at most ``limit``
    (a call waits for one to come back beyond that), reused after. Thread-safe."""

    def __init__(self, create: Callable[[], T], limit: int) -> None:
        if limit < 1:
            raise UsageError(f"max_contexts must be >= 1, found {limit}", where="TensorRT backend")
        self._create, self.limit = create, limit
        self._idle: list[T] = []
        self.created = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def lease(self) -> Iterator[T]:
        item = self._acquire()
        try:
            yield item
        finally:
            with self._changed:
                self._idle.append(item)
                self._changed.notify()

    def _acquire(self) -> T:
        with self._changed:
            while not self._idle and self.created >= self.limit:
                self._changed.wait()
            if self._idle:
                return self._idle.pop()
            self.created += 1
        try:
            return self._create()  # outside the lock: a context allocates device memory
        except BaseException:
            with self._changed:
                self.created -= 1
                self._changed.notify()
            raise


@dataclass
class _Slot:
    context: Any  # trt.IExecutionContext
    stream: Any  # cudaStream_t


# ---- graphs ----------------------------------------------------------------------------------------------


class TrtGraph:
    """One engine. ``trt`` is the tensorrt module, ``cuda`` the checked CUDA calls; ``profile`` the engine's
    optimization profile from its manifest ({input: [min, opt, max]})."""

    device = "cuda"

    def __init__(
        self,
        name: str,
        engine: Any,
        trt: Any,
        cuda: Cuda,
        profile: Mapping[str, Sequence[Sequence[int]]],
        max_contexts: int = DEFAULT_MAX_CONTEXTS,
    ) -> None:
        self.name, self.engine, self.cuda, self.profile = name, engine, cuda, dict(profile)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.io = {n: (is_input[n], self.dtypes[n].name) for n in names}
        # distinct, aligned, non-null addresses for empty tensors (never read or written)
        self._empty = DeviceTensor(cuda, (EMPTY_STRIDE * max(1, len(names)),), np.dtype(np.uint8))
        self._slot = {n: i for i, n in enumerate(names)}
        self.pool: ContextPool[_Slot] = ContextPool(self._new_slot, max_contexts)

    def _new_slot(self) -> _Slot:
        context = self.engine.create_execution_context()
        if context is None:
            raise EnvironmentProblem(
                f"TensorRT could not create an execution context for the {self.name} engine (see its log)",
                where=self.name,
                fix="free GPU memory (other processes, fewer concurrent requests) or rebuild with smaller limits",
            )
        return _Slot(context, self.cuda.stream())

    def check_signature(self, inputs: Sequence[str], outputs: Sequence[str], where: str) -> None:
        """ArtifactError when the engine's tensors are not the spec's (TensorRT binds by name: order is free)."""
        if sorted(inputs) != sorted(self.input_names) or sorted(outputs) != sorted(self.output_names):
            raise ArtifactError(
                f"engine {self.name} has inputs {self.input_names} and outputs {self.output_names}, "
                f"expected {list(inputs)} and {list(outputs)}",
                where=where,
                fix="build the engines again from this export (owl3-export build-engine)",
            )

    def _address(self, name: str, pointer: int) -> int:
        return pointer or self._empty.pointer + EMPTY_STRIDE * self._slot[name]

    def run(self, feeds: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
        """Run with ``feeds`` (numpy, or DeviceTensors of an earlier ``keep``) -> outputs by name: numpy, or
        DeviceTensor for names in ``keep``. Refuses feeds the engine's profile does not cover."""
        if set(feeds) != set(self.input_names):
            raise UsageError(
                f"the {self.name} engine takes {sorted(self.input_names)}, was given {sorted(feeds)}",
                where=self.name,
            )
        wrong = [f"{n} must be {self.dtypes[n].name}, found {np.dtype(v.dtype).name}" for n, v in feeds.items()
                 if np.dtype(v.dtype) != self.dtypes[n]]  # fmt: skip
        if wrong:
            raise UsageError("; ".join(wrong), where=self.name)
        shapes = {name: tuple(int(d) for d in value.shape) for name, value in feeds.items()}
        problems = outside_profile(shapes, self.profile)
        if problems:
            raise PromptError(
                f"the request needs shapes the {self.name} engine was not built for: " + "; ".join(problems),
                where=self.name,
                fix="send a smaller request, or rebuild the engines with larger limits "
                "(owl3-export build-engine --max-batch / --max-images / --max-context)",
            )
        with self.pool.lease() as slot:
            return self._execute(slot, feeds, shapes, keep)

    def _execute(
        self, slot: _Slot, feeds: Mapping[str, Any], shapes: dict[str, tuple[int, ...]], keep: Collection[str]
    ) -> dict[str, Any]:
        context, stream = slot.context, slot.stream
        temporaries: list[DeviceTensor] = []  # freed after the call
        hosts: list[np.ndarray] = []  # kept alive until the stream is synchronized
        try:
            for name in self.input_names:
                pointer = self._bind_input(feeds[name], stream, temporaries, hosts)
                if not context.set_input_shape(name, shapes[name]):
                    raise UsageError(f"TensorRT refused shape {list(shapes[name])} for {name}", where=self.name)
                context.set_tensor_address(name, self._address(name, pointer))
            outputs = {}
            for name in self.output_names:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ArtifactError(f"the {self.name} engine leaves the shape of {name} unknown {list(shape)}",
                                        where=self.name, fix="export and build again")  # fmt: skip
                outputs[name] = DeviceTensor(self.cuda, shape, self.dtypes[name])
                context.set_tensor_address(name, self._address(name, outputs[name].pointer))
            if not context.execute_async_v3(int(stream)):
                raise EnvironmentProblem(
                    f"TensorRT failed to run the {self.name} engine (see its log)",
                    where=self.name,
                    fix="report the log; run on ONNX Runtime (without --engines) meanwhile",
                )
            results: dict[str, Any] = {}
            for name, tensor in outputs.items():
                if name in keep:
                    results[name] = tensor
                    continue
                results[name] = np.empty(tensor.shape, tensor.dtype)
                if tensor.nbytes:
                    self.cuda.to_host(results[name], tensor.pointer, stream)
                temporaries.append(tensor)
            return results
        finally:
            self.cuda.synchronize(stream)  # before any buffer of this call is freed or read
            for tensor in temporaries:
                tensor.free()

    def _bind_input(self, value: Any, stream: Any, temporaries: list[DeviceTensor], hosts: list[np.ndarray]) -> int:
        """The device pointer holding ``value`` (0 when empty): a DeviceTensor as is, numpy copied over."""
        if isinstance(value, DeviceTensor):
            return value.pointer
        array = np.ascontiguousarray(value)
        tensor = DeviceTensor(self.cuda, array.shape, array.dtype)
        temporaries.append(tensor)
        if tensor.nbytes:
            hosts.append(array)
            self.cuda.to_device(tensor.pointer, array, stream)
        return tensor.pointer


@dataclass(frozen=True)
class TrtBackend:
    """The engines by graph name; ``limits``: what their profiles cover; ``active_providers`` names TensorRT."""

    graphs: dict[str, TrtGraph]
    provider: str
    active_providers: tuple[str, ...]
    limits: ProfileLimits
    directory: Path
    runtime: Any = field(default=None, repr=False)  # trt.Runtime: must outlive its engines

    @property
    def device(self) -> str:
        return "cuda"

    def cover(self, limits: RequestLimits) -> RequestLimits:
        """``limits`` narrowed to what the engines' profiles accept, so requests beyond are refused up front."""
        return RequestLimits(
            min(limits.max_images, self.limits.max_images),
            min(limits.max_visual_tokens, self.limits.max_visual_tokens),
            min(limits.max_context, self.limits.max_context),
        )


# ---- loading ---------------------------------------------------------------------------------------------


def load_engine_backend(
    engine_dir: str | Path,
    export_manifest: Mapping[str, Any],
    export_dir: str | Path,
    provider: str = "auto",
    *,
    verify: str = "full",
    device: Device | None = None,
    max_contexts: int = DEFAULT_MAX_CONTEXTS,
) -> TrtBackend:
    """The engines of ``engine_dir``, built by ``owl3-export build-engine`` from the export ``export_dir``
    (whose verified manifest is ``export_manifest``). ``provider`` must be "auto" or "tensorrt"; ``device``
    (default: this machine) is what the engines are checked against. See the module docstring."""
    engine_dir, export_dir = Path(engine_dir), Path(export_dir)
    if provider not in ("auto", "tensorrt"):
        raise UsageError(
            f"engines run on TensorRT, but provider {provider!r} was asked for",
            where="--engines",
            fix="omit --provider (or pass tensorrt) with --engines, or drop --engines to use ONNX Runtime",
        )
    if export_manifest.get("fused"):
        raise UsageError(
            "this export runs ONNX Runtime's fused operators (the ort flavour); TensorRT engines are built from "
            "the tensorrt flavour",
            where=str(export_dir),
            fix="export with --target tensorrt and build the engines from that export",
        )
    manifest = read_engines(engine_dir, export_manifest, export_dir)
    check_engines(manifest, engine_dir, device)  # plan headers, TensorRT version, GPU, L4T: nothing imported yet
    verify_files(engine_dir, manifest, hashes=verify == "full")
    trt = import_tensorrt()
    cuda = Cuda(import_cudart())
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    graphs = {}
    for name, entry in manifest["engines"].items():
        engine = deserialize(runtime, engine_dir / entry["file"])
        graph = TrtGraph(name, engine, trt, cuda, manifest.get("profiles", {}).get(name, {}), max_contexts)
        problems = io_mismatches(graph.io, export_manifest["graphs"][name])
        if problems:
            raise ArtifactError(
                f"the {name} engine's tensors differ from the export's graph: " + "; ".join(problems),
                where=str(engine_dir / entry["file"]),
                fix=f"build the engines again from this export: owl3-export build-engine {export_dir} --force "
                f"--output {engine_dir}",
            )
        graphs[name] = graph
    return TrtBackend(graphs, provider, (f"TensorRT {trt.__version__}",), ProfileLimits(**manifest["limits"]),
                      engine_dir, runtime)  # fmt: skip


def deserialize(runtime: Any, plan: Path) -> Any:
    """UNVERIFIED: deserialize a plan from a read-only memory map (no second copy of a multi-GB plan in RAM,
    which matters on Jetson's shared memory); a binding that refuses the map gets the bytes instead."""
    with open(plan, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        try:
            engine = runtime.deserialize_cuda_engine(mapped)
        except TypeError:
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise EnvironmentProblem(
            "TensorRT could not deserialize the engine although its version and device match (see its log)",
            where=str(plan),
            fix="rebuild the engines on this device (owl3-export build-engine EXPORT_DIR --output DIR --force)",
        )
    return engine
