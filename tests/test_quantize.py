"""Precision recipes on the tiny bundle: what each writes, its fidelity report and gate, and what it refuses.
No timing (benchmarks/latency.py measures the recipes)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from omniguard_edge.runtime import recipes
from omniguard_edge.runtime.errors import BundleError
from omniguard_edge.runtime.manifest import load_manifest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CPU_RECIPES = [name for name, r in recipes.RECIPES.items() if r.built and r.target == "cpu"]


def _onnx_ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.fixture(scope="module")
def quantized(tiny_bundle, tmp_path_factory):
    """Every built CPU recipe applied to the tiny bundle, with requests made here (no data folder)."""
    pytest.importorskip("onnx", reason="quantize needs onnx (the export extra)")
    from omniguard_edge.calibration.quantize import quantize_bundle

    root = tmp_path_factory.mktemp("recipes")
    out = {}
    for name in CPU_RECIPES:
        out[name] = quantize_bundle(tiny_bundle, name, out=root / name, calibration=None, progress=False,
                                    allow_failing=True)
    return out


def test_the_five_recipes_are_listed_and_typed(capsys):
    from omniguard_edge.cli import main

    assert list(recipes.RECIPES) == ["cpu-int8", "cpu-int4", "gpu-fp16", "trt-int8", "orin"]
    assert main(["recipes"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in recipes.RECIPES)
    assert main(["recipes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cpu-int4"]["graphs"]["decoder_gqa"]["method"] == "int4-block"
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipes.get_recipe("cpu-int3")
    with pytest.raises(ValueError, match="GraphPlan.method"):
        recipes.GraphPlan("int2")


@pytest.mark.parametrize("name", CPU_RECIPES)
def test_cpu_recipe_writes_a_quantized_bundle_that_passes_its_gate(quantized, tiny_bundle, name):
    result = quantized[name]
    recipe = recipes.get_recipe(name)
    m = load_manifest(result.out, verify="full")
    assert m.precision == recipe.precision and m.recipe["name"] == name
    gate = m.fidelity["gate"]
    assert gate["passed"], result.table()
    assert not gate["agreement_enforced"]  # the tiny checkpoint is a random-weight reference
    for graph, plan in recipe.graphs.items():
        if plan.method == "drop":
            assert graph not in m.graphs
            continue
        figures = m.fidelity["graphs"][graph]
        assert figures["n"] > 0 and figures["cosine"] >= plan.gate_cosine, (graph, figures)
        assert m.graphs[graph].precision == {"int8-dyn": "int8", "int4-block": "int4"}[plan.method]
    # the quantized kernels are really in the graphs
    assert "MatMulInteger" in _onnx_ops(result.out / m.graphs["vision"].file)
    want = "MatMulNBits" if recipe.graphs["decoder_gqa"].method == "int4-block" else "MatMulInteger"
    assert want in _onnx_ops(result.out / m.graphs["decoder_gqa"].file)
    if name == "cpu-int8":  # every down projection per token (calibration/per_token.py), the rest per run
        assert m.recipe["graphs_applied"]["decoder_gqa"]["per_token_matmuls"] == m.decoder.num_layers
        import onnx

        ops = [n.op_type for n in onnx.load(str(result.out / m.graphs["decoder_gqa"].file),
                                           load_external_data=False).graph.node]
        assert ops.count("DynamicQuantizeLinear") == 3 * m.decoder.num_layers  # q/k/v, o and gate/up: per run
    assert "decoder.onnx" not in m.files and not (result.out / "decoder.onnx").exists()
    # the tables at the recipe's precision; the runtime reads them as they are (the moderation test below)
    rows = np.load(result.out / m.graphs["decoder_gqa_head"].data_file, mmap_mode="r")
    assert m.embedding["dtype"] == recipe.tables == str(rows.dtype)
    assert str(np.load(result.out / m.embedding["file"], mmap_mode="r").dtype) == recipe.tables
    # the bundle holds exactly what its manifest lists: no media, simulations or scratch files of the run
    assert {p.name for p in result.out.iterdir()} == set(m.files) | {"manifest.json"}
    fp32 = load_manifest(tiny_bundle, verify="none")
    assert m.files["vision.onnx"].size < fp32.files["vision.onnx"].size
    assert m.fidelity["sizes"]["ratio_of_shipped_graphs"] < 1  # smaller than the fp32 files of the same graphs
    assert m.fidelity["agreement"]["n"] == 7 and m.fidelity["agreement"]["verdict_agreement"] is not None


@pytest.mark.parametrize("name", CPU_RECIPES)
def test_cpu_recipe_bundle_moderates_in_default_mode(quantized, media_dir, name):
    from omniguard_edge.runtime.guard import Guard

    guard = Guard.from_bundle(quantized[name].out)
    assert guard.bundle.decoder_graph == "decoder_gqa"
    for request in ({"text": "How do I bake bread?"}, {"text": "What is this?", "image": str(media_dir / "colour_517x333.png")}):
        result = guard.moderate(**request)
        assert result.verdict in ("safe", "unsafe"), result.error
        assert 0.0 <= result.p_unsafe <= 1.0


def test_a_failing_gate_writes_no_bundle_unless_allowed(tiny_bundle, tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="quantize needs onnx (the export extra)")
    from omniguard_edge.calibration import quantize

    strict = dataclasses.replace(recipes.RECIPES["cpu-int8"], graphs={
        **recipes.RECIPES["cpu-int8"].graphs, "audio": recipes.GraphPlan("int8-dyn", {"per_channel": True}, 1.5)})
    monkeypatch.setitem(recipes.RECIPES, "cpu-int8", strict)
    result = quantize.quantize_bundle(tiny_bundle, "cpu-int8", out=tmp_path / "q", calibration=None, progress=False)
    assert not result.passed and result.out is None and not (tmp_path / "q").exists()
    assert any(f.startswith("audio: min cosine") for f in result.fidelity["gate"]["failures"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.partial")]  # no partial folder left
    kept = quantize.quantize_bundle(tiny_bundle, "cpu-int8", out=tmp_path / "q", calibration=None, progress=False,
                                    allow_failing=True)
    m = load_manifest(kept.out)
    assert m.fidelity["gate"] == {**m.fidelity["gate"], "passed": False, "allowed_failing": True}


def test_no_fidelity_writes_only_a_failing_bundle_that_says_it_was_not_measured(tiny_bundle, tmp_path, monkeypatch):
    """--no-fidelity (a bundle too large to run here) never passes a gate: it needs --allow-failing, it cannot serve
    a recipe that calibrates on fp32 runs, it opens no graph and no Guard (a 7B fp32 decoder would not fit), and the
    bundle it writes says it is unmeasured, and warns when opened."""
    pytest.importorskip("onnx", reason="quantize needs onnx (the export extra)")
    from omniguard_edge.calibration import fidelity
    from omniguard_edge.calibration.quantize import RecipeError, quantize_bundle
    from omniguard_edge.runtime.guard import Guard

    def refuse(*args, **kwargs):
        raise AssertionError("--no-fidelity ran a graph or a Guard")

    with pytest.raises(RecipeError, match=r"--no-fidelity \(measure=False\) needs --allow-failing"):
        quantize_bundle(tiny_bundle, "orin", out=tmp_path / "x", calibration=None, measure=False)
    with pytest.raises(RecipeError, match="trt-int8 takes its activation scales from runs of the fp32 bundle"):
        quantize_bundle(tiny_bundle, "trt-int8", out=tmp_path / "x", measure=False, allow_failing=True)
    with pytest.raises(RecipeError, match="runs nothing on calibration data: drop --calibration"):
        quantize_bundle(tiny_bundle, "orin", out=tmp_path / "x", calibration=tmp_path, measure=False,
                        allow_failing=True)
    assert not (tmp_path / "x").exists()
    with monkeypatch.context() as mp:
        mp.setattr(fidelity, "cpu_session", refuse)
        mp.setattr(Guard, "from_bundle", refuse)
        result = quantize_bundle(tiny_bundle, "orin", out=tmp_path / "o", calibration=None, measure=False,
                                 allow_failing=True, progress=False)
    assert not result.passed and result.out == tmp_path / "o"
    m = load_manifest(result.out, verify="full")
    assert m.fidelity["measured"] is False and m.fidelity["agreement"]["n"] == 0
    assert m.fidelity["gate"]["allowed_failing"] and len(m.fidelity["gate"]["failures"]) == 1
    assert m.fidelity["gate"]["failures"][0].startswith("fidelity not measured (--no-fidelity)")
    assert all("cosine" not in g and not g.get("passed", True) for g in m.fidelity["graphs"].values()
               if g["gate_cosine"] is not None)
    assert "| decoder | int4 | - | - | - | - | >= 0.98 not measured |" in result.table()
    with pytest.warns(RuntimeWarning, match="FAILED its fidelity gate.*fidelity not measured"):
        guard = Guard.from_bundle(result.out)
    assert guard.moderate(text="How do I bake bread?").verdict in ("safe", "unsafe")


_GOOD = {"n": 10, "errors": 0, "verdict_agreement": 1.0, "dp_unsafe_p99": 0.01, "auroc_drop": 0.001,
         "auroc_fp32": 0.76, "auroc": 0.759}


@pytest.mark.parametrize("trained, change, failure", [
    (False, {"verdict_agreement": 0.9}, None),  # random weights: the verdicts are reported, not enforced
    (False, {"errors": 1}, "agreement requests without a verdict"),  # no verdict fails closed, whatever the weights
    (True, {}, None),
    (True, {"verdict_agreement": 0.97}, "verdict agreement 97.0% < 98.0%"),
    (True, {"dp_unsafe_p99": 0.031}, "P(unsafe) |delta| p99 0.0310 > 0.03"),
    (True, {"dp_unsafe_p99": None}, "P(unsafe) |delta| p99 - > 0.03"),
    (True, {"auroc_drop": 0.006, "auroc": 0.754}, "macro AUROC drop 0.0060 > 0.005"),
    (True, {"auroc_drop": None}, "AUROC drop unmeasured"),
    (True, {"errors": 1}, "agreement requests without a verdict"),
])
def test_the_gate_reads_the_verdicts_on_trained_weights(trained, change, failure):
    """The verdict side of the gate (cpu-int8's trained gate), with the agreement figures given."""
    from omniguard_edge.calibration import quantize
    from omniguard_edge.runtime.recipes import INT8_TRAINED

    graphs = {"decoder_gqa": {"gate_cosine": 0.995, "n": 3, "cosine": 0.996}}
    failures = quantize._gate(graphs, [], {**_GOOD, **change}, INT8_TRAINED if trained else None)
    assert graphs["decoder_gqa"]["passed"]
    if failure is None:
        assert failures == []
    else:
        assert len(failures) == 1 and failure in failures[0], failures


def test_trained_weights_raise_the_decoder_gates_and_enforce_the_verdicts(tiny_bundle, tmp_path, monkeypatch):
    """A bundle whose manifest says its decoder is trained: every decoder graph is held to the recipe's trained
    logits cosine (the encoders keep theirs), and the verdicts are enforced; requests made here carry no labels,
    so the AUROC drop is unmeasured, which fails."""
    pytest.importorskip("onnx", reason="quantize needs onnx (the export extra)")
    from omniguard_edge.calibration import fidelity, quantize
    from omniguard_edge.runtime.recipes import INT8_COS, INT8_TRAINED

    source = tmp_path / "fp32"
    shutil.copytree(tiny_bundle, source)
    raw = json.loads((source / "manifest.json").read_text())
    raw["source"]["weights"] = "trained-decoder"
    (source / "manifest.json").write_text(json.dumps(raw))
    monkeypatch.setattr(fidelity, "agreement", lambda a, b, requests, progress=None: fidelity.Agreement(
        10, 10, 0, 0.01, 0.02, [], [(0.5, 0.51)] * 10))
    result = quantize.quantize_bundle(source, "cpu-int8", out=tmp_path / "q", calibration=None, progress=False)
    gate, graphs = result.fidelity["gate"], result.fidelity["graphs"]
    assert gate["weights"] == "trained-decoder" and gate["agreement_enforced"]
    assert gate["trained_gate"]["logits_cosine"] == INT8_TRAINED.logits_cosine
    assert graphs["decoder_gqa"]["gate_cosine"] == graphs["decoder_gqa_head"]["gate_cosine"] == 0.995
    assert graphs["vision"]["gate_cosine"] == graphs["audio"]["gate_cosine"] == INT8_COS
    assert result.fidelity["agreement"]["dp_unsafe_p99"] == pytest.approx(0.01)
    assert not result.passed and result.out is None
    unmeasured = [f for f in gate["failures"] if "AUROC drop unmeasured" in f]
    assert len(unmeasured) == 1, gate["failures"]
    # the only other failures allowed: tiny's random-weight decoder under the raised logits gate
    assert all(f in unmeasured or f.startswith(("decoder_gqa:", "decoder_gqa_head:")) for f in gate["failures"])


def test_quantize_refuses_what_it_cannot_do(tiny_bundle, quantized, tmp_path, monkeypatch):
    from omniguard_edge.calibration.quantize import RecipeError, default_out, quantize_bundle

    with pytest.raises(RecipeError, match="recipes start from an fp32 bundle"):
        quantize_bundle(quantized["cpu-int8"].out, "cpu-int4", out=tmp_path / "x", calibration=None)
    unbuilt = dataclasses.replace(recipes.RECIPES["orin"], built=False)
    with monkeypatch.context() as mp:
        mp.setitem(recipes.RECIPES, "orin", unbuilt)
        with pytest.raises(RecipeError, match="not built yet"):
            quantize_bundle(tiny_bundle, "orin", out=tmp_path / "x", calibration=None)
    with pytest.raises(RecipeError, match="heldout_per_modality must be an int >= 1"):
        quantize_bundle(tiny_bundle, "cpu-int8", out=tmp_path / "x", calibration=None, heldout_per_modality=0)
    with pytest.raises(RecipeError, match="is the fp32 bundle or inside it"):
        quantize_bundle(tiny_bundle, "cpu-int8", out=Path(tiny_bundle) / "q", calibration=None, overwrite=True)
    with pytest.raises(RecipeError, match="lacks text/ and image/"):
        quantize_bundle(tiny_bundle, "cpu-int8", out=tmp_path / "x", calibration=tmp_path)
    assert recipes.RECIPES["trt-int8"].needs_calibration  # its activation scales come from calibration data
    with pytest.raises(RecipeError, match="needs calibration data: pass --calibration"):
        quantize_bundle(tiny_bundle, "trt-int8", out=tmp_path / "x", calibration=None)
    (tmp_path / "taken").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        quantize_bundle(tiny_bundle, "cpu-int8", out=tmp_path / "taken", calibration=None)
    with pytest.raises(ValueError, match="recipe must be one of"):
        quantize_bundle(tiny_bundle, "int8", out=tmp_path / "x", calibration=None)
    with pytest.raises(ValueError, match="limit must be"):
        quantize_bundle(tiny_bundle, "cpu-int8", out=tmp_path / "x", calibration=None, limit=0)
    assert default_out(tiny_bundle, "cpu-int8") == Path(tiny_bundle).resolve().parent / f"{Path(tiny_bundle).name}-cpu-int8"
    assert not (tmp_path / "x").exists()


def test_quantize_cli_prints_the_report_and_exits_by_the_gate(tiny_bundle, tmp_path, capsys):
    pytest.importorskip("onnx", reason="quantize needs onnx (the export extra)")
    from omniguard_edge.cli import main

    rc = main(["quantize", "--bundle", str(tiny_bundle), "--recipe", "cpu-int8", "--out", str(tmp_path / "b"),
               "--no-calibration", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| vision | int8 |" in out and "gate: PASSED" in out and f"bundle written to {tmp_path / 'b'}" in out
    rc = main(["quantize", "--bundle", str(tmp_path / "b"), "--recipe", "cpu-int4", "--no-calibration", "--quiet"])
    assert rc == 1 and "recipes start from an fp32 bundle" in capsys.readouterr().err


def test_capture_records_real_decoder_inputs_with_a_past(tiny_bundle, media_dir):
    from omniguard_edge.calibration.capture import capture
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    guard = Guard.from_bundle(tiny_bundle, GuardOptions(encoder_cache_bytes=0))
    before = guard.moderate(text="How do I bake bread?")
    got = capture(guard, [{"text": "How do I bake bread?"}, {"image": str(media_dir / "colour_517x333.png")},
                          {"audio": str(media_dir / "short_1.5s.wav")}, {"image": "/nonexistent/x.png"}],
                  max_decoder_runs=3)
    decoder = guard.bundle.decoder_graph
    assert got.count("vision") == 1 and got.count("audio") == 1
    assert got.count(decoder) == 9 and got.request[decoder] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [n for n, _ in got.failed] == [3]  # a request that fails is listed with its index, and records nothing
    feeds = got.feeds[decoder]
    # the text request's prefill runs after the cached policy prefix (built by the first call): a real past
    assert 0 < feeds[0]["inputs_embeds"].shape[1] < before.prompt_tokens and feeds[0]["past_key_0"].any()
    steps = [f for f in feeds if f["inputs_embeds"].shape[1] == 1]
    assert steps and all(f["past_key_0"].any() for f in steps)  # decode steps, each over its request's past
    # the guard is unchanged afterwards: same sessions, same answer
    assert guard.decoder.session is guard.bundle.sessions["decoder"]
    assert guard.moderate(text="How do I bake bread?").generated_ids == before.generated_ids


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data (the seed data) is not here")
def test_calibration_set_from_real_data_is_split_counted_and_cached(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("the speech part of the calibration set needs espeak-ng (apt-get install espeak-ng)")
    from omniguard_edge.calibration import calibset

    cset = calibset.build(SHARED, per_modality=8, cache=tmp_path, progress=False)
    counts = cset.manifest["counts"]["per_modality"]
    assert set(counts) == {"text", "image", "audio", "video"}
    for modality, c in counts.items():
        assert c["calibration"] + c["heldout"] == 8 and c["heldout"] == 2, (modality, c)
    ids = [it["id"] for it in cset.items()]
    assert len(ids) == len(set(ids)) == 32
    assert {it["pack"] for it in cset.items(modality="text")} == set(calibset.MODALITY_PACKS["text"])
    for it in cset.items():
        for key in ("image", "audio", "video"):
            if key in it["request"]:
                assert Path(it["request"][key]).exists()
    again = calibset.build(SHARED, per_modality=8, cache=tmp_path, progress=False)
    assert again.sha256 == cset.sha256 and again.root == cset.root
    other = calibset.build(SHARED, per_modality=8, seed=1, cache=tmp_path, progress=False)
    assert other.sha256 != cset.sha256
    with pytest.raises(ValueError, match="per_modality"):
        calibset.build(SHARED, per_modality=1, cache=tmp_path)
    with pytest.raises(ValueError, match="lacks text/ and image/"):
        calibset.build(tmp_path, cache=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data (the seed data) is not here")
def test_recipe_with_the_real_calibration_set(tiny_bundle, tmp_path):
    """calibrate (the set from ../shared/data), quantize, report: held-out inputs of every modality reach the
    graphs, and the verdict agreement runs on the evaluation packs."""
    pytest.importorskip("onnx", reason="quantize needs onnx (the export extra)")
    if shutil.which("espeak-ng") is None:
        pytest.skip("the speech part of the calibration set needs espeak-ng (apt-get install espeak-ng)")
    from omniguard_edge.calibration import evalpacks
    from omniguard_edge.calibration.quantize import quantize_bundle

    result = quantize_bundle(tiny_bundle, "cpu-int8", out=tmp_path / "q", calibration=SHARED, limit=2,
                             heldout_per_modality=2, progress=False)
    m = load_manifest(result.out)
    assert result.passed, result.table()
    assert m.calibration["per_modality"] == 64 and m.calibration["counts"]["per_modality"]["video"]["heldout"] == 16
    graphs = m.fidelity["graphs"]
    assert graphs["vision"]["n"] >= 4  # held-out images and video clips
    assert graphs["audio"]["n"] >= 2 and graphs["decoder_gqa"]["n"] >= 8
    assert m.fidelity["agreement"]["n"] == 2 * len(evalpacks.PACKS)
    assert "evaluation packs" in m.fidelity["agreement"]["source"]


def test_export_with_a_recipe_exports_then_quantizes_and_checks_the_recipe_first(tiny_checkpoint, tmp_path, capsys):
    """`export --recipe R` is export then quantize (to OUT-R); what would make the recipe fail is refused before the
    export spends its time."""
    pytest.importorskip("onnx", reason="quantize needs onnx (the export extra)")
    from omniguard_edge.cli import main

    out = tmp_path / "b"
    for argv, message in [(["--low-memory", "--recipe", "cpu-int4", "--no-calibration"],
                           "quantizes the fast decoder, which --low-memory exports do not build yet"),
                          (["--recipe", "trt-int8", "--no-calibration"], "trt-int8 needs calibration data"),
                          (["--recipe", "orin", "--no-calibration", "--no-fidelity"],
                           "--no-fidelity (measure=False) needs --allow-failing"),
                          (["--no-calibration"], "--no-calibration apply to a recipe: add --recipe NAME")]:
        rc = main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quiet", *argv])
        assert rc == 1 and message in capsys.readouterr().err, argv
        assert not out.exists() and not list(tmp_path.iterdir()), argv
    rc = main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quiet", "--recipe", "cpu-int8",
               "--no-calibration"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "every graph matches PyTorch" in printed and "gate: PASSED" in printed
    assert load_manifest(out).precision == "fp32"
    quantized = load_manifest(tmp_path / "b-cpu-int8", verify="full")
    assert quantized.recipe["name"] == "cpu-int8" and quantized.fidelity["gate"]["passed"]


def _initializer_types(path: Path) -> set[int]:
    import onnx

    return {t.data_type for t in onnx.load(str(path), load_external_data=False).graph.initializer}


@pytest.fixture(scope="module")
def gpu_quantized(tiny_bundle, tmp_path_factory):
    """The GPU and Jetson recipes on the tiny bundle, judged on onnxruntime's CPU provider: gpu-fp16 and orin need
    no data; trt-int8 calibrates on ../shared/data (skipped without it)."""
    pytest.importorskip("onnx", reason="quantize needs onnx (the export extra)")
    from omniguard_edge.calibration.quantize import quantize_bundle

    root = tmp_path_factory.mktemp("gpu-recipes")
    out = {name: quantize_bundle(tiny_bundle, name, out=root / name, calibration=None, progress=False,
                                 allow_failing=True) for name in ("gpu-fp16", "orin")}
    if SHARED.exists() and shutil.which("espeak-ng"):
        out["trt-int8"] = quantize_bundle(tiny_bundle, "trt-int8", out=root / "trt-int8", calibration=SHARED,
                                          limit=2, heldout_per_modality=2, calibration_per_modality=6,
                                          progress=False, allow_failing=True)
    return out


@pytest.mark.parametrize("name", ["gpu-fp16", "orin", "trt-int8"])
def test_gpu_recipe_passes_its_gate_judged_on_cpu(gpu_quantized, name):
    import onnx
    from onnx import TensorProto

    from omniguard_edge.runtime.guard import Guard

    if name not in gpu_quantized:
        pytest.skip("trt-int8 calibrates on ../shared/data with espeak-ng speech: not both here")
    result = gpu_quantized[name]
    recipe = recipes.get_recipe(name)
    m = load_manifest(result.out, verify="full")
    assert m.fidelity["gate"]["passed"], result.table()
    assert {p.name for p in result.out.iterdir()} == set(m.files) | {"manifest.json"}
    assert set(m.graphs) == {"vision", "audio", "decoder"}  # TensorRT parses the standard-ops decoder
    for graph, plan in recipe.graphs.items():
        if plan.method == "drop":
            continue
        figures = m.fidelity["graphs"][graph]
        assert figures["n"] > 0 and figures["cosine"] >= plan.gate_cosine, (graph, figures)
        path = result.out / m.graphs[graph].file
        if plan.method == "fp16":
            assert TensorProto.FLOAT16 in _initializer_types(path)
            assert "as written" in figures["judged_as"]
            graph_io = onnx.load(str(path), load_external_data=False).graph
            assert all(v.type.tensor_type.elem_type != TensorProto.FLOAT16 for v in list(graph_io.input) + list(graph_io.output))
        elif plan.method == "qdq-int8":
            assert {"QuantizeLinear", "DequantizeLinear"} <= _onnx_ops(path)
            assert TensorProto.INT8 in _initializer_types(path)
        elif plan.method == "int4-qdq":
            model = onnx.load(str(path), load_external_data=False)
            assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
            assert TensorProto.INT4 in _initializer_types(path)
            blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                       and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
            assert blocked and "MatMulNBits" not in _onnx_ops(path)
    # onnxruntime's CPU provider runs these graphs too (fp16 ops without a CPU kernel between inserted Casts): the
    # bundle moderates here, on the standard decoder
    guard = Guard.from_bundle(result.out)
    assert guard.bundle.decoder_graph == "decoder"
    verdict = guard.moderate(text="How do I bake bread?")
    assert verdict.verdict in ("safe", "unsafe") and 0.0 <= verdict.p_unsafe <= 1.0, verdict.error
    if name == "trt-int8":
        # attention's activation x activation MatMuls stay fp32 (per-tensor INT8 probabilities round to 0)
        applied = m.recipe["graphs_applied"]["decoder"]
        assert applied["kept_fp32"]["activation_matmuls"] == 4  # 2 per layer, 2 layers
        model = onnx.load(str(result.out / m.graphs["decoder"].file), load_external_data=False)
        producer = {o: n.op_type for n in model.graph.node for o in n.output}
        attention = [n for n in model.graph.node if n.name == "/layers.0/MatMul_1"]
        assert attention and all(producer.get(i) != "DequantizeLinear" for i in attention[0].input)
        assert m.calibration["activation_scales_from"]["requests"] == 24  # 6 per modality
        assert all(n > 0 for n in m.calibration["activation_scales_from"]["inputs_per_graph"].values())


@pytest.mark.parametrize("name,tolerance", [
    # INT8 activation scales come from each run's inputs: a stream splits the prompt into other runs than a full
    # moderation, so P(unsafe) may differ, within the recipe's own P(unsafe) tolerance (its trained gate's dp_p99)
    ("cpu-int8", recipes.INT8_TRAINED.dp_p99),
    # INT4 MatMulNBits quantizes activations per block of each row: every split of the prompt computes the same
    ("cpu-int4", 2.5e-5),
])
def test_a_stream_on_a_recipe_bundle_stays_within_its_tolerance(quantized, name, tolerance):
    from omniguard_edge.runtime.guard import Guard

    prompt = "How do I get the thing done?"
    reply = "Sure. First you take the thing, then you mix it with the other thing! Is that clear? Yes.\nDone."
    guard = Guard.from_bundle(quantized[name].out)
    stream = guard.stream(prompt, every=4, hysteresis=10**9)
    for word in reply.split(" "):
        stream.feed(word + " ")
    stream.close()
    assert len(stream.checks) >= 8
    for check in stream.checks:
        full = guard.moderate(prompt, stream.reply[:check.position])
        assert abs(full.p_unsafe - check.result.p_unsafe) <= tolerance, (check.position, full.p_unsafe)
