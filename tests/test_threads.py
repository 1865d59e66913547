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


def test_only_the_decoder_spins_after_a_run(tiny_bundle):
    def stops(bundle):
        out = {}
        for name, session in bundle.sessions.items():
            try:
                out[name] = session.get_session_options().get_session_config_entry("session.force_spinning_stop")
            except RuntimeError:  # onnxruntime: "does not have configuration with key"
                pass
        return out

    assert stops(open_bundle(tiny_bundle)) == {"vision": "1", "audio": "1"}
    assert stops(open_bundle(tiny_bundle, SessionOptions(spin_after_run=("vision", "audio", "decoder")))) == {}


@pytest.mark.parametrize("bad", ["decoder", ("decoder", 1), ("decoders",)])
def test_spin_after_run_checked(bad):
    with pytest.raises(ValueError, match="spin_after_run"):
        SessionOptions(spin_after_run=bad)
