"""One small spec per exported graph: a torch wrapper that takes precomputed index tensors, its ONNX
interface (names, dtypes, dynamic axes), example inputs and the named validation cases."""

from .audio import AUDIO  # noqa: F401
from .decoder import DECODER  # noqa: F401
from .spec import GraphCase, GraphDef  # noqa: F401
from .vision import VISION  # noqa: F401

GRAPHS = {g.name: g for g in (VISION, AUDIO, DECODER)}
