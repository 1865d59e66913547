"""The GPU targets without a GPU (runtime/gpu.py): optimization profiles against the manifest and the limits, the
providers' options, engine keys and the refusal of stale or foreign engines, and the error paths (no GPU, no
TensorRT, a TensorRT version not supported, no GPU provider in this onnxruntime). What needs a GPU is not run here:
building and running engines (docs/gpu.md "Jetson and GPU")."""

from __future__ import annotations

import json
import os
import stat
import types
from pathlib import Path

import numpy as np
import pytest

from omniguard_edge.runtime import gpu
from omniguard_edge.runtime.errors import BundleError, EngineError, GpuError, InputError
from omniguard_edge.runtime.manifest import load_manifest


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return load_manifest(tiny_bundle, verify="none")


def _dims(profile, which):
    return {name: shapes[which] for name, shapes in profile.shapes.items()}


def test_profiles_cover_every_input_of_the_manifest_with_its_fixed_dimensions(manifest):
    profs = gpu.profiles(manifest)
    assert set(profs) == {"vision", "audio", "decoder"}
    for graph, prof in profs.items():
        spec = manifest.graphs[graph]
        assert list(prof.shapes) == [i.name for i in spec.inputs]  # binding names, in the manifest's order
        for inp in spec.inputs:
            lo, opt, hi = prof.shapes[inp.name]
            assert len(lo) == len(opt) == len(hi) == len(inp.shape)
            for k, d in enumerate(inp.shape):
                if isinstance(d, int):
                    assert lo[k] == opt[k] == hi[k] == d, (graph, inp.name)
                assert 0 <= lo[k] <= opt[k] <= hi[k]


def test_profiles_from_the_limits_hand_computed(manifest):
    # tiny: merge 2 (4 patches per token), n_window 100 (chunks of 200 mel frames), 100 mel frames per second
    profs = gpu.profiles(manifest, {"max_prompt_tokens": 1000, "max_image_tokens": 300, "max_audio_seconds": 7.5,
                                    "new_tokens": 24})
    v = profs["vision"].shapes
    assert v["pixel_values"] == ((4, 1176), (1024, 1176), (1200, 1176))  # 1 token, opt 256, max 300 tokens
    assert v["window_index"] == ((1,), (256,), (300,))
    # padded batches: windows of up to 64 patches (at least one token each), opt 1024 / 64; up to 4 frames
    assert v["win_gather"] == ((1, 4), (16, 64), (300, 64)) and v["win_lens"] == ((1,), (16,), (300,))
    assert v["full_gather"] == ((1, 4), (1, 1024), (4, 1200)) and v["full_scatter"] == ((4,), (1024,), (1200,))
    a = profs["audio"].shapes
    # 750 frames in up to 4 clips: ceil(750 / 200) + 3 = 7 chunks of at most 200 frames; opt 5 s = 500 frames = 3
    # chunks; tokens <= 750 // 4 + 7
    assert a["padded_feature"] == ((1, 128, 4), (3, 128, 200), (7, 128, 200))
    assert a["pool_index"] == ((1,), (125,), (194,))
    d = profs["decoder"].shapes
    assert d["inputs_embeds"] == ((1, 1, 64), (1, 256, 64), (1, 1000, 64))
    # past: the prompt, the answer's 24 tokens and the 32 rows the category scores continue into, less the last
    assert d["past_key_0"] == ((1, 2, 0, 16), (1, 2, 384, 16), (1, 2, 1000 + 24 + 32 - 1, 16))
    # TensorRT checks every layer at min, opt and max: the mask's length is past + seq at each of them
    for which in range(3):
        assert d["attention_mask"][which][1] == d["past_key_1"][which][2] + d["inputs_embeds"][which][1]


def test_a_modality_limited_to_zero_has_no_profile_and_bad_limits_are_refused(manifest):
    assert set(gpu.profiles(manifest, {"max_image_tokens": 0, "max_audio_seconds": 0})) == {"decoder"}
    for bad, match in [({"max_prompt_tokens": 0}, "--max-prompt-tokens must be >= 1"),
                       ({"max_prompt_tokens": 1.5}, "--max-prompt-tokens must be a whole number"),
                       ({"max_audio_seconds": float("nan")}, "--max-audio-seconds must be a number"),
                       ({"max_image_tokens": -1}, "--max-image-tokens must be a whole number"),
                       ({"new_tokens": 0}, "--new-tokens must be >= 1"),
                       ({"max_tokens": 5}, "unknown limit 'max_tokens'")]:
        with pytest.raises(InputError, match=match):
            gpu.profiles(manifest, bad)


