"""PyTorch + transformers reference for latency.py, run in its own process (own thread pool, own peak
memory). It runs what OmniGuard's published code runs for text output: the thinker's `generate`
(transformers 5.24: `Qwen2_5OmniThinkerForConditionalGeneration`, DESIGN section 1), greedy, fp32,
sdpa attention, the PIL image processor and qwen-omni-utils' preprocessing.

Usage (by latency.py): python reference_worker.py CHECKPOINT SCENARIOS_JSON OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


class _Stamps:
    """A generate() streamer that records when each new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.start, self.times, self._prompt_seen = 0.0, [], False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.start)

    def end(self):
        pass


def read_video_pyav(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    """What torchvision.io.read_video returned (TCHW uint8 frames, no audio, fps), decoded with PyAV:
    torchvision >= 0.26 dropped it, and qwen-omni-utils falls back to it without decord/torchcodec."""
    import av
    import torch

    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate)
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), None, {"video_fps": fps}


def official_video(path: str):
    """qwen-omni-utils' fetch_video (frame sampling and resize) on PyAV-decoded frames: (clip, sample fps)."""
    import qwen_omni_utils.v2_5.vision_process as vp

    vp.io.read_video = read_video_pyav
    vp.FORCE_QWENVL_VIDEO_READER = "torchvision"
    vp.get_video_reader_backend.cache_clear()
    return vp.fetch_video({"video": path}, return_video_sample_fps=True)


def main(checkpoint: str, scenarios_json: str, out_json: str) -> None:
    import librosa
    import torch
    from qwen_omni_utils import fetch_image
    from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    cfg = json.loads(Path(scenarios_json).read_text())
    torch.set_num_threads(cfg["threads"])
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()
    proc = Qwen2_5OmniProcessor.from_pretrained(checkpoint, use_fast=False)
    tok = proc.tokenizer
    model.config.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_bos|>")
    model.config.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_eos|>")
    rows = []
    for sc in cfg["scenarios"]:
        samples = {k: [] for k in ("preprocess", "vision", "audio", "prefill", "first_token", "verdict", "total",
                                   "decode_tok_s")}
        for run in range(cfg["warmup"] + cfg["runs"]):
            t0 = time.perf_counter()
            content = [{"type": "text", "text": sc["prompt_text"]}]
            images = [fetch_image({"image": sc["image"]})] if sc.get("image") else None
            videos, kw = None, {}
            if sc.get("video"):
                clip, fps = official_video(sc["video"])
                videos, kw = [clip], {"fps": fps}
            audios = [librosa.load(sc["audio"], sr=16000)[0]] if sc.get("audio") else None
            for kind, present in (("image", images), ("video", videos), ("audio", audios)):
                if present:
                    content.append({"type": kind})
            text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=False)
            inputs = proc(text=[text], images=images, videos=videos, audio=audios, return_tensors="pt",
                          padding=True, use_audio_in_video=False, **kw)
            t_pre = time.perf_counter() - t0
            with torch.no_grad():
                t = time.perf_counter()
                if images or videos:
                    if images:
                        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                    if videos:
                        model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
                t_vis = time.perf_counter() - t
                t = time.perf_counter()
                if audios:
                    model.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
                t_aud = time.perf_counter() - t
                stamps = _Stamps()
                t = time.perf_counter()
                stamps.start = t
                model.generate(**inputs, max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"],
                               do_sample=False, use_audio_in_video=False, streamer=stamps)
                times = stamps.times  # seconds from the call to each generated token
                timed = {"first_token": times[0], "verdict": times[cfg["verdict_tokens"] - 1],
                         "total": time.perf_counter() - t}
            if run < cfg["warmup"]:
                continue
            samples["preprocess"].append(t_pre)
            samples["vision"].append(t_vis)
            samples["audio"].append(t_aud)
            # generate() runs the encoders again, merges and prefills before its first token: minus the
            # encoder times measured above, that leaves embedding + merge + prefill
            samples["prefill"].append(max(timed["first_token"] - t_vis - t_aud, 0.0))
            for name in ("first_token", "verdict", "total"):
                samples[name].append(t_pre + timed[name])
            span = times[-1] - times[0]
            samples["decode_tok_s"].append((len(times) - 1) / span if span > 0 else float("nan"))
        rows.append({"scenario": sc["name"], "samples": samples, "prompt_tokens": int(inputs["input_ids"].shape[1])})
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import peak_rss_mb

    peak = peak_rss_mb()
    Path(out_json).write_text(json.dumps({"rows": rows, "peak_rss_mb": peak,
                                          "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
