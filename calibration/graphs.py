"""One graph through one recipe method: onnxruntime's quantization tools on an fp32 ONNX file.

Every function reads the fp32 graph at `src` (with its external data) and writes the result at `dest`, with one
external-data file beside it when the result is too large for a single protobuf. Returns the data file's name
(or None) and the parameters that were applied, for the manifest.

The weight-only methods (int4-block, int4-qdq, fp16) go weight by weight (`_Streamed`): the graph's structure is
loaded without its weights, and each weight is read, transformed and appended to the result's data file before the
next one is read, so their memory is a few times the largest weight (a 7B decoder's output layer: 2.2 GB in fp32),
not the graph's (28 GB). The rewrites are onnxruntime's own, a node or a structure at a time; the tests compare the
results with its whole-graph tools tensor by tensor. The methods with activation scales (int8-dyn, qdq-int8) hold
the whole graph in memory, as onnxruntime's quantizers do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..export.onnx_io import PROTOBUF_LIMIT, DataWriter, save_graph, set_metadata
from ..runtime.recipes import METHODS, GraphPlan


def _toposort(model) -> None:
    """Nodes in an order where every input is produced before it is read, as ONNX requires and TensorRT's parser
    expects (onnxruntime's fp16 converter appends its input Casts at the end). Raises on a cycle."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph {graph.name}: {len(rest)} nodes read tensors nothing produces (first: "
                             f"{rest[0].op_type} {rest[0].name})")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _save(model, dest: Path, metadata: dict[str, str]) -> str | None:
    _toposort(model)
    return save_graph(model, dest, metadata, sum(t.ByteSize() for t in model.graph.initializer))


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizers log a line per node at INFO and a pre-processing hint at WARNING, on the root
    logger: raised to ERROR while they run, then restored (a host application keeps its own logging)."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load(src: Path):
    """The graph with its weights, in memory: onnxruntime's quantizers are handed the model, not its path, because
    given a path they write a shape-inferred copy beside it (into the source bundle)."""
    import onnx

    return onnx.load(str(src), load_external_data=True)


def int8_dynamic(src: Path, dest: Path, plan: GraphPlan, metadata: dict) -> tuple[str | None, dict]:
    """INT8 weights (per output channel when plan.params['per_channel']) of every MatMul/Gemm whose second input is
    a constant; activations quantized to uint8 per tensor at every run (DynamicQuantizeLinear + MatMulInteger,
    fused by onnxruntime into DynamicQuantizeMatMul). MatMuls between two activations (attention scores) stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from . import per_token

    per_channel = bool(plan.params.get("per_channel", True))
    model = _load(src)
    rows = []
    if plan.params.get("per_token") == "gated-products":  # the MLP down projections (calibration/per_token.py)
        rows = per_token.rewrite(model, per_token.gated_products(model))
        silus = _op_counts(model).get("Sigmoid", 0)
        if len(rows) != silus:  # one gated product per SiLU: every down projection
            raise RuntimeError(f"{src.name}: {len(rows)} MatMuls read a gated product act(gate) * up, for {silus} "
                               "SiLU activations")
        if not rows:
            raise RuntimeError(f"{src.name}: no MatMul reads a gated product act(gate) * up to quantize per token")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, _quiet():
        out = Path(tmp) / dest.name
        quantize_dynamic(model, str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
        del model
        model = onnx.load(str(out), load_external_data=True)
    counts = _op_counts(model)
    data = _save(model, dest, metadata)
    return data, {"method": "int8-dyn", "weights": "int8 symmetric", "per_channel": per_channel,
                  "activations": "uint8 per tensor, per run (dynamic)" + (
                      f"; the {len(rows)} MatMuls reading act(gate) * up per token" if rows else ""),
                  "per_token_matmuls": len(rows), "ops": counts}


def int4_block(src: Path, dest: Path, plan: GraphPlan, metadata: dict) -> tuple[str | None, dict]:
    """INT4 weights in blocks of plan.params['block_size'] along K, one fp32 scale per block (symmetric), as
    onnxruntime's MatMulNBits; `accuracy_level` 4 lets the CPU kernel quantize activations to int8 per block.
    Weight by weight (`_Streamed`)."""
    from onnxruntime.quantization import QuantFormat

    p = plan.params
    data, counts = _int4(src, dest, metadata, "MatMulNBits", block_size=int(p["block_size"]),
                         is_symmetric=bool(p["symmetric"]), accuracy_level=int(p["accuracy_level"]),
                         quant_format=QuantFormat.QOperator)
    return data, {"method": "int4-block", "weights": "int4 " + ("symmetric" if p["symmetric"] else "asymmetric"),
                  "block_size": int(p["block_size"]), "accuracy_level": int(p["accuracy_level"]),
                  "activations": "fp32 (int8 per block inside the kernel at accuracy_level 4)", "ops": counts,
                  "streamed": True}


# Ops an fp16 graph keeps in fp32: normalisations (and the Pow/ReduceMean/Sqrt/Div of a decomposed RMSNorm, whose
# squares overflow fp16 above 256), softmax, erf, and every Add (the residual stream and its biases); their fp16
# neighbours get Casts at the boundary. The rotary tables are kept fp32 with everything they are computed from
# (`_rotary_prologue`): in fp16 the angle position x frequency would lose up to a quarter radian at position 1000.
FP16_KEEP_FP32 = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Pow",
                  "ReduceMean", "Sqrt", "Div", "Reciprocal", "Softmax", "Sin", "Cos", "Erf", "Add", "Sub", "Range",
                  "CumSum", "Exp", "Log")


def _rotary_prologue(model) -> list[str]:
    """Names of the Sin/Cos nodes and of every node they depend on (up to the graph inputs)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    todo = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    seen: dict[str, object] = {}
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen[node.name] = node
        todo += [producer[i] for i in node.input if i in producer]
    return list(seen)


