"""The machine probe: this machine's read bandwidth and float32 MatMul rate, measured with onnxruntime as the
bundle's graphs run, the upper bounds `analysis.bounds` holds every measured stage against."""

from __future__ import annotations

import os
import time

import numpy as np


def _ort_matmul(a_shape: tuple, weight: np.ndarray, threads: int):
    """A one-MatMul onnxruntime session whose right operand is a constant initializer, as every weight of a
    bundle's graphs is: onnxruntime may pre-pack it once at load, as it does for the decoder's weights, so the
    probe runs the same kernels the decoder does (a weight fed as a graph input is repacked on every call
    and understates the machine)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _best(fn, seconds: float, min_calls: int = 5) -> float:
    """Fastest of the calls made within `seconds` (at least `min_calls`), after one warm-up call."""
    fn()
    best, calls, end = float("inf"), 0, time.perf_counter() + seconds
    while calls < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return best


def probe(seconds: float = 1.0, threads: int | None = None) -> dict:
    """Upper bounds of this machine for the engine under test: memory read bandwidth and float32 MatMul rate,
    measured with onnxruntime on `threads` threads, with constant weights (initializers) as a bundle has.

    - bandwidth: a 1x4096 @ 4096x16384 MatMul (a 256 MiB weight, far beyond any cache), what a decode step does
      to each weight: read it once. Decode cannot run faster than weight bytes / this bandwidth.
    - compute: a 2048x2048 @ 2048x2048 MatMul (17 GFLOP a call). Prefill needs at least 2 FLOPs per weight per
      prompt token, so it cannot take less than those FLOPs / this rate.
    Each figure is the best of several calls; `analysis.bounds` flags any measured stage that beats them."""
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)

    def best_time(a: np.ndarray, weight: np.ndarray) -> float:  # the session (and its weight copy) dies here
        session = _ort_matmul(a.shape, weight, threads)
        return _best(lambda: session.run(None, {"a": a}), seconds / 2)

    big = rng.standard_normal((4096, 16384), dtype=np.float32)  # 256 MiB
    nbytes = big.nbytes
    t_bw = best_time(rng.standard_normal((1, 4096), dtype=np.float32), big)
    del big
    t_mm = best_time(rng.standard_normal((2048, 2048), dtype=np.float32),
                     rng.standard_normal((2048, 2048), dtype=np.float32))
    return {"bandwidth_gb_s": nbytes / t_bw / 1e9, "matmul_gflop_s": 2 * 2048**3 / t_mm / 1e9, "threads": threads,
            "method": "onnxruntime CPU, constant weights (initializers): read bandwidth from a 1x4096 @ 4096x16384 "
                      "(256 MiB) MatMul, FLOP/s from a 2048^3 MatMul; best of >= 5 calls"}
