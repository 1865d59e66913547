"""trt-int8's activation ranges are computed one calibration input at a time with the weights read in place
(calibration/ranges.py), because onnxruntime's whole-graph calibrator could not do `small`'s decoder in 24 GiB. The
ranges must be exactly those of onnxruntime's MinMax calibrator, and the quantized graph exactly what quantize_static
makes when it calibrates itself: checked here on the tiny bundle's graphs with captured inputs."""

from __future__ import annotations


import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="quantizing needs onnx (the quantize extra)")

from test_quantize_stream import _external_copy  # noqa: E402  (the weights in an external-data file, as large bundles)


@pytest.fixture(scope="module")
def captured(tiny_bundle, tmp_path_factory):
    """Each graph's inputs from the fp32 tiny bundle (standard decoder), on requests with text, an image, audio."""
    from omniguard_edge.calibration.capture import capture
    from omniguard_edge.calibration.quantize import builtin_requests
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    requests = dict(builtin_requests(tmp_path_factory.mktemp("media")))
    guard = Guard.from_bundle(tiny_bundle, GuardOptions(session=SessionOptions(decoder_graph="decoder"),
                                                        encoder_cache_bytes=0))
    got = capture(guard, [requests[k] for k in ("builtin-text-1", "builtin-image-448", "builtin-audio")],
                  max_decoder_runs=2)
    assert not got.failed and {"vision", "audio", "decoder"} <= set(got.feeds)
    return got.feeds


class _Reader:
    def __init__(self, feeds):
        self._it = iter([{k: np.array(v, copy=True) for k, v in f.items()} for f in feeds])

    def get_next(self):
        return next(self._it, None)


@pytest.mark.parametrize("graph", ["decoder", "vision", "audio"])
def test_ranges_equal_onnxruntime_calibrator(tiny_bundle, captured, tmp_path, graph):
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    from omniguard_edge.calibration.ranges import activation_ranges

    from omniguard_edge.calibration import graphs

    src = _external_copy(tiny_bundle / f"{graph}.onnx", tmp_path / "src")
    before = sorted(p.name for p in src.parent.iterdir())
    ours = activation_ranges(src, captured[graph], optimized=False)  # unoptimized, as onnxruntime's calibrator
    # what qdq_int8 observes: the inputs of the MatMuls/Gemms it quantizes, a subset with the same ranges
    quantized = activation_ranges(src, captured[graph], excluded=graphs._activation_matmuls(src), optimized=False)
    assert sorted(p.name for p in src.parent.iterdir()) == before  # nothing written beside the source
    assert 0 < len(quantized.keys()) < len(ours.keys())
    for name in quantized.keys():
        np.testing.assert_array_equal(quantized[name].range_value[0], ours[name].range_value[0], err_msg=name)
        np.testing.assert_array_equal(quantized[name].range_value[1], ours[name].range_value[1], err_msg=name)

    calibrator = create_calibrator(src, ["MatMul", "Gemm"], augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    calibrator.collect_data(_Reader(captured[graph]))
    theirs = calibrator.compute_data()
    assert set(ours.keys()) == set(theirs.keys()) and len(ours.keys()) > 4
    for name in theirs.keys():
        lo, hi = theirs[name].range_value
        np.testing.assert_array_equal(ours[name].range_value[0], lo, err_msg=name)
        np.testing.assert_array_equal(ours[name].range_value[1], hi, err_msg=name)
    # run optimized, as qdq_int8 runs it (fused attention: the memory of a plain run): the same tensors, their
    # ranges within float rounding of the unoptimized run's (kernels sum in other orders)
    fast = activation_ranges(src, captured[graph], excluded=graphs._activation_matmuls(src))
    assert set(fast.keys()) == set(quantized.keys())
    for name in fast.keys():
        for k in range(2):
            np.testing.assert_allclose(fast[name].range_value[k], quantized[name].range_value[k], rtol=1e-5,
                                       atol=1e-6, err_msg=name)


def test_qdq_int8_equals_quantize_static_calibrating_itself(tiny_bundle, captured, tmp_path, monkeypatch):
    """With its ranges pass unoptimized (the test above bounds what optimizing changes), qdq_int8's graph is
    quantize_static's own, node for node and tensor for tensor."""
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from omniguard_edge.calibration import graphs, recipes

    monkeypatch.setattr(graphs, "RANGES_OPTIMIZED", False)
    src = _external_copy(tiny_bundle / "decoder.onnx", tmp_path / "src")
    plan = recipes.get_recipe("trt-int8").graphs["decoder"]
    (tmp_path / "ours").mkdir()
    graphs.qdq_int8(src, tmp_path / "ours" / "decoder.onnx", plan, {}, calibration=captured["decoder"])
    ours = onnx.load(str(tmp_path / "ours" / "decoder.onnx"))

    # the same call as before the ranges were computed here: quantize_static with its own calibrator
    activations = graphs._activation_matmuls(src)
    quantize_static(onnx.load(str(src)), str(tmp_path / "theirs.onnx"), _Reader(captured["decoder"]),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    nodes_to_exclude=activations,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "DefaultTensorType": onnx.TensorProto.FLOAT})
    theirs = onnx.load(str(tmp_path / "theirs.onnx"))

    def nodes(m):
        return sorted((n.op_type, tuple(n.input), tuple(n.output)) for n in m.graph.node)

    assert nodes(ours) == nodes(theirs)
    assert sum(op == "QuantizeLinear" for op, _, _ in nodes(ours)) > 4
    mine = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    other = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
    assert mine.keys() == other.keys()
    for name, value in other.items():
        assert mine[name].dtype == value.dtype, name
        np.testing.assert_array_equal(mine[name], value, err_msg=name)


def test_ranges_refuse_a_non_finite_input_and_no_inputs(tiny_bundle, captured, tmp_path):
    from omniguard_edge.calibration.ranges import activation_ranges

    feed = {k: np.array(v, copy=True) for k, v in captured["decoder"][0].items()}
    feed["inputs_embeds"][0, -1, 0] = np.nan
    with pytest.raises(ValueError, match=r"calibration input 1 gives tensor '.+' a non-finite range"):
        activation_ranges(tiny_bundle / "decoder.onnx", [captured["decoder"][0], feed])
    with pytest.raises(ValueError, match="needs calibration inputs"):
        activation_ranges(tiny_bundle / "decoder.onnx", [])


def test_old_onnxruntime_is_refused_with_what_to_install(monkeypatch):
    import onnxruntime.quantization as q

    from omniguard_edge.calibration import ranges
    from omniguard_edge.calibration.quantize import RecipeError, check_options

    def quantize_static(model_input, model_output, calibration_data_reader=None):  # an older signature
        raise AssertionError("not to be called")

    monkeypatch.setattr(q, "quantize_static", quantize_static)
    with pytest.raises(RuntimeError, match="takes no calibration_cache_path.*onnxruntime==1.32"):
        ranges.check_cache_support()
    # refused before anything is done, as a recipe error; the other recipes do not need it
    with pytest.raises(RecipeError, match="trt-int8: onnxruntime .* takes no calibration_cache_path"):
        check_options("trt-int8", calibration=None)
    assert check_options("orin", calibration=None)[0].name == "orin"
