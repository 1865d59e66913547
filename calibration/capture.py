"""Each graph's real inputs, captured by running a bundle's Guard on real requests.

A `Recorder` stands in for a graph's session (the runtime's backend seam, runtime/backend.py): it copies the
feeds of every run and passes the run on. The decoder's feeds include its KV buffers as they are before the run
(the past), so prefill with the cached policy prefix as past, and decode steps, are captured as they really run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..runtime.bundle import Bundle

ROLES = ("vision", "audio", "decoder")


def _copy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)
    if hasattr(value, "numpy"):  # a buffer updated in place (onnxruntime OrtValue): its contents before the run
        return np.array(value.numpy(), copy=True)
    return np.array(value, copy=True)


@dataclass
class Captured:
    """Feeds recorded per graph (the manifest's graph name, e.g. decoder_gqa), in run order, with the index of the
    request each came from."""

    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    request: dict[str, list[int]] = field(default_factory=dict)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (request index, its error)

    def add(self, graph: str, feeds: dict[str, np.ndarray], request: int) -> None:
        self.feeds.setdefault(graph, []).append(feeds)
        self.request.setdefault(graph, []).append(request)

    def count(self, graph: str) -> int:
        return len(self.feeds.get(graph, []))


class Recorder:
    """A GraphSession that records the feeds of its runs into `sink` (while `keep()` says so) and runs them."""

    def __init__(self, inner, graph: str, sink: Captured, keep: Callable[[str], int | None]):
        self.inner, self.graph, self.sink, self.keep = inner, graph, sink, keep

    def __getattr__(self, name):  # input_names, output_names, providers, options
        return getattr(self.inner, name)

    def _record(self, feeds) -> None:
        request = self.keep(self.graph)
        if request is not None:
            self.sink.add(self.graph, {k: _copy(v) for k, v in feeds.items()}, request)

    def run(self, feeds, outputs=None, run_options=None):
        self._record(feeds)
        return self.inner.run(feeds, outputs, run_options)

    def buffer(self, array):
        return self.inner.buffer(array)

    def run_bound(self, inputs, outputs, run_options=None):
        self._record(inputs)
        return self.inner.run_bound(inputs, outputs, run_options)


def capture(guard, requests: Iterable[dict], max_decoder_runs: int = 3, progress=None) -> Captured:
    """Run `guard` (a Guard over the fp32 bundle) on each request (moderate()'s keyword arguments) and record the
    inputs of every encoder run and of the first `max_decoder_runs` decoder runs of each request (its prefill, then
    decode steps with a non-empty past). A request that fails is listed in `failed` with its error. The first request
    of each template builds the policy prefix: that run (the prefix with an empty past) is one of its recorded ones."""
    bundle: Bundle = guard.bundle
    sink = Captured()
    state = {"request": None, "decoder_runs": 0}

    def keep(graph: str) -> int | None:
        if state["request"] is None:
            return None
        if graph.startswith("decoder"):
            if state["decoder_runs"] >= max_decoder_runs:
                return None
            state["decoder_runs"] += 1
        return state["request"]

    names = {"vision": "vision", "audio": "audio", "decoder": bundle.decoder_graph}
    original, decoder_session = dict(bundle.sessions), guard.decoder.session
    for role in ROLES:
        if role in bundle.sessions:
            bundle.sessions[role] = Recorder(original[role], names[role], sink, keep)
    guard.decoder.session = bundle.sessions["decoder"]  # the Guard's decoder holds its session
    try:
        for n, req in enumerate(requests):
            state["request"], state["decoder_runs"] = n, 0
            result = guard.moderate(**req)
            if result.error:
                sink.failed.append((n, result.error))
            if progress is not None:
                progress.update(1)
    finally:
        bundle.sessions.update(original)
        guard.decoder.session = decoder_session
        state["request"] = None
    return sink
