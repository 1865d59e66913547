"""Write a reference checkpoint: the real Qwen2.5-Omni thinker architecture, seeded random weights,
laid out file for file like a real fine-tuned OmniGuard checkpoint (DESIGN "What a real ... looks like").

Weights are generated tensor by tensor from a meta-device model's parameter list and written shard by
shard, so even the 7B shape needs only about one shard of memory. Names are the real (older) tensor
names with the `thinker.` prefix (full layout) or without it (thinker-only layout).
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from pathlib import Path

from ..runtime.errors import CheckpointError
from .profiles import PROFILES, Profile
from .reference_tokenizer import (DEFAULT_QWEN2_DIR, qwen2_tokenizer, special_ids, train_tokenizer, user_token_id,
                                  write_tokenizer_files)

log = logging.getLogger(__name__)

# Qwen2.5-Omni's chat template (Apache-2.0), as shipped with the 7B fine-tunes.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}{% set video_count = "
    "namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>{% elif content['type'] == 'audio' or 'audio' in content "
    "or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio "
    "{{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR = {
    "processor_class": "Qwen2_5OmniProcessor",
    "image_processor_type": "Qwen2VLImageProcessor",
    "feature_extractor_type": "WhisperFeatureExtractor",
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "rescale_factor": 0.00392156862745098, "resample": 3,
    "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
    "chunk_length": 300, "dither": 0.0, "feature_size": 128, "hop_length": 160, "n_fft": 400,
    "n_samples": 4800000, "nb_max_frames": 30000, "padding_side": "right", "padding_value": 0.0,
    "return_attention_mask": True, "sampling_rate": 16000,
}
VIDEO_PREPROCESSOR = {
    "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5OmniProcessor",
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "do_sample_frames": False, "rescale_factor": 0.00392156862745098, "resample": 3,
    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "min_pixels": 3136, "max_pixels": 12845056,
    "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
}
# Tensor-name rewrite from transformers 5.x module paths to the names real checkpoints carry.
_SAVED_NAMES = [("model.audio_tower.", "audio_tower."), ("model.visual.", "visual."), ("model.language_model.", "model.")]


def saved_name(internal: str) -> str:
    for old, new in _SAVED_NAMES:
        if internal.startswith(old):
            return new + internal[len(old):]
    return internal


# The talker's own codec ids (its vocabulary, `talker_config.vocab_size`), as the published configs carry them.
_TALKER_CODEC_IDS = dict(tts_codec_pad_token_id=8292, tts_codec_start_token_id=8293, tts_codec_end_token_id=8294,
                         tts_codec_mask_token_id=8296)


def token_ids(ids: dict[str, int], user_id: int) -> dict[str, int]:
    """Every token id field a published Qwen2.5-Omni thinker config carries, each naming the token it names
    there, in our tokenizer's numbering. `vision_start_token_id` / `vision_end_token_id` / `vision_token_id`
    are not declared thinker-config fields but `get_rope_index` reads the first (DESIGN section 1), so they
    are written explicitly. `user_token_id` is the id of the ordinary token "user" (872 in the Qwen2 vocabulary;
    transformers' default would lie outside a small vocabulary). bos/eos/pad are <|im_start|>/<|im_end|>/
    <|endoftext|>, as in the published thinker configs."""
    return dict(
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        vision_token_id=ids["<|vision_pad|>"], user_token_id=user_id,
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )


def talker_token_ids(ids: dict[str, int], vocab: int) -> dict[str, int]:
    """The talker config's ids. Those naming thinker tokens equal the thinker's; the three `tts_text_*` ids
    name embedding rows past the tokenizer's last token (151859-151861 of 152064 in the real vocabulary): here
    the last three rows of the padded vocabulary (`write_reference` keeps at least three). Codec ids are the
    talker's own vocabulary and keep their published values."""
    return dict(
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        tts_text_pad_token_id=vocab - 3, tts_text_start_token_id=vocab - 2, tts_text_end_token_id=vocab - 1,
        **_TALKER_CODEC_IDS,
    )


def thinker_config(profile: Profile, ids: dict[str, int], vocab: int, user_id: int):
    """The transformers thinker config of a profile (`Qwen2_5OmniThinkerConfig`). `ids`: special token ids
    by token string; `user_id`: the tokenizer's id of the ordinary token "user"."""
    from transformers import Qwen2_5OmniThinkerConfig

    text = dict(profile.text)
    mrope = text.pop("mrope_section")
    text.update(vocab_size=vocab, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
                initializer_range=profile.init_std,
                # as generation_config.json and the tokenizer say: bos/pad <|endoftext|>, eos <|im_end|>
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    out_dim = text["hidden_size"]
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=dict(profile.vision, out_hidden_size=out_dim, patch_size=14, window_size=112,
                           spatial_merge_size=2, temporal_patch_size=2, initializer_range=profile.init_std),
        audio_config=dict(profile.audio, output_dim=out_dim, num_mel_bins=128, n_window=100,
                          max_source_positions=1500, initializer_range=profile.init_std),
        initializer_range=profile.init_std, tie_word_embeddings=text["tie_word_embeddings"],
        **token_ids(ids, user_id),
    )
    return cfg


def _is_norm(name: str) -> bool:
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    return "norm" in leaf or leaf.startswith("ln_")


def _random_tensor(name: str, shape, std: float, seed: int, dtype):
    """Norm weights 1, norm biases 0, everything else N(0, std) from a per-name seed (order-free)."""
    import torch

    if _is_norm(name):
        return (torch.zeros if name.endswith(".bias") else torch.ones)(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def _tensor_plan(cfg) -> list[tuple[str, tuple]]:
    """(saved name, shape) of every persistent tensor of the thinker, from a meta-device instance."""
    import torch
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    names = [(saved_name(n), tuple(t.shape)) for n, t in model.state_dict().items()]
    if cfg.tie_word_embeddings:
        names = [(n, s) for n, s in names if n != "lm_head.weight"]
    return names


def _write_weights(out: Path, plan, profile: Profile, seed: int, prefix: str, progress) -> int:
    """Write the shards and model.safetensors.index.json. Returns total bytes."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, profile.dtype)
    width = torch.finfo(dtype).bits // 8
    groups, current, size = [], [], 0
    for name, shape in plan:
        nbytes = width * max(1, int(torch.Size(shape).numel()))
        if current and size + nbytes > profile.shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {prefix + n: _random_tensor(n, s, profile.init_std, seed, dtype).contiguous() for n, s in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for n in tensors:
            weight_map[n] = fname
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        progress.update(len(group))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _full_config(thinker: dict, talker_ids: dict[str, int]) -> dict:
    from transformers import Qwen2_5OmniConfig

    full = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker_ids, enable_audio_output=False).to_dict()
    full["architectures"] = ["Qwen2_5OmniForConditionalGeneration"]
    return full


def reference_tokenizer(profile_name: str, tokenizer_dir: str | Path | None = None):
    """(tokenizer, folder its vocab.json/merges.txt come from or None). `tiny`: a small BPE trained here;
    every other profile: the real Qwen2 BPE (`qwen2_tokenizer`), from `tokenizer_dir` or
    ../shared/data/tokenizer/qwen2."""
    if profile_name == "tiny":
        if tokenizer_dir is not None:
            raise CheckpointError("the tiny profile trains its own small tokenizer; --tokenizer-dir is for small, "
                                  "3b-shape and 7b-shape")
        return train_tokenizer(vocab_size=1000), None
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else DEFAULT_QWEN2_DIR
    return qwen2_tokenizer(folder), folder


def write_reference(profile_name: str, out: str | Path, layout: str = "full", seed: int = 0,
                    overwrite: bool = False, progress: bool = True, tokenizer_dir: str | Path | None = None) -> Path:
    """Write the reference checkpoint `profile_name` to `out`; returns the directory. `tokenizer_dir`: where
    the real Qwen2 vocab.json and merges.txt are (profiles other than `tiny`; default
    ../shared/data/tokenizer/qwen2)."""
    from tqdm import tqdm

    if profile_name not in PROFILES:
        raise CheckpointError(f"unknown profile {profile_name!r}: choose one of {', '.join(PROFILES)}")
    if layout not in ("full", "thinker"):
        raise CheckpointError(f"layout must be 'full' or 'thinker', not {layout!r}")
    profile, out = PROFILES[profile_name], Path(out)
    tok, tokenizer_source = reference_tokenizer(profile_name, tokenizer_dir)  # a missing file fails before any write
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} exists and is not empty: pass --overwrite or choose another --out")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:  # a failure (or Ctrl-C) leaves neither the checkpoint nor its .partial folder
        ids = special_ids(tok)
        # padded to a multiple of 64 like the real 152064, with >= 3 rows past the tokenizer for the tts_text ids
        vocab = profile.text["vocab_size"] or -(-(tok.get_vocab_size() + 3) // 64) * 64
        user_id = user_token_id(tok)
        cfg = thinker_config(profile, ids, vocab, user_id)
        plan = _tensor_plan(cfg)
        thinker = cfg.to_dict()
        thinker["architectures"] = ["Qwen2_5OmniThinkerForConditionalGeneration"]
        config = _full_config(thinker, talker_token_ids(ids, vocab)) if layout == "full" else thinker
        config["dtype"] = profile.dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
               "pad_token_id": ids["<|endoftext|>"], "do_sample": False, "transformers_version": "5.24.0"}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        write_tokenizer_files(tok, tmp, CHAT_TEMPLATE, source_dir=tokenizer_source)
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
        (tmp / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR, indent=2))
        with tqdm(total=len(plan), desc=f"reference {profile_name}", unit="tensor", disable=not progress) as bar:
            total = _write_weights(tmp, plan, profile, seed, "thinker." if layout == "full" else "", bar)
        (tmp / "REFERENCE.md").write_text(
            f"omniguard-edge reference checkpoint, profile {profile_name} ({profile.notes}), seed {seed}, "
            f"layout {layout}.\nRANDOM WEIGHTS: its verdicts mean nothing; it exists to test export and runtime.\n"
        )
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%.1f MB of weights)", out, total / 1e6)
    return out
