"""Per-token INT8 for the MatMuls reading act(gate) * up (calibration/per_token.py), on a hand-made gated MLP whose
tokens differ in range as a trained decoder's do (one token a thousand times the others)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="quantizing needs onnx (the quantize extra)")
ort = pytest.importorskip("onnxruntime")

K, F, N = 64, 128, 48


def _mlp(seed: int = 0):
    """x -> MatMul gate, MatMul up -> gate * sigmoid(gate) * up -> MatMul down (the decoder's MLP, unfused)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {n: numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n)
         for n, s in (("wg", (K, F)), ("wu", (K, F)), ("wd", (F, N)))}
    nodes = [helper.make_node("MatMul", ["x", "wg"], ["gate"]), helper.make_node("MatMul", ["x", "wu"], ["up"]),
             helper.make_node("Sigmoid", ["gate"], ["sig"]), helper.make_node("Mul", ["gate", "sig"], ["act"]),
             helper.make_node("Mul", ["act", "up"], ["prod"]), helper.make_node("MatMul", ["prod", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", N])], list(w.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _down(seed: int = 0):
    """act * up -> MatMul down, from act and up as inputs (in a decoder they come from RMS-normed x, whose range
    per token is bounded, and their product is where one token gets ~1,000 times the others)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    wd = numpy_helper.from_array((rng.standard_normal((F, N)) / np.sqrt(F)).astype(np.float32), "wd")
    nodes = [helper.make_node("Mul", ["act", "up"], ["prod"]), helper.make_node("MatMul", ["prod", "wd"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "s", F]) for n in ("act", "up")]
    graph = helper.make_graph(nodes, "down", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                    [1, "s", N])], [wd])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tokens():
    rng = np.random.default_rng(1)
    act, up = (rng.standard_normal((1, 12, F)).astype(np.float32) for _ in range(2))
    act[0, 0] *= 30.0
    up[0, 0] *= 30.0  # a massive token: its product is ~1,000 times the others'
    return {"act": act, "up": up}


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]


def _row_cosines(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):  # a row rounded to all zeros has no direction: cosine 0
        return np.nan_to_num((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1), nan=0.0)


def _dynamic(model, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, str(tmp_path / "q.onnx"), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    return onnx.load(str(tmp_path / "q.onnx"))


def test_only_the_down_projection_reads_a_gated_product():
    from omniguard_edge.calibration import per_token

    assert per_token.gated_products(_mlp()) == {"prod"}


def test_per_token_keeps_every_token_where_one_scale_per_run_loses_the_small_ones(tmp_path):
    from omniguard_edge.calibration import per_token

    x = _tokens()
    ref = _run(_down(), x)
    whole = _run(_dynamic(_down(), tmp_path), x)
    model = _down()
    assert per_token.rewrite(model, per_token.gated_products(model)) == ["y"]
    onnx.checker.check_model(model)
    assert "wd" not in {t.name for t in model.graph.initializer}  # the fp32 weight is gone, its INT8 form stays
    quantized = _dynamic(model, tmp_path)  # what int8_dynamic does next: nothing is left for it here
    assert not [n for n in quantized.graph.node if n.op_type == "DynamicQuantizeLinear"]
    mine = _run(quantized, x)
    small_whole, small_mine = _row_cosines(whole, ref)[1:], _row_cosines(mine, ref)[1:]
    assert small_whole.min() < 0.9  # one scale for the massive token and the rest: the small tokens are lost
    assert small_mine.min() > 0.999, small_mine
    assert _row_cosines(mine, ref)[0] > 0.999


def test_weights_are_symmetric_127_levels_per_column():
    from omniguard_edge.calibration.per_token import quantize_weight

    w = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 0.0]], np.float32)
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert np.allclose(s, [2 / 127, 0.5 / 127, 1.0]) and q[1, 0] == -127 and q[0, 1] == -127
    assert np.abs(q.astype(np.float32) * s - w).max() <= s.max() / 2 + 1e-7


def test_an_opset_without_round_is_refused():
    from omniguard_edge.calibration import per_token

    model = _down()
    model.opset_import[0].version = 11
    with pytest.raises(ValueError, match="opset 13 or newer, not 11"):
        per_token.rewrite(model, {"prod"})


def test_a_non_finite_p_unsafe_ranks_as_unsafe_in_the_auroc_drop():
    from omniguard_edge.calibration.metrics import auroc_drop

    labels, packs = ["unsafe", "unsafe", "safe", "safe"], ["a"] * 4
    ref, got, drop = auroc_drop([0.9, 0.8, 0.1, 0.2], [0.9, 0.8, float("-inf"), 0.2], labels, packs)
    assert ref == 1.0 and got == 0.5 and drop == 0.5  # -inf on a safe item scores 1, above both unsafe ones
    assert auroc_drop([0.9, 0.1], [0.8, 0.2], ["unsafe", "unsafe"], ["a", "a"]) == (None, None, None)
