"""The PyTorch reference: what OmniGuard's published code runs for text output, in one place.

transformers' `Qwen2_5OmniThinkerForConditionalGeneration` (fp32, sdpa attention, greedy `generate`), the slow
PIL image processor and qwen-omni-utils' preprocessing (fetch_image, fetch_video's frame sampling and resize,
librosa at 16 kHz). Used by `benchmarks/latency.py` (through its worker process), `benchmarks/accuracy.py` and
the parity tests, so the three compare the runtime against the same thing. The checkpoint is loaded as it is:
no config is patched (reference checkpoints carry every token id a published config carries).

Needs the export extra plus qwen-omni-utils, librosa and PyAV (the `dev` extra).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def read_video_pyav(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    """What torchvision.io.read_video returned (TCHW uint8 frames, no audio, fps), decoded with PyAV:
    torchvision >= 0.26 dropped it, and qwen-omni-utils falls back to it without decord/torchcodec."""
    import av
    import torch

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate)
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), None, {"video_fps": fps}


def official_video(path):
    """qwen-omni-utils' fetch_video (frame sampling and resize) on PyAV-decoded frames: (clip, sample fps)."""
    import qwen_omni_utils.v2_5.vision_process as vp

    vp.io.read_video = read_video_pyav
    vp.FORCE_QWENVL_VIDEO_READER = "torchvision"
    vp.get_video_reader_backend.cache_clear()
    return vp.fetch_video({"video": str(path)}, return_video_sample_fps=True)


def official_image(path):
    from qwen_omni_utils import fetch_image

    return fetch_image({"image": str(path)})


def official_audio(path) -> np.ndarray:
    import librosa

    return librosa.load(str(path), sr=16000)[0]


@dataclass
class Media:
    """Media as the official path loads them, in prompt order (images, videos, audios)."""

    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    video_fps: list = field(default_factory=list)
    audios: list = field(default_factory=list)

    @classmethod
    def load(cls, image=None, video=None, audio=None) -> Media:
        m = cls()
        for p in _paths(image):
            m.images.append(official_image(p))
        for p in _paths(video):
            clip, fps = official_video(p)
            m.videos.append(clip)
            m.video_fps.append(fps)
        for p in _paths(audio):
            m.audios.append(official_audio(p))
        return m

    def kinds(self) -> list[str]:
        return ["image"] * len(self.images) + ["video"] * len(self.videos) + ["audio"] * len(self.audios)