def test_an_input_dimension_no_profile_bounds_is_a_bundle_error(manifest):
    spec = manifest.graphs["decoder"]
    inputs = [types.SimpleNamespace(name=i.name, shape=["batch", "chunk", 64] if i.name == "inputs_embeds" else
                                    i.shape) for i in spec.inputs]
    fake = types.SimpleNamespace(graphs={"decoder": types.SimpleNamespace(file=spec.file, inputs=inputs)},
                                 vision=manifest.vision, audio=manifest.audio)
    with pytest.raises(BundleError, match="input inputs_embeds has a dimension 'chunk' no profile bounds"):
        gpu.profiles(fake)
    no_decoder = types.SimpleNamespace(graphs={"decoder_gqa": spec}, vision=manifest.vision, audio=manifest.audio)
    with pytest.raises(BundleError, match="no standard-ops decoder"):
        gpu.profiles(no_decoder)


def test_profile_option_strings_parse_back_to_the_shapes(manifest):
    prof = gpu.profiles(manifest)["decoder"]
    strings = prof.option_strings()
    for which, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        parsed = {}
        for item in strings[key].split(","):
            name, dims = item.split(":")
            parsed[name] = tuple(int(x) for x in dims.split("x"))
        assert parsed == _dims(prof, which)


def test_a_run_outside_the_profile_is_refused_naming_the_limit(manifest):
    prof = gpu.profiles(manifest, {"max_prompt_tokens": 100})["decoder"]
    ok = {name: np.zeros(shape, np.float32) for name, shape in _dims(prof, 1).items()}
    prof.check(ok)
    long = dict(ok, inputs_embeds=np.zeros((1, 101, 64), np.float32))
    with pytest.raises(InputError, match=r"inputs_embeds has shape \[1, 101, 64\], outside .*\(seq: --max-prompt-tokens 100\)"):
        prof.check(long)
    with pytest.raises(InputError, match="outside its TensorRT profile"):
        prof.check(dict(ok, inputs_embeds=np.zeros((101, 64), np.float32)))  # wrong rank

    class Inner:
        input_names, runs = ("inputs_embeds",), []

        def run(self, feeds, outputs=None, run_options=None):
            self.runs.append(feeds)
            return {}

    wrapped = gpu.Profiled(Inner(), prof)
    wrapped.run(ok)
    with pytest.raises(InputError):
        wrapped.run(long)
    assert len(Inner.runs) == 1 and wrapped.input_names == ("inputs_embeds",)  # the refused run never ran


def test_provider_options(manifest, tmp_path):
    prof = gpu.profiles(manifest)["decoder"]
    chain = gpu.provider_options("tensorrt", "decoder", "int8", prof, tmp_path / "c", device_id=1)
    assert [name for name, _ in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                           "CPUExecutionProvider"]
    trt = chain[0][1]
    assert trt["device_id"] == 1 and trt["trt_int8_enable"] is True and trt["trt_fp16_enable"] is False
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(tmp_path / "c")
    assert trt["trt_timing_cache_path"] == str(tmp_path / "c")
    assert trt["trt_profile_max_shapes"] == prof.option_strings()["trt_profile_max_shapes"]
    # an fp16 or INT4 graph carries its precision in its types: no flag that would lower fp32 islands to fp16
    for precision in ("fp16", "int4", "fp32"):
        opts = gpu.provider_options("tensorrt", "decoder", precision, prof, tmp_path)[0][1]
        assert not opts["trt_fp16_enable"] and not opts["trt_int8_enable"]
    cuda = gpu.provider_options("cuda", "vision", "fp32")
    assert [n for n, _ in cuda] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cuda[0][1]["use_tf32"] is False and cuda[0][1]["arena_extend_strategy"] == "kSameAsRequested"
    assert gpu.provider_options("cpu", "vision", "fp32") == [("CPUExecutionProvider", {})]
    with pytest.raises(InputError, match="--provider must be one of cpu, cuda, tensorrt, tensorrt-native, not .rocm."):
        gpu.provider_options("rocm", "vision", "fp32")
    with pytest.raises(InputError, match="--device-id must be an int >= 0"):
        gpu.provider_options("cuda", "vision", "fp32", device_id=-1)
    with pytest.raises(ValueError, match="needs the graph's profile and an engine cache folder"):
        gpu.provider_options("tensorrt", "decoder", "fp32", prof)


