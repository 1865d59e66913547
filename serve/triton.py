"""`omniguard-edge export-triton`: a Triton Inference Server model repository for a bundle.

- `omniguard_guard`: the guard as a Python-backend model (serve/triton_model.py) running this runtime; request-level
  dynamic batching (its `execute` judges the requests Triton gathers with `moderate_batch`), N CPU instances.
- with `--graphs onnxruntime`: the bundle's vision, audio and standard-ops decoder as ONNX Runtime backend models
  (their inputs and outputs from the manifest, symbolic dimensions as -1), the files linked, not copied, for
  deployments that run the graphs in Triton and the rest elsewhere; with `--graphs tensorrt`, the same as TensorRT
  backend models over the native plans `build-engines --native` wrote on the target GPU.

The configs are protobuf text (Triton's ModelConfig); tests parse them with Triton's own definitions
(tritonclient). Nothing here starts a server.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..runtime.checked import is_int
from ..runtime.errors import InputError

GUARD_MODEL = "omniguard_guard"
TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
         "bool": "TYPE_BOOL"}


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def guard_config(bundle: Path, instances: int, max_batch: int, delay_us: int, mode: str) -> str:
    names = ("TEXT", "RESPONSE", "IMAGE", "AUDIO", "VIDEO")
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: TYPE_UINT8 dims: [ -1 ] optional: true allow_ragged_batch: true }}'
                        for n in names)
    return f'''name: "{GUARD_MODEL}"
backend: "python"
max_batch_size: {max_batch}
input [
{inputs}
]
output [
  {{ name: "RESULT" data_type: TYPE_UINT8 dims: [ -1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "bundle" value: {{ string_value: {_q(bundle.resolve())} }} }}
parameters {{ key: "mode" value: {{ string_value: {_q(mode)} }} }}
'''


def _plan_of(manifest, graph: str, engines: Path) -> Path:
    """The native TensorRT plan `build-engines --native` wrote for this bundle's `graph` under `engines` (the
    engine record's graph sha256 must be this bundle's); InputError saying how to build one otherwise."""
    from ..runtime.engines import ENGINE_FILE, engine_records, graph_sha256

    want = graph_sha256(manifest, graph)
    found = [f / f"{graph}.plan" for f, rec in engine_records(engines, graph)
             if rec is not None and rec.get("onnx_sha256") == want and (f / f"{graph}.plan").is_file()]
    if len(found) != 1:
        raise InputError(f"--engines {engines}: {'no' if not found else len(found)} native TensorRT plan(s) of this "
                         f"bundle's {graph} ({ENGINE_FILE} with its sha256 and a {graph}.plan); build exactly one "
                         "with `omniguard-edge build-engines --bundle B --native` on the target GPU")
    return found[0]


def graph_config(name: str, spec, platform: str = "onnxruntime_onnx") -> str:
    def tensors(items):
        rows = []
        for t in items:
            if t.dtype not in TYPES:
                raise InputError(f"{spec.file}: {t.name} is {t.dtype}, which has no Triton type here")
            dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in t.shape) or ""
            rows.append(f'  {{ name: "{t.name}" data_type: {TYPES[t.dtype]} dims: [ {dims} ] }}')
        return ",\n".join(rows)

    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    return f'''name: "{name}"
platform: "{platform}"
max_batch_size: 0
input [
{tensors(spec.inputs)}
]
output [
{tensors(spec.outputs)}
]
instance_group [ {{ count: 1 kind: {kind} }} ]
'''


def export_triton(bundle, out, instances: int = 1, max_batch: int = 8, delay_us: int = 5000,
                  graphs: str | None = None, mode: str = "categories", overwrite: bool = False,
                  engines=None) -> list[Path]:
    """Write the repository at `out`; the config.pbtxt paths written. `graphs`: None, "onnxruntime" or "tensorrt"
    (the native plans of `build-engines --native` found under `engines`, default B.engines)."""
    from ..runtime.manifest import load_manifest

    bundle, out = Path(bundle), Path(out)
    for name, value, low in (("--instances", instances, 1), ("--max-batch", max_batch, 1), ("--delay-us", delay_us, 0)):
        if not is_int(value) or value < low:
            raise InputError(f"{name} must be an int >= {low}, not {value!r}")
    if graphs not in (None, "onnxruntime", "tensorrt"):
        raise InputError(f"--graphs must be onnxruntime or tensorrt (or absent), not {graphs!r}")
    if mode not in ("verdict", "categories", "full"):
        raise InputError(f"--mode must be verdict, categories or full, not {mode!r}")
    manifest = load_manifest(bundle, verify="full")
    plans = {}
    if graphs == "tensorrt":  # found before anything is written
        from ..runtime.engines import default_cache

        cache = Path(engines) if engines is not None else default_cache(bundle)
        plans = {g: _plan_of(manifest, g, cache) for g in ("vision", "audio", "decoder") if g in manifest.graphs}
    if out.resolve() == bundle.resolve() or bundle.resolve() in out.resolve().parents \
            or out.resolve() in bundle.resolve().parents:
        raise InputError(f"--out {out} is the bundle, inside it or holds it")
    if out.exists():
        if not overwrite:
            raise InputError(f"--out {out} exists (--overwrite replaces it)")
        if not (out / GUARD_MODEL / "config.pbtxt").is_file():  # --overwrite replaces an export, nothing else
            raise InputError(f"--out {out} exists and is not a repository export-triton wrote: not removed")
        shutil.rmtree(out)
    written = []
    model = out / GUARD_MODEL
    (model / "1").mkdir(parents=True)
    shutil.copyfile(Path(__file__).with_name("triton_model.py"), model / "1" / "model.py")
    (model / "config.pbtxt").write_text(guard_config(bundle, instances, max_batch, delay_us, mode))
    written.append(model / "config.pbtxt")
    if graphs is not None:
        for name in ("vision", "audio", "decoder"):
            spec = manifest.graphs.get(name)
            if spec is None:
                continue
            version = out / name / "1"
            version.mkdir(parents=True)
            if graphs == "tensorrt":  # a plan runs only where it was built: the same GPU and TensorRT
                os.symlink(plans[name].resolve(), version / "model.plan")
                platform = "tensorrt_plan"
            else:
                os.symlink((bundle / spec.file).resolve(), version / "model.onnx")
                if spec.data_file:  # external data is found by its file name, beside the graph
                    os.symlink((bundle / spec.data_file).resolve(), version / spec.data_file)
                platform = "onnxruntime_onnx"
            (out / name / "config.pbtxt").write_text(graph_config(name, spec, platform))
            written.append(out / name / "config.pbtxt")
    return written
