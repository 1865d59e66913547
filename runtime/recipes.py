"""Precision recipes: named, typed, fixed choices of how each graph of an fp32 bundle is quantized.

Every choice below (dynamic or static activations, block size, accuracy level, which graphs stay fp32) is fixed
in the recipe, decided by measurement during development and recorded in docs/precision.md "Precision recipes"; nothing is
re-measured at quantize time. `omniguard-edge recipes` lists them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import OmniGuardError

# How one graph is treated: method -> (precision of the graph it writes, needs calibration data). The transforms
# are calibration/graphs.py's, one per method.
#   keep       : copied unchanged (fp32)
#   drop       : not shipped (the runtime of the recipe's target does not open it)
#   int8-dyn   : INT8 weights per output channel, activations quantized per run (onnxruntime
#                DynamicQuantizeMatMul: u8 x s8 integer GEMM, VNNI/AMX where the CPU has them); with
#                per_token="gated-products", the MatMuls reading act(gate) * up get one scale per token instead
#                (MatMulInteger between standard ops: calibration/per_token.py)
#   int4-block : INT4 weights in blocks along K with one fp32 scale per block (onnxruntime MatMulNBits)
#   fp16       : fp16 weights and activations, some ops kept fp32 (calibration/graphs.py FP16_KEEP_FP32), fp32 I/O
#   qdq-int8   : explicit INT8 Q/DQ (TensorRT), symmetric, per-channel weights, calibrated activation scales
#   int4-qdq   : INT4 weight-only as blocked DequantizeLinear (opset 21), for TensorRT
METHODS: dict[str, tuple[str | None, bool]] = {
    "keep": ("fp32", False), "drop": (None, False), "int8-dyn": ("int8", False), "int4-block": ("int4", False),
    "fp16": ("fp16", False), "qdq-int8": ("int8", True), "int4-qdq": ("int4", False)}


class RecipeError(OmniGuardError, ValueError):
    """A recipe cannot be applied as asked (not built, wrong source bundle, missing or unusable data, a bad
    parameter); the message says why and what to do. Raised before the work it would waste."""


@dataclass(frozen=True)
class GraphPlan:
    method: str
    params: dict = field(default_factory=dict)
    gate_cosine: float | None = None  # minimum cosine against fp32 on every held-out input

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"GraphPlan.method must be one of {tuple(METHODS)}, not {self.method!r}")
        if self.method not in ("keep", "drop") and self.gate_cosine is None:
            raise ValueError(f"GraphPlan({self.method!r}): a graph that is changed needs a gate_cosine")

    @property
    def precision(self) -> str | None:
        return METHODS[self.method][0]


@dataclass(frozen=True)
class TrainedGate:
    """A recipe's gate on trained weights (a real checkpoint, or small-real's trained decoder), stricter than the
    per-graph cosines that are all a random network can be held to: the decoder's logits (worst held-out input), and
    the verdicts of the held-out requests against the fp32 bundle's."""
    logits_cosine: float  # every decoder graph's logits, worst held-out input (raises the graph's own gate)
    agreement: float  # verdict agreement, at least
    dp_p99: float  # P(unsafe) |delta|, 99th percentile, at most
    auroc_drop: float  # macro AUROC (packs with both labels) of fp32 minus the recipe's, at most


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str  # cpu | gpu | jetson
    summary: str
    precision: str  # the bundle's precision label (manifest `precision`)
    graphs: dict[str, GraphPlan]  # every graph of the fp32 bundle: what happens to it
    built: bool = True  # False: named and documented, not implemented (quantize refuses it, saying so)
    runs_on: str = "onnxruntime CPU"  # where the bundle runs, and how this project judges it
    # the token embedding table and the output rows read at constrained positions (float32 | float16); the runtime
    # widens what it reads to fp32
    tables: str = "float32"
    trained_gate: TrainedGate | None = None  # None: the recipe has not been judged on trained weights

    def __post_init__(self):
        if self.tables not in ("float32", "float16"):
            raise ValueError(f"Recipe.tables must be 'float32' or 'float16', not {self.tables!r}")

    @property
    def needs_calibration(self) -> bool:
        """Whether a graph's method takes activation scales from calibration data."""
        return any(METHODS[p.method][1] for p in self.graphs.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "needs_calibration": self.needs_calibration}


# the precision issue's gates: per fp16 graph, per INT8 graph, the INT4 decoder's logits
FP16_COS, INT8_COS, INT4_LOGITS_COS = 0.999, 0.99, 0.98
# on trained weights (issue 20's table; a weak stand-in guard puts many verdicts near the threshold, which the
# agreement rows allow for)
FP16_TRAINED = TrainedGate(logits_cosine=0.9999, agreement=0.995, dp_p99=0.005, auroc_drop=0.002)
INT8_TRAINED = TrainedGate(logits_cosine=0.995, agreement=0.98, dp_p99=0.03, auroc_drop=0.005)
INT4_TRAINED = TrainedGate(logits_cosine=0.98, agreement=0.96, dp_p99=0.06, auroc_drop=0.01)
DECODER_GRAPHS = ("decoder", "decoder_gqa", "decoder_gqa_head")  # the graphs judged on logits

