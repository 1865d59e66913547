"""The weight-only recipe methods go weight by weight (calibration/graphs.py `_Streamed`), so a 7B decoder (28 GB in
fp32) quantizes in a few GB. Their results must be exactly what onnxruntime's whole-graph tools make of the same
graph: checked here node by node and tensor by tensor, from a source whose weights are in an external-data file as
in a large bundle, and with the result kept external as a large result is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omniguard_edge.runtime import recipes

onnx = pytest.importorskip("onnx", reason="quantizing needs onnx (the quantize extra)")

# (recipe, graph): every weight-only method, on an encoder and on a decoder
CASES = [("cpu-int4", "decoder_gqa"), ("orin", "decoder"), ("orin", "audio"), ("gpu-fp16", "decoder"),
         ("gpu-fp16", "vision")]


def _external_copy(src: Path, folder: Path) -> Path:
    """`src` saved with every weight of 1 KiB or more in one external-data file (how a large bundle stores them)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / src.name
    onnx.save_model(onnx.load(str(src)), str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=src.name + ".data", size_threshold=1024)
    return dest


def _whole_graph(plan, src: Path):
    """What onnxruntime's whole-graph tools make of `src` under `plan` (the graph in memory at once)."""
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from omniguard_edge.calibration.graphs import FP16_KEEP_FP32, _rotary_prologue

    model = onnx.load(str(src))
    if plan.method == "fp16":
        model.graph.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
        return convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32),
                                        node_block_list=_rotary_prologue(model), disable_shape_infer=True)
    p = plan.params
    if plan.method == "int4-block":
        q = MatMulNBitsQuantizer(model, bits=4, op_types_to_quantize=("MatMul",), block_size=p["block_size"],
                                 is_symmetric=p["symmetric"], accuracy_level=p["accuracy_level"])
    else:
        assert plan.method == "int4-qdq"
        q = MatMulNBitsQuantizer(version_converter.convert_version(model, 21), bits=4, op_types_to_quantize=("MatMul",),
                                 block_size=p["block_size"], is_symmetric=True, quant_format=QuantFormat.QDQ)
    q.process()
    return q.model.model


def _nodes(model) -> list:
    from onnx import helper

    return sorted((n.op_type, n.domain, tuple(n.input), tuple(n.output),
                   repr(sorted((a.name, helper.get_attribute_value(a)) for a in n.attribute))) for n in model.graph.node)


def _assert_same(got, want) -> None:
    from onnx import numpy_helper

    assert _nodes(got) == _nodes(want)
    a = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in want.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name
    assert sorted((o.domain, o.version) for o in got.opset_import) == sorted((o.domain, o.version) for o in want.opset_import)
    assert got.ir_version == want.ir_version
    for field in ("input", "output", "value_info"):
        assert sorted(v.SerializeToString(deterministic=True) for v in getattr(got.graph, field)) == \
            sorted(v.SerializeToString(deterministic=True) for v in getattr(want.graph, field)), field
    onnx.shape_inference.infer_shapes(got, strict_mode=True)


@pytest.mark.parametrize("recipe, graph", CASES)
def test_streamed_method_equals_onnxruntime_whole_graph_tool(tiny_bundle, tmp_path, recipe, graph):
    from omniguard_edge.calibration import graphs

    plan = recipes.get_recipe(recipe).graphs[graph]
    src = Path(tiny_bundle) / f"{graph}.onnx"
    external = _external_copy(src, tmp_path / "src")
    dest = tmp_path / "out" / src.name
    data, applied = graphs.apply(external, dest, plan, {"omniguard_edge.graph": graph})
    assert applied["streamed"] and data is None  # tiny's result fits one protobuf: written as one file
    assert sorted(p.name for p in dest.parent.iterdir()) == [src.name]
    got = onnx.load(str(dest))
    assert {p.key: p.value for p in got.metadata_props}["omniguard_edge.graph"] == graph
    _assert_same(got, _whole_graph(plan, src))


