"""Both output styles with real graphs: reference checkpoints whose output layer is biased towards each style.

Random weights never pick a style by themselves, so two tiny reference checkpoints are edited: every token
embedding gets a common direction u added (the residual stream, and so the final normalised hidden state, then
leans towards u at every position), and the output layer's row of one token gets u added, scaled. One checkpoint
leans towards `-` (the labelled style's first token), the other towards `unsafe` at the start of a line (the plain
style). Exported like any checkpoint, each must take its branch through the answer grammar, end to end.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest


def _biased(source, out, token: str, strength: float = 6.0):
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    shutil.copytree(source, out)
    (shard,) = sorted(out.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    token_id = Tokenizer.from_file(str(out / "tokenizer.json")).encode(token, add_special_tokens=False).ids
    assert len(token_id) == 1, (token, token_id)
    emb, head = tensors["thinker.model.embed_tokens.weight"], tensors["thinker.lm_head.weight"]
    u = torch.from_numpy(np.random.default_rng(7).standard_normal(emb.shape[1]).astype(np.float32))
    u = u / u.norm()
    tensors["thinker.model.embed_tokens.weight"] = (emb + strength * u).contiguous()
    head = head.clone()
    head[token_id[0]] += strength * u * emb.shape[1] ** 0.5
    tensors["thinker.lm_head.weight"] = head
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def styled(tiny_checkpoint, tmp_path_factory, export_extra):
    from omniguard_edge.export.bundle import export_bundle
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    root = tmp_path_factory.mktemp("styles")
    out = {}
    for style, token in (("labelled", "-"), ("plain", "unsafe")):
        ckpt = _biased(tiny_checkpoint, root / f"ckpt-{style}", token)
        bundle = export_bundle(ckpt, root / f"bundle-{style}", progress=False)
        out[style] = Guard.from_bundle(bundle, GuardOptions(mode="full", critique_max_new_tokens=24,
                                                            encoder_cache_bytes=0))
    return out


@pytest.mark.parametrize("style", ["labelled", "plain"])
def test_each_biased_checkpoint_takes_its_style(styled, media_dir, style):
    guard = styled[style]
    for kwargs in ({"text": "How do I bake bread?"}, {"text": "Tell me how to hurt someone.", "response": "No."},
                   {"image": media_dir / "colour_517x333.png"}):
        r = guard.moderate(**kwargs)
        assert r.error is None, r.error
        assert r.style == style
        lead = "- Safety Assessment: " if style == "labelled" else ""
        assert r.raw_text.startswith(lead + r.verdict + "\n"), r.raw_text
        if r.verdict == "unsafe":  # the categories line of that style, valid codes only
            line = r.raw_text.split("\n")[1]
            assert line.startswith("- Categories: S" if style == "labelled" else "S"), r.raw_text
            assert r.categories and all(c["code"] in {f"S{i}" for i in range(1, 13)} for c in r.categories)
        assert 0.0 <= r.p_unsafe <= 1.0
        assert sum(r.category_scores.values()) == pytest.approx(r.p_unsafe, abs=1e-5)


def test_the_bias_is_what_decides(styled):
    """Free decoding shows each checkpoint's own preference: the labelled one writes `-` first, the plain one
    `unsafe`: the grammar followed the model, it did not pick the style itself."""
    import dataclasses

    from omniguard_edge.runtime.guard import Guard

    firsts = {}
    for style, guard in styled.items():
        free = Guard(guard.bundle, dataclasses.replace(guard.options, constrain_verdict=False,
                                                       critique_max_new_tokens=2))
        r = free.moderate("How do I bake bread?")
        firsts[style] = guard.prompt.decode(r.generated_ids[:1])
    assert firsts == {"labelled": "-", "plain": "unsafe"}
