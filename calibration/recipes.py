"""Precision recipes: named, typed, fixed choices of how each graph of an fp32 bundle is quantized.

Every choice below (dynamic or static activations, block size, accuracy level, which graphs stay fp32) is fixed
in the recipe, decided by measurement during development and recorded in README "Precision recipes"; nothing is
re-measured at quantize time. `omniguard-edge recipes` lists them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# How one graph is treated:
#   keep       : copied unchanged (fp32)
#   drop       : not shipped (the runtime of the recipe's target does not open it)
#   int8-dyn   : INT8 weights per output channel, activations quantized per run (onnxruntime
#                DynamicQuantizeMatMul: u8 x s8 integer GEMM, VNNI/AMX where the CPU has them)
#   int4-block : INT4 weights in blocks along K with one fp32 scale per block (onnxruntime MatMulNBits)
METHODS = ("keep", "drop", "int8-dyn", "int4-block")


@dataclass(frozen=True)
class GraphPlan:
    method: str
    params: dict = field(default_factory=dict)
    gate_cosine: float | None = None  # minimum cosine against fp32 on every held-out input (None: no gate)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"GraphPlan.method must be one of {METHODS}, not {self.method!r}")


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str  # cpu | gpu | jetson
    summary: str
    precision: str  # the bundle's precision label (manifest `precision`)
    graphs: dict[str, GraphPlan]  # every graph of the fp32 bundle: what happens to it
    needs_calibration: bool = False  # activation scales come from calibration data
    built: bool = True  # False: named and documented, not implemented yet (quantize refuses it, saying so)
    runs_on: str = "onnxruntime CPU"  # where the bundle runs in this project's tests

    def to_dict(self) -> dict:
        return asdict(self)


INT8_COS, INT4_LOGITS_COS = 0.99, 0.98  # the precision issue's gates: per INT8 graph, the INT4 decoder's logits

_CPU_INT8 = Recipe(
    name="cpu-int8", target="cpu", precision="int8",
    summary="INT8 weights per channel in every graph, activations quantized per run (no calibration data needed)",
    graphs={
        "vision": GraphPlan("int8-dyn", {"per_channel": True}, INT8_COS),
        "audio": GraphPlan("int8-dyn", {"per_channel": True}, INT8_COS),
        "decoder_gqa": GraphPlan("int8-dyn", {"per_channel": True}, INT8_COS),
        # the output layer's rows are read in fp32 at the constrained positions (the verdict); the whole-vocabulary
        # graph (free decoding, the critique) is INT8
        "decoder_gqa_head": GraphPlan("int8-dyn", {"per_channel": True}, INT8_COS),
        "decoder": GraphPlan("drop"),  # the standard-ops decoder: for TensorRT; the CPU runtime opens decoder_gqa
    })

_CPU_INT4 = Recipe(
    name="cpu-int4", target="cpu", precision="int4",
    summary="the decoder as INT4 blocks (MatMulNBits), encoders and the output layer INT8 (no calibration data needed)",
    graphs={
        "vision": GraphPlan("int8-dyn", {"per_channel": True}, INT8_COS),
        "audio": GraphPlan("int8-dyn", {"per_channel": True}, INT8_COS),
        "decoder_gqa": GraphPlan("int4-block", {"block_size": 32, "symmetric": True, "accuracy_level": 4},
                                 INT4_LOGITS_COS),
        "decoder_gqa_head": GraphPlan("int8-dyn", {"per_channel": True}, INT8_COS),
        "decoder": GraphPlan("drop"),
    })

_LATER = "not built yet (the precision issue, in progress): listed so its name and target are fixed"

_GPU_FP16 = Recipe(
    name="gpu-fp16", target="gpu", precision="fp16", built=False, runs_on="onnxruntime CUDA / TensorRT (not here)",
    summary="fp16 weights and activations; norms, softmax, rotary and the residual stream kept fp32; fp32 I/O. "
            + _LATER,
    graphs={g: GraphPlan("keep") for g in ("vision", "audio", "decoder", "decoder_gqa", "decoder_gqa_head")})

_TRT_INT8 = Recipe(
    name="trt-int8", target="gpu", precision="int8", needs_calibration=True, built=False,
    runs_on="TensorRT (not here)",
    summary="explicit symmetric Q/DQ, per-channel weights, calibrated activation scales, the standard-ops decoder. "
            + _LATER,
    graphs={g: GraphPlan("keep") for g in ("vision", "audio", "decoder", "decoder_gqa", "decoder_gqa_head")})

_ORIN = Recipe(
    name="orin", target="jetson", precision="int4", built=False, runs_on="TensorRT on Jetson Orin (not here)",
    summary="the standard-ops decoder INT4 weight-only as blocked DequantizeLinear (opset 21), encoders fp16. "
            + _LATER,
    graphs={g: GraphPlan("keep") for g in ("vision", "audio", "decoder", "decoder_gqa", "decoder_gqa_head")})

RECIPES: dict[str, Recipe] = {r.name: r for r in (_CPU_INT8, _CPU_INT4, _GPU_FP16, _TRT_INT8, _ORIN)}


def get_recipe(name) -> Recipe:
    """The recipe called `name`; ValueError naming the parameter and the choices otherwise."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, not {name!r}")
    return RECIPES[name]
