"""The runtime stays torch-free, and the CLI works without the export extra's modules loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import sys
import omniguard_edge.runtime
import omniguard_edge.runtime.cli
import omniguard_edge.runtime.manifest
import omniguard_edge.runtime.positions
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum')
             or m.startswith('omniguard_edge.export'))
print(bad)
sys.exit(1 if bad else 0)
"""


def test_runtime_imports_no_torch_transformers_or_export():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_help_and_typed_choices():
    """Through the command line's old name too (runtime/cli.py, kept for invocations that use it)."""
    proc = subprocess.run([sys.executable, "-m", "omniguard_edge.runtime.cli", "reference", "--profile", "huge",
                           "--out", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr


def test_cli_reports_bundle_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "omniguard_edge.cli", "verify", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "BundleError" in proc.stderr and "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr


EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxscript", "safetensors")


@pytest.mark.parametrize("argv", [
    ["reference", "--profile", "tiny", "--out", "{tmp}/ckpt"],
    ["export", "--checkpoint", "{tmp}/ckpt", "--out", "{tmp}/bundle"],
    ["demo", "--workdir", "{tmp}/work"],
])
def test_export_commands_without_the_export_extra(argv, tmp_path):
    """A runtime-only install: the export side's modules fail to import (fake packages that raise, first on
    the path). One line naming the extra, no traceback, nothing written (no --out, no .partial)."""
    blocker = tmp_path / "blocker"
    for name in EXPORT_MODULES:
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n')
    work = tmp_path / "work-area"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(blocker))
    args = [a.format(tmp=work) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "omniguard_edge.cli", *args], capture_output=True, text=True,
                          env=env, cwd=work)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert f"omniguard-edge {argv[0]}: needs the export extra (torch is not installed)" in lines[0]
    assert "omniguard-edge[cpu,export]" in lines[0] and "Traceback" not in proc.stderr
    assert list(work.iterdir()) == []  # no --out, no .partial sibling, no workdir


def test_quantize_without_the_quantize_extra(tiny_bundle, tmp_path):
    """Without onnx (a runtime-only install) `quantize` says which extra it needs, in one line, before any work."""
    blocker = tmp_path / "blocker"
    for name in ("onnx", "onnx_ir"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n')
    env = dict(os.environ, PYTHONPATH=str(blocker))
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-m", "omniguard_edge.cli", "quantize", "--bundle", str(tiny_bundle),
                           "--recipe", "cpu-int8", "--out", str(out)], capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "omniguard-edge quantize: needs the quantize extra (onnx is not installed)" in lines[0]
    assert "omniguard-edge[cpu,quantize]" in lines[0] and not out.exists()


MODERATE = """
import json, sys
from omniguard_edge.runtime.guard import Guard
guard = Guard.from_bundle(sys.argv[1])
results = [guard.moderate("hello"), guard.moderate("look", image=sys.argv[2], audio=sys.argv[3])]
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum')
             or m.startswith('omniguard_edge.export'))
print(json.dumps({"verdicts": [r.verdict for r in results], "bad": bad}))
"""


def test_moderation_runs_without_importing_torch(tiny_bundle, media_dir):
    import json

    proc = subprocess.run([sys.executable, "-c", MODERATE, str(tiny_bundle), str(media_dir / "colour_517x333.png"),
                           str(media_dir / "short_1.5s.wav")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bad"] == [] and "error" not in out["verdicts"]


def test_cli_moderate_json(tiny_bundle, media_dir):
    import json

    proc = subprocess.run([sys.executable, "-m", "omniguard_edge.cli", "moderate", "--bundle", str(tiny_bundle),
                           "--text", "hi", "--image", str(media_dir / "colour_517x333.png"), "--json"],
                          capture_output=True, text=True)
    result = json.loads(proc.stdout)
    assert result["verdict"] in ("safe", "unsafe", "unknown") and result["prompt_tokens"] > 500
    assert {"preprocess", "vision", "prefill", "total"} <= set(result["timings"])
    assert proc.returncode == {"safe": 0, "unsafe": 0, "unknown": 3}[result["verdict"]]


def test_cli_moderate_bad_file_exits_nonzero(tiny_bundle, tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "omniguard_edge.cli", "moderate", "--bundle", str(tiny_bundle),
                           "--image", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 1 and "verdict: error" in proc.stdout
