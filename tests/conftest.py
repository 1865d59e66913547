"""Session fixtures: the tiny reference checkpoint (both layouts) and its exported bundle, built once."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="export-side tests need the [export] extra")


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIGUARD_EDGE_CACHE", str(tmp_path / "hash-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from omniguard_edge.export.reference import write_reference

    return write_reference("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-full", progress=False)


@pytest.fixture(scope="session")
def tiny_thinker_checkpoint(tmp_path_factory):
    from omniguard_edge.export.reference import write_reference

    return write_reference("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-thinker", layout="thinker", progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    from omniguard_edge.export.bundle import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny-fp32", progress=False)


@pytest.fixture(scope="session")
def tiny_parts(tiny_checkpoint):
    from omniguard_edge.export.checkpoint import open_checkpoint
    from omniguard_edge.export.parts import Parts

    return Parts(open_checkpoint(tiny_checkpoint))


@pytest.fixture(scope="session")
def tiny_thinker_model(tiny_checkpoint, tiny_parts):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    # get_rope_index reads these, but they are not declared config fields (DESIGN section 1)
    model.config.vision_start_token_id = tiny_parts.special["vision_bos"]
    model.config.vision_end_token_id = tiny_parts.special["vision_eos"]
    return model


@pytest.fixture(scope="session")
def tiny_guard(tiny_bundle):
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    # critique=True with a 32-token budget: no verdict-first early stop, so tokens can be compared 1:1
    return Guard.from_bundle(tiny_bundle, GuardOptions(critique=True, critique_max_new_tokens=32))


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
