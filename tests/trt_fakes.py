"""Stand-ins for cuda-python's runtime and TensorRT's Python API, for testing the engine backend's own logic.

They implement only the calls ``owl3.runtime.tensorrt_backend`` and ``cuda_memory`` make, as documented, and
prove nothing about TensorRT itself: they let the tests check the bookkeeping around it (buffers, copies,
kept outputs fed back, empty tensors, contexts, the checks before loading) with real memory and real numbers.

- ``FakeCudart``: "device" memory is host memory; every copy checks that the device side lies inside a live
  allocation (a use after free or an overrun fails the test), and counts host-to-device bytes.
- ``OrtEngine``: an "engine" that computes its ONNX graph with ONNX Runtime CPU, reading its inputs from and
  writing its outputs to the addresses bound with ``set_tensor_address`` (all must be distinct and non-null,
  as TensorRT requires). Output shapes are known once the input shapes and data are bound.
- ``fake_tensorrt(version)``: a module-like object with ``Runtime``, ``Logger``, ``TensorIOMode``, ``nptype``;
  its runtime deserializes plans written by ``fake_plan`` (a real plan header, then the ONNX path).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from owl3.runtime.engine_check import PLAN_TAG

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class FakeCudart:
    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, capacity: int | None = None) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.capacity = capacity
        self.copied_to_device = 0
        self.calls: Counter[str] = Counter()
        self._streams = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def allocated(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def cudaMalloc(self, nbytes: int) -> tuple[Any, ...]:
        with self._lock:
            self.calls["cudaMalloc"] += 1
            if nbytes <= 0 or (self.capacity is not None and self.allocated + nbytes > self.capacity):
                return (self.cudaError_t.cudaErrorMemoryAllocation, 0)
            buffer = np.zeros(nbytes, np.uint8)
            self.buffers[buffer.ctypes.data] = buffer
            return (self.cudaError_t.cudaSuccess, buffer.ctypes.data)

    def cudaFree(self, pointer: int) -> tuple[Any, ...]:
        with self._lock:
            self.calls["cudaFree"] += 1
            if self.buffers.pop(pointer, None) is None:
                return (self.cudaError_t.cudaErrorInvalidValue,)
            return (self.cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self) -> tuple[Any, ...]:
        return (self.cudaError_t.cudaSuccess, next(self._streams))

    def cudaStreamSynchronize(self, stream: Any) -> tuple[Any, ...]:
        return (self.cudaError_t.cudaSuccess,)

    def inside(self, pointer: int, nbytes: int) -> bool:
        with self._lock:
            return any(start <= pointer and pointer + nbytes <= start + b.nbytes for start, b in self.buffers.items())

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> tuple[Any, ...]:
        return self.cudaMemcpy(dst, src, nbytes, kind)

    def cudaMemcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> tuple[Any, ...]:
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if not self.inside(device, nbytes):
            return (self.cudaError_t.cudaErrorInvalidValue,)
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.copied_to_device += nbytes
        ctypes.memmove(dst, src, nbytes)
        return (self.cudaError_t.cudaSuccess,)


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class OrtEngine:
    """A graph computed by ONNX Runtime CPU behind the engine API (tensor names, modes, dtypes, contexts)."""

    def __init__(self, path: Path, cudart: FakeCudart) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.cudart = cudart
        self.modes = {i.name: TensorIOMode.INPUT for i in self.session.get_inputs()}
        self.modes.update({o.name: TensorIOMode.OUTPUT for o in self.session.get_outputs()})
        values = [*self.session.get_inputs(), *self.session.get_outputs()]
        self.dtypes = {v.name: np.dtype(_ORT_TYPES[v.type]) for v in values}
        self.names = list(self.modes)
        self.contexts = 0

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.modes[name]

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return self.dtypes[name]

    def create_execution_context(self) -> OrtContext:
        self.contexts += 1
        return OrtContext(self)


class OrtContext:
    def __init__(self, engine: OrtEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.outputs: dict[str, np.ndarray] | None = None

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name], self.outputs = tuple(shape), None
        return self.engine.modes.get(name) == TensorIOMode.INPUT

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        assert pointer, f"{name} bound to a null pointer"
        self.addresses[name] = pointer
        return True

    def _read(self, name: str) -> np.ndarray:
        shape, dtype = self.shapes[name], self.engine.dtypes[name]
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype)
        pointer = self.addresses[name]
        assert self.engine.cudart.inside(pointer, nbytes), f"{name} is not in live device memory"
        return np.frombuffer((ctypes.c_char * nbytes).from_address(pointer), dtype).reshape(shape).copy()

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.outputs is None:
            inputs = {n: self._read(n) for n, mode in self.engine.modes.items() if mode == TensorIOMode.INPUT}
            values = self.engine.session.run(None, inputs)
            self.outputs = dict(zip([o.name for o in self.engine.session.get_outputs()], values, strict=True))
        return self.outputs[name].shape

    def execute_async_v3(self, stream: int) -> bool:
        assert isinstance(stream, int) and self.outputs is not None
        bound = [self.addresses[n] for n in self.engine.names]
        assert len(set(bound)) == len(bound), "two tensors bound to one address"
        for name, value in self.outputs.items():
            array = np.ascontiguousarray(value)
            if array.nbytes:
                assert self.engine.cudart.inside(self.addresses[name], array.nbytes), f"{name} overruns its buffer"
                ctypes.memmove(self.addresses[name], array.ctypes.data, array.nbytes)
        return True


def fake_plan(onnx_path: Path, version: tuple[int, int, int, int] = (10, 3, 0, 26)) -> bytes:
    """A plan file's bytes: the real header (tag, version at bytes 24-27), then the ONNX path it stands for."""
    return PLAN_TAG.to_bytes(4, "little") + bytes(20) + bytes(version) + str(onnx_path).encode()


def fake_tensorrt(cudart: FakeCudart, version: str = "10.3.0.26") -> SimpleNamespace:
    """The tensorrt module as the backend uses it; ``runtimes`` records the engines it deserialized."""
    deserialized: list[OrtEngine] = []

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: Any) -> OrtEngine:
            engine = OrtEngine(Path(bytes(plan[28:]).decode()), cudart)
            deserialized.append(engine)
            return engine

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    return SimpleNamespace(
        __version__=version, Runtime=Runtime, Logger=Logger, TensorIOMode=TensorIOMode,
        nptype=lambda dtype: dtype, deserialized=deserialized,
    )  # fmt: skip