def test_graph_precision_of_every_gpu_recipe():
    from omniguard_edge.runtime.recipes import RECIPES

    expected = {"gpu-fp16": {"fp16"}, "trt-int8": {"int8"}, "orin": {"fp16", "int4"}}
    for name, want in expected.items():
        got = {gpu.graph_precision(types.SimpleNamespace(precision=p.precision, file=g))
               for g, p in RECIPES[name].graphs.items() if g in gpu.GRAPHS}
        assert got == want, name
    with pytest.raises(BundleError, match="precision 'bf16' is none of"):
        gpu.graph_precision(types.SimpleNamespace(precision="bf16", file="x.onnx"))


def _key(manifest, **change):
    prof = gpu.profiles(manifest)["decoder"]
    key = gpu.engine_key(manifest, "decoder", prof, "8.7", "10.3.0", "1.20.0")
    return gpu.EngineKey(**{**key.__dict__, **change})


def _built(cache: Path, key) -> Path:
    """An engine folder as build-engines leaves it (its engine a stand-in: none can be built here)."""
    folder = cache / key.folder
    folder.mkdir(parents=True)
    (folder / "x.engine").write_bytes(b"engine")
    (folder / gpu.ENGINE_FILE).write_text(json.dumps({**key.to_json(), "files": {"x.engine": 6}, "status": "built"}))
    return folder


def test_engine_keys_change_with_every_field_and_name_the_graph(manifest):
    base = _key(manifest)
    assert base.folder.startswith("decoder-fp32-sm87-trt10.3.0-")
    assert base.onnx_sha256 == gpu.graph_sha256(manifest, "decoder") and len(base.onnx_sha256) == 64
    changes = {"onnx_sha256": "0" * 64, "compute_capability": "8.9", "tensorrt": "10.7.0", "onnxruntime": "1.22.0",
               "precision": "fp16", "profile": {"x": [[1], [1], [2]]}}
    folders = {_key(manifest, **{k: v}).folder for k, v in changes.items()}
    assert len(folders) == len(changes) and base.folder not in folders


def test_engines_built_for_this_key_are_used_only_with_their_files(manifest, tmp_path):
    key = _key(manifest)
    folder = _built(tmp_path, key)
    assert gpu.check_engine(tmp_path, key) == folder
    # onnxruntime would rebuild a missing or changed engine as the session opens: refused instead
    (folder / "x.engine").write_bytes(b"truncated engine")
    with pytest.raises(EngineError, match="its engine files are not the ones built"):
        gpu.check_engine(tmp_path, key)
    (folder / "x.engine").unlink()
    with pytest.raises(EngineError, match="its engine files are not the ones built"):
        gpu.check_engine(tmp_path, key)


@pytest.mark.parametrize("field,value", [("onnx_sha256", "f" * 64), ("compute_capability", "8.9"),
                                         ("tensorrt", "10.7.0"), ("onnxruntime", "1.22.0"), ("precision", "int8")])
def test_stale_or_foreign_engines_are_refused_saying_what_differs(manifest, tmp_path, field, value):
    _built(tmp_path, _key(manifest, **{field: value}))
    with pytest.raises(EngineError, match=rf"no decoder engine for this bundle.*refused, not rebuilt.*differs in "
                                          rf"{field}.*build-engines"):
        gpu.check_engine(tmp_path, _key(manifest))


