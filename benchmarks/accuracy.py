"""Accuracy of one or more bundles (and optionally the PyTorch reference) on evaluation packs.

    python benchmarks/accuracy.py --bundle B [--bundle B2 ...] [--reference CHECKPOINT]
        [--packs xstest_prompts figstep_images my_set.jsonl ...] [--limit 50 --seed 0]
        [--json out.json] [--baseline baseline.json --tolerance 0.02]

Decision per item: the constrained verdict (P(unsafe) > 0.5 from the logits at the verdict position),
so every item gets a verdict; errors count as unsafe (fail closed) and are reported. Metrics: unsafe
precision / recall / F1, FPR on safe items, parse rate of the free-text answer, per-category agreement,
and verdict agreement and |P(unsafe) difference| against the PyTorch reference and the fp32 bundle.
Packs, label rules and the JSONL format: benchmarks/evalpacks.py and the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402
import evalpacks  # noqa: E402

DEFAULT_PACKS = ["xstest_prompts", "xstest_responses", "openai_moderation", "simple_safety_tests", "ailuminate",
                 "figstep_images", "benign_images"]
HIGHER = {"precision", "recall", "f1", "parse_rate", "verdict_agreement"}


def predict_runtime(bundle: Path, items, args, bar) -> list[dict]:
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    guard = Guard.from_bundle(bundle, GuardOptions(max_new_tokens=args.new_tokens,
                                                   session=SessionOptions(intra_op_threads=args.threads)))
    out = []
    for it in items:
        r = guard.moderate(it.text, it.response, image=it.image, audio=it.audio, video=it.video)
        out.append({"verdict": r.verdict, "p_unsafe": r.p_unsafe, "categories": [c["code"] for c in r.categories],
                    "error": r.error})
        bar.update(1)
    return out


def predict_reference(checkpoint: Path, items, args, bar) -> list[dict]:
    """transformers' thinker.generate on the official preprocessing, P(unsafe) from the first scores."""
    import librosa
    import torch
    from qwen_omni_utils import fetch_image
    from reference_worker import official_video
    from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    from omniguard_edge.runtime.prompt import Conversation, Policy, render_guard_text
    from omniguard_edge.runtime.verdict import parse

    torch.set_num_threads(args.threads)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    proc = Qwen2_5OmniProcessor.from_pretrained(checkpoint, use_fast=False)
    tok = proc.tokenizer
    model.config.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_bos|>")
    model.config.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_eos|>")
    safe_unsafe = [tok.encode(w, add_special_tokens=False) for w in ("safe", "unsafe")]
    ids = [t[0] for t in safe_unsafe] if all(len(t) == 1 for t in safe_unsafe) else None
    out = []
    for it in items:
        image_only = it.image and not (it.text or it.response or it.audio or it.video)
        conv = None if image_only else Conversation.of(it.text or "", it.response)
        content = [{"type": "text", "text": render_guard_text(conv, Policy(), bool(image_only))}]
        images = [fetch_image({"image": it.image})] if it.image else None
        videos, kw = None, {}
        if it.video:
            clip, fps = official_video(it.video)
            videos, kw = [clip], {"fps": fps}
        audios = [librosa.load(it.audio, sr=16000)[0]] if it.audio else None
        content += [{"type": k} for k, v in (("image", images), ("video", videos), ("audio", audios)) if v]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)
        inputs = proc(text=[text], images=images, videos=videos, audio=audios, return_tensors="pt",
                      use_audio_in_video=False, **kw)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, use_audio_in_video=False)
        answer = tok.decode(gen.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        parsed = parse(answer)
        p = None
        if ids:
            pair = gen.scores[0][0, ids].double()
            p = float(torch.softmax(pair, 0)[1])
        out.append({"verdict": parsed.verdict, "p_unsafe": p, "categories": list(parsed.categories), "error": None})
        bar.update(1)
    return out


def decision(pred: dict) -> str:
    if pred["error"]:
        return "unsafe"  # fail closed
    if pred["p_unsafe"] is not None:
        return "unsafe" if pred["p_unsafe"] > 0.5 else "safe"
    return "safe" if pred["verdict"] == "safe" else "unsafe"


def metrics(items, preds) -> dict:
    tp = sum(1 for it, p in zip(items, preds) if it.label == "unsafe" and decision(p) == "unsafe")
    fp = sum(1 for it, p in zip(items, preds) if it.label == "safe" and decision(p) == "unsafe")
    fn = sum(1 for it, p in zip(items, preds) if it.label == "unsafe" and decision(p) == "safe")
    safe_n = sum(1 for it in items if it.label == "safe")
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if precision is not None and recall is not None else None)
    per_cat = {}
    for it, p in zip(items, preds):
        for code in it.categories:
            hit = decision(p) == "unsafe" and code in p["categories"]
            n, k = per_cat.get(code, (0, 0))
            per_cat[code] = (n + 1, k + hit)
    return {"n": len(items), "precision": precision, "recall": recall, "f1": f1,
            "fpr": fp / safe_n if safe_n else None,
            "parse_rate": sum(p["verdict"] in ("safe", "unsafe") for p in preds) / len(preds) if preds else None,
            "errors": sum(1 for p in preds if p["error"]),
            "category_agreement": {c: k / n for c, (n, k) in sorted(per_cat.items())}}


