"""Text decoder graph: Qwen2 layers with TMRoPE and an explicit KV cache, logits of the last position.

Inputs: inputs_embeds [batch, seq, hidden] float32, attention_mask [batch, past+seq] int64 (0 = padding),
position_ids [3, batch, seq] int64, past_key_i / past_value_i [batch, kv_heads, past, head_dim] float32.
Outputs: logits [batch, vocab] (last position only: full prefill logits are large and ~28% of prefill
compute, docs/design.md "The graphs"), present_key_i / present_value_i [batch, kv_heads, past+seq, head_dim].
Prefill feeds a past of length 0; a cached prefix (or a forced literal) feeds a past and several new tokens, a
case validated at export (`extend_*`). The token embedding is gathered outside the graph (embed_tokens.npy).
"""

from __future__ import annotations

import numpy as np

from ...runtime.positions import RopeIds, rope_index
from .spec import GraphCase, GraphDef


def kv_names(layers: int, kind: str) -> list[str]:
    return [f"{kind}_{part}_{i}" for i in range(layers) for part in ("key", "value")]


def interface(parts):
    n = parts.ckpt.thinker_config.text_config.num_hidden_layers
    inputs = ["inputs_embeds", "attention_mask", "position_ids"] + kv_names(n, "past")
    outputs = ["logits"] + kv_names(n, "present")
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {1: "batch", 2: "seq"}, "logits": {0: "batch"}}
    axes.update({k: {0: "batch", 2: "past"} for k in kv_names(n, "past")})
    axes.update({k: {0: "batch", 2: "total"} for k in kv_names(n, "present")})
    return inputs, outputs, axes


def build(parts):
    from .decoder_modules import DecoderGraph

    return DecoderGraph(parts.language_model, parts.lm_head).eval()


def _empty_past(cfg, batch: int, length: int = 0, rng=None) -> list[np.ndarray]:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_key_value_heads, length, head_dim)
    make = (lambda: rng.standard_normal(shape).astype(np.float32)) if rng is not None else (lambda: np.zeros(shape, np.float32))
    return [make() for _ in range(2 * cfg.num_hidden_layers)]


def example(parts):
    cfg = parts.language_model.config
    rng = np.random.default_rng(1)
    feeds = {"inputs_embeds": rng.standard_normal((2, 3, cfg.hidden_size)).astype(np.float32),
             "attention_mask": np.ones((2, 5), np.int64),
             "position_ids": np.broadcast_to(np.arange(2, 5), (3, 2, 3)).astype(np.int64).copy()}
    names = kv_names(cfg.num_hidden_layers, "past")
    feeds.update(dict(zip(names, _empty_past(cfg, 2, 2, rng))))
    return feeds


def _reference_step(parts, feeds, cache):
    """Run the transformers text model + head on the same inputs; returns outputs and the cache."""
    import torch
    from transformers import DynamicCache

    lm, head = parts.language_model, parts.lm_head
    cache = cache if cache is not None else DynamicCache(config=lm.config)
    with torch.no_grad():
        res = lm(inputs_embeds=torch.from_numpy(feeds["inputs_embeds"]),
                 attention_mask=torch.from_numpy(feeds["attention_mask"]),
                 position_ids=torch.from_numpy(feeds["position_ids"]), cache=cache, use_cache=True)
        logits = head(res.last_hidden_state[:, -1, :])
    out = {"logits": logits.float().numpy()}
    n = lm.config.num_hidden_layers
    for i, layer in enumerate(cache.layers[:n]):
        out[f"present_key_{i}"] = layer.keys.float().numpy().copy()
        out[f"present_value_{i}"] = layer.values.float().numpy().copy()
    return out, cache


