"""Reference checkpoint profiles: the real Qwen2.5-Omni thinker architecture at chosen dimensions.

`tiny` is for tests (a few MB, seconds). `small` has real-size encoders and a decoder of Qwen2.5-0.5B's
dimensions (our CPU speed anchors). `3b-shape` and `7b-shape` carry the real dimensions (docs/design.md "The model facts the code relies on").
`small-real` is `small` with a trained text decoder (Qwen2.5-Coder-0.5B-Instruct, export/real_weights.py) whose
two verdict rows are fitted on labelled text (calibration/verdict_head.py): the profile that judges precision.
"""

from __future__ import annotations

from dataclasses import dataclass

REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31])
# The encoders' std in small-real: at small's 0.05 the 32-block random vision encoder is chaotic (its INT8 graph
# scores cosine 0.946 against fp32, which no recipe can pass); a trained encoder is not. See docs/cli.md "small-real".
ENCODER_STD_REAL = 0.02
REAL_AUDIO = dict(encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280)


@dataclass(frozen=True)
class Profile:
    """Dimensions and weight scale of one reference checkpoint."""

    name: str
    text: dict  # Qwen2_5OmniTextConfig fields (hidden, layers, heads, kv heads, ffn, vocab, tie, mrope)
    vision: dict  # Qwen2_5OmniVisionEncoderConfig fields
    audio: dict  # Qwen2_5OmniAudioEncoderConfig fields
    init_std: float  # std of the random weights: large enough that media change the greedy tokens
    dtype: str = "float32"  # storage dtype of the safetensors
    encoder_std: float | None = None  # std of the encoders' random weights when it differs from init_std
    text_weights: str = "random"  # random | gguf: the decoder from a checked GGUF file (export/real_weights.py)
    fit_verdict: bool = False  # fit the plain verdict rows of the LM head on labelled text (text_weights gguf)
    shard_bytes: int = 2 * 1024**3
    notes: str = ""

    def __post_init__(self):
        heads, hidden = self.text["num_attention_heads"], self.text["hidden_size"]
        head_dim = hidden // heads
        if sum(self.text["mrope_section"]) * 2 != head_dim:
            raise ValueError(f"profile {self.name}: mrope_section must sum to head_dim/2 = {head_dim // 2}")
        if self.text_weights not in ("random", "gguf"):
            raise ValueError(f"profile {self.name}: text_weights must be 'random' or 'gguf'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"profile {self.name}: dtype {self.dtype!r} is not float32, bfloat16 or float16")


def _text(hidden, layers, heads, kv, ffn, vocab, tie, mrope):
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=tie, mrope_section=mrope,
    )


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            "tiny",
            text=_text(64, 2, 4, 2, 128, None, False, [2, 3, 3]),
            vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1, 3]),
            audio=dict(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32),
            # Measured: at 0.02 different images gave the same tokens; at 0.2 they diverge. At 0.2 the random decoder
            # also amplifies any perturbation through its layers, quantization noise included (a random-weight
            # proxy unlike a trained model's, which the precision issue allows fixing here): the INT4 decoder's
            # logits cosine against fp32 (its gate: 0.98) measured 0.777 at 0.2, 0.961 at 0.125, 0.981 at 0.08,
            # 0.983 at 0.065, 0.987 at 0.05 (worst of 21 held-out decoder inputs). At 0.05 three different images
            # still give different greedy tokens from the first token on (measured).
            init_std=0.05,
            notes="tests: a few MB, seconds",
        ),
        Profile(
            "small",
            text=_text(896, 24, 14, 2, 4864, 151936, False, [8, 12, 12]),
            vision=REAL_VISION, audio=REAL_AUDIO, init_std=0.05,
            notes="real-size encoders, Qwen2.5-0.5B-size decoder (untied head)",
        ),
        Profile(
            "small-real",
            text=_text(896, 24, 14, 2, 4864, 151936, False, [8, 12, 12]),
            vision=REAL_VISION, audio=REAL_AUDIO, init_std=0.05, encoder_std=ENCODER_STD_REAL,
            text_weights="gguf", fit_verdict=True,
            notes="small's encoders (random, at a non-chaotic scale) and a TRAINED Qwen2.5-0.5B decoder whose "
                  "verdict rows are fitted: a weak stand-in guard for judging precision",
        ),
        Profile(
            "3b-shape",
            text=_text(2048, 36, 16, 2, 11008, 151936, False, [16, 24, 24]),
            vision=REAL_VISION, audio=REAL_AUDIO, init_std=0.02, dtype="bfloat16",
            notes="Qwen2.5-Omni-3B dimensions",
        ),
        Profile(
            "7b-shape",
            text=_text(3584, 28, 28, 4, 18944, 152064, False, [16, 24, 24]),
            vision=REAL_VISION, audio=REAL_AUDIO, init_std=0.02, dtype="bfloat16",
            notes="Qwen2.5-Omni-7B dimensions",
        ),
    ]
}
