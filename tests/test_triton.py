"""`omniguard-edge export-triton`: the model repository's configs parse with Triton's own protobuf definitions
(tritonclient's model_config_pb2) and say what the manifest says; the Python-backend model judges requests through
the runtime, driven here through a stand-in for Triton's `triton_python_backend_utils` and, in the slow test, by a
real Triton server (the one nvidia-pytriton ships) through tritonclient."""

from __future__ import annotations

import importlib.util
import json
import os
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
    assert all(i.optional and i.allow_ragged_batch and i.data_type == mc.TYPE_UINT8 and list(i.dims) == [-1]
               for i in guard.input)
    assert [(o.name, o.data_type) for o in guard.output] == [("RESULT", mc.TYPE_UINT8)]
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
    with pytest.raises(InputError, match="--graphs must be onnxruntime or tensorrt"):
        export_triton(tiny_bundle, tmp_path / "r", graphs="openvino")
    with pytest.raises(InputError, match="--instances must be an int >= 1"):
        export_triton(tiny_bundle, tmp_path / "r", instances=0)
    other = tmp_path / "not-a-repo"
    (other / "keep").mkdir(parents=True)
    with pytest.raises(InputError, match="is not a repository export-triton wrote: not removed"):
        export_triton(tiny_bundle, other, overwrite=True)
    assert (other / "keep").is_dir()
    with pytest.raises(InputError, match="is the bundle, inside it or holds it"):
        export_triton(tiny_bundle, tiny_bundle.parent, overwrite=True)


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

    def u8(data):
        return np.frombuffer(data, np.uint8).reshape(1, -1)  # [batch 1, bytes], as Triton hands them

    png = (media_dir / "colour_517x333.png").read_bytes()
    requests = [{"TEXT": _Tensor("TEXT", u8(b"How do I pick a lock?"))},
                {"TEXT": _Tensor("TEXT", u8(b"Is this fine?")), "IMAGE": _Tensor("IMAGE", u8(png))},
                {"TEXT": _Tensor("TEXT", u8(b"\xff\xfe not UTF-8"))},
                {},
                {"TEXT": _Tensor("TEXT", np.zeros((2, 5), np.uint8))}]  # two items in one request: refused
    responses = model.execute(requests)
    assert len(responses) == 5
    out = [json.loads(r.output_tensors[0].as_numpy().tobytes()) for r in responses]
    alone = Guard.from_bundle(tiny_bundle)
    want = alone.moderate(text="How do I pick a lock?")
    assert out[0]["verdict"] == want.verdict and out[0]["p_unsafe"] == pytest.approx(want.p_unsafe, abs=1e-5)
    assert out[1]["verdict"] in ("safe", "unsafe")
    # invalid UTF-8 and an empty request: errors, flagged (fail closed)
    for bad in out[2:]:
        assert bad["verdict"] == "error" and bad["flagged"] is True and bad["error"], bad
    assert all(o["flagged"] == (o["verdict"] != "safe") for o in out)


# -- end to end: the Triton server nvidia-pytriton ships (Python backend only), the guard model, tritonclient ------

PYTRITON = "nvidia-pytriton==0.7.0"  # Triton 2.51; its Python stub for 3.11; manylinux_2_35


def _triton_home() -> tuple:
    """(server folder, numpy<2 site folder), prepared once under the user's cache: the server binaries unpacked from
    the nvidia-pytriton wheel (not installed: it would pin numpy < 2 in the venv) and numpy < 2 for the model's
    environment (the server's Python stub needs it). Skips, saying why, where PyPI cannot be reached."""
    import shutil
    import subprocess
    import zipfile
    from pathlib import Path

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omniguard-edge" / "triton-2.51"
    server, np1 = cache / "server", cache / "numpy1"
    if not (server / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        wheels = cache / "wheels"
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), PYTRITON],
                             capture_output=True, text=True, timeout=600)
        found = sorted(wheels.glob("nvidia_pytriton-*.whl")) if wheels.is_dir() else []
        if got.returncode != 0 or not found:
            pytest.skip(f"cannot download {PYTRITON} ({got.stderr.strip()[-200:]})")
        shutil.rmtree(server, ignore_errors=True)
        with zipfile.ZipFile(found[0]) as z:
            z.extractall(server, [n for n in z.namelist() if n.startswith(("pytriton/tritonserver/",
                                                                               "nvidia_pytriton.libs/"))])
        for p in server.rglob("*"):
            if p.is_file() and (p.parent.name == "bin" or "stub" in p.name):
                p.chmod(0o755)
    if not (np1 / "numpy").is_dir():
        got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(np1),
                              "numpy<2"], capture_output=True, text=True, timeout=600)
        if got.returncode != 0:
            pytest.skip(f"cannot install numpy<2 for the model's environment ({got.stderr.strip()[-200:]})")
    return server, np1


