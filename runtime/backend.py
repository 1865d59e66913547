"""The backend seam: the one place that opens a graph's session and runs it, inputs and outputs bound by name.

The runtime (decoders, encoders, the Guard) sees only `GraphSession`: `run` (feeds in, named outputs out) and, for
graphs that update buffers in place, `buffer` and `run_bound`. `OrtSession` implements it over onnxruntime (the CPU
provider now; other execution providers through `SessionOptions.providers`); a TensorRT or device-resident
implementation can replace it without touching the Guard.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import BundleError


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class GraphSession(Protocol):
    """What the runtime needs of one graph's session."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    providers: list[str]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
            run_options=None) -> dict[str, np.ndarray]:
        """Named outputs (default: all) for named inputs."""

    def buffer(self, array: np.ndarray):
        """A buffer the session reads and writes in place, over `array`'s memory."""

    def run_bound(self, inputs: Mapping[str, object], outputs: Mapping[str, object | None],
                  run_options=None) -> dict[str, np.ndarray]:
        """Inputs: arrays or buffers; outputs: a buffer to write into, or None for a new array, returned by name."""

    def run_device(self, inputs: Mapping[str, object], host_outputs: Sequence[str], device_outputs: Sequence[str],
                   run_options=None) -> tuple[dict, dict]:
        """(host outputs as arrays, device outputs left on the session's device), by name."""


class OrtSession:
    """An onnxruntime InferenceSession behind `GraphSession`."""

    def __init__(self, session, name: str, device_id: int = 0):
        self.session, self.name, self.device_id = session, name, device_id
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(o.name for o in session.get_outputs())

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def device(self) -> str:
        """Where this session's outputs can stay between runs: "cuda" under a GPU provider, else "cpu"."""
        return "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"

    @property
    def options(self):
        """onnxruntime's SessionOptions of this session (threads, arena, config entries)."""
        return self.session.get_session_options()

    def run(self, feeds, outputs=None, run_options=None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else list(self.output_names)
        return dict(zip(names, self.session.run(names, dict(feeds), run_options)))

    def buffer(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array)

    def _bind_inputs(self, inputs):
        import onnxruntime as ort

        io = self.session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                io.bind_ortvalue_input(name, value)
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        return io

    def _run_io(self, io, run_options) -> None:
        if run_options is not None:
            self.session.run_with_iobinding(io, run_options)
        else:
            self.session.run_with_iobinding(io)

    def run_device(self, inputs, host_outputs, device_outputs, run_options=None) -> tuple[dict, dict]:
        """Run with `device_outputs` left where the session computed them (onnxruntime OrtValues on `device`, to be
        fed back as inputs: a KV cache that never crosses to the host) and `host_outputs` as arrays. Inputs: arrays
        (copied to the device by onnxruntime) or OrtValues."""
        io = self._bind_inputs(inputs)
        for name in host_outputs:
            io.bind_output(name, "cpu")
        for name in device_outputs:
            io.bind_output(name, self.device, self.device_id)
        self._run_io(io, run_options)
        got = io.get_outputs()  # in binding order
        n = len(host_outputs)
        return ({name: got[i].numpy() for i, name in enumerate(host_outputs)},
                {name: got[n + i] for i, name in enumerate(device_outputs)})

    def run_bound(self, inputs, outputs, run_options=None) -> dict[str, np.ndarray]:
        io = self._bind_inputs(inputs)
        fresh = [name for name, value in outputs.items() if value is None]
        for name in fresh:  # first: get_outputs() lists outputs in binding order
            io.bind_output(name)
        for name, value in outputs.items():
            if value is not None:
                io.bind_ortvalue_output(name, value)
        self._run_io(io, run_options)
        got = io.get_outputs()
        return {name: got[i].numpy() for i, name in enumerate(fresh)}


@functools.cache
def _exact_arena() -> bool:
    """Register onnxruntime's environment CPU arena that allocates exactly what is requested (once per process).
    False (with a warning) when this onnxruntime cannot: those graphs then run without an arena."""
    import onnxruntime as ort

    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
        return True
    except Exception as exc:  # an older build, or an allocator the embedding application registered itself
        warnings.warn(f"cannot register onnxruntime's exact-size CPU arena ({exc}): SessionOptions."
                      "exact_arena_graphs run without an arena", RuntimeWarning, stacklevel=4)
        return False


def open_session(path: Path, opts, name: str, spin: bool | None = None, providers: list | None = None) -> OrtSession:
    """Open one graph with the bundle's SessionOptions (`name`: its role, vision | audio | decoder). `spin`:
    whether its threads keep spinning after a run (default: `name in opts.spin_after_run`). `providers`: the
    providers with their options ([(name, options)], runtime/providers.py), in place of opts.providers' names."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = {p: o for p, o in providers} if providers else {}
    wanted = [p for p in (list(chosen) or opts.providers) if p in available]
    missing = [p for p in (list(chosen) or opts.providers) if p not in available]
    if missing:
        warnings.warn(f"{name}.onnx: execution provider(s) {missing} are not available in this onnxruntime "
                      f"build (available: {available}); running on {wanted or ['CPUExecutionProvider']}",
                      RuntimeWarning, stacklevel=3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.enable_cpu_mem_arena = bool(opts.cpu_mem_arena)
    if not opts.cpu_mem_arena and name in opts.exact_arena_graphs and _exact_arena():
        so.enable_cpu_mem_arena = True
        so.add_session_config_entry("session.use_env_allocators", "1")
    if not (name in opts.spin_after_run if spin is None else spin):
        so.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        sess = ort.InferenceSession(str(path), so, providers=[(p, chosen[p]) if p in chosen else p for p in wanted]
                                    or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unloadable graphs
        raise BundleError(f"{path}: onnxruntime cannot load it ({exc}); re-export the bundle") from exc
    used = sess.get_providers()
    if wanted and wanted[0] not in used:
        warnings.warn(f"{name}.onnx: asked for {wanted[0]} but onnxruntime runs it on {used}", RuntimeWarning,
                      stacklevel=3)
    return OrtSession(sess, name, opts.device_id)
