"""`omniguard-edge export-triton`: a Triton Inference Server model repository for a bundle.

- `omniguard_guard`: the guard as a Python-backend model (serve/triton_model.py) running this runtime; request-level
  dynamic batching (its `execute` judges the requests Triton gathers with `moderate_batch`), N CPU instances.
- with `--graphs onnxruntime`: the bundle's vision, audio and standard-ops decoder as ONNX Runtime backend models
  (their inputs and outputs from the manifest, symbolic dimensions as -1), the files linked, not copied, for
  deployments that run the graphs in Triton and the rest elsewhere.

The configs are protobuf text (Triton's ModelConfig); tests parse them with Triton's own definitions
(tritonclient). Nothing here starts a server.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omniguard_edge.runtime.errors import InputError

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


def graph_config(name: str, spec) -> str:
    def tensors(items):
        rows = []
        for t in items:
            if t.dtype not in TYPES:
                raise InputError(f"{spec.file}: {t.name} is {t.dtype}, which has no Triton type here")
            dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in t.shape) or ""
            rows.append(f'  {{ name: "{t.name}" data_type: {TYPES[t.dtype]} dims: [ {dims} ] }}')
        return ",\n".join(rows)

    return f'''name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [
{tensors(spec.inputs)}
]
output [
{tensors(spec.outputs)}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
'''


def export_triton(bundle, out, instances: int = 1, max_batch: int = 8, delay_us: int = 5000,
                  graphs: str | None = None, mode: str = "categories", overwrite: bool = False) -> list[Path]:
    """Write the repository at `out`; the config.pbtxt paths written."""
    from omniguard_edge.runtime.manifest import load_manifest

    bundle, out = Path(bundle), Path(out)
    for name, value, low in (("--instances", instances, 1), ("--max-batch", max_batch, 1), ("--delay-us", delay_us, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an int >= {low}, not {value!r}")
    if graphs not in (None, "onnxruntime"):
        raise InputError(f"--graphs must be onnxruntime (or absent), not {graphs!r}")
    if mode not in ("verdict", "categories", "full"):
        raise InputError(f"--mode must be verdict, categories or full, not {mode!r}")
    manifest = load_manifest(bundle, verify="full")
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
    if graphs == "onnxruntime":
        for name in ("vision", "audio", "decoder"):
            spec = manifest.graphs.get(name)
            if spec is None:
                continue
            version = out / name / "1"
            version.mkdir(parents=True)
            os.symlink((bundle / spec.file).resolve(), version / "model.onnx")
            if spec.data_file:  # external data is found by its file name, beside the graph
                os.symlink((bundle / spec.data_file).resolve(), version / spec.data_file)
            (out / name / "config.pbtxt").write_text(graph_config(name, spec))
            written.append(out / name / "config.pbtxt")
    return written
