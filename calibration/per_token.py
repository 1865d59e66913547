"""INT8 MatMuls whose activations are quantized per token (per row), for inputs whose range differs across tokens.

onnxruntime's dynamic INT8 (DynamicQuantizeMatMul) takes one activation scale per run. In a trained Qwen2.5 decoder
the MLP's down projection reads act(gate) * up, whose range varies by orders of magnitude from one token to the next
(the massive activations, issue 20): in a prefill of hundreds of tokens one scale fits the largest token and rounds
the others away. Measured on small-real's fast decoder, held-out prefills of 74-1,269 tokens, logits cosine against
fp32: every MatMul dynamic INT8, worst 0.977 (smoothed) and 0.932 (not); only the down projections INT8, worst 0.976;
only q/k/v, gate/up or o, worst 0.999+; one-token decode steps (one token, one scale): worst 0.9999.

Here each such MatMul becomes, in standard ONNX ops: a scale per row (max |x| over the row / 127), x rounded to
uint8 around 128 with it, MatMulInteger against INT8 weights quantized per output column, and the int32 product
scaled back by the row's and the column's scales. The weights are what onnxruntime's per-channel INT8 makes of them
(symmetric, 127 levels).
"""

from __future__ import annotations

import numpy as np


def _opset(model) -> int:
    """The default domain's opset; ValueError below 13 (Clip's bounds as inputs, Round)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < 13:
        raise ValueError(f"per-token INT8 needs the default ONNX opset 13 or newer, not {version}")
    return version


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, fp32 scale per output column) of an fp32 [K, N] weight: symmetric, 127 levels."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def gated_products(model) -> set[str]:
    """The inputs of constant-weight MatMuls that are a product of two activations, act(gate) * up: the gated MLP's
    down projection (a Mul with no constant input; the decoder's only such MatMul input)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    out = set()
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            src = producer.get(node.input[0])
            if src is not None and src.op_type == "Mul" and not any(i in inits for i in src.input) \
                    and not any(producer.get(i) is not None and producer[i].op_type == "Constant" for i in src.input):
                out.add(node.input[0])
    return out


def rewrite(model, activations: set[str]) -> list[str]:
    """Replace every MatMul of `model` whose first input is in `activations` and whose second is a 2-D fp32
    initializer with its per-token INT8 form (in place; the model holds its weights). Returns the replaced outputs."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    opset = _opset(model)
    shared = [helper.make_tensor("omniguard_pt_127", TensorProto.FLOAT, [], [127.0]),
              helper.make_tensor("omniguard_pt_tiny", TensorProto.FLOAT, [], [1e-30]),
              helper.make_tensor("omniguard_pt_128", TensorProto.FLOAT, [], [128.0]),
              helper.make_tensor("omniguard_pt_lo", TensorProto.FLOAT, [], [1.0]),
              helper.make_tensor("omniguard_pt_hi", TensorProto.FLOAT, [], [255.0]),
              helper.make_tensor("omniguard_pt_zp_a", TensorProto.UINT8, [], [128]),
              helper.make_tensor("omniguard_pt_zp_b", TensorProto.INT8, [], [0]),
              helper.make_tensor("omniguard_pt_axes", TensorProto.INT64, [1], [-1])]
    nodes, done, dropped = [], [], set()
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or node.input[0] not in activations or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        x, y, p = node.input[0], node.output[0], f"omniguard_pt_{len(done)}_"
        q, scale = quantize_weight(numpy_helper.to_array(w).astype(np.float32))
        graph.initializer.extend([numpy_helper.from_array(q, p + "w"), numpy_helper.from_array(scale, p + "ws")])
        if readers[w.name] == 1:
            dropped.add(w.name)
        reduce = (helper.make_node("ReduceMax", [p + "abs", "omniguard_pt_axes"], [p + "amax"], keepdims=1)
                  if opset >= 18 else helper.make_node("ReduceMax", [p + "abs"], [p + "amax"], axes=[-1], keepdims=1))
        nodes += [helper.make_node("Abs", [x], [p + "abs"]), reduce,
                  helper.make_node("Max", [p + "amax", "omniguard_pt_tiny"], [p + "amax1"]),
                  helper.make_node("Div", [p + "amax1", "omniguard_pt_127"], [p + "s"]),
                  helper.make_node("Div", [x, p + "s"], [p + "xs"]),
                  helper.make_node("Round", [p + "xs"], [p + "xr"]),
                  helper.make_node("Add", [p + "xr", "omniguard_pt_128"], [p + "xo"]),
                  helper.make_node("Clip", [p + "xo", "omniguard_pt_lo", "omniguard_pt_hi"], [p + "xc"]),
                  helper.make_node("Cast", [p + "xc"], [p + "xq"], to=TensorProto.UINT8),
                  helper.make_node("MatMulInteger", [p + "xq", p + "w", "omniguard_pt_zp_a", "omniguard_pt_zp_b"],
                                   [p + "acc"]),
                  helper.make_node("Cast", [p + "acc"], [p + "accf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [p + "accf", p + "s"], [p + "rows"]),
                  helper.make_node("Mul", [p + "rows", p + "ws"], [y], name=node.name or y)]
        done.append(y)
    if done:
        kept = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept + shared)
        del graph.node[:]
        graph.node.extend(nodes)
    return done
