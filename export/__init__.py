"""Export side (extra `[export]`): reference checkpoints, ONNX export with validation, bundles.

May import torch and transformers; imports runtime's numpy helpers, never the other way round.
"""
