"""Read a checkpoint directory (real OmniGuard or reference) into the parts the exporter needs.

Both layouts are accepted: the full Omni layout (config with `thinker_config`, `thinker.`-prefixed
tensors) and the thinker-only layout. Each tower is built on its own from only its tensors, so the
exporter holds one tower at a time (what makes 3B/7B exports fit on a workstation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import CheckpointError

MODEL_TYPES = {"qwen2_5_omni": "full", "qwen2_5_omni_thinker": "thinker"}
REQUIRED = ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"]
PREFIXES = {"visual": "visual.", "audio_tower": "audio_tower.", "language_model": "model.", "lm_head": "lm_head."}


@dataclass
class Checkpoint:
    """A validated checkpoint directory and its thinker config."""

    path: Path
    layout: str  # full | thinker
    raw_config: dict
    thinker_config: object  # transformers Qwen2_5OmniThinkerConfig
    shards: dict[str, list[str]]  # shard file -> tensor names
    prefix: str  # "thinker." or ""
    special: dict = field(default_factory=dict)

    def tensors(self, component: str, only: set[str] | None = None, under: str = "") -> dict:
        """Load the tensors of one component ("visual", "audio_tower", "language_model", "lm_head")
        with the component prefix stripped; `only` keeps those stripped names, `under` keeps the ones
        below a sub-prefix (e.g. "layers.3.") and strips it too."""
        from safetensors import safe_open

        want = self.prefix + PREFIXES[component] + under
        out = {}
        for shard, names in self.shards.items():
            picked = [n for n in names if n.startswith(want) and (only is None or n[len(want):] in only)]
            if not picked:
                continue
            with safe_open(str(self.path / shard), framework="pt") as f:
                for n in picked:
                    out[n[len(want):]] = f.get_tensor(n)
        return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: {path.name} is missing; a Qwen2.5-Omni checkpoint needs it")
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _shard_listing(path: Path) -> dict[str, list[str]]:
    """Shard -> tensor names, reading every safetensors header (a corrupt file fails here, not later)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors.index.json and no model.safetensors: no weights")
    listing = {}
    for name in files:
        shard = path / name
        if not shard.exists():
            raise CheckpointError(f"{path}: weight shard {name} listed in the index is missing")
        try:
            with safe_open(str(shard), framework="pt") as f:
                listing[name] = list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{shard} is not a readable safetensors file ({exc}): re-download it") from exc
    if index.exists():
        missing = [n for n, f in weight_map.items() if n not in listing.get(f, ())]
        if missing:
            raise CheckpointError(f"{path}: tensor {missing[0]} is in the index but not in its shard")
    return listing


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint directory; raises CheckpointError with what is wrong and what to do."""
    from transformers import Qwen2_5OmniThinkerConfig

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: point --checkpoint at a Qwen2.5-Omni checkpoint folder")
    for name in REQUIRED:
        if not (path / name).exists():
            raise CheckpointError(f"{path}: {name} is missing; a Qwen2.5-Omni checkpoint needs it")
    raw = _read_json(path / "config.json")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported; expected one of {sorted(MODEL_TYPES)} "
            "(OmniGuard-3B/7B are Qwen2.5-Omni fine-tunes)"
        )
    layout = MODEL_TYPES[model_type]
    thinker_raw = raw.get("thinker_config") if layout == "full" else raw
    if not isinstance(thinker_raw, dict):
        raise CheckpointError(f"{path}: config.json of type qwen2_5_omni has no thinker_config")
    thinker_raw = {k: v for k, v in thinker_raw.items() if k != "model_type"}
    try:
        cfg = Qwen2_5OmniThinkerConfig(**thinker_raw)
    except Exception as exc:  # transformers' strict config validation
        raise CheckpointError(f"{path}: thinker config is invalid: {exc}") from exc
    if cfg.text_config.use_sliding_window:
        raise CheckpointError(f"{path}: use_sliding_window=true is not supported by the decoder export")
    shards = _shard_listing(path)
    names = [n for ns in shards.values() for n in ns]
    prefix = "thinker." if any(n.startswith("thinker.") for n in names) else ""
    for comp in ("visual", "audio_tower", "language_model"):
        if not any(n.startswith(prefix + PREFIXES[comp]) for n in names):
            raise CheckpointError(f"{path}: no tensors named {prefix + PREFIXES[comp]}*: not a Qwen2.5-Omni thinker")
    ckpt = Checkpoint(path, layout, raw, cfg, shards, prefix)
    ckpt.special = _special_ids(path, cfg)
    return ckpt


def _special_ids(path: Path, cfg) -> dict:
    """Special token ids, read from the tokenizer and cross-checked against the config."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    names = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
             "audio": "<|AUDIO|>", "audio_bos": "<|audio_bos|>", "audio_eos": "<|audio_eos|>",
             "vision_bos": "<|vision_bos|>", "vision_eos": "<|vision_eos|>", "image": "<|IMAGE|>",
             "video": "<|VIDEO|>"}
    ids = {}
    for key, token in names.items():
        tid = tok.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"{path}: tokenizer.json has no {token}: not a Qwen2.5-Omni tokenizer")
        ids[key] = tid
    for key, field_name in (("image", "image_token_id"), ("video", "video_token_id"), ("audio", "audio_token_id")):
        if getattr(cfg, field_name) != ids[key]:
            raise CheckpointError(
                f"{path}: config {field_name}={getattr(cfg, field_name)} but the tokenizer says {ids[key]}"
            )
    ids["pad"] = ids["endoftext"]
    ids["text_vocab"] = min(v for k, v in ids.items() if k != "pad")  # ordinary tokens lie below
    return ids
