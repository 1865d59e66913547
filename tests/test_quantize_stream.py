"""The weight-only recipe methods go weight by weight (calibration/graphs.py `_Streamed`), so a 7B decoder (28 GB in
fp32) quantizes in a few GB. Their results must be exactly what onnxruntime's whole-graph tools make of the same
graph: checked here node by node and tensor by tensor, from a source whose weights are in an external-data file as
in a large bundle, and with the result kept external as a large result is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omniguard_edge.calibration import recipes

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
    assert [i.name for i in got.graph.input] == [i.name for i in want.graph.input]


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
