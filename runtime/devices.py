"""The Jetson modules a memory plan knows, and what a GPU process holds on them besides the model."""

from __future__ import annotations

from .memory import GiB, MiB

# marketed memory of each module (GiB: the modules carry 4/8/16/32/64 GiB of LPDDR5)
DEVICES = {
    "orin-nano-4gb": ("Jetson Orin Nano 4GB", 4),
    "orin-nano-8gb": ("Jetson Orin Nano 8GB", 8),
    "orin-nx-8gb": ("Jetson Orin NX 8GB", 8),
    "orin-nx-16gb": ("Jetson Orin NX 16GB", 16),
    "agx-orin-32gb": ("Jetson AGX Orin 32GB", 32),
    "agx-orin-64gb": ("Jetson AGX Orin 64GB", 64),
}
DEFAULT_RESERVE_GB = 1.5  # the OS, its services and carve-outs (settable: --reserve-gb)

# what a GPU process holds besides the model; each figure is an assumption until measured on the device
DEVICE_COSTS = {
    "cuda_context": (600 * MiB, "CUDA context with cuBLAS/cuDNN/TensorRT kernels loaded lazily: assumed, not measured "
                                "here (no Jetson)"),
    "trt_workspace": (1 * GiB, "TensorRT builder/runtime workspace limit this plan budgets (settable)"),
    "process": (300 * MiB, "Python, onnxruntime, numpy and the tokenizer: assumed from the CPU process here"),
}
