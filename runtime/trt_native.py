"""EXPERIMENTAL, never run: no GPU has run this module (docs/gpu.md "Jetson and GPU"). A native TensorRT backend behind
the backend seam (`GraphSession`): the plans `build-engines --native` writes, run through TensorRT's Python API,
with device buffers from cuda-python and the decoder's KV cache kept on the device between runs (`run_device`).

It is selected with `--provider tensorrt-native` (SessionOptions.providers = ("TensorrtNative",)); open_bundle
checks the plans' engine key exactly as for onnxruntime's TensorRT provider. Not done: CUDA graphs for the decode
steps (worth measuring on a device first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cuda import require_cuda_runtime
from .errors import GpuError

NAME = "TensorrtNative"


def _check(result, what: str):
    """cuda-python calls return (error, value...); GpuError unless the error is cudaSuccess."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise GpuError(f"CUDA {what} failed: error {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


class DeviceArray:
    """A tensor in device memory, freed with the object: what `run_device` keeps (the KV cache). Its interface is
    the part of onnxruntime's OrtValue the decoder uses: shape(), data_type(), numpy()."""

    _TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
              np.dtype(np.int64): "tensor(int64)", np.dtype(np.int32): "tensor(int32)"}

    def __init__(self, shape, dtype, stream):
        self.cudart = require_cuda_runtime()
        self._shape, self.dtype, self.stream = tuple(int(d) for d in shape), np.dtype(dtype), stream
        self.nbytes_ = int(np.prod(self._shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = _check(self.cudart.cudaMalloc(max(self.nbytes_, 1)), "cudaMalloc")

    @classmethod
    def from_numpy(cls, array: np.ndarray, stream) -> DeviceArray:
        array = np.ascontiguousarray(array)
        out = cls(array.shape, array.dtype, stream)
        if out.nbytes_:
            kind = out.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            _check(out.cudart.cudaMemcpyAsync(out.ptr, array.ctypes.data, out.nbytes_, kind, stream), "copy to device")
            _check(out.cudart.cudaStreamSynchronize(stream), "stream sync")  # `array` may go once this returns
        return out

    def shape(self) -> list[int]:
        return list(self._shape)

    def data_type(self) -> str:
        return self._TYPES[self.dtype]

    def numpy(self) -> np.ndarray:
        out = np.empty(self._shape, self.dtype)
        if self.nbytes_:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes_, kind, self.stream),
                   "copy to host")
            _check(self.cudart.cudaStreamSynchronize(self.stream), "stream sync")
        return out

    def __del__(self):
        ptr = getattr(self, "ptr", None)
        if ptr:
            self.cudart.cudaFree(ptr)


class TrtSession:
    """One TensorRT plan behind `GraphSession`: run (arrays in and out), run_device (outputs left on the device)."""

    def __init__(self, plan: Path, name: str, device_id: int = 0):
        import tensorrt as trt

        cudart = require_cuda_runtime()
        _check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self.trt, self.cudart, self.name = trt, cudart, name
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:  # a plan from another TensorRT build or GPU: TensorRT logs why
            raise GpuError(f"{plan}: TensorRT could not load this plan (built by another TensorRT or for another "
                           "GPU?); run build-engines --native --rebuild")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.device, self.device_id = "cuda", device_id

    @property
    def providers(self) -> list[str]:
        return [NAME]

    def _execute(self, inputs: dict) -> dict[str, DeviceArray]:
        keep = []  # device copies of host inputs, alive until the run has finished
        for name in self.input_names:
            value = inputs[name]
            if not isinstance(value, DeviceArray):
                value = DeviceArray.from_numpy(np.asarray(value, self.dtypes[name]), self.stream)
                keep.append(value)
            self.context.set_input_shape(name, value.shape())
            self.context.set_tensor_address(name, value.ptr)
        outputs = {}
        for name in self.output_names:
            outputs[name] = DeviceArray(tuple(self.context.get_tensor_shape(name)), self.dtypes[name], self.stream)
            self.context.set_tensor_address(name, outputs[name].ptr)
        if not self.context.execute_async_v3(self.stream):
            raise GpuError(f"{self.name}: TensorRT could not run the plan (its log says why)")
        _check(self.cudart.cudaStreamSynchronize(self.stream), "stream sync")
        del keep
        return outputs

    def run(self, feeds, outputs=None, run_options=None) -> dict[str, np.ndarray]:
        got = self._execute(dict(feeds))
        return {n: got[n].numpy() for n in (outputs or self.output_names)}

    def run_device(self, inputs, host_outputs, device_outputs, run_options=None) -> tuple[dict, dict]:
        got = self._execute(dict(inputs))
        return {n: got[n].numpy() for n in host_outputs}, {n: got[n] for n in device_outputs}

    def buffer(self, array):
        raise GpuError("the native TensorRT backend has no in-place buffers: it runs the standard decoder")

    def run_bound(self, inputs, outputs, run_options=None):
        raise GpuError("the native TensorRT backend has no in-place buffers: it runs the standard decoder")
