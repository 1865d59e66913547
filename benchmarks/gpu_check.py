"""One GPU check of a machine, meant to fit 10 minutes: what runs there, and does it agree with the CPU.

    python -m benchmarks.gpu_check --bundle B [--reference CKPT] [--json report.json]

Steps (each recorded as ok, skipped with the reason, or failed with the error). No step starts once --budget-s
(default 540 s) is spent, but a started step runs to its end: a TensorRT build of a large decoder alone can take
longer than 10 minutes (build engines first with `build-engines`, then run this).
1. environment: onnxruntime's providers, the GPU (compute capability), TensorRT's version, torch's CUDA;
2. engines: `build-engines` for the bundle when onnxruntime's TensorRT provider and TensorRT are both here;
3. parity: each GPU provider this machine has against the CPU fp32 run of the same bundle, on the requests made by
   `quantize --no-calibration` (text, prompt+response, images, audio, video): verdict agreement, |dP(unsafe)|;
4. latency: `latency.py` with each GPU provider (text, image 448, audio 5 s), and with --reference the PyTorch
   reference on CUDA in bf16 and fp32 beside it.

Exit status: 0 when nothing failed (skips are not failures: on a machine without a GPU every GPU step skips and says
why), 1 when a step failed or a provider disagreed with the CPU. `--providers cpu` runs steps 3-4 against the CPU
itself (what the tests do here, with no GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent  # latency.py is started by path: that works from any folder

PARITY_MAX_DP = 0.02  # |dP(unsafe)| a provider may differ from the CPU fp32 run by, at most (fp32 graphs)
SCENARIOS = ["text", "image_448", "audio_5s"]


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _step(report: dict, name: str, budget: Budget, fn):
    """Run `fn` as step `name` unless the budget is spent; record its status, seconds and result."""
    if budget.left() <= 0:
        report["steps"][name] = {"status": "skipped", "reason": "the time budget is spent"}
        return None
    t = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # a step's failure is reported, the next steps still run
        report["steps"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                 "seconds": round(time.perf_counter() - t, 1)}
        return None
    status = out.pop("status", "ok") if isinstance(out, dict) else "ok"
    report["steps"][name] = {"status": status, "seconds": round(time.perf_counter() - t, 1), **(out or {})}
    return out


def environment() -> dict:
    import onnxruntime as ort

    from omniguard_edge.runtime import gpu

    env = {"onnxruntime": ort.__version__, "providers_available": ort.get_available_providers()}
    for provider in ("cuda", "tensorrt"):
        env[f"{provider}_error"] = gpu.environment_error(provider)
    try:
        env["gpu"] = vars(gpu.probe_gpu())
    except gpu.GpuError as exc:
        env["gpu"] = None
        env["gpu_error"] = str(exc)
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        env["torch"], env["torch_cuda"] = None, False
    return env


def parity(bundle: Path, provider: str, media_dir: Path) -> dict:
    """Verdicts and P(unsafe) of `provider` against the CPU, request by request (default Guard options)."""
    import numpy as np

    from omniguard_edge.calibration.quantize import builtin_requests
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.gpu import provider_chain
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    requests = builtin_requests(media_dir)
    # the same decoder graph on both sides: a GPU chain runs the standard-ops one
    cpu = Guard.from_bundle(bundle, GuardOptions(session=SessionOptions(decoder_graph="decoder")))
    other = Guard.from_bundle(bundle, GuardOptions(session=SessionOptions(providers=provider_chain(provider),
                                                                          decoder_graph="decoder")))
    rows = []
    for name, req in requests:
        a, b = cpu.moderate(**req), other.moderate(**req)
        dp = abs(a.p_unsafe - b.p_unsafe) if a.p_unsafe is not None and b.p_unsafe is not None else None
        rows.append({"request": name, "verdict_cpu": a.verdict, "verdict_checked": b.verdict,
                     "p_unsafe_cpu": a.p_unsafe, "p_unsafe_checked": b.p_unsafe, "abs_dp": dp,
                     "error": a.error or b.error})
    agree = sum(r["verdict_cpu"] == r["verdict_checked"] and r["error"] is None for r in rows)
    dps = [r["abs_dp"] for r in rows if r["abs_dp"] is not None]
    # a graph onnxruntime put on another provider than the one checked: its agreement proves nothing
    expected = provider_chain(provider)[0]
    elsewhere = {g: p for g, p in other.bundle.providers.items() if p[0] != expected}
    ok = agree == len(rows) and len(dps) == len(rows) and max(dps) <= PARITY_MAX_DP and not elsewhere
    return {"status": "ok" if ok else "failed", "checked": provider, "providers_used": other.bundle.providers,
            "not_on_the_provider": elsewhere,
            "agreement": f"{agree}/{len(rows)}", "max_abs_dp": float(np.max(dps)) if dps else None,
            "max_abs_dp_allowed": PARITY_MAX_DP, "rows": rows}


def latency(bundle: Path, provider: str, reference: Path | None, dtype: str, runs: int, budget: Budget) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "latency.json"
        cmd = [sys.executable, str(HERE / "latency.py"), "--bundle", str(bundle), "--provider", provider,
               "--scenarios", *SCENARIOS, "--runs", str(runs), "--warmup", "1", "--peers", "none",
               "--json", str(out)]
        if reference is not None:
            cmd += ["--reference", str(reference), "--reference-device", "cuda" if provider != "cpu" else "cpu",
                    "--reference-dtype", dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30.0, budget.left()))
        if proc.returncode != 0:
            raise RuntimeError(f"latency.py exited {proc.returncode}: {proc.stderr[-1500:]}")
        doc = json.loads(out.read_text())
    keep = ("scenario", "engine", "stages")
    return {"command": " ".join(cmd[1:]), "rows": [{k: r[k] for k in keep if k in r} for r in doc["rows"]],
            "reference": doc.get("reference")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="an fp32 bundle (or a GPU recipe's)")
    p.add_argument("--reference", type=Path, help="its checkpoint: the PyTorch reference on CUDA, bf16 and fp32")
    p.add_argument("--providers", nargs="+", choices=["cpu", "cuda", "tensorrt"], default=["cuda", "tensorrt"],
                   help="what to check against the CPU (default: the GPU providers this machine has)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per latency scenario (default 3)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting steps after this (default 540)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)

    budget = Budget(args.budget_s)
    report = {"bundle": str(args.bundle), "steps": {}}
    env = _step(report, "environment", budget, environment) or {}
    # a provider is usable when the environment step said so (a failed step leaves nothing usable but the CPU)
    usable = [pr for pr in args.providers if pr == "cpu" or (f"{pr}_error" in env and env[f"{pr}_error"] is None)]
    for pr in args.providers:
        if pr not in usable:
            report["steps"][f"parity_{pr}"] = {"status": "skipped",
                                               "reason": env.get(f"{pr}_error") or "the environment step failed"}
    if "tensorrt" in usable:
        from omniguard_edge.runtime.gpu import build_engines

        _step(report, "engines", budget, lambda: {"records": build_engines(args.bundle, progress=False)})
    else:
        report["steps"]["engines"] = {"status": "skipped", "reason": env.get("tensorrt_error") or (
            "tensorrt not asked for" if "tensorrt" not in args.providers else "the environment step failed")}
    with tempfile.TemporaryDirectory() as media:
        for pr in usable:
            _step(report, f"parity_{pr}", budget, lambda pr=pr: parity(args.bundle, pr, Path(media)))
    for pr in usable:
        if args.skip_latency:
            report["steps"][f"latency_{pr}"] = {"status": "skipped", "reason": "--skip-latency"}
            continue
        gpu_torch = env.get("torch_cuda") or pr == "cpu"
        dtypes = ["bfloat16", "float32"] if args.reference is not None and gpu_torch else [None]
        for dtype in dtypes:
            name = f"latency_{pr}" + (f"_reference_{dtype}" if dtype else "")
            _step(report, name, budget, lambda pr=pr, dtype=dtype: latency(
                args.bundle, pr, args.reference if dtype else None, dtype or "float32", args.runs, budget))
    failed = [n for n, s in report["steps"].items() if s["status"] == "failed"]
    report["passed"] = not failed
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    width = max(len(n) for n in report["steps"])
    for name, s in report["steps"].items():
        detail = s.get("reason") or s.get("error") or (f"agreement {s['agreement']}, max |dP| {s['max_abs_dp']}"
                                                       if "agreement" in s else "")
        print(f"{name:{width}s}  {s['status']:7s}  {s.get('seconds', '-')!s:>6s} s  {detail}")
    print("PASSED" if not failed else f"FAILED: {', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
