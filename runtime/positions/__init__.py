"""Index math in numpy: what the exported graphs take as inputs instead of computing it themselves.

Each function replaces a transformers function (named in its docstring) and is tested against it in
tests/test_positions.py. Keeping this out of the graphs is what lets one graph serve every image grid and
audio length (docs/design.md "The graphs").
"""

from .audio import AudioIndex, audio_index, audio_output_length, chunk_features  # noqa: F401
from .rope import RopeIds, rope_index  # noqa: F401
from .vision import VisionIndex, vision_index  # noqa: F401
