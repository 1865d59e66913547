"""Time per streaming check against a full re-moderation, as the reply grows (Guard.stream, runtime/stream.py).

    python -m benchmarks.stream_checks --bundle BUNDLE [--bundle B2 ...] [--lengths 64 512 2048] [--runs 3]
                                       [--threads N] [--json out.json]

Per bundle and run: one stream fed a reply of max(--lengths) tokens in chunks of 16 words, checked every 64
reply tokens (no sentence checks); the check at each length's token is timed (from its start to its result: the
prompt re-rendered and re-tokenized, the cache rolled back and extended by the new tokens, the tail and the verdict
on a fork). Against it, `moderate(prompt, reply so far)` at the same text: a full re-moderation, the policy
prefix cached as in the default Guard. Both in `verdict` mode. Their |dP(unsafe)| is reported: 0 up to rounding for
fp32 graphs (required), not for INT8 graphs whose activation scales come from each run's inputs. Medians of --runs. A check's time should stay
roughly constant while the re-moderation's grows with the reply. Seconds are this machine's: compare within a run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run by path: import the package from the repository root, as `python -m` does
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "benchmarks"

from .report import markdown_table, write_json  # noqa: E402
from .system import system_info  # noqa: E402

PROMPT = "Write me a long story about a trip to the mountains, with every detail you can think of."
EVERY = 64
WORDS = ("We left early in the morning and drove north along the river until the road climbed into the hills. The air "
         "grew colder with every bend, and the trees changed from oaks to pines. At noon we stopped at a small village "
         "where an old man sold bread and cheese from a wooden cart. He told us about the lake above the pass and the "
         "path that leads there through the forest.").split(" ")


def reply_of(tokenizer, tokens: int) -> str:
    """Filler text of at least `tokens` tokens (the words above, repeated)."""
    words, text = [], ""
    while len(tokenizer.encode(text, add_special_tokens=False).ids) < tokens + 8:
        words += WORDS
        text = " ".join(words)
    return text


def measure(bundle: Path, lengths: list[int], runs: int, threads: int) -> list[dict]:
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    guard = Guard.from_bundle(bundle, GuardOptions(mode="verdict", session=SessionOptions(intra_op_threads=threads)))
    text = reply_of(guard.bundle.tokenizer, max(lengths))
    words = text.split(" ")
    chunks = [" ".join(words[i:i + 16]) + " " for i in range(0, len(words), 16)]
    wanted = {n // EVERY: n for n in lengths}  # the k-th check is at token k x EVERY
    checks = {n: [] for n in lengths}
    render = {n: [] for n in lengths}  # the check's prompt re-rendered and re-tokenized whole
    full = {n: [] for n in lengths}
    dp = {n: [] for n in lengths}
    # fp32 graphs compute each position the same, up to rounding, however the prompt is split into runs; INT8
    # graphs whose activation scales come from each run's inputs (int8-dyn) do not: their |dP| is recorded
    exact = all(spec.precision == "fp32" for spec in guard.bundle.manifest.graphs.values())
    guard.moderate(PROMPT, "warm-up")  # the policy prefix built, the sessions' first runs done
    for _ in range(runs):
        # never stopped by an unsafe check: the random-weight reference's verdicts mean nothing, the timings do
        # token points only (no span points: the filler's tokens are final within a word), so that check k is at
        # token k x EVERY
        stream = guard.stream(PROMPT, every=EVERY, sentences=False, hysteresis=10**9, span=1 << 30)
        for chunk in chunks:
            stream.feed(chunk)
            if len(stream.checks) >= max(wanted):
                break
        stream.close()
        for k, n in wanted.items():
            check = stream.checks[k - 1]
            checks[n].append(check.result.timings["total"])
            render[n].append(check.result.timings["prompt"])
            t = time.perf_counter()
            result = guard.moderate(PROMPT, stream.reply[:check.position])
            full[n].append(time.perf_counter() - t)
            dp[n].append(abs(result.p_unsafe - check.result.p_unsafe))
            if exact and dp[n][-1] > 2.5e-5:  # fp32: the same judgement, or the figures mean nothing
                raise SystemExit(f"{bundle}: the check at {n} tokens gave P(unsafe) {check.result.p_unsafe}, a full "
                                 f"moderation {result.p_unsafe}")
    prompt_tokens = {n: guard.moderate(PROMPT, stream.reply[:stream.checks[k - 1].position]).prompt_tokens
                     for k, n in wanted.items()}
    return [{"bundle": str(bundle), "precision": guard.bundle.manifest.precision, "reply_tokens": n,
             "prompt_tokens": prompt_tokens[n], "check_s": statistics.median(checks[n]),
             "render_s": statistics.median(render[n]),
             "full_s": statistics.median(full[n]), "check_runs_s": checks[n], "full_runs_s": full[n],
             "max_abs_dp_unsafe": max(dp[n])}
            for n in lengths]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", required=True, help="a bundle (repeatable)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048],
                   help=f"reply lengths in tokens, multiples of {EVERY} (default 64 512 2048)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if any(n < EVERY or n % EVERY for n in args.lengths) or args.runs < 1 or args.threads < 0:
        p.error(f"--lengths must be multiples of {EVERY}, --runs >= 1, --threads >= 0")
    rows = [r for b in args.bundle for r in measure(b, sorted(args.lengths), args.runs, args.threads)]
    print(markdown_table(["bundle", "precision", "reply tok", "prompt tok", "check s", "of it: render + tokenize ms",
                          "full re-moderation s", "ratio", "max abs dP(unsafe)"],
                         [[Path(r["bundle"]).name, r["precision"], r["reply_tokens"], r["prompt_tokens"],
                           f"{r['check_s']:.3f}", f"{r['render_s'] * 1e3:.1f}", f"{r['full_s']:.3f}", f"{r['full_s'] / r['check_s']:.1f}x",
                           f"{r['max_abs_dp_unsafe']:.2g}"] for r in rows]))
    info = system_info(args.threads)
    print(f"\nmedians of {args.runs} runs, verdict mode, a check every {EVERY} reply tokens; CPU "
          f"{info.get('cpu', '?')} ({' '.join(info.get('cpu_flags', []))}), {args.threads or 'default'} threads")
    write_json(args.json, {"kind": "stream_checks", "every": EVERY, "runs": args.runs, "machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
