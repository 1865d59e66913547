"""onnxruntime-genai as a peer engine, in its own process (latency.py --peers ort-genai).

    python benchmarks/peer_worker.py SPEC.json OUT.json

SPEC: {"models": {"fp32": DIR, "int4": DIR}, "threads": N, "warmup": W, "runs": R, "new_tokens": T,
       "scenarios": [{"name": ..., "ids": [prompt token ids], "prefix": P}]}

Per model and scenario, greedy decoding of the same prompt ids our runtime feeds (EOS masked to the budget, as
on our side), timed two ways:
- `ort-genai-<precision>`: a fresh generator per request (the whole prompt is prefilled): time to first token,
  then the budget's tokens (decode tok/s);
- `ort-genai-<precision>-reuse`: one generator whose first P tokens (the same policy prefix our runtime caches) are
  appended once; each request appends its remaining tokens, takes its first token, and rewinds to P
  (`append_tokens` / `rewind_to`): time to first token with its own prefix reuse.
The KV buffers are sized to the request (max_length = prompt + budget), as ours are.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def _summary(values: list[float]) -> dict:
    values = sorted(values)
    return {"n": len(values), "min": values[0], "p50": statistics.median(values), "max": values[-1],
            "p95": values[min(len(values) - 1, round(0.95 * (len(values) - 1)))], "mean": statistics.fmean(values)}


def _set_threads(model_dir: Path, threads: int) -> None:
    path = model_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = int(threads)
    path.write_text(json.dumps(cfg, indent=4))


def _params(og, model, length: int):
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    return params


def fresh(og, model, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, decode tok/s after it, tokens) of one request on a new generator."""
    gen = og.Generator(model, _params(og, model, len(ids) + new_tokens))
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    tokens, times = [], []
    while len(tokens) < new_tokens and not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
        times.append(time.perf_counter() - t0)
    span = times[-1] - times[0]
    return times[0], (len(times) - 1) / span if span > 0 else float("nan"), tokens


def main(spec_path: str, out_path: str) -> None:
    import onnxruntime_genai as og

    spec = json.loads(Path(spec_path).read_text())
    rows = []
    for precision, model_dir in spec["models"].items():
        _set_threads(Path(model_dir), spec["threads"])
        model = og.Model(str(model_dir))
        for sc in spec["scenarios"]:
            ids, prefix, new = sc["ids"], sc["prefix"], spec["new_tokens"]
            first, rate, tokens = [], [], None
            for run in range(spec["warmup"] + spec["runs"]):
                f, r, tokens = fresh(og, model, ids, new)
                if run >= spec["warmup"]:
                    first.append(f)
                    rate.append(r)
            rows.append({"scenario": sc["name"], "engine": f"ort-genai-{precision}", "prompt_tokens": len(ids),
                         "generated_ids": tokens, "stages": {"first_token": _summary(first),
                                                             "decode_tok_s": _summary(rate)}})
            if prefix < 1:
                continue  # nothing shared to reuse
            gen = og.Generator(model, _params(og, model, len(ids) + new))
            gen.append_tokens(ids[:prefix])  # the shared prefix, once (as our runtime caches it)
            reuse, first_token = [], None
            for run in range(spec["warmup"] + spec["runs"]):
                t0 = time.perf_counter()
                gen.append_tokens(ids[prefix:])
                gen.generate_next_token()
                elapsed = time.perf_counter() - t0
                first_token = int(gen.get_next_tokens()[0])
                gen.rewind_to(prefix)
                if run >= spec["warmup"]:
                    reuse.append(elapsed)
            rows.append({"scenario": sc["name"], "engine": f"ort-genai-{precision}-reuse", "prompt_tokens": len(ids),
                         "cached_prompt_tokens": prefix, "first_token_id": first_token,
                         "stages": {"first_token": _summary(reuse)}})
            print(f"{precision} {sc['name']}: first token {statistics.median(first):.3f} s, with prefix reuse "
                  f"{statistics.median(reuse):.3f} s, decode {statistics.median(rate):.1f} tok/s", flush=True)
        del model
    Path(out_path).write_text(json.dumps({"rows": rows, "onnxruntime_genai": og.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