def fp16(src, dest, plan, metadata) -> tuple[str | None, dict]:
    """fp16 weights and activations, fp32 graph inputs and outputs, FP16_KEEP_FP32 ops and the rotary prologue in
    fp32 (onnxruntime's float16 converter). The result is checked by onnx's checker before it is written.

    Weight by weight: the converter rewrites the structure, in which every external weight stands in as a one-element
    tensor of its type; it marks each fp16 or leaves it fp32, and each weight is then converted as marked, with the
    converter's own clamping, while it is streamed to the result."""
    import onnx
    from onnx import TensorProto, external_data_helper, helper
    from onnxruntime.transformers.float16 import convert_float_to_float16, convert_np_to_float16

    g = _Streamed(src, dest)
    model = g.model
    inferred = onnx.shape_inference.infer_shapes(model)  # the structure alone: types for the converter
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    del inferred
    stand_ins: dict[str, TensorProto] = {}
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            original = TensorProto()
            original.CopyFrom(t)
            stand_ins[t.name] = original
            del t.external_data[:], t.dims[:]
            t.data_location = TensorProto.DEFAULT
            t.dims.append(1)
            t.raw_data = np.zeros(1, helper.tensor_dtype_to_np_dtype(t.data_type)).tobytes()
    kept_nodes = _rotary_prologue(model)
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32),
                                    node_block_list=kept_nodes, disable_shape_infer=True)
    # the converter described each converted weight by its stand-in's shape, and so the Cast back to fp32 it puts
    # between a weight and an fp32 node: both get the weight's real shape
    shapes = {name: t.dims for name, t in stand_ins.items()}
    shapes.update({n.output[0]: shapes[n.input[0]] for n in half.graph.node
                   if n.op_type == "Cast" and n.input and n.input[0] in stand_ins})
    for vi in half.graph.value_info:
        if vi.name in shapes:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in shapes[vi.name]:
                shape.dim.add().dim_value = d
    for t in half.graph.initializer:
        original = stand_ins.get(t.name)
        if original is None:
            g.emit(t)
            continue
        if t.data_type == TensorProto.FLOAT16 and original.data_type == TensorProto.FLOAT:
            g.emit(_to_fp16(g.load(original), convert_np_to_float16))
        else:
            g.emit(g.load(original))
    g.model = half
    counts = _op_counts(half)
    data = g.finish(metadata)
    onnx.checker.check_model(str(dest))  # by path: a graph over 2 GB is checked with its external data
    return data, {"method": "fp16", "weights": "fp16", "activations": "fp16", "io": "fp32", "streamed": True,
                  "kept_fp32": {"ops": list(FP16_KEEP_FP32), "rotary_prologue_nodes": len(kept_nodes)}, "ops": counts}