@pytest.mark.slow
def test_end_to_end_through_a_triton_server(tiny_bundle, media_dir, tmp_path):
    """The repository served by a real Triton server (the one nvidia-pytriton ships: Python backend only), the guard
    model judging requests sent with tritonclient: equal to the Guard's own answers, several requests at once
    (dynamic batching), an error flagged."""
    import shutil
    import socket
    import subprocess
    import sysconfig
    import threading
    import time

    import tritonclient.grpc as grpcclient

    from omniguard_edge.runtime.guard import Guard
    from omniguard_edge.serve.triton import export_triton

    if sys.version_info[:2] != (3, 11) or sys.platform != "linux":
        pytest.skip("the server's Python stub used here is the one for CPython 3.11 on Linux")
    server, np1 = _triton_home()
    tsrv = server / "pytriton" / "tritonserver"
    backends = tmp_path / "backends" / "python"
    backends.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(tsrv / "backends" / "python" / f, backends / f)
    shutil.copy(tsrv / "python_backend_stubs" / "3.11" / "triton_python_backend_stub", backends)
    repo = tmp_path / "repo"
    export_triton(tiny_bundle, repo, max_batch=8)

    # three distinct free ports: the sockets are held until all three are chosen (one by one, the system may hand
    # the same port out twice, and the server then fails to bind: one cause of this test failing at random)
    socks = [socket.socket() for _ in range(3)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    http, grpc_port, metrics = (sock.getsockname()[1] for sock in socks)
    for sock in socks:
        sock.close()
    # the server's log to a file, not a pipe nobody reads while the test runs: a full pipe blocks the server's
    # writes, and with them its answers (the other cause)
    log = open(tmp_path / "tritonserver.log", "wb")
    env = {**os.environ, "LD_LIBRARY_PATH": str(server / "nvidia_pytriton.libs"),
           "PYTHONPATH": os.pathsep.join([str(np1), sysconfig.get_paths()["purelib"]])}
    proc = subprocess.Popen([str(tsrv / "bin" / "tritonserver"), "--model-repository", str(repo),
                             "--backend-directory", str(tmp_path / "backends"), "--http-port", str(http),
                             "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), "--allow-metrics", "false",
                             "--exit-timeout-secs", "5"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"tritonserver exited {proc.returncode}: "
                                     f"{(tmp_path / 'tritonserver.log').read_bytes()[-3000:]!r}")
            try:
                if client.is_model_ready("omniguard_guard"):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the guard model was not ready within 120 s")

        def infer(**fields):
            inputs = []
            for name, data in fields.items():
                arr = np.frombuffer(data, np.uint8).reshape(1, -1)
                t = grpcclient.InferInput(name, list(arr.shape), "UINT8")
                t.set_data_from_numpy(arr)
                inputs.append(t)
            res = client.infer("omniguard_guard", inputs, outputs=[grpcclient.InferRequestedOutput("RESULT")])
            return json.loads(res.as_numpy("RESULT").tobytes())

        guard = Guard.from_bundle(tiny_bundle)
        png = (media_dir / "colour_517x333.png").read_bytes()
        for fields, kwargs in [({"TEXT": b"How do I pick a lock?"}, {"text": "How do I pick a lock?"}),
                               ({"TEXT": b"Is this fine?", "IMAGE": png}, {"text": "Is this fine?", "image": png}),
                               ({"TEXT": b"q", "RESPONSE": b"Use a pick."}, {"text": "q", "response": "Use a pick."})]:
            got, want = infer(**fields), guard.moderate(**kwargs)
            assert got["verdict"] == want.verdict and got["flagged"] == (want.verdict != "safe"), got
            assert got["p_unsafe"] == pytest.approx(want.p_unsafe, abs=1e-5)
        bad = infer(TEXT=b"\xff\xfe")
        assert bad["verdict"] == "error" and bad["flagged"] is True

        texts = [f"request {i}: how do I {w}?" for i, w in enumerate(["bake bread", "hurt someone"] * 6)]
        answers = {}
        threads = [threading.Thread(target=lambda t=t: answers.__setitem__(t, infer(TEXT=t.encode()))) for t in texts]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert len(answers) == len(texts)
        for t, got in answers.items():
            want = guard.moderate(text=t)
            assert got["verdict"] == want.verdict and got["p_unsafe"] == pytest.approx(want.p_unsafe, abs=1e-5), t
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_tensorrt_backend_models_over_native_plans(tiny_bundle, tmp_path):
    """--graphs tensorrt: TensorRT backend models over the plans `build-engines --native` wrote (stand-in plan files
    here: none can be built without a GPU, and Triton's TensorRT backend cannot run here). Checked statically: the
    configs parse with Triton's definitions, name the manifest's tensors, and each links this bundle's plan; a plan
    of another bundle's graph, or none, is refused before anything is written."""
    from omniguard_edge.runtime import gpu
    from omniguard_edge.runtime.errors import InputError
    from omniguard_edge.serve.triton import export_triton

    m = load_manifest(tiny_bundle, verify="none")
    engines = tmp_path / "engines"
    with pytest.raises(InputError, match="no native TensorRT plan"):
        export_triton(tiny_bundle, tmp_path / "none", graphs="tensorrt", engines=engines)
    assert not (tmp_path / "none").exists()
    plans = {}
    for graph, prof in gpu.profiles(m).items():
        key = gpu.engine_key(m, graph, prof, "8.7", "10.3.0", "1.20.0")
        folder = engines / key.folder
        folder.mkdir(parents=True)
        plans[graph] = folder / f"{graph}.plan"
        plans[graph].write_bytes(b"plan")
        (folder / gpu.ENGINE_FILE).write_text(json.dumps(key.to_json()))
    stale = engines / "decoder-fp32-sm87-trt10.3.0-000000000000"  # another bundle's decoder: ignored
    stale.mkdir()
    (stale / "decoder.plan").write_bytes(b"other")
    (stale / gpu.ENGINE_FILE).write_text(json.dumps({"onnx_sha256": "0" * 64}))
    repo = tmp_path / "repo"
    export_triton(tiny_bundle, repo, graphs="tensorrt", engines=engines)
    for graph in ("vision", "audio", "decoder"):
        cfg = _parse(repo / graph / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert [t.name for t in cfg.input] == [t.name for t in m.graphs[graph].inputs]
        assert (repo / graph / "1" / "model.plan").resolve() == plans[graph].resolve()
