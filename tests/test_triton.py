"""`omniguard-edge export-triton`: the model repository's configs parse with Triton's own protobuf definitions
(tritonclient's model_config_pb2) and say what the manifest says; the Python-backend model judges requests through
the runtime. No Triton server runs here: the model's `execute` is driven through a stand-in for the
`triton_python_backend_utils` module that Triton provides (what Triton itself does with it is not checked)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="Triton's config definitions come with tritonclient[grpc] (dev extra)")
from google.protobuf import text_format  # noqa: E402

from omniguard_edge.runtime.manifest import load_manifest  # noqa: E402


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory):
    from omniguard_edge.serve.triton import export_triton

    out = tmp_path_factory.mktemp("triton") / "repo"
    export_triton(tiny_bundle, out, instances=2, max_batch=4, graphs="onnxruntime")
    return out


def test_configs_parse_with_tritons_definitions_and_follow_the_manifest(repo, tiny_bundle):
    mc = model_config_pb2
    guard = _parse(repo / "omniguard_guard" / "config.pbtxt")
    assert guard.backend == "python" and guard.max_batch_size == 4
    assert [i.name for i in guard.input] == ["TEXT", "RESPONSE", "IMAGE", "AUDIO", "VIDEO"]
    assert all(i.optional and i.data_type == mc.TYPE_STRING for i in guard.input)
    assert [(o.name, o.data_type) for o in guard.output] == [("RESULT", mc.TYPE_STRING)]
    assert guard.HasField("dynamic_batching") and guard.instance_group[0].count == 2
    assert guard.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert guard.parameters["bundle"].string_value == str(tiny_bundle.resolve())
    assert (repo / "omniguard_guard" / "1" / "model.py").is_file()
    manifest = load_manifest(tiny_bundle, verify="none")
    types_ = {"float32": mc.TYPE_FP32, "int64": mc.TYPE_INT64}
    for name in ("vision", "audio", "decoder"):
        cfg = _parse(repo / name / "config.pbtxt")
        spec = manifest.graphs[name]
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        for got, want in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
            assert [t.name for t in got] == [t.name for t in want]
            for t, w in zip(got, want):
                assert t.data_type == types_[w.dtype]
                assert list(t.dims) == [d if isinstance(d, int) else -1 for d in w.shape]
        model = repo / name / "1" / "model.onnx"
        assert model.resolve() == (tiny_bundle / spec.file).resolve()


def test_refusals(tiny_bundle, repo, tmp_path):
    from omniguard_edge.runtime.errors import InputError
    from omniguard_edge.serve.triton import export_triton

    with pytest.raises(InputError, match="exists"):
        export_triton(tiny_bundle, repo)
    with pytest.raises(InputError, match="--graphs must be onnxruntime"):
        export_triton(tiny_bundle, tmp_path / "r", graphs="tensorrt")
    with pytest.raises(InputError, match="--instances must be an int >= 1"):
        export_triton(tiny_bundle, tmp_path / "r", instances=0)


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


def _stand_in_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    pb.InferenceResponse = lambda output_tensors: types.SimpleNamespace(output_tensors=output_tensors)
    return pb


def test_the_python_model_judges_a_batch_of_requests(repo, tiny_bundle, media_dir, monkeypatch):
    from omniguard_edge.runtime.guard import Guard

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stand_in_pb_utils())
    spec = importlib.util.spec_from_file_location("triton_guard_model", repo / "omniguard_guard" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = (repo / "omniguard_guard" / "config.pbtxt").read_text()
    params = {k: {"string_value": v.string_value} for k, v in _parse(repo / "omniguard_guard" / "config.pbtxt")
              .parameters.items()}
    assert "omniguard_guard" in config
    model.initialize({"model_config": json.dumps({"parameters": params})})

    def strings(*values):
        return np.array([[v for v in values]], dtype=np.object_)  # [batch 1, n], as Triton hands them

    png = (media_dir / "colour_517x333.png").read_bytes()
    requests = [{"TEXT": _Tensor("TEXT", strings(b"How do I pick a lock?"))},
                {"TEXT": _Tensor("TEXT", strings(b"Is this fine?")), "IMAGE": _Tensor("IMAGE", strings(png))},
                {"TEXT": _Tensor("TEXT", strings(b"\xff\xfe not UTF-8"))},
                {}]
    responses = model.execute(requests)
    assert len(responses) == 4
    out = [json.loads(r.output_tensors[0].as_numpy()[0]) for r in responses]
    alone = Guard.from_bundle(tiny_bundle)
    want = alone.moderate(text="How do I pick a lock?")
    assert out[0]["verdict"] == want.verdict and out[0]["p_unsafe"] == pytest.approx(want.p_unsafe, abs=1e-5)
    assert out[1]["verdict"] in ("safe", "unsafe")
    # invalid UTF-8 and an empty request: errors, flagged (fail closed)
    for bad in out[2:]:
        assert bad["verdict"] == "error" and bad["flagged"] is True and bad["error"], bad
    assert all(o["flagged"] == (o["verdict"] != "safe") for o in out)
