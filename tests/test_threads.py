"""Threads that would take the cores onnxruntime needs: BLAS workers spinning after the guard's numpy work,
encoder sessions' threads spinning after their one run per request."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from omniguard_edge.runtime.bundle import SessionOptions, open_bundle
from omniguard_edge.runtime.preprocess.audio import load_audio, log_mel


def _cpu_while_asleep(seconds: float = 0.05) -> float:
    """CPU seconds the whole process uses while this thread sleeps: other threads' work (a spinning pool)."""
    start = time.process_time()
    time.sleep(seconds)
    return time.process_time() - start


def _settle():
    for _ in range(40):  # a spinning BLAS pool goes to sleep after its timeout (about 0.1 s)
        if _cpu_while_asleep() < 0.01:
            return
    pytest.skip("the process keeps using CPU while idle; cannot observe spinning threads")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: BLAS runs no worker threads to spin")
def test_audio_features_leave_no_blas_thread_spinning(tiny_bundle, media_dir):
    filters = np.load(tiny_bundle / "mel_filters.npy")
    wave = np.tile(load_audio(media_dir / "short_1.5s.wav"), 4)  # 6 s
    _settle()
    # the control: the GEMM this code used to run, spec @ filters, leaves a worker busy-waiting
    spec = np.abs(np.random.default_rng(0).standard_normal((len(wave) // 160 + 1, filters.shape[0])))
    _ = spec @ filters.astype(np.float64)
    if _cpu_while_asleep() < 0.02:
        pytest.skip("numpy's BLAS does not spin after a GEMM here: nothing to observe")
    _settle()
    log_mel(wave, filters)
    assert _cpu_while_asleep() < 0.01


def test_only_the_standard_decoder_spins_after_a_run(tiny_bundle):
    def stops(bundle):
        out = {}
        for name, session in bundle.sessions.items():
            try:
                out[name] = session.options.get_session_config_entry("session.force_spinning_stop")
            except RuntimeError:  # onnxruntime: "does not have configuration with key"
                pass
        return out

    standard = SessionOptions(decoder_graph="decoder")
    assert stops(open_bundle(tiny_bundle, standard)) == {"vision": "1", "audio": "1"}
    assert stops(open_bundle(tiny_bundle, SessionOptions(decoder_graph="decoder",
                                                         spin_after_run=("vision", "audio", "decoder")))) == {}
    # the fast decoder's body and output layer alternate within a step: neither spins, whatever is asked; the
    # output layer's session opens on first use only (a constrained answer never needs every logit)
    fast = open_bundle(tiny_bundle)
    assert "decoder_head" not in fast.sessions
    fast.session("decoder_head")
    assert stops(fast) == {"vision": "1", "audio": "1", "decoder": "1", "decoder_head": "1"}


@pytest.mark.parametrize("bad", ["decoder", ("decoder", 1), ("decoders",)])
def test_spin_after_run_checked(bad):
    with pytest.raises(ValueError, match="spin_after_run"):
        SessionOptions(spin_after_run=bad)


# -- the vision encoder's exact-size arena (runtime/bundle.py SessionOptions.exact_arena_graphs) ----------------

_ARENA_CASE = """
import json, sys
import numpy as np
from omniguard_edge.runtime.bundle import SessionOptions
from omniguard_edge.runtime.guard import Guard, GuardOptions

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

graphs = tuple(sys.argv[2].split(",")) if sys.argv[2] else ()
g = Guard.from_bundle(sys.argv[1], GuardOptions(session=SessionOptions(graphs=("vision", "decoder"),
                                                                        exact_arena_graphs=graphs)), verify="none")
g.moderate("warm up")
before = rss()
y, x = np.mgrid[0:720, 0:1280]
res = g.moderate("describe", image=np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8))
print(json.dumps({"verdict": res.verdict, "kept_mb": (rss() - before) / 2**20}))
"""


def test_vision_arena_hands_its_memory_back(tiny_bundle):
    """A 1280x720 image on tiny peaks near 1 GB in the vision encoder; the exact-size arena returns it after the
    run (without the shrinkage it kept ~830 MB, measured)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ARENA_CASE, str(tiny_bundle), "vision"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["verdict"] != "error" and result["kept_mb"] < 300, result


def test_only_the_vision_session_uses_the_exact_arena(tiny_bundle):
    def entry(session, key):
        try:
            return session.options.get_session_config_entry(key)
        except RuntimeError:
            return None

    bundle = open_bundle(tiny_bundle)
    assert {n: entry(s, "session.use_env_allocators") for n, s in bundle.sessions.items()} == {
        "vision": "1", "audio": None, "decoder": None}
    assert bundle.sessions["vision"].options.enable_cpu_mem_arena
    assert not bundle.sessions["decoder"].options.enable_cpu_mem_arena
    none = open_bundle(tiny_bundle, SessionOptions(exact_arena_graphs=()))
    assert all(entry(s, "session.use_env_allocators") is None for s in none.sessions.values())
