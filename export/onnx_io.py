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
    so nothing about the example is baked in, and it accepts `dynamic_axes` (DESIGN section 4).
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


def save_graph(model, dest: Path, metadata: dict[str, str], size: int) -> str | None:
    """Write `model` at `dest` with `metadata` (a key already there is replaced), its weights in one external-data
    file `dest.name + ".data"` when `size` (bytes) passes the protobuf limit. Returns that file's name, or None."""
    import onnx

    for key, value in metadata.items():
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    if size <= PROTOBUF_LIMIT:
        onnx.save_model(model, str(dest))
        return None
    data_name = dest.name + ".data"
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    return data_name


def run_onnx(path: Path, feeds_list: list[dict], threads: int = 0) -> list[list[np.ndarray]]:
    """Run a graph on CPU once per feed dict."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, feeds) for feeds in feeds_list]