def test_a_large_result_stays_in_its_data_file_and_the_source_is_never_loaded_whole(tiny_bundle, tmp_path,
                                                                                    monkeypatch):
    """A result over the protobuf limit (here: any, the limit patched to 0) keeps its weights in one page-aligned
    data file; and no step loads the source graph with its weights."""
    from onnx import external_data_helper

    from omniguard_edge.calibration import graphs

    plan = recipes.get_recipe("orin").graphs["decoder"]
    src = Path(tiny_bundle) / "decoder.onnx"
    external = _external_copy(src, tmp_path / "src")
    loads = []
    real_load = onnx.load

    def spy(path, *args, **kwargs):
        loads.append((str(path), kwargs.get("load_external_data", True)))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", spy)
    monkeypatch.setattr(graphs, "PROTOBUF_LIMIT", 0)
    dest = tmp_path / "out" / "decoder.onnx"
    data, _ = graphs.apply(external, dest, plan, {})
    monkeypatch.undo()
    assert loads and all(not whole for path, whole in loads if path == str(external)), loads
    assert data == "decoder.onnx.data" and (dest.parent / data).stat().st_size > dest.stat().st_size
    skeleton = onnx.load(str(dest), load_external_data=False)
    stored = [t for t in skeleton.graph.initializer if external_data_helper.uses_external_data(t)]
    assert stored and all(int(external_data_helper.ExternalDataInfo(t).offset) % 4096 == 0 for t in stored)
    onnx.checker.check_model(str(dest))
    _assert_same(onnx.load(str(dest)), _whole_graph(plan, src))


def _edge_graph(folder: Path, weight_output: bool = True) -> Path:
    """A graph with what a streamed rewrite could get wrong: a weight shared by two MatMuls, a weight also read by an
    Add (fp16 keeps Add in fp32, so the weight feeds both precisions), and (weight_output) a weight that is itself a
    graph output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    v = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "v")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "w"], ["b"], name="mm2"),
             helper.make_node("Add", ["b", "w"], ["c"], name="add"),
             helper.make_node("MatMul", ["c", "v"], ["y"], name="mm3")]
    graph = helper.make_graph(nodes, "edges", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])] +
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, [64, 64])] * weight_output, [w, v])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    inline = folder / "inline" / "edges.onnx"
    inline.parent.mkdir()
    onnx.save_model(model, str(inline))
    return inline


@pytest.mark.parametrize("recipe, graph", [("cpu-int4", "decoder_gqa"), ("orin", "decoder"), ("gpu-fp16", "decoder")])
def test_streamed_method_handles_shared_mixed_and_output_weights(tmp_path, recipe, graph):
    import onnxruntime as ort

    from omniguard_edge.calibration import graphs

    plan = recipes.get_recipe(recipe).graphs[graph]
    # onnxruntime's fp16 converter casts each graph output from a tensor it renames, and never renames an initializer:
    # a weight that is an output is left read by a Cast from nothing. The streamed method refuses that graph.
    weight_output = plan.method != "fp16"
    if not weight_output:
        broken = _external_copy(_edge_graph(tmp_path / "broken"), tmp_path / "broken-src")
        with pytest.raises(ValueError, match="read tensors nothing produces"):
            graphs.apply(broken, tmp_path / "broken-out" / "edges.onnx", plan, {})
    inline = _edge_graph(tmp_path, weight_output)
    external = _external_copy(inline, tmp_path / "src")
    dest = tmp_path / "out" / "edges.onnx"
    graphs.apply(external, dest, plan, {})
    got, want = onnx.load(str(dest)), _whole_graph(plan, inline)
    if plan.method == "int4-qdq":
        # onnxruntime's tool gives the shared weight two DequantizeLinear nodes with one output name: an invalid
        # graph. The streamed one has a single node for it, and is otherwise the same.
        with pytest.raises(onnx.checker.ValidationError, match="w_DQ_Q4_output"):
            onnx.checker.check_model(want, full_check=True)
        dq = [n for n in got.graph.node if n.op_type == "DequantizeLinear"]
        assert sorted(n.input[0] for n in dq) == ["v_DQ_Q4", "w_DQ_Q4"]
        seen = set()
        kept = [n for n in want.graph.node if not (n.output[0] in seen or seen.add(n.output[0]))]
        del want.graph.node[:]
        want.graph.node.extend(kept)
    _assert_same(got, want)
    onnx.checker.check_model(got, full_check=True)
    assert len({t.name for t in got.graph.initializer}) == len(got.graph.initializer)  # each weight once
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    got_out = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    fp32 = ort.InferenceSession(str(inline), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    if weight_output:
        assert np.array_equal(got_out[1], fp32[1])  # the weight that is an output: as it was
    assert np.isfinite(got_out[0]).all() and np.corrcoef(got_out[0].ravel(), fp32[0].ravel())[0, 1] > 0.98
