"""The thinker's text decoder written as a plain `Qwen2ForCausalLM` folder (config, safetensors, tokenizer), for
tools that know Qwen2 but not Qwen2.5-Omni: onnxruntime-genai's model builder, the latency benchmark's peer.

The thinker's text model is Qwen2's architecture; its multimodal rotary (TMRoPE) reduces to plain RoPE with the
same theta for text-only positions (every position row equal), so for text prompts the folder is the same model.
Tensors are copied shard by shard, with the `thinker.` prefix dropped and the audio/vision towers left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..runtime.errors import CheckpointError
from .checkpoint import open_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def write_qwen2_text_model(checkpoint: str | Path, out: str | Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt, out = open_checkpoint(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    t = ckpt.thinker_config.text_config
    rope = dict(t.rope_parameters or {})
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": rope.get("rope_theta", 10000.0), "hidden_act": t.hidden_act,
        "tie_word_embeddings": bool(t.tie_word_embeddings), "use_sliding_window": False, "sliding_window": None,
        "attention_dropout": 0.0, "torch_dtype": "float32",
        "bos_token_id": ckpt.special.get("endoftext"), "eos_token_id": ckpt.special.get("im_end"),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    keep = (ckpt.prefix + "model.", ckpt.prefix + "lm_head.")
    index = {}
    for shard, names in ckpt.shards.items():
        picked = [n for n in names if n.startswith(keep)]
        if not picked:
            continue
        with safe_open(str(ckpt.path / shard), framework="pt") as f:
            tensors = {n[len(ckpt.prefix):]: f.get_tensor(n).contiguous() for n in picked}
        name = f"text-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    for fname in TOKENIZER_FILES:
        if (ckpt.path / fname).exists():
            shutil.copyfile(ckpt.path / fname, out / fname)
    return out