# the plans several recipes share
_INT8_DYN = GraphPlan("int8-dyn", {"per_channel": True}, INT8_COS)
# the decoder's MLP down projections read act(gate) * up, whose range varies by orders of magnitude across a trained
# decoder's tokens: those MatMuls quantize their activations per token (calibration/per_token.py; measured in docs/precision.md
# "Precision on `small-real`")
_INT8_DYN_DECODER = GraphPlan("int8-dyn", {"per_channel": True, "per_token": "gated-products"}, INT8_COS)
_FP16 = GraphPlan("fp16", {}, FP16_COS)
_DROP = GraphPlan("drop")

_CPU_INT8 = Recipe(
    name="cpu-int8", target="cpu", precision="int8",
    summary="INT8 weights per channel in every graph, activations quantized per run, per token in the decoder's MLP "
            "down projections (no calibration data needed)",
    graphs={
        "vision": _INT8_DYN,
        "audio": _INT8_DYN,
        "decoder_gqa": _INT8_DYN_DECODER,
        # the output layer's rows are read in fp32 at the constrained positions (the verdict); the whole-vocabulary
        # graph (free decoding, the critique) is INT8
        "decoder_gqa_head": _INT8_DYN,
        "decoder": _DROP,  # the standard-ops decoder: for TensorRT; the CPU runtime opens decoder_gqa
    },
    trained_gate=INT8_TRAINED)

_CPU_INT4 = Recipe(
    name="cpu-int4", target="cpu", precision="int4",
    summary="the decoder as INT4 blocks (MatMulNBits), encoders and the output layer INT8, the embedding table and "
            "output rows fp16 (no calibration data needed)",
    graphs={
        **_CPU_INT8.graphs,  # encoders, output layer and the dropped standard decoder as cpu-int8
        "decoder_gqa": GraphPlan("int4-block", {"block_size": 32, "symmetric": True, "accuracy_level": 4},
                                 INT4_LOGITS_COS),
    },
    # measured on tiny, 180 requests: fp16 tables moved P(unsafe) by 1.7e-5 at most (the embedding alone), and the
    # whole recipe by 0.037 at most with them against 0.038 without
    tables="float16", trained_gate=INT4_TRAINED)

# GPU and Jetson recipes ship the standard-ops decoder (TensorRT parses it; the fast one uses onnxruntime contrib
# ops, and its in-place KV buffers are fp32 in the runtime today)
_NO_FAST_DECODER = {"decoder_gqa": _DROP, "decoder_gqa_head": _DROP}

_GPU_FP16 = Recipe(
    name="gpu-fp16", target="gpu", precision="fp16",
    runs_on="onnxruntime CUDA / TensorRT; judged here by onnxruntime's CPU provider running the fp16 graphs as written",
    summary="fp16 weights and activations with norms, softmax, rotary tables, erf and the residual adds in fp32; "
            "fp32 graph inputs and outputs; the standard-ops decoder",
    graphs={"vision": _FP16, "audio": _FP16, "decoder": _FP16, **_NO_FAST_DECODER}, trained_gate=FP16_TRAINED)

_QDQ_INT8 = GraphPlan("qdq-int8", {}, INT8_COS)
_TRT_INT8 = Recipe(
    name="trt-int8", target="gpu", precision="int8",
    runs_on="TensorRT (explicit quantization); judged here by onnxruntime's CPU provider running the Q/DQ graphs",
    summary="explicit Q/DQ for TensorRT: INT8 symmetric, weights per channel, activation scales calibrated on the "
            "calibration set; the standard-ops decoder",
    graphs={"vision": _QDQ_INT8, "audio": _QDQ_INT8, "decoder": _QDQ_INT8, **_NO_FAST_DECODER},
    trained_gate=INT8_TRAINED)

_ORIN = Recipe(
    name="orin", target="jetson", precision="int4",
    runs_on="TensorRT on Jetson Orin; judged here by onnxruntime's CPU provider running its graphs as written",
    summary="the standard-ops decoder INT4 weight-only as blocked DequantizeLinear (opset 21, which TensorRT parses; "
            "MatMulNBits is onnxruntime-only), encoders fp16",
    graphs={"vision": _FP16, "audio": _FP16, "decoder": GraphPlan("int4-qdq", {"block_size": 32}, INT4_LOGITS_COS),
            **_NO_FAST_DECODER},
    trained_gate=INT4_TRAINED)

RECIPES: dict[str, Recipe] = {r.name: r for r in (_CPU_INT8, _CPU_INT4, _GPU_FP16, _TRT_INT8, _ORIN)}


def get_recipe(name) -> Recipe:
    """The recipe called `name`; ValueError naming the parameter and the choices otherwise."""
    if not isinstance(name, str) or name not in RECIPES:
        raise RecipeError(f"recipe must be one of {', '.join(RECIPES)}, not {name!r}")
    return RECIPES[name]
