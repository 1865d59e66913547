"""One graph through one recipe method: onnxruntime's quantization tools on an fp32 ONNX file.

Every function reads the fp32 graph at `src` (with its external data) and writes the result at `dest`, with one
external-data file beside it when the result is too large for a single protobuf. Returns the data file's name
(or None) and the parameters that were applied, for the manifest.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ..export.onnx_io import PROTOBUF_LIMIT
from .recipes import GraphPlan


def _save(model, dest: Path, metadata: dict[str, str]) -> str | None:
    import onnx

    for key, value in metadata.items():
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > PROTOBUF_LIMIT:
        data = dest.name + ".data"
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=1024)
        return data
    onnx.save_model(model, str(dest))
    return None


def _quiet():
    """onnxruntime's quantizers log a line per node at INFO and a pre-processing hint at WARNING."""
    for name in ("root", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def int8_dynamic(src: Path, dest: Path, plan: GraphPlan, metadata: dict) -> tuple[str | None, dict]:
    """INT8 weights (per output channel when plan.params['per_channel']) of every MatMul/Gemm whose second input is
    a constant; activations quantized to uint8 per tensor at every run (DynamicQuantizeLinear + MatMulInteger,
    fused by onnxruntime into DynamicQuantizeMatMul). MatMuls between two activations (attention scores) stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    per_channel = bool(plan.params.get("per_channel", True))
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        out = Path(tmp) / dest.name
        quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
        model = onnx.load(str(out), load_external_data=True)
    counts = _op_counts(model)
    data = _save(model, dest, metadata)
    return data, {"method": "int8-dyn", "weights": "int8 symmetric", "per_channel": per_channel,
                  "activations": "uint8 per tensor, per run (dynamic)", "ops": counts}


def int4_block(src: Path, dest: Path, plan: GraphPlan, metadata: dict) -> tuple[str | None, dict]:
    """INT4 weights in blocks of plan.params['block_size'] along K, one fp32 scale per block (symmetric), as
    onnxruntime's MatMulNBits; `accuracy_level` 4 lets the CPU kernel quantize activations to int8 per block."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet()
    p = plan.params
    model = onnx.load(str(src), load_external_data=True)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=int(p["block_size"]), is_symmetric=bool(p["symmetric"]),
                             accuracy_level=int(p["accuracy_level"]), op_types_to_quantize=("MatMul",))
    q.process()
    model = q.model.model
    counts = _op_counts(model)
    if not counts.get("MatMulNBits"):
        raise RuntimeError(f"{src.name}: the INT4 quantizer replaced no MatMul (ops: {counts})")
    data = _save(model, dest, metadata)
    return data, {"method": "int4-block", "weights": "int4 " + ("symmetric" if p["symmetric"] else "asymmetric"),
                  "block_size": int(p["block_size"]), "accuracy_level": int(p["accuracy_level"]),
                  "activations": "fp32 (int8 per block inside the kernel at accuracy_level 4)", "ops": counts}


def _op_counts(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in model.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return dict(sorted(out.items()))


METHODS = {"int8-dyn": int8_dynamic, "int4-block": int4_block}


def apply(src: Path, dest: Path, plan: GraphPlan, metadata: dict) -> tuple[str | None, dict]:
    if plan.method not in METHODS:
        raise ValueError(f"no graph transform for method {plan.method!r}")
    os.makedirs(dest.parent, exist_ok=True)
    return METHODS[plan.method](src, dest, plan, metadata)