def test_engines_for_other_limits_are_refused(manifest, tmp_path):
    other = gpu.profiles(manifest, {"max_prompt_tokens": 512})["decoder"]
    key = gpu.engine_key(manifest, "decoder", other, "8.7", "10.3.0", "1.20.0")
    _built(tmp_path, key)
    with pytest.raises(EngineError, match="differs in profile"):
        gpu.check_engine(tmp_path, _key(manifest))


def test_a_record_that_does_not_match_its_folder_or_cannot_be_read_is_refused(manifest, tmp_path):
    key = _key(manifest)
    folder = _built(tmp_path, key)
    (folder / gpu.ENGINE_FILE).write_text(json.dumps({**key.to_json(), "tensorrt": "10.4.0"}))  # copied over
    with pytest.raises(EngineError, match="built for another tensorrt; run build-engines --rebuild"):
        gpu.check_engine(tmp_path, key)
    (folder / gpu.ENGINE_FILE).write_text("{not json")
    with pytest.raises(EngineError, match="unreadable"):
        gpu.check_engine(tmp_path, key)


def test_no_engines_at_all_says_to_build_them(manifest, tmp_path):
    with pytest.raises(EngineError, match="no decoder engine built; build them first with `omniguard-edge "
                                          "build-engines"):
        gpu.check_engine(tmp_path / "absent", _key(manifest))


@pytest.mark.parametrize("version,ok", [("10.3.0", True), ("10.3.0.26", True), ("10.7.0", True), ("11.0.1", True),
                                        ("10.2.0", False), ("8.6.1", False), ("12.0", False), ("ten", False)])
def test_tensorrt_versions(version, ok):
    if ok:
        assert gpu.check_tensorrt_version(version) == version
    else:
        with pytest.raises(GpuError, match="TensorRT 10.3 or later|not a version number"):
            gpu.check_tensorrt_version(version)


def test_no_tensorrt_says_where_it_comes_from(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_trt(name, *a, **k):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_trt)
    with pytest.raises(GpuError, match="TensorRT's Python bindings are not installed: on a Jetson they come with "
                                       "JetPack"):
        gpu.tensorrt_version()


def _fake_smi(folder: Path, body: str) -> None:
    folder.mkdir(exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + body)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)


def _no_cuda_python(monkeypatch):
    import sys

    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_probe_reads_nvidia_smi(monkeypatch, tmp_path):
    _no_cuda_python(monkeypatch)
    _fake_smi(tmp_path / "bin", 'echo "Orin (nvgpu), 8.7, 7620"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    info = gpu.probe_gpu()
    assert (info.name, info.compute_capability, info.memory_bytes, info.source) == \
        ("Orin (nvgpu)", "8.7", 7620 * 2**20, "nvidia-smi")


def test_no_gpu_is_a_clear_error(monkeypatch, tmp_path):
    _no_cuda_python(monkeypatch)
    _fake_smi(tmp_path / "bin", 'echo "No devices were found" >&2; exit 6\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(GpuError, match="no NVIDIA GPU 0 found .*cuda-python: not installed; nvidia-smi: exit 6 No "
                                       "devices were found"):
        gpu.probe_gpu()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GpuError, match="nvidia-smi: not found"):
        gpu.probe_gpu()


def test_an_onnxruntime_without_the_provider_is_named():
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    with pytest.raises(GpuError, match="has no TensorrtExecutionProvider .*install onnxruntime-gpu"):
        gpu.check_provider("tensorrt")
    assert "onnxruntime-gpu" in gpu.environment_error("cuda")
    assert gpu.environment_error("cpu") is None


class _FakeSession:
    """Stands in for onnxruntime's InferenceSession under a GPU provider (there is none here): records the
    providers each graph was opened with, and `rebuild` writes a new engine into the cache as it opens (what
    onnxruntime's TensorRT provider does when it finds its cached engine unusable)."""

    opened: list = []
    rebuild = False

    def __init__(self, path, so=None, providers=None):
        type(self).opened.append((Path(path).name, providers))
        self.providers = [p if isinstance(p, str) else p[0] for p in providers]
        first = providers[0]
        if type(self).rebuild and not isinstance(first, str) and "trt_engine_cache_path" in first[1]:
            (Path(first[1]["trt_engine_cache_path"]) / "rebuilt.engine").write_bytes(b"new")

    def get_providers(self):
        return self.providers

    def get_inputs(self):
        return []

    get_outputs = get_inputs


