"""Activation ranges for static INT8, one calibration input at a time, with the weights read where they lie.

onnxruntime's `quantize_static` calibrates in one step that holds the whole graph several times over: a copy with
shape inference, the augmented copy written out and opened in a session, each run's outputs kept until the end.
On `small`'s 2 GB standard decoder it was killed at 23.2 GiB (docs/precision.md, "On `small`"). Here the graph's structure,
without its weights, gets a ReduceMin and a ReduceMax on each tensor onnxruntime's MinMax calibrator would select,
as extra outputs; onnxruntime opens that structure with its weights read from the source's own data file, runs one
input, and the running min/max keeps two numbers per tensor. The ranges are then handed to `quantize_static` as its
calibration cache, so the quantization itself is onnxruntime's, unchanged (tests/test_quantize_ranges.py compares
the result with its whole-graph calibration tensor by tensor). Only the tensors the quantizer reads are observed
(`quantized_inputs`), each is reduced right after it is made, and the graph runs optimized as in the runtime, so
the pass holds little more than a plain run of the graph.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

def selected(model, op_types: Sequence[str]) -> list[str]:
    """The tensors onnxruntime's MinMax calibrator calibrates for `op_types`: its own selection
    (CalibraterBase.select_tensors_to_calibrate: every float input and output of those nodes, known after shape
    inference, that is not an initializer), in graph order."""
    from types import SimpleNamespace

    from onnxruntime.quantization.calibrate import CalibraterBase

    chosen, _ = CalibraterBase.select_tensors_to_calibrate(SimpleNamespace(op_types_to_calibrate=list(op_types)),
                                                          model)
    first: dict[str, int] = {}
    for node in model.graph.node:
        for n in itertools.chain(node.input, node.output):
            first.setdefault(n, len(first))
    return sorted(chosen, key=first.__getitem__)


def quantized_inputs(model, op_types: Sequence[str], excluded: Sequence[str]) -> list[str]:
    """Of `selected`, the ones a QDQ quantizer reads: the inputs and outputs of the `op_types` nodes it quantizes
    (not in `excluded`; onnxruntime's QDQ quantizer wants both). The rest (the attention scores and probabilities
    of an excluded activation x activation MatMul) are never read: not observing them keeps them from being held
    for their reductions."""
    skip = set(excluded)
    wanted = {n for node in model.graph.node if node.op_type in op_types and node.name not in skip
              for n in itertools.chain(node.input, node.output)}
    return [n for n in selected(model, op_types) if n in wanted]


def _augmented(src: Path, op_types: Sequence[str], excluded: Sequence[str] | None):
    """(the structure of `src` with a ReduceMin and a ReduceMax output per tensor (`selected`, or with `excluded`
    the `quantized_inputs`), each pair
    right after the node that makes the tensor, so it is reduced and can be freed as early as the graph allows;
    [(tensor, min output, max output)]). Weights in external data stay there, unread."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    tensors = selected(model, op_types) if excluded is None else quantized_inputs(model, op_types, excluded)
    known = {vi.name: vi for vi in itertools.chain(model.graph.value_info, model.graph.output, model.graph.input)}
    unknown = [t for t in tensors if t not in known]
    if unknown:
        raise ValueError(f"{src.name}: no type known for tensor(s) {unknown[:3]} to calibrate")
    taken = {n for node in model.graph.node for n in node.output} | set(known)
    reduce_of: dict[str, list] = {}
    pairs, outputs = [], []
    for k, name in enumerate(tensors):
        lo, hi = f"omniguard_range_{k}_min", f"omniguard_range_{k}_max"
        if lo in taken or hi in taken:
            raise ValueError(f"{src.name}: the graph already has a tensor named {lo} or {hi}")
        elem = known[name].type.tensor_type.elem_type
        # no axes: every axis is reduced (opset < 18 and >= 18 alike); keepdims=1 as onnxruntime's calibrator
        # keeps them (a dimension of 0 cannot be reduced without it)
        reduce_of[name] = [onnx.helper.make_node("ReduceMin", [name], [lo], keepdims=1),
                           onnx.helper.make_node("ReduceMax", [name], [hi], keepdims=1)]
        outputs.extend([onnx.helper.make_tensor_value_info(lo, elem, None),
                        onnx.helper.make_tensor_value_info(hi, elem, None)])
        pairs.append((name, lo, hi))
    nodes = [r for i in model.graph.input for r in reduce_of.pop(i.name, [])]
    for node in model.graph.node:
        nodes.append(node)
        nodes.extend(r for out in node.output for r in reduce_of.pop(out, []))
    del model.graph.node[:]
    model.graph.node.extend(nodes + [r for rs in reduce_of.values() for r in rs])
    # the reductions are the only outputs: nothing they do not need (the decoder's logits) is computed
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model, pairs


