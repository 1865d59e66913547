"""Trace one graph wrapper to ONNX, with a single external-data file when it passes 2 GB."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # stay clear of protobuf's hard 2 GiB ceiling


def trace_to_onnx(module, feeds: dict[str, np.ndarray], inputs, outputs, axes, scratch: Path) -> Path:
    """Trace `module` into `scratch`/graph.onnx (the tracer may write one file per tensor there).

    The legacy tracer is used on purpose: the wrappers take every shape-dependent index as an input,
    so nothing about the example is baked in, and it accepts `dynamic_axes` (docs/design.md "The graphs").
    """
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in inputs)
    traced = scratch / "graph.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(traced), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return traced


def finalize_onnx(traced: Path, dest: Path, metadata: dict[str, str]) -> str | None:
    """Copy a traced graph to `dest` with metadata; one external-data file when over 2 GB.

    Call it after the torch module is released: it loads the whole graph. Returns the data file name.
    """
    import onnx

    size = sum(os.path.getsize(p) for p in traced.parent.iterdir())
    return save_graph(onnx.load(str(traced), load_external_data=True), dest, metadata, size)


def set_metadata(model, metadata: dict[str, str]) -> None:
    """Set `model`'s metadata properties (a key already there is replaced)."""
    for key, value in metadata.items():
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def save_graph(model, dest: Path, metadata: dict[str, str], size: int) -> str | None:
    """Write `model` at `dest` with `metadata` (a key already there is replaced), its weights in one external-data
    file `dest.name + ".data"` when `size` (bytes) passes the protobuf limit. Returns that file's name, or None."""
    import onnx

    set_metadata(model, metadata)
    if size <= PROTOBUF_LIMIT:
        onnx.save_model(model, str(dest))
        return None
    data_name = dest.name + ".data"
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    return data_name


class DataWriter:
    """One external-data file, written as tensors come: each tensor's bytes are appended (page-aligned, so the file
    maps well) and the tensor is pointed at them. A graph of any size is written this way with one tensor in memory
    at a time (the low-memory export, the fast decoder's builder, the weight-by-weight quantizer)."""

    ALIGN = 4096
    MIN_BYTES = 1024  # smaller tensors stay inline in the graph

    def __init__(self, path: Path):
        self.path, self.f, self.offset, self.tensors = Path(path), open(path, "wb"), 0, []

    def _append(self, tensor, raw) -> None:
        from onnx import TensorProto

        pad = -self.offset % self.ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        self.f.write(raw)
        del tensor.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        self.offset += len(raw)

    def put(self, tensor) -> None:
        """Move `tensor`'s raw_data to the file (in place); a tensor under MIN_BYTES keeps its data inline."""
        raw = tensor.raw_data  # one read: each read of a protobuf bytes field is a copy
        if len(raw) >= self.MIN_BYTES:
            self._append(tensor, raw)

    def take(self, graph) -> None:
        """put() every initializer of `graph`."""
        for init in graph.initializer:
            self.put(init)

    def add(self, name: str, array: np.ndarray):
        """A new fp32 external tensor `name` holding `array`, kept in self.tensors; returns the name."""
        from onnx import TensorProto

        array = np.ascontiguousarray(array, dtype=np.float32)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
        self._append(tensor, array.tobytes())
        self.tensors.append(tensor)
        return name

    def close(self) -> None:
        self.f.close()


def run_onnx(path: Path, feeds_list: list[dict], threads: int = 0) -> list[list[np.ndarray]]:
    """Run a graph on CPU once per feed dict."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, feeds) for feeds in feeds_list]
