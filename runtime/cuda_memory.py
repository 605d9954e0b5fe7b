"""Device memory for the TensorRT engine backend, through cuda-python (imported lazily; no torch).

UNVERIFIED on a GPU: no GPU exists where this was written. ``Cuda`` wraps the few CUDA runtime calls the
backend makes (``cudaMalloc``, ``cudaFree``, ``cudaMemcpy(Async)``, streams) and checks each one: cuda-python
returns ``(error, *results)`` instead of raising. Its logic is tested here with a host-memory stand-in of the
same calls; only the real ``cudart`` needs a GPU.

``DeviceTensor`` is an output left on the device (``keep``): the decoder's present K/V, the visual K/V. It is
fed back as an input without a copy, converts to numpy on demand (``numpy()``, ``np.asarray``) and is freed
when it is garbage collected. An empty tensor (a past length of 0, no visual memory) owns no memory.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np

from owl3.errors import EnvironmentProblem, ResourceError

CUDA_PYTHON_FIX = (
    "pip install cuda-python with the CUDA major version of this device (12 on JetPack 6 / TensorRT 10, "
    "13 on JetPack 7 / TensorRT 11), e.g. pip install 'cuda-python>=12,<13'"
)


def import_cudart() -> Any:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise EnvironmentProblem(
                f"cuda-python cannot be imported ({exc}); the TensorRT backend allocates device memory with it",
                where="owl3.runtime (TensorRT engines)",
                fix=CUDA_PYTHON_FIX,
            ) from exc
    return cudart


class Cuda:
    """Checked CUDA runtime calls. ``cudart`` is cuda-python's runtime module (or a stand-in with its API)."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart
        self._success = cudart.cudaError_t.cudaSuccess
        self._out_of_memory = getattr(cudart.cudaError_t, "cudaErrorMemoryAllocation", None)

    def _check(self, call: str, result: tuple[Any, ...]) -> Any:
        error, *values = result
        if error == self._success:
            return values[0] if len(values) == 1 else None
        if error == self._out_of_memory:
            raise ResourceError(
                f"CUDA could not allocate device memory ({call}: {error})",
                where="owl3.runtime (TensorRT engines)",
                fix="send smaller requests, run fewer at once, or rebuild the engines with smaller limits",
            )
        raise EnvironmentProblem(
            f"CUDA call {call} failed: {error}",
            where="owl3.runtime (TensorRT engines)",
            fix="check the GPU (nvidia-smi / tegrastats) and that cuda-python matches the driver's CUDA version",
        )

    def malloc(self, nbytes: int) -> int:
        return int(self._check("cudaMalloc", self.rt.cudaMalloc(nbytes)))

    def free(self, pointer: int) -> None:
        self._check("cudaFree", self.rt.cudaFree(pointer))

    def stream(self) -> Any:
        return self._check("cudaStreamCreate", self.rt.cudaStreamCreate())

    def synchronize(self, stream: Any) -> None:
        self._check("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def to_device(self, pointer: int, array: np.ndarray, stream: Any) -> None:
        """Queue a copy of the contiguous ``array`` to ``pointer``; keep ``array`` alive until the stream syncs."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream))

    def to_host(self, array: np.ndarray, pointer: int, stream: Any | None = None) -> None:
        """Copy ``pointer`` into the contiguous ``array``: queued on ``stream``, or at once without one."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if stream is None:
            self._check("cudaMemcpy", self.rt.cudaMemcpy(array.ctypes.data, pointer, array.nbytes, kind))
        else:
            self._check("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind,
                                                                   stream))  # fmt: skip


class DeviceTensor:
    """A tensor in device memory: ``shape``, ``dtype``, ``pointer`` (0 when empty). Freed when collected."""

    def __init__(self, cuda: Cuda, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self._cuda = cuda
        self.pointer = cuda.malloc(self.nbytes) if self.nbytes else 0
        self._finalizer = weakref.finalize(self, cuda.free, self.pointer) if self.pointer else None
        if self._finalizer is not None:
            self._finalizer.atexit = False  # the process's exit releases device memory; CUDA may be gone by then

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def free(self) -> None:
        """Release the memory now (a temporary of one call); the tensor must not be used afterwards."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer, self.pointer = None, 0

    def numpy(self) -> np.ndarray:
        """A host copy (waits for the copy)."""
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            self._cuda.to_host(out, self.pointer)
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"DeviceTensor(shape={list(self.shape)}, dtype={self.dtype.name})"