def _stand_in_machine(monkeypatch):
    """A GPU (sm 8.7) and TensorRT 10.3, where the providers and the engine builder look them up."""
    from omniguard_edge.runtime import engine_build, providers

    for module in (providers, engine_build):
        monkeypatch.setattr(module, "probe_gpu", lambda device_id=0: gpu.GpuInfo("stand-in", "8.7", None, "test"))
        monkeypatch.setattr(module, "tensorrt_version", lambda: "10.3.0")


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """onnxruntime with the TensorRT and CUDA providers, a GPU (sm 8.7) and TensorRT 10.3: stand-ins, so that what
    open_bundle does with them can be checked here."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(gpu.PROVIDERS["tensorrt"]))
    _stand_in_machine(monkeypatch)
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(_FakeSession, "opened", [])
    monkeypatch.setattr(_FakeSession, "rebuild", False)
    return _FakeSession


def test_open_bundle_checks_engines_before_any_session(tiny_bundle, tmp_path, stand_in_gpu):
    """Under TensorRT, a bundle without engines for this GPU is refused at open, before a session exists (never built
    mid-request); with them, each graph opens on its engine folder, behind its profile; a graph with no profile (a
    limit of 0) opens on CUDA, never on a bare TensorRT provider; an engine onnxruntime rebuilds as the session opens
    is refused."""
    import onnxruntime as ort

    from omniguard_edge.runtime.bundle import SessionOptions, open_bundle

    cache = tmp_path / "engines"
    options = SessionOptions(providers=gpu.PROVIDERS["tensorrt"], engine_cache=cache)
    with pytest.raises(EngineError, match="no vision engine built"):
        open_bundle(tiny_bundle, options)
    assert not stand_in_gpu.opened

    m = load_manifest(tiny_bundle, verify="none")
    folders = {g: _built(cache, gpu.engine_key(m, g, p, "8.7", "10.3.0", ort.__version__))
               for g, p in gpu.profiles(m).items()}
    bundle = open_bundle(tiny_bundle, options)
    chains = {name: providers for name, providers in stand_in_gpu.opened}
    assert set(chains) == {"vision.onnx", "audio.onnx", "decoder.onnx"}
    for graph, folder in folders.items():
        chain = chains[f"{graph}.onnx"]
        assert [p for p, _ in chain] == list(gpu.PROVIDERS["tensorrt"])
        assert chain[0][1]["trt_engine_cache_path"] == str(folder)
        assert isinstance(bundle.sessions[graph], gpu.Profiled)

    stand_in_gpu.opened.clear()
    no_images = SessionOptions(providers=gpu.PROVIDERS["tensorrt"], engine_cache=cache, limits={"max_image_tokens": 0})
    bundle = open_bundle(tiny_bundle, no_images)
    chains = dict(stand_in_gpu.opened)
    assert [p for p, _ in chains["vision.onnx"]] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert not isinstance(bundle.sessions["vision"], gpu.Profiled)

    stand_in_gpu.rebuild = True
    with pytest.raises(EngineError, match="onnxruntime built a new vision engine as the session opened"):
        open_bundle(tiny_bundle, options)


def test_a_guard_over_engines_keeps_within_their_budget_and_fits_images_to_them(tiny_bundle, media_dir):
    """A Guard whose decoder runs TensorRT engines refuses an answer budget larger than the engines were built for
    (decoding would leave the profile part-way), and fits an image to the vision profile as to the memory budget.
    The engines' profiles are put on CPU sessions here (Profiled checks every run)."""
    from omniguard_edge.runtime.bundle import SessionOptions, open_bundle
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    bundle = open_bundle(tiny_bundle, SessionOptions(decoder_graph="decoder"))
    profs = gpu.profiles(bundle.manifest, {"max_image_tokens": 64})
    for g in ("vision", "audio", "decoder"):
        bundle.sessions[g] = gpu.Profiled(bundle.sessions[g], profs[g])
    with pytest.raises(InputError, match="mode 'full' answers in up to 256 tokens, but the TensorRT engines are for "
                                         "--new-tokens 32: build and open them with --new-tokens 256"):
        Guard(bundle, GuardOptions(mode="full"))
    guard = Guard(bundle, GuardOptions())
    result = guard.moderate(text="What is this?", image=str(media_dir / "colour_640x480.jpg"))
    assert result.verdict in ("safe", "unsafe"), result.error
    assert any("downscaled" in n for n in result.notes), result.notes
    many = guard.moderate(text="x" * 10, audio=[str(media_dir / n) for n in sorted(os.listdir(media_dir))
                                                 if n.endswith(".wav")])
    assert many.verdict in ("safe", "unsafe"), many.error


