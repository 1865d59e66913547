"""Typed errors. Each message names the offending thing and says what to do about it."""


class OmniGuardError(Exception):
    """Base class of every error this package raises on purpose."""


class BundleError(OmniGuardError):
    """A bundle is missing, malformed, of an unknown schema, or altered after export."""


class CheckpointError(OmniGuardError):
    """A checkpoint directory cannot be exported: missing file, corrupt weights, unknown model type."""


class ValidationError(OmniGuardError):
    """An exported graph disagrees with the PyTorch original beyond the stated tolerance."""

    def __init__(self, graph: str, output: str, case: str, figures: dict, tolerance: dict):
        self.graph, self.output, self.case = graph, output, case
        self.figures, self.tolerance = figures, tolerance
        shown = ", ".join(f"{k}={v:.3g}" for k, v in figures.items())
        limits = ", ".join(f"{k}={v:g}" for k, v in tolerance.items())
        super().__init__(
            f"{graph}.onnx output '{output}' on case '{case}' disagrees with PyTorch: {shown} "
            f"(tolerance {limits}); no bundle was written"
        )


class InputError(OmniGuardError):
    """An input (media, text, shape, argument) the runtime cannot process. The message names the parameter
    (`text`, `conversation[2]`, `image[1]`, `media[0] (audio)`, `sample_rate`, ...) and the accepted forms."""


class NumericalError(OmniGuardError):
    """A non-finite number (NaN or infinity) where the verdict is computed: in an encoder's features or in the
    decoder's logits. Nothing was judged; `Guard.moderate` turns it into `verdict == "error"` (never `safe`,
    never `unknown`). It names the media item or decoding step it was found in."""


class MemoryBudgetError(InputError):
    """A request whose estimated peak working memory exceeds the memory budget (GuardOptions.memory), even at
    its smallest plan: refused before any graph runs, never an onnxruntime allocation failure."""


class GpuError(OmniGuardError):
    """A GPU target that cannot be used on this machine: no NVIDIA GPU, no onnxruntime build with the provider,
    no TensorRT or a TensorRT version this package does not support. The message says what to install."""


class EngineError(GpuError):
    """TensorRT engines that do not belong to this bundle, GPU, TensorRT version or precision (stale or foreign),
    or none built: refused, never rebuilt silently. The message says what differs and how to build them."""


def describe(exc: BaseException) -> str:
    """`"TypeName: message"` for any exception, never raising: a caller's exception whose __str__ (or whose
    type's name) fails to format is described as such, so reporting an error cannot itself escape."""
    try:
        name = type(exc).__name__
        name = name if isinstance(name, str) else "Exception"
    except Exception:
        name = "Exception"
    return f"{name}: {message_of(exc)}"


def message_of(value) -> str:
    """str(value), or a placeholder when that raises or returns something other than a str."""
    try:
        text = str(value)
        if isinstance(text, str):
            return str.__str__(text)  # a str subclass's own methods are not trusted further
    except Exception:
        pass
    try:
        kind = type(value).__name__
    except Exception:
        kind = "object"
    return f"<{kind} whose message cannot be shown: its __str__ failed>"


def require_finite(array, what: str) -> None:
    """NumericalError unless every value of the numpy `array` is finite: a NaN must never choose a token (argmax
    over NaN is index 0) nor pass as a feature. The message says how many values are NaN and how many infinite."""
    import numpy as np

    finite = np.isfinite(array)
    if not finite.all():
        bad = finite.size - int(finite.sum())
        nan = int(np.isnan(array).sum())
        raise NumericalError(f"{what}: {bad} of {finite.size} values are not finite ({nan} NaN, {bad - nan} "
                             "infinite); nothing was judged")
