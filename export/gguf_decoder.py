"""A Qwen2 decoder's tensors from a GGUF file, dequantized to fp32 under the names a Qwen2.5-Omni thinker saves.

Read with the `gguf` package (llama.cpp's own reader and dequantizer). llama.cpp writes a qwen2 model's tensors
unpermuted (no rotary re-ordering of q/k as for llama), each 2-D tensor as [out, in] once its dims are read
row-major: exactly a PyTorch Linear's weight. A converted decoder is checked against transformers' own GGUF loading
in the tests (an independent conversion), so a transposed or permuted tensor cannot hide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import CheckpointError

# GGUF name -> name in a thinker checkpoint (the `model.` / `lm_head.` names real Qwen2.5-Omni checkpoints carry).
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
          "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
          "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
          "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}


@dataclass(frozen=True)
class GGUFDecoder:
    """The geometry a GGUF file declares, and what the decoder needs from it."""

    path: Path
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    rope_theta: float
    rms_eps: float
    vocab: int
    tied: bool  # no output.weight: the head is the embedding
    tensor_types: dict  # GGML type name -> count

    def text_dims(self) -> dict:
        """The fields a profile's `text` carries, for comparing against it."""
        return dict(hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, intermediate_size=self.ffn, vocab_size=self.vocab,
                    tie_word_embeddings=self.tied)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a GGUF decoder needs the gguf package: pip install 'omniguard-edge[export]'") from None
    return gguf


def _reader(path: Path):
    gguf = _gguf()

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError / struct errors for a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        raise CheckpointError(f"{reader.path}: GGUF field {key} is missing: not a llama.cpp qwen2 model")
    return f.contents()


def describe(path: str | Path) -> GGUFDecoder:
    """The decoder a GGUF file holds; CheckpointError unless it is a qwen2 model with every tensor present."""
    from collections import Counter

    path = Path(path)
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch != "qwen2":
        raise CheckpointError(f"{path}: architecture {arch!r}, not qwen2")
    names = {t.name for t in r.tensors}
    layers = int(_field(r, "qwen2.block_count"))
    embed = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{path}: no token_embd.weight")
    info = GGUFDecoder(
        path=path, name=str(r.fields["general.name"].contents()) if "general.name" in r.fields else "",
        layers=layers, hidden=int(_field(r, "qwen2.embedding_length")), ffn=int(_field(r, "qwen2.feed_forward_length")),
        heads=int(_field(r, "qwen2.attention.head_count")), kv_heads=int(_field(r, "qwen2.attention.head_count_kv")),
        rope_theta=float(_field(r, "qwen2.rope.freq_base")),
        rms_eps=float(_field(r, "qwen2.attention.layer_norm_rms_epsilon")),
        vocab=int(embed.shape[-1]), tied="output.weight" not in names,
        tensor_types=dict(sorted(Counter(t.tensor_type.name for t in r.tensors).items())),
    )
    wanted = set(_GLOBAL) - ({"output.weight"} if info.tied else set())
    wanted |= {f"blk.{i}.{k}" for i in range(layers) for k in _BLOCK}
    if missing := sorted(wanted - names):
        raise CheckpointError(f"{path}: {len(missing)} decoder tensors missing, e.g. {missing[0]}")
    return info


def thinker_name(gguf_name: str) -> str | None:
    """The thinker checkpoint's name of a GGUF tensor (None for a tensor the decoder does not use)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}"
    return None


def read_tensors(path: str | Path, progress=None) -> dict[str, np.ndarray]:
    """Every decoder tensor of the file, dequantized to fp32 and named as in a thinker checkpoint; the tied
    head (no output.weight) is left out, as a tied checkpoint saves it. `progress`: a tqdm-like bar or None."""
    gguf = _gguf()

    describe(path)
    out = {}
    for t in _reader(Path(path)).tensors:
        name = thinker_name(t.name)
        if name is None:
            continue
        data = np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: writable, off the file
        want = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
        out[name] = np.ascontiguousarray(data.reshape(want) if len(want) > 1 else data.reshape(-1))
        if not np.isfinite(out[name]).all():
            raise CheckpointError(f"{path}: tensor {t.name} holds non-finite values")
        if progress is not None:
            progress.update(1)
    return out


def tokenizer_lists(path: str | Path) -> tuple[list[str], list[str]]:
    """(tokens by id, merges) as the GGUF file's own tokenizer carries them."""
    r = _reader(Path(path))

    def strings(key):
        f = r.fields.get(key)
        return [] if f is None else [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    return strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