def _paths(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Reference:
    """A loaded thinker and its processor (`Qwen2_5OmniProcessor`, PIL image processor)."""

    DTYPES = ("float32", "bfloat16", "float16")

    def __init__(self, checkpoint, threads: int | None = None, model=None, device: str = "cpu",
                 dtype: str = "float32"):
        """`device`: a torch device ("cpu", "cuda", "cuda:1"); `dtype`: the weights' and features' precision
        (float32, the parity reference; bfloat16 and float16 as PyTorch users run the model on a GPU)."""
        import torch
        from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

        if dtype not in self.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(self.DTYPES)}, not {dtype!r}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r}: this torch has no CUDA device (torch {torch.__version__})")
        if threads:
            torch.set_num_threads(threads)
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        if model is not None:  # a loaded model (shared by tests) is used as it is: its own dtype and device
            self.model, self.dtype, self.device = model, model.dtype, model.device
        else:
            self.model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
                Path(checkpoint), dtype=self.dtype, attn_implementation="sdpa").eval().to(self.device)
        # the slow PIL image processor: what the transformers versions OmniGuard used default to (docs/design.md "The model facts the code relies on")
        self.processor = Qwen2_5OmniProcessor.from_pretrained(Path(checkpoint), use_fast=False)
        self.tokenizer = self.processor.tokenizer
        pair = [self.tokenizer.encode(w, add_special_tokens=False) for w in ("safe", "unsafe")]
        self.verdict_ids = [t[0] for t in pair] if all(len(t) == 1 for t in pair) else None

    def inputs(self, guard_text: str, media: Media):
        """Processor inputs for one user turn: the guard text, then the media (chat template, tokenization,
        placeholder expansion, pixel and mel features), on the model's device and in its dtype."""
        import torch

        content = [{"type": "text", "text": guard_text}] + [{"type": k} for k in media.kinds()]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        if len(set(media.video_fps)) > 1:
            raise ValueError(f"the Qwen2.5-Omni processor takes one fps for all videos, got {media.video_fps}")
        kw = {"fps": media.video_fps[0]} if media.videos else {}
        out = self.processor(text=[text], images=media.images or None, videos=media.videos or None,
                             audio=media.audios or None, return_tensors="pt", padding=True, use_audio_in_video=False,
                             **kw)
        out = out.to(self.device)
        # BatchFeature.to(dtype) casts the floating tensors only (pixels, mel features); ids and masks stay int
        return out.to(self.dtype) if self.dtype is not torch.float32 else out

    def sync(self) -> None:
        """Wait for the device's queued work (CUDA runs asynchronously: a timer read without it measures nothing)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate(self, inputs, max_new_tokens: int, min_new_tokens: int = 0, streamer=None, logits: bool = False):
        """Greedy `thinker.generate`; returns (new token ids, the first step's raw logits [vocab] or None).
        Raw logits, not generate's processed scores: a checkpoint's generation_config may carry a repetition
        penalty or the like, and the runtime reads P(unsafe) from the model's own logits."""
        import torch

        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      do_sample=False, use_audio_in_video=False, streamer=streamer,
                                      output_logits=logits, return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        return new, (out.logits[0][0] if logits else None)

    def p_unsafe(self, first_logits) -> float | None:
        """Softmax over the `safe`/`unsafe` tokens at the verdict position (as the runtime computes it)."""
        import torch

        if self.verdict_ids is None or first_logits is None:
            return None
        return float(torch.softmax(first_logits[self.verdict_ids].double(), 0)[1])

    def staged(self, inputs) -> tuple[dict, "object"]:
        """The model's own pieces, called one at a time with the runtime's stage boundaries: vision and audio
        encoders, embedding + merge + TMRoPE position ids, then one decoder forward over the prompt with the
        LM head on the last position only (what the runtime's prefill graph computes). Returns (seconds per
        stage, last-position logits [vocab])."""
        import torch

        m = self.model.model
        secs = {"vision": 0.0, "audio": 0.0}
        with torch.no_grad():
            t = time.perf_counter()
            image = video = None
            if "pixel_values" in inputs:
                image = torch.cat(m.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                       return_dict=True).pooler_output, 0)
            if "pixel_values_videos" in inputs:
                video = torch.cat(m.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                       return_dict=True).pooler_output, 0)
            if image is not None or video is not None:
                self.sync()
                secs["vision"] = time.perf_counter() - t
            audio = None
            if "input_features" in inputs:
                t = time.perf_counter()
                audio = m.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"],
                                             return_dict=True).last_hidden_state
                self.sync()
                secs["audio"] = time.perf_counter() - t
            t = time.perf_counter()
            ids = inputs["input_ids"]
            embeds = m.get_input_embeddings()(ids)
            image_mask, video_mask, audio_mask = m.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image,
                                                                        video_features=video)
            for mask, feats in ((image_mask, image), (video_mask, video), (audio_mask, audio)):
                if feats is not None:
                    embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
            lengths = inputs["feature_attention_mask"].sum(1) if "feature_attention_mask" in inputs else None
            positions, _ = m.get_rope_index(ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                            inputs["attention_mask"], False, lengths,
                                            inputs.get("video_second_per_grid"))
            self.sync()
            secs["embed"] = time.perf_counter() - t
            t = time.perf_counter()
            hidden = m.language_model(inputs_embeds=embeds, position_ids=positions,
                                      attention_mask=inputs["attention_mask"], use_cache=True,
                                      return_dict=True).last_hidden_state
            logits = self.model.lm_head(hidden[:, -1])[0]
            self.sync()
            secs["prefill"] = time.perf_counter() - t
        return secs, logits
