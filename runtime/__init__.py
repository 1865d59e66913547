"""The torch-free runtime: what a device team embeds.

Dependencies: numpy, onnxruntime, tokenizers, jinja2 (and optionally soundfile, OpenCV, pillow).
This package never imports torch or transformers (tests/test_torch_free.py checks it), and never
imports ``omniguard_edge.export``.
"""

from .errors import BundleError, CheckpointError, OmniGuardError, ValidationError  # noqa: F401
