"""Issue 8 "Must show" (memory): on `tiny`, in a fresh process under a 6 GiB address-space cap, each large request
inside the documented limits finishes or is refused up front with a budget message, never an allocation failure.
Needs the Guard integration of the memory budget (GuardOptions.memory, plan before any graph runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CAP = 6 << 30
FORBIDDEN = ("ONNXRuntimeError", "Failed to allocate", "MemoryError", "bad_alloc")

_CASE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from omniguard_edge.runtime.guard import Guard, GuardOptions
    from omniguard_edge.runtime.memory import MemoryBudget

    bundle, case, policy = sys.argv[1], sys.argv[2], sys.argv[3]
    g = Guard.from_bundle(bundle, GuardOptions(memory=MemoryBudget(image_policy=policy)), verify="none")
    if case == "text":
        res = g.moderate("the " * 30000)
    elif case == "image":
        y, x = np.mgrid[0:3584, 0:3584]
        img = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
        res = g.moderate("describe", image=img)
    else:
        t = np.arange(299 * 16000) / 16000
        res = g.moderate("listen", audio=(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sample_rate=16000)
    print(json.dumps({"verdict": res.verdict, "error": res.error, "tokens": res.prompt_tokens,
                      "notes": getattr(res, "notes", None)}))
""")


def _cap():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def _run(bundle, case, policy="downscale"):
    out = subprocess.run([sys.executable, "-c", _CASE, str(bundle), case, policy], capture_output=True, text=True,
                         timeout=600, preexec_fn=_cap, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = out.stdout + out.stderr
    for bad in FORBIDDEN:
        assert bad not in text, text[-3000:]
    assert out.returncode == 0, text[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _finished_or_refused(r):
    if r["verdict"] == "error":
        assert "exceeds the memory budget of" in r["error"] and " by " in r["error"], r
    else:
        assert r["tokens"] > 0, r


@pytest.mark.slow
def test_30k_token_text_fits_by_chunked_prefill(tiny_bundle):
    r = _run(tiny_bundle, "text")
    _finished_or_refused(r)
    assert r["verdict"] != "error" and r["tokens"] > 30000, r  # inside the context: must fit the default budget


@pytest.mark.slow
def test_3584_square_image_is_downscaled_to_fit(tiny_bundle):
    r = _run(tiny_bundle, "image")
    _finished_or_refused(r)
    assert r["verdict"] != "error" and any("downscaled from 3584x3584" in n for n in r["notes"]), r


@pytest.mark.slow
def test_3584_square_image_is_refused_on_request(tiny_bundle):
    r = _run(tiny_bundle, "image", "refuse")
    assert r["verdict"] == "error" and "exceeds the memory budget" in r["error"] and "image" in r["error"], r


@pytest.mark.slow
def test_299_s_of_audio_finishes(tiny_bundle):
    r = _run(tiny_bundle, "audio")
    _finished_or_refused(r)
    assert r["verdict"] != "error", r
