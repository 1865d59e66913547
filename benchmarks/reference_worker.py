"""PyTorch + transformers side of latency.py, run in its own process (own thread pool, own peak memory).

The reference itself (thinker `generate`, fp32, sdpa, the PIL image processor, qwen-omni-utils preprocessing)
is `omniguard_edge.export.torch_reference`, shared with accuracy.py and the parity tests. Per run this worker
measures the stages of stages.STAGE_DEFINITIONS:
- preprocess: official media loading + the processor call (chat template, tokenization, features);
- vision, audio, embed, prefill: the model's own pieces called one at a time (`Reference.staged`), with the
  runtime's boundaries: prefill is the language model over the prompt with the LM head on the last position;
- first_token, verdict, total, decode_tok_s: preprocess + `thinker.generate`, the seed path end to end.
It also records whether the staged prefill chose the same first token as generate (a check that the staged
pieces compute what generate computes).

On a GPU (the spec's device and dtype: latency.py --reference-device cuda --reference-dtype bfloat16) each stage's
timer is read after the device's queue is drained (`Reference.sync`).

Usage (by engines.run_reference): python benchmarks/reference_worker.py CHECKPOINT SCENARIOS_JSON OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if not __package__:  # run by path: import the package from the repository root, as `python -m` does
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "benchmarks"

from .system import peak_rss_mb  # noqa: E402


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


def main(checkpoint: str, scenarios_json: str, out_json: str) -> None:
    import torch

    from omniguard_edge.export.torch_reference import Media, Reference

    cfg = json.loads(Path(scenarios_json).read_text())
    ref = Reference(checkpoint, threads=cfg["threads"], device=cfg.get("device", "cpu"),
                    dtype=cfg.get("dtype", "float32"))
    eos = ref.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    rows = []
    for sc in cfg["scenarios"]:
        samples = {k: [] for k in ("preprocess", "vision", "audio", "embed", "prefill", "first_token", "verdict",
                                   "total", "decode_tok_s")}
        matches = True
        for run in range(cfg["warmup"] + cfg["runs"]):
            t0 = time.perf_counter()
            media = Media.load(image=sc.get("image"), video=sc.get("video"), audio=sc.get("audio"))
            inputs = ref.inputs(sc["prompt_text"], media)
            t_pre = time.perf_counter() - t0
            staged, logits = ref.staged(inputs)
            stamps = _Stamps()
            stamps.start = time.perf_counter()
            tokens, _ = ref.generate(inputs, cfg["new_tokens"], min_new_tokens=cfg["new_tokens"], streamer=stamps)
            if eos:
                logits[eos] = -torch.inf  # generate masks EOS before min_new_tokens
            matches &= int(torch.argmax(logits)) == tokens[0]
            if run < cfg["warmup"]:
                continue
            times = stamps.times  # seconds from the generate call to each generated token
            if len(times) < cfg["verdict_tokens"]:
                raise SystemExit(f"PyTorch generated {len(times)} tokens on {sc['name']}, fewer than --verdict-tokens")
            samples["preprocess"].append(t_pre)
            for name, value in staged.items():
                samples[name].append(value)
            samples["first_token"].append(t_pre + times[0])
            samples["verdict"].append(t_pre + times[cfg["verdict_tokens"] - 1])
            samples["total"].append(t_pre + times[-1])  # to the last token, as the runtime's
            span = times[-1] - times[0]
            samples["decode_tok_s"].append((len(times) - 1) / span if span > 0 else float("nan"))
        rows.append({"scenario": sc["name"], "samples": samples, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                     "staged_matches_generate": bool(matches)})
    Path(out_json).write_text(json.dumps({"rows": rows, "peak_rss_mb": peak_rss_mb(),
                                          "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