def test_cpu_path_is_unchanged_and_unavailable_gpu_providers_warn_and_fall_back(tiny_bundle):
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.warns(RuntimeWarning, match="not available in this onnxruntime build"):
        guard = Guard.from_bundle(tiny_bundle, GuardOptions(session=SessionOptions(providers=gpu.PROVIDERS["cuda"])))
    assert guard.bundle.decoder_graph == "decoder"  # a GPU chain runs the standard-ops decoder
    assert all(p == ["CPUExecutionProvider"] for p in guard.bundle.providers.values())
    result = guard.moderate(text="How do I bake bread?")
    assert result.verdict in ("safe", "unsafe"), result.error


def test_build_engines_dry_run_and_refusals(tiny_bundle, tmp_path, capsys):
    from omniguard_edge.cli import main

    assert main(["build-engines", "--bundle", str(tiny_bundle), "--dry-run", "--json", "--max-prompt-tokens",
                 "512"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["graph"] for r in records] == ["vision", "audio", "decoder"]
    dec = records[2]
    assert dec["cache"] == str(gpu.default_cache(tiny_bundle))
    assert "inputs_embeds:1x512x64" in dec["profile"]["trt_profile_max_shapes"]
    assert main(["build-engines", "--bundle", str(tiny_bundle), "--out", str(tiny_bundle / "eng"), "--dry-run"]) == 1
    assert "engines go beside the bundle, not inside it" in capsys.readouterr().err
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        assert main(["build-engines", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "e")]) == 1
        err = capsys.readouterr().err
        assert "GpuError: onnxruntime" in err and "has no TensorrtExecutionProvider" in err
        assert not (tmp_path / "e").exists()  # refused before anything was written


def test_gpu_check_reports_every_gpu_step_skipped_here_with_the_reason(tiny_bundle, tmp_path):
    """benchmarks/gpu_check.py on a machine without a GPU: nothing fails, every GPU step says why it skipped."""
    import subprocess
    import sys

    import onnxruntime as ort

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this onnxruntime has a GPU provider")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(script), "--bundle", str(tiny_bundle), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert steps["environment"]["status"] == "ok" and report["passed"]
    for name in ("engines", "parity_cuda", "parity_tensorrt"):
        assert steps[name]["status"] == "skipped" and "onnxruntime" in steps[name]["reason"], (name, steps[name])
    assert "PASSED" in proc.stdout


def test_gpu_check_parity_step_against_the_cpu_itself(tiny_bundle, tmp_path):
    """The parity step, run with the CPU as the 'other' provider (what a GPU machine runs with cuda/tensorrt):
    every built-in request answered by both, equal verdicts, |dP(unsafe)| 0."""
    from benchmarks import gpu_check

    got = gpu_check.parity(tiny_bundle, "cpu", tmp_path)
    assert got["status"] == "ok", got
    assert got["agreement"] == "7/7" and got["max_abs_dp"] == 0.0
    assert all(r["error"] is None and r["verdict_cpu"] == r["verdict_checked"] in ("safe", "unsafe")
               for r in got["rows"])
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        # asked to check CUDA where onnxruntime falls back to the CPU: equal answers, and still a failure
        with pytest.warns(RuntimeWarning, match="not available"):
            fell = gpu_check.parity(tiny_bundle, "cuda", tmp_path)
        assert fell["status"] == "failed" and fell["max_abs_dp"] == 0.0
        assert set(fell["not_on_the_provider"]) == {"vision", "audio", "decoder"}


