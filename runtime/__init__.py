"""The torch-free runtime: what a device team embeds.

Dependencies: numpy, onnxruntime, tokenizers, jinja2, Pillow, soundfile, soxr, OpenCV. This package never imports
torch or transformers (tests/test_runtime_boundary.py checks it), nor anything above it: export, calibration,
serve or the command line (tests/test_layers.py; the one marked exception is runtime/cli.py, the command line's old
name). docs/design.md maps the modules.
"""

from .errors import BundleError, CheckpointError, OmniGuardError, ValidationError  # noqa: F401
