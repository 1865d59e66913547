"""omniguard-edge: OmniGuard safety guards as ONNX bundles with a torch-free runtime.

Subpackages: ``omniguard_edge.runtime`` (embeddable, numpy + onnxruntime), ``omniguard_edge.export``
(torch + transformers, extra ``[export]``), ``omniguard_edge.calibration``.
"""

__version__ = "0.1.0"