def _sequence_cases(parts, rng, name, ids, mask, grids=None):
    """A prefill case and a decode-step case continuing it, both checked against transformers."""
    cfg = parts.language_model.config
    ids_cfg = RopeIds(image_token_id=parts.special["image"], video_token_id=parts.special["video"],
                      audio_token_id=parts.special["audio"], spatial_merge_size=parts.merge)
    pos, delta = rope_index(ids, ids_cfg, mask, image_grid_thw=grids)
    batch, seq = ids.shape
    embeds = rng.standard_normal((batch, seq, cfg.hidden_size)).astype(np.float32)
    past_names = kv_names(cfg.num_hidden_layers, "past")
    prefill = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos,
               **dict(zip(past_names, _empty_past(cfg, batch)))}
    state = {}

    def ref_prefill():
        out, state["cache"] = _reference_step(parts, prefill, None)
        return out

    step_pos = np.broadcast_to((seq + delta).reshape(1, batch, 1), (3, batch, 1)).astype(np.int64).copy()
    step = {"inputs_embeds": rng.standard_normal((batch, 1, cfg.hidden_size)).astype(np.float32),
            "attention_mask": np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1),
            "position_ids": step_pos}

    def ref_step():
        if "cache" not in state:
            ref_prefill()
        out, _ = _reference_step(parts, step, state["cache"])
        return out

    def step_feeds():  # the decode step takes the prefill's reference KV cache as its past
        if "cache" not in state:
            ref_prefill()
        feeds = dict(step)
        for i, layer in enumerate(state["cache"].layers[: cfg.num_hidden_layers]):
            feeds[f"past_key_{i}"] = layer.keys.float().numpy()[..., :seq, :].copy()
            feeds[f"past_value_{i}"] = layer.values.float().numpy()[..., :seq, :].copy()
        return feeds

    def rows(total_mask):  # present KV at padding positions is never attended to: not compared
        def meaningful(output):
            return total_mask[:, None, :, None].astype(bool) if output.startswith("present_") else None
        return meaningful

    return [GraphCase(f"prefill_{name}", prefill, ref_prefill, rows(mask)),
            GraphCase(f"decode_{name}", step_feeds, ref_step, rows(step["attention_mask"]))]


def _extend_case(parts, rng, name, ids, split):
    """Past + several new tokens (a cached prompt prefix, then the request's own tokens; a forced literal of the
    answer): the first `split` tokens are the past, from transformers' own cache, the rest are fed at once."""
    cfg = parts.language_model.config
    ids_cfg = RopeIds(image_token_id=parts.special["image"], video_token_id=parts.special["video"],
                      audio_token_id=parts.special["audio"], spatial_merge_size=parts.merge)
    pos, _ = rope_index(ids, ids_cfg, np.ones_like(ids))
    batch, seq = ids.shape
    embeds = rng.standard_normal((batch, seq, cfg.hidden_size)).astype(np.float32)
    head = {"inputs_embeds": embeds[:, :split], "attention_mask": np.ones((batch, split), np.int64),
            "position_ids": pos[:, :, :split].copy(),
            **dict(zip(kv_names(cfg.num_hidden_layers, "past"), _empty_past(cfg, batch)))}
    tail = {"inputs_embeds": embeds[:, split:], "attention_mask": np.ones((batch, seq), np.int64),
            "position_ids": pos[:, :, split:].copy()}
    state = {}

    def prefix_cache():
        if "cache" not in state:
            _, state["cache"] = _reference_step(parts, head, None)
        return state["cache"]

    def feeds():
        out = dict(tail)
        for i, layer in enumerate(prefix_cache().layers[: cfg.num_hidden_layers]):
            out[f"past_key_{i}"] = layer.keys.float().numpy()[..., :split, :].copy()
            out[f"past_value_{i}"] = layer.values.float().numpy()[..., :split, :].copy()
        return out

    def reference():
        out, _ = _reference_step(parts, tail, prefix_cache())
        return out

    return GraphCase(f"extend_{name}", feeds, reference)


def cases(parts, rng):
    text_vocab = parts.special["text_vocab"]
    img = parts.special["image"]
    one = rng.integers(0, text_vocab, size=(1, 11)).astype(np.int64)
    two = rng.integers(0, text_vocab, size=(2, 9)).astype(np.int64)
    mask2 = np.ones_like(two)
    mask2[0, :3] = 0  # left padding on the first row
    two[0, :3] = parts.special["pad"]
    with_image = np.concatenate([one[:, :3], np.full((1, 20), img), one[:, 3:]], axis=1)  # grid (1, 8, 10)
    return (
        _sequence_cases(parts, rng, "b1", one, np.ones_like(one))
        + _sequence_cases(parts, rng, "b2_leftpad", two, mask2)
        + _sequence_cases(parts, rng, "b1_image_positions", with_image, np.ones_like(with_image), grids=[(1, 8, 10)])
        + [_extend_case(parts, rng, "b1_prefix7_new6", rng.integers(0, text_vocab, size=(1, 13)).astype(np.int64), 7)]
    )


DECODER = GraphDef(name="decoder", interface=interface, build=build, example=example, cases=cases)