def activation_ranges(src: Path, feeds: Iterable[dict], op_types: Sequence[str] = ("MatMul", "Gemm"),
                      excluded: Sequence[str] | None = None, optimized: bool = True):
    """onnxruntime's TensorsData (MinMax) for the graph at `src` over `feeds` (its captured inputs), computed one
    input at a time: for each tensor (onnxruntime's selection for `op_types`; with `excluded`, the names of the
    nodes the quantizer leaves alone, only the inputs it quantizes) the min of its minima and the
    max of its maxima, as onnxruntime's calibrator merges them. Unlike it (np.nanmin), a non-finite value is an
    error naming the tensor and the input: a scale from it would be garbage.

    `optimized`: run the graph as the runtime does, with onnxruntime's graph optimizations. Its calibrator runs it
    without (`optimized=False` gives its ranges bit for bit), which on `small`'s vision encoder materializes every
    full-attention block's scores: a 1411x1411 calibration photo's 10,000 patches make each such tensor 6.4 GB, and
    the pass reached 23.8 GiB before it was stopped. With optimizations, attention runs fused (as in the runtime) and the observed
    tensors differ from the unoptimized run's by float rounding only (tests/test_quantize_ranges.py)."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    src = Path(src)
    model, pairs = _augmented(src, op_types, excluded)
    if not pairs:
        raise ValueError(f"{src.name}: no float tensor of {', '.join(op_types)} nodes to calibrate")
    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's calibrator runs
    # no arena: onnxruntime's grows by powers of two and keeps every block; a vision encoder's scores (6.4 GB per
    # full-attention block at 10,000 patches) would stay held several times over (the runtime's vision session
    # avoids it the same way, runtime/bundle.py exact_arena_graphs)
    so.enable_cpu_mem_arena = False
    # nodes in graph order as they become ready, so each reduction runs right after its tensor is made: onnxruntime's
    # default order ran the whole graph before most reductions and held every observed tensor (on small's vision
    # encoder, one 4,900-patch image: killed at 24 GiB; with this order 12.1 GiB peak, the plain graph 7.6 GiB)
    if hasattr(ort, "ExecutionOrder"):
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent))
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model
    wanted = [n for _, lo, hi in pairs for n in (lo, hi)]
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    count = 0
    for n, feed in enumerate(feeds):
        # the in-place decoder writes its KV inputs: a copy keeps the caller's feeds as captured
        values = session.run(wanted, {k: np.array(v, copy=True) for k, v in feed.items()})
        for (name, _, _), lo, hi in zip(pairs, values[0::2], values[1::2]):
            lo, hi = np.min(lo).reshape(1), np.max(hi).reshape(1)
            if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
                raise ValueError(f"{src.name}: calibration input {n} gives tensor {name!r} a non-finite range "
                                 f"[{lo[0]}, {hi[0]}]")
            low[name] = lo if name not in low else np.minimum(low[name], lo)
            high[name] = hi if name not in high else np.maximum(high[name], hi)
        count += 1
    if not count:
        raise ValueError(f"{src.name}: static INT8 needs calibration inputs for its activation scales")
    return TensorsData(CalibrationMethod.MinMax, {name: TensorData(lowest=low[name], highest=high[name])
                                                  for name, _, _ in pairs})


def check_cache_support() -> None:
    """quantize_static reads precomputed ranges from `calibration_cache_path` (added to onnxruntime in 2026,
    microsoft/onnxruntime#28221; 1.32 has it); an onnxruntime without it is refused before anything is computed."""
    import onnxruntime
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise RuntimeError(f"onnxruntime {onnxruntime.__version__}'s quantize_static takes no calibration_cache_path: "
                           "explicit INT8 (trt-int8) needs one that does (1.32 does: pip install 'onnxruntime==1.32.*')")