def test_a_resident_kv_cache_answers_exactly_as_the_host_one(tiny_bundle, media_dir):
    """kv_on_device: the standard decoder's present tensors stay OrtValues on the session's device and are bound as
    the next past, the policy prefix cache too (on a GPU that is device memory; here the CPU's, the same code). The
    answers, scores and cached-prefix reuse are those of the host path, token for token."""
    import onnxruntime as ort

    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.decode import Decoder, kv_nbytes
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    def guard(resident, mode):
        return Guard.from_bundle(tiny_bundle, GuardOptions(mode=mode, session=SessionOptions(
            decoder_graph="decoder", kv_on_device=resident)), verify="none")

    requests = [{"text": "How do I bake bread?"}, {"text": "How do I pick a lock?", "response": "Use a pick."},
                {"text": "What is this?", "image": str(media_dir / "colour_517x333.png")},
                {"text": "How do I bake bread?"}]
    for mode in ("categories", "full"):
        host, res = guard(False, mode), guard(True, mode)
        assert res.decoder.resident and not host.decoder.resident
        for req in requests:
            a, b = host.moderate(**req), res.moderate(**req)
            assert b.error is None and b.verdict in ("safe", "unsafe"), b.error
            assert (a.verdict, a.generated_ids, a.category_scores, a.cached_prompt_tokens) == \
                (b.verdict, b.generated_ids, b.category_scores, b.cached_prompt_tokens)
            assert a.p_unsafe == pytest.approx(b.p_unsafe, abs=1e-6)
        entry = res.prefixes.get("text")
        assert entry is not None and all(isinstance(p, ort.OrtValue) for p in entry.past)
        assert entry.nbytes == host.prefixes.get("text").nbytes > 0
    # a part of a resident cache comes to the host; the whole of it stays as it is
    whole = [ort.OrtValue.ortvalue_from_numpy(np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4))]
    assert Decoder.first(whole, 3)[0] is whole[0]
    part = Decoder.first(whole, 2)[0]
    np.testing.assert_array_equal(part, np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)[:, :, :2])
    assert kv_nbytes(whole[0]) == 96
    with pytest.raises(ValueError, match="kv_on_device must be None, True or False"):
        SessionOptions(kv_on_device="yes")


def test_moderate_refuses_what_only_tensorrt_uses_on_other_providers(tiny_bundle, capsys):
    from omniguard_edge.cli import main

    base = ["moderate", "--bundle", str(tiny_bundle), "--text", "How do I bake bread?"]
    for extra, message in [(["--max-prompt-tokens", "100"], "--max-prompt-tokens: only with --provider tensorrt"),
                           (["--provider", "cuda", "--new-tokens", "8", "--engines", "e"],
                            "--new-tokens, --engines: only with --provider tensorrt"),
                           (["--device-id", "1"], "--device-id: only with --provider cuda or tensorrt")]:
        assert main(base + extra) == 1, extra
        assert message in capsys.readouterr().err
    assert main(base) == 0  # the CPU default answers


def test_the_native_backend_refuses_clearly_without_a_gpu_or_its_plans(tiny_bundle, tmp_path, monkeypatch):
    """--provider tensorrt-native (experimental, never run): it cannot fall back as onnxruntime's providers do, so
    no GPU is an error at open; with a GPU (stood in for) but engines built without --native, the missing plan is."""
    import onnxruntime as ort

    from omniguard_edge.runtime.bundle import SessionOptions, open_bundle

    options = SessionOptions(providers=gpu.PROVIDERS["tensorrt-native"], engine_cache=tmp_path)
    if gpu.environment_error("cuda") is not None:
        with pytest.raises(GpuError, match="no NVIDIA GPU 0 found"):
            open_bundle(tiny_bundle, options)
    assert gpu.environment_error("tensorrt-native") is not None or importlib_has("tensorrt")
    _stand_in_machine(monkeypatch)
    m = load_manifest(tiny_bundle, verify="none")
    for g, p in gpu.profiles(m).items():
        _built(tmp_path, gpu.engine_key(m, g, p, "8.7", "10.3.0", ort.__version__))
    with pytest.raises(EngineError, match=r"no native TensorRT plan \(vision.plan\); build it with .*--native"):
        open_bundle(tiny_bundle, options)


def importlib_has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
