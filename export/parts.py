"""Build the transformers modules of one tower at a time from a checkpoint's tensors."""

from __future__ import annotations

import gc

from ..runtime.errors import CheckpointError
from .checkpoint import Checkpoint


class Parts:
    """The towers of a thinker, each built on first use and released with `release()`.

    Graph definitions read `parts.visual`, `parts.audio_tower`, `parts.language_model`,
    `parts.lm_head`, `parts.special` and `parts.merge`.
    """

    def __init__(self, ckpt: Checkpoint, dtype: str = "float32"):
        self.ckpt, self.dtype = ckpt, dtype
        self.special = ckpt.special
        self.merge = ckpt.thinker_config.vision_config.spatial_merge_size
        self._built: dict = {}

    def _build(self, component: str, make, config, under: str = ""):
        """Instantiate `make(config)` without random init and load its tensors strictly."""
        import torch
        from transformers.initialization import no_init_weights

        config._attn_implementation = "sdpa"
        with no_init_weights():
            module = make(config)
        tensors = self.ckpt.tensors(component, under=under)
        result = module.load_state_dict(tensors, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{self.ckpt.path}: {component} {under}tensors do not match the config "
                f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
        del tensors
        return module.to(getattr(torch, self.dtype)).eval()

    def decoder_layer(self, index: int):
        """Decoder layer `index` alone (not kept): the low-memory export holds one layer at a time."""
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniDecoderLayer

        return self._build("language_model", lambda c: Qwen2_5OmniDecoderLayer(c, index),
                           self.ckpt.thinker_config.text_config, under=f"layers.{index}.")

    def final_norm(self):
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRMSNorm

        cfg = self.ckpt.thinker_config.text_config
        return self._build("language_model", lambda c: Qwen2_5OmniRMSNorm(c.hidden_size, eps=c.rms_norm_eps),
                           cfg, under="norm.")

    def rotary_inv_freq(self):
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding

        return Qwen2_5OmniRotaryEmbedding(self.ckpt.thinker_config.text_config).inv_freq

    @property
    def visual(self):
        if "visual" not in self._built:
            from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

            self._built["visual"] = self._build("visual", Qwen2_5OmniVisionEncoder._from_config, self.ckpt.thinker_config.vision_config)
        return self._built["visual"]

    @property
    def audio_tower(self):
        if "audio_tower" not in self._built:
            from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

            self._built["audio_tower"] = self._build("audio_tower", Qwen2_5OmniAudioEncoder._from_config, self.ckpt.thinker_config.audio_config)
        return self._built["audio_tower"]

    @property
    def language_model(self):
        if "language_model" not in self._built:
            from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerTextModel

            self._built["language_model"] = self._build(
                "language_model", Qwen2_5OmniThinkerTextModel._from_config, self.ckpt.thinker_config.text_config)
        return self._built["language_model"]

    @property
    def lm_head(self):
        if "lm_head" not in self._built:
            import torch

            cfg = self.ckpt.thinker_config.text_config
            tensors = self.ckpt.tensors("lm_head")
            if "weight" in tensors:
                weight = tensors["weight"]
            elif cfg.tie_word_embeddings or self.ckpt.thinker_config.tie_word_embeddings:
                weight = self.embed_weight()
            else:
                raise CheckpointError(f"{self.ckpt.path}: no lm_head.weight and tie_word_embeddings is false")
            head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            head.weight = torch.nn.Parameter(weight.to(getattr(torch, self.dtype)), requires_grad=False)
            self._built["lm_head"] = head.eval()
        return self._built["lm_head"]

    def embed_weight(self):
        """The token embedding table [vocab, hidden] as a torch tensor (not kept)."""
        tensors = self.ckpt.tensors("language_model", only={"embed_tokens.weight"})
        if "embed_tokens.weight" not in tensors:
            raise CheckpointError(f"{self.ckpt.path}: no embed_tokens.weight in the language model tensors")
        return tensors["embed_tokens.weight"]

    def release(self, *components: str) -> None:
        """Drop built towers (all when none named) so their memory can be reused."""
        for c in components or list(self._built):
            self._built.pop(c, None)
        gc.collect()