# the ranges pass runs the graph optimized, as the runtime does (calibration/ranges.py: attention fused, not ~20 GiB of
# materialized scores on small's vision encoder); False reproduces onnxruntime's calibrator bit for bit (the tests)
RANGES_OPTIMIZED = True


def _activation_matmuls(src: Path) -> list[str]:
    """The MatMuls of two activations (attention scores, probabilities x values): they stay fp32 under qdq-int8.
    onnxruntime's QDQ quantizer ignores MatMulConstBOnly, and per-tensor INT8 probabilities round to 0 over long
    contexts (measured on tiny: cosine 0.86 after the first layer's probabilities x values at 451 tokens). A graph
    with inline weights is read whole here: its structure is freed on return, before quantizing."""
    import onnx

    skeleton = onnx.load(str(src), load_external_data=False)
    weights = {t.name for t in skeleton.graph.initializer}
    producer = {o: n for n in skeleton.graph.node for o in n.output}

    def constant(name):
        while name not in weights and name in producer and producer[name].op_type in ("Identity", "Transpose"):
            name = producer[name].input[0]
        return name in weights

    return [n.name for n in skeleton.graph.node if n.op_type == "MatMul" and not constant(n.input[1])]


def qdq_int8(src: Path, dest: Path, plan: GraphPlan, metadata: dict, calibration: list | None = None):
    """Explicit quantization for TensorRT: QuantizeLinear/DequantizeLinear pairs (QDQ format) on every MatMul/Gemm
    with a constant weight; INT8 symmetric, weights per output channel, activation scales from the min/max of the
    calibration inputs (onnxruntime 1.32's percentile calibrator fails on inputs of varying shapes). TensorRT reads
    these scales as they are (explicit quantization), with no calibrator of its own. The ranges are computed one
    input at a time (calibration/ranges.py), then onnxruntime's quantize_static applies them as its calibration
    cache."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .ranges import activation_ranges, check_cache_support

    if not calibration:
        raise ValueError(f"{src.name}: explicit INT8 needs calibration inputs for its activation scales")
    check_cache_support()
    from onnxruntime.quantization.calibrate import save_tensors_data  # after the check: older builds lack it
    op_types = ["MatMul", "Gemm"]
    activations = _activation_matmuls(src)
    ranges = activation_ranges(src, calibration, op_types, excluded=activations, optimized=RANGES_OPTIMIZED)
    options = {"ActivationSymmetric": True, "WeightSymmetric": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, _quiet():
        out, cache = Path(tmp) / dest.name, Path(tmp) / "ranges.json"
        save_tensors_data(ranges, cache)
        quantize_static(_load(src), str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                        nodes_to_exclude=activations, extra_options=options, calibration_cache_path=cache)
        model = onnx.load(str(out), load_external_data=True)
    counts = _op_counts(model)
    data = _save(model, dest, metadata)
    return data, {"method": "qdq-int8", "weights": "int8 symmetric per output channel",
                  "activations": f"int8 symmetric per tensor, min/max of {len(calibration)} calibration inputs",
                  "calibrated": "one input at a time, weights read in place (calibration/ranges.py)",
                  "format": "QDQ (explicit quantization)", "kept_fp32": {"activation_matmuls": len(activations)},
                  "ops": counts}


def int4_qdq(src: Path, dest: Path, plan: GraphPlan, metadata: dict, calibration=None):
    """INT4 weight-only in a form TensorRT parses: each constant MatMul weight as an int4 initializer, blocked
    along K (plan.params['block_size']), behind DequantizeLinear with its block_size attribute (opset 21), then a
    plain MatMul. The structure is converted to opset 21 first (onnx's version converter). Weight by weight."""
    from onnxruntime.quantization import QuantFormat

    data, counts = _int4(src, dest, metadata, "DequantizeLinear", block_size=int(plan.params["block_size"]),
                         is_symmetric=True, quant_format=QuantFormat.QDQ)
    return data, {"method": "int4-qdq", "weights": "int4 symmetric", "block_size": int(plan.params["block_size"]),
                  "activations": "fp32 (weight-only)", "format": "blocked DequantizeLinear, opset 21", "ops": counts,
                  "streamed": True}


def _to_fp16(full, convert):
    """A new fp16 tensor from the fp32 tensor `full` (holding its bytes), converted by onnxruntime's `convert`
    (which clamps to fp16's finite range) in chunks; `full`'s bytes are read once and dropped with it."""
    from onnx import TensorProto

    w = np.frombuffer(full.raw_data, np.float32)  # the one copy of the bytes
    half = TensorProto(name=full.name, data_type=TensorProto.FLOAT16, dims=list(full.dims))
    del full
    out = np.empty(w.shape, np.float16)
    for i in range(0, w.size, 1 << 24):  # elementwise: chunks bound the converter's temporaries
        out[i:i + (1 << 24)] = convert(w[i:i + (1 << 24)])
    del w
    half.raw_data = out.tobytes()
    return half


def _int4(src: Path, dest: Path, metadata: dict, expect: str, **config) -> tuple[str | None, dict]:
    """onnxruntime's INT4 weight quantizer (its DefaultWeightOnlyQuantizer) on every MatMul with a constant weight,
    one weight at a time; (the data file, the op counts). RuntimeError when no `expect` op came out (nothing was
    quantized)."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    g = _Streamed(src, dest)
    if config["quant_format"] == QuantFormat.QDQ:  # int4 tensors and blocked DequantizeLinear: opset 21, IR 10
        g.model = version_converter.convert_version(g.model, 21)
        g.model.ir_version = max(g.model.ir_version, 10)
    elif not any(o.domain == "com.microsoft" for o in g.model.opset_import):  # MatMulNBits' domain
        g.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(bits=4, op_types_to_quantize=("MatMul",),
                                                                        **config))
    graph = g.model.graph
    weights = {t.name: t for t in graph.initializer}
    def quantize(node) -> list:
        """One MatMul's weight through the quantizer: the nodes that replace it. The graph it sees holds this weight
        alone, and nothing of it outlives the call (protobuf frees a message's memory only with the whole message)."""
        one = onnx.GraphProto()
        g.load(weights[node.input[1]], into=one.initializer.add())  # in place: append() would serialize a copy,
        made = quantizer.quantize(node, [one])  # which protobuf refuses over 2 GiB (a 7B output layer: 2.18 GB)
        for i in range(1, len(one.initializer)):  # what it made: the quantized weight, its scales (and zero points)
            g.emit(one.initializer[i])
        # a weight two MatMuls share gets one DequantizeLinear: onnxruntime's tool writes a second with the same
        # output name, which makes the graph invalid
        made = [n for n in made if not set(n.output) <= defined]
        defined.update(o for n in made for o in n.output)
        return made

    defined: set[str] = set()

    nodes = []
    with _quiet():
        for node in graph.node:
            if node.op_type == "MatMul" and node.input[1] in weights:
                nodes += quantize(node)
            else:
                nodes.append(node)
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    for name, t in weights.items():
        if name in used:
            g.emit(g.load(t))
    inputs = [i for i in graph.input if i.name not in weights or i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.node[:]
    graph.node.extend(nodes)
    counts = _op_counts(g.model)
    if not counts.get(expect):
        raise RuntimeError(f"{src.name}: the INT4 quantizer made no {expect} (ops: {counts})")
    return g.finish(metadata), counts


class _Streamed:
    """A graph's structure, loaded at `src` without its weights, and its result at `dest`, written weight by weight.

    `load` reads one weight of the source (a copy holding its bytes); `emit` writes one weight of the result to
    `dest`'s data file at once (a weight under DataWriter.MIN_BYTES stays inline) and keeps only its reference;
    `finish` saves the structure, with the data file when the result passes the protobuf limit, else as one file.
    Nothing keeps a weight's bytes alive after `emit`: protobuf frees a message's memory only with the message, so
    the result keeps a copy of the reference, never the message that held the bytes."""

    def __init__(self, src: Path, dest: Path):
        import onnx

        from onnx import external_data_helper

        self.src, self.dest = Path(src), Path(dest)
        data = self.dest.parent / (self.dest.name + ".data")
        if self.dest.resolve() == self.src.resolve() or data.exists():  # never truncate a source's data
            raise ValueError(f"{dest}: the result would overwrite {src if not data.exists() else data}")
        self.model = onnx.load(str(src), load_external_data=False)
        for node in self.model.graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise RuntimeError(f"{src.name}: node {node.name} has a subgraph; graphs are rewritten without them")
            if any(a.type == onnx.AttributeProto.TENSOR and external_data_helper.uses_external_data(a.t)
                   for a in node.attribute):
                raise RuntimeError(f"{src.name}: node {node.name} holds a constant in external data; only "
                                   "initializers are streamed")
        self.writer = DataWriter(data)
        self.out: list = []
        self._emitted: set[str] = set()

    def load(self, tensor, into=None):
        """A copy of `tensor` holding its bytes: a new message, or `into` (an empty message, e.g. a repeated field's
        new element)."""
        import onnx
        from onnx import external_data_helper

        t = onnx.TensorProto() if into is None else into
        t.CopyFrom(tensor)
        if external_data_helper.uses_external_data(t):
            external_data_helper.load_external_data_for_tensor(t, str(self.src.parent))  # onnx's checked reader
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
        return t

    def emit(self, tensor) -> None:
        """Write `tensor` (once: a weight two nodes share is quantized for each, as onnxruntime does, and kept once,
        as its clean-up keeps it)."""
        import onnx

        if tensor.name in self._emitted:
            return
        self._emitted.add(tensor.name)
        self.writer.put(tensor)
        ref = onnx.TensorProto()
        ref.CopyFrom(tensor)
        self.out.append(ref)

    def finish(self, metadata: dict) -> str | None:
        import onnx
        from onnx import external_data_helper

        self.writer.close()
        graph = self.model.graph
        del graph.initializer[:]
        graph.initializer.extend(self.out)
        self.out = []
        data = self.writer.path
        if self.writer.offset <= PROTOBUF_LIMIT:  # small enough for one file: as every other method writes it
            external_data_helper.load_external_data_for_model(self.model, str(self.dest.parent))
            data.unlink()
            return _save(self.model, self.dest, metadata)
        _toposort(self.model)  # the weights are already in `data`: only the structure is written
        set_metadata(self.model, metadata)
        onnx.save_model(self.model, str(self.dest))
        return data.name


def _op_counts(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in model.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return dict(sorted(out.items()))


TRANSFORMS = {"int8-dyn": int8_dynamic, "int4-block": int4_block, "fp16": fp16, "qdq-int8": qdq_int8,
              "int4-qdq": int4_qdq}


def apply(src: Path, dest: Path, plan: GraphPlan, metadata: dict, calibration: list | None = None
          ) -> tuple[str | None, dict]:
    """`calibration`: the graph's captured calibration inputs, for the methods that need them (recipes.METHODS)."""
    if plan.method not in TRANSFORMS:
        raise ValueError(f"no graph transform for method {plan.method!r}")
    os.makedirs(dest.parent, exist_ok=True)
    if METHODS[plan.method][1]:
        return TRANSFORMS[plan.method](src, dest, plan, metadata, calibration)
    return TRANSFORMS[plan.method](src, dest, plan, metadata)