def agreement(a: list[dict], b: list[dict]) -> dict:
    same = [decision(x) == decision(y) for x, y in zip(a, b)]
    diffs = [abs(x["p_unsafe"] - y["p_unsafe"]) for x, y in zip(a, b)
             if x["p_unsafe"] is not None and y["p_unsafe"] is not None]
    return {"verdict_agreement": sum(same) / len(same) if same else None,
            "p_unsafe_abs_diff_mean": sum(diffs) / len(diffs) if diffs else None,
            "p_unsafe_abs_diff_max": max(diffs) if diffs else None}


def gate(doc: dict) -> tuple[dict, set]:
    flat, higher = {}, set()
    for engine, e in doc["engines"].items():
        for k, v in e["overall"].items():
            if isinstance(v, (int, float)) and k not in ("n", "errors"):
                flat[f"{engine}/{k}"] = v
                if k in HIGHER:
                    higher.add(f"{engine}/{k}")
    for engine, ag in doc["agreement"].items():
        for against, figures in ag.items():
            for k, v in figures.items():
                if v is not None:
                    flat[f"{engine}/{against}/{k}"] = v
                    if k in HIGHER:
                        higher.add(f"{engine}/{against}/{k}")
    return flat, higher


def main(argv=None) -> int:
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", required=True, help="repeatable")
    p.add_argument("--reference", type=Path, help="checkpoint to run through PyTorch + transformers too")
    p.add_argument("--packs", nargs="+", default=DEFAULT_PACKS,
                   help=f"packs ({', '.join(evalpacks.PACKS)}) and/or .jsonl files")
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="seed data folder")
    p.add_argument("--limit", type=int, help="items per pack, sampled with --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=16, help="generation budget per item (verdict first)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--media-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "omniguard-edge" / "eval-media")
    p.add_argument("--json", type=Path)
    p.add_argument("--save-items", action="store_true", help="include every item's predictions in the JSON")
    p.add_argument("--baseline", type=Path)
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed regression, a fraction of the baseline")
    args = p.parse_args(argv)
    items = evalpacks.load(args.packs, args.data, args.media_dir, args.limit, args.seed)
    if not items:
        p.error("no items: check --packs and --data")
    from omniguard_edge.runtime.manifest import load_manifest

    preds, random_weights, fp32 = {}, False, None
    with tqdm(total=len(items) * (len(args.bundle) + bool(args.reference)), desc="accuracy", unit="item") as bar:
        for bundle in args.bundle:
            m = load_manifest(bundle)
            random_weights |= bool(m.source.get("reference_checkpoint"))
            name = f"runtime:{bundle.name}"
            if m.precision == "fp32" and fp32 is None:
                fp32 = name
            preds[name] = predict_runtime(bundle, items, args, bar)
        if args.reference:
            random_weights |= (args.reference / "REFERENCE.md").exists()
            preds["pytorch"] = predict_reference(args.reference, items, args, bar)
    packs = sorted({it.pack for it in items})
    engines = {}
    for name, pr in preds.items():
        per_pack = {pk: metrics([i for i in items if i.pack == pk], [x for i, x in zip(items, pr) if i.pack == pk])
                    for pk in packs}
        engines[name] = {"overall": metrics(items, pr), "per_pack": per_pack}
    agree = {}
    for name, pr in preds.items():
        if name == "pytorch":
            continue
        agree[name] = {}
        if "pytorch" in preds:
            agree[name]["vs_reference"] = agreement(pr, preds["pytorch"])
        if fp32 and name != fp32:
            agree[name]["vs_fp32"] = agreement(pr, preds[fp32])
    note = ("RANDOM WEIGHTS: a reference checkpoint's verdicts mean nothing, so precision, recall and F1 are "
            "meaningless here; agreement with PyTorch and with the fp32 bundle is the meaningful number."
            if random_weights else "real checkpoint: F1 and agreement are both meaningful")
    doc = {"schema_version": benchlib.SCHEMA_VERSION, "kind": "accuracy", "random_weights": random_weights,
           "note": note, "packs": packs, "limit": args.limit, "seed": args.seed, "n_items": len(items),
           "system": benchlib.system_info(args.threads), "engines": engines, "agreement": agree}
    if args.save_items:
        doc["items"] = [dict(it.to_dict(), predictions={n: pr[i] for n, pr in preds.items()}) for i, it in enumerate(items)]
    headers = ["engine", "n", "precision", "recall", "F1", "FPR", "parse rate", "errors"]
    print(benchlib.markdown_table(headers, [[n, e["overall"]["n"], e["overall"]["precision"], e["overall"]["recall"],
                                             e["overall"]["f1"], e["overall"]["fpr"], e["overall"]["parse_rate"],
                                             e["overall"]["errors"]] for n, e in engines.items()]))
    rows = [[n, against, f["verdict_agreement"], f["p_unsafe_abs_diff_mean"], f["p_unsafe_abs_diff_max"]]
            for n, ag in agree.items() for against, f in ag.items()]
    if rows:
        print("\n" + benchlib.markdown_table(["engine", "against", "verdict agreement", "mean abs dP(unsafe)",
                                              "max abs dP(unsafe)"], rows))
    print(f"\n{note}")
    benchlib.write_json(args.json, doc)
    if args.baseline:
        base = json.loads(args.baseline.read_text())
        cur, higher = gate(doc)
        ref, _ = gate(base)
        problems = benchlib.compare_to_baseline(cur, ref, args.tolerance, higher)
        return benchlib.report_gate(problems, args.baseline, args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
