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
