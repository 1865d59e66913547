"""The runtime stays torch-free, and the CLI works without the export extra's modules loaded."""

from __future__ import annotations

import subprocess
import sys

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
    proc = subprocess.run([sys.executable, "-m", "omniguard_edge.runtime.cli", "reference", "--profile", "huge",
                           "--out", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr


def test_cli_reports_bundle_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "omniguard_edge.runtime.cli", "verify", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "BundleError" in proc.stderr and "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr
