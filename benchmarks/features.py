"""What each time-to-verdict feature buys, one at a time, in one process (docs/time-to-verdict.md "Time to verdict").

    python -m benchmarks.features --bundle BUNDLE [--runs 5] [--warmup 1] [--threads N] [--json out.json]

Configurations, each adding one feature to the one before:
  1 baseline         standard decoder graph, free decoding, `full` mode (32 tokens), no caches
  2 +prefix cache    the policy prefix's KV reused
  3 +grammar         answer grammar, `categories` mode (verdict first, category scores)
  4 +fast decoder    the in-place KV decoder graph (GroupQueryAttention), when the bundle has it
  5 +encoder cache   the same image again (image scenario only): its vision encoder is skipped
and, apart, `moderate_batch` of 4 text requests in `full` mode against the same 4 one by one.

Per configuration: time to verdict p50 (from the call until the verdict token is chosen; the baseline has no
grammar, so its verdict is its first token), total p50, decode tok/s p50 (between the first and last token,
`full` answers only) and the peak RSS of its runs (VmHWM reset before them). Seconds are this machine's: compare
configurations within one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run by path: import the package from the repository root, as `python -m` does
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "benchmarks"

from . import scenarios  # noqa: E402
from .report import markdown_table, write_json  # noqa: E402
from .system import peak_rss_mb, reset_peak_rss, system_info  # noqa: E402


def _measure(guard, kwargs: dict, runs: int, warmup: int, fresh_media=None) -> dict:
    verdict, total, rate = [], [], []
    reset_peak_rss()
    for i in range(warmup + runs):
        if fresh_media is not None:
            fresh_media()
        r = guard.moderate(**kwargs)
        if r.error:
            raise SystemExit(f"moderation failed: {r.error}")
        if i < warmup:
            continue
        t = r.timings
        verdict.append(t.get("verdict", t["generate_start"] + t["first_token"]))
        total.append(t["total"])
        times = r.token_times
        if len(times) > 2 and times[-1] > times[0]:
            rate.append((len(times) - 1) / (times[-1] - times[0]))
    return {"verdict_s": statistics.median(verdict), "total_s": statistics.median(total),
            "decode_tok_s": statistics.median(rate) if rate else None, "peak_rss_mb": peak_rss_mb(),
            "prompt_tokens": r.prompt_tokens, "cached_prompt_tokens": r.cached_prompt_tokens,
            "generated_tokens": r.generated_tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--media-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "omniguard-edge" / "bench-media")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("need --runs >= 1 and --warmup >= 0")
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    sc = scenarios.build(args.media_dir)
    text = {"text": sc["text"].text}
    image = {"text": sc["image_448"].text, "image": sc["image_448"].image}
    standard = SessionOptions(intra_op_threads=args.threads, decoder_graph="decoder")
    fast = SessionOptions(intra_op_threads=args.threads)
    fixed = dict(mode="full", constrain_verdict=False, critique_max_new_tokens=32, min_new_tokens=32)
    configs = [
        ("1 baseline", GuardOptions(**fixed, prefix_cache=False, encoder_cache_bytes=0, session=standard)),
        ("2 +prefix cache", GuardOptions(**fixed, encoder_cache_bytes=0, session=standard)),
        ("3 +grammar (categories mode)", GuardOptions(encoder_cache_bytes=0, session=standard)),
        ("4 +fast decoder", GuardOptions(encoder_cache_bytes=0, session=fast)),
    ]
    guards, rows = {}, []
    for name, options in configs:
        key = options.session.decoder_graph
        if key not in guards:
            guard = None
            guards.clear()  # one opened bundle at a time, or the peak RSS would count both
            gc.collect()
            guards[key] = Guard.from_bundle(args.bundle, options, verify="none")
        guard = Guard(guards[key].bundle, options)
        if name.startswith("4") and guard.bundle.decoder_graph != "decoder_gqa":
            print("note: the bundle has no fast decoder graph: configuration 4 skipped")
            continue
        for scenario, kwargs in (("text", text), ("image_448", image)):
            row = {"config": name, "scenario": scenario, **_measure(guard, kwargs, args.runs, args.warmup)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    last = next(iter(guards.values()))  # the bundle opened last: with the fast decoder when it has one
    cached = Guard(last.bundle, GuardOptions(session=last.options.session))
    row = {"config": "5 +encoder cache", "scenario": "image_448", **_measure(cached, image, args.runs, args.warmup)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    batch = {}
    full = Guard(cached.bundle, GuardOptions(encoder_cache_bytes=0, mode="full", critique_max_new_tokens=32,
                                             session=cached.options.session))
    prompts = [sc["text"].text, "How do I bake bread?", "Write a poem about rain.", "How do I pick a lock?"]
    for label, call in (("one by one", lambda: [full.moderate(x) for x in prompts]),
                        ("moderate_batch", lambda: full.moderate_batch(prompts))):
        call()
        spans = []
        for _ in range(max(1, args.runs // 2)):
            t = time.perf_counter()
            out = call()
            spans.append(time.perf_counter() - t)
        batch[label] = {"seconds": statistics.median(spans), "tokens": sum(r.generated_tokens for r in out)}
    print(json.dumps({"batch_of_4_full_mode": batch}), flush=True)
    doc = {"system": system_info(args.threads), "bundle": str(args.bundle), "runs": args.runs,
           "warmup": args.warmup, "rows": rows, "batch_of_4_full_mode": batch}
    print(markdown_table(
        ["config", "scenario", "verdict s", "total s", "decode tok/s", "peak RSS MiB", "prompt tok", "cached tok"],
        [[r["config"], r["scenario"], r["verdict_s"], r["total_s"], r["decode_tok_s"], r["peak_rss_mb"],
          r["prompt_tokens"], r["cached_prompt_tokens"]] for r in rows]))
    print(f"\nmoderate_batch of 4 text requests, full mode, 32 tokens each: {batch['moderate_batch']['seconds']:.2f} s "
          f"against {batch['one by one']['seconds']:.2f} s one by one")
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
