"""Calibration: omni-modal calibration sets from real prompts and media, and quantization with them.

Nothing here yet: quantized bundles (FP16, INT8, INT4) are a later issue. The package exists so the
import path `omniguard_edge.calibration` is stable (DESIGN section 2).
"""
