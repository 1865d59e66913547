"""Session fixtures, split by what they need.

Runtime side (numpy, onnxruntime, tokenizers...; no torch): `tiny_bundle`, `tiny_guard`, `media_dir`.
`tiny_bundle` is the bundle named by the environment variable OMNIGUARD_TEST_BUNDLE when it is set (a runtime-only
install tests the runtime where it is deployed: `omniguard-edge reference --profile tiny --out C` and
`omniguard-edge export --checkpoint C --out B` on a machine with the export extra, then
`OMNIGUARD_TEST_BUNDLE=B python -m pytest`); otherwise it is exported here from the tiny reference checkpoint.

Export side (torch, transformers): `tiny_checkpoint`, `tiny_thinker_checkpoint`, `tiny_parts`,
`tiny_thinker_model`. Without the export extra they skip, saying so; this module itself imports nothing of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest

BUNDLE_ENV = "OMNIGUARD_TEST_BUNDLE"
EXPORT_EXTRA = "needs the export extra (torch/transformers)"
_EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxscript")


def require_export_extra() -> None:
    """Skip the calling test or fixture when the export extra is not installed."""
    missing = [m for m in _EXPORT_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{EXPORT_EXTRA}: {', '.join(missing)} not installed")


def _env_bundle() -> Path | None:
    value = os.environ.get(BUNDLE_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else None


def pytest_configure(config):
    """A named bundle that is not a bundle stops the run at once, with one message (not one error per test)."""
    env = _env_bundle()
    if env is not None and not (env / "manifest.json").is_file():
        raise pytest.UsageError(f"{BUNDLE_ENV}={env} is not a bundle: no manifest.json there "
                                "(export one with `omniguard-edge export`, or unset the variable)")


@pytest.fixture(scope="session")
def export_extra():
    """Request this in a test that imports torch/transformers itself: it skips without the export extra."""
    require_export_extra()


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIGUARD_EDGE_CACHE", str(tmp_path / "hash-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    require_export_extra()
    from omniguard_edge.export.reference import write_reference

    path = write_reference("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-full", progress=False)
    env = _env_bundle()
    if env is not None:
        # parity tests compare tiny_bundle with this checkpoint: the named bundle must come from the same one
        from omniguard_edge.runtime.manifest import load_manifest

        made_from = load_manifest(env, verify="none").source.get("config_sha256")
        if made_from != hashlib.sha256((path / "config.json").read_bytes()).hexdigest():
            pytest.fail(f"{BUNDLE_ENV}={env} was not exported from the tiny reference checkpoint "
                        "(`omniguard-edge reference --profile tiny`, default seed): parity tests would compare "
                        "two different models", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tiny_thinker_checkpoint(tmp_path_factory):
    require_export_extra()
    from omniguard_edge.export.reference import write_reference

    return write_reference("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-thinker", layout="thinker", progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(request, tmp_path_factory):
    env = _env_bundle()
    if env is not None:
        from omniguard_edge.runtime.errors import BundleError
        from omniguard_edge.runtime.manifest import load_manifest

        try:
            load_manifest(env, verify="full")
            problem = None
        except BundleError as exc:
            problem = str(exc)
        if problem:
            pytest.fail(f"{BUNDLE_ENV}={env} is not a usable bundle: {problem}", pytrace=False)
        return env
    require_export_extra()
    from omniguard_edge.export.bundle import export_bundle

    checkpoint = request.getfixturevalue("tiny_checkpoint")
    return export_bundle(checkpoint, tmp_path_factory.mktemp("bundles") / "tiny-fp32", progress=False)


@pytest.fixture(scope="session")
def tiny_parts(tiny_checkpoint):
    from omniguard_edge.export.checkpoint import open_checkpoint
    from omniguard_edge.export.parts import Parts

    return Parts(open_checkpoint(tiny_checkpoint))


@pytest.fixture(scope="session")
def tiny_thinker_model(tiny_checkpoint):
    """transformers' thinker, loaded as is: the reference config carries the vision start/end ids itself."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="session")
def tiny_guard(tiny_bundle):
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    # free decoding in full mode with a 32-token budget, no caches: no verdict-first early stop and no grammar,
    # so tokens can be compared 1:1 with transformers' greedy generate
    return Guard.from_bundle(tiny_bundle, GuardOptions(mode="full", constrain_verdict=False, critique_max_new_tokens=32,
                                                       prefix_cache=False, encoder_cache_bytes=0))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """Media made locally: two colour images, two 16 kHz clips (one and three audio chunks)."""
    import numpy as np
    import soundfile as sf
    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("media")
    for name, (w, h) in {"colour_517x333.png": (517, 333), "colour_640x480.jpg": (640, 480)}.items():
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1).astype(np.uint8)
        img = Image.fromarray(arr)
        ImageDraw.Draw(img).ellipse([w // 5, h // 5, w // 2, h // 2], fill=(250, 30, 30))
        img.save(d / name)
    rng = np.random.default_rng(0)
    for name, seconds in {"short_1.5s.wav": 1.5, "chunks_5s.wav": 5.0}.items():
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(d / name, wave.astype(np.float32), 16000)
    return d
